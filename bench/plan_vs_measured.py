"""Planned vs measured training working set, one streaming ASGE step per budget.

Claim (issue 3): the planner's peak bounds the measured peak, so a run planned within a
budget stays within it, and so does each phase's plan (each layer's, and the heads') bound
that phase's measured peak. Prints planned and measured bytes (memory.measure_step), and
the range of the phases' measured/planned ratios, for a range of budgets, down to the
smallest the planner admits (where the layers' fixed bytes dominate, so an error in them
shows), on the CPU-sized VGG8 and Fashion-MNIST's input shape by default. On the CPU it
measures live tensor bytes; with ``--device cuda``, CUDA peak statistics, phase by phase,
which also count what the planner does not model (cuDNN workspaces, the caching
allocator's rounding): that run would say whether the plan holds on a GPU.
It has not been run on one (no GPU in the sessions that wrote it). ``--alpha`` sets the
partitions (at 1.5 the first layers' patches do not divide their maps: uneven patches),
and ``--pool`` the pooling, as in ``asge-edge train``.

    python bench/plan_vs_measured.py [--width 0.25] [--input-shape 1x28x28] [--batch-size 128]
                                     [--alpha 1.0] [--pool rms|avg|max] [--device auto|cpu|cuda] [--amp off|bf16|fp16]
"""

from __future__ import annotations

import argparse

from asge_edge.budget import format_size, parse_size
from asge_edge.cli import parse_shape
from asge_edge.config import POOLS, ModelConfig, TrainConfig
from asge_edge.device import to_device
from asge_edge.memory import measure_step, warm_up
from asge_edge.methods import ASGEMethod
from asge_edge.planner import BudgetTooSmall, plan_memory
from workload import add_args, add_device_args, device_and_precision, make_batch, make_net

BUDGETS = ("none", "64MB", "16MB", "6MB", "4.2MB", "2MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p)
    add_device_args(p)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--pool", default="rms", choices=POOLS)
    a = p.parse_args()
    (device, precision), shape = device_and_precision(a), parse_shape(a.input_shape)
    net = make_net(ModelConfig(width=a.width, alpha=a.alpha, pool=a.pool), shape).place(device)
    method = ASGEMethod(net, TrainConfig(), precision)
    x, y = to_device(*make_batch(a.batch_size, shape), device)
    warm_up(method, x, y)   # every optimiser's state now exists, as in every later step
    print(f"vgg8 width {a.width}, alpha {a.alpha}, {a.pool} pool, input {a.input_shape}, batch {a.batch_size}, {precision}, {device}")
    print(f"{'budget':>8} {'micro-batch':>12} {'planned':>10} {'measured':>10} {'measured/planned':>17} "
          f"{'phases, measured/planned':>25} {'every phase within its plan':>28}")
    floor = plan_memory(net.specs, shape, a.batch_size, None, precision).min_budget
    budgets = [(text, None if text == "none" else parse_size(text)) for text in BUDGETS] + [("smallest", floor)]
    for text, budget in budgets:
        try:
            plan = plan_memory(net.specs, shape, a.batch_size, budget, precision)
        except BudgetTooSmall as e:
            print(f"{text:>8} does not fit (smallest budget {format_size(e.min_budget)})")
            continue
        method.micro_batch = plan.micro_batch
        _, measured = measure_step(method, x, y)
        ratios = [m / p for m, p in zip((*measured.layers, measured.heads), (*plan.layer_peaks(), plan.heads_bytes))]
        print(f"{text:>8} {plan.micro_batch:>12} {format_size(plan.planned_peak):>10} {format_size(measured.peak):>10} "
              f"{measured.peak / plan.planned_peak:>17.3f} {f'{min(ratios):.3f}-{max(ratios):.3f}':>25} "
              f"{'yes' if max(ratios) <= 1 else 'NO':>28}")


if __name__ == "__main__":
    main()
