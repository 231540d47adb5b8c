"""Crash safety and bad input: SIGKILL, SIGINT and SIGTERM mid-epoch (to the trainer alone, and to
its whole process group with DataLoader workers), NaN losses, refused inputs."""

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from asge_edge.cli import main
from asge_edge.data import Stopped
from asge_edge.methods import ASGEMethod
from conftest import TINY_RUN, mixed_image_folder, run_progress

# A run long enough to be stopped mid-epoch: 22 steps per epoch (1,536 images less 10% for validation).
LONG = [*TINY_RUN, "--train-size", "1536", "--epochs", "2"]


def _start(out, *extra, run=LONG, **popen):
    return subprocess.Popen([sys.executable, "-m", "asge_edge", "train", *run, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _wait_mid_epoch(proc, out, timeout=120):
    """The first mid-epoch checkpoint of epoch 1 (a whole epoch is still to come, so a signal
    sent now lands mid-run however slow the machine is)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        p = run_progress(out)
        if p and p["epoch"] == 0 and p.get("partial") and p["partial"]["batches"] >= 2:
            return p
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError("no mid-epoch checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(["train", *LONG, "--out", str(out)]) == 0
    return out


def _same_run(a, b):
    sa, sb = load_file(a / "state.safetensors"), load_file(b / "state.safetensors")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ma = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(ma, mb):
        for key in ("lr", "train_layer_loss", "train_layer_accuracy", "val_layer_accuracy", "val_fusion_accuracy"):
            assert ra[key] == rb[key], key
    assert len(ma) == len(mb) == 2


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "--checkpoint-every", "3")
    p = _wait_mid_epoch(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert p["step"] % 3 == 0 and 0 < p["partial"]["batches"] < 22   # a mid-epoch checkpoint
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    _same_run(out, uninterrupted)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])   # Ctrl-C; preemption
def test_a_signal_saves_and_exits_cleanly_then_resumes(uninterrupted, tmp_path, signum):
    out = tmp_path / "run"
    proc = _start(out, "--checkpoint-every", "1")
    _wait_mid_epoch(proc, out)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and f"({signum.name})" in err and "continue with --resume" in err
    assert run_progress(out)["partial"] is not None
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    _same_run(out, uninterrupted)


def test_a_signal_while_the_next_batch_loads_saves_the_last_step_done(uninterrupted, tmp_path, monkeypatch,
                                                                      capsys):
    """A process-group SIGTERM also ends the DataLoader's workers, and a trainer waiting on
    them gets data.Stopped from the loader (test_data has the loader's side): the steps done
    are saved, and the run resumes as if never stopped."""
    import asge_edge.train as trainer

    real = trainer.batches

    def loader_dies(*args):
        for i, batch in enumerate(real(*args)):
            if i == 3:   # the fourth batch of the epoch never arrives
                os.kill(os.getpid(), signal.SIGTERM)
                raise Stopped
            yield batch

    monkeypatch.setattr(trainer, "batches", loader_dies)
    out = tmp_path / "run"
    assert main(["train", *LONG, "--out", str(out)]) == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM) at epoch 1, step 3;" in capsys.readouterr().err
    p = run_progress(out)
    assert p["step"] == 3 and p["partial"]["batches"] == 3
    monkeypatch.undo()
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    _same_run(out, uninterrupted)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(train arguments for a 2-epoch run on an image folder with 2 DataLoader workers, 7 steps
    an epoch; that run, uninterrupted)."""
    root = tmp_path_factory.mktemp("folder")
    mixed_image_folder(root / "data", per_class=20)
    run = ["--dataset", "imagefolder", "--data-root", str(root / "data"), "--image-size", "16", "--val-size", "6",
           "--width", "0.0625", "--epochs", "2", "--batch-size", "8", "--workers", "2", "--quiet"]
    assert main(["train", *run, "--out", str(root / "whole")]) == 0
    return run, root / "whole"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_with_loader_workers_saves_then_resumes(folder, tmp_path, signum):
    """As a terminal's Ctrl-C and a scheduler's preemption signal every process of a job:
    the trainer and its DataLoader workers alike. The workers end cleanly, and the trainer
    saves the last step it finished, whether it was mid-step or waiting on the next batch."""
    run, whole = folder
    out = tmp_path / "run"
    proc = _start(out, "--checkpoint-every", "1", run=run, start_new_session=True)   # its own process group
    _wait_mid_epoch(proc, out)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and f"({signum.name})" in err
    saved = int(re.search(r"epoch 1, step (\d+);", err).group(1))
    assert run_progress(out)["step"] == saved
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    _same_run(out, whole)


def test_a_signal_during_validation_keeps_the_epochs_training(uninterrupted, tmp_path, monkeypatch, capsys):
    import asge_edge.train as trainer

    real = trainer.evaluate

    def signalled(*args, **kwargs):   # Ctrl-C as validation starts
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", signalled)
    out = tmp_path / "run"
    assert main(["train", *LONG, "--out", str(out)]) == 130
    assert "interrupted (SIGINT) at epoch 1, step 22" in capsys.readouterr().err
    p = run_progress(out)
    assert p["epoch"] == 0 and p["partial"]["batches"] == 22   # trained whole, not yet validated
    monkeypatch.undo()
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    _same_run(out, uninterrupted)


def test_a_signal_during_the_test_after_training_resumes_to_the_summary(uninterrupted, tmp_path, monkeypatch,
                                                                       capsys):
    import asge_edge.train as trainer

    real, calls = trainer.evaluate, []

    def signalled(*args, **kwargs):   # SIGTERM as the test starts, after 2 epochs' validation
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", signalled)
    out = tmp_path / "run"
    assert main(["train", *LONG, "--out", str(out)]) == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM) after training, while testing" in capsys.readouterr().err
    assert not (out / "summary.json").exists() and run_progress(out)["epoch"] == 2
    monkeypatch.undo()
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    _same_run(out, uninterrupted)
    done, whole = (json.loads((d / "summary.json").read_text()) for d in (out, uninterrupted))
    assert done["test_accuracy"] == whole["test_accuracy"]


def test_nan_loss_stops_naming_the_layer_and_keeps_the_last_good_state(monkeypatch, capsys, tmp_path):
    original, calls = ASGEMethod.train_step, []

    def poisoned(self, x, y):
        stats = original(self, x, y)
        calls.append(1)
        if len(calls) == 5:
            stats.layer_loss[2] = float("nan")
        return stats

    monkeypatch.setattr(ASGEMethod, "train_step", poisoned)
    out = tmp_path / "run"
    assert main(["train", *TINY_RUN, "--checkpoint-every", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "layer 3" in err and "non-finite" in err and "the last good checkpoint" in err
    assert run_progress(out)["step"] == 4   # the checkpoint before the bad step


def test_nan_loss_before_any_checkpoint_says_that_none_was_saved(monkeypatch, capsys, tmp_path):
    original = ASGEMethod.train_step

    def poisoned(self, x, y):
        stats = original(self, x, y)
        stats.layer_loss[0] = float("nan")
        return stats

    monkeypatch.setattr(ASGEMethod, "train_step", poisoned)
    out = tmp_path / "run"
    assert main(["train", *TINY_RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "layer 1" in err and "before any checkpoint was saved" in err, err
    assert not (out / "state.safetensors").exists()


def _one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asge-edge: error: ") and "\n" not in err and needle in err, err


@pytest.mark.parametrize("budget,needle", [("12XB", "64MB, 64MiB"), ("0", "64MB, 64MiB"), ("-5MB", "64MB, 64MiB"),
                                           ("1KB", "smallest that works")])
def test_bad_budgets(capsys, tmp_path, budget, needle):
    _one_line(capsys, ["train", *TINY_RUN, f"--memory-budget={budget}", "--out", str(tmp_path / "o")], needle)
    assert not (tmp_path / "o" / "state.safetensors").exists()


def test_unwritable_output_directory(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    _one_line(capsys, ["train", *TINY_RUN, "--out", str(tmp_path / "file" / "run")], "choose another --out")


def test_a_refused_write_is_one_line_and_leaves_the_old_file(monkeypatch, tmp_path):
    import errno

    from asge_edge.checkpoint import atomic_write
    from asge_edge.errors import UserError

    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"cannot write .*\(Not a directory\); choose another --out$"):
        atomic_write(tmp_path / "file" / "model.onnx", b"data")     # its directory is a file: no advice to free space
    target = tmp_path / "summary.json"
    target.write_text("old")

    def disk_full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(UserError, match="No space left on device.*; free space there"):
        atomic_write(target, b"new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "summary.json"]   # no temporary left


def test_a_write_never_replaces_what_is_not_a_regular_file(capsys, tiny_run, tmp_path):
    fifo = tmp_path / "pipe.onnx"   # stands for /dev/null, which a rename would turn into a file
    os.mkfifo(fifo)
    _one_line(capsys, ["export", str(tiny_run), "--early-exit", "--out", str(fifo)], "it is not a regular file")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert os.listdir(tmp_path) == ["pipe.onnx"]


def test_checkpoint_of_another_model_is_refused(capsys, tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["width"] = 0.25
    (run / "config.json").write_text(json.dumps(cfg))
    _one_line(capsys, ["eval", str(run)], "does not match the model")


def test_checkpoint_of_another_format_version_is_refused(capsys, tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    path = run / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(path), str(path), metadata={**meta, "format_version": "99"})
    _one_line(capsys, ["eval", str(run)], "reads format 1")


def test_a_pickle_in_place_of_the_state_is_refused_on_resume(capsys, tiny_run, tmp_path):
    import pickle

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "state.safetensors").write_bytes(pickle.dumps({"step": os.getpid()}))
    _one_line(capsys, ["train", "--resume", "--out", str(run)], "corrupt or truncated")


def test_no_code_path_unpickles():
    """Only safetensors, JSON, protobuf (ONNX) and plain arrays are read: no pickle anywhere."""
    root = Path(__file__).resolve().parents[1]
    sources = [p for d in ("asge_edge", "export", "bench") for p in (root / d).rglob("*.py")]
    assert len(sources) > 20
    banned = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle=True|import pickle|(?<![.\w])(eval|exec)\(")
    for path in sources:
        hit = banned.search(path.read_text())
        assert hit is None, f"{path.name} uses {hit.group(0)}"
