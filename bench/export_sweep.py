"""ONNX and firmware_sim parity over random nets: the exporters' checks, fuzzed.

Claim (issues 4 and 5): for any net the trainer builds, the early exit at any layer exports
to ONNX within ``verify.tolerance`` of PyTorch (fp32, or fp16 convs with ``--half``), the
Fusion net too, and firmware_sim runs the fp32 exit within its planned arena
(``to_c.arena_bytes``, given as the exact arena) and within ``C_NMSE_TOL`` and ONNX_RTOL of
the logits' scale of ONNX Runtime. Draws ``--nets`` untrained nets, seeded by ``--seed``:
vgg8 or vgg11, widths 0.03 to 0.25, alpha 0 to 7, every pool, inputs of 1, 3 or 4 channels
and 8 to 40 pixels a side (square or not), 2, 10 or 37 classes, a random exit; fp16 on
about 30% of them (every one with ``--half``, which skips firmware_sim: it runs fp32), and
the Fusion net on about 30%. Prints a line per net with each check's difference over its
tolerance (at most 1 passes), then how many nets passed every check.

    python bench/export_sweep.py [--seed 1] [--nets 40] [--half]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

from asge_edge.config import POOLS, ModelConfig
from asge_edge.models import ASGENet
from export.firmware import build_fsim, compare, run_fsim
from export.graph import FusionNet, Stage
from export.to_c import C_NMSE_TOL, write_c_model
from export.to_onnx import DEFAULT_OPSET, export_onnx
from export.verify import ONNX_RTOL, logit_scale, parity, runner, tolerance


def draw(rng: random.Random, half: bool) -> dict:
    """One random configuration (every field a plain value, printed as drawn)."""
    side = rng.randint(8, 40)
    return {"arch": rng.choice(["vgg8", "vgg11"]), "width": rng.choice([0.03, 0.0625, 0.1, 0.125, 0.2, 0.25]),
            "alpha": rng.choice([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 7.0]), "pool": rng.choice(POOLS),
            "shape": (rng.choice([1, 3, 4]), side, rng.choice([side, rng.randint(8, 40)])),
            "classes": rng.choice([2, 10, 37]), "half": half or rng.random() < 0.3,
            "fusion": rng.random() < 0.3, "exit": rng.random()}


def onnx_ratio(module: torch.nn.Module, reference, shape: tuple[int, int, int], half: bool, path: Path) -> float:
    """Largest ONNX Runtime vs PyTorch difference over its tolerance, over the parity batches."""
    export_onnx(module, shape, path, "images", ["logits"], DEFAULT_OPSET, {})
    tol = tolerance(half, len(module.layers))
    diffs, scale = parity(runner(path), reference, shape)
    return max(diffs.values()) / (tol * scale)


def check(c: dict, seed: int, fsim: Path, tmp: Path) -> dict[str, float]:
    """Each check's difference over its tolerance, for configuration ``c``."""
    shape = c["shape"]
    net = ASGENet(ModelConfig(arch=c["arch"], width=c["width"], alpha=c["alpha"], pool=c["pool"]), shape,
                  c["classes"], (0.5,) * shape[0], (0.25,) * shape[0], seed=seed).eval()
    k = 1 + int(c["exit"] * len(net.layers))
    ratios = {f"exit {k}": onnx_ratio(Stage(net, 0, k, half=c["half"]), lambda x: net.exit_logits(x, k), shape,
                                      c["half"], tmp / "exit.onnx")}
    if c["fusion"]:
        ratios["fusion"] = onnx_ratio(FusionNet(net, half=c["half"]), lambda x: net(x).fusion, shape, c["half"],
                                      tmp / "fusion.onnx")
    if not c["half"]:
        sizes = write_c_model(net, k, tmp / "c", "export_sweep")
        x = torch.rand(8, *shape, generator=torch.Generator().manual_seed(seed)).numpy()   # B, C, H, W
        logits, _, _ = run_fsim(fsim, tmp / "c" / "model.bin", x, arena=sizes["arena_bytes"])
        ref = runner(tmp / "exit.onnx")(x)                                                # B, N
        nmse, max_abs = compare(logits, ref)
        ratios["fsim"] = max(nmse / C_NMSE_TOL, max_abs / (ONNX_RTOL * logit_scale(ref)))
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--nets", type=int, default=40)
    p.add_argument("--half", action="store_true", help="export every net with fp16 convs")
    a = p.parse_args()
    rng, fsim = random.Random(a.seed), build_fsim()
    print(f"{a.nets} random nets, seed {a.seed}, torch {torch.__version__}; difference / tolerance per check")
    passed = 0
    for n in range(a.nets):
        c = draw(rng, a.half)
        with tempfile.TemporaryDirectory() as tmp:
            ratios = check(c, n, fsim, Path(tmp))
        ok = max(ratios.values()) <= 1.0
        passed += ok
        shown = "  ".join(f"{name} {r:.3f}" for name, r in ratios.items())
        print(f"{'ok  ' if ok else 'OVER'} {shown:<40} {c}", flush=True)
    print(f"{passed} of {a.nets} nets within every check's tolerance")


if __name__ == "__main__":
    main()
