"""Frozen run configuration, saved into every checkpoint.

Contract: ``RunConfig`` holds every setting needed to rebuild a model and repeat a
run. It round-trips through ``to_dict``/``from_dict`` (plain JSON types only), is
written to ``config.json`` and into the safetensors metadata of each checkpoint,
and ``RunConfig.from_dict(cfg.to_dict()) == cfg`` always holds. ``from_dict`` checks each
value's type against its field's, and the configs check their choices (method, optimiser,
pool, architecture), so that a config.json edited wrong fails as it loads, with a
ValueError or TypeError that names the setting.

Defaults and where they come from:
- AdamW, weight decay 1e-3, batch 128, lr cosine-annealed to 1e-5: the paper's
  recipe for MNIST/F-MNIST/CIFAR ("Experiments").
- lr: the paper's 2e-4 is tuned for 100-400 epochs and leaves a 3-epoch run far from
  convergence. With ``lr=None`` (the default) the run uses ``auto_lr(epochs, optimizer,
  widest)``: the paper's lr scaled by 100/epochs (constant lr x epochs), clamped to
  [1, cap] x 2e-4. The cap is 15 (3e-3) for nets whose widest layer has up to 128
  channels, as VGG8 at width 0.25 does: the largest lr measured stable there (at 1e-2
  layers 5-7 collapse to 45-66% after one epoch). Wider, it shrinks as 1/channels, to no
  less than 1: under AdamW each weight moves by about the lr whatever its fan-in, so a
  conv with k times the input channels moves its outputs about k times as much per step.
  So 100 epochs or more get the paper's 2e-4 at any width. For VGG8 at width 0.25, 10
  epochs get 2e-3 and 3 epochs 3e-3; at width 1 (512 channels), both get 7.5e-4. A layer
  list of the user's (presets.py) follows the same rule by its own widest layer.
  docs/RESULTS.md has the runs behind these figures.
- head_lr_scale: the Last and Fusion heads step at 3x the layers' lr. They chase features
  that move until the end of training; at 1x, Fusion ended 2.3 points below the best layer
  in a 3-epoch run, and a head refitted on the final features recovered 2.6 points, so the
  heads, not the features, were lagging. With standardised heads (models.LinearHead), 3x
  beat 10x on validation Fusion (89.13% vs 88.88%) (docs/RESULTS.md).
- SGD: momentum 0.9, weight decay 1e-4, lr 0.05 -> 5e-4: the paper's ImageNet recipe.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .presets import layer_list

PAPER_LR = 2e-4             # paper, all datasets but ImageNet, 100 (F-MNIST) to 400 (CIFAR) epochs
PAPER_EPOCHS = 100          # the schedule length PAPER_LR was tuned for
PAPER_LR_MIN = 1e-5
PAPER_WEIGHT_DECAY = 1e-3
PAPER_BATCH = 128
MAX_LR_SCALE = 15.0         # 15 x 2e-4 = 3e-3, the largest lr measured stable (docs/RESULTS.md)...
MAX_LR_SCALE_CHANNELS = 128   # ...up to this many channels in the widest layer (VGG8 at width 0.25);
                              # wider nets get MAX_LR_SCALE x this / their widest layer's channels
HEAD_LR_SCALE = 3.0         # heads' lr / layers' lr, chosen on validation (docs/RESULTS.md)
SGD_LR, SGD_LR_MIN, SGD_MOMENTUM, SGD_WEIGHT_DECAY = 0.05, 5e-4, 0.9, 1e-4   # paper, ImageNet

METHODS = ("asge", "bp")
OPTIMIZERS = ("adamw", "sgd")
POOLS = ("rms", "avg", "max")
STRATEGIES = ("fusion", "last", "best")
# Where a run's data lives and how it computes, not what: a resumed run may change them (the
# update is the same: micro-batches accumulate to the logical batch, and LayerNorm is per
# sample). Field names, unique across ModelConfig, DataConfig and TrainConfig.
RESUMABLE = ("root", "download", "device", "memory_budget", "offload")
# The data settings that one dataset alone reads (None elsewhere): setting -> that dataset.
DATASET_ONLY = {"input_shape": "synthetic", "num_classes": "synthetic", "train_size": "synthetic",
                "image_size": "imagefolder"}


def auto_lr(epochs: int, optimizer: str, widest: float) -> float:
    """Initial learning rate for a schedule of ``epochs`` epochs of a net whose widest layer
    has ``widest`` channels (ModelConfig.widest; see module docstring).

    SGD keeps the paper's ImageNet lr (0.05) whatever the length: it was tuned for 45 epochs.
    """
    if optimizer == "sgd":
        return SGD_LR
    cap = min(MAX_LR_SCALE, max(1.0, MAX_LR_SCALE * MAX_LR_SCALE_CHANNELS / widest))
    return PAPER_LR * min(cap, max(1.0, PAPER_EPOCHS / max(1, epochs)))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: a preset or the user's layer list (presets.py), scaled by ``width``."""

    arch: str = "vgg8"
    width: float = 1.0
    alpha: float = 1.0
    pool: str = "rms"

    def __post_init__(self):
        layer_list(self.arch)   # raises ValueError for neither a preset nor a layer list
        _check_choice("pool", self.pool, POOLS)

    @property
    def widest(self) -> float:
        """Channels of the widest layer at this width, before rounding (what auto_lr reads)."""
        return max(c for c, _ in layer_list(self.arch)) * self.width


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split."""

    dataset: str = "fashion-mnist"
    root: str | None = None           # None: the dataset's default root
    val_size: int | None = None       # None: 10k (MNIST/F-MNIST), 5k (CIFAR), 10% (others)
    augment: bool = False             # random crop (pad 4) + horizontal flip, for CIFAR
    download: bool = False
    # DATASET_ONLY: None for the other datasets, and the default of their own (data.py's
    # SYNTHETIC_SHAPE, SYNTHETIC_CLASSES, SYNTHETIC_TRAIN_SIZE and FOLDER_IMAGE_SIZE)
    input_shape: tuple[int, int, int] | None = None   # synthetic: C, H, W
    num_classes: int | None = None                    # synthetic
    train_size: int | None = None                     # synthetic: training images
    image_size: int | None = None                     # imagefolder: side in pixels

    def __post_init__(self):
        for name, dataset in DATASET_ONLY.items():
            if getattr(self, name) is not None and self.dataset != dataset:
                raise ValueError(f"--{name.replace('_', '-')} applies to --dataset {dataset} only, and "
                                 f"{self.dataset} sets its own; drop it")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run settings."""

    method: str = "asge"
    epochs: int = 3
    batch_size: int = PAPER_BATCH
    optimizer: str = "adamw"
    lr: float | None = None           # None: auto_lr(epochs, optimizer, the model's widest layer)
    lr_min: float | None = None       # None: 1e-5 (AdamW) or 5e-4 (SGD)
    weight_decay: float | None = None  # None: 1e-3 (AdamW) or 1e-4 (SGD)
    momentum: float = SGD_MOMENTUM
    head_lr_scale: float = HEAD_LR_SCALE
    memory_budget: int | None = None  # bytes for the training working set (planner.py); None: no limit
    amp: str = "auto"                 # auto, bf16, fp16 or off (device.resolve_precision)
    offload: bool = False             # park inactive layers in host memory (offload.py); GPU only
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)

    def lr_range(self, widest: float) -> tuple[float, float]:
        """(initial, final) lr of the cosine for a net whose widest layer has ``widest``
        channels: --lr, else auto_lr; and --lr-min, else the optimiser's default capped at
        the initial lr (a small --lr alone must not anneal upwards).

        Raises:
            ValueError: --lr-min is above the initial lr.
        """
        lr = self.lr if self.lr is not None else auto_lr(self.epochs, self.optimizer, widest)
        if self.lr_min is None:
            return lr, min(SGD_LR_MIN if self.optimizer == "sgd" else PAPER_LR_MIN, lr)
        if self.lr_min > lr:
            raise ValueError(f"--lr-min {self.lr_min:g} is above the initial lr {lr:g}, so the "
                             f"cosine would anneal upwards; give a --lr-min of at most {lr:g}")
        return lr, self.lr_min

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return SGD_WEIGHT_DECAY if self.optimizer == "sgd" else PAPER_WEIGHT_DECAY


@dataclass(frozen=True)
class DataInfo:
    """What the dataset tells the model: input shape, classes, normalisation."""

    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class RunConfig:
    """Everything needed to rebuild a model and repeat a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    info: DataInfo | None = None      # filled in once the dataset is loaded
    version: str = ""

    @property
    def lr_range(self) -> tuple[float, float]:
        """(initial, final) lr of the run's cosine (TrainConfig.lr_range for the model's widest layer).
        Checked where a run starts, not here: a finished run's config must load for eval and
        export even where a later lr rule disagrees with its --lr-min."""
        return self.train.lr_range(self.model.widest)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        # Configs written before DATASET_ONLY held every dataset's defaults: those that the
        # run's dataset does not read are dropped.
        dataset = d["data"]["dataset"]
        data = {k: v for k, v in d["data"].items() if DATASET_ONLY.get(k, dataset) == dataset}
        if data.get("input_shape") is not None:
            data["input_shape"] = tuple(data["input_shape"])
        info = d.get("info")
        if info is not None:
            info = DataInfo(
                input_shape=tuple(info["input_shape"]),
                num_classes=int(info["num_classes"]),
                class_names=tuple(info["class_names"]),
                mean=tuple(info["mean"]),
                std=tuple(info["std"]),
            )
        return cls(
            model=_typed(ModelConfig, "model", d["model"]),
            data=_typed(DataConfig, "data", data),
            train=_typed(TrainConfig, "train", d["train"]),
            info=info,
            version=d.get("version", ""),
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: use {', '.join(choices)}")


def _typed(cls: type, section: str, values: dict[str, Any]):
    """``cls(**values)``, each value checked against its field's type first: a config.json
    edited by hand fails here, naming the setting, rather than deep inside a run."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name in hints and not _is_a(value, hints[name]):
            hint = hints[name]
            raise TypeError(f"{section}.{name} is {value!r}, not {hint.__name__ if isinstance(hint, type) else hint}")
    return cls(**values)


def is_number(value: Any) -> bool:
    """Whether a JSON value is a number (JSON's true and false are not, though Python's bool is an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_a(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a config field's type (bool, int, float, str, None, unions
    of them, and tuples, which JSON holds as lists)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_is_a(value, h) for h in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        return (isinstance(value, (list, tuple)) and len(value) == len(args)
                and all(_is_a(v, a) for v, a in zip(value, args)))
    if hint is type(None):
        return value is None
    if hint is float:
        return is_number(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


SECTIONS = ("model", "data", "train")   # the RunConfig parts that hold settings


def with_settings(cfg: RunConfig, settings: dict[str, Any]) -> RunConfig:
    """``cfg`` with the named settings (model, data or train fields) replaced."""
    parts = {}
    for section in SECTIONS:
        part = getattr(cfg, section)
        own = {f.name for f in dataclasses.fields(part)}
        parts[section] = dataclasses.replace(part, **{k: v for k, v in settings.items() if k in own})
    return dataclasses.replace(cfg, **parts)


def _settings(cfg: RunConfig) -> dict[str, Any]:
    """Every setting of ``cfg`` (model, data and train fields) by name, in field order."""
    return {f.name: getattr(getattr(cfg, s), f.name) for s in SECTIONS for f in dataclasses.fields(getattr(cfg, s))}


def resumed(saved: RunConfig, asked: RunConfig) -> RunConfig:
    """The config a resumed run goes on with: ``saved`` (its config.json), with ``asked``'s
    RESUMABLE settings."""
    asked_settings = _settings(asked)
    return with_settings(saved, {name: asked_settings[name] for name in RESUMABLE})


def setting_changes(old: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """The settings (model, data and train fields) in which ``new`` differs from ``old``, as
    (field name, old value, new value), in field order."""
    a, b = _settings(old), _settings(new)
    return [(name, a[name], b[name]) for name in a if a[name] != b[name]]
