"""Human-facing output: the per-layer table, the layer-accuracy plot, metrics lines, progress bars.

Contract: pure formatting (``layer_table``) is kept apart from file writing
(``write_metrics``, ``plot_layer_accuracy``). The plot follows the paper's Figure 3:
validation accuracy of each layer against the epoch. ``progress_bar`` is the one kind of
bar every loop shows, on stderr. Nothing here touches tensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm import tqdm

from .budget import format_size
from .errors import UserError
from .models import LayerSpec
from .planner import Plan

LOG_INTERVAL = 30.0   # seconds between progress-bar redraws where stderr is a log, not a terminal
# What a resumed run reads back from each metrics.jsonl line (train.finish, plot_layer_accuracy).
METRICS_KEYS = ("epoch", "images", "val_layer_accuracy", "val_last_accuracy", "val_fusion_accuracy")


def progress_bar(total: int, desc: str, initial: int = 0, iterable: Iterable | None = None) -> tqdm:
    """A progress bar on stderr over ``total`` batches (of ``iterable``, where given), gone
    when it closes. On a terminal it redraws at tqdm's own rate; into a file or a pipe, where
    every redraw stays in the log as a line of its own, at most every LOG_INTERVAL seconds
    (a forced refresh draws at once either way)."""
    interval = 0.1 if sys.stderr.isatty() else LOG_INTERVAL   # 0.1: tqdm's default
    # tqdm's monitor thread also redraws a bar that has not drawn for maxinterval seconds
    # (10 by default), which would halve LOG_INTERVAL for slow steps: keep it no shorter.
    return tqdm(iterable, total=total, initial=initial, unit="batch", desc=desc, dynamic_ncols=True, leave=False,
                mininterval=interval, maxinterval=max(interval, 10.0))


def layer_table(specs: Sequence[LayerSpec], val: Sequence[float] | None, test: Sequence[float] | None,
                strategies: dict[str, float | None], best: int | None) -> str:
    """The per-layer accuracy table and the strategy lines, as printed after training;
    ``best`` is None, and so are the layers' accuracies, for a method that does not train
    the layers' projections (BP): its table gives the layers' shapes, and n/a."""
    lines = [f"{'layer':>5} {'channels':>8} {'conv HxW':>8} {'P':>3} {'goodness':>8} {'val acc':>8} {'test acc':>8}"]
    percent = lambda acc: f"{'n/a':>8}" if acc is None else f"{100 * acc:>7.2f}%"   # noqa: E731
    for i, s in enumerate(specs):
        mark = "  <- best" if s.index == best else ""
        v, t = (None if accs is None else accs[i] for accs in (val, test))
        lines.append(f"{s.index:>5} {s.channels:>8} {f'{s.height}x{s.width}':>8} {s.partition:>3} "
                     f"{s.goodness_dim:>8} {percent(v)} {percent(t)}{mark}")
    if val is None:
        lines.append("(no layer accuracies: this method does not train the layers' goodness projections)")
    lines.append("")
    for name, acc in strategies.items():
        label = f"{name} (layer {best})" if name == "best" and best is not None else name
        lines.append(f"test accuracy {label:<14} {'n/a' if acc is None else f'{100 * acc:.2f}%'}")
    return "\n".join(lines)


def plan_table(plan: Plan) -> str:
    """The memory plan as a table: per-sample bytes of every layer, its fixed bytes, its
    squares' chunk and its phase's peak (the batch's state included) at the planned
    micro-batch, then the totals."""
    lines = [f"{'layer':>5} {'input/sample':>13} {'output/sample':>14} {'saved/sample':>13} {'peak/sample':>12} "
             f"{'fixed':>11} {'squares':>10} {'phase peak':>12}"]
    for lm, phase in zip(plan.layers, plan.layer_peaks()):
        lines.append(f"{lm.index:>5} {lm.input:>13,} {lm.output:>14,} {lm.saved:>13,} {lm.per_sample:>12,} "
                     f"{lm.fixed:>11,} {lm.chunk(plan.micro_batch):>10,} {phase:>12,}")
    budget = "none" if plan.budget is None else f"{plan.budget:,} B ({format_size(plan.budget)})"
    lines += [
        "",
        f"budget             {budget}",
        f"logical batch      {plan.batch} = micro-batch {plan.micro_batch} x {plan.accumulation_steps} accumulation steps",
        f"batch state        {plan.batch_bytes:,} B (input batch, labels, GAP features, heads)",
        f"heads phase        {plan.heads_bytes:,} B (the heads' pass over the logical batch, batch state included)",
        f"planned peak       {plan.planned_peak:,} B ({format_size(plan.planned_peak)}), set by {_peak_phase(plan)}",
        f"parked             {plan.parked_bytes:,} B (the other layers' weights, gradients, optimiser state)",
        f"smallest budget    {plan.min_budget:,} B ({format_size(plan.min_budget)}) for a micro-batch of 1",
    ]
    return "\n".join(lines)


def _peak_phase(plan: Plan) -> str:
    layer = plan.peak_layer()
    return "the heads" if layer is None else f"layer {layer}"


def memory_line(memory: dict[str, Any]) -> str:
    """summary.json's ``memory`` record in one line: the measured peak beside the plan and budget."""
    budget = "no budget" if memory["budget_bytes"] is None else f"budget {format_size(memory['budget_bytes'])}"
    measured = ("not measured (memory is measured from the second step on, once every optimiser has stepped; "
                "this run ended before)"
                if memory["measured_peak_bytes"] is None else
                f"measured peak {format_size(memory['measured_peak_bytes'])} ({memory['measured_by']})")
    return (f"training working set: {measured}, planned {format_size(memory['planned_peak_bytes'])}, {budget}, "
            f"micro-batch {memory['micro_batch']} x {memory['accumulation_steps']}")


def memory_table(memory: dict[str, Any]) -> str:
    """summary.json's ``memory`` phases as a table: each phase's planned and measured peak.
    A record written before phases were measured has none, and gives no table; nor does one
    whose step was not measured."""
    if memory["measured_peak_bytes"] is None:
        return ""
    lines = [f"{'phase':>8} {'planned':>12} {'measured':>12} {'measured/planned':>17}"]
    for ph in memory.get("phases", []):
        planned, measured = ph["planned_peak_bytes"], ph["measured_peak_bytes"]
        lines.append(f"{ph['phase']:>8} {format_size(planned):>12} {format_size(measured):>12} "
                     f"{measured / planned:>17.3f}")
    return "\n".join(lines) if len(lines) > 1 else ""


def sweep_table(plan: Plan) -> str:
    """The budget each number of accumulation steps needs (Plan.sweep), the plan's row marked."""
    lines = [f"{'steps':>5} {'micro-batch':>11} {'smallest budget':>31}"]
    for steps, micro, peak in plan.sweep():
        mark = "  <- this plan" if micro == plan.micro_batch else ""
        lines.append(f"{steps:>5} {micro:>11} {peak:>17,} B {f'({format_size(peak)})':>11}{mark}")
    return "\n".join(lines)


def write_metrics(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """Write metrics.jsonl, one JSON line per epoch, atomically (whole, never appended:
    a run that dies between epochs and resumes cannot leave a line twice)."""
    from .checkpoint import atomic_write

    atomic_write(Path(path), "".join(json.dumps(r) + "\n" for r in history).encode())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records, [] where there is none; a UserError names a line that is not
    one (not JSON, or without what a resumed run reads back: METRICS_KEYS)."""
    if not Path(path).is_file():
        return []
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or any(key not in record for key in METRICS_KEYS):
            raise UserError(f"{path} line {n} is not an epoch's record; restore the file, or train anew with --force")
        records.append(record)
    return records


def plot_layer_accuracy(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Validation accuracy of every layer over the epochs (the paper's Figure 3), and of the
    heads; what the run's method does not train (None in metrics.jsonl's latest line: a run
    resumed from an older version may have numbers for it in earlier ones) is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    latest = history[-1]
    n_layers = len(latest["val_layer_accuracy"] or ())
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i in range(n_layers):
        ax.plot(epochs, [100 * r["val_layer_accuracy"][i] for r in history], marker="o", ms=3, label=f"layer {i + 1}")
    for key, style in (("val_fusion_accuracy", "k--"), ("val_last_accuracy", "k:")):
        if latest.get(key) is not None:
            ax.plot(epochs, [100 * r[key] for r in history], style, marker="x", ms=3, label=key.split("_")[1])
    ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))   # whole epochs only, even for one
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title or "layer-wise validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
