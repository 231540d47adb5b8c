"""Pure ASGE math: partition factor, spatial goodness, RMS pooling, fixed projections.

Contract: every function here is a pure function of its arguments (no module state,
no I/O, no device assumptions) and follows the paper (Gong, Staszewski, Xu,
arXiv 2509.12394) exactly where the paper is explicit:

- ``partition_factor``  Eq. (3): P_l = min(max(1, floor(alpha * C_L / C_l)), H_l, W_l).
- ``spatial_goodness``  Eq. (1)-(2): mean squared activation of each of the P x P patches
  of each channel, flattened channel-major to (B, C*P*P).
- ``rms_pool``          Eq. (8): sqrt(mean(x^2)) over k x k windows.
- ``make_projection``   Eq. (4): W ~ N(0, 1/sqrt(N)), b ~ N(0, 1/sqrt(N)); never trained.
- ``project``           Eq. (5): a = g W + b.
- ``relu_goodness``     ReLU and goodness fused, for training: the same values as
  ``spatial_goodness(relu(z), p)``, with a backward pass that reads the activation once
  (``2 * a * expand(dL/dg) / patch_area``) instead of autograd's five full-size passes
  (pow, mul, adaptive-pool and ReLU backward). bench/step_time.py measures the gain.

Squares, goodness and pooling energy are always computed in float32, whatever the input
dtype, because squares of fp16 activations overflow (65504 is reached at |x| = 256).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# sqrt'(0) is infinite. Under ReLU a whole pooling window can be zero, and backprop
# through rms_pool (the BP baseline does this) would then produce inf * 0 = NaN.
# Clamping the mean energy at RMS_EPS gives a zero gradient there instead, and moves
# the forward value of an all-zero window from 0 to sqrt(1e-12) = 1e-6 only.
RMS_EPS = 1e-12


def partition_factor(alpha: float, c_last: int, c: int, h: int, w: int) -> int:
    """Patches per side for a layer, Eq. (3) of the paper.

    Args:
        alpha: granularity hyper-parameter, alpha >= 0 (paper default 1.0).
        c_last: channel count C_L of the network's last conv layer.
        c: channel count C_l of this layer.
        h, w: spatial size of this layer's (pre-pooling) output.

    Returns:
        P_l = min(max(1, floor(alpha * c_last / c)), h, w).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if min(c_last, c, h, w) < 1:
        raise ValueError(f"channels and sizes must be >= 1, got c_last={c_last} c={c} h={h} w={w}")
    # A tiny tolerance so that e.g. alpha=1.5, 512/256 -> 3 survives float rounding.
    p = math.floor(alpha * c_last / c + 1e-9)
    return min(max(1, p), h, w)


def spatial_goodness(y: torch.Tensor, p: int) -> torch.Tensor:
    """Spatial goodness: mean of y^2 over each of the p x p patches of every channel.

    When H (or W) is not divisible by p, the patches take the boundaries of
    adaptive average pooling: patch i spans rows floor(i*H/p) .. ceil((i+1)*H/p) - 1,
    so patches may differ in size by one row or column, and may overlap by one
    when H/p is not an integer. With H divisible by p this is the paper's even split.

    Args:
        y: activations, shape (B, C, H, W), any float dtype.
        p: patches per side, 1 <= p <= min(H, W).

    Returns:
        Float32 tensor of shape (B, C*p*p), channel-major (the flattening of
        (B, C, p, p)).
    """
    energy = y.float().square()                    # B, C, H, W
    g = F.adaptive_avg_pool2d(energy, p)           # B, C, p, p
    return g.flatten(1)                            # B, C*p*p


class _ReluGoodness(torch.autograd.Function):
    """a = relu(z) and g = patch energy of a, for p dividing H and W.

    The backward needs no separate ReLU step: where z <= 0, a = 0 and so is 2*a*dg.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, p: int):
        a = torch.relu(z)                                      # B, C, H, W
        g = F.avg_pool2d(a.float().square(), (a.shape[2] // p, a.shape[3] // p))   # B, C, p, p
        ctx.save_for_backward(a)
        ctx.p = p
        ctx.mark_non_differentiable(a)
        return a, g.flatten(1)                                 # B, C, H, W ; B, C*p*p

    @staticmethod
    def backward(ctx, _grad_a, grad_g):
        (a,) = ctx.saved_tensors
        b, c, h, w = a.shape
        p = ctx.p
        scale = grad_g.view(b, c, p, 1, p, 1) * (2.0 / ((h // p) * (w // p)))   # B, C, p, 1, p, 1
        grad_z = a.view(b, c, p, h // p, p, w // p) * scale     # B, C, p, H/p, p, W/p
        return grad_z.view(b, c, h, w).to(a.dtype), None        # B, C, H, W


def relu_goodness(z: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU then spatial goodness, with a fused backward where p divides H and W.

    Args:
        z: pre-activation (B, C, H, W).
        p: patches per side.

    Returns:
        (a, g): a = relu(z) (B, C, H, W), which carries no gradient (the layer's
        output is detached anyway), and g = spatial_goodness(a, p) (B, C*p*p), fp32,
        differentiable with respect to z. Uneven patches fall back to autograd.
    """
    if z.shape[2] % p == 0 and z.shape[3] % p == 0:
        return _ReluGoodness.apply(z, p)
    a = torch.relu(z)
    return a.detach(), spatial_goodness(a, p)


def rms_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """RMS pooling, sqrt(avg_pool(x^2, kernel k, stride k)), computed in float32.

    The mean energy is clamped at ``RMS_EPS`` (1e-12) before the square root so
    that backprop through an all-zero window gives 0, not NaN; see RMS_EPS.

    Args:
        x: (B, C, H, W).
        k: window size and stride.

    Returns:
        Float32 tensor (B, C, H//k, W//k).
    """
    energy = F.avg_pool2d(x.float().square(), k, k)    # B, C, H//k, W//k
    return energy.clamp_min(RMS_EPS).sqrt()


def pool2d(x: torch.Tensor, kind: str, k: int = 2) -> torch.Tensor:
    """Downsampling by ``kind`` in {"rms", "avg", "max"}, window k, stride k."""
    if kind == "rms":
        return rms_pool(x, k)
    if kind == "avg":
        return F.avg_pool2d(x, k, k)
    if kind == "max":
        return F.max_pool2d(x, k, k)
    raise ValueError(f"unknown pool {kind!r}: use rms, avg or max")


def layer_norm_chw(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of each sample over all of (C, H, W), without affine parameters.

    Computed on the (B, H, W, C) view, which is contiguous for channels_last input,
    so the output keeps channels_last (1.4x faster than on NCHW on the CPU here, and
    no copy before the next conv). The statistics do not depend on the layout.

    Args:
        x: (B, C, H, W).
        eps: added to the variance (torch.nn.LayerNorm's default).

    Returns:
        (B, C, H, W), each sample with zero mean and unit variance.
    """
    t = x.permute(0, 2, 3, 1)                                  # B, H, W, C
    return F.layer_norm(t, t.shape[1:], eps=eps).permute(0, 3, 1, 2)   # B, C, H, W


def make_projection(in_features: int, num_classes: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a fixed random projection, Eq. (4).

    Args:
        in_features: goodness length C_l * P_l^2.
        num_classes: N.
        generator: the seeded CPU generator the run draws its projections from.

    Returns:
        (W, b): W of shape (in_features, N) and b of shape (N,), both with
        entries ~ N(0, std=1/sqrt(N)).
    """
    std = 1.0 / math.sqrt(num_classes)
    w = torch.randn(in_features, num_classes, generator=generator) * std    # G, N
    b = torch.randn(num_classes, generator=generator) * std                 # N
    return w, b


def project(g: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Class logits a = g W + b, Eq. (5), in float32.

    Args:
        g: goodness (B, G).
        w: (G, N).
        b: (N,).

    Returns:
        (B, N) logits, fp32 even under autocast (which would cast addmm to half).
    """
    with torch.autocast(g.device.type, enabled=False):
        return torch.addmm(b.float(), g.float(), w.float())     # B, N
