"""Shared fixtures: small seeded networks and a tiny synthetic run.

The device comes from ASGE_TEST_DEVICE (default cpu), as in timm's tests, so the
same suite runs on a GPU machine with ASGE_TEST_DEVICE=cuda.
"""

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from asge_edge.cli import main

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def device() -> str:
    return os.environ.get("ASGE_TEST_DEVICE", "cpu")


# A small synthetic task that a CPU trains in seconds; chance is 1/4.
TINY_RUN = ["--dataset", "synthetic", "--input-shape", "1x16x16", "--num-classes", "4", "--train-size", "768",
            "--width", "0.125", "--epochs", "3", "--batch-size", "64", "--quiet"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, device):
    """A finished 3-epoch ASGE run directory (trained once per session)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", *TINY_RUN, "--device", device, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def uneven_run(tmp_path_factory, device):
    """A 1-epoch ASGE run at alpha 1.5, where layers 1-3's patches (P = 6, 3, 3 on 16, 16 and
    8 pixels) do not divide their maps."""
    out = tmp_path_factory.mktemp("uneven") / "run"
    assert main(["train", *TINY_RUN, "--train-size", "256", "--epochs", "1", "--alpha", "1.5",
                 "--device", device, "--out", str(out)]) == 0
    return out


def run_progress(out):
    """state.safetensors's progress, or None while there is none (or it is being replaced)."""
    try:
        with safe_open(str(out / "state.safetensors"), "pt") as f:
            return json.loads(f.metadata()["meta"])["progress"]
    except Exception:   # not written yet
        return None


def mixed_image_folder(root: Path, per_class: int = 6) -> None:
    """train/ and val/ of three classes of images in four PIL modes and assorted sizes, as
    users' folders hold; class k is brighter than class k-1, so it is learnable."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for sub in ("train", "val"):
        for k, cls in enumerate(("cat", "dog", "owl")):
            (root / sub / cls).mkdir(parents=True)
            for i in range(per_class):
                h, w = (int(v) for v in torch.randint(10, 40, (2,), generator=gen))
                pixels = (torch.rand(h, w, 3, generator=gen) * 80 + 80 * k).to(torch.uint8)
                img = Image.fromarray(pixels.numpy()).convert(("RGB", "L", "RGBA", "P")[i % 4])
                img.save(root / sub / cls / f"{i}.{'jpg' if i % 4 < 2 else 'png'}")


@pytest.fixture(scope="session")
def folder_run(tmp_path_factory, device):
    """(run directory, its image folder, the warnings its training raised): a 1-epoch ASGE run
    on a mixed ImageFolder (15 train, 3 val, 18 test images of 16x16), default --workers."""
    root = tmp_path_factory.mktemp("folder")
    mixed_image_folder(root / "data")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--dataset", "imagefolder", "--data-root", str(root / "data"), "--image-size", "16",
                     "--val-size", "3", "--width", "0.0625", "--epochs", "1", "--batch-size", "8", "--quiet",
                     "--device", device, "--out", str(root / "run")]) == 0
    return root / "run", root / "data", [str(w.message) for w in caught]
