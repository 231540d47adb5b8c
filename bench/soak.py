"""Soak: a real training run killed (SIGKILL) at random moments and resumed, N times.

Claim (issue 6): a run that loses power at any moment resumes from its last checkpoint
and ends exactly where an uninterrupted run with the same seed ends (on the CPU). This
trains vgg8 x0.125 on Fashion-MNIST for one epoch with a checkpoint every 20 steps, kills
it ``--cycles`` times at random points (seeded), resumes each time, then compares the
final weights and test accuracies with an uninterrupted run of the same command.

    python bench/soak.py [--cycles 10] [--seed 0] [--out /tmp/soak]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

RUN = ["--dataset", "fashion-mnist", "--model", "vgg8", "--width", "0.125", "--epochs", "1",
       "--checkpoint-every", "20", "--quiet"]


def train(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "asge_edge", "train", *RUN, "--out", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("/tmp/soak"))
    a = p.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    ref, soak = a.out / "uninterrupted", a.out / "killed"
    t0 = time.perf_counter()
    proc = train(ref)
    if proc.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed: {proc.stderr.read()}")
    full = time.perf_counter() - t0
    rng = random.Random(a.seed)
    survived, kills = 0, []
    proc = train(soak)
    for _ in range(a.cycles):
        delay = rng.uniform(2.0, max(3.0, full / 3))
        time.sleep(delay)
        if proc.poll() is not None:
            break   # it finished before this kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(round(delay, 1))
        resumable = (soak / "state.safetensors").is_file()
        proc = train(soak, "--resume") if resumable else train(soak, "--force")
        survived += 1
    if proc.wait() != 0:
        raise SystemExit(f"the soaked run failed after {survived} cycles: {proc.stderr.read()}")
    wa, wb = load_file(ref / "state.safetensors"), load_file(soak / "state.safetensors")
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    acc_a = json.loads((ref / "summary.json").read_text())["test_accuracy"]
    acc_b = json.loads((soak / "summary.json").read_text())["test_accuracy"]
    print(f"vgg8 x0.125, Fashion-MNIST, 1 epoch, checkpoint every 20 steps; uninterrupted run {full:.0f} s")
    print(f"kill-and-resume cycles survived: {survived} of {a.cycles} (SIGKILL after {kills} s of each life)")
    print(f"max |weight difference| vs uninterrupted: {worst:.3g}")
    for s in ("fusion", "last", "best"):
        print(f"test accuracy {s}: uninterrupted {100 * acc_a[s]:.2f}%, soaked {100 * acc_b[s]:.2f}%, "
              f"difference {100 * (acc_b[s] - acc_a[s]):+.2f} points")


if __name__ == "__main__":
    main()
