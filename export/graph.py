"""Inference graphs for export, built from a trained ASGENet.

Contract: every module here takes a batch (B, ...) in float32 and uses only ops that ONNX
opset 18 and TensorRT 10 support (Conv, Relu, Mul, AveragePool, Max, Sqrt,
LayerNormalization, ReduceMean, MatMul, Add, Sub, Div, Concat, Cast): no autograd
Functions, no autocast, no Python control flow on values. The weights are copies, so
exporting never changes the network.
- ``Stage(net, start, end)``: layers start+1..end (1-based) of the network; it reads the
  raw [0, 1] pixels ``images`` (normalised inside the graph) when start == 0, else the
  ``features`` that layer ``start`` hands on, and returns layer ``end``'s exit logits
  (its goodness through its fixed projection) and, if asked, the features it hands on.
  ``Stage(net, 0, k)`` is the Best-Pred early exit cut after layer k.
- ``FusionNet(net)``: the whole network and its Fusion head, whose feature
  standardisation is folded into the linear layer (a single Gemm at inference).
With ``half=True`` convolutions and ReLU run in float16; squares, goodness, pooling
energy, LayerNorm and the projection stay float32 (asge.py says why). LayerNorm is taken
over (C, H, W) of the NCHW tensor directly: the same values as training's NHWC form,
one LayerNormalization node and no transposes. Where a layer's P does not divide its map,
its goodness is two MatMuls with constant averaging matrices (asge.patch_matrix), not the
gathers that adaptive pooling exports to.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from asge_edge.asge import patch_matrix, pool2d, spatial_goodness, square
from asge_edge.models import HEAD_NORM_EPS, LN_EPS, ASGELayer, ASGENet, LayerSpec, LinearHead


class ExportLayer(nn.Module):
    """One ASGE layer for inference: conv + ReLU, then exit logits or the next layer's input."""

    def __init__(self, layer: ASGELayer, half: bool):
        super().__init__()
        dtype = torch.float16 if half else torch.float32
        self.spec: LayerSpec = layer.spec
        self.padding = layer.conv.padding
        self.register_buffer("weight", layer.conv.weight.detach().to(dtype, memory_format=torch.contiguous_format).clone())
        self.register_buffer("bias", layer.conv.bias.detach().to(dtype).clone())
        self.register_buffer("proj_w", layer.proj_w.detach().float().clone())   # G, N
        self.register_buffer("proj_b", layer.proj_b.detach().float().clone())   # N
        if not self.spec.even_patches:   # uneven patches: goodness by averaging matrices (asge.patch_matrix)
            p = self.spec.partition
            self.register_buffer("patch_rows", patch_matrix(self.spec.height, p))    # P, H
            self.register_buffer("patch_cols", patch_matrix(self.spec.width, p).T.contiguous())   # W, P

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) fp32 -> post-ReLU activation (B, C, H, W) fp32."""
        z = F.conv2d(h.to(self.weight.dtype), self.weight, self.bias, padding=self.padding)   # B, C, H, W
        return torch.relu(z).float()

    def hand_on(self, a: torch.Tensor) -> torch.Tensor:
        """What the next layer reads: pool (if any), then LayerNorm over (C, H, W)."""
        if self.spec.pool:
            a = pool2d(a, self.spec.pool)                                    # B, C, H/2, W/2
        return F.layer_norm(a, a.shape[1:], eps=LN_EPS)                      # B, C, H', W'

    def exit_logits(self, a: torch.Tensor) -> torch.Tensor:
        """Goodness of a through the fixed projection: (B, N)."""
        if self.spec.even_patches:
            g = spatial_goodness(a, self.spec.partition)                     # B, C*P*P
        else:
            g = (self.patch_rows @ square(a) @ self.patch_cols).flatten(1)   # B, C*P*P
        return g @ self.proj_w + self.proj_b


class Stage(nn.Module):
    """Layers start+1..end, returning layer end's exit logits (and its hand-on features)."""

    def __init__(self, net: ASGENet, start: int, end: int, half: bool = False, features: bool = False):
        super().__init__()
        n = len(net.layers)
        if not 0 <= start < end <= n:
            raise ValueError(f"stage {start}..{end} is out of range: layers are 1..{n}")
        self.start, self.end, self.features = start, end, features
        self.layers = nn.ModuleList(ExportLayer(layer, half) for layer in net.layers[start:end])
        self.register_buffer("mean", net.mean.detach().clone())
        self.register_buffer("std", net.std.detach().clone())

    def forward(self, x: torch.Tensor):
        h = (x - self.mean) / self.std if self.start == 0 else x             # B, C, H, W
        for layer in self.layers[:-1]:
            h = layer.hand_on(layer.activate(h))                             # B, C', H', W'
        last = self.layers[-1]
        a = last.activate(h)                                                 # B, C, H, W
        logits = last.exit_logits(a)                                         # B, N
        return (last.hand_on(a), logits) if self.features else logits


def fold_head(head: LinearHead) -> nn.Linear:
    """The head's inference map, standardisation folded in: W' = W / s, b' = b - W' m."""
    scale = (head.running_var + HEAD_NORM_EPS).rsqrt()                       # D
    fc = nn.Linear(head.fc.in_features, head.fc.out_features)
    with torch.no_grad():
        fc.weight.copy_(head.fc.weight * scale)                              # N, D
        fc.bias.copy_(head.fc.bias - fc.weight @ head.running_mean)          # N
    return fc


class FusionNet(nn.Module):
    """The whole network read by its Fusion head: (B, C, H, W) pixels -> (B, N) logits."""

    def __init__(self, net: ASGENet, half: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(ExportLayer(layer, half) for layer in net.layers)
        self.first_fused = len(net.layers) - len(net.fusion_specs)           # 0-based
        self.register_buffer("mean", net.mean.detach().clone())
        self.register_buffer("std", net.std.detach().clone())
        self.head = fold_head(net.fusion_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x - self.mean) / self.std                                       # B, C, H, W
        feats = []
        for i, layer in enumerate(self.layers):
            h = layer.hand_on(layer.activate(h))                             # B, C, H', W'
            if i >= self.first_fused:
                feats.append(h.mean(dim=(2, 3)))                             # B, C
        return self.head(torch.cat(feats, dim=1))                            # B, N


class LayerTrace(nn.Module):
    """Layers 1..k returning every hand-on output of layers 1..k-1, then layer k's logits:
    what firmware_sim is compared with, layer by layer."""

    def __init__(self, net: ASGENet, k: int):
        super().__init__()
        self.stage = Stage(net, 0, k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = self.stage
        h = (x - s.mean) / s.std                                             # B, C, H, W
        outs = []
        for layer in s.layers[:-1]:
            h = layer.hand_on(layer.activate(h))                             # B, C', H', W'
            outs.append(h)
        return (*outs, s.layers[-1].exit_logits(s.layers[-1].activate(h)))
