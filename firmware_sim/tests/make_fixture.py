"""Write the golden fixture of CTest's fsim_ort_parity from a trained run, with ONNX Runtime.

    python firmware_sim/tests/make_fixture.py RUN_DIR [--exit-layer 3] [--images 8] [--out firmware_sim/tests/data]

Writes model.bin (export/to_c.py), input.f32 (the run's first test images), layer<k>.f32
(ONNX Runtime's output of every layer before the exit, all images) and logits.f32. The
committed fixture came from the synthetic run of tests/conftest.py's TINY_RUN:
    asge-edge train --dataset synthetic --input-shape 1x16x16 --num-classes 4 --train-size 768 \\
        --width 0.125 --epochs 3 --batch-size 64 --out /tmp/tiny
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from asge_edge.checkpoint import atomic_write, load_run
from asge_edge.data import load_splits
from export.graph import LayerTrace
from export.to_c import model_bin
from export.to_onnx import export_onnx
from export.verify import session


def write_fixture(run_dir: Path, k: int, n: int, out: Path) -> None:
    cfg, net, _ = load_run(run_dir)
    net.eval()
    out.mkdir(parents=True, exist_ok=True)
    x = (load_splits(cfg.data).test.images[:n].float() / 255).numpy()
    names = [f"layer{i}" for i in range(1, k)] + ["logits"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.onnx"
        export_onnx(LayerTrace(net, k), tuple(cfg.info.input_shape), path, "images", names, 18, {})
        outputs = session(path).run(None, {"images": x})
    atomic_write(out / "model.bin", model_bin(net, k))
    atomic_write(out / "input.f32", x.astype("<f4").tobytes())
    for name, value in zip(names, outputs):
        atomic_write(out / f"{name}.f32", np.ascontiguousarray(value, dtype="<f4").tobytes())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--exit-layer", type=int, default=3)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    a = p.parse_args()
    write_fixture(a.run_dir, a.exit_layer, a.images, a.out)


if __name__ == "__main__":
    main()
