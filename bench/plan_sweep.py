"""Planned vs measured training working set over random nets: the planner's bound, fuzzed.

Claim (issue 3): for any net the trainer takes, each phase's plan (each layer's, and the
heads') bounds that phase's measured peak, so a run planned within a budget stays within
it. bench/plan_vs_measured.py checks that on fixed nets over a range of budgets; this draws
``--nets`` nets at random, seeded by ``--seed``: vgg8 or vgg11, widths 1/16 to 1/3, alpha
0 to 3, every pool, fp32, bf16 or fp16, AdamW or SGD, inputs of 1, 3 or 4 channels and 8
to 40 pixels a side (square or not), odd batches and class counts, and budgets of 1 to 5
times the smallest. Each net warms up (memory.warm_up: under fp16, until GradScaler has let
every optimiser step), then one step is measured (memory.measure_step). Prints a line per
net, with its largest measured/planned ratio over the phases, then how many nets stayed
within every phase's plan. On the CPU, bf16 and fp16 are emulated: slow, but the same bytes.

    python bench/plan_sweep.py [--seed 1] [--nets 40] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import random

import torch

from asge_edge.config import POOLS, ModelConfig, TrainConfig
from asge_edge.device import DEVICES, resolve_device, to_device
from asge_edge.memory import measure_step, warm_up
from asge_edge.methods import ASGEMethod
from asge_edge.models import ASGENet
from asge_edge.planner import plan_memory


def draw(rng: random.Random) -> dict:
    """One random configuration (every field a plain value, printed as drawn)."""
    side = rng.randint(8, 40)
    return {"arch": rng.choice(["vgg8", "vgg11"]), "width": rng.choice([0.0625, 0.1, 0.125, 0.2, 0.25, 0.33]),
            "alpha": rng.choice([0.0, 0.5, 1.0, 1.5, 2.0, 3.0]), "pool": rng.choice(POOLS),
            "precision": rng.choice(["fp32", "bf16", "fp16"]), "optimizer": rng.choice(["adamw", "sgd"]),
            "shape": (rng.choice([1, 3, 4]), side, rng.choice([side, rng.randint(8, 40)])),
            "batch": rng.choice([7, 16, 33, 64, 100]), "classes": rng.choice([2, 10, 37]),
            "budget_scale": rng.choice([1.0, 1.2, 2.0, 5.0])}


def measure(c: dict, device: torch.device, seed: int) -> tuple[float, str]:
    """(largest measured/planned over the phases, the plan's micro-batch x steps) of config ``c``."""
    shape = c["shape"]
    net = ASGENet(ModelConfig(arch=c["arch"], width=c["width"], alpha=c["alpha"], pool=c["pool"]), shape,
                  c["classes"], (0.5,) * shape[0], (0.25,) * shape[0], seed=seed).place(device)
    method = ASGEMethod(net, TrainConfig(optimizer=c["optimizer"]), c["precision"])
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(256, (c["batch"], *shape), generator=g, dtype=torch.uint8)   # B, C, H, W
    y = torch.randint(c["classes"], (c["batch"],), generator=g)                 # B
    x, y = to_device(x, y, device)   # as the trainer lays a batch out: channels_last
    warm_up(method, x, y)
    floor = plan_memory(net.specs, shape, c["batch"], None, c["precision"], c["optimizer"]).min_budget
    plan = plan_memory(net.specs, shape, c["batch"], int(floor * c["budget_scale"]), c["precision"], c["optimizer"])
    method.micro_batch = plan.micro_batch
    _, m = measure_step(method, x, y)
    ratios = [got / planned for got, planned in zip((*m.layers, m.heads), (*plan.layer_peaks(), plan.heads_bytes))]
    return max(ratios), f"{plan.micro_batch} x {plan.accumulation_steps}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--nets", type=int, default=40)
    p.add_argument("--device", default="cpu", choices=DEVICES)
    a = p.parse_args()
    device, rng = resolve_device(a.device), random.Random(a.seed)
    print(f"{a.nets} random nets, seed {a.seed}, {device}, torch {torch.__version__}")
    within = 0
    for k in range(a.nets):
        c = draw(rng)
        worst, micro = measure(c, device, seed=k)
        within += worst <= 1.0
        print(f"{'ok  ' if worst <= 1.0 else 'OVER'} {worst:6.3f}  micro-batch {micro:>8}  {c}", flush=True)
    print(f"{within} of {a.nets} nets measured within every phase's plan")


if __name__ == "__main__":
    main()
