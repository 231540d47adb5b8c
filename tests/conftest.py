"""Shared fixtures: small seeded networks and a tiny synthetic run.

The device comes from ASGE_TEST_DEVICE (default cpu), as in timm's tests, so the
same suite runs on a GPU machine with ASGE_TEST_DEVICE=cuda.
"""

import os

import pytest
import torch

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
