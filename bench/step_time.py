"""ASGE step time / BP step time, same model, same batch, measured side by side on the CPU.

Claims:
- Issue 2: an ASGE training step costs at most 0.7x a backprop step. A layer's update
  needs no gradient with respect to its input, and none is computed: each layer's input
  carries no graph. The goodness backward is also fused (asge.conv_relu_goodness).
- device.py: channels_last makes both faster on the CPU (oneDNN); this prints by how much.

Then, in rounds of their own (so that their tensors do not change the heap the steps ran
on), it times the steps' convolutions alone, in channels_last: per layer, the forward and
the weight and bias gradients (ASGE), plus the input gradient for layers 2..L (BP), on
random tensors of each layer's shapes, with the kernels the steps call. Their ratio is what
the convolution kernels alone give, before the rest of each step's work (ASGE's goodness,
BP's backward through ReLU, pooling and LayerNorm): where the weight gradient costs much
more than the input gradient, as with oneDNN on this AVX2 CPU, it sits near the target.

Method: one seeded network per (method, memory format), each warmed up; then rounds of
``--steps`` steps that visit all four, in reversed order every other round, so that drift
in machine speed hits them alike. Each row gives the median round. The ratio is taken
per round (ASGE and BP timed back to back), and its median and range are printed: on a
shared machine whose speed drifts by tens of percent, this is the steadier figure.

    python bench/step_time.py [--model vgg8] [--width 0.25] [--input-shape 1x28x28] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from asge_edge.cli import parse_shape
from asge_edge.config import ModelConfig, TrainConfig
from asge_edge.device import channels_last
from asge_edge.methods import make_method
from rounds import alternate, step_timer
from workload import add_args, make_batch, make_net

TARGET = 0.7
FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def make_round(method_name: str, cfg: ModelConfig, shape, batch: int, steps: int,
               memory_format: torch.memory_format) -> Callable[[], float]:
    """A warmed-up closure that times ``steps`` training steps and returns seconds per step."""
    method = make_method(make_net(cfg, shape, memory_format), TrainConfig(method=method_name))
    return step_timer(method, *make_batch(batch, shape, memory_format), steps)


def make_conv_round(cfg: ModelConfig, shape, batch: int, steps: int, input_grad: bool) -> Callable[[], float]:
    """A warmed-up closure that times ``steps`` passes of a step's convolutions alone (channels_last):
    for each layer, forward, then weight and bias gradients, and, when ``input_grad``, the input
    gradient of every layer but the first (whose input needs none, in BP too)."""
    g = torch.Generator().manual_seed(0)
    convs = []
    for i, layer in enumerate(make_net(cfg, shape).layers):
        s, w = layer.spec, layer.conv.weight.detach()
        h = channels_last(torch.randn(batch, s.in_channels, s.height, s.width, generator=g))   # B, C_in, H, W
        gz = channels_last(torch.randn(batch, s.channels, s.height, s.width, generator=g))     # B, C, H, W
        pad = list(layer.conv.padding)
        convs.append((h, w, layer.conv.bias.detach(), gz, pad, [input_grad and i > 0, True, True]))

    def one_pass() -> None:
        for h, w, b, gz, pad, mask in convs:
            F.conv2d(h, w, b, padding=pad)
            torch.ops.aten.convolution_backward(gz, h, w, [w.shape[0]], [1, 1], pad, [1, 1], False, [0, 0], 1, mask)

    one_pass()

    def one_round() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            one_pass()
        return (time.perf_counter() - t0) / steps

    return one_round


def paired(times: dict, a, b) -> list[float]:
    """Per-round ratios of a's time to b's."""
    return [t_a / t_b for t_a, t_b in zip(times[a], times[b])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg8")
    add_args(p)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    shape = parse_shape(a.input_shape)
    cfg = ModelConfig(arch=a.model, width=a.width)
    keys = [(m, f) for f in FORMATS for m in ("asge", "bp")]
    rounds = {k: make_round(k[0], cfg, shape, a.batch_size, a.steps, FORMATS[k[1]]) for k in keys}
    times = alternate(rounds, a.rounds)
    # The convolutions alone, afterwards: their tensors would change the heap the steps run on.
    del rounds
    convs = {(m, "convs only"): make_conv_round(cfg, shape, a.batch_size, a.steps, input_grad=m == "bp")
             for m in ("asge", "bp")}
    times.update(alternate(convs, a.rounds))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.model} width {a.width}, input {a.input_shape}, batch {a.batch_size}, "
          f"{a.rounds} rounds x {a.steps} steps, CPU threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{'method':<6} {'memory format':<14} {'median step (ms)':>17} {'min (ms)':>9} {'max (ms)':>9}")
    for k in times:
        print(f"{k[0]:<6} {k[1]:<14} {1e3 * med[k]:>17.1f} {1e3 * min(times[k]):>9.1f} {1e3 * max(times[k]):>9.1f}")
    for f in FORMATS:
        ratios = paired(times, ("asge", f), ("bp", f))
        ratio = statistics.median(ratios)
        print(f"ASGE / BP step time, {f}: {ratio:.3f} median of {len(ratios)} paired rounds "
              f"(range {min(ratios):.3f}-{max(ratios):.3f}; target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'})")
    ratios = paired(times, ("asge", "convs only"), ("bp", "convs only"))
    print(f"The convolutions alone, ASGE / BP: {statistics.median(ratios):.3f} median "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}): what the kernels alone give")
    for m in ("asge", "bp"):
        print(f"{m}: contiguous / channels_last step time: {med[(m, 'contiguous')] / med[(m, 'channels_last')]:.2f}x")


if __name__ == "__main__":
    main()
