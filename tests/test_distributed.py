"""torchrun, 2 processes, gloo on the CPU: the same weights as 1 process at the doubled batch, and
a signal that stops every rank at one step, from which the run resumes, whether it came mid-step
or while a rank waited on its next batch."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from asge_edge.cli import main
from conftest import TINY_RUN, run_progress

# Summation order differs (each process sums half the batch, then the halves are added):
# measured max |difference| 2e-6 after 12 AdamW steps; 1e-4 leaves room, while a wrong
# scaling of the halves (a mean of means, or a missing all-reduce) is off by far more.
DDP_ATOL = 1e-4
RUN = [*TINY_RUN, "--epochs", "1"]


# Each rank counts the images it evaluates, by the size of the split (its part) they come
# from, and says so at exit.
COUNT_EVALUATED = """
import atexit
import asge_edge.evaluate as evaluation

real, seen = evaluation.batches, {}

def counted(split, *args, **kwargs):
    for x, y in real(split, *args, **kwargs):
        seen[len(split)] = seen.get(len(split), 0) + len(y)
        yield x, y

evaluation.batches = counted
atexit.register(lambda: print(f"rank {os.environ['RANK']} evaluated {seen}", file=sys.stderr))
"""


@pytest.mark.parametrize("method", ["asge", "bp"])
def test_two_gloo_processes_equal_one_at_the_doubled_batch(method, tmp_path):
    """The same weights, down to a last batch of one image, of which rank 0 holds none and
    still takes its step (a zero gradient); BP's head, like ASGE's, reads both ranks'
    features. And each rank validates and tests its half of each split, while the
    accuracies are the whole split's, as one process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    run = [*RUN, "--method", method, "--val-size", "127"]   # 641 training images: 10 batches of 64, then 1
    assert main(["train", *run, "--batch-size", "64", "--out", str(one)]) == 0
    done = _torchrun_patched(tmp_path, COUNT_EVALUATED, [*run, "--batch-size", "32"], two)
    # torchrun's own summary alone is about 2,000 characters: keep the ranks' messages before it
    assert done.returncode == 0, done.stderr[-8000:]
    a, b = load_file(one / "state.safetensors"), load_file(two / "state.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"max |1 process - 2 processes| over every tensor: {worst:.2e}")
    assert worst <= DDP_ATOL
    assert sum(k.startswith("model/layers.") and k.endswith("conv.weight") for k in a) == 7
    assert (two / "summary.json").is_file() and len((two / "metrics.jsonl").read_text().splitlines()) == 1
    # rank 0 has 63 of the 127 validation images and 96 of the 192 test images; lines may run together
    assert sorted(re.findall(r"rank (\d) evaluated (\{[^}]*\})", done.stderr)) == [("0", "{63: 63, 96: 96}"),
                                                                                  ("1", "{64: 64, 96: 96}")]
    m1, m2 = (json.loads((d / "metrics.jsonl").read_text()) for d in (one, two))
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    # the weights differ in the 6th digit (summation order), so allow one image to read otherwise
    val = ("val_layer_accuracy", "val_last_accuracy", "val_fusion_accuracy")
    for u, v in zip(_numbers(m1, *val), _numbers(m2, *val), strict=True):
        assert abs(u - v) <= 1 / 127 + 1e-9, (u, v)
    for u, v in zip(_numbers(s1, "layer_test_accuracy", "test_accuracy"),
                    _numbers(s2, "layer_test_accuracy", "test_accuracy"), strict=True):
        assert abs(u - v) <= 1 / 192 + 1e-9, (u, v)


def _numbers(record: dict, *keys: str) -> list[float]:
    """The numbers under ``keys`` of a metrics line or summary, lists and dicts flattened; a
    method that has no such figure reports None, which is skipped."""
    found = []
    for k in keys:
        v = record[k]
        found += list(v.values()) if isinstance(v, dict) else v if isinstance(v, list) else [v]
    numbers = [x for x in found if x is not None]
    assert numbers, record   # at least one, or the comparison proves nothing
    return numbers


def _torchrun(args, out, *extra):
    """``asge-edge train args --out out`` under torchrun: 2 gloo processes on the CPU."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", "29518", "-m", "asge_edge", "train", *args, "--device", "cpu",
                             "--out", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """(train arguments for 2 epochs of 44 steps on 2 processes; that run, uninterrupted)."""
    run = [*TINY_RUN, "--train-size", "3072", "--epochs", "2", "--batch-size", "32"]
    out = tmp_path_factory.mktemp("whole") / "run"
    done = _torchrun(run, out)
    assert done.wait(timeout=300) == 0, done.stderr.read()[-8000:]
    return run, out


def _stops(err):
    """The step of each rank's "interrupted (SIGTERM)" line; the ranks write at once, and
    their lines may run together, so the messages are counted, not the lines."""
    return [int(s) for s in re.findall(r"asge-edge: interrupted \(SIGTERM\) at epoch 1, step (\d+);", err)]


def _resumes_to(out, whole):
    resumed = _torchrun(["--resume", "--quiet"], out)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-8000:]
    a, b = load_file(whole / "state.safetensors"), load_file(out / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_stops_every_rank_at_one_step_then_resumes(whole, tmp_path):
    """torchrun hands a SIGTERM to every rank, and each sees it after a step of its own; they
    agree on one (World.max_signal), rank 0 saves it, and all exit 143 with one line each,
    where rank 1 used to die in a collective with gloo's "Connection closed by peer"."""
    run, whole = whole
    out = tmp_path / "run"
    proc = _torchrun(run, out, "--checkpoint-every", "1")
    t0 = time.time()
    while not ((p := run_progress(out)) and p["epoch"] == 0 and p.get("partial") and p["partial"]["batches"] >= 2):
        assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)   # to torchrun, which passes it on to the ranks
    _, err = proc.communicate(timeout=300)
    stops = _stops(err)
    assert len(stops) == 2 and stops[0] == stops[1], err[-8000:]   # both ranks, the same step
    assert "[rank" not in err and "Connection closed" not in err, err[-8000:]   # no rank's traceback
    assert stops[0] == run_progress(out)["step"]
    _resumes_to(out, whole)


def _torchrun_patched(tmp_path, patch, run, out):
    """``asge-edge train run --out out`` under torchrun, each rank having first run ``patch``
    (Python, with os, signal, time, ``trainer`` (asge_edge.train) and data.Stopped at hand)."""
    script = tmp_path / "patched.py"
    script.write_text("import os, signal, sys, time\nimport asge_edge.train as trainer\nfrom asge_edge.cli import main\n"
                      f"from asge_edge.data import Stopped\n{patch}\nsys.exit(main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29519", str(script), "train", *run, "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


# Rank 1's loader ends as a folder dataset's does when torchrun signals the rank's process
# group, DataLoader workers and all: while rank 1 waits on its 4th batch, which never
# comes, and before rank 0 has seen any signal.
LOADER_DIES_ON_RANK_1 = """
real = trainer.batches

def loader_dies(*args):
    for i, batch in enumerate(real(*args)):
        if i == 3 and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGTERM)
            raise Stopped
        yield batch

trainer.batches = loader_dies
"""


def test_a_rank_whose_loader_a_signal_ended_stops_every_rank_at_its_last_step(whole, tmp_path):
    """The rank that has no next batch cannot join the step the others start; so the ranks
    agree on the signal once each has its batch, before any of the step's collectives, and
    all stop after step 3. Before, rank 1 stopped alone and rank 0 died in gloo."""
    run, whole = whole
    out = tmp_path / "run"
    err = _torchrun_patched(tmp_path, LOADER_DIES_ON_RANK_1, run, out).stderr
    assert _stops(err) == [3, 3], err[-8000:]
    assert "[rank" not in err and "Connection closed" not in err, err[-8000:]
    p = run_progress(out)
    assert p["step"] == 3 and p["partial"]["batches"] == 3
    _resumes_to(out, whole)


def _signal_torchrun_as(function: str, rank: int) -> str:
    """A patch for _torchrun_patched: rank ``rank`` sends SIGTERM to torchrun as
    ``asge_edge.train.<function>`` starts, and gives torchrun 2 s to pass it on to every rank."""
    return f"""
real = trainer.{function}

def signalled(*args, **kwargs):
    if os.environ["RANK"] == "{rank}":
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(2)
    return real(*args, **kwargs)

trainer.{function} = signalled
"""


def test_a_signal_in_the_test_after_training_stops_every_rank_then_resumes_to_the_summary(whole, tmp_path):
    """Every rank tests its part, and a rank stopped by the signal still joins the sum of
    the counts, which stops the others: both print the same line. Rank 0 signals as the test
    starts. (Before session 20 rank 0
    tested alone, and rank 1 died of the signal while it waited at the final barrier, which
    ended rank 0 in gloo's "Connection closed by peer" traceback.)"""
    run, whole = whole
    out = tmp_path / "run"
    err = _torchrun_patched(tmp_path, _signal_torchrun_as("test_selected", 0), run, out).stderr
    assert err.count("asge-edge: interrupted (SIGTERM) after training, while testing;") == 2, err[-8000:]
    assert "[rank" not in err and "Connection closed" not in err, err[-8000:]
    assert not (out / "summary.json").exists() and run_progress(out)["epoch"] == 2
    _resumes_to(out, whole)
    accuracy = lambda d: json.loads((d / "summary.json").read_text())["test_accuracy"]   # noqa: E731
    assert accuracy(out) == accuracy(whole)


def test_a_signal_in_validation_stops_every_rank_then_resumes(whole, tmp_path):
    """Every rank validates its part and the counts are summed at the end; a rank that stops
    on the signal still joins that sum, which tells the others, so all stop after the epoch's
    last step, its training kept, and --resume validates it. Rank 1 signals as the first
    validation starts: rank 0 stops at its next validation batch, rank 1 at its first."""
    run, whole = whole
    out = tmp_path / "run"
    err = _torchrun_patched(tmp_path, _signal_torchrun_as("evaluate", 1), run, out).stderr
    assert _stops(err) == [44, 44], err[-8000:]
    assert "[rank" not in err and "Connection closed" not in err, err[-8000:]
    p = run_progress(out)
    assert p["epoch"] == 0 and p["step"] == 44 and p["partial"]["batches"] == 44
    _resumes_to(out, whole)
