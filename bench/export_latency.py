"""ONNX Runtime latency and test accuracy: the full network, the Best-Pred early exit, the cascade.

Claim (issue 4): on the CPU, in one run, for a trained run directory (Fashion-MNIST by
default): the Fusion network, the network cut after its best layer, and a multi-exit
cascade (threshold calibrated on validation). Accuracy is over the whole test set in
batches; latency is per image at batch 1 on one ONNX Runtime thread, the embedded case,
over the first ``--latency-images`` test images (the cascade runs each image to the exit
it takes). The three models are timed in alternating rounds.

    python bench/export_latency.py RUN_DIR [--exits all] [--latency-images 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from asge_edge.checkpoint import load_run
from asge_edge.data import load_splits, split_tensors
from export.cascade import Cascade
from export.pipeline import ExportOptions, export_run
from export.verify import session
from rounds import alternate

ROUNDS = 3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--exits", default="all")
    p.add_argument("--latency-images", type=int, default=2000)
    a = p.parse_args()
    cfg, _, _ = load_run(a.run_dir)
    x, y = (t.numpy() for t in split_tensors(load_splits(cfg.data).test))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = export_run(a.run_dir, ExportOptions(out=tmp / "full.onnx"))
        best = export_run(a.run_dir, ExportOptions(early_exit=True, out=tmp / "best.onnx"))
        cas = export_run(a.run_dir, ExportOptions(exits=a.exits, out=tmp / "cascade"))
        single = {"Fusion (full network)": session(tmp / "full.onnx", 1),
                  f"Best-Pred (layers 1..{best['exit_layer']})": session(tmp / "best.onnx", 1)}
        cascade = Cascade(tmp / "cascade", threads=1)
        t = cas["threshold"]

        rows = {}
        for name, sess in single.items():
            logits = np.concatenate([sess.run(None, {"images": x[i:i + 500]})[0] for i in range(0, len(x), 500)])
            rows[name] = {"acc": float((logits.argmax(1) == y).mean()), "depth": None}
        res = [cascade.run(x[i:i + 500], t) for i in range(0, len(x), 500)]
        exit_layer = np.concatenate([r.exit_layer for r in res])
        pred = np.concatenate([r.logits for r in res]).argmax(1)
        cname = f"cascade, exits {cas['exits']}, threshold {t:.4g}"
        rows[cname] = {"acc": float((pred == y).mean()), "depth": float(exit_layer.mean())}

        runners = {**{n: (lambda img, s=s: s.run(None, {"images": img})) for n, s in single.items()},
                   cname: (lambda img: cascade.run(img, t))}
        lat = x[: a.latency_images]

        def per_image(fn) -> float:
            fn(lat[:1])
            t0 = time.perf_counter()
            for i in range(len(lat)):
                fn(lat[i:i + 1])
            return (time.perf_counter() - t0) / len(lat)

        times = alternate({name: (lambda fn=fn: per_image(fn)) for name, fn in runners.items()}, ROUNDS)
    print(f"{cfg.data.dataset} test set ({len(y)} images), {cfg.model.arch} x{cfg.model.width}; latency over "
          f"{len(lat)} images at batch 1, 1 ONNX Runtime thread, median of {ROUNDS} alternating rounds")
    print(f"{'model':<56} {'test acc':>9} {'ms/image':>9} {'mean exit depth':>16}")
    med = {name: statistics.median(t) for name, t in times.items()}
    full_name, best_name = list(single)
    for name, r in rows.items():
        depth = "" if r["depth"] is None else f"{r['depth']:.2f}"
        print(f"{name:<56} {100 * r['acc']:>8.2f}% {1e3 * med[name]:>9.3f} {depth:>16}")
    print(f"latency, Best-Pred / full network: {med[best_name] / med[full_name]:.2f}x")
    print(f"latency, cascade / Best-Pred: {med[cname] / med[best_name]:.2f}x; "
          f"accuracy, cascade - Best-Pred: {100 * (rows[cname]['acc'] - rows[best_name]['acc']):+.2f} points")
    print(f"calibration on validation: accuracy {100 * cas['val_accuracy']:.2f}% vs Best-Pred "
          f"{100 * cas['val_best_pred_accuracy']:.2f}%, mean exit depth {cas['val_mean_exit_depth']:.2f}")
    print(f"parity (max abs diff, batch 1 / 17): full {full['parity_max_abs_diff']}, best {best['parity_max_abs_diff']}")


if __name__ == "__main__":
    main()
