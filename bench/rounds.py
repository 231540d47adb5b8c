"""Alternating timing rounds, shared by the bench scripts.

Contract: ``alternate(fns, rounds)`` calls every function once per round, in the given
order in even rounds and reversed in odd ones, so that a drift in the machine's speed (tens
of percent within a minute on a shared 2-core VM) hits them all alike. Each function
returns its own measurement for that round (seconds, microseconds, ...); the result maps
each name to its list of per-round measurements.
"""

from __future__ import annotations

from typing import Callable


def alternate(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    names = list(fns)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(fns[name]())
    return out
