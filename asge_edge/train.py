"""The trainer: epochs, schedule, validation, checkpoint selection, resume, outputs.

Contract: ``train(cfg, opts)`` runs a ``Method`` (methods.py) over the data for
``cfg.train.epochs`` epochs and writes, in ``opts.out``:
- ``config.json`` and ``model.safetensors``: the checkpoint with the best validation
  accuracy of the method's selection strategy (Fusion for ASGE, Last for BP);
- ``state.safetensors``: for ``--resume``: the weights, every optimiser's state and the
  progress (epoch, global step, and mid-epoch the epoch's running sums), saved at each
  epoch's end, every ``checkpoint_every`` steps, and on SIGINT or SIGTERM, at the next
  step or before the next validation batch (then the run stops with ``Interrupted``; an
  epoch stopped in its validation is saved trained, and ``--resume`` validates it; one
  stopped in the test after training, ``--resume`` tests). A signal to the whole process
  group ends the DataLoader's workers too (data.batches): a step under way finishes and is
  saved, and a wait for the next batch saves the last step done. Under torchrun the ranks
  agree on a signal before each step, once each has its batch or its loader has stopped,
  so all stop after the same step, which rank 0 saves; and every rank validates and tests
  its block of each split, so a signal there stops them all. The lr schedule is a
  function of the step and the data order of (seed, epoch), so nothing else needs saving:
  no global RNG drives training;
- ``metrics.jsonl``: one line per epoch (per-layer loss and accuracy, lr, seconds);
- ``layer_accuracy.png``: per-layer validation accuracy over the epochs;
- ``summary.json``: test accuracy of every strategy, the best layer (chosen on
  validation, never on test), per-layer accuracies, time and throughput.
Every file is written atomically. Each epoch's shuffling and augmentation come from a
generator seeded by (seed, epoch), so a resumed run replays the batches it has not done
exactly as an uninterrupted run would (on the CPU: bit for bit). A non-finite loss stops
the run with a UserError naming the layer, before anything is saved after it. While it
trains, a run holds its directory's lock (runlock.py): a second run there is refused.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import __version__
from .checkpoint import (CONFIG_FILE, RUN_FILES, STATE_FILE, build_net, load_run, load_state, read_config,
                         save_model, save_state, write_json)
from .config import STRATEGIES, RunConfig, resumed
from .data import Stopped, batches, load_splits
from .distributed import World
from .device import native_precision, resolve_device, resolve_precision, to_device
from .errors import Interrupted, UserError
from .budget import format_size
from .evaluate import Accuracy, best_layer, evaluate, trained_predictors
from .memory import Measurement, measure_step
from .methods import HEADS, METHODS, Method, make_method
from .offload import Offloader, make_offloader
from .planner import BudgetTooSmall, Plan, plan_memory
from .runlock import LOCK_FILE, run_lock
from .report import (layer_table, memory_line, memory_table, plot_layer_accuracy, progress_bar, read_metrics,
                     write_metrics)
from .schedule import cosine_lr

PROGRESS_EVERY = 10   # steps between progress-bar refreshes (each one syncs the device)


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what): where to write and how loudly."""

    out: Path
    quiet: bool = False
    force: bool = False
    resume: bool = False
    workers: int = 0
    checkpoint_every: int = 0    # also save state.safetensors every N steps (0: at epoch ends only)


def make_out_dir(out: Path) -> None:
    """Create ``out`` where it is missing; refuse one that cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out} ({e.strerror}); choose another --out") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"output directory {out} is not writable; choose another --out")


def check_out_dir(out: Path, force: bool, resume: bool) -> None:
    """Refuse to overwrite a run in ``out`` unless --force or --resume (``out`` exists, and
    its run lock is held).

    It deletes nothing: ``clear_outputs`` does that once the new run is set up, so that a
    --force run refused for its flags, its data or its budget leaves the old run whole.
    """
    if resume:
        if not (out / STATE_FILE).is_file():
            raise UserError(f"nothing to resume in {out} (no {STATE_FILE}); drop --resume to start a new run")
        return
    if any(f.name != LOCK_FILE for f in out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; pass --resume to continue that run or --force to overwrite it")


def clear_outputs(out: Path) -> list[str]:
    """Delete a previous run's outputs from ``out`` (--force), before the new run writes its
    own; return the names of what else is there (its exports, say), which stay."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    return sorted(f.name + ("/" if f.is_dir() else "") for f in out.iterdir() if f.name != LOCK_FILE)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)   # a signed 64-bit seed


def _progress_postfix(loss_sum: torch.Tensor, head_sum: torch.Tensor, seen: int) -> str:
    layers = " ".join(f"{v:.2f}" for v in (loss_sum / seen).tolist() if not math.isnan(v))
    heads = (head_sum / seen).tolist()
    parts = [f"loss {layers}"] if layers else []
    parts += [f"{n} {v:.2f}" for n, v in zip(("last", "fusion"), heads) if not math.isnan(v)]
    return " | ".join(parts)


def _epoch_record(epoch: int, lr: float, seconds: float, images: int, loss_sum: torch.Tensor,
                  correct: torch.Tensor, head_sum: torch.Tensor, val: Accuracy) -> dict[str, Any]:
    """metrics.jsonl's line for an epoch. ``val`` holds None for what the method does not
    train (evaluate.trained_predictors), and so do the layers' training accuracies then."""
    nan_to_none = lambda xs: [None if math.isnan(v) else v for v in xs]   # noqa: E731 (JSON has no NaN)
    return {
        "epoch": epoch, "lr": lr, "seconds": seconds, "images": images,
        "train_layer_loss": nan_to_none((loss_sum / images).tolist()),
        "train_layer_accuracy": None if val.layers is None else (correct / images).tolist(),
        "train_last_loss": nan_to_none([head_sum[0].item() / images])[0],
        "train_fusion_loss": nan_to_none([head_sum[1].item() / images])[0],
        "val_layer_accuracy": val.layers, "val_last_accuracy": val.last, "val_fusion_accuracy": val.fusion,
    }


def configure_streaming(cfg: RunConfig, method: Method, device: torch.device) -> Plan | None:
    """Plan the run's memory; set the method's micro-batch from it and, for --offload, its
    offloader; place the net on ``device`` (its layers parked in host memory with --offload).

    Returns:
        The plan, or None for methods that do not stream (they refuse a budget and --offload).
    """
    if not method.streams:
        for flag, given in (("--memory-budget", cfg.train.memory_budget is not None), ("--offload", cfg.train.offload)):
            if given:
                raise UserError(f"{flag} streams ASGE layer by layer; --method {cfg.train.method} cannot stream, drop {flag}")
        method.net.place(device)
        return None
    method.offloader = make_offloader(cfg.train.offload, device)
    method.net.place(device, method.offloader.park_device if method.offloader else None)
    try:
        plan = plan_memory(method.net.specs, cfg.info.input_shape, cfg.train.batch_size, cfg.train.memory_budget,
                           method.precision, cfg.train.optimizer)
    except BudgetTooSmall as e:
        raise UserError(e.advice(cfg.model, cfg.info.input_shape, cfg.info.num_classes, cfg.train.batch_size,
                                 method.precision, cfg.train.optimizer)) from None
    method.micro_batch = plan.micro_batch
    return plan


def _memory_record(plan: Plan, measured: Measurement | None, budget: int | None, precision: str,
                   offload: bool) -> dict[str, Any]:
    """summary.json's ``memory``: the plan beside the measured peak, over the step and per phase.
    Until a step is measured (a run of one step never is), the measured figures are None."""
    layers, heads = (measured.layers, measured.heads) if measured else ([None] * len(plan.layer_peaks()), None)
    phases = [{"phase": f"layer {i + 1}", "planned_peak_bytes": p, "measured_peak_bytes": m}
              for i, (p, m) in enumerate(zip(plan.layer_peaks(), layers))]
    phases.append({"phase": "heads", "planned_peak_bytes": plan.heads_bytes, "measured_peak_bytes": heads})
    return {"budget_bytes": budget, "micro_batch": plan.micro_batch, "accumulation_steps": plan.accumulation_steps,
            "precision": precision, "planned_peak_bytes": plan.planned_peak,
            "measured_peak_bytes": measured.peak if measured else None,
            "measured_by": measured.measured_by if measured else None, "parked_bytes": plan.parked_bytes,
            "offload": offload, "phases": phases}


@dataclass
class EpochProgress:
    """An epoch's running sums: what a mid-epoch checkpoint must carry so that the resumed
    epoch reports exactly what an uninterrupted one would."""

    batches: int                 # batches done in this epoch
    seen: int                    # images done in this epoch
    loss_sum: torch.Tensor       # L
    correct: torch.Tensor        # L
    head_sum: torch.Tensor       # 2
    seconds: float = 0.0         # training time spent in this epoch before the last checkpoint

    @classmethod
    def start(cls, n_layers: int, device: torch.device) -> "EpochProgress":
        return cls(0, 0, torch.zeros(n_layers, device=device), torch.zeros(n_layers, device=device),
                   torch.zeros(2, device=device))

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "seen": self.seen, "loss_sum": self.loss_sum.tolist(),
                "correct": self.correct.tolist(), "head_sum": self.head_sum.tolist(), "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device) -> "EpochProgress":
        t = lambda v: torch.tensor(v, dtype=torch.float32, device=device)   # noqa: E731
        return cls(d["batches"], d["seen"], t(d["loss_sum"]), t(d["correct"]), t(d["head_sum"]), d["seconds"])


def _until_stopped(loader: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple | None]:
    """The loader's batches, then None where it raised ``Stopped``: a signal ended its workers."""
    try:
        yield from loader
    except Stopped:
        yield None


def _global_batch(world: World | None, batch_size: int) -> int:
    """Images per step: --batch-size, or its sum over the processes under torchrun."""
    return world.global_batch(batch_size) if world is not None else batch_size


class _Interrupt:
    """Turns SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption, ``docker stop``) into a
    flag that the training loop reads at the next step boundary; a second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "_Interrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, _frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train(cfg: RunConfig, opts: RunOptions) -> dict[str, Any]:
    """Train, select on validation, evaluate on test; return the summary.

    Args:
        cfg: the run config. With ``opts.resume`` the run's own config.json is used, but for
            cfg's config.RESUMABLE settings (data root, device, memory budget, offload), which apply.
        opts: output directory and run options.

    Returns:
        The summary dict also written to ``summary.json``.
    """
    device = resolve_device(cfg.train.device)
    world = World.from_env(device)
    writer = world is None or world.is_main   # rank 0 alone writes the run directory
    orderly = False   # every rank ends at the same point, so all can leave the process group together
    try:
        if writer:
            make_out_dir(Path(opts.out))
        with run_lock(Path(opts.out)) if writer else nullcontext():
            summary = _train(cfg, opts, device, world)
        orderly = True
        return summary
    except Interrupted:   # at a step, in a validation or in the test, where every rank stopped
        orderly = True
        raise
    finally:
        if world is not None:
            with _Interrupt():   # a signal while the ranks leave together is too late to stop anything
                world.close(orderly)


def _run_header(cfg: RunConfig, splits, device: torch.device, precision: str, plan: Plan | None, offload: bool,
                resume: tuple[Path, dict[str, Any]] | None) -> str:
    """The lines a run prints before its first step: what trains on what, at which lr; a
    precision this CPU only emulates; where a resumed run (``resume``: its directory and
    progress) goes on from; and the memory plan under a budget."""
    tc = cfg.train
    lr0, lr_min = cfg.lr_range
    lines = [f"asge-edge {__version__}: {tc.method} {cfg.model.arch} x{cfg.model.width} on {cfg.data.dataset} "
             f"({len(splits.train)}/{len(splits.val)}/{len(splits.test)} train/val/test), {device} {precision}, "
             f"lr {lr0:.3g}{' (auto)' if tc.lr is None else ''} -> {lr_min:.3g}, batch {tc.batch_size}, "
             f"{tc.epochs} epoch{'s' if tc.epochs > 1 else ''}"]
    if not native_precision(precision, device):
        lines.append(f"note: this CPU has no native {precision} kernels, so torch emulates them and --amp {precision} "
                     f"trains several times slower than fp32 here; it saves activation memory only (--amp off: fp32)")
    if resume is not None:
        out, progress = resume
        lines.append(f"resuming {out} after epoch {progress['epoch']}, step {progress['step']}, "
                     f"with the settings in its {CONFIG_FILE} (device {tc.device}, memory budget "
                     f"{'none' if tc.memory_budget is None else format_size(tc.memory_budget)})")
    if plan is not None and tc.memory_budget is not None:
        lines.append(f"memory plan: micro-batch {plan.micro_batch} x {plan.accumulation_steps} steps, planned peak "
                     f"{format_size(plan.planned_peak)} within {format_size(tc.memory_budget)}"
                     f"{'; inactive layers offloaded to host memory' if offload else ''}")
    return "\n".join(lines)


def _epoch_line(epoch: str, seconds: float, images: int, val: Accuracy, best: bool) -> str:
    """An epoch's line: time, speed, each layer's and head's validation accuracy, and a star
    where the epoch is the best so far."""
    parts = [f"epoch {epoch} {seconds:.0f}s {images / seconds:.0f} img/s"]
    if val.layers is not None:
        parts.append("val layers " + " ".join(f"{100 * a:.1f}" for a in val.layers))
    parts.append(" ".join(f"{h} {100 * getattr(val, h):.2f}" for h in HEADS if getattr(val, h) is not None))
    return " | ".join(parts) + (" *" if best else "")


class _Run:
    """One run once it is set up: the epoch loop, what it does at each step boundary and
    epoch end, and the test of the selected checkpoint.

    It owns the run's ``progress`` (epoch, global step, training seconds, best validation
    score and its epoch, the memory record, optimiser scalers and, mid-epoch, the epoch's
    running sums: what state.safetensors carries) and its ``history`` (metrics.jsonl's
    lines). Rank 0 alone (``writer``) selects, saves and prints; under torchrun every rank
    runs the same loop and asks the same questions at the same points (``agreed_signal``).
    """

    def __init__(self, out: Path, cfg: RunConfig, opts: RunOptions, method: Method, splits, device: torch.device,
                 world: World | None, plan: Plan | None, interrupt: _Interrupt, progress: dict[str, Any],
                 history: list[dict[str, Any]]):
        self.out, self.cfg, self.opts, self.method, self.splits = out, cfg, opts, method, splits
        self.device, self.world, self.plan, self.interrupt = device, world, plan, interrupt
        self.progress, self.history = progress, history
        self.writer = world is None or world.is_main
        self.steps_per_epoch = math.ceil(len(splits.train) / _global_batch(world, cfg.train.batch_size))
        # Memory is measured on a real step once optimiser state exists: the second step of a
        # fresh run, or the first after a resume (or the next one with images, under torchrun;
        # or a later one, where fp16's GradScaler skipped the first steps).
        self.measure_at = None if plan is None else progress["step"] + (1 if progress["step"] == 0 else 0)
        self.epoch, self.t0 = 0, 0.0   # the epoch under way, and when its training (re)started

    def agreed_signal(self) -> int | None:
        """The signal that stops the run, if any. Under torchrun, every rank asks at the same
        points (before each step, at each epoch's end) and gets the same answer, so all stop
        at one step, where rank 0 saves; with one process, this process's signal."""
        signum = self.interrupt.signum
        return signum if self.world is None else self.world.max_signal(signum)

    def check_finite(self, ep: EpochProgress, step: int) -> None:
        """Stop if a loss went non-finite: the epoch's running sums carry any bad step, so
        checking them before each save (and every PROGRESS_EVERY steps) is enough, and each
        step needs no device sync of its own."""
        bad = self.method.nonfinite_losses(ep.loss_sum, ep.head_sum)
        if bad:
            kept = (f"the last good checkpoint in {self.out} is kept" if (self.out / STATE_FILE).is_file() else
                    "before any checkpoint was saved")
            raise UserError(f"the loss of {', '.join(bad)} became non-finite in epoch {self.epoch} by step {step}; "
                            f"stopped, {kept} (try a lower --lr)")

    def save_partial(self, ep: EpochProgress, step: int, seconds: float) -> None:
        """The state mid-epoch: ``ep``'s batches done, in ``seconds`` of training."""
        now = EpochProgress(ep.batches, ep.seen, ep.loss_sum, ep.correct, ep.head_sum, seconds)
        save_state(self.out, self.method.net, self.method.state_dict(),
                   {**self.progress, "step": step, "partial": now.to_dict(), "scalers": self.method.scaler_state()})

    def interrupted(self, step: int, signum: int) -> Interrupted:
        return Interrupted(f"interrupted ({signal.Signals(signum).name}) at epoch {self.epoch}, step {step}; "
                           f"the state is saved in {self.out}: continue with --resume --out {self.out}", signum)

    def checkpoint(self, ep: EpochProgress, step: int) -> None:
        """Check and save (rank 0) the state after ``step``, the last one done."""
        self.check_finite(ep, step)
        if self.writer:
            self.save_partial(ep, step, ep.seconds + time.perf_counter() - self.t0)

    def before_step(self, ep: EpochProgress, step: int) -> None:
        """Stop after ``step`` where a signal came. Every rank asks once its next batch is in
        hand, or its loader has stopped on the signal, and before the step's first
        collective: so all ranks stop at one step, even one whose DataLoader workers the
        signal ended (torchrun signals each rank's process group, workers and all)."""
        signum = self.agreed_signal()
        if signum:
            self.checkpoint(ep, step)
            raise self.interrupted(step, signum)

    def after_step(self, ep: EpochProgress, step: int) -> None:
        if self.opts.checkpoint_every and step % self.opts.checkpoint_every == 0:
            self.checkpoint(ep, step)
        elif step % PROGRESS_EVERY == 0:
            self.check_finite(ep, step)

    def train_epoch(self, ep: EpochProgress, pbar) -> tuple[int, float, Measurement | None]:
        """Train the batches of the current epoch that ``ep`` has not done yet, updating ``ep``.

        The epoch's order and augmentation come from a generator seeded by (seed, epoch), and
        the batches already done are drawn again and skipped, so a resumed epoch sees exactly
        the batches an uninterrupted one would. ``before_step`` runs once the next batch is in
        hand, before any of its work; it stops the run by raising. Where the loader fails
        after a signal (its workers ended with it), ``before_step`` runs once more and raises,
        as the signal is this process's. ``after_step`` runs after each step (checks and
        checkpoints). The first step numbered ``measure_at`` or later whose part of the batch
        is not empty, once every optimiser has stepped (``method.state_ready``), also measures
        memory. Under torchrun every process draws the same global batch and reads and trains
        on its part alone, which may be empty in a short last batch.

        Returns:
            (global step, last lr, memory measurement or None).
        """
        method, tc, world, n_train = self.method, self.cfg.train, self.world, len(self.splits.train)
        step, total = self.progress["step"], tc.epochs * self.steps_per_epoch
        lr0, lr_min = self.cfg.lr_range
        lr, measured = cosine_lr(max(step - 1, 0), total, lr0, lr_min), None   # the last step's, where none is left
        size = _global_batch(world, tc.batch_size)
        loader = batches(self.splits.train, size, _epoch_generator(tc.seed, self.epoch), self.cfg.data.augment,
                         self.opts.workers, lambda: self.interrupt.requested, (0, 1) if world is None else world.part)
        for b, batch in enumerate(_until_stopped(loader)):
            if batch is not None and b < ep.batches:
                continue
            self.before_step(ep, step)   # raises where a signal came, as it must have where batch is None
            x, y = batch
            lr = cosine_lr(step, total, lr0, lr_min)
            method.set_lr(lr)
            n = min(size, n_train - b * size)   # the global batch's images, this rank's part among them
            x, y = to_device(x, y, self.device)
            if (self.measure_at is not None and step >= self.measure_at and measured is None and len(y)
                    and method.state_ready):
                stats, measured = measure_step(method, x, y)
            else:
                stats = method.train_step(x, y)
            ep.loss_sum += stats.layer_loss
            ep.correct += stats.layer_correct
            ep.head_sum += stats.head_loss
            ep.seen += n
            ep.batches += 1
            step += 1
            self.after_step(ep, step)
            if pbar is not None:
                pbar.update(1)
                if ep.batches == 1 or step % PROGRESS_EVERY == 0:   # from each epoch's first step on
                    # the first step's losses are drawn at once, later ones at the next update: an
                    # epoch shorter than tqdm's refresh interval would otherwise never show any
                    pbar.set_postfix_str(_progress_postfix(ep.loss_sum, ep.head_sum, ep.seen),
                                         refresh=ep.batches == 1)
        return step, lr, measured

    def train(self) -> None:
        """Train every epoch not done yet; validate, select and save after each."""
        tc = self.cfg.train
        for epoch in range(self.progress["epoch"] + 1, tc.epochs + 1):
            self.epoch, partial = epoch, self.progress.get("partial")
            ep = (EpochProgress.from_dict(partial, self.device) if partial else
                  EpochProgress.start(len(self.method.net.layers), self.device))
            pbar = None if self.opts.quiet else progress_bar(self.steps_per_epoch, f"epoch {epoch}/{tc.epochs}",
                                                             ep.batches)
            self.t0 = time.perf_counter()
            step, lr, measured = self.train_epoch(ep, pbar)
            self.check_finite(ep, step)
            if measured is not None:
                self.measure_at = None
            memory = self.progress.get("memory")
            if measured is not None or (self.plan is not None and memory is None):   # the plan alone until measured
                memory = _memory_record(self.plan, measured, tc.memory_budget, self.method.precision,
                                        self.method.offloader is not None)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = ep.seconds + time.perf_counter() - self.t0
            if pbar is not None:
                pbar.close()
            self._end_epoch(ep, step, lr, seconds, memory)

    def _end_epoch(self, ep: EpochProgress, step: int, lr: float, seconds: float, memory: dict[str, Any] | None) -> None:
        """Validate the epoch just trained; on rank 0, record it, keep the model where it is the
        best so far, and save the state; then stop where a signal came."""
        try:   # under torchrun every rank validates its block of the split
            val = evaluate(self.method.net, self.splits.val, self.device, type(self.method),
                           offloader=self.method.offloader, workers=self.opts.workers,
                           label=None if self.opts.quiet else "validation", stop=lambda: self.interrupt.requested,
                           world=self.world)
        except Stopped:   # a signal during validation: the epoch's training is kept, --resume validates
            if self.writer:
                self.save_partial(ep, step, seconds)
            raise self.interrupted(step, self.agreed_signal()) from None
        if not self.writer:   # rank 0 selects and writes; the weights are the same everywhere
            self.progress = {**self.progress, "epoch": self.epoch, "step": step, "partial": None}
        else:
            self._record_epoch(ep, step, lr, seconds, memory, val)
        # a signal during validation's last batch: the epoch's state is saved (by rank 0, before
        # the other ranks hear of it)
        signum = self.agreed_signal()
        if signum:
            raise self.interrupted(step, signum)

    def _record_epoch(self, ep: EpochProgress, step: int, lr: float, seconds: float, memory: dict[str, Any] | None,
                      val: Accuracy) -> None:
        """Rank 0's end of an epoch: metrics, selection on validation, checkpoints, plot, line."""
        tc, out, net, progress = self.cfg.train, self.out, self.method.net, self.progress
        record = _epoch_record(self.epoch, lr, seconds, ep.seen, ep.loss_sum, ep.correct, ep.head_sum, val)
        score = val.strategy(self.method.select, best_layer(val.layers))
        progress = {"epoch": self.epoch, "step": step, "train_seconds": progress["train_seconds"] + seconds,
                    "best": progress["best"], "best_epoch": progress["best_epoch"], "memory": memory,
                    "scalers": self.method.scaler_state(), "partial": None}
        if score > progress["best"]:
            progress.update(best=score, best_epoch=self.epoch)
            save_model(out, net, self.cfg, {"epoch": self.epoch, "val_accuracy": score})
        self.progress = progress
        self.history.append(record)
        write_metrics(out / "metrics.jsonl", self.history)
        save_state(out, net, self.method.state_dict(), progress)
        plot_layer_accuracy(self.history, out / "layer_accuracy.png",
                            f"{tc.method} {self.cfg.model.arch} on {self.cfg.data.dataset}")
        if not self.opts.quiet:
            print(_epoch_line(f"{self.epoch}/{tc.epochs}", seconds, ep.seen, val, progress["best_epoch"] == self.epoch))

    def test(self) -> dict[str, Any]:
        """Test the selected checkpoint, every rank its block of the split; on rank 0, write
        summary.json and print the table. Returns the summary (rank 0) or {} (the others)."""
        try:
            cfg, specs, test = test_selected(self.out, self.device, self.splits, self.method.offloader,
                                             self.opts.workers, label=None if self.opts.quiet else "test",
                                             stop=lambda: self.interrupt.requested, world=self.world)
        except Stopped:   # training is done and saved; --resume goes straight to the test
            signum = self.agreed_signal()
            raise Interrupted(f"interrupted ({signal.Signals(signum).name}) after training, while testing; the "
                              f"state is saved in {self.out}: finish with --resume --out {self.out}", signum) from None
        if not self.writer:
            return {}
        return finish(self.out, self.history, self.progress, self.device, self.splits, cfg, specs, test,
                      self.opts.quiet)


def _train(cfg: RunConfig, opts: RunOptions, device: torch.device, world: World | None) -> dict[str, Any]:
    """train() once the process group (if any) is joined; every rank but 0 returns {}."""
    out = Path(opts.out)
    writer = world is None or world.is_main
    if writer:
        check_out_dir(out, opts.force, opts.resume)
    if world is not None:
        device = world.device
        world.barrier()   # the output directory is ready
    if opts.resume:
        cfg = resumed(read_config(out), cfg)
    splits = load_splits(cfg.data)
    cfg = replace(cfg, info=splits.info, version=__version__)
    net = build_net(cfg)
    precision = resolve_precision(cfg.train.amp, device)
    method = make_method(net, cfg.train, precision, device.type)
    method.world = world
    plan = configure_streaming(cfg, method, device)
    opts = replace(opts, quiet=opts.quiet or not writer)

    progress: dict[str, Any] = {"epoch": 0, "step": 0, "train_seconds": 0.0, "best": -1.0, "best_epoch": 0,
                                "memory": None, "partial": None}
    if opts.resume:
        opt_states, progress = load_state(out, net)
        method.load_state_dict(opt_states)
        method.load_scaler_state(progress.get("scalers", {}))
    if writer:   # a resumed run's too: its run-time settings may have changed
        kept = [] if opts.resume else clear_outputs(out)   # only now that data, net and plan are ready
        if kept:
            print(f"asge-edge: note: {out} keeps {', '.join(kept)}, made before this run: export again "
                  "where they came from the old model", file=sys.stderr)
        write_json(out / CONFIG_FILE, cfg.to_dict())
    history = read_metrics(out / "metrics.jsonl")[: progress["epoch"]]
    if len(history) < progress["epoch"]:
        raise UserError(f"{out / 'metrics.jsonl'} holds {len(history)} epochs where the saved state has "
                        f"{progress['epoch']}; restore it, or train anew with --force")

    if not opts.quiet:
        print(_run_header(cfg, splits, device, precision, plan, method.offloader is not None,
                          (out, progress) if opts.resume else None))
    with _Interrupt() as interrupt:
        run = _Run(out, cfg, opts, method, splits, device, world, plan, interrupt, progress, history)
        run.train()
        return run.test()


def test_selected(out: Path, device: torch.device, splits, offloader: Offloader | None = None, workers: int = 0,
                  label: str | None = None, stop: Callable[[], bool] | None = None,
                  world: World | None = None) -> tuple[RunConfig, tuple, Accuracy]:
    """The selected checkpoint (``out``'s model.safetensors) on the test split: (its config,
    its layer specs, its accuracy). The arguments after ``splits`` are evaluate's: under
    torchrun every rank calls this, tests its block, and gets the whole split's accuracy,
    or ``Stopped``."""
    cfg, net, _ = load_run(out)
    net = net.place(device, offloader.park_device if offloader else None)
    test = evaluate(net, splits.test, device, METHODS[cfg.train.method], offloader=offloader, workers=workers,
                    label=label, stop=stop, world=world)
    return cfg, net.specs, test


def finish(out: Path, history: list[dict[str, Any]], progress: dict[str, Any], device: torch.device, splits,
           cfg: RunConfig, specs: tuple, test: Accuracy, quiet: bool = False) -> dict[str, Any]:
    """Write summary.json for the selected checkpoint (``cfg``, ``specs`` and ``test`` from
    test_selected), and print the table. What the run's method does not train is None
    throughout (evaluate.trained_predictors)."""
    method = METHODS[cfg.train.method]
    chosen = history[progress["best_epoch"] - 1]
    # masked again: an older version's metrics lines carry numbers for what the method does not train
    val = trained_predictors(Accuracy(chosen["val_layer_accuracy"], chosen["val_last_accuracy"],
                                      chosen["val_fusion_accuracy"], len(splits.val)), method)
    best = best_layer(val.layers)
    images = sum(r["images"] for r in history)
    summary = {
        "version": __version__,
        "method": cfg.train.method,
        "model": cfg.model.arch,
        "width": cfg.model.width,
        "dataset": cfg.data.dataset,
        "device": str(device),
        "torch": torch.__version__,
        "epochs": cfg.train.epochs,
        "best_epoch": progress["best_epoch"],
        "test_accuracy": {s: test.strategy(s, best) for s in STRATEGIES},
        "val_accuracy": {s: val.strategy(s, best) for s in STRATEGIES},
        "best_layer": best,
        "layer_val_accuracy": val.layers,
        "layer_test_accuracy": test.layers,
        "train_seconds": progress["train_seconds"],
        "images_per_second": images / max(progress["train_seconds"], 1e-9),
        "memory": progress.get("memory"),
    }
    write_json(out / "summary.json", summary)
    if not quiet:
        print(layer_table(specs, val.layers, test.layers, summary["test_accuracy"], summary["best_layer"]))
        print(f"{images} training images in {progress['train_seconds']:.0f}s ({summary['images_per_second']:.0f} img/s); "
              f"outputs in {out}")
        if summary["memory"] is not None:
            print("\n".join(filter(None, (memory_table(summary["memory"]), memory_line(summary["memory"])))))
    return summary
