"""Measuring the training working set: CUDA peak statistics, or live tensor bytes on the CPU.

Contract: ``measure_step(method, x, y)``, once every optimiser's state exists (after
``warm_up``, or training), runs one training step and returns the peak bytes of its
working set, per phase and over the step: the quantity the planner (planner.py) bounds:
    the active layer's state (weights, gradients, optimiser state, fixed projection)
  + the activations and temporaries in flight
  + the logical batch's own state (input batch, labels, GAP features, and the heads'
    weights, running statistics and optimiser state).
Inactive layers' weights, gradients and optimiser state are parked, and are not counted.

The step is measured in phases: layer l's phase runs from its forward (or its
optimiser's step) to the next layer's, over every micro-batch (layer 1's from the step's
start: its first work is layer 1's input), and the heads' phase follows the last layer's
step. Hooks on the layers, on the method's optimiser steps (``Method.step_hooks``: an
fp16 step that GradScaler skips still begins its phase) and on the Last head mark the
boundaries. Within a phase the parked bytes do not change, so each phase's peak is what
a counter saw at its highest, less the parked layers' gradients, plus the active layer's
weights, projection and optimiser state where they predate the step on the measured
device (the counters see only what the step allocates), plus the batch's own state.
``Measurement`` holds the peak of every phase and their maximum, the step's peak;
train.py writes both into summary.json beside the plan's.

The counters (``measured_by`` in summary.json):
- ``cuda-peak-stats``: torch.cuda.memory_allocated since the step began, its peak read
  and reset with torch.cuda peak statistics at each phase boundary (CudaAllocated). This
  counts every tensor the caching allocator handed out, cuDNN workspaces included. With
  --offload the layers arrive during the step, so the counter already holds the active
  one; a layer's arrival falls in the phase before its own (the hooks see a layer when it
  runs), which moves those bytes from one phase's figure to another's but leaves the step's
  peak as it is. It has not run on a GPU yet (none in the sessions that wrote it); the
  tests run it on allocator statistics faked from the CPU tracker, and the phase logic
  around it is the CPU's.
- ``cpu-live-tensors``: a TorchDispatchMode (LiveTensorBytes) sees every tensor that an
  aten op creates during the step (forward, backward, optimiser) and tracks its storage
  until the last tensor on it dies; in-place results and views of tensors that predate
  the step are not new allocations. Not counted: oneDNN's private scratch buffers, the
  allocator's free-but-cached memory, and Python objects. So this measures tensor bytes,
  not the process's resident set size. How much that leaves out is measured by
  bench/rss_vs_tracked.py: with malloc caching nothing, the resident set grows over a
  step by the tracked bytes to within 0.3 MB (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .methods import HEADS, StepStats


def nbytes(tensors) -> int:
    """Storage bytes of ``tensors`` (None entries skipped)."""
    return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the storage bytes of tensors created by aten ops while the mode is active.

    Args:
        adjust: called at every op; returns bytes to add to the live total (negative
            to leave out parked tensors), so that ``peak`` measures the working set.
    """

    def __init__(self, adjust: Callable[[], int] = lambda: 0):
        super().__init__()
        self.adjust = adjust
        self.live: dict[int, list[int]] = {}   # storage data_ptr -> [nbytes, live tensors on it]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t, inputs)
        self.peak = max(self.peak, self.current + self.adjust())
        return out

    def take_peak(self) -> int:
        """The peak since the last call (or since the start); the next one starts from now."""
        peak, self.peak = self.peak, self.current + self.adjust()
        return peak

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        storage = t.untyped_storage()
        ptr, n = storage.data_ptr(), storage.nbytes()
        entry = self.live.get(ptr)
        if entry is None:
            if n == 0 or ptr in inputs:
                return   # an in-place result or a view of a tensor that predates the step
            entry = self.live[ptr] = [n, 0]
            self.current += n
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[ptr]
            self.current -= entry[0]


class CudaAllocated:
    """The CUDA caching allocator's view of the same quantity as LiveTensorBytes: bytes
    allocated on ``device`` since this object was made, and their peak since the last
    ``take_peak`` (torch.cuda peak statistics, which need no synchronisation: the allocator
    counts on the host, as ops are queued)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)

    def __enter__(self) -> "CudaAllocated":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def take_peak(self) -> int:
        peak = torch.cuda.max_memory_allocated(self.device) - self.base
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak


@dataclass(frozen=True)
class Measurement:
    """The working set of one measured step: its peak, how it was measured, and the peak of
    each phase: ``layers[i]`` while layer i+1 was the active one (its input, forward,
    backward and optimiser step, over every micro-batch), ``heads`` in the heads' phase.
    An end-to-end method (BP) has no phases: ``layers`` is empty and ``heads`` None."""

    peak: int
    measured_by: str
    layers: tuple[int, ...] = ()
    heads: int | None = None


def _counter(device: torch.device):
    """The counter of the bytes a step allocates on ``device``, and its name for summary.json."""
    if device.type == "cuda":
        return CudaAllocated(device), "cuda-peak-stats"
    return LiveTensorBytes(), "cpu-live-tensors"


def _state(module: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Tensors of ``module`` that exist before a step: weights, buffers (a layer's projection,
    a head's running statistics), and ``opt``'s state for its parameters."""
    state = [v for p in module.parameters() for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return [*module.parameters(), *module.buffers(), *state]


def batch_state_bytes(method, x: torch.Tensor, y: torch.Tensor) -> int:
    """The logical batch's own bytes that predate a step: its input and labels, and the
    weights, buffers and optimiser state of the heads that ``method`` trains."""
    heads = [(getattr(method.net, f"{name}_head"), method.optimizers[name]) for name in HEADS if name in method.optimizers]
    return nbytes([x, y]) + sum(nbytes(_state(head, opt)) for head, opt in heads)


def warm_up(method, x: torch.Tensor, y: torch.Tensor, max_steps: int = 64) -> int:
    """Train ``method`` on (x, y) until every optimiser has stepped (``method.state_ready``):
    one step, or more where fp16's GradScaler skips steps. Returns the steps taken."""
    for steps in range(1, max_steps + 1):
        method.train_step(x, y)
        if method.state_ready:
            return steps
    raise RuntimeError(f"an optimiser has not stepped in {max_steps} steps: its gradients stay inf or NaN")


def measure_step(method, x: torch.Tensor, y: torch.Tensor) -> tuple[StepStats, Measurement]:
    """Run ``method.train_step(x, y)``; return its StepStats and the Measurement of its working set.

    For a streaming method (one optimiser per layer) the phases follow hooks: layer i's
    begins when it runs forward or its optimiser steps (layer 1's at the step's start), and
    the heads' when the Last head runs forward. Within a phase the parked bytes (the other
    layers' gradients) do not change, so each phase's peak is read from the counter when it
    ends, less them, plus the active layer's state where it predates the step. For an
    end-to-end method (BP) nothing is parked: every weight and all optimiser state count.
    Call this once every optimiser has stepped (``method.state_ready``, ``warm_up``), so
    that its state already exists, with gradients cleared (every Method leaves them so):
    state made during the measured step would count as working set in every later phase.
    """
    if not method.state_ready:
        raise ValueError("measure_step needs optimiser state from an earlier step: call warm_up first")
    net = method.net
    n = len(net.layers)
    counter, how = _counter(x.device)
    streams = all(f"layer{i + 1}" in method.optimizers for i in range(n))
    if not streams:   # end-to-end methods: every weight and all optimiser state stay resident
        state = [v for opt in method.optimizers.values() for st in opt.state.values() for v in st.values()
                 if isinstance(v, torch.Tensor)]
        resident_all = nbytes([*net.parameters(), *net.buffers(), *state])
        with counter:
            stats = method.train_step(x, y)
        peak = counter.take_peak() + resident_all + nbytes([x, y])
        return stats, Measurement(peak, how)
    batch_state = batch_state_bytes(method, x, y)
    # Each layer's state that predates the step and sits where it is measured: the counter
    # sees only what the step allocates, so the active layer's is added. With --offload on
    # a GPU the layers are parked on the host, arrive during the step, and the counter sees them.
    resident = [nbytes(_state(layer, method.optimizers[f"layer{i + 1}"]))
                if layer.conv.weight.device == x.device else 0 for i, layer in enumerate(net.layers)]
    params = [list(layer.parameters()) for layer in net.layers]

    def working_set_adjustment(active: int | None) -> int:
        """Leave out the parked layers' gradients; add the active layer's pre-existing state."""
        grads = [nbytes(p.grad for p in ps) for ps in params]
        mine = 0 if active is None else resident[active] + grads[active]
        return mine - sum(grads)

    phases = _Phases(counter, n, working_set_adjustment)
    layer_of = {f"layer{i + 1}": i for i in range(n)}

    def enter_step(name: str) -> None:   # a layer's optimiser steps: its phase, even where fp16 skips the step
        if name in layer_of:
            phases.enter(layer_of[name])

    hooks = [net.last_head.register_forward_pre_hook(lambda *_: phases.enter(None))]   # the heads' phase
    for i, layer in enumerate(net.layers):
        hooks.append(layer.register_forward_pre_hook(lambda *_, i=i: phases.enter(i)))
    method.step_hooks.append(enter_step)
    try:
        with counter:
            stats = method.train_step(x, y)
            phases.close()
    finally:
        method.step_hooks.remove(enter_step)
        for h in hooks:
            h.remove()
    layers = tuple(p + batch_state for p in phases.layers)
    heads = phases.heads + batch_state
    return stats, Measurement(max(*layers, heads), how, layers, heads)


class _Phases:
    """Per-phase peaks of a counter (LiveTensorBytes or CudaAllocated), each less the bytes
    parked during it (``adjust(active)``, constant within a phase). A step opens in layer
    1's phase: its first work is layer 1's input."""

    def __init__(self, counter, n: int, adjust: Callable[[int | None], int]):
        self.counter, self.adjust = counter, adjust
        self.active: int | None = 0   # None: the heads' phase
        self.layers = [0] * n
        self.heads = 0

    def enter(self, active: int | None) -> None:
        """End the current phase if ``active`` (a layer's index, or None for the heads)
        begins another."""
        if active != self.active:
            self.close()
            self.active = active

    def close(self) -> None:
        """Record the current phase's peak; the counter's next peak starts from now."""
        peak = self.counter.take_peak() + self.adjust(self.active)
        if self.active is None:
            self.heads = max(self.heads, peak)
        else:
            self.layers[self.active] = max(self.layers[self.active], peak)
