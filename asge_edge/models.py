"""Layer specs, the ASGE layer and the network with its three predictors.

Contract:
- ``layer_specs(model_cfg, input_shape, num_classes)`` is pure: it turns an
  architecture (presets.py: a preset or a layer list), width and alpha into the exact
  per-layer shapes, partitions and goodness sizes. Everything else (the trainer, the
  memory planner, the exporters) reads shapes from it, never from a module.
- ``ASGENet`` takes raw [0, 1] pixels (B, C, H, W) and normalises them itself,
  so an exported graph needs no preprocessing.
- Layer l is conv3x3 -> ReLU (activation ``a``, which the goodness reads), then
  pool (where the architecture pools) -> LayerNorm over (C, H, W) without affine
  parameters (output ``h``, which the next layer reads). LayerNorm has no
  parameters because its output is detached before the next layer: no local loss
  could ever train them. ``ASGELayer.forward`` is the local half (a, the RMS pool's
  energy, logits), ``exit`` makes ``h`` and its GAP, and ``run`` does both; the trainer
  calls the halves apart, so that an exit that reads only the energy can wait for backward.
- The projection (W_l, b_l) of every layer is a buffer: saved, never trained.
- Predictors: ``last_head`` on GAP(h_L) and ``fusion_head`` on concat GAP(h_2..h_L)
  (GAP of the normalised outputs; with one layer, Fusion reads layer 1), each a
  ``LinearHead``: the features standardised, then one linear layer. At inference the
  standardisation is a fixed affine map, so each head is the paper's single linear
  classifier. Standardising gave Fusion +0.45 points after 3 epochs (docs/RESULTS.md);
  Best is ``exit_logits(x, k)``, layers 1..k only.

The architectures, the presets (and why VGG8's layers are these) and the user's own
layer lists, are presets.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .asge import (conv_relu_goodness, divides, energy_rows, energy_window, layer_norm_chw, make_projection, partition_factor,
                   pool2d, project, rms_from_energy)
from .config import ModelConfig
from .presets import layer_list

LN_EPS = 1e-5   # torch.nn.LayerNorm's default
HEAD_NORM_MOMENTUM, HEAD_NORM_EPS = 0.1, 1e-5   # torch.nn.BatchNorm1d's defaults


@dataclass(frozen=True)
class LayerSpec:
    """Static shape facts of one ASGE layer (1-based ``index``)."""

    index: int
    in_channels: int
    channels: int
    height: int          # conv output size (pre-pool): the goodness is read here
    width: int
    pool: str | None     # "rms", "avg" or "max" (2x2, stride 2) after this layer, or None
    partition: int       # P_l
    goodness_dim: int    # C_l * P_l^2
    num_classes: int

    @property
    def out_height(self) -> int:
        return self.height // 2 if self.pool else self.height

    @property
    def out_width(self) -> int:
        return self.width // 2 if self.pool else self.width

    @property
    def even_patches(self) -> bool:
        """Whether P divides H and W (else the patches take adaptive-pool boundaries)."""
        return divides(self.partition, self.height, self.width)

    @property
    def energy_window(self) -> int:
        """2 where the RMS pool's 2x2 energy also gives the goodness (asge.energy_window), else 1."""
        return energy_window(self.height, self.width, self.partition, 2 if self.pool == "rms" else 1)


def layer_specs(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> tuple[LayerSpec, ...]:
    """Per-layer shapes for an architecture at ``cfg.width`` and ``cfg.alpha``.

    Args:
        cfg: the model config (arch, width, alpha).
        input_shape: (C, H, W) of the images.
        num_classes: N.

    Returns:
        One LayerSpec per conv layer.

    Raises:
        ValueError: an architecture that is neither a preset nor a layer list, a
            non-positive width, or an input too small to pool.
    """
    if cfg.width <= 0:
        raise ValueError(f"--width must be > 0, got {cfg.width}")
    layers = layer_list(cfg.arch)
    chans = [max(1, round(c * cfg.width)) for c, _ in layers]
    c_last = chans[-1]
    c_in, h, w = input_shape
    specs = []
    for i, (c, (_, pool)) in enumerate(zip(chans, layers)):
        if pool and min(h, w) < 2:
            pools = sum(p for _, p in layers)
            raise ValueError(f"input {input_shape[1]}x{input_shape[2]} is too small for {cfg.arch}: it pools {pools} "
                             f"times, so it needs at least {2 ** pools}x{2 ** pools}")
        p = partition_factor(cfg.alpha, c_last, c, h, w)
        specs.append(LayerSpec(i + 1, c_in, c, h, w, cfg.pool if pool else None, p, c * p * p, num_classes))
        c_in = c
        if pool:
            h, w = h // 2, w // 2
    return tuple(specs)


class ASGELayer(nn.Module):
    """conv3x3 + ReLU, with a fixed goodness projection and a pool + LayerNorm exit."""

    def __init__(self, spec: LayerSpec, generator: torch.Generator):
        super().__init__()
        self.spec = spec
        self.conv = nn.Conv2d(spec.in_channels, spec.channels, 3, padding=1)
        # He init, the standard for ReLU convs. Against torch's default (kaiming_uniform
        # with a=sqrt(5), 3x smaller variance) it gave layers 4-7 2-3 points more after
        # a short run (docs/RESULTS.md): larger activations, larger goodness gradients.
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)
        w, b = make_projection(spec.goodness_dim, spec.num_classes, generator)
        self.register_buffer("proj_w", w)    # G, N
        self.register_buffer("proj_b", b)    # N

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """Post-ReLU activation a: (B, C_in, H, W) -> (B, C, H, W)."""
        return F.relu(self.conv(h))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The local half of the ASGE path: conv, ReLU, goodness and its projection.

        Returns (a (B, C, H, W), energy (B, C, H/2, W/2) fp32 or None, logits (B, N) fp32).
        Only the logits carry a graph, back to this layer's conv. Backward turns a into dL/dz
        in place (asge.conv_relu_goodness), so ``exit`` must read a before backward; the RMS
        pool's energy, where the goodness shares its squares, has memory of its own and can wait.
        """
        a, g, energy = conv_relu_goodness(h, self.conv.weight, self.conv.bias, self.conv.padding,
                                          self.spec.partition, self.spec.energy_window)
        # a: B, C, H, W ; g: B, C*P*P ; energy: B, C, H/2, W/2 or None
        return a, energy, project(g, self.proj_w, self.proj_b)      # ... ; B, N

    def run(self, h: torch.Tensor, dtype: torch.dtype | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole ASGE path: (B, C_in, H, W) -> next layer's input (B, C, H', W') in ``dtype``
        (None: fp32), its GAP (B, C) in fp32, and the logits (B, N) in fp32: ``forward``,
        then ``exit``. The logits carry the graph back to this layer's conv; the output none.
        """
        a, energy, logits = self(h)
        return (*self.exit(a, energy, dtype), logits)                # B, C, H', W' ; B, C ; B, N

    @torch.no_grad()
    def exit(self, a: torch.Tensor | None, energy: torch.Tensor | None = None, dtype: torch.dtype | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next layer's input, in ``dtype`` (None: fp32), and its GAP (B, C) in fp32, from
        a or, where given, the RMS pool's energy (a may then be None: backward has used it).

        In fp32 this is the transition of the whole batch. In another dtype (the convs' under
        mixed precision) it is made ``asge.energy_rows`` samples of a at a time: each chunk
        is transitioned in fp32 and cast into the output, so that neither an fp32 copy of
        a nor the fp32 output ever exists whole. Pooling and LayerNorm are per sample, so
        every value is the whole batch's, cast.
        """
        src = a if energy is None else energy
        b, sp = len(src), self.spec
        rows = b if dtype in (None, torch.float32) else energy_rows(sp.channels * sp.height * sp.width, b)
        if rows >= b:
            out = self.transition(a, energy)                                          # B, C, H', W' fp32
            return (out if dtype is None else out.to(dtype)), gap(out)
        # layer_norm_chw's output is channels_last; so is this, in the convs' dtype
        h_next = torch.empty((b, sp.channels, sp.out_height, sp.out_width), dtype=dtype, device=src.device,
                             memory_format=torch.channels_last)                       # B, C, H', W'
        feat = torch.empty((b, sp.channels), device=src.device)                       # B, C
        for i in range(0, b, rows):
            part = slice(i, i + rows)
            out = self.transition(None if a is None else a[part], None if energy is None else energy[part])   # n, C, H', W' fp32
            h_next[part] = out
            feat[part] = gap(out)
            del out   # freed before the next chunk is made
        return h_next, feat

    def transition(self, a: torch.Tensor | None, energy: torch.Tensor | None = None) -> torch.Tensor:
        """What the next layer reads, in fp32: pool (if any), then LayerNorm over (C, H, W).

        ``energy``, when given, is avg_pool(a^2, 2), from which the RMS pool is read, in its
        own memory (and a is not read).
        """
        if energy is not None:
            a = rms_from_energy(energy, in_place=True)         # B, C, H/2, W/2 fp32
        else:
            a = a.float()                                      # B, C, H, W (no-op in fp32)
            if self.spec.pool:
                a = pool2d(a, self.spec.pool)                  # B, C, H/2, W/2
        return layer_norm_chw(a, LN_EPS)                       # B, C, H', W'


@dataclass
class NetOutput:
    """Every prediction of the network for one batch."""

    layer_logits: list[torch.Tensor]   # L x (B, N): each layer's goodness projection
    last: torch.Tensor                 # B, N
    fusion: torch.Tensor               # B, N


class LinearHead(nn.Module):
    """A linear classifier on standardised features: batch normalisation without affine
    parameters, then Linear.

    Training normalises with the logical batch's statistics, and the heads always step on
    the whole logical batch (methods.ASGEMethod.heads_step), so streaming does not change
    them. A batch of one sample has no statistics of its own and uses the running ones.
    Inference uses the running statistics, an affine map that folds into the Linear, so at
    deployment this is one linear layer, as in the paper.
    """

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(in_features))
        self.register_buffer("running_var", torch.ones(in_features))
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        batch_stats = self.training and f.shape[0] > 1
        z = F.batch_norm(f, self.running_mean, self.running_var, training=batch_stats,
                         momentum=HEAD_NORM_MOMENTUM, eps=HEAD_NORM_EPS)   # B, D
        return self.fc(z)                                                  # B, N


def gap(h: torch.Tensor) -> torch.Tensor:
    """Global average pooling (B, C, H, W) -> (B, C)."""
    return h.float().mean(dim=(2, 3))


class ASGENet(nn.Module):
    """The ASGE network: input normalisation, L ASGE layers, Last and Fusion heads."""

    def __init__(self, cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...], seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.specs = layer_specs(cfg, input_shape, num_classes)
        c = input_shape[0]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(c, 1, 1))
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)   # conv and head initialisation follow the run's seed
            self.layers = nn.ModuleList(ASGELayer(s, gen) for s in self.specs)
            self.last_head = LinearHead(self.specs[-1].channels, num_classes)
            self.fusion_head = LinearHead(sum(s.channels for s in self.fusion_specs), num_classes)

    def place(self, device: torch.device, layer_device: torch.device | None = None) -> "ASGENet":
        """Move the net to ``device`` in channels_last, its conv layers to ``layer_device``
        when given (offloading parks them in host memory). Returns the net."""
        for child in self.children():
            child.to(layer_device if child is self.layers and layer_device is not None else device,
                     memory_format=torch.channels_last)
        for name, buf in self.named_buffers(recurse=False):
            setattr(self, name, buf.to(device))
        return self

    @property
    def fusion_specs(self) -> tuple[LayerSpec, ...]:
        """Layers 2..L feed Fusion (the paper drops layer 1); a 1-layer net uses layer 1."""
        return self.specs[1:] or self.specs

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels -> normalised float input, (B, C, H, W): uint8 0..255 as data.batches
        yields them, or float in [0, 1] as the exported graphs take them."""
        if x.dtype == torch.uint8:   # in place on its own fp32 copy: one input-sized tensor (planner.py)
            return x.float().div_(255).sub_(self.mean).div_(self.std)   # B, C, H, W
        return (x - self.mean) / self.std

    def heads(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Last and Fusion logits from the per-layer GAP features, each (B, C_l)."""
        last = self.last_head(feats[-1])   # B, N; first, so its hook opens the heads' phase (memory.measure_step)
        fused = torch.cat(feats[len(feats) - len(self.fusion_specs):], dim=1)   # B, sum C_l
        return last, self.fusion_head(fused)                                    # B, N ; B, N

    def forward(self, x: torch.Tensor) -> NetOutput:
        h = self.normalize(x)                                   # B, C0, H, W
        layer_logits, feats = [], []
        for layer in self.layers:
            h, feat, logits = layer.run(h)                      # B, C, H', W' ; B, C ; B, N
            layer_logits.append(logits)
            feats.append(feat)
        last, fusion = self.heads(feats)
        return NetOutput(layer_logits, last, fusion)

    def exit_logits(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Best-Pred early exit: run layers 1..k only and read layer k's projection.

        Args:
            x: raw pixels (B, C, H, W).
            k: 1-based exit layer.

        Returns:
            (B, N) logits of layer k.
        """
        if not 1 <= k <= len(self.layers):
            raise ValueError(f"exit layer {k} is out of range 1..{len(self.layers)}")
        h = self.normalize(x)                                   # B, C0, H, W
        for layer in self.layers[:k]:
            h, _, logits = layer.run(h)                         # B, C, H', W' ; B, C ; B, N
        return logits
