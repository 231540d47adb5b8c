"""Checkpoints: safetensors + JSON only, written atomically.

Contract:
- Nothing here unpickles: tensors come from safetensors, everything else from JSON.
- Every write goes to a temporary file in the target directory, is fsynced, then
  renamed over the target (``os.replace``), so a crash leaves the old file or the new
  one, never a torn one.
- ``model.safetensors`` holds every tensor of the network (convs, fixed projections,
  Last/Fusion heads, normalisation) plus the run config in its metadata; with
  ``config.json`` beside it, ``load_run`` rebuilds the exact model.
- ``state.safetensors`` holds what ``--resume`` needs: the current weights, every
  optimiser's state, and (in metadata, as JSON) the epoch, step and history.
- Unreadable, truncated or foreign files raise ``UserError``.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from . import __version__
from .config import RunConfig, with_settings
from .errors import UserError
from .models import ASGENet

MODEL_FILE, CONFIG_FILE, STATE_FILE = "model.safetensors", "config.json", "state.safetensors"
# Every file that training writes in a run directory (train.py); nothing else writes them.
RUN_FILES = (CONFIG_FILE, MODEL_FILE, STATE_FILE, "metrics.jsonl", "summary.json", "layer_accuracy.png")
FORMAT = "asge-edge"
FORMAT_VERSION = 1   # bumped when the layout of checkpoints changes; others are refused


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, whole.

    A file system that refuses the write (read-only, full, no such directory) is a
    UserError naming the path; the old file, if any, is left as it was. So is anything at
    ``path`` that is not a regular file (a folder, a device such as /dev/null, a pipe),
    which the rename would otherwise replace with a file.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise UserError(f"cannot write {path}: it is not a regular file, and writing would replace it; "
                        "choose another --out")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _unwritable(path, e) from None
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)   # mkstemp's 0600 would hide outputs from other users
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _unwritable(path, e) from None
        raise


def _unwritable(path: Path, e: OSError) -> UserError:
    fix = "free space there or choose another --out" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "choose another --out"
    return UserError(f"cannot write {path} ({e.strerror}); {fix}")


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found; is this an asge-edge run directory?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore it or retrain") from None


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, save(flat, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                            "version": __version__, "meta": json.dumps(meta)}))


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not Path(path).is_file():
        raise UserError(f"{path} not found; is this an asge-edge run directory?")
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt or truncated ({e}); restore it or retrain") from None
    if header.get("format") != FORMAT:
        raise UserError(f"{path} was not written by asge-edge; point at a run directory made by 'asge-edge train'")
    if header.get("format_version", str(FORMAT_VERSION)) != str(FORMAT_VERSION):
        raise UserError(f"{path} has checkpoint format {header['format_version']} (asge-edge {header.get('version')}); "
                        f"this asge-edge {__version__} reads format {FORMAT_VERSION}: use that version or retrain")
    return tensors, json.loads(header.get("meta", "{}"))


def save_model(run_dir: Path, net: ASGENet, cfg: RunConfig, extra: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` (every tensor, config in metadata) and ``config.json``."""
    meta = {"config": cfg.to_dict(), **(extra or {})}
    _save_tensors(Path(run_dir) / MODEL_FILE, net.state_dict(), meta)
    write_json(Path(run_dir) / CONFIG_FILE, cfg.to_dict())


def build_net(cfg: RunConfig) -> ASGENet:
    """The network described by ``cfg`` (with fresh, seeded weights)."""
    info = cfg.info
    try:
        return ASGENet(cfg.model, info.input_shape, info.num_classes, info.mean, info.std, seed=cfg.train.seed)
    except ValueError as e:
        raise UserError(str(e)) from None


def load_weights(net: ASGENet, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``tensors`` into ``net`` exactly, or raise UserError naming the mismatch."""
    own = net.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    bad = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or bad:
        first = (missing or unexpected or bad)[0]
        raise UserError(f"{path} does not match the model in config.json (first mismatch: {first}); use the config.json it was saved with")
    net.load_state_dict(tensors)


def read_config(run_dir: Path) -> RunConfig:
    """The RunConfig in ``run_dir``'s config.json; a UserError if it is missing or not one."""
    if Path(run_dir).is_file():   # a file of the run, as model.safetensors, given for its directory
        raise UserError(f"{run_dir} is a file; pass the run directory that holds it and its {CONFIG_FILE}")
    path = Path(run_dir) / CONFIG_FILE
    raw = read_json(path)
    try:
        return RunConfig.from_dict(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is not an asge-edge {__version__} config ({e}); restore it, or retrain with "
                        "this version") from None


def load_run(run_dir: Path, data_root: str | None = None) -> tuple[RunConfig, ASGENet, dict[str, Any]]:
    """Rebuild the model of a finished run; ``data_root``, where given, replaces the dataset
    root in its config (a run moved to another machine).

    Returns:
        (config, network with the selected checkpoint's weights, checkpoint metadata).
    """
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    if data_root is not None:
        cfg = with_settings(cfg, {"root": data_root})
    tensors, meta = _load_tensors(run_dir / MODEL_FILE)
    net = build_net(cfg)
    load_weights(net, tensors, run_dir / MODEL_FILE)
    return cfg, net, meta


def _flatten_optimizers(states: dict[str, dict]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split optimiser state dicts into tensors (for safetensors) and JSON."""
    tensors, plain = {}, {}
    for name, sd in states.items():
        per_param = {}
        for pid, st in sd["state"].items():
            per_param[str(pid)] = {}
            for key, val in st.items():
                if isinstance(val, torch.Tensor):
                    tensors[f"opt/{name}/{pid}/{key}"] = val
                else:
                    per_param[str(pid)][key] = val
        plain[name] = {"param_groups": sd["param_groups"], "plain": per_param}
    return tensors, plain


def _unflatten_optimizers(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, dict]:
    states = {}
    for name, p in plain.items():
        state = {int(pid): dict(vals) for pid, vals in p["plain"].items()}
        states[name] = {"state": state, "param_groups": p["param_groups"]}
    for key, val in tensors.items():
        _, name, pid, k = key.split("/", 3)
        states[name]["state"].setdefault(int(pid), {})[k] = val
    return states


def save_state(run_dir: Path, net: ASGENet, optimizers: dict[str, dict], progress: dict[str, Any]) -> None:
    """Write ``state.safetensors``: current weights, optimiser states, and ``progress``."""
    opt_tensors, opt_plain = _flatten_optimizers(optimizers)
    tensors = {f"model/{k}": v for k, v in net.state_dict().items()} | opt_tensors
    _save_tensors(Path(run_dir) / STATE_FILE, tensors, {"progress": progress, "optimizers": opt_plain})


def load_state(run_dir: Path, net: ASGENet) -> tuple[dict[str, dict], dict[str, Any]]:
    """Load ``state.safetensors`` into ``net``; return (optimiser states, progress)."""
    path = Path(run_dir) / STATE_FILE
    tensors, meta = _load_tensors(path)
    model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    load_weights(net, model, path)
    opt = {k: v for k, v in tensors.items() if k.startswith("opt/")}
    return _unflatten_optimizers(opt, meta["optimizers"]), meta["progress"]
