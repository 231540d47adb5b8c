"""What offloading costs: ASGE's layer-major schedule against BP with checkpointing and weight offloading.

Claim (issue 3, measured here, not asserted): below the size of its own weight state, BP
can train only by adding weight offloading to checkpointing and gradient accumulation.
Then every layer visits the device twice per micro-batch (forward, and backward with
recomputation) and once more per logical batch to step, and the device keeps the
layer-boundary activations of the whole net for the micro-batch. ASGE's ``--offload``
schedule (methods.ASGEMethod, layer-major) brings each layer once per logical batch, and
moves only the boundary activations between layers. This prints, per logical batch, the
bytes each schedule moves between host and device and the peak of its device working set,
for the same net, micro-batch and logical batch.

How, on the CPU: host and device are the same memory here, so ``SimulatedOffloader`` keeps
a ledger of what the schedule would hold on the device. Every byte either schedule moves
goes through it (offload.Offloader: ``load``/``park`` for a layer's weights, gradients,
buffers and optimiser state, ``to_park``/``to_compute`` for activations and gradients),
and it counts them. A layer it loads counts as on the device until it is parked; an
activation brought to the device is copied, as a transfer would, so the copy is a new
tensor; a tensor sent to the host stops counting. The peak is memory.LiveTensorBytes' (the
tensors the step creates) plus that ledger, plus the batch's own state (the input, labels
and heads). Time on the CPU is compute only: no link is crossed, so the images/s columns
show what recomputation costs, not what the transfers would.

The baseline, ``OffloadedBP``, is the fair one at its cheapest: a layer's weights come
to the device for its forward and its backward and are then dropped, not sent back (they
have not changed: ``Offloader.drop``, as the product's inference streaming does); its gradient goes out once per micro-batch into a host accumulator (not
in and out); and the Last head and the boundary activations stay on the device. With the whole
logical batch as one micro-batch it computes methods.BPMethod's update to the bit
(tests/test_bench.py); smaller micro-batches change one thing, the Last head's batch
statistics, which are each micro-batch's (as in bench/memory.py's CheckpointedBP): BP
backpropagates through that head one micro-batch at a time. It lives here only, not in
the product.

    python bench/offload.py [--width 1.0] [--input-shape 3x32x32] [--batch-size 128] [--micro-batches 1,26] [--steps 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from asge_edge.budget import format_size
from asge_edge.cli import parse_shape
from asge_edge.config import ModelConfig, TrainConfig
from asge_edge.memory import LiveTensorBytes, batch_state_bytes, nbytes, warm_up
from asge_edge.methods import ASGEMethod, Method, StepStats
from asge_edge.models import ASGENet, gap
from asge_edge.offload import Offloader, host_tensors
from rounds import alternate
from workload import add_args, make_batch, make_net

CPU = torch.device("cpu")


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """What Offloader.load moves: parameters, their gradients and buffers."""
    params = list(module.parameters())
    return [*params, *(p.grad for p in params if p.grad is not None), *module.buffers()]


def _state_tensors(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """What Offloader.load_state moves: the optimiser state of ``module``'s parameters."""
    if optimizer is None:
        return []
    return [v for p in module.parameters() for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]


class SimulatedOffloader(Offloader):
    """An Offloader whose host and device are both the CPU, counting bytes moved and keeping
    a ledger of the device's share (see the module docstring)."""

    def __init__(self):
        super().__init__(CPU, CPU)
        self.moved = 0           # bytes moved either way since the last reset
        self.loaded = {}         # id(module) -> bytes it brought to the device
        self.parked = 0          # bytes of tensors created in the step that now wait on the host

    def load(self, module):
        n = nbytes(_module_tensors(module))
        self.moved += n
        self.loaded[id(module)] = n
        super().load(module)

    def load_state(self, module, optimizer):
        n = nbytes(_state_tensors(module, optimizer))
        self.moved += n
        self.loaded[id(module)] += n
        super().load_state(module, optimizer)

    def park(self, module, optimizer=None):
        self.moved += nbytes(_module_tensors(module) + _state_tensors(module, optimizer))
        self.loaded.pop(id(module))
        super().park(module, optimizer)

    def drop(self, module, host):
        self.loaded.pop(id(module))   # nothing moves back
        super().drop(module, host)

    def to_park(self, t):
        n = t.untyped_storage().nbytes()
        self.moved += n
        self.parked += n
        weakref.finalize(t, self._unpark, n)
        return t

    def _unpark(self, n: int) -> None:
        self.parked -= n

    def to_compute(self, t):
        self.moved += t.untyped_storage().nbytes()
        return t.clone()   # the device's copy: a tensor of its own, as after a transfer

    def device_adjustment(self) -> int:
        """Bytes to add to the step's live tensors: loaded layers in, parked tensors out."""
        return sum(self.loaded.values()) - self.parked


class OffloadedBP(Method):
    """BP with checkpointing, gradient accumulation and weight offloading (the docstring above)."""

    name = "bp-offload"
    strategies = ("last",)
    layer_losses = False
    select = "last"

    def __init__(self, net: ASGENet, cfg: TrainConfig, micro_batch: int, offloader: SimulatedOffloader):
        super().__init__(net, cfg)
        self.micro_batch, self.offloader = micro_batch, offloader
        for i, layer in enumerate(net.layers):
            self._add_optimizer(f"layer{i + 1}", layer.conv.parameters())
        self._add_optimizer("last", net.last_head.parameters())
        self.host_grads = [[torch.zeros_like(p, device=offloader.park_device) for p in layer.conv.parameters()]
                           for layer in net.layers]   # gradients accumulate here, on the host

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        off, layers, head_loss = self.offloader, self.net.layers, torch.zeros((), device=x.device)
        for xm, ym in zip(x.split(self.micro_batch), y.split(self.micro_batch)):
            with torch.no_grad():
                hs = [self.net.normalize(xm)]                          # L+1 boundary activations, kept on the device
                for layer in layers:
                    host = host_tensors(layer.conv)                     # BP has no use for the projection
                    off.load(layer.conv)
                    hs.append(layer.transition(layer.activate(hs[-1])))   # b, C, H', W'
                    off.drop(layer.conv, host)                          # unchanged: nothing goes back
            top = hs[-1].requires_grad_()
            loss = F.cross_entropy(self.net.last_head(gap(top)), ym)    # the Last head stays on the device
            (loss * (len(ym) / len(y))).backward()
            head_loss += loss.detach() * len(ym)
            grad = top.grad                                             # b, C_L, H', W'
            for i in reversed(range(len(layers))):
                layer, h = layers[i], hs[i].requires_grad_(i > 0)       # layer 1's input needs no gradient
                host = host_tensors(layer.conv)
                off.load(layer.conv)
                layer.transition(layer.activate(h)).backward(grad)     # recomputed, then its backward
                grad, hs[i + 1] = h.grad, None
                for acc, p in zip(self.host_grads[i], layer.conv.parameters()):
                    acc.add_(off.to_park(p.grad))
                    p.grad = None
                off.drop(layer.conv, host)
        for i, layer in enumerate(layers):                             # once the logical batch is through
            name = f"layer{i + 1}"
            for acc, p in zip(self.host_grads[i], layer.conv.parameters()):
                p.grad = acc
            off.load(layer.conv)                                        # weights and gradient
            off.load_state(layer.conv, self.optimizers[name])
            self.step(name)
            off.park(layer.conv, self.optimizers[name])
            for acc in self.host_grads[i]:
                acc.zero_()
        self.step("last")
        n = len(layers)
        return StepStats(torch.full((n,), float("nan")), torch.zeros(n),
                         torch.stack([head_loss, torch.tensor(float("nan"))]))


def measure(label: str, method: Method, off: SimulatedOffloader, x, y) -> dict:
    """A row: warm-up (every optimiser's state now exists), then one step's device peak and bytes moved."""
    warm_up(method, x, y)
    off.moved = 0
    tracker = LiveTensorBytes(off.device_adjustment)
    with tracker:
        method.train_step(x, y)
    return {"label": label, "method": method, "peak": tracker.peak + batch_state_bytes(method, x, y), "moved": off.moved}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p, width=1.0, shape="3x32x32")
    p.add_argument("--micro-batches", default="1,26", help="comma-separated micro-batch sizes (26: the 64MB plan's)")
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    shape, cfg = parse_shape(a.input_shape), ModelConfig(width=a.width)
    x, y = make_batch(a.batch_size, shape)
    rows = []
    for m in (int(v) for v in a.micro_batches.split(",")):
        asge, off = ASGEMethod(make_net(cfg, shape).place(CPU), TrainConfig()), SimulatedOffloader()
        asge.micro_batch, asge.offloader = m, off
        rows.append(measure(f"ASGE --offload, micro-batch {m}", asge, off, x, y))
        off = SimulatedOffloader()
        bp = OffloadedBP(make_net(cfg, shape).place(CPU), TrainConfig(method="bp"), m, off)
        rows.append(measure(f"BP + checkpoint + weight offload, micro-batch {m}", bp, off, x, y))

    def timed(method) -> float:
        t0 = time.perf_counter()
        method.train_step(x, y)
        return time.perf_counter() - t0

    times = alternate({r["label"]: (lambda mt=r["method"]: timed(mt)) for r in rows}, a.steps)
    print(f"vgg8 width {a.width}, input {a.input_shape}, logical batch {a.batch_size}, fp32, "
          f"CPU threads {torch.get_num_threads()}, torch {torch.__version__}; per logical batch")
    print(f"{'schedule':<48} {'device peak':>12} {'moved':>10} {'bytes moved':>16} {'images/s':>9}")
    for r in rows:
        ips = a.batch_size / statistics.median(times[r["label"]])
        print(f"{r['label']:<48} {format_size(r['peak']):>12} {format_size(r['moved']):>10} {r['moved']:>16,} {ips:>9.1f}")
    for asge, bp in zip(rows[::2], rows[1::2]):
        m = asge["label"].rsplit(" ", 1)[1]
        print(f"micro-batch {m}: BP moves {bp['moved'] / asge['moved']:.1f}x ASGE's bytes; "
              f"device peak BP / ASGE {bp['peak'] / asge['peak']:.2f}x")


if __name__ == "__main__":
    main()
