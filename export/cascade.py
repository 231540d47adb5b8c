"""Multi-exit cascade: per-sample early exit over several exits (beyond the paper).

Contract:
- ``parse_exits("all" | "1,3,5", n)`` -> the sorted 1-based exit layers.
- ``write_stages`` writes one ONNX per stage: stage i runs layers e_{i-1}+1..e_i and
  outputs ``features`` (what layer e_i hands on; not in the last stage) and ``logits``
  (layer e_i's exit). The first stage reads ``images``, the others ``prev_features``
  (the previous stage's ``features``).
  ``cascade.json`` lists the stages, the threshold and the input description.
- ``Cascade(dir).run(images, threshold)``: each sample leaves at the first exit whose
  softmax maximum reaches ``threshold`` (the last exit takes the rest); returns every
  sample's logits and exit layer. Only the samples still in flight run the next stage.
- ``calibrate`` (pure): the threshold with the lowest mean exit depth whose accuracy stays
  within ``tolerance`` of a target accuracy (Best-Pred's, on validation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asge_edge.checkpoint import read_json
from asge_edge.config import is_number
from asge_edge.errors import UserError
from asge_edge.models import ASGENet

from .graph import Stage
from .to_onnx import export_onnx
from .verify import session

CASCADE_FILE = "cascade.json"
TOLERANCE = 0.005          # 0.5 points of accuracy
CANDIDATES = 400           # thresholds tried by calibrate (quantiles of the exits' confidences)
NEVER = 2.0                # a threshold no softmax maximum reaches: every sample takes the last exit


def parse_exits(spec: str, n_layers: int) -> tuple[int, ...]:
    """``all`` or a comma list of 1-based layers -> sorted unique exits within 1..n_layers."""
    if spec == "all":
        return tuple(range(1, n_layers + 1))
    try:
        exits = sorted({int(v) for v in spec.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--exits {spec!r}: give 'all' or layers like 1,3,5") from None
    if not exits or exits[0] < 1 or exits[-1] > n_layers:
        raise UserError(f"--exits {spec!r}: layers must lie in 1..{n_layers}")
    return tuple(exits)


def write_stages(net: ASGENet, exits: tuple[int, ...], out_dir: Path, opset: int, half: bool,
                 metadata: dict[str, Any]) -> dict:
    """Export every stage into ``out_dir`` (which exists); return cascade.json's content, less
    the threshold, which the caller sets before writing it (``write_json``)."""
    stages, start, shape = [], 0, tuple(metadata["input_shape"])
    for i, end in enumerate(exits):
        last = i == len(exits) - 1
        module = Stage(net, start, end, half=half, features=not last)
        name = f"stage{i + 1}_layer{end}.onnx"
        input_name = "images" if start == 0 else "prev_features"
        outputs = ["logits"] if last else ["features", "logits"]
        export_onnx(module, shape, out_dir / name, input_name, outputs, opset, {**metadata, "exit_layer": end})
        stages.append({"file": name, "exit_layer": end, "input": input_name, "input_shape": list(shape),
                       "outputs": outputs})
        spec = net.specs[end - 1]
        shape = (spec.channels, spec.out_height, spec.out_width)
        start = end
    return {**metadata, "exits": list(exits), "stages": stages}


def softmax_max(logits: np.ndarray) -> np.ndarray:
    """Max softmax probability per row: (B, N) -> (B,)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return 1.0 / e.sum(axis=1)


@dataclass
class CascadeResult:
    logits: np.ndarray       # B, N: each sample's logits at the exit it took
    exit_layer: np.ndarray   # B: 1-based layer it left at


class Cascade:
    """The stages of a cascade directory, run with ONNX Runtime on the CPU."""

    def __init__(self, cascade_dir: Path, threads: int = 0, spec: dict | None = None):
        self.dir = Path(cascade_dir)
        if spec is None:   # a cascade directory's, as written: checked, since a person may have edited it
            spec = read_json(self.dir / CASCADE_FILE)
            if not spec_fits(spec):
                raise UserError(f"{self.dir / CASCADE_FILE} does not describe a cascade (stages, input_shape, "
                                "class_names, threshold); export the cascade again")
        self.spec = spec
        self.sessions = [session(self.dir / s["file"], threads) for s in self.spec["stages"]]
        self.exits = [s["exit_layer"] for s in self.spec["stages"]]

    def all_exits(self, images: np.ndarray) -> np.ndarray:
        """Logits of every exit for every sample: (S, B, N)."""
        out, h = [], images
        for sess, stage in zip(self.sessions, self.spec["stages"]):
            res = sess.run(None, {stage["input"]: h})
            out.append(res[-1])
            h = res[0]
        return np.stack(out)

    def run(self, images: np.ndarray, threshold: float) -> CascadeResult:
        """Per-sample early exit at ``threshold`` (softmax max)."""
        b = len(images)
        logits = np.zeros((b, 0), np.float32)
        exit_layer = np.zeros(b, np.int64)
        idx, h = np.arange(b), images
        for i, (sess, stage) in enumerate(zip(self.sessions, self.spec["stages"])):
            res = sess.run(None, {stage["input"]: h})
            lg = res[-1]
            if logits.shape[1] == 0:
                logits = np.zeros((b, lg.shape[1]), np.float32)
            leave = np.ones(len(idx), bool) if i == len(self.sessions) - 1 else softmax_max(lg) >= threshold
            logits[idx[leave]] = lg[leave]
            exit_layer[idx[leave]] = stage["exit_layer"]
            idx, h = idx[~leave], res[0][~leave]
            if len(idx) == 0:
                break
        return CascadeResult(logits, exit_layer)


def spec_fits(spec: Any) -> bool:
    """Whether a cascade.json holds what Cascade and ``infer`` read of it."""
    stage = lambda s: (isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("input"), str)   # noqa: E731
                       and isinstance(s.get("exit_layer"), int))
    return (isinstance(spec, dict) and isinstance(spec.get("stages"), list) and len(spec["stages"]) > 0
            and all(stage(s) for s in spec["stages"])
            and isinstance(spec.get("input_shape"), list) and len(spec["input_shape"]) == 3
            and all(isinstance(d, int) and d > 0 for d in spec["input_shape"])
            and isinstance(spec.get("class_names"), list) and is_number(spec.get("threshold")))


def exit_choice(confidence: np.ndarray, threshold: float) -> np.ndarray:
    """Index of the first stage whose confidence reaches ``threshold`` (else the last): (S, B) -> (B,)."""
    hit = confidence >= threshold
    hit[-1] = True
    return hit.argmax(axis=0)


def calibrate(exit_logits: np.ndarray, labels: np.ndarray, exits: list[int], target: float,
              tolerance: float = TOLERANCE) -> tuple[float, float, float]:
    """Lowest-mean-depth threshold whose accuracy >= target - tolerance.

    Args:
        exit_logits: (S, B, N) logits of every exit (Cascade.all_exits) on validation.
        labels: (B,).
        exits: the S exit layers (1-based).
        target: the accuracy to stay near (Best-Pred's on validation).

    Returns:
        (threshold, accuracy, mean exit depth in layers). When no threshold reaches the
        target, the most accurate one.
    """
    conf = np.stack([softmax_max(lg) for lg in exit_logits])             # S, B
    correct = exit_logits.argmax(axis=2) == labels[None]                 # S, B
    depth = np.asarray(exits, dtype=np.float64)
    candidates = np.unique(np.concatenate([np.quantile(conf[:-1], np.linspace(0, 1, CANDIDATES)) if len(conf) > 1
                                           else np.empty(0), [NEVER]]))
    best = None
    for t in candidates:
        choice = exit_choice(conf, t)                                    # B
        acc = correct[choice, np.arange(len(labels))].mean()
        mean_depth = depth[choice].mean()
        key = (acc >= target - tolerance, -mean_depth if acc >= target - tolerance else acc)
        if best is None or key > best[0]:
            best = (key, float(t), float(acc), float(mean_depth))
    return best[1], best[2], best[3]
