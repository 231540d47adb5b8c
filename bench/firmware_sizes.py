"""RAM (arena) and flash (model.bin) bytes that firmware_sim needs, per architecture, width and exit.

From the planners alone (export/to_c.py: arena_bytes, model_bin), no training: the
numbers docs/FIRMWARE.md quotes. Weights are random; sizes do not depend on them.

    python bench/firmware_sizes.py [--model vgg8|vgg11|LAYER-LIST] [--widths 0.25,0.5,1.0]
"""

from __future__ import annotations

import argparse

from asge_edge.config import ModelConfig
from asge_edge.models import ASGENet
from export.to_c import arena_bytes, model_bin

SHAPES = {"fashion-mnist/mnist 1x28x28": (1, 28, 28), "cifar 3x32x32": (3, 32, 32)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg8")
    p.add_argument("--widths", default="0.25,0.5,1.0")
    a = p.parse_args()
    print(f"{'input':<28} {'width':>5} {'exit':>4} {'arena (RAM)':>12} {'model (flash)':>14}")
    for name, shape in SHAPES.items():
        for w in (float(v) for v in a.widths.split(",")):
            net = ASGENet(ModelConfig(arch=a.model, width=w), shape, 10, (0.5,) * shape[0], (0.25,) * shape[0])
            for k in range(1, len(net.layers) + 1):
                print(f"{name:<28} {w:>5} {k:>4} {arena_bytes(net.specs, k):>12,} {len(model_bin(net, k)):>14,}")


if __name__ == "__main__":
    main()
