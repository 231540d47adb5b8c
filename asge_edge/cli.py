"""The ``asge-edge`` command line: parses arguments and calls the library.

Contract: no logic lives here beyond turning flags into configs. ``main(argv)``
returns the exit code: 0 on success, 2 on any user error (bad flag, missing data,
unreadable checkpoint), printed as one line ``asge-edge: error: ...`` on stderr with
no traceback. Tests call ``main([...])`` in-process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .config import METHODS, OPTIMIZERS, POOLS, STRATEGIES, DataConfig, ModelConfig, RunConfig, TrainConfig
from .budget import parse_size
from .data import DATASETS
from .device import AMP_MODES, DEVICES
from .errors import UserError
from .models import PRESETS


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit 2 (argparse prints the usage too)."""

    def error(self, message: str):
        raise UserError(f"{message} (see '{self.prog} --help')")


def _shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CxHxW such as 3x32x32, got {text!r}") from None
    if min(c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"every dimension must be >= 1, got {text!r}")
    return c, h, w


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
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


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    d.add_argument("--input-shape", type=_shape, default=DataConfig.input_shape, help="synthetic: CxHxW")
    d.add_argument("--num-classes", type=_positive_int, default=DataConfig.num_classes, help="synthetic: classes")
    d.add_argument("--train-size", type=_positive_int, default=DataConfig.train_size, help="synthetic: training images")
    d.add_argument("--image-size", type=_positive_int, default=DataConfig.image_size, help="imagefolder: side in pixels")
    d.add_argument("--workers", type=int, default=4, help="imagefolder: DataLoader workers")
    m = t.add_argument_group("model")
    m.add_argument("--model", default="vgg8", choices=tuple(PRESETS))
    m.add_argument("--width", type=_positive_float, default=1.0, help="channel multiplier (0.25: CPU-sized)")
    m.add_argument("--alpha", type=_non_negative_float, default=1.0, help="partition granularity (paper: 1.0)")
    m.add_argument("--pool", default="rms", choices=POOLS)
    o = t.add_argument_group("optimisation")
    o.add_argument("--method", default="asge", choices=METHODS, help="asge (default) or bp, the backprop baseline")
    o.add_argument("--epochs", type=_positive_int, default=TrainConfig.epochs)
    o.add_argument("--batch-size", type=_positive_int, default=TrainConfig.batch_size)
    o.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    o.add_argument("--lr", type=_positive_float, default=None,
                   help="initial lr (default for AdamW: 2e-4 * clamp(100/epochs, 1, 15), i.e. the paper's 2e-4 "
                   "from 100 epochs on and 3e-3 at 3 epochs; SGD: 0.05; see docs/RESULTS.md)")
    o.add_argument("--lr-min", type=_positive_float, default=None, help="final lr of the cosine (default 1e-5)")
    o.add_argument("--weight-decay", type=_non_negative_float, default=None, help="default 1e-3 (AdamW), 1e-4 (SGD)")
    o.add_argument("--momentum", type=_non_negative_float, default=TrainConfig.momentum, help="SGD momentum")
    o.add_argument("--head-lr-scale", type=_positive_float, default=TrainConfig.head_lr_scale,
                   help="lr of the Last/Fusion heads over the layers' lr (default 3, see docs/RESULTS.md)")
    o.add_argument("--seed", type=int, default=0)
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
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    r.add_argument("--quiet", action="store_true", help="no progress bar or tables")

    pl = sub.add_parser("plan", help="show the memory plan of a streaming run (no data needed)")
    pl.add_argument("--model", default="vgg8", choices=tuple(PRESETS))
    pl.add_argument("--width", type=_positive_float, default=1.0)
    pl.add_argument("--alpha", type=_non_negative_float, default=1.0)
    pl.add_argument("--input-shape", type=_shape, default=(1, 28, 28), help="CxHxW (default 1x28x28, Fashion-MNIST)")
    pl.add_argument("--num-classes", type=_positive_int, default=10)
    pl.add_argument("--batch-size", type=_positive_int, default=TrainConfig.batch_size)
    pl.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    pl.add_argument("--memory-budget", type=_size, default=None, metavar="SIZE")
    pl.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"), help="compute precision of the convs")
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")

    e = sub.add_parser("eval", help="re-evaluate a finished run on its test set")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--strategy", choices=STRATEGIES, default=None, help="one strategy (default: all)")
    e.add_argument("--device", default="auto", choices=DEVICES)
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
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


def _cmd_train(a: argparse.Namespace) -> int:
    from .train import RunOptions, train

    train(_run_config(a), RunOptions(out=a.out, quiet=a.quiet, force=a.force, resume=a.resume, workers=a.workers))
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    result = evaluate_run(a.run_dir, a.device, a.strategy)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        for name, acc in result["test_accuracy"].items():
            print(f"{name:<8} {'n/a' if acc is None else f'{100 * acc:.2f}%'}")
    return 0


def _cmd_plan(a: argparse.Namespace) -> int:
    from .models import layer_specs
    from .planner import BudgetTooSmall, plan_memory
    from .report import plan_table

    try:
        specs = layer_specs(ModelConfig(arch=a.model, width=a.width, alpha=a.alpha), a.input_shape, a.num_classes)
        plan = plan_memory(specs, a.input_shape, a.batch_size, a.memory_budget,
                           "fp32" if a.amp == "off" else a.amp, a.optimizer)
    except BudgetTooSmall as e:
        raise UserError(f"--memory-budget {e.budget} B is too small for {a.model} x{a.width} at "
                        f"{'x'.join(map(str, a.input_shape))}; the smallest that works is {e.min_budget} B") from None
    except ValueError as e:
        raise UserError(str(e)) from None
    print(json.dumps(plan.to_dict(), indent=2) if a.json else plan_table(plan))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = get_args_parser().parse_args(argv)
        return {"train": _cmd_train, "eval": _cmd_eval, "plan": _cmd_plan}[args.command](args)
    except UserError as e:
        print(f"asge-edge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asge-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
