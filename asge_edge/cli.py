"""The ``asge-edge`` command line: parses arguments and calls the library.

Contract: no logic lives here beyond turning flags into configs. ``main(argv)``
returns the exit code: 0 on success, 2 on any user error (bad flag, missing data,
unreadable checkpoint), printed as one line ``asge-edge: error: ...`` on stderr with
no traceback, 130 or 143 where SIGINT or SIGTERM stopped a run that saved its state, and
141, silently, where stdout's reader went away (a pipe into ``head``).
Tests call ``main([...])`` in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .config import (METHODS, OPTIMIZERS, POOLS, RESUMABLE, STRATEGIES, DataConfig, ModelConfig, RunConfig,
                     TrainConfig, setting_changes, with_settings)
from .budget import parse_size
from .data import (DATASETS, FOLDER_IMAGE_SIZE, SYNTHETIC_CLASSES, SYNTHETIC_SHAPE, SYNTHETIC_TRAIN_SIZE,
                   default_workers)
from .device import AMP_MODES, DEVICES
from .errors import Interrupted, UserError, out_of_memory
from .presets import EXAMPLE, PRESETS, canonical

SIGPIPE_EXIT = 128 + 13   # what a shell reports for a writer that SIGPIPE stopped, as `yes | head` does
MODEL_HELP = (f"{' or '.join(PRESETS)} (default vgg8), or your own layer list such as {EXAMPLE}: each number a "
              "conv3x3 + ReLU layer of that many channels at --width 1, each P a 2x2 pool (--pool) after it")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit 2 (argparse prints the usage too)."""

    def error(self, message: str):
        raise UserError(f"{message} (see '{self.prog} --help')")


def parse_shape(text: str) -> tuple[int, int, int]:
    """"CxHxW" (as in 3x32x32) -> (C, H, W); an argparse type: bad text raises ArgumentTypeError."""
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CxHxW such as 3x32x32, got {text!r}") from None
    if min(c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"every dimension must be >= 1, got {text!r}")
    return c, h, w


def _int(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
    return v


def _positive_int(text: str) -> int:
    return _int(text, 1)


def _non_negative_int(text: str) -> int:
    return _int(text, 0)


def _seed(text: str) -> int:
    v = _int(text, 0)
    if v >= 2**63:   # torch's generators take a signed 64-bit seed
        raise argparse.ArgumentTypeError(f"must be at most 2^63 - 1 = {2**63 - 1}, got {v}")
    return v


def _float(text: str, low: float, strict: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (v > low if strict else v >= low) or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {low:g}, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    return _float(text, 0.0, strict=True)


def _non_negative_float(text: str) -> float:
    return _float(text, 0.0, strict=False)


def _confidence(text: str) -> float:
    v = _positive_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"expected a softmax confidence in (0, 1], got {text!r}")
    return v


def _momentum(text: str) -> float:
    v = _non_negative_float(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"expected a momentum in [0, 1) (0.9 is usual; 1 or more diverges), got {text!r}")
    return v


def _model(text: str) -> str:
    try:
        return canonical(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_moved_data_root(p: argparse.ArgumentParser) -> None:
    """--data-root for the commands that read a finished run's dataset (eval, export, simulate)."""
    p.add_argument("--data-root", default=None,
                   help="the dataset's root, where it is not the run's (a run moved to another machine)")


def get_args_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="asge-edge", description="Backprop-free ASGE training for memory-starved hardware.")
    p.add_argument("--version", action="version", version=f"asge-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a network layer by layer (or with BP, as a baseline)")
    d = t.add_argument_group("data")
    d.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    d.add_argument("--data-root", default=None, help="dataset root (torchvision layout); fashion-mnist defaults "
                   "to /usr/share/datasets/fashion-mnist")
    d.add_argument("--download", action="store_true", help="download the dataset into --data-root if missing")
    d.add_argument("--val-size", type=_positive_int, default=None, help="validation images held out of train "
                   "(default 10000 for MNIST/F-MNIST, 5000 for CIFAR, 10%% otherwise)")
    d.add_argument("--augment", action="store_true", help="random crop (pad 4) and horizontal flip (CIFAR)")
    d.add_argument("--input-shape", type=parse_shape, default=None,
                   help="synthetic only: CxHxW (default {})".format("x".join(map(str, SYNTHETIC_SHAPE))))
    d.add_argument("--num-classes", type=_positive_int, default=None,
                   help=f"synthetic only: classes (default {SYNTHETIC_CLASSES})")
    d.add_argument("--train-size", type=_positive_int, default=None,
                   help=f"synthetic only: training images (default {SYNTHETIC_TRAIN_SIZE})")
    d.add_argument("--image-size", type=_positive_int, default=None,
                   help=f"imagefolder only: side in pixels (default {FOLDER_IMAGE_SIZE})")
    d.add_argument("--workers", type=_non_negative_int, default=default_workers(),
                   help="imagefolder: DataLoader workers (default: one per CPU core, at most 4)")
    m = t.add_argument_group("model")
    m.add_argument("--model", type=_model, default="vgg8", metavar="ARCH", help=MODEL_HELP)
    m.add_argument("--width", type=_positive_float, default=1.0, help="channel multiplier (0.25: CPU-sized)")
    m.add_argument("--alpha", type=_non_negative_float, default=1.0, help="partition granularity (paper: 1.0)")
    m.add_argument("--pool", default="rms", choices=POOLS)
    o = t.add_argument_group("optimisation")
    o.add_argument("--method", default="asge", choices=METHODS, help="asge (default) or bp, the backprop baseline")
    o.add_argument("--epochs", type=_positive_int, default=TrainConfig.epochs)
    o.add_argument("--batch-size", type=_positive_int, default=TrainConfig.batch_size)
    o.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    o.add_argument("--lr", type=_positive_float, default=None,
                   help="initial lr (default for AdamW: 2e-4 * clamp(100/epochs, 1, cap), the cap 15 where the "
                   "widest layer has up to 128 channels (vgg8 at --width 0.25) and 15 * 128 / channels above, "
                   "i.e. the paper's 2e-4 from 100 epochs on, and at 3 epochs 3e-3 for vgg8 at width 0.25 and "
                   "7.5e-4 at width 1; SGD: 0.05; see docs/RESULTS.md)")
    o.add_argument("--lr-min", type=_positive_float, default=None, help="final lr of the cosine (default 1e-5)")
    o.add_argument("--weight-decay", type=_non_negative_float, default=None, help="default 1e-3 (AdamW), 1e-4 (SGD)")
    o.add_argument("--momentum", type=_momentum, default=TrainConfig.momentum, help="SGD momentum")
    o.add_argument("--head-lr-scale", type=_positive_float, default=TrainConfig.head_lr_scale,
                   help="lr of the Last/Fusion heads over the layers' lr (default 3, see docs/RESULTS.md)")
    o.add_argument("--seed", type=_seed, default=0)
    o.add_argument("--device", default="auto", choices=DEVICES)
    o.add_argument("--amp", default="auto", choices=AMP_MODES, help="mixed precision for the convs: auto = bf16 "
                   "(or fp16 + GradScaler) on a GPU, off on the CPU; goodness, squares and LayerNorm stay fp32")
    o.add_argument("--memory-budget", type=_size, default=None, metavar="SIZE",
                   help="bound the training working set (64MB = 64e6 B, 64MiB = 2^26 B): layers stream "
                   "micro-batches and accumulate gradients to keep the logical batch (see 'asge-edge plan')")
    o.add_argument("--offload", action="store_true", help="GPU: park inactive layers (weights and optimiser state) "
                   "in host memory and bring each to the device in turn, for models larger than the device")
    r = t.add_argument_group("run")
    r.add_argument("--out", type=Path, default=Path("runs/latest"), help="output directory (default runs/latest)")
    r.add_argument("--force", action="store_true", help="overwrite the outputs of a previous run in --out")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, "
                   "with the settings saved in its config.json; --data-root, --device, --memory-budget and "
                   "--offload may change, another flag that would change a setting is refused")
    r.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="N",
                   help="also save the state every N steps (default: at each epoch's end; Ctrl-C and SIGTERM always save)")
    r.add_argument("--quiet", action="store_true", help="no progress bar or tables")

    pl = sub.add_parser("plan", help="show the memory plan of a streaming run (no data needed)")
    pl.add_argument("--model", type=_model, default="vgg8", metavar="ARCH", help=MODEL_HELP)
    pl.add_argument("--width", type=_positive_float, default=1.0)
    pl.add_argument("--alpha", type=_non_negative_float, default=1.0)
    pl.add_argument("--pool", default="rms", choices=POOLS)
    pl.add_argument("--input-shape", type=parse_shape, default=(1, 28, 28), help="CxHxW (default 1x28x28, Fashion-MNIST)")
    pl.add_argument("--num-classes", type=_positive_int, default=10)
    pl.add_argument("--batch-size", type=_positive_int, default=TrainConfig.batch_size)
    pl.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    pl.add_argument("--memory-budget", type=_size, default=None, metavar="SIZE")
    pl.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"), help="compute precision of the convs")
    pl.add_argument("--sweep", action="store_true", help="also list the budget that each number of accumulation "
                    "steps needs (--json always has it)")
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")

    e = sub.add_parser("eval", help="re-evaluate a finished run on its test set")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--strategy", choices=STRATEGIES, default=None, help="one strategy (default: all)")
    e.add_argument("--device", default="auto", choices=DEVICES)
    _add_moved_data_root(e)
    e.add_argument("--workers", type=_non_negative_int, default=default_workers(),
                   help="imagefolder: DataLoader workers (default: one per CPU core, at most 4)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--quiet", action="store_true", help="no progress bars")

    x = sub.add_parser("export", help="export a run: Best-Pred early exit or Fusion net to ONNX/TensorRT, or a cascade")
    x.add_argument("run_dir", type=Path)
    x.add_argument("--early-exit", action="store_true", help="the network cut after its best layer (Best-Pred)")
    x.add_argument("--exit-layer", type=_positive_int, default=None, help="cut after this layer instead (1-based)")
    x.add_argument("--format", default="onnx", choices=("onnx", "tensorrt", "c"), dest="fmt",
                   help="onnx; tensorrt (an engine, or the trtexec command); c (model.bin + model.h for firmware_sim)")
    x.add_argument("--opset", type=_positive_int, default=18)
    x.add_argument("--half", action="store_true",
                   help="onnx, tensorrt and cascades: fp16 convs; squares, goodness and LayerNorm stay fp32")
    x.add_argument("--out", default=None, help="output file, or a folder to write it in (an existing one, or one "
                   "named with a trailing /; c and cascade: always a folder); default in RUN_DIR")
    x.add_argument("--exits", default=None, metavar="all|1,3,5", help="write a multi-exit cascade with these exits")
    x.add_argument("--threshold", default="auto", metavar="auto|0.9",
                   help="cascade: softmax confidence to exit at (auto: calibrated on validation)")
    _add_moved_data_root(x)
    x.add_argument("--json", action="store_true", help="print the report as JSON")

    f = sub.add_parser("simulate", help="run the early exit on firmware_sim (C, static arena) against ONNX Runtime")
    f.add_argument("run_dir", type=Path)
    f.add_argument("--ram", type=_size, required=True, metavar="SIZE", help="RAM for the arena, e.g. 256KB")
    f.add_argument("--samples", type=_positive_int, default=1000,
                   help="test images to run, evenly spaced over the test set (default 1000)")
    f.add_argument("--exit-layer", type=_positive_int, default=None, help="default: the run's best layer")
    _add_moved_data_root(f)
    f.add_argument("--json", action="store_true", help="print the report as JSON")

    i = sub.add_parser("infer", help="predict with an exported model.onnx or cascade directory (ONNX Runtime)")
    i.add_argument("model", type=Path, help="a .onnx file from 'asge-edge export' or a cascade directory")
    i.add_argument("--images", type=Path, required=True,
                   help="an image, a folder of images (any size where the input is square: resized and "
                   "centre-cropped as ImageFolder training does), an IDX file or .npy/.npz")
    i.add_argument("--threshold", type=_confidence, default=None,
                   help="cascade: override its threshold, a softmax confidence in (0, 1]")
    i.add_argument("--json", action="store_true", help="print JSON (predictions included)")
    return p


def _run_config(a: argparse.Namespace) -> RunConfig:
    return RunConfig(
        model=ModelConfig(arch=a.model, width=a.width, alpha=a.alpha, pool=a.pool),
        data=DataConfig(dataset=a.dataset, root=a.data_root, val_size=a.val_size, augment=a.augment,
                        download=a.download, input_shape=a.input_shape, num_classes=a.num_classes,
                        train_size=a.train_size, image_size=a.image_size),
        train=TrainConfig(method=a.method, epochs=a.epochs, batch_size=a.batch_size, optimizer=a.optimizer,
                          lr=a.lr, lr_min=a.lr_min, weight_decay=a.weight_decay, momentum=a.momentum,
                          head_lr_scale=a.head_lr_scale, memory_budget=a.memory_budget, amp=a.amp, offload=a.offload,
                          seed=a.seed, device=a.device),
    )


def _flag(setting: str) -> str:
    """The train flag of a config field."""
    return {"arch": "--model", "root": "--data-root"}.get(setting, "--" + setting.replace("_", "-"))


def _resume_config(a: argparse.Namespace, asked: RunConfig) -> RunConfig:
    """--resume runs on with the run's config.json, but for the config.RESUMABLE settings typed
    (--data-root, --download, --device, --memory-budget, --offload). Any other flag typed with
    another value is refused, not ignored (the same value, as when a command is repeated with
    --resume, is fine)."""
    from .checkpoint import CONFIG_FILE, read_config

    if not (a.out / CONFIG_FILE).is_file():
        return asked   # nothing to resume: the trainer says so
    saved = read_config(a.out)
    typed = [(name, old, new) for name, old, new in setting_changes(saved, asked) if _flag(name) in a.typed]
    changed = [f"{_flag(name)} {new} (the run has {'the default' if old is None else old})"
               for name, old, new in typed if name not in RESUMABLE]
    if changed:
        raise UserError(f"--resume continues {a.out} with the settings in its config.json, which {'; '.join(changed)} "
                        f"would change; drop {'that flag' if len(changed) == 1 else 'those flags'}, or train anew in "
                        "another --out (--data-root, --device, --memory-budget and --offload may change)")
    return with_settings(saved, {name: new for name, _, new in typed})


def _cmd_train(a: argparse.Namespace) -> int:
    from .train import RunOptions, train

    try:
        cfg = _run_config(a)
        if a.resume:
            cfg = _resume_config(a, cfg)
        cfg.lr_range   # raises ValueError where --lr-min is above the initial lr
    except ValueError as e:
        raise UserError(str(e)) from None
    train(cfg, RunOptions(out=a.out, quiet=a.quiet, force=a.force, resume=a.resume, workers=a.workers,
                                     checkpoint_every=a.checkpoint_every or 0))
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import evaluate_run
    from .report import layer_table

    result, specs = evaluate_run(a.run_dir, a.device, a.strategy, a.workers, a.data_root, a.quiet)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(layer_table(specs, result["layer_val_accuracy"], result["layer_test_accuracy"],
                          result["test_accuracy"], result["best_layer"]))
    return 0


def _cmd_plan(a: argparse.Namespace) -> int:
    from .models import layer_specs
    from .planner import BudgetTooSmall, plan_memory
    from .report import plan_table, sweep_table

    model = ModelConfig(arch=a.model, width=a.width, alpha=a.alpha, pool=a.pool)
    precision = "fp32" if a.amp == "off" else a.amp
    try:
        specs = layer_specs(model, a.input_shape, a.num_classes)
        plan = plan_memory(specs, a.input_shape, a.batch_size, a.memory_budget, precision, a.optimizer)
    except BudgetTooSmall as e:
        raise UserError(e.advice(model, a.input_shape, a.num_classes, a.batch_size, precision, a.optimizer)) from None
    except ValueError as e:
        raise UserError(str(e)) from None
    if a.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan_table(plan) + (f"\n\n{sweep_table(plan)}" if a.sweep else ""))
    return 0


def _export_package():
    """The export package, or a one-line error naming the extra that provides it."""
    try:
        import export.pipeline as pipeline
    except ImportError as e:
        raise UserError(f"export needs onnx, onnxruntime and onnxscript ({e.name} is missing); "
                        "pip install 'asge-edge[export]'") from None
    return pipeline


def _cmd_export(a: argparse.Namespace) -> int:
    pipeline = _export_package()
    opts = pipeline.ExportOptions(early_exit=a.early_exit, exit_layer=a.exit_layer, fmt=a.fmt, opset=a.opset,
                                  half=a.half, out=a.out, exits=a.exits, threshold=a.threshold, data_root=a.data_root)
    report = pipeline.export_run(a.run_dir, opts)
    if a.json:
        print(json.dumps(report, indent=2))
    elif "model_bin" in report:
        print(f"early exit at layer {report['exit_layer']} -> {report['model_bin']}, {report['model_h']}: "
              f"arena (RAM) {report['arena_bytes']:,} B, model (flash) {report['flash_bytes']:,} B")
    elif "cascade" in report:
        print(f"cascade of exits {report['exits']} in {report['cascade']}, threshold {report['threshold']:.4g}")
        for p in report["exit_parity"]:
            worst = max(p["max_abs_diff"].values())
            print(f"ONNX Runtime vs PyTorch, exit {p['exit_layer']}: max abs diff {worst:.2e} over batches "
                  f"{', '.join(map(str, p['max_abs_diff']))}, {worst / p['logit_scale']:.1e} of the logit scale "
                  f"{p['logit_scale']:.3g} ({'within' if p['ok'] else 'OVER'} tolerance {p['tolerance']:g})")
        if "val_accuracy" in report:
            print(f"validation: accuracy {100 * report['val_accuracy']:.2f}% (Best-Pred "
                  f"{100 * report['val_best_pred_accuracy']:.2f}%), mean exit depth {report['val_mean_exit_depth']:.2f} layers")
    else:
        what = f"early exit at layer {report['exit_layer']}" if report["exit_layer"] else "Fusion network"
        print(f"{what} -> {report['onnx']} ({report['bytes']:,} B, validation accuracy {100 * report['val_accuracy']:.2f}%)")
        print("onnx.checker (full): passed")
        tol = report["tolerance"]
        for b, d in report["parity_max_abs_diff"].items():
            scale = report["parity_logit_scale"]
            print(f"ONNX Runtime vs PyTorch, batch {b}: max abs diff {d:.2e}, {d / scale:.1e} of the logit scale "
                  f"{scale:.3g} ({'within' if d <= tol * scale else 'OVER'} tolerance {tol:g})")
        print(f"ONNX Runtime latency: {report['ort_ms_per_image']:.3f} ms per image (batch 1, 1 thread)")
        if "tensorrt" in report:
            print(f"TensorRT engine: {report['tensorrt']['engine']}")
    return 0 if report["ok"] else 1


def _cmd_simulate(a: argparse.Namespace) -> int:
    _export_package()
    from export.firmware import simulate

    r = simulate(a.run_dir, a.ram, a.samples, a.exit_layer, a.data_root)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0 if r["ok"] else 1
    print(f"firmware_sim, early exit at layer {r['exit_layer']}, {r['samples']} test images")
    print(f"accuracy {100 * r['accuracy']:.2f}% (ONNX Runtime {100 * r['ort_accuracy']:.2f}%), max abs diff vs "
          f"ONNX Runtime {r['max_abs_diff_vs_ort']:.2e}, {r['max_abs_diff_vs_ort'] / r['logit_scale']:.1e} of the "
          f"logit scale {r['logit_scale']:.3g} (tolerance {r['tolerance']:g}), normalised MSE {r['nmse_vs_ort']:.1e} "
          f"(tolerance {r['nmse_tolerance']:g}): {'within' if r['ok'] else 'OVER'}")
    print(f"arena (RAM) {r['arena_bytes']:,} B of {r['ram_bytes']:,} B, model (flash) {r['flash_bytes']:,} B, "
          f"{r['us_per_image']:.0f} us per image (one thread)")
    return 0 if r["ok"] else 1


def _cmd_infer(a: argparse.Namespace) -> int:
    result = _export_package().infer(a.model, a.images, a.threshold)
    if a.json:
        print(json.dumps(result))
        return 0
    for k, (p, name) in enumerate(zip(result["predictions"], result["classes"])):
        depth = f"\texit {result['exit_layer'][k]}" if "exit_layer" in result else ""
        print(f"{result['files'][k] if 'files' in result else k}\t{p}\t{name}{depth}")
    tail = f", mean exit depth {result['mean_exit_depth']:.2f}" if "mean_exit_depth" in result else ""
    n = result["images"]
    print(f"{n} image{'s' * (n != 1)}, {result['ms_per_image']:.3f} ms per image{tail}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else argv
        args = get_args_parser().parse_args(argv)
        args.typed = {token.split("=", 1)[0] for token in argv if token.startswith("--")}   # the flags as typed
        commands = {"train": _cmd_train, "eval": _cmd_eval, "plan": _cmd_plan, "export": _cmd_export,
                    "simulate": _cmd_simulate, "infer": _cmd_infer}
        code = commands[args.command](args)
        sys.stdout.flush()   # here, so that a reader gone away is caught below, not at exit
        return code
    except BrokenPipeError:   # stdout's reader went away (``asge-edge plan --json | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # Python's exit flush must not fail again
        return SIGPIPE_EXIT
    except UserError as e:
        print(f"asge-edge: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        error = out_of_memory(e, args.command)
        if error is None:
            raise
        print(f"asge-edge: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"asge-edge: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("asge-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
