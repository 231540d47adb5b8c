"""torchrun, 2 processes, gloo on the CPU: the same weights as 1 process at the doubled batch."""

import os
import subprocess
import sys

from safetensors.torch import load_file

from asge_edge.cli import main
from conftest import TINY_RUN

# Summation order differs (each process sums half the batch, then the halves are added):
# measured max |difference| 2e-6 after 12 AdamW steps; 1e-4 leaves room, while a wrong
# scaling of the halves (a mean of means, or a missing all-reduce) is off by far more.
DDP_ATOL = 1e-4
RUN = [*TINY_RUN, "--epochs", "1"]


def test_two_gloo_processes_equal_one_at_the_doubled_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *RUN, "--batch-size", "64", "--out", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29517", "-m", "asge_edge", "train", *RUN, "--batch-size", "32",
                           "--device", "cpu", "--out", str(two)], capture_output=True, text=True, env=env, timeout=300)
    # torchrun's own summary alone is about 2,000 characters: keep the ranks' messages before it
    assert done.returncode == 0, done.stderr[-8000:]
    a, b = load_file(one / "state.safetensors"), load_file(two / "state.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"max |1 process - 2 processes| over every tensor: {worst:.2e}")
    assert worst <= DDP_ATOL
    assert sum(k.startswith("model/layers.") and k.endswith("conv.weight") for k in a) == 7
    assert (two / "summary.json").is_file() and len((two / "metrics.jsonl").read_text().splitlines()) == 1
