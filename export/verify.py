"""ONNX Runtime against PyTorch, and ONNX Runtime's latency.

Contract: ``parity`` runs an exported model in ONNX Runtime (CPU; ``runner`` makes the
function for one .onnx file) and a PyTorch reference on the same seeded [0, 1] images at
each batch size and returns the max abs difference of the first output per batch, and the
``logit_scale`` of the reference's logits over all the batches' images; a difference is
within tolerance when it is at most the tolerance times that scale. The scale is the
net's, taken over every image: rounding errors follow the size of the terms a logit sums,
and one image's logits can be small where its terms cancel (a batch of one judged on its
own scale failed correct fp16 exports). ``tolerance`` gives the bound a difference is
judged against, from the named constants below, measured on the CPU-sized VGG8, a
full-width one and random nets (docs/BENCHMARKS.md, export section). ``latency_ms`` is
ONNX Runtime's median time per image at batch 1 on one thread (the embedded case), after
warm-up.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from asge_edge.errors import UserError

PARITY_BATCHES = (1, 17)
# Tolerances are relative to the logits' scale (logit_scale): two runtimes' fp32 convolutions
# round differently, by amounts that grow with the values, and goodness logits have no fixed
# scale: about 10 for the CPU-sized Fashion-MNIST VGG8, where fp32 ONNX Runtime and PyTorch
# differ by ~3e-5 (3e-6 of the scale), and over 400 after one epoch of the full-width VGG8 on
# the synthetic set, where they differ by ~1.3e-3 (the same 3e-6 of the scale).
ONNX_RTOL = 1e-4
# --half: fp16 convs against the fp32 PyTorch network. Each fp16 conv rounds its input and
# weights afresh, so the difference grows with the convs on the path: over 100 random nets
# (bench/export_sweep.py --seed 1 --nets 100 --half) it stayed within 8.0e-4 of the scale
# per conv, where a flat 5e-3 failed 3 of them (at up to 6.6e-3, at exits 9 and 10 of VGG11).
HALF_RTOL_PER_CONV = 2e-3


def tolerance(half: bool, convs: int) -> float:
    """Parity tolerance, relative to logit_scale, of an export that runs ``convs`` convolutions
    (an exit at layer k: k; the Fusion net: all of them): ONNX_RTOL in fp32, and
    HALF_RTOL_PER_CONV per convolution with ``half``."""
    return HALF_RTOL_PER_CONV * convs if half else ONNX_RTOL


def logit_scale(ref: np.ndarray) -> float:
    """max(1, max |ref|): what parity differences are measured against."""
    return max(1.0, float(np.abs(ref).max()))


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU ONNX Runtime session (``threads`` 0: ONNX Runtime's default); a UserError where
    the file is missing or not a model ONNX Runtime can load."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except (ort_errors.NoSuchFile, ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail) as e:
        raise UserError(f"ONNX Runtime cannot load {path} ({type(e).__name__}); export it again") from None


def runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The model at ``path`` in ONNX Runtime as a function: its one input -> its first output."""
    sess = session(path)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def parity(run: Callable[[np.ndarray], np.ndarray], reference: Callable[[torch.Tensor], torch.Tensor],
           input_shape: tuple[int, ...], batches: tuple[int, ...] = PARITY_BATCHES,
           seed: int = 0) -> tuple[dict[int, float], float]:
    """({batch size: max abs difference between ``run`` (ONNX Runtime) and ``reference``}, the
    logit_scale of the reference over every batch)."""
    gen = torch.Generator().manual_seed(seed)
    diffs, refs = {}, []
    for b in batches:
        x = torch.rand(b, *input_shape, generator=gen)                      # B, C, H, W
        with torch.no_grad():
            refs.append(reference(x).float().numpy())                       # B, N
        out = run(x.numpy())                                                # B, N
        diffs[b] = float(np.abs(out - refs[-1]).max())
    return diffs, logit_scale(np.concatenate(refs))


def latency_ms(path: Path, input_shape: tuple[int, ...], runs: int = 50, warmup: int = 5) -> float:
    """Median ONNX Runtime milliseconds per image at batch 1, one thread."""
    sess = session(path, threads=1)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).random((1, *input_shape), dtype=np.float32)
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
