"""What ``asge-edge export`` and ``asge-edge infer`` do, as library calls.

Contract: ``export_run(run_dir, opts)`` reads a finished ASGE run (model.safetensors,
config.json, summary.json) and writes, without being asked for more:
- the Best-Pred early exit (``--early-exit``; layer ``--exit-layer`` or the run's best
  layer, chosen on validation) or the whole net with its Fusion head, as one ONNX file
  (``opts.out``, or its default name inside ``opts.out`` where that is a folder or ends in "/");
  then runs the full ONNX checker, compares ONNX Runtime with the PyTorch network at
  batch 1 and 17 against ``verify.tolerance`` of the logits' scale (``verify.logit_scale``):
  ONNX_RTOL, or with ``--half`` HALF_RTOL_PER_CONV per convolution on the path; and measures
  ONNX Runtime's latency per image. ``--format tensorrt`` then checks the graph against
  TensorRT's op set and builds an engine, or stops with the trtexec command (exit 2);
- or, with ``--exits``, a cascade directory (cascade.py), each exit's logits through the
  chain of stages compared with the PyTorch network's as above (``exit_parity``, against the
  tolerance of the exit's depth), its threshold calibrated on the
  validation split when ``--threshold auto`` (on as many of its images, evenly spaced, as
  fit in CALIBRATION_BYTES in fp32: all of them but for large folder datasets);
- or, with ``--format c --early-exit``, model.bin and model.h for firmware_sim (to_c.py),
  reporting the arena (RAM) and model (flash) bytes.
It returns a report dict; ``report["ok"]`` is False when a parity check failed.
``infer(model_or_cascade, images)`` runs a .onnx file or a cascade directory on images
(inputs.py) with ONNX Runtime and returns predictions (and, for a folder, its files' names).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from asge_edge import __version__
from asge_edge.checkpoint import RUN_FILES, load_run, read_json, write_json
from asge_edge.config import is_number
from asge_edge.data import default_workers, load_splits, split_tensors, spread
from asge_edge.errors import UserError

from . import cascade as cas
from .graph import FusionNet, Stage
from .inputs import load_images
from .tensorrt import build_engine, compatibility_problems
from .to_c import write_c_model
from .to_onnx import DEFAULT_OPSET, export_onnx, read_metadata
from .verify import latency_ms, parity, runner, session, tolerance

FORMATS = ("onnx", "tensorrt", "c")
INFER_BATCH = 256
CALIBRATION_BYTES = 2 ** 29   # fp32 pixels of the validation images that calibrate a cascade, at most


@dataclass(frozen=True)
class ExportOptions:
    early_exit: bool = False
    exit_layer: int | None = None
    fmt: str = "onnx"
    opset: int = DEFAULT_OPSET
    half: bool = False
    out: Path | str | None = None     # a str keeps a trailing "/": a folder, made if missing
    exits: str | None = None          # cascade: "all" or "1,3,5"
    threshold: str = "auto"           # cascade: "auto" or a number in (0, 1]
    data_root: str | None = None      # the dataset's root, where it is not the run's (cascade calibration)


def _metadata(cfg, summary: dict, strategy: str, exit_layer: int | None, val_accuracy: float, half: bool) -> dict:
    info = cfg.info
    return {"asge_edge_version": __version__, "model": cfg.model.arch, "width": cfg.model.width,
            "alpha": cfg.model.alpha, "strategy": strategy, "best_layer": summary["best_layer"],
            "exit_layer": exit_layer, "class_names": list(info.class_names), "input_shape": list(info.input_shape),
            "normalization": {"mean": list(info.mean), "std": list(info.std)}, "val_accuracy": val_accuracy,
            "precision": "fp16" if half else "fp32"}


def load_asge_run(run_dir: Path, data_root: str | None = None):
    """(config, network in eval mode, summary.json) of a finished ASGE run, or UserError;
    ``data_root`` replaces the config's dataset root where given."""
    cfg, net, _ = load_run(run_dir, data_root)
    if cfg.train.method != "asge":
        raise UserError(f"{run_dir} was trained with --method {cfg.train.method}; export needs an ASGE run, whose "
                        "layers have trained exits")
    summary_path = Path(run_dir) / "summary.json"
    if not summary_path.is_file():
        raise UserError(f"{run_dir} has no summary.json (the run did not finish); finish it with "
                        f"'asge-edge train --resume --out {run_dir}' first")
    summary = read_json(summary_path)
    if not _summary_fits(summary, len(net.layers)):
        raise UserError(f"{summary_path} does not hold this run's best_layer, layer_val_accuracy and val_accuracy; "
                        f"write it again with 'asge-edge train --resume --out {run_dir}'")
    return cfg, net.eval(), summary


def _summary_fits(summary: Any, n: int) -> bool:
    """Whether a summary.json holds what export reads of it, for a net of ``n`` layers."""
    return (isinstance(summary, dict) and isinstance(summary.get("best_layer"), int)
            and 1 <= summary["best_layer"] <= n
            and isinstance(summary.get("layer_val_accuracy"), list) and len(summary["layer_val_accuracy"]) == n
            and all(is_number(v) for v in summary["layer_val_accuracy"])
            and isinstance(summary.get("val_accuracy"), dict) and is_number(summary["val_accuracy"].get("fusion")))


def export_run(run_dir: Path, opts: ExportOptions) -> dict[str, Any]:
    """Export a run; see the module docstring. Raises UserError on bad input."""
    if opts.fmt not in FORMATS:
        raise UserError(f"unknown --format {opts.fmt!r}: use onnx, tensorrt or c")
    if opts.exits is None and opts.threshold != "auto":
        raise UserError("--threshold sets a cascade's exit confidence; add --exits (all, or the layers such as 2,4)")
    if opts.fmt == "c" and opts.half:
        raise UserError("--format c writes fp32 weights, which firmware_sim computes with; drop --half")
    cfg, net, summary = load_asge_run(Path(run_dir), opts.data_root)
    if opts.exits is not None:
        if opts.fmt != "onnx":
            raise UserError(f"a cascade (--exits) exports as ONNX stages only; drop --format {opts.fmt}")
        if opts.early_exit or opts.exit_layer is not None:
            raise UserError("--exits exports a cascade of exits, --early-exit [--exit-layer K] one exit; give one of them")
        return _export_cascade(Path(run_dir), cfg, net, summary, opts)
    n = len(net.layers)
    if opts.exit_layer is not None and not opts.early_exit:
        raise UserError("--exit-layer picks the early exit; add --early-exit")
    if opts.fmt == "c" and not opts.early_exit:
        raise UserError("--format c exports the early-exit network; add --early-exit")
    k = opts.exit_layer or summary["best_layer"]   # the early exit's layer
    if opts.early_exit and not 1 <= k <= n:
        raise UserError(f"--exit-layer {k} is out of range: this network has layers 1..{n}")
    shape = tuple(cfg.info.input_shape)
    if opts.fmt == "c":
        out = Path(opts.out) if opts.out else Path(run_dir) / "firmware"
        _make_dir(out)
        return {**write_c_model(net, k, out, str(run_dir)), "ok": True}
    if opts.early_exit:
        module, reference = Stage(net, 0, k, half=opts.half), (lambda x: net.exit_logits(x, k))
        val = summary["layer_val_accuracy"][k - 1]
        meta = _metadata(cfg, summary, "best", k, val, opts.half)
        default = f"model_exit{k}{'_fp16' if opts.half else ''}.onnx"
    else:
        module, reference = FusionNet(net, half=opts.half), (lambda x: net(x).fusion)
        meta = _metadata(cfg, summary, "fusion", None, summary["val_accuracy"]["fusion"], opts.half)
        default = f"model_fusion{'_fp16' if opts.half else ''}.onnx"
    path = Path(opts.out) if opts.out else Path(run_dir) / default
    if path.is_dir() or str(opts.out).endswith("/"):   # a folder to put the model in, as --format c's --out is
        path = path / default
    if path.resolve() in {(Path(run_dir) / name).resolve() for name in RUN_FILES}:
        raise UserError(f"--out {path} is the run's own {path.name}, which the ONNX file would overwrite; "
                        f"give another name, such as {Path(run_dir) / default}")
    _make_dir(path.parent)
    t0 = time.perf_counter()
    model = export_onnx(module, shape, path, "images", ["logits"], opts.opset, meta)
    diffs, scale = parity(runner(path), reference, shape)
    tol = tolerance(opts.half, len(module.layers))
    report = {"onnx": str(path), "bytes": path.stat().st_size, "export_seconds": time.perf_counter() - t0,
              "strategy": meta["strategy"], "exit_layer": meta["exit_layer"], "val_accuracy": meta["val_accuracy"],
              "parity_max_abs_diff": diffs, "parity_logit_scale": scale,
              "tolerance": tol, "ok": max(diffs.values()) <= tol * scale,
              "ort_ms_per_image": latency_ms(path, shape)}
    if opts.fmt == "tensorrt":
        problems = compatibility_problems(model)
        if problems:
            raise UserError(f"{path} is not TensorRT-ready: {'; '.join(problems)}")
        engine = path.with_suffix(".engine")
        report["tensorrt"] = build_engine(path, engine, "images", shape)
    return report


def _make_dir(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {d} ({e.strerror}); choose another --out") from None


def _calibration_images(split, input_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The validation images that calibrate a cascade: all of them where their fp32 pixels fit
    in CALIBRATION_BYTES, else as many as fit, evenly spaced over the split (data.spread)."""
    x, y = split_tensors(spread(split, max(1, CALIBRATION_BYTES // (4 * math.prod(input_shape)))), default_workers())
    return x.numpy(), y.numpy()


def _export_cascade(run_dir: Path, cfg, net, summary: dict, opts: ExportOptions) -> dict[str, Any]:
    exits = cas.parse_exits(opts.exits, len(net.layers))
    out = Path(opts.out) if opts.out else run_dir / "cascade"
    _make_dir(out)
    if opts.threshold != "auto":
        try:
            threshold = float(opts.threshold)
        except ValueError:
            threshold = -1.0
        if not 0 < threshold <= 1:
            raise UserError(f"--threshold {opts.threshold!r}: give auto or a number in (0, 1]")
    meta = _metadata(cfg, summary, "cascade", None, None, opts.half)
    spec = cas.write_stages(net, exits, out, opts.opset, opts.half, meta)
    stages = cas.Cascade(out, spec=spec)
    parities = [_exit_parity(stages, i, net, opts.half, tuple(cfg.info.input_shape)) for i in range(len(exits))]
    report: dict[str, Any] = {"cascade": str(out), "exits": list(exits), "exit_parity": parities}
    if opts.threshold == "auto":
        images, labels = _calibration_images(load_splits(cfg.data).val, tuple(cfg.info.input_shape))
        logits = np.concatenate([stages.all_exits(images[i:i + INFER_BATCH])
                                 for i in range(0, len(images), INFER_BATCH)], axis=1)   # S, B, N
        target = summary["layer_val_accuracy"][summary["best_layer"] - 1]
        threshold, acc, depth = cas.calibrate(logits, labels, list(exits), target)
        report.update(val_best_pred_accuracy=target, val_accuracy=acc, val_mean_exit_depth=depth,
                      calibration_images=len(labels))
    spec["threshold"] = threshold
    write_json(out / cas.CASCADE_FILE, spec)
    report["threshold"] = threshold
    report["ok"] = all(p["ok"] for p in parities)
    return report


def _exit_parity(stages: cas.Cascade, i: int, net, half: bool, shape: tuple[int, int, int]) -> dict[str, Any]:
    """The cascade's exit i (0-based) through its chain of stages against the PyTorch network."""
    k = stages.exits[i]
    diffs, scale = parity(lambda x: stages.all_exits(x)[i], lambda x: net.exit_logits(x, k), shape)
    tol = tolerance(half, k)
    return {"exit_layer": k, "max_abs_diff": diffs, "logit_scale": scale, "tolerance": tol,
            "ok": max(diffs.values()) <= tol * scale}


def infer(target: Path, images_path: Path, threshold: float | None = None) -> dict[str, Any]:
    """Predictions of a .onnx model or a cascade directory on images; see the module docstring."""
    target = Path(target)
    if target.is_dir():
        if not (target / cas.CASCADE_FILE).is_file():
            raise UserError(f"{target} is a directory without {cas.CASCADE_FILE}; pass a .onnx file or a cascade directory")
        runner = cas.Cascade(target)
        meta = runner.spec
        images, files = load_images(images_path, tuple(meta["input_shape"]))
        t = runner.spec["threshold"] if threshold is None else threshold
        t0 = time.perf_counter()
        parts = [runner.run(images[i:i + INFER_BATCH], t) for i in range(0, len(images), INFER_BATCH)]
        seconds = time.perf_counter() - t0
        logits = np.concatenate([p.logits for p in parts])
        exit_layer = np.concatenate([p.exit_layer for p in parts])
        extra = {"exit_layer": exit_layer.tolist(), "mean_exit_depth": float(exit_layer.mean()), "threshold": t}
    else:
        if not target.is_file():
            raise UserError(f"{target} does not exist; pass a .onnx file or a cascade directory")
        if threshold is not None:
            raise UserError(f"--threshold sets a cascade's exit confidence, and {target} is one model; "
                            "drop --threshold, or pass a cascade directory")
        meta = read_metadata(target)
        if "input_shape" not in meta:
            raise UserError(f"{target} carries no asge-edge metadata; export it with 'asge-edge export'")
        meta = {k: json.loads(v) if k in ("input_shape", "class_names") else v for k, v in meta.items()}
        images, files = load_images(images_path, tuple(meta["input_shape"]))
        sess = session(target)
        t0 = time.perf_counter()
        logits = np.concatenate([sess.run(None, {"images": images[i:i + INFER_BATCH]})[0]
                                 for i in range(0, len(images), INFER_BATCH)])
        seconds = time.perf_counter() - t0
        extra = {}
    preds = logits.argmax(1)
    names = meta["class_names"]
    return {"predictions": preds.tolist(), "classes": [names[p] for p in preds], "images": len(preds),
            "ms_per_image": 1e3 * seconds / max(1, len(preds)), **({"files": files} if files else {}), **extra}
