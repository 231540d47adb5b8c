"""Soak: a real training run stopped by a signal at random moments and resumed, N times.

Claims:
- Issue 6: a run that loses power at any moment (``--signal KILL``, the default) resumes
  from its last checkpoint and ends exactly where an uninterrupted run with the same seed
  ends (on the CPU).
- A scheduler's preemption (``--signal TERM``, to the whole process group, DataLoader
  workers included where ``--workers`` is above 0): each life ends with a one-line message
  and exit 143 after saving the step it was on, or, where the signal lands before the
  handler is installed (start-up) or after the run is saved (exit), as the signal ends it;
  never with a traceback. The run again ends as the uninterrupted one.
- The same under torchrun (``--processes N``, TERM or INT): torchrun passes the signal to
  each rank's process group, DataLoader workers included, and every rank prints the same
  line, at the same step, or all are ended by the signal; no rank's traceback (torchrun
  prints its own on a signal, which does not count).

This trains vgg8 x0.125 on Fashion-MNIST for one epoch with a checkpoint every 20 steps;
with ``--workers N`` it trains instead on an image folder written from Fashion-MNIST's
first ``--folder-images`` training images (and a sixth as many test images), as PNGs
that N DataLoader workers decode. It signals the run's process group ``--cycles`` times
at random points (seeded; by default 2 s to a third of an uninterrupted run into each
life, or ``--delays LO HI`` seconds: torchrun's start-up takes longer), resumes each time,
then compares the final weights and test accuracies with an uninterrupted run of the same
command.

    python bench/soak.py [--cycles 10] [--seed 0] [--signal KILL|TERM|INT] [--workers 0] [--processes 1]
                         [--delays LO HI] [--out /tmp/soak]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

MODEL = ["--model", "vgg8", "--width", "0.125", "--epochs", "1", "--checkpoint-every", "20", "--quiet"]


def write_folder(root: Path, images: int) -> None:
    """Fashion-MNIST's first ``images`` training images (and ``images // 6`` test images) as
    ``root/train|val/<class>/<i>.png``, the layout of --dataset imagefolder."""
    from PIL import Image

    from asge_edge.config import DataConfig
    from asge_edge.data import load_splits

    splits = load_splits(DataConfig(val_size=1))
    for sub, split, n in (("train", splits.train, images), ("val", splits.test, images // 6)):
        for i in range(n):
            folder = root / sub / f"{int(split.labels[i]):d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(split.images[i, 0].numpy()).save(folder / f"{i}.png")


def train(run: list[str], out: Path, processes: int, *extra: str) -> subprocess.Popen:
    """A life of the run, in a process group of its own (with its DataLoader workers); with
    ``processes`` above 1, under torchrun (which starts each rank in a group of its own)."""
    launch = [sys.executable, "-m", "asge_edge"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", "29541",
         "-m", "asge_edge"]
    return subprocess.Popen([*launch, "train", *run, "--out", str(out), *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def ending(code: int, err: str, signum: int, processes: int) -> str | None:
    """How a signalled life ended: "saved and stopped" (one line from each process, all at
    the same point), "ended by the signal" (it landed before the handlers were in place, or
    after the run was saved), or None for anything else."""
    if processes == 1:
        lines = err.strip().splitlines()
        if code == 128 + signum and len(lines) == 1 and "interrupted" in lines[0]:
            return "saved and stopped"
        return "ended by the signal" if code == -signum and "Traceback" not in err else None
    own = err.rfind("Traceback (most recent call last)")   # torchrun's, on the signal it passed on
    if own >= 0 and "SignalException" in err[own:]:
        err = err[:own]
    if "Traceback" in err:
        return None
    stops = re.findall(r"asge-edge: interrupted \(SIG\w+\) [^;]*;", err)
    if len(stops) == processes and len(set(stops)) == 1:
        return "saved and stopped"
    return "ended by the signal" if not stops else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--signal", choices=("KILL", "TERM", "INT"), default="KILL")
    p.add_argument("--workers", type=int, default=0, help="above 0: train on an image folder with this many workers")
    p.add_argument("--folder-images", type=int, default=6000)
    p.add_argument("--processes", type=int, default=1, help="above 1: train under torchrun, gloo on the CPU")
    p.add_argument("--delays", type=float, nargs=2, metavar=("LO", "HI"), help="seconds into each life to signal")
    p.add_argument("--out", type=Path, default=Path("/tmp/soak"))
    a = p.parse_args()
    signum = signal.Signals[f"SIG{a.signal}"]
    if a.processes > 1 and signum == signal.SIGKILL:
        p.error("SIGKILL to torchrun leaves its ranks running (each is in a process group of its own): "
                "use --signal TERM or INT with --processes")
    shutil.rmtree(a.out, ignore_errors=True)
    run = ["--dataset", "fashion-mnist", *MODEL]
    if a.workers:
        write_folder(a.out / "folder", a.folder_images)
        run = ["--dataset", "imagefolder", "--data-root", str(a.out / "folder"), "--image-size", "28",
               "--val-size", str(a.folder_images // 6), "--workers", str(a.workers), *MODEL]
    ref, soak = a.out / "uninterrupted", a.out / "signalled"
    t0 = time.perf_counter()
    proc = train(run, ref, a.processes)
    if proc.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed: {proc.stderr.read()}")
    full = time.perf_counter() - t0
    rng = random.Random(a.seed)
    ends: dict[str, int] = {"saved and stopped": 0, "ended by the signal": 0}
    delays = []
    proc = train(run, soak, a.processes)
    for _ in range(a.cycles):
        delay = rng.uniform(*(a.delays or (2.0, max(3.0, full / 3))))
        time.sleep(delay)
        if proc.poll() is not None:
            break   # it finished before this signal
        os.killpg(proc.pid, signum)
        err = proc.communicate()[1]
        delays.append(round(delay, 1))
        end = ending(proc.returncode, err, signum, a.processes)
        if end is None:
            raise SystemExit(f"a life ended with exit {proc.returncode} after a SIG{a.signal}:\n{err}")
        ends[end] += 1
        resumable = (soak / "state.safetensors").is_file()
        proc = train(run, soak, a.processes, "--resume" if resumable else "--force")
    if proc.wait() != 0:
        raise SystemExit(f"the signalled run failed after {len(delays)} signals: {proc.stderr.read()}")
    wa, wb = load_file(ref / "state.safetensors"), load_file(soak / "state.safetensors")
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    acc_a = json.loads((ref / "summary.json").read_text())["test_accuracy"]
    acc_b = json.loads((soak / "summary.json").read_text())["test_accuracy"]
    data = f"an image folder of {a.folder_images} Fashion-MNIST images, {a.workers} DataLoader workers" \
        if a.workers else "Fashion-MNIST"
    launch = f"torchrun, {a.processes} processes, " if a.processes > 1 else ""
    print(f"vgg8 x0.125, {launch}{data}, 1 epoch, checkpoint every 20 steps; uninterrupted run {full:.0f} s")
    print(f"signal-and-resume cycles: {len(delays)} of {a.cycles} (SIG{a.signal} to the process group after "
          f"{delays} s of each life)")
    print("lives that " + ", ".join(f"{k}: {v}" for k, v in ends.items()) + "; tracebacks: 0")
    print(f"max |weight difference| vs uninterrupted: {worst:.3g}")
    for s in ("fusion", "last", "best"):
        print(f"test accuracy {s}: uninterrupted {100 * acc_a[s]:.2f}%, signalled {100 * acc_b[s]:.2f}%, "
              f"difference {100 * (acc_b[s] - acc_a[s]):+.2f} points")


if __name__ == "__main__":
    main()
