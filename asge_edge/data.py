"""Datasets: loading, fixed splits, batching and augmentation.

Contract:
- ``load_splits(cfg)`` returns train/val/test ``Split``s and a ``DataInfo`` (input
  shape, classes, normalisation). Images are uint8 (N, C, H, W), and so are the
  batches: the model scales and normalises them (models.ASGENet.normalize), one
  micro-batch at a time, so a logical batch costs 1 byte per pixel while it waits.
- Nothing downloads unless ``cfg.download`` is set. A missing dataset raises
  ``UserError`` naming the fix.
- The validation split is fixed (a permutation drawn from ``SPLIT_SEED``, whatever
  the run's seed), so runs with different seeds select on the same images.
- ``batches`` is deterministic given its generator: the trainer seeds one per epoch,
  so an epoch's order and augmentation can be replayed exactly.
- A SIGTERM ends a DataLoader worker cleanly (exit status 0), whoever sent it; where the
  caller's ``stop`` says a signal arrived, a loader that fails because its workers have
  ended raises ``Stopped`` (the caller saves and stops) instead of PyTorch's error.

Sources:
- ``fashion-mnist`` (default) and ``mnist``: IDX files, gzipped or not, read directly
  from ``root`` or from torchvision's ``root/<Name>/raw`` layout. Fashion-MNIST's
  default root is where Debian's ``dataset-fashion-mnist`` installs it.
- ``cifar10``, ``cifar100``: torchvision's python-pickle layout under ``root``
  (torchvision's reader; the only pickles read anywhere, and only from these
  torchvision-format dataset files).
- ``imagefolder``: ``root/train/<class>/*`` and ``root/val/<class>/*`` (the test set,
  as in ImageNet); images are resized and centre-cropped to ``image_size``.
- ``synthetic``: seeded, learnable class templates plus noise, generated in memory.
"""

from __future__ import annotations

import gzip
import os
import signal
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .config import DataConfig, DataInfo
from .errors import UserError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"   # Debian's dataset-fashion-mnist
SPLIT_SEED = 0
SYNTHETIC_SEED = 0
DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")

# Per-channel mean/std of each training set (the values torchvision's references use).
NORMS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),   # ImageNet's
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEFAULT_VAL = {"fashion-mnist": 10_000, "mnist": 10_000, "cifar10": 5_000, "cifar100": 5_000}   # the paper's splits
AUGMENT_PAD = 4   # CIFAR's standard random-crop padding
MAX_DEFAULT_WORKERS = 4
TENSOR_CHUNK = 256   # images per batch that split_tensors reads
# The defaults of the settings that one dataset alone reads (config.DATASET_ONLY).
SYNTHETIC_SHAPE, SYNTHETIC_CLASSES, SYNTHETIC_TRAIN_SIZE = (1, 16, 16), 4, 1024
FOLDER_IMAGE_SIZE = 64


@dataclass
class Split:
    """Images (N, C, H, W) uint8 with labels (N,) int64, or a lazy folder dataset."""

    images: torch.Tensor | None
    labels: torch.Tensor
    folder: torch.utils.data.Dataset | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    info: DataInfo


# ---------------------------------------------------------------- IDX (MNIST family)

def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (gzipped or raw) of unsigned bytes into a uint8 tensor.

    Raises:
        UserError: the file is truncated or not an IDX file of unsigned bytes.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}; reinstall the dataset or pass another --data-root") from None
    if len(raw) < 4 or raw[0:2] != b"\0\0" or raw[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes; check --data-root")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    count = 1
    for d in dims:
        count *= d
    body = raw[4 + 4 * ndim:]
    if len(body) != count:
        raise UserError(f"{path} is truncated ({len(body)} of {count} bytes); reinstall the dataset")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*dims)


def _find_idx(root: Path, folder: str, stem: str) -> Path | None:
    for base in (root, root / folder / "raw"):
        for name in (stem, stem + ".gz"):
            if (base / name).is_file():
                return base / name
    return None


def _idx_dataset(cfg: DataConfig, root: Path, folder: str) -> tuple[Split, Split, tuple[str, ...]]:
    stems = {k: f"{k}-idx{3 if 'images' in k else 1}-ubyte" for k in
             ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    paths = {k: _find_idx(root, folder, v) for k, v in stems.items()}
    if any(p is None for p in paths.values()) and cfg.download:
        _download(cfg, root)
        paths = {k: _find_idx(root, folder, v) for k, v in stems.items()}
    missing = [stems[k] for k, p in paths.items() if p is None]
    if missing:
        hint = ("run 'apt-get install dataset-fashion-mnist' or pass --data-root"
                if cfg.dataset == "fashion-mnist" else "pass --data-root, or --download")
        raise UserError(f"{cfg.dataset} not found in {root} (missing {missing[0]}[.gz]); {hint}")
    tensors = {k: read_idx(p) for k, p in paths.items()}
    names = FASHION_CLASSES if cfg.dataset == "fashion-mnist" else tuple(str(i) for i in range(10))
    train, test = (_idx_split(tensors, paths, part, len(names)) for part in ("train", "t10k"))
    return train, test, names


def _idx_split(tensors: dict[str, torch.Tensor], paths: dict[str, Path], part: str, classes: int) -> Split:
    """The images and labels of ``part`` ("train" or "t10k"), once they agree: a file of
    N x H x W images, one of N labels, each below ``classes``."""
    images, labels = tensors[f"{part}-images"], tensors[f"{part}-labels"]   # N, H, W and N, uint8
    image_path, label_path = paths[f"{part}-images"], paths[f"{part}-labels"]
    fix = "reinstall the dataset or pass another --data-root"
    if images.dim() != 3 or labels.dim() != 1:
        raise UserError(f"{image_path} and {label_path} hold arrays of {images.dim()} and {labels.dim()} "
                        f"dimensions, not images (N x H x W) and labels (N); {fix}")
    if len(images) != len(labels):
        raise UserError(f"{image_path} holds {len(images)} images but {label_path} {len(labels)} labels; {fix}")
    if len(labels) and int(labels.max()) >= classes:
        raise UserError(f"{label_path} holds label {int(labels.max())}, but the dataset has {classes} classes "
                        f"(0..{classes - 1}); {fix}")
    return Split(images.unsqueeze(1), labels.long())   # N, 1, H, W


def _download(cfg: DataConfig, root: Path) -> None:
    import torchvision.datasets as tvd

    cls = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST,
           "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[cfg.dataset]
    try:
        for train in (True, False):
            cls(str(root), train=train, download=cfg.download)
    except Exception as e:   # network errors come in many types
        raise UserError(f"--download of {cfg.dataset} into {root} failed ({type(e).__name__}); check the network or copy the files there") from None


# ---------------------------------------------------------------- CIFAR

def _cifar(cfg: DataConfig, root: Path) -> tuple[Split, Split, tuple[str, ...]]:
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if cfg.dataset == "cifar10" else tvd.CIFAR100
    if cfg.download:
        _download(cfg, root)
    try:
        parts = [cls(str(root), train=t, download=False) for t in (True, False)]
    except RuntimeError:
        raise UserError(f"{cfg.dataset} not found under {root}, or its files fail torchvision's checksums "
                        f"(torchvision layout, e.g. {root}/{cls.base_folder}); pass --data-root, or --download") from None
    train, test = (Split(torch.from_numpy(p.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(p.targets))
                   for p in parts)
    return train, test, tuple(parts[0].classes)


# ---------------------------------------------------------------- ImageFolder

def folder_transform(size: int):
    """ImageFolder's preprocessing, PIL image -> uint8 (C, size, size): the shorter side resized
    to ``size`` (antialiased), then the centre cropped. ``asge-edge infer`` applies it too."""
    import torchvision.transforms.v2 as T

    return T.Compose([T.PILToTensor(), T.Resize(size, antialias=True), T.CenterCrop(size)])


def _folder_side(cfg: DataConfig) -> int:
    """The side, in pixels, to which imagefolder's images are resized and cropped."""
    return cfg.image_size or FOLDER_IMAGE_SIZE


def _imagefolder(cfg: DataConfig, root: Path) -> tuple[Split, Split, tuple[str, ...]]:
    import torchvision.datasets as tvd

    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise UserError(f"imagefolder needs {root}/{sub}/<class>/<images>; pass --data-root")
    tf = folder_transform(_folder_side(cfg))
    try:
        train_ds, test_ds = (tvd.ImageFolder(str(root / s), transform=tf, loader=read_image) for s in ("train", "val"))
    except FileNotFoundError as e:   # a class folder without images
        raise UserError(f"imagefolder under {root}: {e}; every class folder needs images") from None
    if train_ds.classes != test_ds.classes:
        raise UserError(f"{root}/train and {root}/val have different class folders; make them match")
    train, test = (Split(None, torch.tensor(d.targets), folder=d) for d in (train_ds, test_ds))
    return train, test, tuple(train_ds.classes)


def read_image(path, mode: str = "RGB"):
    """The image at ``path`` as a PIL image in ``mode`` ("RGB", "L"); a file PIL cannot read
    is a UserError naming it. ImageFolder's loader, and ``asge-edge infer``'s PNG reader."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (OSError, Image.DecompressionBombError) as e:   # UnidentifiedImageError is an OSError
        raise UserError(f"{path} is not a readable image ({e.__class__.__name__}); remove or replace it") from None


def _worker_error(e: UserError) -> UserError:
    """A UserError raised in a DataLoader worker, which re-raises it with the worker's traceback in
    its message, cut back to its own one line."""
    return UserError(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1])


# ---------------------------------------------------------------- synthetic

def synthetic(cfg: DataConfig) -> tuple[Split, Split, tuple[str, ...]]:
    """Seeded, learnable images: a smooth random template per class, plus pixel noise.

    Each class template is a 4x4 Gaussian field upsampled to H x W; a sample is
    sigmoid(2 * template + N(0, 1)) quantised to uint8. Train has ``train_size``
    images, test ``max(1, train_size // 4)``. Unset settings take the SYNTHETIC_ defaults.
    """
    c, h, w = cfg.input_shape or SYNTHETIC_SHAPE
    k = cfg.num_classes or SYNTHETIC_CLASSES
    n_train = cfg.train_size or SYNTHETIC_TRAIN_SIZE
    gen = torch.Generator().manual_seed(SYNTHETIC_SEED)
    templates = torch.randn(k, c, 4, 4, generator=gen)                                   # K, C, 4, 4
    templates = F.interpolate(templates, size=(h, w), mode="bilinear", align_corners=False)   # K, C, H, W

    def make(n: int) -> Split:
        y = torch.randint(k, (n,), generator=gen)                                        # n
        x = torch.sigmoid(2 * templates[y] + torch.randn(n, c, h, w, generator=gen))    # n, C, H, W
        return Split((x * 255).round().to(torch.uint8), y)

    return make(n_train), make(max(1, n_train // 4)), tuple(f"class{i}" for i in range(k))


# ---------------------------------------------------------------- splits

def _subset(split: Split, idx: torch.Tensor) -> Split:
    if split.folder is not None:
        return Split(None, split.labels[idx], folder=torch.utils.data.Subset(split.folder, idx.tolist()))
    return Split(split.images[idx], split.labels[idx])


def part_of(split: Split, k: int, parts: int) -> Split:
    """The k-th of ``parts`` contiguous blocks of ``split`` (``block``): a torchrun rank's share
    of a split it evaluates. A block may be empty where the split is shorter than ``parts``."""
    return _subset(split, torch.arange(len(split))[block(len(split), k, parts)])


def spread(split: Split, n: int) -> Split:
    """``n`` samples of ``split``, evenly spaced over it and in its order (all of it where n >=
    its length): a subset that covers every class even of a split sorted by class, as an
    ImageFolder's is."""
    if n >= len(split):
        return split
    return _subset(split, torch.linspace(0, len(split) - 1, n).round().long())


def load_splits(cfg: DataConfig) -> Splits:
    """Load ``cfg.dataset`` and carve the fixed validation split off its training set.

    Raises:
        UserError: unknown dataset, missing or corrupt files, bad split size.
    """
    if cfg.dataset not in DATASETS:
        raise UserError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(DATASETS)}")
    if cfg.dataset == "synthetic":
        train, test, names = synthetic(cfg)
        c = train.images.shape[1]
        mean, std = (0.5,) * c, (0.25,) * c
    else:
        default_root = FASHION_MNIST_ROOT if cfg.dataset == "fashion-mnist" else None
        if cfg.root is None and default_root is None:
            raise UserError(f"{cfg.dataset} needs --data-root (torchvision's layout)")
        root = Path(cfg.root or default_root)
        if not root.exists() and not cfg.download:
            hint = ("run 'apt-get install dataset-fashion-mnist' or pass --data-root"
                    if cfg.dataset == "fashion-mnist" else "check --data-root (a moved run: give its new one), or add --download")
            raise UserError(f"dataset root {root} does not exist; {hint}")
        loader = {"cifar10": _cifar, "cifar100": _cifar, "imagefolder": _imagefolder}.get(cfg.dataset)
        if loader is None:
            train, test, names = _idx_dataset(cfg, root, "FashionMNIST" if cfg.dataset == "fashion-mnist" else "MNIST")
        else:
            train, test, names = loader(cfg, root)
        mean, std = NORMS[cfg.dataset]
    if len(names) < 2:
        classes = f"{len(names)} class{'' if len(names) == 1 else 'es'}"
        raise UserError(f"{cfg.dataset} has {classes}; a classifier needs at least 2 "
                        "(--num-classes for synthetic, one folder per class for imagefolder)")
    n = len(train)
    val_size = cfg.val_size if cfg.val_size is not None else DEFAULT_VAL.get(cfg.dataset, max(1, n // 10))
    if not 0 < val_size < n:
        raise UserError(f"--val-size must be between 1 and {n - 1} for {cfg.dataset}, got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    val, train = _subset(train, perm[:val_size]), _subset(train, perm[val_size:].sort().values)
    shape = tuple(train.images.shape[1:]) if train.images is not None else (3,) + (_folder_side(cfg),) * 2
    info = DataInfo(input_shape=shape, num_classes=len(names), class_names=names, mean=mean, std=std)
    return Splits(train, val, test, info)


# ---------------------------------------------------------------- batching

def augment(x: torch.Tensor, gen: torch.Generator, pad: int = AUGMENT_PAD, rows: slice | None = None,
            total: int | None = None) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of a uint8 batch (B, C, H, W).

    ``x`` may be the ``rows`` of a batch of ``total`` images (a torchrun rank's part): the
    draws are the whole batch's, so each row comes out as it would in the whole batch."""
    b, c, h, w = x.shape
    total, rows = (b, slice(0, b)) if rows is None else (total, rows)
    padded = F.pad(x, (pad, pad, pad, pad))                                    # B, C, H+2p, W+2p
    dy, dx = torch.randint(2 * pad + 1, (2, total), generator=gen)[:, rows]
    flip = (torch.rand(total, generator=gen) < 0.5)[rows]
    n, ch = torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None]
    ys = (dy[:, None] + torch.arange(h))[:, None, :, None]                     # B, 1, H, 1
    xs = (dx[:, None] + torch.arange(w))[:, None, None, :]                     # B, 1, 1, W
    out = padded[n, ch, ys, xs]                                                # B, C, H, W
    out[flip] = out[flip].flip(-1)
    return out


def default_workers() -> int:
    """DataLoader workers for folder datasets when the user names none: one per CPU core this
    process may run on, at most MAX_DEFAULT_WORKERS (more than the cores only contend, and
    torch warns about it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(MAX_DEFAULT_WORKERS, cores)


def block(n: int, k: int, parts: int) -> slice:
    """The k-th of ``parts`` contiguous blocks of ``n`` items, whose sizes differ by at most one."""
    return slice(n * k // parts, n * (k + 1) // parts)


class Stopped(Exception):
    """A loop over ``batches`` ended early because its ``stop`` said so: a signal arrived."""


def batches(split: Split, batch_size: int, gen: torch.Generator | None = None,
            augment_batches: bool = False, workers: int = 0,
            stop: Callable[[], bool] | None = None,
            part: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (raw pixels uint8 (B, C, H, W), labels (B,)) over ``split``.

    Args:
        split: the data.
        batch_size: images per batch; the last batch may be smaller.
        gen: shuffles (and augments) when given; sequential order otherwise.
        augment_batches: apply ``augment`` (needs ``gen``).
        workers: DataLoader workers for folder datasets.
        stop: asked when the DataLoader fails; where it says a signal arrived, the workers
            ended with it (a batch in flight can then fail in many ways: a RuntimeError, an
            OSError or EOFError while it is unpickled), and ``Stopped`` is raised instead.
        part: (k, parts): only the k-th of ``parts`` contiguous blocks of each batch (``block``;
            a torchrun rank's share of the global batch). Only those images are read, and
            they come out as in the whole batch, augmentation included. A part of a last
            batch shorter than ``parts`` may be empty: it comes out as (0, C, H, W) pixels.
    """
    n = len(split)
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    whole = order.split(batch_size) if n else ()                          # each batch's indices (none: no batch)
    rows = [block(len(idx), *part) for idx in whole]
    if split.folder is not None:
        # a DataLoader batch cannot be empty: an empty part reads its batch's first image
        # (for the pixels' shape), and drops it below
        sampler = [(idx[r] if r.stop > r.start else idx[:1]).tolist() for idx, r in zip(whole, rows)]
        source = torch.utils.data.DataLoader(split.folder, batch_sampler=sampler, num_workers=workers,
                                             worker_init_fn=_end_cleanly_on_sigterm if workers else None)
    else:
        source = ((split.images[idx[r]], split.labels[idx[r]]) for idx, r in zip(whole, rows))
    try:
        for (x, y), idx, r in zip(source, whole, rows):
            x, y = x[:r.stop - r.start], y[:r.stop - r.start]
            if augment_batches and gen is not None:
                x = augment(x, gen, rows=r, total=len(idx))
            yield x, y
    except UserError as e:   # an unreadable image (read_image)
        raise (_worker_error(e) if workers else e) from None
    except Exception:   # the DataLoader's workers ended: "exited unexpectedly", or a batch they left unreadable
        if stop is not None and stop():
            raise Stopped from None
        raise


def _end_cleanly_on_sigterm(_worker_id: int) -> None:
    """A DataLoader worker's SIGTERM handler: exit at once with status 0, whoever sent it, as
    PyTorch's own handler does when the main process sent it.

    From anyone else (a scheduler signalling the whole process group, a terminal's group)
    PyTorch's handler lets the signal kill the worker, and the main process's SIGCHLD handler
    then raises mid-step, before the trainer can save. Ended with status 0, the worker leaves
    the main process to finish its step and save; one that waits for the next batch
    meanwhile gets ``Stopped`` (``batches``). A KeyboardInterrupt would be the gentler exit,
    but one raised inside a finaliser is ignored, and the worker lives on (seen on torch
    2.11); ignoring SIGTERM would leave nothing able to end a stray worker, and its process
    would hang at exit. Messages in flight are a few hundred bytes (tensors travel by shared
    memory), so no partial one is left in the pipe. Each loop over ``batches`` starts new
    workers, and one signalled in the moment before this runs still dies of the signal."""
    signal.signal(signal.SIGTERM, lambda _signum, _frame: os._exit(0))


def split_tensors(split: Split, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split in memory, read from its folder where it has one: pixels float32 in
    [0, 1] (N, C, H, W), as the exported graphs take them, and labels (N,)."""
    xs, ys = zip(*batches(split, TENSOR_CHUNK, workers=workers))
    return torch.cat(xs).float().div_(255), torch.cat(ys)
