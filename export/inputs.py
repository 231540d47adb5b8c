"""Images for ``asge-edge infer``: an image, a folder of images, IDX or .npy/.npz -> float32 [0, 1] NCHW.

Contract: ``load_images(path, input_shape)`` returns (an array (B, C, H, W) float32 in
[0, 1] that matches ``input_shape`` (C, H, W), the image files' names in that order, or
None for IDX and .npy/.npz), or raises UserError saying what was found and what the model
expects. uint8 data is scaled by 1/255; float data must already be in [0, 1]. (B, H, W)
gains the channel axis when C is 1; (B, H, W, C) is transposed. .npy and .npz load
without pickles. An image file, or a folder's images (any suffix ImageFolder reads, in
name order), is read in the model's colour mode; for a square input they get ImageFolder training's resize and
centre crop (data.folder_transform), so they may be of any size; otherwise they must all
be H x W already.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from asge_edge.data import folder_transform, read_idx, read_image
from asge_edge.errors import UserError


def _to_nchw(a: np.ndarray, shape: tuple[int, int, int], source: Path) -> np.ndarray:
    c, h, w = shape
    if a.ndim == 3 and c == 1:
        a = a[:, None]                                           # B, 1, H, W
    elif a.ndim == 4 and a.shape[1:] != (c, h, w) and a.shape[1:] == (h, w, c):
        a = a.transpose(0, 3, 1, 2)                              # B, C, H, W
    if a.ndim != 4 or a.shape[1:] != (c, h, w):
        want = "x".join(map(str, shape))
        raise UserError(f"{source}: images of shape {tuple(a.shape)} do not fit the model, which expects "
                        f"(B, {c}, {h}, {w}) = Bx{want} (or BxHxW for one channel); resize them first")
    if len(a) == 0:
        raise UserError(f"{source} holds no images")
    if a.dtype == np.uint8:
        return (a.astype(np.float32) / 255.0)
    if not np.issubdtype(a.dtype, np.floating):
        raise UserError(f"{source}: pixels of dtype {a.dtype}; pass uint8 (0..255) or floats in [0, 1]")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise UserError(f"{source}: {int((~np.isfinite(a)).sum())} pixels are NaN or infinite; pass finite "
                        "pixels in [0, 1]")
    if a.min() < 0 or a.max() > 1:
        raise UserError(f"{source}: float pixels must lie in [0, 1] (found {a.min():.3g}..{a.max():.3g}); "
                        "pass raw pixels, the model normalises them itself")
    return a


def load_images(path: Path, input_shape: tuple[int, int, int]) -> tuple[np.ndarray, list[str] | None]:
    """Read images from ``path``; see the module docstring."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMG_EXTENSIONS and f.is_file())
        if not files:
            raise UserError(f"{path} holds no images ({' '.join(IMG_EXTENSIONS)})")
        return _to_nchw(_read_images(files, input_shape, path), input_shape, path), [f.name for f in files]
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass an image, a folder of images, an IDX file or a .npy/.npz file")
    if path.suffix.lower() in IMG_EXTENSIONS:
        return _to_nchw(_read_images([path], input_shape, path), input_shape, path), [path.name]
    if path.suffix in (".npy", ".npz"):
        a = _load_numpy(path)
    else:
        try:
            a = read_idx(path).numpy()
        except UserError:
            raise UserError(f"{path} is neither an image, .npy/.npz nor an IDX file of unsigned bytes; pass "
                            "an image, a folder of images, IDX or .npy/.npz") from None
    return _to_nchw(a, input_shape, path), None


def _load_numpy(path: Path) -> np.ndarray:
    """The array of a .npy file, or of a .npz file's ``images`` (else its first array); no pickles."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return loaded
        with loaded as z:
            if not z.files:
                raise UserError(f"{path} holds no arrays")
            return z["images"] if "images" in z.files else z[z.files[0]]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable array of images ({e}); save plain arrays with numpy.save "
                        "or numpy.savez") from None


def _read_images(files: list[Path], shape: tuple[int, int, int], source: Path) -> np.ndarray:
    """Image files in the model's colour mode, as ImageFolder training reads them where the
    input is square; else they must be the input's size already."""
    c, h, w = shape
    mode = "L" if c == 1 else "RGB"
    if h == w:
        tf = folder_transform(h)
        return np.stack([tf(read_image(f, mode)).numpy() for f in files])   # B, C, H, W
    arrays = [np.asarray(read_image(f, mode)) for f in files]   # H, W (L) or H, W, 3 each
    wrong = [f.name for f, a in zip(files, arrays) if a.shape[:2] != (h, w)]
    if wrong:
        raise UserError(f"{source}: {len(wrong)} image(s), {wrong[0]} first, are not {w}x{h} (width x height), "
                        "the model's non-square input; resize them first")
    return np.stack(arrays)                                      # B, H, W (L) or B, H, W, 3
