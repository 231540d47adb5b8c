#!/usr/bin/env python3
"""Run a TensorRT engine on a batch, by tensor name, with execute_async_v3 (for the Jetson).

Standalone: needs only tensorrt (10.x), numpy and cuda-python, all present in JetPack 6
images, not asge-edge. Copy it beside the engine.

    python3 trt_runner.py model.engine images.npy [--out logits.npy]

images.npy holds raw [0, 1] pixels, float32, shape (B, C, H, W), with B within the
engine's optimisation profile. Prints the argmax class of each image and, with --out,
saves the logits. Not yet run on a device (docs/DEPLOY.md).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import tensorrt as trt

try:   # cuda-python >= 12.6 moved the bindings
    from cuda.bindings import runtime as cudart
except ImportError:
    from cuda import cudart


def _check(result):
    err, *rest = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def run(engine_path: str, batch: np.ndarray) -> dict[str, np.ndarray]:
    """Run the engine on ``batch``; return every output by tensor name."""
    logger = trt.Logger(trt.Logger.WARNING)
    with open(engine_path, "rb") as f:
        engine = trt.Runtime(logger).deserialize_cuda_engine(f.read())
    if engine is None:
        raise RuntimeError(f"{engine_path}: not an engine for this GPU and TensorRT version; rebuild it here")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    context.set_input_shape(inputs[0], batch.shape)
    stream = _check(cudart.cudaStreamCreate())
    host, device = {}, {}
    for name in names:
        dtype = trt.nptype(engine.get_tensor_dtype(name))
        host[name] = np.ascontiguousarray(batch.astype(dtype)) if name in inputs else \
            np.empty(tuple(context.get_tensor_shape(name)), dtype=dtype)
        device[name] = _check(cudart.cudaMalloc(host[name].nbytes))
        context.set_tensor_address(name, device[name])
    for name in inputs:
        _check(cudart.cudaMemcpyAsync(device[name], host[name].ctypes.data, host[name].nbytes,
                                      cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
    if not context.execute_async_v3(stream):
        raise RuntimeError("execute_async_v3 failed")
    outputs = [n for n in names if n not in inputs]
    for name in outputs:
        _check(cudart.cudaMemcpyAsync(host[name].ctypes.data, device[name], host[name].nbytes,
                                      cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
    _check(cudart.cudaStreamSynchronize(stream))
    for ptr in device.values():
        _check(cudart.cudaFree(ptr))
    _check(cudart.cudaStreamDestroy(stream))
    return {name: host[name] for name in outputs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engine")
    p.add_argument("images", help=".npy of float32 (B, C, H, W) in [0, 1]")
    p.add_argument("--out", help="save the logits here (.npy)")
    a = p.parse_args()
    batch = np.load(a.images, allow_pickle=False)
    if batch.ndim != 4:
        print(f"trt_runner: {a.images} has shape {batch.shape}; expected (B, C, H, W)", file=sys.stderr)
        return 2
    logits = run(a.engine, batch)["logits"]
    print(" ".join(str(int(c)) for c in logits.argmax(1)))
    if a.out:
        np.save(a.out, logits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
