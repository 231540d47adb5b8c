"""The cost of the per-step signal agreement under torchrun (distributed.World.max_signal).

Claim (docs/SCALE.md): every rank agrees on a signal before each step, one all-reduce of one
number, and that costs little next to a step. This times ``--calls`` calls on each rank
after a warm-up and prints rank 0's mean.

    torchrun --nproc-per-node 2 bench/max_signal.py [--calls 2000]   # gloo on the CPU
"""

from __future__ import annotations

import argparse
import time

import torch

from asge_edge.distributed import World


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    a = p.parse_args()
    world = World.from_env(torch.device("cpu"))
    if world is None:
        raise SystemExit("run it under torchrun: torchrun --nproc-per-node 2 bench/max_signal.py")
    for _ in range(50):
        world.max_signal(None)
    t0 = time.perf_counter()
    for _ in range(a.calls):
        world.max_signal(None)
    seconds = (time.perf_counter() - t0) / a.calls
    if world.is_main:
        print(f"World.max_signal: {1e6 * seconds:.0f} us per call, mean of {a.calls} "
              f"(gloo, {world.size} processes, torch {torch.__version__})")
    world.close(True)


if __name__ == "__main__":
    main()
