"""Memory planner for layer-streaming ASGE training (pure: shapes + budget -> plan).

Contract: ``plan_memory`` is a pure function of (layer specs, input shape, logical batch,
precision, optimiser, budget). It returns, per layer, the bytes each sample keeps
resident while that layer trains, the layer's fixed bytes (weights, gradients, optimiser
state, fixed projection), and the micro-batch: the fewest accumulation steps whose largest
layer phase fits the budget, split as evenly as the logical batch allows. Streaming ASGE
trains one layer at a time on one micro-batch at a time, so the planned peak is the
maximum over layers, never their sum:

    peak = max_l (fixed_l + max(m * per_sample_l, m * forward_l + squares_l(m),
                                m * exit_l + rows_l(m) * exit_chunk_l,
                                m * backward_l + rows_l(m) * spread_l, m * after_l)) + batch_bytes

with m the micro-batch, rows_l(m) = asge.energy_rows(C*H*W, m) the samples per chunk,
squares_l(m) = rows_l(m) * squares_per_sample_l the buffer in which the forward makes the
layer's squares a chunk of samples at a time (asge.goodness_and_energy), exit_chunk_l
what the exit holds per sample of its chunk under mixed precision (ASGELayer.exit), and
spread_l what the backward holds per sample of its chunk where the patches are uneven,
and after_l (the last layer's only) the next micro-batch's input: its pixels scaled and
normalised in fp32 (models.ASGENet.normalize), plus their cast to the compute width
under mixed precision, made while the last layer to run is still the active one.

``batch_bytes`` is what must stay for the whole logical batch: the raw input batch (uint8
pixels, as data.batches yields them: 1 byte each), its labels, and the per-layer GAP
features that the Last and Fusion heads read (sum C_l per sample, fp32), with the heads'
own weights, running statistics and optimiser state.

Once every layer has stepped, the heads train on the whole logical batch's features
(methods.ASGEMethod.heads_step), whatever the micro-batch: their phase, ``heads_bytes``,
is batch_bytes plus the larger of their forward (Fusion's concatenated input, both heads'
normalised inputs and both logits, per sample of the logical batch, and the batch mean and
inverse deviation that batch norm returns beside the larger head's output) and their
backward (the normalised inputs that the Linear layers saved and five logit-sized tensors
of the cross-entropy, per sample, and the larger head's gradient and its optimiser
temporaries):

    planned peak = max(max_l layer phase_l + batch_bytes, heads_bytes)

so a large logical batch has a floor that no micro-batch lowers. (Under torchrun the
heads read every process's features; that gathered batch is not planned.)

Per-sample bytes of layer l. Every layer's input and output are held at the compute width
s (4 bytes in fp32, 2 under bf16/fp16), in which the convs read them (ASGELayer.exit,
methods.Method.conv_input): ``in`` is C_in*H*W*s, ``act`` is C*H*W elements at width s,
``out`` is C*H'*W'*s (``out32`` the same in fp32, as LayerNorm makes it), and
``g`` is the goodness, C*P*P fp32, and ``l`` the projection's N logits, fp32, which stay
until the layer's backward is done. Goodness squares and pooling energies are always fp32
(4 bytes); see asge.py. ``up`` is an fp32 copy of a (0 in fp32). The phases of ``ASGELayer.forward``
(asge.conv_relu_goodness), ``ASGELayer.exit`` and ``ASGEMethod.layer_backward`` are:
- forward: in + a + l + g, twice (before and after flattening), plus the 2x2 energy
  where the RMS pool shares the squares (LayerSpec.energy_window). The ReLU runs in place
  on the conv output. The squares never exist whole: asge.goodness_and_energy makes them
  ``energy_rows`` samples at a time in one buffer (squares_l above), of at most
  ENERGY_CHUNK_BYTES (one sample where a sample is larger), or an ENERGY_CHUNKS-th of
  the micro-batch where that is more.
- exit (no autograd): where the energy is shared, after backward, in + g + l + the energy
  (each chunk of it becomes the RMS pool in place); otherwise before backward, in + a +
  g + l; plus the exit's temporaries: out32 where the energy is shared; otherwise up and what
  the pool makes (pool_temps), then the pool's output beside out32, or up + out32 where
  the layer does not pool. In fp32 the exit is the whole batch's (per_sample_l
  holds it). Under mixed precision it is made rows_l(m) samples at a time: exit_l is the
  above before the temporaries, + out (the s-byte output being filled), and exit_chunk_l
  the temporaries, per sample of the chunk.
- backward: in + a, which dL/dz overwrites in place, + g + the shared energy, which
  waits, or else out (the next layer's input, made before) + dL/dg and its scale; l and
  three more logit-sized tensors of the cross-entropy (its saved log-softmax, that
  one's gradient and dL/dl); plus,
  where a later micro-batch adds its weight gradient in slices of channels
  (asge.grad_slice), the contiguous copy of one slice of dL/dz that the conv's weight
  gradient reads. Where P does not divide H and W (adaptive-pool patches), dL/dg is spread
  over the patches a chunk of samples at a time (asge._grad_z_into): spread_l is that
  chunk's fp32 spread, and under mixed precision the fp32 cast of a's chunk beside it.
per_sample_l is the largest of the three (the chunks aside), forward_l the first,
backward_l the last.
fixed_l is the weights, gradient and optimiser state; under mixed precision, the s-byte
copy of the weights that the conv reads and backward keeps; and the larger of two
temporaries that never coexist:
the optimiser step's (``OPTIMIZER_TEMPS``) and the backward's fresh gradient of a later
micro-batch. That is one slice of output channels (asge.grad_slice) and the bias, or,
where the gradient is one slice under mixed precision, the whole gradient in s bytes and
its fp32 cast at once. Under mixed precision, the first micro-batch's gradient also
exists in s bytes beside its fp32 cast, which is a third candidate for the larger. Measured peaks
(memory.measure_step) stay within the plan on the CPU, phase by phase (each layer's
within lm.peak(m) + batch_bytes, Plan.layer_peaks; the heads' within heads_bytes);
tests/test_streaming.py pins that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from .asge import energy_rows, grad_slice
from .budget import format_size
from .config import ModelConfig
from .models import LayerSpec, layer_specs

FP32 = 4
PIXEL = 1   # a raw input pixel, uint8 (data.batches)
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZER_STATE = {"adamw": 2, "sgd": 1}   # fp32 state tensors per parameter (Adam: m, v; SGD: momentum)
# Parameter-sized temporaries of the optimiser step, measured with memory.measure_step: the
# fused AdamW (methods.make_optimizer) needs none, SGD one.
OPTIMIZER_TEMPS = {"adamw": 0, "sgd": 1}
# Scalar tensors that every phase holds (losses, counts, the optimisers' step counters): a
# few dozen bytes, measured; counted once, in the batch's state.
SCALAR_BYTES = 256
WIDTH_STEP = 0.01   # the grid on which widest_width looks for a narrower net that fits


@dataclass(frozen=True)
class LayerMemory:
    """Bytes of one layer's training phase."""

    index: int
    input: int          # per sample: the layer's input, resident while it trains
    output: int         # per sample: what it hands to the next layer
    saved: int          # per sample: what autograd saves for backward (goodness path included)
    per_sample: int     # per sample: the largest phase, the chunks aside
    fixed: int          # weights + gradients + optimiser state + their temporaries + fixed projection
    forward: int        # per sample: the forward phase, which also holds...
    squares: int        # ...the squares' chunk buffer, this many bytes per sample (fp32), for asge.energy_rows samples
    backward: int       # per sample: the backward phase, which also holds...
    spread: int         # ...this many bytes per sample of its chunk (0: even patches, which need none)
    exit: int = 0       # per sample: the exit phase under mixed precision, which also holds...
    exit_chunk: int = 0   # ...this many bytes per sample of its chunk (0: the exit is whole, in per_sample)
    after: int = 0      # per sample, last layer only: the next micro-batch's normalised input (module docstring)

    def rows(self, micro_batch: int) -> int:
        """Samples per chunk (asge.energy_rows of the activation, C*H*W elements)."""
        return energy_rows(self.squares // FP32, micro_batch)

    def chunk(self, micro_batch: int) -> int:
        """Bytes of the squares' chunk buffer at a micro-batch of ``micro_batch``."""
        return self.rows(micro_batch) * self.squares

    def peak(self, micro_batch: int) -> int:
        """Bytes of this layer's training phase at a micro-batch of ``micro_batch``."""
        m, rows = micro_batch, self.rows(micro_batch)
        return self.fixed + max(m * self.per_sample, m * self.forward + self.chunk(m),
                                m * self.exit + rows * self.exit_chunk, m * self.backward + rows * self.spread,
                                m * self.after)

    def largest_micro_batch(self, room: int) -> int:
        """The largest micro-batch whose phase fits in ``room`` bytes (0: none does). The peak
        grows with the micro-batch, so a bisection finds it."""
        lo, hi = 0, max(0, (room - self.fixed) // max(self.per_sample, self.after))   # no larger one fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.peak(mid) <= room else (lo, mid - 1)
        return lo


@dataclass(frozen=True)
class Plan:
    """The memory plan of a streaming run."""

    layers: tuple[LayerMemory, ...]
    batch: int
    micro_batch: int
    precision: str
    budget: int | None
    batch_bytes: int         # whole-logical-batch state: input batch, labels, GAP features, heads
    heads_bytes: int         # the heads' phase over the whole logical batch, batch_bytes included
    parked_bytes: int        # state of the layers that are not training (host RAM, or device without --offload)

    def peak_at(self, micro_batch: int) -> int:
        """Planned peak bytes of this network and logical batch at a micro-batch of ``micro_batch``."""
        return _peak(self.layers, self.batch_bytes, self.heads_bytes, micro_batch)

    @property
    def accumulation_steps(self) -> int:
        return math.ceil(self.batch / self.micro_batch)

    @property
    def planned_peak(self) -> int:
        return self.peak_at(self.micro_batch)

    @property
    def min_budget(self) -> int:
        """The smallest budget that admits a micro-batch of 1."""
        return self.peak_at(1)

    def sweep(self) -> list[tuple[int, int, int]]:
        """(accumulation steps, micro-batch, planned peak) of every plan the planner can make for
        this logical batch, fewest steps first: the peak is the smallest budget that gets that
        plan, so this is the budget each number of steps needs."""
        micros = sorted({even_micro_batch(self.batch, m) for m in range(1, self.batch + 1)}, reverse=True)
        return [(math.ceil(self.batch / m), m, self.peak_at(m)) for m in micros]

    def layer_peaks(self) -> tuple[int, ...]:
        """Planned peak of each layer's phase at the planned micro-batch, the batch's state
        included (the phases memory.measure_step measures)."""
        return tuple(lm.peak(self.micro_batch) + self.batch_bytes for lm in self.layers)

    def peak_layer(self) -> int | None:
        """1-based index of the layer whose phase sets the peak; None where the heads' does."""
        costs = self.layer_peaks()
        if self.heads_bytes > max(costs):
            return None
        return costs.index(max(costs)) + 1

    def to_dict(self) -> dict:
        return {
            "batch": self.batch, "micro_batch": self.micro_batch, "accumulation_steps": self.accumulation_steps,
            "precision": self.precision, "budget_bytes": self.budget, "batch_bytes": self.batch_bytes,
            "heads_bytes": self.heads_bytes, "parked_bytes": self.parked_bytes, "planned_peak_bytes": self.planned_peak,
            "min_budget_bytes": self.min_budget, "peak_layer": self.peak_layer(),
            "layer_peak_bytes": list(self.layer_peaks()),
            "layers": [lm.__dict__ for lm in self.layers],
            "sweep": [{"accumulation_steps": k, "micro_batch": m, "planned_peak_bytes": peak} for k, m, peak in self.sweep()],
        }


class BudgetTooSmall(ValueError):
    """No micro-batch fits; ``min_budget`` is the smallest budget that would."""

    def __init__(self, budget: int, min_budget: int):
        super().__init__(f"memory budget {budget} B is too small: even a micro-batch of 1 needs {min_budget} B")
        self.budget, self.min_budget = budget, min_budget

    def advice(self, cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int, batch: int,
               precision: str, optimizer: str) -> str:
        """One line for the user: the budget is too small for this model and input, the
        smallest that works, and the widest --width that works within it (widest_width)."""
        what = f"{cfg.arch} x{cfg.width} at {'x'.join(map(str, input_shape))}"
        narrower = widest_width(cfg, input_shape, num_classes, batch, self.budget, precision, optimizer)
        instead = "" if narrower is None else f", or --width {narrower:g} within this budget"
        return (f"--memory-budget {self.budget} B ({format_size(self.budget)}) is too small for {what}; "
                f"the smallest that works is {self.min_budget} B ({format_size(self.min_budget)}){instead}")


def widest_width(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int, batch: int,
                 budget: int, precision: str = "fp32", optimizer: str = "adamw") -> float | None:
    """The widest ``--width`` below ``cfg.width``, in steps of WIDTH_STEP, whose smallest
    budget fits ``budget``, all else as it is; None where none does (say, where the logical
    batch's heads phase alone outgrows it)."""
    for k in range(math.ceil(round(cfg.width / WIDTH_STEP, 6)) - 1, 0, -1):
        width = round(k * WIDTH_STEP, 6)
        specs = layer_specs(replace(cfg, width=width), input_shape, num_classes)
        if plan_memory(specs, input_shape, batch, None, precision, optimizer).min_budget <= budget:
            return width
    return None


def pool_temps(kind: str, act_bytes: int, out_bytes: int) -> int:
    """Bytes that pooling (models.ASGELayer.transition) holds at once, in fp32, from an activation
    of ``act_bytes`` to an output of ``out_bytes``: the RMS pool squares the whole activation
    (the clamp and sqrt that follow are smaller), and max pooling makes int64 indices too."""
    return {"rms": act_bytes + out_bytes, "max": 3 * out_bytes, "avg": out_bytes}[kind]


def layer_memory(spec: LayerSpec, precision: str, optimizer: str) -> LayerMemory:
    """Per-sample and fixed bytes of one layer's training phase (see module docstring)."""
    s = PRECISION_BYTES[precision]
    act = spec.channels * spec.height * spec.width                   # elements
    inp = spec.in_channels * spec.height * spec.width * s
    out_elements = spec.channels * spec.out_height * spec.out_width
    out, out32 = out_elements * s, out_elements * FP32               # the output as held, and as LayerNorm makes it
    good = spec.goodness_dim * FP32
    upcast = act * FP32 if s != FP32 else 0                           # a.float() under mixed precision
    logits = spec.num_classes * FP32                                  # the projection's logits, until the step ends
    resident = inp + act * s + good + logits                          # input, the activation a, its goodness, logits
    fan_in = spec.in_channels * 9
    shared = out32 if spec.energy_window > 1 else 0                   # the RMS pool's 2x2 energy, from the goodness
    # The exit reads the shared energy (the RMS pool made in place) after backward, when a is
    # gone; or, before backward, a (its fp32 upcast) and what pooling makes of it, then the
    # pool's output beside LayerNorm's.
    if shared:
        exit_temps = out32
    elif spec.pool:
        exit_temps = max(upcast + pool_temps(spec.pool, act * FP32, out32), 2 * out32)
    else:
        exit_temps = upcast + out32
    exit_base = (inp + good + logits if shared else resident) + shared
    if s == FP32:
        transition, exit_, exit_chunk = exit_base + exit_temps, 0, 0
    else:   # a chunk of samples at a time, cast into the s-byte output (ASGELayer.exit)
        transition, exit_, exit_chunk = 0, exit_base + out, exit_temps
    piece = grad_slice(spec.channels, fan_in)                         # output channels per gradient slice
    sliced = act * s * piece // spec.channels if piece < spec.channels else 0   # a dL/dz slice, copied
    forward = resident + good + shared
    backward = (resident + (shared or out) + 2 * good + sliced       # the energy waits, or the output
                + 3 * logits)                                         # log-softmax (saved), its gradient, dL/dlogits
    spread = 0 if spec.even_patches else act * FP32 + upcast          # adaptive-pool backward's chunk (+ a's cast)
    params = spec.channels * (fan_in + 1)
    half = params * s if s != FP32 else 0                             # the s-byte copy of the weights, saved for backward
    # The first micro-batch's gradient is whole: in s bytes beside its fp32 cast (the
    # gradient itself). A later one's is added one slice at a time (from s bytes), or, as
    # one slice, exists whole in s bytes and in fp32 at once, before autograd adds it.
    fresh_grad = (piece * fan_in + spec.channels) * FP32 + (half if piece == spec.channels else 0)
    temps = max(half, fresh_grad, OPTIMIZER_TEMPS[optimizer] * params * FP32)
    fixed = (params * FP32 * (2 + OPTIMIZER_STATE[optimizer]) + half + temps
             + (spec.goodness_dim + 1) * spec.num_classes * FP32)
    return LayerMemory(spec.index, inp, out, act * s, max(forward, transition, exit_, backward), fixed,
                       forward, act * FP32, backward, spread, exit_, exit_chunk)


def _batch_and_heads_bytes(specs: Sequence[LayerSpec], input_shape: tuple[int, int, int], batch: int,
                           optimizer: str) -> tuple[int, int]:
    """(batch_bytes, heads_bytes) of a logical batch of ``batch`` (see the module docstring)."""
    n, last = specs[0].num_classes, specs[-1].channels
    feats = sum(s.channels for s in specs)
    fusion_in = sum(s.channels for s in specs[1:]) or specs[0].channels   # models.ASGENet.fusion_specs
    head_params = (last + 1) * n + (fusion_in + 1) * n
    head_state = head_params * FP32 * (1 + OPTIMIZER_STATE[optimizer]) + 2 * (last + fusion_in) * FP32
    batch_bytes = batch * (math.prod(input_shape) * PIXEL + 8 + feats * FP32) + head_state + SCALAR_BYTES
    forward = batch * FP32 * (2 * fusion_in + last + 2 * n) + 2 * max(fusion_in, last) * FP32
    backward = (batch * FP32 * (fusion_in + last + 5 * n)
                + (fusion_in + 1) * n * FP32 * (1 + OPTIMIZER_TEMPS[optimizer]))
    return batch_bytes, batch_bytes + max(forward, backward)


def even_micro_batch(batch: int, largest: int) -> int:
    """The smallest micro-batch that needs no more accumulation steps than ``largest`` does.

    The steps, not the micro-batch, set the speed: 128 images in micro-batches of at most
    18 take 8 steps either way, and 8 x 16 leaves no 2-image remainder and holds 2
    images' activations fewer than 7 x 18 + 2.
    """
    return math.ceil(batch / math.ceil(batch / largest))


def plan_memory(specs: Sequence[LayerSpec], input_shape: tuple[int, int, int], batch: int,
                budget: int | None, precision: str = "fp32", optimizer: str = "adamw") -> Plan:
    """Choose the micro-batch for a streaming ASGE run.

    Args:
        specs: the network's layer specs (models.layer_specs).
        input_shape: (C, H, W) of the images.
        batch: the logical batch (the optimiser steps once per logical batch).
        budget: bytes for the training working set, or None for no limit (micro-batch = batch).
        precision: fp32, bf16 or fp16 (the compute width of convs and activations).
        optimizer: adamw or sgd (how much state each parameter carries).

    Returns:
        The Plan.

    Raises:
        BudgetTooSmall: not even a micro-batch of 1 fits; it carries the minimum budget.
    """
    layers = tuple(layer_memory(s, precision, optimizer) for s in specs)
    s = PRECISION_BYTES[precision]
    scaled = math.prod(input_shape) * (FP32 + (s if s != FP32 else 0))   # normalize's fp32 output (+ its cast)
    layers = (*layers[:-1], replace(layers[-1], after=scaled))
    batch_bytes, heads_bytes = _batch_and_heads_bytes(specs, input_shape, batch, optimizer)
    if budget is None:
        micro = batch
    else:
        largest = min(batch, *(lm.largest_micro_batch(budget - batch_bytes) for lm in layers))
        if largest < 1 or heads_bytes > budget:
            raise BudgetTooSmall(budget, _peak(layers, batch_bytes, heads_bytes, 1))
        micro = even_micro_batch(batch, largest)
    parked = sum(lm.fixed for lm in layers) - max(lm.fixed for lm in layers)
    return Plan(layers, batch, micro, precision, budget, batch_bytes, heads_bytes, parked)


def _peak(layers: Sequence[LayerMemory], batch_bytes: int, heads_bytes: int, micro_batch: int) -> int:
    """The planned peak at ``micro_batch``: the largest layer phase plus the batch's own state,
    or the heads' phase where that is larger."""
    return max(max(lm.peak(micro_batch) for lm in layers) + batch_bytes, heads_bytes)
