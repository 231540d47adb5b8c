"""Export to C: model.bin and model.h for firmware_sim, and the arena planner.

Contract:
- ``model_bin(net, k)`` is the bytes of model.bin for layers 1..k (the Best-Pred exit at
  k), in the format firmware_sim/src/fsim.c loads: little-endian uint32 header words
  (magic "FSIM", version, layer count, input C/H/W, classes, exit partition P, LayerNorm
  eps as float bits), five words per layer (in_c, out_c, h, w, pool code), then float32:
  input mean and std, each layer's conv weight (packed: ceil(out_c/6) tiles of K x 6,
  K = in_c*9, zero-padded; ``pack_weight``) and bias, and the exit's fixed projection
  ((out_c*P*P) x classes) and bias.
- ``arena_bytes(specs, k)`` mirrors ``fsim_arena_bytes`` exactly (tests pin the two
  together): two ping-pong buffers for the tensors handed between layers (even-numbered
  tensors in one, odd in the other) plus the largest layer's scratch (one K-block of the
  im2col strip + conv strip + exit goodness), each rounded to 16 bytes, plus 16 for the
  arena's alignment.
- ``write_c_model`` writes model.bin and model.h (model.bin as a const uint32_t array,
  with FSIM_ARENA_BYTES and FSIM_MODEL_BYTES) atomically; returns their sizes.
Only presets whose exit patches divide the activation evenly are supported.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from asge_edge.checkpoint import atomic_write
from asge_edge.errors import UserError
from asge_edge.models import LN_EPS, ASGENet, LayerSpec

MAGIC, VERSION = 0x4D495346, 1
ALIGN, NR = 16, 16                         # fsim.c: FSIM_ALIGN, GEMM panel width NR
TILE = 6                                   # fsim.h: FSIM_TILE, output channels per packed weight tile
KC = 256                                   # fsim.c: rows of K per im2col block
POOL_CODES = {None: 0, "rms": 1, "avg": 2, "max": 3}
# Parity of the C runtime against ONNX Runtime (firmware_sim/tests/tolerances.h repeats them).
C_MAX_ABS_TOL = 1e-3
C_NMSE_TOL = 1e-7


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def arena_bytes(specs: Sequence[LayerSpec], k: int) -> int:
    """Arena bytes fsim_run needs for the exit at layer k (1-based)."""
    layers = specs[:k]
    first = layers[0]
    tensors = [first.in_channels * first.height * first.width] + [
        s.channels * s.out_height * s.out_width for s in layers[:-1]]
    a = max(tensors[0::2])
    b = max(tensors[1::2], default=0)
    worst = 0
    for i, s in enumerate(layers):
        exit_layer = i == k - 1
        rows = 2 if (s.pool and not exit_layer) else max(1, min(s.height, NR // s.width))   # fsim.c: strip_rows
        im2col = min(s.in_channels * 9, KC) * (-(-rows * s.width // NR) * NR)   # one K-block, whole panels
        strip = s.channels * rows * s.width if (exit_layer or s.pool) else 0
        goodness = s.channels * s.partition ** 2 if exit_layer else 0
        worst = max(worst, _align(4 * im2col) + _align(4 * strip) + _align(4 * goodness))
    return _align(4 * a) + (_align(4 * b) if b else 0) + worst + ALIGN


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """Conv weight (C, C_in, 3, 3) -> fsim's packed tiles: ceil(C/TILE) x K x TILE, zero-padded."""
    c = w.shape[0]
    flat = w.float().cpu().contiguous().reshape(c, -1)                            # C, K
    padded = torch.zeros(-(-c // TILE) * TILE, flat.shape[1])
    padded[:c] = flat
    return padded.reshape(-1, TILE, flat.shape[1]).transpose(1, 2).flatten()     # tiles x K x TILE


def model_bin(net: ASGENet, k: int) -> bytes:
    """model.bin for the early exit at layer k; see the module docstring."""
    specs = net.specs[:k]
    last = specs[-1]
    if not last.even_patches:
        raise UserError(f"layer {k}'s {last.partition}x{last.partition} patches do not divide its "
                        f"{last.height}x{last.width} output; firmware_sim supports even patches only (pick another --exit-layer)")
    c, h, w = specs[0].in_channels, specs[0].height, specs[0].width
    words = [MAGIC, VERSION, k, c, h, w, last.num_classes, last.partition, struct.unpack("<I", struct.pack("<f", LN_EPS))[0]]
    for s in specs:
        words += [s.in_channels, s.channels, s.height, s.width, POOL_CODES[s.pool]]
    floats = [net.mean.flatten(), net.std.flatten()]
    for layer in net.layers[:k]:
        floats += [pack_weight(layer.conv.weight.detach()), layer.conv.bias.detach().flatten()]
    floats += [net.layers[k - 1].proj_w.flatten(), net.layers[k - 1].proj_b.flatten()]
    body = np.concatenate([f.float().cpu().numpy() for f in floats]).astype("<f4")
    return np.asarray(words, dtype="<u4").tobytes() + body.tobytes()


def model_header(data: bytes, arena: int, source: str) -> str:
    """model.h: model.bin as a const uint32_t array, plus FSIM_ARENA_BYTES and FSIM_MODEL_BYTES."""
    words = np.frombuffer(data, dtype="<u4")
    lines = [",".join(f"0x{v:08x}u" for v in words[i:i + 8]) for i in range(0, len(words), 8)]
    body = ",\n    ".join(lines)
    return (f"/* Generated by asge-edge export --format c from {source}. Do not edit.\n"
            f" * Load with fsim_model_load(&model, fsim_model_data, FSIM_MODEL_BYTES); give fsim_run an\n"
            f" * arena of FSIM_ARENA_BYTES. */\n"
            f"#ifndef FSIM_MODEL_H\n#define FSIM_MODEL_H\n\n#include <stdint.h>\n\n"
            f"#define FSIM_ARENA_BYTES {arena}u\n#define FSIM_MODEL_BYTES {len(data)}u\n\n"
            f"static const uint32_t fsim_model_data[{len(words)}] = {{\n    {body}\n}};\n\n#endif /* FSIM_MODEL_H */\n")


def write_c_model(net: ASGENet, k: int, out_dir: Path, source: str) -> dict:
    """Write model.bin and model.h for the exit at layer k into ``out_dir``; return the sizes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = model_bin(net, k)
    arena = arena_bytes(net.specs, k)
    atomic_write(out_dir / "model.bin", data)
    atomic_write(out_dir / "model.h", model_header(data, arena, source).encode())
    return {"model_bin": str(out_dir / "model.bin"), "model_h": str(out_dir / "model.h"), "exit_layer": k,
            "arena_bytes": arena, "flash_bytes": len(data)}
