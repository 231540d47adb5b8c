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
- ``conv_relu_goodness``  a layer's training forward in one autograd node: conv, ReLU
  in place, goodness, and (optionally) the RMS pool's energy from the same squares. Its
  backward reads the activation once (``dL/dz = 2 * a * expand(dL/dg) / patch_area``,
  written into a's memory) and asks the conv for weight and bias gradients only, where
  autograd would make five full-size passes and allocate each. bench/step_time.py
  measures the result. When the weight already holds a gradient (a later micro-batch of
  an accumulating run), its new gradient is added in slices of ``grad_slice`` output
  channels, so that no second weight-sized tensor ever exists: the one write this module
  makes outside its return values, as autograd's own accumulation would. Likewise the
  squares are never whole: ``goodness_and_energy`` makes them ``energy_rows`` samples at a
  time in one reused buffer, and keeps only the patch means and pooled energies.

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

# A later micro-batch's weight gradient is added to the accumulated one in slices of at
# most this many bytes (grad_slice), not as one fresh weight-sized tensor: for a 512->512
# conv that temporary is 9.4 MB, a fifth of the layer's training floor under AdamW.
GRAD_SLICE_BYTES = 2 ** 21

# The squares of an activation are made in chunks of whole samples of at most this many
# fp32 bytes (energy_rows), not at once: whole, they would be as large as the activation
# (twice it under mixed precision), and only their patch and window means are kept...
ENERGY_CHUNK_BYTES = 2 ** 20
# ...and in at most this many chunks per layer, where that takes larger ones: each chunk is
# two kernel launches and 25-37 us of host-side dispatch on this CPU (bench/squares.py), and
# in 1 MiB chunks a step of full-width VGG8 on 3x32x32 at batch 128 made 324 of them.
ENERGY_CHUNKS = 8


def grad_slice(out_channels: int, fan_in: int, elem_bytes: int = 4) -> int:
    """Output channels per slice of accumulated weight gradient: the fewest equal slices
    whose gradient (slice x fan_in x elem_bytes) fits in GRAD_SLICE_BYTES (1 channel at
    least, all of them at most)."""
    most = max(1, GRAD_SLICE_BYTES // (fan_in * elem_bytes))
    return math.ceil(out_channels / math.ceil(out_channels / most))


def energy_rows(sample_elements: int, batch: int) -> int:
    """Samples per chunk of squares in a batch of ``batch``: as many as fit in
    ENERGY_CHUNK_BYTES in fp32 (one at least), or enough for at most ENERGY_CHUNKS chunks,
    and never more than the batch, but one even for an empty batch (a torchrun rank's part
    of a short last batch), whose loop over chunks then runs no chunk."""
    return max(1, min(batch, max(ENERGY_CHUNK_BYTES // (sample_elements * 4), math.ceil(batch / ENERGY_CHUNKS))))


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


def square(x: torch.Tensor) -> torch.Tensor:
    """x^2 in float32 at least: half-precision inputs are upcast first (fp16 overflows at |x| = 256)."""
    return x.to(torch.promote_types(x.dtype, torch.float32)).square()


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
    return patch_mean(square(y), p).flatten(1)     # B, C*p*p


def divides(p: int, h: int, w: int) -> bool:
    """Whether p x p patches split an h x w map evenly (else they take adaptive-pool boundaries)."""
    return h % p == 0 and w % p == 0


def patch_mean(e: torch.Tensor, p: int) -> torch.Tensor:
    """Mean of ``e`` (B, C, H, W) over each of its p x p patches: equal ones where p divides
    H and W, else adaptive average pooling's (see spatial_goodness).

    Returns (B, C, p, p).
    """
    if divides(p, e.shape[2], e.shape[3]):
        return F.avg_pool2d(e, (e.shape[2] // p, e.shape[3] // p))
    return F.adaptive_avg_pool2d(e, p)


def patch_matrix(n: int, p: int) -> torch.Tensor:
    """(p, n) float32 averaging matrix of p patches along a side of n: row i is 1/len over
    patch i's positions, on adaptive average pooling's boundaries (see spatial_goodness).

    ``patch_matrix(H, p) @ e @ patch_matrix(W, p).T`` is ``patch_mean(e, p)`` as two matrix
    products (equal up to float rounding): the form that exported graphs take for uneven
    patches, since adaptive pooling exports to ONNX as gathers that TensorRT does not take.
    """
    m = torch.zeros(p, n)
    for i in range(p):
        lo, hi = i * n // p, -(-(i + 1) * n // p)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def rms_from_energy(energy: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """sqrt of a pooled mean energy, clamped at ``RMS_EPS`` first (see RMS_EPS); with
    ``in_place``, written over ``energy`` (no autograd)."""
    return energy.clamp_min_(RMS_EPS).sqrt_() if in_place else energy.clamp_min(RMS_EPS).sqrt()


def memory_layout(a: torch.Tensor) -> torch.memory_format:
    """channels_last where ``a`` (B, C, H, W) has its channels innermost (C > 1), else contiguous."""
    return torch.channels_last if a.stride(1) == 1 and a.shape[1] > 1 else torch.contiguous_format


def goodness_and_energy(a: torch.Tensor, p: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Patch goodness of ``a`` and, when k > 1, its k x k mean energy, without autograd.

    The squares are made ``energy_rows`` samples at a time in one reused buffer, so their
    memory is one chunk, not one activation. With k > 1, each chunk's squares are pooled
    straight into the energy, and the goodness is then read from the energy (k and then p
    must divide the activation: ``energy_window``). The values are bit for bit those of
    squaring the whole batch at once.

    Args:
        a: activations (B, C, H, W), any float dtype.
        p: patches per side (patch_mean's boundaries where p does not divide H and W).
        k: energy window (1: none).

    Returns:
        (g (B, C*p*p) channel-major, energy (B, C, H/k, W/k) in a's layout or None), both
        fp32 (fp64 for fp64 input).
    """
    b, c, hh, ww = a.shape
    rows = energy_rows(c * hh * ww, b)
    like = dict(dtype=torch.promote_types(a.dtype, torch.float32), device=a.device)   # fp32 (fp64 stays fp64)
    layout = memory_layout(a)
    buf = torch.empty((rows, c, hh, ww), memory_format=layout, **like)                        # rows, C, H, W
    energy = torch.empty((b, c, hh // k, ww // k), memory_format=layout, **like) if k > 1 else None   # B, C, H/k, W/k
    g = None if energy is not None else torch.empty((b, c, p, p), **like)                   # B, C, p, p
    for i in range(0, b, rows):
        x, e = a[i:i + rows], buf[:b - i]                         # n, C, H, W
        # Half precision is upcast before squaring: torch.square(x, out=e) would square in fp16.
        e = torch.square(x, out=e) if x.dtype == e.dtype else e.copy_(x).square_()
        if energy is not None:
            torch.ops.aten.avg_pool2d.out(e, [k, k], [k, k], out=energy[i:i + rows])   # n, C, H/k, W/k
        else:
            g[i:i + rows] = patch_mean(e, p)                      # n, C, p, p
    if energy is not None:
        g = patch_mean(energy, p)                                 # B, C, p, p
    return g.flatten(1), energy                                    # B, C*p*p ; energy


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
    return rms_from_energy(F.avg_pool2d(square(x), k, k))    # B, C, H//k, W//k


class _ConvReluGoodness(torch.autograd.Function):
    """a = relu(conv(h)), its patch goodness g and, when asked, its k x k mean energy.

    k > 1 needs k, then p, to divide H and W (``energy_window``). Forward and backward run
    in the autocast dtype, if any, with the squares in fp32. The backward computes the
    conv's weight and bias gradients only (never h's), from dL/dz = 2 * a * dL/dg spread
    over each patch / its area, which it writes into a's memory: ``a`` must not be read
    after backward. (ReLU's mask needs no pass of its own: where z <= 0, a is 0.)
    """

    @staticmethod
    def forward(ctx, h, weight, bias, padding, p, k):
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        ctx.param_dtypes = (weight.dtype, bias.dtype)
        ctx.weight_param = weight                                         # whose .grad a later micro-batch adds to
        h, weight, bias = h.to(dtype), weight.to(dtype), bias.to(dtype)
        with torch.autocast(dev, enabled=False):
            a = F.conv2d(h, weight, bias, padding=padding).relu_()        # B, C, H, W
            g, pooled = goodness_and_energy(a, p, k)                      # B, C*p*p ; B, C, H/k, W/k fp32
        ctx.save_for_backward(h, weight, a)
        ctx.p, ctx.padding = p, padding
        ctx.set_materialize_grads(False)   # no zero-filled full-size gradients for a and pooled
        ctx.mark_non_differentiable(*(t for t in (a, pooled) if t is not None))
        return a, g, pooled                                               # a ; B, C*p*p ; pooled

    @staticmethod
    def backward(ctx, _grad_a, grad_g, _grad_pooled):
        h, weight, a = ctx.saved_tensors
        c = a.shape[1]
        grad_z = _grad_z_into(a, grad_g, ctx.p)                           # B, C, H, W (in a)
        accumulated, step = ctx.weight_param.grad, grad_slice(c, weight[0].numel())
        if accumulated is None or step >= c:   # nothing to add to yet, or the whole gradient is one slice
            _, grad_w, grad_b = _conv_grads(grad_z, h, weight, ctx.padding, True)
            return None, grad_w.to(ctx.param_dtypes[0]), grad_b.to(ctx.param_dtypes[1]), None, None, None
        for o in range(0, c, step):   # add this micro-batch's gradient slice by slice: no weight-sized temporary
            _, grad_w, _ = _conv_grads(grad_z[:, o:o + step], h, weight[o:o + step], ctx.padding, False)
            accumulated[o:o + step].add_(grad_w)                          # slice, C_in, kh, kw
            del grad_w   # freed before the next slice is computed, not after: one slice at a time
        grad_b = grad_z.sum((0, 2, 3), dtype=torch.promote_types(grad_z.dtype, torch.float32))   # C
        return None, None, grad_b.to(ctx.param_dtypes[1]), None, None, None


def _grad_z_into(a: torch.Tensor, grad_g: torch.Tensor, p: int) -> torch.Tensor:
    """dL/dz = 2 * a * (dL/dg spread over each patch / its area), written into a (B, C, H, W).

    Even patches: dL/dg times 2/area, in a's layout so that the multiply's innermost loop
    runs along unit strides in both (broadcast from NCHW onto channels_last, it ran 3-5x
    slower), one goodness-sized tensor beside dL/dg. Uneven ones (adaptive-pool boundaries,
    which may overlap): the adaptive pool's own backward of 2 dL/dg, ``energy_rows`` samples
    at a time, so that its fp32 spread is one chunk, never one activation. Doubling is
    exact, so in fp32 these are autograd's values (grad * (2 * a)) to the bit.
    """
    b, c, hh, ww = a.shape
    if divides(p, hh, ww):
        scale = torch.empty((b, c, p, p), dtype=grad_g.dtype, device=grad_g.device,
                            memory_format=memory_layout(a))                               # B, C, p, p
        torch.mul(grad_g.view(b, c, p, p), 2.0 / ((hh // p) * (ww // p)), out=scale)
        patches = a.view(b, c, p, hh // p, p, ww // p)                                   # B, C, p, H/p, p, W/p
        return patches.mul_(scale.view(b, c, p, 1, p, 1)).view(b, c, hh, ww)          # B, C, H, W
    twice = grad_g.view(b, c, p, p) * 2.0                                               # B, C, p, p
    rows = energy_rows(c * hh * ww, b)
    for i in range(0, b, rows):
        x = a[i:i + rows]                                                               # n, C, H, W
        like = x if x.dtype == twice.dtype else x.to(twice.dtype)   # the kernel takes shape, layout, dtype from it
        x.mul_(torch.ops.aten._adaptive_avg_pool2d_backward(twice[i:i + rows], like))   # n, C, H, W
        del like
    return a


def _conv_grads(grad_z: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, padding, bias: bool):
    """(None, dL/dweight, dL/dbias or None) of a stride-1 conv: never dL/dh."""
    return torch.ops.aten.convolution_backward(
        grad_z, h, weight, [weight.shape[0]], [1, 1], list(padding), [1, 1], False, [0, 0], 1, [False, True, bias])


def energy_window(h: int, w: int, p: int, k: int) -> int:
    """k where k x k windows tile an (h, w) activation and p divides the tiled size, else 1.

    Where it is k, the goodness can be read from the k x k mean energy (the RMS pool's)
    instead of from the full-size squares: the same patches, averaged in two steps.
    """
    return k if k > 1 and h % k == 0 and w % k == 0 and (h // k) % p == 0 and (w // k) % p == 0 else 1


def conv_relu_goodness(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: tuple[int, int],
                       p: int, k: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """An ASGE layer's training forward: conv (stride 1), ReLU and goodness in one autograd node.

    The activation is computed in place, and its memory becomes dL/dz in the backward,
    which computes no gradient for ``h`` (ASGE detaches every layer's input). Where p does
    not divide the activation, the patches take adaptive-pool boundaries, as in spatial_goodness.

    Args:
        h: the layer's input (B, C_in, H, W), without a graph.
        weight, bias: the conv's parameters (C, C_in, kh, kw) and (C,).
        padding: the conv's padding (rows, columns).
        p: patches per side.
        k: when > 1, also return the k x k mean energy of a (what an RMS pool reads), and
            read g from it, where k and then p divide the activation evenly.

    Returns:
        (a, g, energy): a = relu(conv(h)) (B, C, H, W) without a graph, which must not be
        read after backward; g = spatial_goodness(a, p) (B, C*p*p), fp32, differentiable
        with respect to weight and bias; energy = avg_pool(a^2, k) (B, C, H/k, W/k) fp32,
        or None when k == 1 or the windows do not align with the patches.
    """
    hh = h.shape[2] + 2 * padding[0] - weight.shape[2] + 1
    ww = h.shape[3] + 2 * padding[1] - weight.shape[3] + 1
    return _ConvReluGoodness.apply(h, weight, bias, padding, p, energy_window(hh, ww, p, k))


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
    so the output keeps channels_last and the next conv needs no layout copy. The
    statistics do not depend on the layout.

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
