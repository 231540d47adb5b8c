"""End to end through the CLI: a short synthetic run learns, writes its outputs, and reloads."""

import io
import json
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from asge_edge.checkpoint import load_run
from asge_edge.cli import main
from asge_edge.data import load_splits
from conftest import TINY_RUN


def test_short_synthetic_run_learns_well_above_chance(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["test_accuracy"]["fusion"] > 0.85      # chance is 0.25
    assert summary["test_accuracy"]["best"] > 0.85
    assert 1 <= summary["best_layer"] <= 7
    assert summary["layer_val_accuracy"][summary["best_layer"] - 1] == max(summary["layer_val_accuracy"])


def test_run_writes_every_output(tiny_run):
    for name in ("model.safetensors", "config.json", "metrics.jsonl", "layer_accuracy.png", "summary.json",
                 "state.safetensors"):
        assert (tiny_run / name).is_file(), name
    lines = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert all(len(r["train_layer_loss"]) == 7 and len(r["val_layer_accuracy"]) == 7 for r in lines)
    summary = json.loads((tiny_run / "summary.json").read_text())
    for key in ("test_accuracy", "best_layer", "layer_val_accuracy", "layer_test_accuracy", "train_seconds",
                "images_per_second"):
        assert key in summary
    assert set(summary["test_accuracy"]) == {"fusion", "last", "best"}
    assert (tiny_run / "layer_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tensors = load_file(str(tiny_run / "model.safetensors"))
    assert {"layers.0.proj_w", "layers.6.proj_b", "last_head.fc.weight", "fusion_head.fc.weight", "fusion_head.running_var", "mean"} <= set(tensors)


def test_checkpoint_round_trip_gives_identical_logits(tiny_run, device):
    cfg, net, _ = load_run(tiny_run)
    _, net2, _ = load_run(tiny_run)
    x = load_splits(cfg.data).test.images[:16].float().div(255)
    net.eval(), net2.eval()
    with torch.no_grad():
        a, b = net(x), net2(x)
    for la, lb in zip((*a.layer_logits, a.last, a.fusion), (*b.layer_logits, b.last, b.fusion)):
        assert torch.equal(la, lb)


def test_eval_reproduces_the_summary(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert result["best_layer"] == summary["best_layer"]
    for k, v in summary["test_accuracy"].items():
        assert result["test_accuracy"][k] == pytest.approx(v, abs=1e-6)


def test_eval_shows_progress_on_stderr_unless_quiet(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--json", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    json.loads(out)   # the bars stay out of the JSON
    assert "validation:" in err and "test:" in err
    assert main(["eval", str(tiny_run), "--json", "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_eval_prints_the_per_layer_table_of_the_run(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    summary = json.loads((tiny_run / "summary.json").read_text())
    rows = [line.split() for line in printed[1:] if line.strip() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(1, len(summary["layer_test_accuracy"]) + 1))
    for r, val, test in zip(rows, summary["layer_val_accuracy"], summary["layer_test_accuracy"]):
        assert (float(r[5].rstrip("%")), float(r[6].rstrip("%"))) == (round(100 * val, 2), round(100 * test, 2))
    best = summary["best_layer"]
    assert rows[best - 1][-1] == "best" and f"test accuracy best (layer {best})" in "\n".join(printed)


def test_bp_baseline_runs_and_reports_last_only(tmp_path, capsys):
    out = tmp_path / "bp"
    loud = [a for a in TINY_RUN if a != "--quiet"]
    assert main(["train", *loud, "--method", "bp", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"]["last"] > 0.6
    assert summary["test_accuracy"]["fusion"] is None and summary["best_layer"] is None
    # BP trains neither the layers' fixed projections nor the Fusion head: they read at
    # chance, so no file and no line reports them as accuracies
    assert summary["layer_val_accuracy"] is None and summary["layer_test_accuracy"] is None
    assert summary["val_accuracy"] == {"fusion": None, "last": summary["val_accuracy"]["last"], "best": None}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["val_layer_accuracy"] is None and record["train_layer_accuracy"] is None
        assert record["val_fusion_accuracy"] is None and record["val_last_accuracy"] > 0.1
    printed = capsys.readouterr().out
    epochs = [line for line in printed.splitlines() if line.startswith("epoch ")]
    assert epochs and all("last" in line and "fusion" not in line and "val layers" not in line for line in epochs)
    rows = [r for r in map(str.split, printed.splitlines()) if len(r) == 7 and r[0].isdigit()]   # the layer table
    assert len(rows) == 7 and all(r[-2:] == ["n/a", "n/a"] for r in rows)
    assert "<- best" not in printed and "(layer" not in printed
    assert main(["eval", str(out), "--device", "cpu", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["layer_test_accuracy"] is None and again["best_layer"] is None
    assert again["test_accuracy"]["last"] == summary["test_accuracy"]["last"]


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_run_says_when_the_cpu_emulates_its_precision(tmp_path, capsys, amp):
    # Without native kernels (AVX512-BF16/AMX), CPU autocast emulates bf16 several times
    # slower than fp32 (bench/amp_cpu.py); a user who asked for it hears so once.
    loud = [a for a in TINY_RUN if a != "--quiet"]
    args = [*loud, "--amp", amp, "--epochs", "1", "--train-size", "256", "--device", "cpu"]
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 0
    emulated = amp == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert ("note: this CPU has no native bf16 kernels" in capsys.readouterr().out) == emulated


def test_run_takes_the_auto_lr_of_its_width(tmp_path, capsys):
    # 1 epoch: the short-run boost, capped at 15 / (width / 0.25) = 7.5x at width 0.5
    loud = [a for a in TINY_RUN if a != "--quiet"]
    args = [*loud, "--width", "0.5", "--epochs", "1", "--train-size", "128"]
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 0
    assert "lr 0.0015 (auto) -> 1e-05," in capsys.readouterr().out


def test_progress_bar_shows_the_layer_losses_from_the_first_step(tmp_path, capsys):
    loud = [a for a in TINY_RUN if a != "--quiet"]
    args = [*loud, "--epochs", "1", "--train-size", "256"]   # 4 steps, fewer than PROGRESS_EVERY
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 0
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert "loss " in bar and "| fusion" in bar
    assert "validation:" in bar and "test:" in bar   # the evaluations' bars


def test_progress_bar_into_a_log_redraws_rarely(tmp_path, capsys, monkeypatch):
    """Into a file or pipe every redraw stays in the log: steps slower than tqdm's terminal
    rate must not each add one."""
    from asge_edge.methods import ASGEMethod
    real = ASGEMethod.train_step

    def slow_step(self, x, y):
        time.sleep(0.15)   # longer than tqdm's 0.1 s terminal interval
        return real(self, x, y)

    monkeypatch.setattr(ASGEMethod, "train_step", slow_step)
    loud = [a for a in TINY_RUN if a != "--quiet"]
    assert main(["train", *loud, "--epochs", "1", "--train-size", "512", "--out", str(tmp_path / "run")]) == 0   # 8 steps
    redraws = capsys.readouterr().err.count("epoch 1/1:")
    assert 1 <= redraws <= 3   # the first step's, and the bar's opening and closing lines at most


def test_progress_bar_into_a_log_is_not_redrawn_by_tqdms_monitor(monkeypatch):
    """tqdm's monitor thread redraws a bar idle for ``maxinterval`` seconds (10 by default),
    so a bar with slow steps drew every 10-20 s into a log, not every LOG_INTERVAL."""
    from asge_edge.report import LOG_INTERVAL, progress_bar
    monkeypatch.setattr(sys, "stderr", io.StringIO())   # a log, not a terminal
    bar = progress_bar(10, "epoch 1/1")
    try:
        assert bar.mininterval == LOG_INTERVAL
        assert bar.maxinterval >= LOG_INTERVAL
    finally:
        bar.close()


def _interrupted_in_epoch_2(monkeypatch, args, out):
    """Run ``train args --out out``, interrupted as epoch 2 starts (exit 130)."""
    from asge_edge.train import _Run
    real = _Run.train_epoch

    def crash_on_epoch_2(self, *rest):
        if self.epoch == 2:
            raise KeyboardInterrupt
        return real(self, *rest)

    monkeypatch.setattr(_Run, "train_epoch", crash_on_epoch_2)
    assert main(["train", *args, "--out", str(out)]) == 130
    monkeypatch.setattr(_Run, "train_epoch", real)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch):
    args = [*TINY_RUN, "--epochs", "2"]
    assert main(["train", *args, "--out", str(tmp_path / "a")]) == 0
    _interrupted_in_epoch_2(monkeypatch, args, tmp_path / "b")
    assert main(["train", *args, "--out", str(tmp_path / "b"), "--resume"]) == 0

    a, b = (load_file(str(tmp_path / r / "state.safetensors")) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (json.loads((tmp_path / r / "summary.json").read_text()) for r in "ab")
    assert sa["test_accuracy"] == sb["test_accuracy"]


def test_resume_may_change_the_memory_budget_and_the_data_root(tmp_path, monkeypatch):
    """A run started without a budget goes on streaming within one (--memory-budget is how a
    run computes, not what; --data-root where its data lives): the plan, the measurement and
    config.json follow them."""
    args = [*TINY_RUN, "--epochs", "2"]
    _interrupted_in_epoch_2(monkeypatch, args, tmp_path)
    assert main(["train", "--resume", "--out", str(tmp_path), "--memory-budget", "2MB", "--quiet",
                 "--data-root", str(tmp_path / "moved")]) == 0   # synthetic data reads no root
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["train"]["memory_budget"] == 2_000_000 and cfg["data"]["root"] == str(tmp_path / "moved")
    memory = json.loads((tmp_path / "summary.json").read_text())["memory"]
    assert memory["budget_bytes"] == 2_000_000 and (memory["micro_batch"], memory["accumulation_steps"]) == (16, 4)
    assert memory["measured_peak_bytes"] <= memory["budget_bytes"]
