"""Where an ASGE step and a BP step spend their time, op by op (torch.profiler, CPU).

Backs the breakdown in docs/BENCHMARKS.md: same model, batch and memory format as
bench/step_time.py; prints, per method, the ops with the most self time per step,
grouped by input shape so that each layer's conv shows on its own line. It also prints
the minor page faults per step (getrusage) with and without the profiler, which changes
how the allocator reuses memory: where a step faults only under the profiler, its large
elementwise ops read slower here than they run.

    python bench/profile_step.py [--width 0.25] [--input-shape 1x28x28] [--batch-size 128] [--rows 14]
"""

from __future__ import annotations

import argparse
import resource

from torch.profiler import ProfilerActivity, profile

from asge_edge.cli import parse_shape
from asge_edge.config import ModelConfig, TrainConfig
from asge_edge.methods import make_method
from workload import add_args, make_batch, make_net

STEPS = 3


def faults_per_step(method, x, y) -> float:
    """Minor page faults per training step of ``method`` (this process, getrusage)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(STEPS):
        method.train_step(x, y)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / STEPS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p)
    p.add_argument("--rows", type=int, default=14)
    a = p.parse_args()
    shape = parse_shape(a.input_shape)
    x, y = make_batch(a.batch_size, shape)
    for name in ("asge", "bp"):
        method = make_method(make_net(ModelConfig(width=a.width), shape), TrainConfig(method=name))
        for _ in range(2):
            method.train_step(x, y)
        plain = faults_per_step(method, x, y)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            profiled = faults_per_step(method, x, y)
        events = prof.key_averages(group_by_input_shape=True)
        total = sum(e.self_cpu_time_total for e in events) / STEPS / 1e3
        conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key) / STEPS / 1e3
        print(f"{name}: {total:.1f} ms/step of op self time, of which conv forward + backward {conv:.1f} ms "
              f"({conv / total:.0%}); page faults per step {plain:,.0f}, under the profiler {profiled:,.0f}")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: a.rows]:
            shapes = ", ".join("x".join(map(str, s)) for s in e.input_shapes if s)
            print(f"  {e.key:<28} {e.self_cpu_time_total / STEPS / 1e3:7.1f} ms  {shapes}")


if __name__ == "__main__":
    main()
