"""firmware_sim's single-thread latency over ONNX Runtime's, on the same early-exit model.

Claim (issue 5): the C runtime (built -O3, tuned for this machine) runs the Best-Pred
truncated network at most 2x slower than single-thread ONNX Runtime. Both run one image
at a time on one thread, on ``--images`` test images evenly spaced over the test set, timed in
alternating rounds; each gives its median round, and the ratios are taken per round. The C runtime runs twice: in the
smallest arena the planner allows (what firmware would give it) and in ``--big-arena``
bytes, where every layer takes its largest strips.

    python bench/firmware_latency.py RUN_DIR [--images 500] [--rounds 5] [--big-arena 4000000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from asge_edge.checkpoint import load_run, read_json
from asge_edge.data import load_splits, split_tensors, spread
from export.firmware import build_fsim, run_fsim
from export.pipeline import ExportOptions, export_run
from export.to_c import write_c_model
from export.verify import session
from rounds import alternate

TARGET = 2.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--big-arena", type=int, default=4_000_000)
    a = p.parse_args()
    cfg, net, _ = load_run(a.run_dir)
    k = read_json(a.run_dir / "summary.json")["best_layer"]
    x = split_tensors(spread(load_splits(cfg.data).test, a.images))[0].numpy()   # evenly spaced test images
    binary = build_fsim()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = write_c_model(net, k, tmp, str(a.run_dir))
        export_run(a.run_dir, ExportOptions(early_exit=True, out=tmp / "m.onnx"))
        sess = session(tmp / "m.onnx", threads=1)

        def ort_round() -> float:
            t0 = time.perf_counter()
            for i in range(len(x)):
                sess.run(None, {"images": x[i:i + 1]})
            return 1e6 * (time.perf_counter() - t0) / len(x)

        def c_round() -> float:
            return run_fsim(binary, tmp / "model.bin", x)[1]

        def c_big_round() -> float:
            return run_fsim(binary, tmp / "model.bin", x, arena=a.big_arena)[1]

        fns = {"c": c_round, "c_big": c_big_round, "ort": ort_round}
        for fn in fns.values():   # warm-up
            fn()
        times = alternate(fns, a.rounds)
    c_us, big_us, ort_us = times["c"], times["c_big"], times["ort"]
    c, big, o = statistics.median(c_us), statistics.median(big_us), statistics.median(ort_us)
    print(f"{cfg.model.arch} x{cfg.model.width} cut after layer {k}, input {'x'.join(map(str, cfg.info.input_shape))}, "
          f"{len(x)} images x {a.rounds} rounds, one thread each")
    print(f"firmware_sim (C, -O3 -march=native): {c:9.1f} us/image (rounds {min(c_us):.0f}-{max(c_us):.0f}); "
          f"arena {sizes['arena_bytes']:,} B, model {sizes['flash_bytes']:,} B")
    print(f"firmware_sim, arena {a.big_arena:,} B:      {big:9.1f} us/image (rounds {min(big_us):.0f}-{max(big_us):.0f})")
    print(f"ONNX Runtime (CPU, 1 thread):        {o:9.1f} us/image (rounds {min(ort_us):.0f}-{max(ort_us):.0f})")
    paired = [ci / oi for ci, oi in zip(c_us, ort_us)]
    paired_big = [bi / oi for bi, oi in zip(big_us, ort_us)]
    ratio = statistics.median(paired)
    print(f"C / ONNX Runtime latency, smallest arena: {ratio:.2f} median of {len(paired)} paired rounds (range "
          f"{min(paired):.2f}-{max(paired):.2f}; target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}); "
          f"with {a.big_arena:,} B: {statistics.median(paired_big):.2f}")


if __name__ == "__main__":
    main()
