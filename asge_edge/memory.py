"""Measuring the training working set: CUDA peak statistics, or live tensor bytes on the CPU.

Contract: ``measure_step(method, x, y)`` runs one training step and returns the peak
bytes of its working set, the quantity the planner (planner.py) bounds:
    the active layer's state (weights, gradients, optimiser state, fixed projection)
  + the activations and temporaries in flight
  + the logical batch's own state (input batch, labels, GAP features, and the heads'
    weights, running statistics and optimiser state).
Inactive layers' weights, gradients and optimiser state are parked, and are not counted.

How it is measured (``measured_by`` in summary.json):
- ``cuda-peak-stats``: torch.cuda.max_memory_allocated over the step, less what was
  allocated before it, plus the batch and the largest device-resident layer's state (with
  --offload, layers arrive during the step, so the peak already holds the active one).
  This counts every tensor the caching allocator handed out, cuDNN workspaces included.
  It has not been run yet (no GPU in the sessions that wrote it).
- ``cpu-live-tensors``: a TorchDispatchMode sees every tensor that an aten op creates
  during the step (forward, backward, optimiser) and tracks its storage until the last
  tensor on it dies; in-place results and views of tensors that predate the step are not
  new allocations. At each op it adds up the live storages, less the gradients of the
  layers that are not training (parked), plus the active layer's weights, projection
  and optimiser state (which predate the step, so they are counted directly from the
  tensors). Hooks say which layer is active (it runs forward, or its optimiser steps).
  The peak over the step is reported, plus the batch's own state. Not counted: oneDNN's
  private scratch buffers, the allocator's free-but-cached memory, and Python objects.
  So this measures tensor bytes, not the process's resident set size. How much that
  leaves out is measured by bench/rss_vs_tracked.py: with malloc caching nothing, the
  resident set grows over a step by the tracked bytes to within 0.3 MB (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .methods import HEADS


def _nbytes(tensors) -> int:
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


def _state(module: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Tensors of ``module`` that exist before a step: weights, buffers (a layer's projection,
    a head's running statistics), and ``opt``'s state for its parameters."""
    state = [v for p in module.parameters() for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return [*module.parameters(), *module.buffers(), *state]


def measure_step(method, x: torch.Tensor, y: torch.Tensor):
    """Run ``method.train_step(x, y)``; return (its StepStats, (peak working-set bytes, how measured)).

    For a streaming method (one optimiser per layer) the active layer is tracked with
    hooks: a layer becomes active when it runs forward or its optimiser steps, and no layer
    is once its step is done (the heads' phase). The heads' state counts throughout, with
    the batch's.
    For an end-to-end method (BP) nothing is parked:
    every weight and all optimiser state count. Call this after at least one step, so
    that optimiser state already exists, with gradients cleared (every Method leaves them so).
    """
    net = method.net
    n = len(net.layers)
    streams = all(f"layer{i + 1}" in method.optimizers for i in range(n))
    if not streams:   # end-to-end methods: every weight and all optimiser state stay resident
        state = [v for opt in method.optimizers.values() for st in opt.state.values() for v in st.values()
                 if isinstance(v, torch.Tensor)]
        resident_all = _nbytes([*net.parameters(), *net.buffers(), *state])
        return _measure_cpu_or_cuda(method, x, y, lambda: resident_all, [], _nbytes([x, y]), resident_all)
    heads = [net.last_head, net.fusion_head]
    batch_state = _nbytes([x, y]) + sum(_nbytes(_state(h, method.optimizers[name])) for h, name in zip(heads, HEADS))
    resident = [_nbytes(_state(net.layers[i], method.optimizers[f"layer{i + 1}"])) for i in range(n)]
    on_device = [r if net.layers[i].conv.weight.device == x.device else 0 for i, r in enumerate(resident)]

    active = [None]   # index of the training layer; None between a layer's step and the next one's work
    hooks = []
    for i, layer in enumerate(net.layers):
        opt = method.optimizers[f"layer{i + 1}"]
        hooks.append(layer.register_forward_pre_hook(lambda *_, i=i: active.__setitem__(0, i)))
        hooks.append(opt.register_step_pre_hook(lambda *_, i=i: active.__setitem__(0, i)))
        hooks.append(opt.register_step_post_hook(lambda *_: active.__setitem__(0, None)))
    params = [list(layer.parameters()) for layer in net.layers]

    def working_set_adjustment() -> int:
        """Leave out the parked layers' gradients; add the active layer's pre-existing state."""
        grads = [_nbytes(p.grad for p in ps) for ps in params]
        a = active[0]
        return -(sum(grads) - (grads[a] if a is not None else 0)) + (resident[a] if a is not None else 0)

    return _measure_cpu_or_cuda(method, x, y, working_set_adjustment, hooks, batch_state, max(on_device))


def _measure_cpu_or_cuda(method, x, y, adjust, hooks, batch_state: int, resident: int):
    """One step under CUDA peak stats or the live-tensor tracker; removes ``hooks`` after."""
    try:
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
            before = torch.cuda.memory_allocated(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            stats = method.train_step(x, y)
            torch.cuda.synchronize(x.device)
            peak = torch.cuda.max_memory_allocated(x.device) - before + batch_state + resident
            return stats, (peak, "cuda-peak-stats")
        tracker = LiveTensorBytes(adjust)
        with tracker:
            stats = method.train_step(x, y)
        return stats, (tracker.peak + batch_state, "cpu-live-tensors")
    finally:
        for h in hooks:
            h.remove()
