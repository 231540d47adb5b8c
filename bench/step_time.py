"""ASGE step time / BP step time, same model, same batch, measured side by side on the CPU.

Claim (issue 2): an ASGE training step costs at most 0.7x a backprop step, because a
layer's update needs no gradient with respect to its input (none is computed: each
layer's input carries no graph) and the goodness backward is fused (asge.relu_goodness).

Method: build the same seeded network twice, one per method; warm up; then alternate
ASGE and BP rounds of ``--steps`` steps so that any drift in machine speed hits both
alike, and report the median round of each. Both use channels_last, as the trainer does.

    python bench/step_time.py [--model vgg8] [--width 0.25] [--input-shape 1x28x28] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from asge_edge.config import ModelConfig, TrainConfig
from asge_edge.methods import make_method
from asge_edge.models import ASGENet

TARGET = 0.7


def make_round(method_name: str, cfg: ModelConfig, shape, batch: int, steps: int) -> Callable[[], float]:
    """A warmed-up closure that times ``steps`` training steps and returns seconds per step."""
    net = ASGENet(cfg, shape, 10, (0.5,) * shape[0], (0.25,) * shape[0]).to(memory_format=torch.channels_last)
    method = make_method(net, TrainConfig(method=method_name))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *shape, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(10, (batch,), generator=g)
    for _ in range(2):
        method.train_step(x, y)

    def one_round() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            method.train_step(x, y)
        return (time.perf_counter() - t0) / steps

    return one_round


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg8")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--input-shape", default="1x28x28")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    shape = tuple(int(v) for v in a.input_shape.split("x"))
    cfg = ModelConfig(arch=a.model, width=a.width)
    rounds = {m: make_round(m, cfg, shape, a.batch_size, a.steps) for m in ("asge", "bp")}
    times = {m: [] for m in rounds}
    for _ in range(a.rounds):
        for m, fn in rounds.items():
            times[m].append(fn())
    med = {m: statistics.median(v) for m, v in times.items()}
    ratio = med["asge"] / med["bp"]
    print(f"{a.model} width {a.width}, input {a.input_shape}, batch {a.batch_size}, CPU threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    print(f"{'method':<6} {'median step (ms)':>17} {'min (ms)':>9} {'max (ms)':>9}")
    for m in ("asge", "bp"):
        print(f"{m:<6} {1e3 * med[m]:>17.1f} {1e3 * min(times[m]):>9.1f} {1e3 * max(times[m]):>9.1f}")
    print(f"ASGE / BP step time: {ratio:.3f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
