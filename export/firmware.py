"""firmware_sim from Python: build the C runtime, run it, compare it with ONNX Runtime.

Contract:
- ``build_fsim(build_dir)`` configures and builds the root CMakeLists.txt (Release, -O3)
  when the fsim binary is missing or older than its sources, and returns the binary.
- ``run_fsim(binary, model_bin, images)`` runs it on a float32 batch (B, C, H, W) and
  returns (logits (B, N), microseconds per image, arena bytes it used); with
  ``dump_prefix`` it also writes every non-exit layer's output.
- ``compare(c, ref)`` gives the normalised MSE and max abs difference.
- ``simulate(run_dir, ram, samples)`` is ``asge-edge simulate``: it exports the run's
  Best-Pred exit to C and to ONNX (under RUN_DIR/firmware), refuses a model whose arena
  exceeds ``ram`` (exit 2), runs ``samples`` test images, evenly spaced over the test split
  (data.spread), through fsim and ONNX Runtime, and reports accuracy, the max abs
  difference, the arena and flash bytes and the microseconds per image; ``ok`` is whether
  fsim's logits are within ``to_c.C_NMSE_TOL`` of ONNX Runtime's and their max abs
  difference within ``verify.tolerance`` (fp32: ONNX_RTOL) of the logits' scale, the bound
  that ONNX Runtime meets against PyTorch. (The ctest fixtures judge the same difference
  absolutely, C_MAX_ABS_TOL: their logits' scale is fixed.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from asge_edge.budget import format_size
from asge_edge.data import default_workers, load_splits, split_tensors, spread
from asge_edge.errors import UserError

from .pipeline import ExportOptions, export_run, load_asge_run
from .to_c import C_NMSE_TOL, arena_bytes, write_c_model
from .verify import logit_scale, session, tolerance

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("CMakeLists.txt", "firmware_sim/src/fsim.c", "firmware_sim/src/fsim_main.c", "firmware_sim/include/fsim.h")


def build_fsim(build_dir: Path | None = None, sanitize: bool = False) -> Path:
    """Build fsim if needed; return the path of the binary."""
    build_dir = Path(build_dir or ROOT / "build" / "fsim")
    binary = build_dir / "fsim"
    newest = max((ROOT / s).stat().st_mtime for s in SOURCES)
    if binary.is_file() and binary.stat().st_mtime >= newest:
        return binary
    if shutil.which("cmake") is None:
        raise UserError("building firmware_sim needs cmake and a C compiler; apt-get install cmake gcc")
    flags = [f"-DFSIM_SANITIZE={'ON' if sanitize else 'OFF'}", "-DCMAKE_BUILD_TYPE=Release"]
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build_dir), *flags], ["cmake", "--build", str(build_dir), "-j2"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["(no output)"]
            raise UserError(f"building firmware_sim failed ({' '.join(cmd[:2])}): {tail[0]}")
    return binary


def run_fsim(binary: Path, model_bin: Path, images: np.ndarray, arena: int | None = None,
             dump_prefix: str | None = None) -> tuple[np.ndarray, float, int]:
    """Run fsim on images (B, C, H, W) float32; return (logits (B, N), us per image, arena bytes)."""
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.f32", Path(tmp) / "out.f32"
        np.ascontiguousarray(images, dtype="<f4").tofile(inp)
        cmd = [str(binary), str(model_bin), str(inp), str(out), "--time"]
        if arena is not None:
            cmd += ["--arena-bytes", str(arena)]
        if dump_prefix is not None:
            cmd += ["--dump-layers", dump_prefix]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"fsim failed ({done.returncode})")
        logits = np.fromfile(out, dtype="<f4").reshape(len(images), -1)
    m = re.search(r"([\d.]+) us/image .* arena (\d+) bytes", done.stdout)
    return logits, float(m.group(1)), int(m.group(2))


def compare(c: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(normalised MSE, max abs difference) of c against ref."""
    c, ref = np.asarray(c, np.float64), np.asarray(ref, np.float64)
    return float(((c - ref) ** 2).sum() / max((ref ** 2).sum(), 1e-30)), float(np.abs(c - ref).max())


def simulate(run_dir: Path, ram: int, samples: int = 1000, exit_layer: int | None = None,
             data_root: str | None = None) -> dict:
    """``asge-edge simulate``; see the module docstring (``data_root``: the dataset's root,
    where it is not the run's)."""
    run_dir = Path(run_dir)
    cfg, net, summary = load_asge_run(run_dir, data_root)
    k = exit_layer or summary["best_layer"]
    if not 1 <= k <= len(net.layers):
        raise UserError(f"--exit-layer {k} is out of range: this network has layers 1..{len(net.layers)}")
    need = arena_bytes(net.specs, k)
    if need > ram:
        raise UserError(f"the exit at layer {k} needs {need} B of RAM for its arena ({format_size(need)}), more "
                        f"than --ram {ram} B; give more --ram or pick a shallower --exit-layer")
    out = run_dir / "firmware"
    sizes = write_c_model(net, k, out, str(run_dir))
    export_run(run_dir, ExportOptions(early_exit=True, exit_layer=k, out=out / "model.onnx", data_root=data_root))
    x, y = (t.numpy() for t in split_tensors(spread(load_splits(cfg.data).test, samples), default_workers()))
    n = len(y)
    logits, us, used = run_fsim(build_fsim(), out / "model.bin", x, arena=ram)
    ref = np.concatenate([session(out / "model.onnx").run(None, {"images": x[i:i + 256]})[0] for i in range(0, n, 256)])
    nmse, max_abs = compare(logits, ref)
    scale, tol = logit_scale(ref), tolerance(False, k)
    return {"exit_layer": k, "samples": n, "accuracy": float((logits.argmax(1) == y).mean()),
            "ort_accuracy": float((ref.argmax(1) == y).mean()), "max_abs_diff_vs_ort": max_abs, "nmse_vs_ort": nmse,
            "logit_scale": scale, "tolerance": tol, "nmse_tolerance": C_NMSE_TOL,
            "ok": max_abs <= tol * scale and nmse <= C_NMSE_TOL,
            "arena_bytes": used, "flash_bytes": sizes["flash_bytes"], "us_per_image": us, "ram_bytes": ram,
            "model_bin": sizes["model_bin"], "model_h": sizes["model_h"]}
