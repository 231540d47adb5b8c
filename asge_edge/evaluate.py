"""Evaluation: accuracy of every layer and every prediction strategy on a split.

Contract: ``evaluate`` runs the network once over a split without autograd and
returns per-layer goodness-projection accuracy and the Last and Fusion accuracies of
what the run's method trains (``trained_predictors``: the rest reads at chance and is
None); it never changes the network. Under torchrun (``world``) each rank evaluates its
block of the split, and the ranks' counts are summed. ``best_layer`` picks the exit by
validation accuracy (never test), breaking ties towards the shallower, cheaper layer.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from .checkpoint import load_run
from .config import STRATEGIES
from .data import Split, Stopped, batches, load_splits, part_of
from .device import resolve_device, to_device
from .distributed import World
from .errors import UserError
from .methods import METHODS, Method
from .models import ASGENet, LayerSpec
from .offload import Offloader, make_offloader
from .report import progress_bar

EVAL_BATCH = 512   # inference holds no gradients, so a larger batch fits the same memory


@dataclass
class Accuracy:
    """Fractions in [0, 1] over ``n`` images; None for a predictor the run did not train."""

    layers: list[float] | None
    last: float | None
    fusion: float | None
    n: int

    def strategy(self, name: str, best_layer: int | None) -> float | None:
        """Accuracy of a strategy (None where it was not trained); Best reads layer
        ``best_layer`` (1-based)."""
        if name != "best":
            return getattr(self, name)
        return None if self.layers is None or best_layer is None else self.layers[best_layer - 1]


def trained_predictors(acc: Accuracy, method: type[Method]) -> Accuracy:
    """``acc`` with None for what ``method`` does not train: each layer's fixed projection
    unless every layer learns through it (BP trains none, so they read at chance), and each
    head outside ``method.strategies`` (BP's Fusion head stays at its random init)."""
    return Accuracy(acc.layers if method.layer_losses else None,
                    acc.last if "last" in method.strategies else None,
                    acc.fusion if "fusion" in method.strategies else None, acc.n)


@torch.inference_mode()
def evaluate(net: ASGENet, split: Split, device: torch.device, method: type[Method], batch_size: int = EVAL_BATCH,
             offloader: Offloader | None = None, workers: int = 0, label: str | None = None,
             stop: Callable[[], bool] | None = None, world: World | None = None) -> Accuracy:
    """Accuracy of every layer and of the Last and Fusion heads on ``split``, None for what
    ``method`` does not train; with an ``offloader``, each layer visits the device only
    while it runs. ``workers``: DataLoader workers for folder datasets (data.batches).
    ``label``: show a progress bar by that name (None: none). ``stop``: asked before each
    batch (and by ``batches`` should its loader fail); where it says so, evaluation ends with
    ``data.Stopped``. ``world``: every rank calls this, evaluates its block of the split
    (``data.part_of``; order does not matter to a count, and no batch is left empty), and
    gets the whole split's accuracy; where one rank stops, all raise ``Stopped``, at the end."""
    was_training = net.training
    net.eval()
    n = len(split)
    mine = split if world is None else part_of(split, *world.part)
    counts = torch.zeros(len(net.layers) + 3, device=device)   # correct per layer, Last, Fusion; stopped
    try:
        with offloader.streaming(net.layers) if offloader is not None else nullcontext():
            loader = batches(mine, batch_size, workers=workers, stop=stop)
            if label is not None:
                loader = progress_bar(math.ceil(len(mine) / batch_size), label, iterable=loader)
            for x, y in loader:
                if stop is not None and stop():
                    raise Stopped
                x, y = to_device(x, y, device)
                out = net(x)
                preds = torch.stack([lg.argmax(1) for lg in (*out.layer_logits, out.last, out.fusion)])   # L+2, B
                counts[:-1] += (preds == y).sum(1)
    except Stopped:
        counts[-1] = 1   # under torchrun the other ranks learn of it from the sum, with no collective before
    finally:
        net.train(was_training)
    if world is not None:
        world.sum_(counts)
    if counts[-1]:
        raise Stopped
    acc = (counts[:-1] / max(1, n)).tolist()
    return trained_predictors(Accuracy(acc[:-2], acc[-2], acc[-1], n), method)


def best_layer(layer_val_accuracy: list[float] | None) -> int | None:
    """1-based index of the most accurate layer on validation (shallowest on ties); None
    where the layers have no accuracies (a method that does not train their projections)."""
    if layer_val_accuracy is None:
        return None
    best = max(layer_val_accuracy)
    return layer_val_accuracy.index(best) + 1


def evaluate_run(run_dir, device_name: str = "auto", strategy: str | None = None, workers: int = 0,
                 data_root: str | None = None, quiet: bool = False) -> tuple[dict, tuple[LayerSpec, ...]]:
    """Re-evaluate a finished run: the best layer is re-derived on validation, then test.

    Args:
        run_dir: a directory written by ``asge-edge train``.
        device_name: auto, cpu or cuda.
        strategy: one of fusion, last, best; None for every strategy the method trained.
        workers: DataLoader workers for folder datasets.
        data_root: the dataset's root, where it is not the run's (None: the run's).
        quiet: no progress bars.

    Returns:
        ({"test_accuracy": {strategy: fraction or None}, "best_layer": k or None,
          "layer_test_accuracy": [...] or None, "layer_val_accuracy": [...] or None}, the net's
        layer specs, which the per-layer table shows beside the accuracies). What the run's
        method did not train is None (trained_predictors).

    Raises:
        UserError: ``strategy`` is one the run's method did not train (Best or Fusion of a BP run).
    """
    device = resolve_device(device_name)
    cfg, net, _ = load_run(run_dir, data_root)
    method = METHODS[cfg.train.method]
    trained = method.strategies
    if strategy is not None and strategy not in trained:
        raise UserError(f"--strategy {strategy}: this {cfg.train.method} run has no {strategy} predictor; "
                        f"use {' or '.join(trained)}")
    off = make_offloader(cfg.train.offload and device.type != "cpu", device)
    net = net.place(device, off.park_device if off else None)
    splits = load_splits(cfg.data)
    val, test = (evaluate(net, s, device, method, offloader=off, workers=workers, label=None if quiet else name)
                 for name, s in (("validation", splits.val), ("test", splits.test)))
    best = best_layer(val.layers)
    names = (strategy,) if strategy else STRATEGIES
    return {
        "test_accuracy": {s: test.strategy(s, best) for s in names},
        "best_layer": best,
        "layer_val_accuracy": val.layers,
        "layer_test_accuracy": test.layers,
    }, net.specs
