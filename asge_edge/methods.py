"""Training methods: how one batch updates the network. Pluggable.

Contract: a ``Method`` owns the optimisers of the parameters it trains and turns a
batch (raw uint8 pixels ``x`` (B, C, H, W), which ``ASGENet.normalize`` scales, labels
``y`` (B,)) into parameter updates via
``train_step``, returning per-layer statistics. It knows nothing of epochs, data,
evaluation, checkpoints or progress bars: the trainer owns those. New local-learning
methods (block-wise hybrids, Forward-Forward variants) subclass ``Method``, set its class
attributes (``name``, ``strategies``, ``layer_losses``, ``select``, ``streams``), make their
optimisers with ``_add_optimizer`` (so that ``state_ready`` sees them step), and are
added to ``METHODS``; the trainer needs no change.

- ``ASGEMethod``: the paper. Layer l steps its own optimiser on its own local
  cross-entropy; its output is computed without autograd and so carries no graph into
  layer l+1 (no gradient crosses a layer, and none is computed for any layer's input).
  Layer l+1 reads layer l's output from before layer l's step: one forward pass per
  batch, as in the paper. With ``micro_batch`` set, the batch streams through the layers
  in micro-batches that accumulate gradients, and the result is the same (issue 3). With
  an ``Offloader`` (``--offload``) the schedule turns layer-major: each layer visits the
  device once per logical batch and trains on every micro-batch in turn, while the
  boundary activations wait in host memory; again the same update.
  The Last and Fusion heads step on the detached GAP features, at ``head_lr_scale``
  times the layers' lr (config.py says why).
- ``BPMethod``: the same network trained end to end by backprop through the Last
  head (the paper's "BP (repr.)" row). One optimiser over convs and the Last head.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .models import ASGENet, gap
from .distributed import World
from .offload import Offloader


@dataclass
class StepStats:
    """What one training step reports: per-layer sums over the batch (tensors, on device)."""

    layer_loss: torch.Tensor      # L: local loss of each layer (NaN where a method has none)
    layer_correct: torch.Tensor   # L: correct goodness-projection predictions of each layer
    head_loss: torch.Tensor       # 2: Last, Fusion classifier losses


HEADS = ("last", "fusion")   # optimiser names of the linear heads


def make_optimizer(params, cfg: TrainConfig, widest: float) -> torch.optim.Optimizer:
    """AdamW (the paper's default) or SGD with momentum (the paper's ImageNet recipe), at the
    initial lr of a net whose widest layer has ``widest`` channels (TrainConfig.lr_range).

    AdamW is torch's fused kernel, on the CPU as on CUDA: one pass, no parameter-sized
    temporaries, 14.5x faster than the default per step on a 512->512 conv's 2.36M
    parameters here, and equal to it within 2.4e-7 after 5 steps (bench/adamw_fused.py).
    """
    lr = cfg.lr_range(widest)[0]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.resolved_weight_decay, fused=True)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.resolved_weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use adamw or sgd")


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _keep_features(feats: list[torch.Tensor | None], i: int, start: int, feat: torch.Tensor, total: int) -> None:
    """Write a micro-batch's GAP features ``feat`` (b, C_l) of layer ``i`` at row ``start`` of
    that layer's (total, C_l) buffer in ``feats``, made when its first micro-batch arrives: one
    copy of each layer's features, never pieces beside their concatenation, and none before
    the layer has run."""
    if feats[i] is None:
        feats[i] = feat.new_empty(total, feat.shape[1])   # total, C_l
    feats[i][start:start + len(feat)] = feat


class Method(ABC):
    """A training method for an ASGENet.

    ``precision`` is fp32, bf16 or fp16: the convs run under autocast in that dtype, while
    goodness, squares, pooling energy, LayerNorm and the projection stay fp32 (asge.py).
    fp16 steps each optimiser through its own GradScaler, since every layer has its own loss.
    ``device_type`` is where the steps run (the scalers' device); by default, where ``net``'s
    parameters are now. The trainer names it, since it makes the method before it places the
    net, and --offload parks the layers in host memory.
    """

    name: ClassVar[str]
    strategies: ClassVar[tuple[str, ...]]   # prediction strategies this method trains
    layer_losses: ClassVar[bool]            # whether every layer has a loss of its own
    select: ClassVar[str]                   # the strategy whose validation accuracy picks the checkpoint
    streams: ClassVar[bool]                 # trains a layer at a time in micro-batches (--memory-budget, --offload)

    def __init__(self, net: ASGENet, cfg: TrainConfig, precision: str = "fp32", device_type: str | None = None):
        self.net = net
        self.cfg = cfg
        self.precision = precision
        self.device_type = device_type or next(net.parameters()).device.type
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        self._stepped: set[str] = set()           # optimisers that have stepped: their state exists
        self.step_hooks: list[Callable[[str], None]] = []   # each called with a name as ``step`` begins
        self.offloader: Offloader | None = None   # --offload (streaming methods): layers parked in host memory
        self.world: World | None = None          # torchrun: data parallelism (distributed.py)

    def _add_optimizer(self, name: str, params) -> None:
        """Optimiser ``name`` for ``params`` (make_optimizer), watched for its first step."""
        opt = make_optimizer(params, self.cfg, self.net.cfg.widest)
        opt.register_step_post_hook(lambda *_: self._stepped.add(name))
        self.optimizers[name] = opt

    @property
    def state_ready(self) -> bool:
        """Whether every optimiser has stepped, so that its state exists, as in every later
        step. Under fp16 a GradScaler skips the step of gradients that hold inf or NaN, as
        the first steps' large scale often gives, and SGD's momentum is made only by a step
        taken; memory is measured once this holds (memory.measure_step)."""
        return self._stepped >= self.optimizers.keys()

    def _add_scalers(self, names) -> None:
        if self.precision == "fp16":
            self.scalers = {name: torch.amp.GradScaler(self.device_type) for name in names}

    def autocast(self, device_type: str):
        """Autocast in the run's precision (a no-op in fp32)."""
        return torch.autocast(device_type, dtype=self.conv_dtype, enabled=self.conv_dtype is not None)

    @property
    def conv_dtype(self) -> torch.dtype | None:
        """The dtype the convs compute in under mixed precision; None in fp32."""
        return AMP_DTYPES.get(self.precision)

    def conv_input(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` in ``conv_dtype`` (a no-op in fp32): the conv would cast it anyway, so
        holding it cast keeps the same values in half the bytes, and no second copy."""
        return h if self.conv_dtype is None else h.to(self.conv_dtype)

    def _total(self, n: int) -> int:
        """Samples in the logical batch: this process's n, or the global count under torchrun."""
        return self.world.total(n) if self.world is not None else n

    def _reduce(self, params) -> None:
        """Sum gradients over the processes (each scaled its loss by its share), once per batch."""
        if self.world is not None:
            self.world.reduce_grads(params)

    def backward(self, name: str, loss: torch.Tensor) -> None:
        """Backward of ``loss`` for optimiser ``name``, scaled under fp16."""
        scaler = self.scalers.get(name)
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def step(self, name: str) -> None:
        """Step optimiser ``name`` on its accumulated gradients, then drop them. The
        ``step_hooks`` run first, where the optimiser's own step hooks would miss a step
        that fp16's GradScaler skips (memory.measure_step reads its phases from them)."""
        for hook in self.step_hooks:
            hook(name)
        opt, scaler = self.optimizers[name], self.scalers.get(name)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    @abstractmethod
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """Update the network on one batch of raw pixels x (B, C, H, W) and labels y (B,)."""

    def nonfinite_losses(self, layer_loss: torch.Tensor, head_loss: torch.Tensor) -> list[str]:
        """Names of the losses this method trains that are NaN or infinite: ``layer_loss`` (L)
        and ``head_loss`` (2) as in StepStats, or sums of them over steps."""
        layer, head = layer_loss.tolist(), head_loss.tolist()
        names = [f"layer {i + 1}" for i, v in enumerate(layer) if self.layer_losses and not math.isfinite(v)]
        return names + [f"the {n} head" for n, v in zip(HEADS, head) if n in self.strategies and not math.isfinite(v)]

    def set_lr(self, lr: float) -> None:
        """Set the layers' lr; the Last and Fusion heads get ``lr * cfg.head_lr_scale``."""
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["lr"] = lr * (self.cfg.head_lr_scale if name in HEADS else 1.0)

    def state_dict(self) -> dict[str, dict]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Load optimiser states, each parameter-shaped tensor in its parameter's layout.

        safetensors stores tensors contiguous, while a channels_last conv weight's Adam
        moments are channels_last; the fused AdamW kernel walks raw memory, so a moment in
        another layout than its weight would pair the wrong elements.
        """
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])
            if opt.state:   # it has stepped (one that keeps no state, SGD without momentum, shows at its next step)
                self._stepped.add(name)
            for p, st in opt.state.items():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        st[k] = torch.empty_like(p).copy_(v)

    def scaler_state(self) -> dict[str, dict]:
        """GradScaler states (plain numbers, JSON-safe); empty unless fp16."""
        return {name: sc.state_dict() for name, sc in self.scalers.items()}

    def load_scaler_state(self, state: dict[str, dict]) -> None:
        for name, sc in self.scalers.items():
            if name in state:
                sc.load_state_dict(state[name])


class ASGEMethod(Method):
    """Adaptive Spatial Goodness Encoding: every layer learns from its own loss."""

    name = "asge"
    strategies = ("fusion", "last", "best")
    layer_losses = True
    select = "fusion"
    streams = True

    def __init__(self, net: ASGENet, cfg: TrainConfig, precision: str = "fp32", device_type: str | None = None):
        super().__init__(net, cfg, precision, device_type)
        for i, layer in enumerate(net.layers):
            self._add_optimizer(f"layer{i + 1}", layer.conv.parameters())
        for name in HEADS:
            self._add_optimizer(name, getattr(net, f"{name}_head").parameters())
        self.micro_batch: int | None = None   # streaming: images per micro-batch (None: the whole batch)
        self._add_scalers([f"layer{i + 1}" for i in range(len(net.layers))])   # heads stay fp32

    def layer_backward(self, i: int, h: torch.Tensor, y: torch.Tensor, total: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Accumulate layer ``i``'s (0-based) local gradient; touch nothing else.

        The layer's exit (the next layer's input) is made before backward where it reads the
        activation, which backward overwrites, and after it where it reads only the RMS pool's
        energy: then the activation and the exit's output never coexist.

        Args:
            i: layer index.
            h: the layer's input (b, C_in, H, W), without a graph, in ``conv_input``'s dtype.
            y: labels (b,).
            total: images in the logical batch, B (None: b). The backward is that of this
                micro-batch's loss sum / B, so that the accumulated gradient is that of the
                mean loss over the logical batch, and an empty micro-batch (a torchrun rank's
                part of a short last batch) adds a zero gradient.

        Returns:
            (output for layer i+1 (b, C, H', W') without a graph, in ``conv_input``'s dtype;
            its GAP (b, C), fp32, for the heads; loss sum; correct count).
        """
        layer = self.net.layers[i]
        with self.autocast(h.device.type):
            a, energy, logits = layer(h)         # b, C, H, W ; b, C, H/2, W/2 fp32 or None ; b, N (graph: this conv)
        if energy is None:                       # the exit reads a, which backward turns into dL/dz
            h_next, feat = layer.exit(a, None, self.conv_dtype)   # b, C, H', W' ; b, C fp32
        del a   # backward's to use; after it, a's memory is free
        loss_sum = F.cross_entropy(logits, y, reduction="sum")
        self.backward(f"layer{i + 1}", loss_sum / (len(y) if total is None else total))
        if energy is not None:                   # the RMS pool's energy waited in its own memory
            h_next, feat = layer.exit(None, energy, self.conv_dtype)
        return h_next, feat, loss_sum.detach(), (logits.argmax(1) == y).sum()

    def step_layers(self) -> None:
        """Each layer's optimiser steps once on its accumulated (and, under torchrun, summed
        over the processes) gradient, then drops it."""
        for i, layer in enumerate(self.net.layers):
            self._reduce(layer.parameters())
            self.step(f"layer{i + 1}")

    def heads_step(self, feats: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """Train the Last and Fusion heads on detached GAP features; return their loss sums (2,).

        Under torchrun the heads see every process's features: the whole global batch, so
        their batch statistics and steps are those of one process with the global batch."""
        if self.world is not None:
            feats, y = [self.world.gather(f) for f in feats], self.world.gather(y)
        last, fusion = self.net.heads(feats)                   # B, N ; B, N
        losses = []
        for name, logits in zip(HEADS, (last, fusion)):
            loss = F.cross_entropy(logits, y)
            loss.backward()
            self.step(name)
            losses.append(loss.detach() * len(y))
        return torch.stack(losses)                             # 2

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One logical batch, streamed in micro-batches of ``self.micro_batch`` images.

        A micro-batch flows through the layers one at a time, so only one layer's input and
        output are resident; each layer accumulates its gradient, and every optimiser steps
        once the logical batch is through. Layer l+1 reads layer l's pre-step output either
        way, and LayerNorm is per sample, so any micro-batch size computes the same update.
        """
        if self.offloader is not None:
            return self._layer_major_step(x, y, self.offloader)
        n, total = len(self.net.layers), self._total(len(y))
        losses = torch.zeros(n, device=x.device)
        correct = torch.zeros(n, device=x.device)
        feats: list[torch.Tensor | None] = [None] * n          # L x (B, C_l), made as layers run
        size, start = self.micro_batch or total, 0
        for xm, ym in zip(x.split(size), y.split(size)):
            with torch.no_grad():
                h = self.conv_input(self.net.normalize(xm))    # b, C0, H, W
            for i in range(n):
                h, feat, loss_sum, hits = self.layer_backward(i, h, ym, total)
                losses[i] += loss_sum
                correct[i] += hits
                _keep_features(feats, i, start, feat, len(y))
            del h, feat   # the last micro-batch's too, before the heads' phase
            start += len(ym)
        self.step_layers()
        return self._stats(losses, correct, self.heads_step(feats, y))

    def _stats(self, losses: torch.Tensor, correct: torch.Tensor, heads: torch.Tensor) -> StepStats:
        """The step's statistics, summed over the processes under torchrun."""
        if self.world is not None:
            losses, correct = self.world.sum_(losses), self.world.sum_(correct)
        return StepStats(losses, correct, heads)

    def _layer_major_step(self, x: torch.Tensor, y: torch.Tensor, off: Offloader) -> StepStats:
        """The same update, layer by layer: layer l is loaded, trains on every micro-batch,
        steps (its optimiser state loaded for the step alone) and is parked before layer l+1
        is loaded. The micro-batches' inputs and outputs wait on the parking device between
        layers, so each layer crosses to the compute device once per logical batch, not once
        per micro-batch."""
        n, total, size = len(self.net.layers), self._total(len(y)), self.micro_batch or len(y)
        losses = torch.zeros(n, device=x.device)
        correct = torch.zeros(n, device=x.device)
        ys = y.split(size)
        with torch.no_grad():
            hs = [off.to_park(self.conv_input(self.net.normalize(xm))) for xm in x.split(size)]   # M x (b, C0, H, W)
        feats: list[torch.Tensor | None] = [None] * n          # L x (B, C_l), made as layers run
        for i, layer in enumerate(self.net.layers):
            name = f"layer{i + 1}"
            off.load(layer)   # its optimiser state follows for the step alone
            outs = []
            for j, (h, ym) in enumerate(zip(hs, ys)):
                h_next, feat, loss_sum, hits = self.layer_backward(i, off.to_compute(h), ym, total)
                losses[i] += loss_sum
                correct[i] += hits
                _keep_features(feats, i, j * size, feat, len(y))
                if i + 1 < n:   # the last layer's output has no reader: only its GAP is kept
                    outs.append(off.to_park(h_next))           # b, C, H', W'
            self._reduce(layer.parameters())
            off.load_state(layer, self.optimizers[name])
            self.step(name)
            off.park(layer, self.optimizers[name])
            hs = outs
        return self._stats(losses, correct, self.heads_step(feats, y))


class BPMethod(Method):
    """End-to-end backprop through the Last head: the paper's BP (repr.) baseline."""

    name = "bp"
    strategies = ("last",)
    layer_losses = False
    select = "last"
    streams = False

    def __init__(self, net: ASGENet, cfg: TrainConfig, precision: str = "fp32", device_type: str | None = None):
        super().__init__(net, cfg, precision, device_type)
        params = [p for layer in net.layers for p in layer.conv.parameters()]
        self._add_optimizer("net", params + list(net.last_head.parameters()))
        self._add_scalers(["net"])

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One batch, end to end. Under torchrun the head reads every process's features, as
        ASGE's heads do, so its batch statistics are the global batch's, and each process's
        loss is the global batch's mean: the head's gradient is then the same on every
        process, and only the layers' gradients (each process's share) are summed."""
        with self.autocast(x.device.type):
            h = self.net.normalize(x)                              # b, C0, H, W
            for layer in self.net.layers:
                h = layer.transition(layer.activate(h))            # b, C, H', W' (graph kept)
            feat = gap(h)                                          # b, C_L
            if self.world is not None:
                feat, y = self.world.gather(feat, differentiable=True), self.world.gather(y)   # B, C_L ; B
            logits = self.net.last_head(feat)                      # B, N
            del h, feat   # the head's autograd keeps what it needs, and no longer
        loss = F.cross_entropy(logits.float(), y)
        self.backward("net", loss)
        self._reduce(p for layer in self.net.layers for p in layer.conv.parameters())
        self.step("net")
        n = len(self.net.layers)
        nan = torch.full((n,), float("nan"), device=x.device)
        head = torch.stack([loss.detach() * len(y), torch.tensor(float("nan"), device=x.device)])
        return StepStats(nan, torch.zeros(n, device=x.device), head)


METHODS: dict[str, type[Method]] = {m.name: m for m in (ASGEMethod, BPMethod)}


def make_method(net: ASGENet, cfg: TrainConfig, precision: str = "fp32", device_type: str | None = None) -> Method:
    """The method named by ``cfg.method``, ready to train ``net`` in ``precision`` on
    ``device_type`` (by default, where ``net`` is now)."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    return METHODS[cfg.method](net, cfg, precision, device_type)
