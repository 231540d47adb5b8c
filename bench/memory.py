"""Peak training memory and images/s: BP, BP + checkpointing + accumulation, streaming ASGE.

Claims (issue 3), for VGG8 at full width, input 3x32x32, logical batch 128, on the CPU:
- ASGE's measured peak at a 64MB budget stays within 64MB;
- it is at least 20x below BP's at the same logical batch;
- ASGE's images/s at 64MB is at least 0.8x ASGE's with no budget.
Where the full width does not fit a budget (16MB, 4MB), the widest VGG8 that does
(planner.widest_width) runs in its place, in a row of its own, without ratios to BP.
Two more rows run ASGE at a twentieth of BP's measured peak, which holds it 20x below BP
whatever the micro-batch (the planner fills a budget with the fewest accumulation steps
that fit, for speed), and at the smallest budget the planner admits (a micro-batch of 1),
the floor of its memory.
The fair baseline is BP with per-layer gradient checkpointing and gradient accumulation
in micro-batches. It keeps all weights, gradients and optimiser state resident, so it can
only approach a budget as small as its state; going below that needs weight offloading on
top, which bench/offload.py measures. These baselines live in bench/, not in the product.

Every row is measured in this one run, side by side, with memory.measure_step (live tensor
bytes on the CPU, CUDA peak statistics on a GPU; see its docstring for what is and is not
counted), after warm-up (memory.warm_up: one step, more where fp16 skips some). Then
``--steps`` rounds time one step of every row, in reversed order every other round, so
that the machine's drift in speed hits all rows alike; images/s is each row's median. ``--device cuda --amp bf16`` is the issue's GPU run
(channels_last, convs in bf16); it has not been run (no GPU in the sessions that wrote it).

    python bench/memory.py [--width 1.0] [--input-shape 3x32x32] [--batch-size 128] [--steps 3]
                           [--device auto|cpu|cuda] [--amp off|bf16|fp16]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from asge_edge.budget import format_size, parse_size
from asge_edge.cli import parse_shape
from asge_edge.config import ModelConfig, TrainConfig
from asge_edge.device import to_device
from asge_edge.memory import measure_step, warm_up
from asge_edge.methods import ASGEMethod, BPMethod
from asge_edge.models import ASGENet, gap, layer_specs
from asge_edge.planner import BudgetTooSmall, plan_memory, widest_width
from rounds import alternate
from workload import NUM_CLASSES, add_args, add_device_args, device_and_precision, make_batch, make_net

BUDGETS = ("64MB", "16MB", "4MB")


class CheckpointedBP(BPMethod):
    """BP that recomputes each layer in backward (checkpointing) and accumulates micro-batches."""

    def __init__(self, net: ASGENet, cfg: TrainConfig, micro_batch: int, precision: str):
        super().__init__(net, cfg, precision)
        self.micro_batch = micro_batch

    def train_step(self, x, y):
        for xm, ym in zip(x.split(self.micro_batch), y.split(self.micro_batch)):
            with self.autocast(x.device.type):
                h = self.net.normalize(xm)                                      # b, C0, H, W
                for layer in self.net.layers:
                    h = checkpoint(lambda t, lyr=layer: lyr.transition(lyr.activate(t)), h, use_reentrant=False)
                logits = self.net.last_head(gap(h))                             # b, N
            self.backward("net", F.cross_entropy(logits.float(), ym) * (len(ym) / len(y)))
        self.step("net")


def measure(label: str, method, x, y) -> dict:
    """A row: warm-up (every optimiser's state now exists), then the measured peak."""
    warm_up(method, x, y)
    _, measured = measure_step(method, x, y)
    return {"label": label, "method": method, "peak": measured.peak, "how": measured.measured_by}


def asge_row(label: str, cfg: ModelConfig, shape: tuple[int, int, int], batch: int, budget: int, precision: str,
             device: torch.device, x, y) -> dict:
    """A row of streaming ASGE on ``cfg``'s net, planned within ``budget``.

    Raises:
        BudgetTooSmall: from the planner.
    """
    plan = plan_memory(layer_specs(cfg, shape, NUM_CLASSES), shape, batch, budget, precision)
    method = ASGEMethod(make_net(cfg, shape).place(device), TrainConfig(), precision)
    method.micro_batch = plan.micro_batch
    return {**measure(f"{label} (micro-batch {plan.micro_batch} x {plan.accumulation_steps})", method, x, y),
            "budget": budget}


def time_rows(rows: list[dict], x, y, rounds: int) -> None:
    """Time one step of every row per round, in alternating order; set each row's images/s."""
    def step(method) -> float:
        t0 = time.perf_counter()
        method.train_step(x, y)
        if x.device.type == "cuda":   # kernels run asynchronously: wait for the step's
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - t0

    times = alternate({row["label"]: (lambda m=row["method"]: step(m)) for row in rows}, rounds)
    for row in rows:
        row["ips"] = len(y) / statistics.median(times[row["label"]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p, width=1.0, shape="3x32x32")
    p.add_argument("--steps", type=int, default=3)
    add_device_args(p)
    a = p.parse_args()
    (device, precision), shape, cfg = device_and_precision(a), parse_shape(a.input_shape), ModelConfig(width=a.width)
    x, y = to_device(*make_batch(a.batch_size, shape), device)
    net = lambda: make_net(cfg, shape).place(device)   # noqa: E731

    rows, notes = [], []
    rows.append(measure("BP", BPMethod(net(), TrainConfig(method="bp"), precision), x, y))
    rows.append(measure("BP + checkpoint + accumulation (micro-batch 1)",
                        CheckpointedBP(net(), TrainConfig(method="bp"), 1, precision), x, y))
    rows.append(measure("ASGE, no budget", ASGEMethod(net(), TrainConfig(), precision), x, y))
    specs = layer_specs(cfg, shape, NUM_CLASSES)
    floor = plan_memory(specs, shape, a.batch_size, None, precision).min_budget
    twentieth = rows[0]["peak"] // 20   # the budget that holds ASGE 20x below BP, at the speed it costs
    budgets = ([(text, parse_size(text)) for text in BUDGETS] + [(f"BP / 20 = {format_size(twentieth)}", twentieth)]
               + [(f"smallest budget {format_size(floor)}", floor)])
    for text, budget in budgets:
        try:
            rows.append(asge_row(f"ASGE, {text}", cfg, shape, a.batch_size, budget, precision, device, x, y))
        except BudgetTooSmall as e:
            narrower = widest_width(cfg, shape, NUM_CLASSES, a.batch_size, budget, precision)
            notes.append(f"ASGE at {text}: does not fit; the smallest budget is {format_size(e.min_budget)} "
                         f"({e.min_budget} B), set by one layer's weights, gradient and AdamW state; "
                         + ("no narrower VGG8 fits" if narrower is None else f"VGG8 fits it up to --width {narrower:g}"))
            if narrower is not None:   # the net that does fit, measured too: not comparable with BP's
                rows.append({**asge_row(f"ASGE x{narrower:g}, {text}", replace(cfg, width=narrower),
                                        shape, a.batch_size, budget, precision, device, x, y), "narrower": True})
    time_rows(rows, x, y, a.steps)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU threads {torch.get_num_threads()}"
    print(f"vgg8 width {a.width}, input {a.input_shape}, logical batch {a.batch_size}, {precision}, {where}, "
          f"torch {torch.__version__}, peak by {rows[0]['how']}")
    print(f"{'run':<52} {'peak':>10} {'bytes':>13} {'images/s':>9}")
    for r in rows:
        print(f"{r['label']:<52} {format_size(r['peak']):>10} {r['peak']:>13,} {r['ips']:>9.1f}")
    for n in notes:
        print(n)
    by = {r["label"].split(" (")[0]: r for r in rows}
    bp, free = by["BP"], by["ASGE, no budget"]
    for r in rows:
        if "budget" in r:
            within = f"{r['label'].split(' (micro')[0]}: peak {'within' if r['peak'] <= r['budget'] else 'OVER'} budget"
            print(f"{within}; a narrower net than BP's, so no ratios" if r.get("narrower") else
                  f"{within}; BP / ASGE peak {bp['peak'] / r['peak']:.1f}x (target >= 20); "
                  f"images/s vs no budget {r['ips'] / free['ips']:.2f}x (target >= 0.8)")
    print(f"BP + checkpoint + accumulation / BP peak: {by['BP + checkpoint + accumulation']['peak'] / bp['peak']:.2f}x")


if __name__ == "__main__":
    main()
