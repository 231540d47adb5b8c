"""The synthetic workload the training benches share: one network and one seeded batch.

Contract: ``add_args(parser)`` adds --width, --input-shape and --batch-size with the
given defaults (parse --input-shape with asge_edge.cli.parse_shape); ``make_net(cfg, shape)``
builds an ASGENet for 10 classes with fixed normalisation, in ``memory_format``;
``make_batch(n, shape)`` gives seeded uint8 pixels (n, C, H, W), as data.batches yields
them, laid out as the trainer lays them out (device.channels_last) or contiguous, and
labels (n,). Same arguments, same tensors.
``add_device_args(parser)`` adds --device and --amp, which ``device_and_precision(args)``
turns into the torch.device and the precision name (fp32, bf16, fp16) that Method takes.
"""

from __future__ import annotations

import argparse

import torch

from asge_edge.config import ModelConfig
from asge_edge.device import AMP_MODES, DEVICES, channels_last, resolve_device, resolve_precision
from asge_edge.models import ASGENet

NUM_CLASSES = 10


def add_args(p: argparse.ArgumentParser, width: float = 0.25, shape: str = "1x28x28") -> None:
    p.add_argument("--width", type=float, default=width)
    p.add_argument("--input-shape", default=shape)
    p.add_argument("--batch-size", type=int, default=128)


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--amp", default="off", choices=AMP_MODES)


def device_and_precision(a: argparse.Namespace) -> tuple[torch.device, str]:
    """The trainer's own resolution of --device and --amp (device.py)."""
    device = resolve_device(a.device)
    return device, resolve_precision(a.amp, device)


def make_net(cfg: ModelConfig, shape: tuple[int, int, int],
             memory_format: torch.memory_format = torch.channels_last) -> ASGENet:
    return ASGENet(cfg, shape, NUM_CLASSES, (0.5,) * shape[0], (0.25,) * shape[0]).to(memory_format=memory_format)


def make_batch(n: int, shape: tuple[int, int, int], memory_format: torch.memory_format = torch.channels_last
               ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(256, (n, *shape), generator=g, dtype=torch.uint8)   # n, C, H, W
    y = torch.randint(NUM_CLASSES, (n,), generator=g)         # n
    return (channels_last(x) if memory_format == torch.channels_last else x.contiguous()), y
