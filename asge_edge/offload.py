"""Layer offloading: parked layers live in host memory; one layer at a time visits the device.

Contract: ``Offloader(park, compute)`` moves an ASGE layer's parameters, buffers and
optimiser state between a parking device (host memory) and the compute device:
``load`` before the layer trains, ``park`` after its optimiser has stepped (its gradients
are gone by then). The Parameter objects stay the same, so optimisers keep their state
keyed by them. Activations that wait between layers cross with ``to_park`` and
``to_compute``: every byte a schedule moves goes through this class (bench/offload.py
counts them). ``streaming(net)`` serves inference, with module hooks: each layer is
loaded just before its forward, and its device copy is dropped right after it (``drop``:
the weights did not change, so the host's tensors are put back and nothing is copied).

With offloading the device holds one layer's weights and gradients plus one micro-batch's
activations, and, for the layer's optimiser step only, its optimiser state (``load_state``);
``ASGEMethod`` then runs its layer-major schedule, which keeps the logical batch's
layer-boundary activations on the host as well (``methods.ASGEMethod.train_step``). The
planner counts the optimiser state beside the activations all the same: for ``--offload``
its plan is an upper bound. Park and compute may be the same device: nothing then
moves, and the schedule still runs, which is how the CPU tests exercise it.

Not yet run on a GPU (the sessions that wrote it had none): host copies are plain
(pageable) memory and transfers are synchronous.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from .errors import UserError


# Where a module's tensors are: (parameter, its data) pairs and (owner, name, buffer) triples.
HostTensors = tuple[list[tuple[nn.Parameter, torch.Tensor]], list[tuple[nn.Module, str, torch.Tensor]]]


def host_tensors(module: nn.Module) -> HostTensors:
    """Each parameter's data and each buffer of ``module`` as they are now, for ``Offloader.drop``."""
    return ([(p, p.data) for p in module.parameters()],
            [(owner, name, buf) for owner in module.modules() for name, buf in owner.named_buffers(recurse=False)])


class Offloader:
    """Moves layers (and their optimiser state) between ``park`` and ``compute``."""

    def __init__(self, park: torch.device, compute: torch.device):
        self.park_device = torch.device(park)
        self.compute_device = torch.device(compute)

    @staticmethod
    def _move(module: nn.Module, optimizer: torch.optim.Optimizer | None, target: torch.device | torch.dtype) -> None:
        """``module.to(target)`` and the same for its optimiser state. Module.to swaps each
        parameter's storage in place (CPU <-> CUDA), so the optimiser's keys stay valid."""
        module.to(target)
        Offloader._move_state(module, optimizer, target)

    @staticmethod
    def _move_state(module: nn.Module, optimizer: torch.optim.Optimizer | None,
                    target: torch.device | torch.dtype) -> None:
        """The optimiser state of ``module``'s parameters to ``target``."""
        if optimizer is None:
            return
        for p in module.parameters():
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    state[k] = v.to(target)

    def load(self, module: nn.Module) -> None:
        """Bring a layer (weights, gradients, buffers) to the compute device; its optimiser
        state follows for its step alone (``load_state``)."""
        self._move(module, None, self.compute_device)

    def load_state(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Bring a loaded layer's optimiser state to the compute device, for its step: what
        comes before the step needs the weights alone."""
        self._move_state(module, optimizer, self.compute_device)

    def park(self, module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Send a layer and its optimiser state back to the parking device."""
        self._move(module, optimizer, self.park_device)

    def to_park(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor (an activation waiting between layers) on the parking device."""
        return t.to(self.park_device)

    def to_compute(self, t: torch.Tensor) -> torch.Tensor:
        """A parked tensor on the compute device."""
        return t.to(self.compute_device)

    @staticmethod
    def drop(module: nn.Module, host: HostTensors) -> None:
        """Drop a loaded layer's device copy and put back the tensors it had on the host,
        ``host`` (``host_tensors`` before ``load``), where its weights have not changed: in
        place of ``park``, nothing is copied back."""
        params, buffers = host
        for p, data in params:
            p.data = data
        for owner, name, buf in buffers:
            setattr(owner, name, buf)

    @contextmanager
    def streaming(self, layers: nn.ModuleList) -> Iterator[None]:
        """Within the block, each layer is on the compute device only while it runs forward,
        then its copy there is dropped (``drop``): inference moves each layer one way. The
        host tensors come back as they were, so a copy made under torch.inference_mode, as
        evaluation's are, never becomes a layer's host weights: inference tensors, which
        autograd refuses to save for backward. (Training loads a fresh copy of each layer
        before it runs, so it would not meet them; code that used parked weights directly would.)"""
        hooks, host = [], {}

        def load(m: nn.Module, _args) -> None:
            host[m] = host_tensors(m)
            self.load(m)

        for layer in layers:
            hooks.append(layer.register_forward_pre_hook(load))
            hooks.append(layer.register_forward_hook(lambda m, _args, _out: self.drop(m, host.pop(m))))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()


def make_offloader(offload: bool, device: torch.device) -> Offloader | None:
    """The run's Offloader for ``--offload`` on ``device`` (host memory parks), or None.

    Raises:
        UserError: --offload on the CPU, where parked layers already live in RAM.
    """
    if not offload:
        return None
    if device.type == "cpu":
        raise UserError("--offload parks layers in host memory while a GPU trains; on the CPU they already "
                        "live there: drop --offload (the plan reports them as parked bytes)")
    return Offloader(torch.device("cpu"), device)
