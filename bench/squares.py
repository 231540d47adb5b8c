"""The goodness pass's squares in chunks: what the count limit (asge.ENERGY_CHUNKS) changes.

Claims (asge.py, docs/BENCHMARKS.md): each chunk of squares costs a fixed host-side
dispatch, so at most ENERGY_CHUNKS chunks per layer are made, larger than
ENERGY_CHUNK_BYTES where the batch needs it; this is no slower on the CPU.

Method: for every layer of the net, ``asge.goodness_and_energy`` on a random channels_last
activation of that layer's shape at the batch, once in chunks of ENERGY_CHUNK_BYTES only
(no count limit, as before the limit) and once with the limit, in alternating rounds; each
row gives the median round. Then the host-side cost of one chunk: the same call on a tiny
activation squared one sample per chunk, over the number of chunks.

    python bench/squares.py [--width 0.25] [--input-shape 1x28x28] [--batch-size 128] [--rounds 9]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import asge_edge.asge as asge
from asge_edge.cli import parse_shape
from asge_edge.config import ModelConfig
from asge_edge.device import channels_last
from rounds import alternate
from workload import add_args, make_net

REPEATS = 10
NO_LIMIT = 2 ** 62


def timed(a: torch.Tensor, p: int, k: int, chunks: int):
    """A closure: ms per goodness_and_energy call on ``a`` with ENERGY_CHUNKS = ``chunks``."""
    def one_round() -> float:
        asge.ENERGY_CHUNKS = chunks
        t0 = time.perf_counter()
        for _ in range(REPEATS):
            asge.goodness_and_energy(a, p, k)
        return 1e3 * (time.perf_counter() - t0) / REPEATS
    return one_round


def chunk_count(sample_elements: int, batch: int, chunks: int) -> int:
    asge.ENERGY_CHUNKS = chunks
    return math.ceil(batch / asge.energy_rows(sample_elements, batch))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p)
    p.add_argument("--rounds", type=int, default=9)
    a = p.parse_args()
    shape = parse_shape(a.input_shape)
    limit = asge.ENERGY_CHUNKS
    print(f"width {a.width}, input {a.input_shape}, batch {a.batch_size}, ENERGY_CHUNK_BYTES "
          f"{asge.ENERGY_CHUNK_BYTES}, ENERGY_CHUNKS {limit}, CPU threads {torch.get_num_threads()}; "
          f"median ms of {a.rounds} rounds")
    print(f"{'layer':>5} {'activation':>18} {'chunks, no limit':>17} {'ms':>7} {'chunks, limit':>14} {'ms':>7} {'ratio':>6}")
    totals = [0, 0]
    for layer in make_net(ModelConfig(width=a.width), shape).layers:
        s = layer.spec
        act = channels_last(torch.rand(a.batch_size, s.channels, s.height, s.width))   # B, C, H, W
        counts = [chunk_count(s.channels * s.height * s.width, a.batch_size, c) for c in (NO_LIMIT, limit)]
        totals = [t + c for t, c in zip(totals, counts)]
        times = alternate({c: timed(act, s.partition, s.energy_window, c) for c in (NO_LIMIT, limit)}, a.rounds)
        old, new = (statistics.median(times[c]) for c in (NO_LIMIT, limit))
        print(f"{s.index:>5} {'x'.join(map(str, act.shape)):>18} {counts[0]:>17} {old:>7.2f} {counts[1]:>14} "
              f"{new:>7.2f} {new / old:>6.2f}")
    print(f"chunks per step: {totals[0]} without the limit, {totals[1]} with it")
    tiny = channels_last(torch.rand(256, 8, 4, 4))                                       # 256, 8, 4, 4
    size = asge.ENERGY_CHUNK_BYTES
    asge.ENERGY_CHUNK_BYTES = 8 * 4 * 4 * 4                                              # one sample a chunk
    one_each = statistics.median(alternate({"c": timed(tiny, 2, 2, NO_LIMIT)}, a.rounds)["c"])
    asge.ENERGY_CHUNK_BYTES = size
    whole = statistics.median(alternate({"c": timed(tiny, 2, 2, NO_LIMIT)}, a.rounds)["c"])
    print(f"host-side cost of a chunk: {1e3 * (one_each - whole) / 255:.1f} us "
          f"(256 one-sample chunks {one_each:.2f} ms, one chunk {whole:.3f} ms)")
    asge.ENERGY_CHUNKS = limit


if __name__ == "__main__":
    main()
