"""A conv's weight gradient, which every ASGE layer must compute, against its forward (CPU).

Claim (issue 2): ASGE's step is bounded below by convolutions' weight gradients, and on
this CPU oneDNN's is already the fastest way to compute them. For each 3x3 conv of the
CPU-sized VGG8 (stride 1, padding 1, batch 128, channels_last) this times, in alternating
rounds (rounds.alternate):
- forward: the conv itself (F.conv2d);
- onednn: the weight gradient as ASGE takes it (aten.convolution_backward, weight only);
- onednn-nchw: the same in NCHW, layout copies included;
- as-forward: dW as a forward conv of the transposed input by the transposed dL/dz
  (batch as the channel to reduce over);
- im2col-gemm: dW = dL/dz (C_out x BHW) @ im2col(h) (BHW x 9 C_in), im2col built in NHWC.
Every variant is checked against onednn before timing. The forward and onednn are also
timed on one thread, for the question of running two layers at once, a thread each,
instead of one layer on both threads (ASGE's layers do not wait on each other): the last
column is (forward + onednn on one thread) / 2 over (forward + onednn on all threads), an
upper bound on that speed-up's reciprocal if the two threads never got in each other's way.
The last line then runs it: the four layers' forward and weight gradient as two
concurrent streams of two layers, a Python thread and one intra-op thread each, against
the four in turn on all threads.

    python bench/wgrad.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Callable

import torch
import torch.nn.functional as F

from rounds import alternate

# (C_in, C_out, H = W) of vgg8 width 0.25 on 1x28x28, the layers that cost the most.
LAYERS = ((32, 64, 28), (64, 64, 14), (64, 128, 14), (128, 128, 7))
BATCH = 128


def onednn(gz: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(gz, h, w, [w.shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                               [False, True, False])[1]   # C_out, C_in, 3, 3


def onednn_nchw(gz: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return onednn(gz.contiguous(), h.contiguous(), w.contiguous())


def as_forward(gz: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    dw = F.conv2d(h.transpose(0, 1), gz.transpose(0, 1), padding=1)   # C_in, C_out, 3, 3
    return dw.transpose(0, 1)                                          # C_out, C_in, 3, 3


def im2col_gemm(gz: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    b, c_in, hh, ww = h.shape
    c_out = gz.shape[1]
    padded = F.pad(h.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))            # B, H+2, W+2, C_in
    cols = padded.unfold(1, 3, 1).unfold(2, 3, 1).reshape(b * hh * ww, c_in * 9)   # BHW, C_in*3*3
    g = gz.permute(0, 2, 3, 1).reshape(b * hh * ww, c_out)                # BHW, C_out
    return (g.t() @ cols).view(c_out, c_in, 3, 3)                         # C_out, C_in, 3, 3


def timed(fn: Callable[[], object], threads: int | None = None) -> Callable[[], float]:
    """A closure that runs ``fn`` (on ``threads`` intra-op threads, if given) and returns ms."""
    def run() -> float:
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        finally:
            torch.set_num_threads(before)
    return run


def layer_work(h: torch.Tensor, gz: torch.Tensor, w: torch.Tensor) -> None:
    """One ASGE layer's convolutions: the forward and the weight gradient."""
    F.conv2d(h, w, padding=1)
    onednn(gz, h, w)


def two_streams(streams: list[list[tuple]]) -> None:
    """Run each stream's layers in a thread of its own, on one intra-op thread each."""
    def run(stream: list[tuple]) -> None:
        for tensors in stream:
            layer_work(*tensors)
    threads = [threading.Thread(target=run, args=(stream,)) for stream in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    variants = {"onednn": onednn, "onednn-nchw": onednn_nchw, "as-forward": as_forward, "im2col-gemm": im2col_gemm}
    print(f"batch {BATCH}, channels_last, CPU threads {torch.get_num_threads()}, torch {torch.__version__}; "
          f"median ms of {a.rounds} rounds")
    print(f"{'C_in->C_out @ HxW':<20} {'forward':>8} " + " ".join(f"{n:>12}" for n in variants)
          + f" {'onednn/forward':>15} {'forward 1T':>11} {'onednn 1T':>10} {'2 layers 1T':>12}")
    g = torch.Generator().manual_seed(0)
    work = []   # (tensors, ms of its forward + weight gradient on one thread) per layer
    for c_in, c_out, s in LAYERS:
        cl = torch.channels_last
        h = torch.randn(BATCH, c_in, s, s, generator=g).contiguous(memory_format=cl)      # B, C_in, H, W
        gz = torch.randn(BATCH, c_out, s, s, generator=g).contiguous(memory_format=cl)    # B, C_out, H, W
        w = torch.randn(c_out, c_in, 3, 3, generator=g).contiguous(memory_format=cl)      # C_out, C_in, 3, 3
        ref = onednn(gz, h, w)
        for name, fn in variants.items():
            torch.testing.assert_close(fn(gz, h, w), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item(), msg=name)
        fns = {"forward": timed(lambda: F.conv2d(h, w, padding=1))}
        fns.update({name: timed(lambda fn=fn: fn(gz, h, w)) for name, fn in variants.items()})
        fns["forward 1T"] = timed(lambda: F.conv2d(h, w, padding=1), threads=1)
        fns["onednn 1T"] = timed(lambda: onednn(gz, h, w), threads=1)
        ms = {name: statistics.median(t) for name, t in alternate(fns, a.rounds).items()}
        paired = (ms["forward 1T"] + ms["onednn 1T"]) / 2 / (ms["forward"] + ms["onednn"])
        print(f"{f'{c_in}->{c_out} @ {s}x{s}':<20} {ms['forward']:>8.1f} "
              + " ".join(f"{ms[n]:>12.1f}" for n in variants) + f" {ms['onednn'] / ms['forward']:>15.2f}"
              + f" {ms['forward 1T']:>11.1f} {ms['onednn 1T']:>10.1f} {paired:>12.2f}")
        work.append(((h, gz, w), ms["forward 1T"] + ms["onednn 1T"]))

    streams: list[list[tuple]] = [[], []]   # largest first, each to the lighter stream
    loads = [0.0, 0.0]
    for tensors, cost in sorted(work, key=lambda item: -item[1]):
        lighter = loads.index(min(loads))
        streams[lighter].append(tensors)
        loads[lighter] += cost
    fns = {"in turn": timed(lambda: [layer_work(*tensors) for tensors, _ in work]),
           "two streams": timed(lambda: two_streams(streams), threads=1)}
    ms = {name: statistics.median(t) for name, t in alternate(fns, a.rounds).items()}
    print(f"all four layers: in turn on {torch.get_num_threads()} threads {ms['in turn']:.1f} ms, as two streams "
          f"(one-thread loads {loads[0]:.0f} and {loads[1]:.0f} ms) {ms['two streams']:.1f} ms: "
          f"{ms['two streams'] / ms['in turn']:.2f}")


if __name__ == "__main__":
    main()
