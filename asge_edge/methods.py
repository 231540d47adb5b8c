"""Training methods: how one batch updates the network. Pluggable.

Contract: a ``Method`` owns the optimisers of the parameters it trains and turns a
batch (raw pixels ``x`` (B, C, H, W), labels ``y`` (B,)) into parameter updates via
``train_step``, returning per-layer statistics. It knows nothing of epochs, data,
evaluation, checkpoints or progress bars: the trainer owns those. New local-learning
methods (block-wise hybrids, Forward-Forward variants) subclass ``Method`` and are
added to ``METHODS``; the trainer needs no change.

- ``ASGEMethod``: the paper. Layer l steps its own optimiser on its own local
  cross-entropy; its output is computed without autograd and so carries no graph into
  layer l+1 (no gradient crosses a layer, and none is computed for any layer's input).
  Layer l+1 reads layer l's output from before layer l's step: one forward pass per
  batch, as in the paper, and what a micro-batched streaming run computes too.
  The Last and Fusion heads step on the detached GAP features, at ``head_lr_scale``
  times the layers' lr (config.py says why).
- ``BPMethod``: the same network trained end to end by backprop through the Last
  head (the paper's "BP (repr.)" row). One optimiser over convs and the Last head.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .models import ASGENet, gap


@dataclass
class StepStats:
    """What one training step reports: per-layer sums over the batch (tensors, on device)."""

    layer_loss: torch.Tensor      # L: local loss of each layer (NaN where a method has none)
    layer_correct: torch.Tensor   # L: correct goodness-projection predictions of each layer
    head_loss: torch.Tensor       # 2: Last, Fusion classifier losses


HEADS = ("last", "fusion")   # optimiser names of the linear heads


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (the paper's default) or SGD with momentum (the paper's ImageNet recipe)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.resolved_lr, weight_decay=cfg.resolved_weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.resolved_lr, momentum=cfg.momentum, weight_decay=cfg.resolved_weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use adamw or sgd")


class Method(ABC):
    """A training method for an ASGENet."""

    name: ClassVar[str]
    strategies: ClassVar[tuple[str, ...]]   # prediction strategies this method trains
    select: ClassVar[str]                   # the strategy whose validation accuracy picks the checkpoint

    def __init__(self, net: ASGENet, cfg: TrainConfig):
        self.net = net
        self.cfg = cfg
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    @abstractmethod
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """Update the network on one batch of raw pixels x (B, C, H, W) and labels y (B,)."""

    def set_lr(self, lr: float) -> None:
        """Set the layers' lr; the Last and Fusion heads get ``lr * cfg.head_lr_scale``."""
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["lr"] = lr * (self.cfg.head_lr_scale if name in HEADS else 1.0)

    def state_dict(self) -> dict[str, dict]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class ASGEMethod(Method):
    """Adaptive Spatial Goodness Encoding: every layer learns from its own loss."""

    name = "asge"
    strategies = ("fusion", "last", "best")
    select = "fusion"

    def __init__(self, net: ASGENet, cfg: TrainConfig):
        super().__init__(net, cfg)
        for i, layer in enumerate(net.layers):
            self.optimizers[f"layer{i + 1}"] = make_optimizer(layer.conv.parameters(), cfg)
        for name in HEADS:
            self.optimizers[name] = make_optimizer(getattr(net, f"{name}_head").parameters(), cfg)

    def layer_step(self, i: int, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Train layer ``i`` (0-based) on its own loss; touch nothing else.

        Args:
            i: layer index.
            h: the layer's input (B, C_in, H, W), without a graph.
            y: labels (B,).

        Returns:
            (output for layer i+1 (B, C, H', W') without a graph, loss sum, correct count).
        """
        layer = self.net.layers[i]
        a, logits = layer.local_forward(h)                     # B, C, H, W ; B, N (graph: this conv only)
        loss = F.cross_entropy(logits, y)
        _step(self.optimizers[f"layer{i + 1}"], loss)
        with torch.no_grad():
            h_next = layer.transition(a)                       # B, C, H', W'
            return h_next, loss.detach() * len(y), (logits.argmax(1) == y).sum()

    def heads_step(self, feats: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """Train the Last and Fusion heads on detached GAP features; return their loss sums (2,)."""
        last, fusion = self.net.heads(feats)                   # B, N ; B, N
        losses = []
        for name, logits in zip(HEADS, (last, fusion)):
            loss = F.cross_entropy(logits, y)
            _step(self.optimizers[name], loss)
            losses.append(loss.detach() * len(y))
        return torch.stack(losses)                             # 2

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        n = len(self.net.layers)
        losses = torch.zeros(n, device=x.device)
        correct = torch.zeros(n, device=x.device)
        feats = []
        with torch.no_grad():
            h = self.net.normalize(x)                          # B, C0, H, W
        for i in range(n):
            h, losses[i], correct[i] = self.layer_step(i, h, y)
            feats.append(gap(h))                               # B, C
        return StepStats(losses, correct, self.heads_step(feats, y))


class BPMethod(Method):
    """End-to-end backprop through the Last head: the paper's BP (repr.) baseline."""

    name = "bp"
    strategies = ("last",)
    select = "last"

    def __init__(self, net: ASGENet, cfg: TrainConfig):
        super().__init__(net, cfg)
        params = [p for layer in net.layers for p in layer.conv.parameters()]
        self.optimizers["net"] = make_optimizer(params + list(net.last_head.parameters()), cfg)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        h = self.net.normalize(x)                                  # B, C0, H, W
        for layer in self.net.layers:
            h = layer.transition(layer.activate(h))                # B, C, H', W' (graph kept)
        logits = self.net.last_head(gap(h))                        # B, N
        loss = F.cross_entropy(logits, y)
        _step(self.optimizers["net"], loss)
        n = len(self.net.layers)
        nan = torch.full((n,), float("nan"), device=x.device)
        head = torch.stack([loss.detach() * len(y), torch.tensor(float("nan"), device=x.device)])
        return StepStats(nan, torch.zeros(n, device=x.device), head)


METHODS: dict[str, type[Method]] = {m.name: m for m in (ASGEMethod, BPMethod)}


def make_method(net: ASGENet, cfg: TrainConfig) -> Method:
    """The method named by ``cfg.method``, ready to train ``net``."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    return METHODS[cfg.method](net, cfg)
