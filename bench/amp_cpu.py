"""What `--amp bf16` and `--amp fp16` cost on this CPU: ASGE step time per precision.

Claim (device.native_precision): where oneDNN reports no native kernels for a half type
(this VM's AVX2 CPU has neither AVX512-BF16 nor AVX512-FP16), torch's CPU autocast still
runs it, by emulation, several times slower than fp32, and the trainer says so when it
starts. Mixed precision on such a CPU buys memory (half-width activations), not speed.

Method: one seeded ASGE network per precision, each warmed up, then rounds of ``--steps``
steps that visit all three in alternating order (rounds.alternate); each row gives the
median round and its ratio to fp32's median.

    python bench/amp_cpu.py [--width 0.25] [--input-shape 1x28x28] [--batch-size 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch

from asge_edge.cli import parse_shape
from asge_edge.config import ModelConfig, TrainConfig
from asge_edge.device import native_precision
from asge_edge.methods import make_method
from rounds import alternate, step_timer
from workload import add_args, make_batch, make_net

PRECISIONS = ("fp32", "bf16", "fp16")


def make_round(precision: str, cfg: ModelConfig, shape, batch: int, steps: int) -> Callable[[], float]:
    """A warmed-up closure that times ``steps`` ASGE steps in ``precision``; seconds per step."""
    return step_timer(make_method(make_net(cfg, shape), TrainConfig(), precision), *make_batch(batch, shape), steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    shape, cfg = parse_shape(a.input_shape), ModelConfig(width=a.width)
    cpu = torch.device("cpu")
    print(f"vgg8 width {a.width}, input {a.input_shape}, batch {a.batch_size}, {a.rounds} rounds x {a.steps} steps, "
          f"CPU threads {torch.get_num_threads()}, capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    times = alternate({p: make_round(p, cfg, shape, a.batch_size, a.steps) for p in PRECISIONS}, a.rounds)
    base = statistics.median(times["fp32"])
    print("precision  native kernels  median step (ms)  vs fp32")
    for prec in PRECISIONS:
        med = statistics.median(times[prec])
        print(f"{prec:<10} {'yes' if native_precision(prec, cpu) else 'no':<15} {med * 1e3:16.1f}  {med / base:6.2f}x")


if __name__ == "__main__":
    main()
