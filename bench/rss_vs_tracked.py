"""Process memory against tracked tensor bytes over one training step (CPU, Linux with glibc).

Claim (issue 3): the CPU measurement of memory.measure_step, which counts tensors, leaves
out nothing that costs real memory: oneDNN's private scratch buffers, the allocator's own
overhead and Python objects are small beside the tensors. For each run this prints:
- tracked: the peak bytes of the tensors that a step creates (memory.LiveTensorBytes with
  no adjustment: every new tensor counts, the parked layers' gradients included);
- RSS: the growth of the process's resident set over an identical step: its high-water
  mark (VmHWM, reset through /proc/self/clear_refs before the step) less VmRSS before it.
glibc's malloc is set to map every block of 64 KiB or more on its own and unmap it when
freed (M_MMAP_THRESHOLD), and freed heap memory is trimmed before each step, so that the
resident set follows the tensors' lifetimes rather than the allocator's caching. The
difference, RSS - tracked, is what the tracker cannot see.

    python bench/rss_vs_tracked.py [--width 1.0] [--input-shape 3x32x32] [--batch-size 128] [--memory-budget 64MB]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch

from asge_edge.budget import format_size, parse_size
from asge_edge.cli import parse_shape
from asge_edge.config import ModelConfig, TrainConfig
from asge_edge.memory import LiveTensorBytes
from asge_edge.methods import make_method
from asge_edge.planner import plan_memory
from workload import NUM_CLASSES, add_args, make_batch, make_net

M_MMAP_THRESHOLD = -3   # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 16


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss_growth(step, libc) -> int:
    """Resident-set growth over one call of ``step``, from a trimmed heap."""
    libc.malloc_trim(0)
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")   # reset VmHWM to the current RSS
    step()
    return _status_bytes("VmHWM") - before


def tracked_peak(step) -> int:
    """Peak bytes of the tensors created during one call of ``step``."""
    mode = LiveTensorBytes()
    with mode:
        step()
    return mode.peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p, width=1.0, shape="3x32x32")
    p.add_argument("--memory-budget", default="64MB")
    a = p.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("rss_vs_tracked.py needs Linux's /proc/self/clear_refs")
    libc = ctypes.CDLL("libc.so.6")
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        sys.exit("rss_vs_tracked.py needs glibc's malloc (mallopt failed)")
    shape = parse_shape(a.input_shape)
    cfg = ModelConfig(width=a.width)
    x, y = make_batch(a.batch_size, shape)
    plan = plan_memory(make_net(cfg, shape).specs, shape, a.batch_size, parse_size(a.memory_budget))

    runs = [("BP", "bp", None), ("ASGE, no budget", "asge", None),
            (f"ASGE, {a.memory_budget} (micro-batch {plan.micro_batch} x {plan.accumulation_steps})", "asge",
             plan.micro_batch)]
    print(f"vgg8 width {a.width}, input {a.input_shape}, batch {a.batch_size}, {NUM_CLASSES} classes, "
          f"torch {torch.__version__}, mmap threshold {MMAP_THRESHOLD} B")
    print(f"{'run':<42} {'tracked':>10} {'RSS growth':>11} {'RSS - tracked':>14}")
    for label, name, micro_batch in runs:
        method = make_method(make_net(cfg, shape), TrainConfig(method=name))
        if micro_batch is not None:
            method.micro_batch = micro_batch

        def step() -> None:
            method.train_step(x, y)

        step()
        step()   # optimiser state exists, and the allocator has seen every size
        rss, tracked = rss_growth(step, libc), tracked_peak(step)
        print(f"{label:<42} {format_size(tracked):>10} {format_size(rss):>11} {format_size(rss - tracked):>14}")


if __name__ == "__main__":
    main()
