"""Alternating timing rounds, shared by the bench scripts.

Contract: ``alternate(fns, rounds)`` calls every function once per round, in the given
order in even rounds and reversed in odd ones, so that a drift in the machine's speed (tens
of percent within a minute on a shared 2-core VM) hits them all alike. Each function
returns its own measurement for that round (seconds, microseconds, ...); the result maps
each name to its list of per-round measurements. ``step_timer(method, x, y, steps)`` is
such a function for training steps: seconds per step over ``steps`` steps, after warm-up.
"""

from __future__ import annotations

import time
from typing import Callable


def alternate(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    names = list(fns)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(fns[name]())
    return out


def step_timer(method, x, y, steps: int, warmup: int = 2) -> Callable[[], float]:
    """A closure that times ``steps`` training steps of ``method`` on (x, y) and returns
    seconds per step; ``warmup`` untimed steps run first (optimiser state, allocator)."""
    for _ in range(warmup):
        method.train_step(x, y)

    def one_round() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            method.train_step(x, y)
        return (time.perf_counter() - t0) / steps

    return one_round
