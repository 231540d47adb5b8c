"""User errors: one line on stderr, exit code 2, no traceback, nothing overwritten."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asge_edge.checkpoint import RUN_FILES
from asge_edge.cli import main
from asge_edge.report import read_metrics
from conftest import TINY_RUN


def _one_line_error(capsys, argv, needle):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("asge-edge: error: ") and "\n" not in err, err
    assert needle in err, err


@pytest.mark.parametrize("argv,needle", [
    (["train", "--model", "vgg99"], "'vgg99': it is neither a preset nor a layer list"),
    (["plan", "--model", "16,M,32"], "'M' is neither a channel count (>= 1) nor P"),
    (["train", "--dataset", "imagenet22k"], "invalid choice"),
    (["train", "--width", "-1"], "--width"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--input-shape", "3x32"], "CxHxW"),
    (["train", "--lr", "fast"], "--lr"),
    (["train", "--workers", "-1"], "--workers"),
    (["train", "--lr", "1e-3", "--lr-min", "1e-2"], "at most 0.001"),
    (["train", "--width", "1", "--lr-min", "1e-3"], "at most 0.00075"),   # the auto lr at full width
    (["train", "--optimizer", "sgd", "--momentum", "2"], "momentum in [0, 1)"),
    (["train", "--input-shape", "3x32x32"], "--input-shape applies to --dataset synthetic only"),
    (["train", "--dataset", "cifar10", "--image-size", "32"], "--image-size applies to --dataset imagefolder only"),
    (["infer", "model.onnx", "--images", "x.npy", "--threshold", "2"], "(0, 1]"),
    (["plan", "--memory-budget", "1e400"], "the most a 64-bit size can hold"),
    (["train", "--seed", str(2**63)], "--seed: must be at most 2^63 - 1"),
    (["train", "--seed", "-1"], "--seed: must be >= 0"),
    (["train", "--no-such-flag"], "unrecognized"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_flags(capsys, argv, needle):
    _one_line_error(capsys, argv, needle)


def test_the_largest_seed_trains(tmp_path):
    # each epoch's data order is seeded from the run's seed; that seed must stay in 64 bits
    assert main(["train", *TINY_RUN, "--train-size", "128", "--epochs", "2", "--seed", str(2**63 - 1),
                 "--out", str(tmp_path)]) == 0


def _failed_allocation() -> RuntimeError:
    """What torch's CPU allocator raises for more memory than an address space holds."""
    import torch

    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as e:
        return e
    raise AssertionError("allocated 2^62 bytes")


@pytest.mark.parametrize("error,needle", [
    (_failed_allocation(), "out of memory: an allocation of 4611686.02 TB failed; give a --memory-budget"),
    (MemoryError(), "out of memory; give a --memory-budget"),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB"),
     "out of memory: an allocation of 20.00 GiB failed; give a --memory-budget"),   # torch.OutOfMemoryError's text
])
def test_a_failed_allocation_is_one_line_that_names_the_fix(capsys, monkeypatch, tmp_path, error, needle):
    def build_net(_):
        raise error

    monkeypatch.setattr("asge_edge.train.build_net", build_net)
    _one_line_error(capsys, ["train", *TINY_RUN, "--out", str(tmp_path)], needle)


def test_any_other_runtime_error_keeps_its_traceback(monkeypatch, tmp_path):
    def build_net(_):
        raise RuntimeError("a bug")

    monkeypatch.setattr("asge_edge.train.build_net", build_net)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", *TINY_RUN, "--out", str(tmp_path)])


def test_a_runs_file_given_for_its_directory_is_named(capsys, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    for command in (["eval"], ["export"], ["simulate", "--ram", "256KB"]):
        _one_line_error(capsys, [*command, str(tmp_path / "model.safetensors")], "is a file; pass the run directory")


def test_missing_dataset_root_names_the_fix(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                    "apt-get install dataset-fashion-mnist")


def test_cifar_without_root(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--dataset", "cifar10", "--data-root", str(tmp_path), "--out",
                             str(tmp_path / "o")], "--download")


def test_input_too_small_for_model(capsys, tmp_path):
    _one_line_error(capsys, ["train", *TINY_RUN, "--input-shape", "1x4x4", "--out", str(tmp_path / "o")],
                    "input 4x4 is too small")


def test_one_class_is_refused(capsys, tmp_path):
    _one_line_error(capsys, ["train", *TINY_RUN, "--num-classes", "1", "--out", str(tmp_path / "o")],
                    "at least 2")


def test_imagefolder_with_one_class_is_refused(capsys, tmp_path):
    from PIL import Image

    for sub in ("train", "val"):
        (tmp_path / sub / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / sub / "cat" / "0.png")
    _one_line_error(capsys, ["train", "--dataset", "imagefolder", "--data-root", str(tmp_path),
                             "--out", str(tmp_path / "o")], "at least 2")


def _two_class_folder(root, images_per_class=4):
    from PIL import Image

    for sub in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / sub / cls).mkdir(parents=True)
            for i in range(images_per_class):
                Image.new("RGB", (8, 8)).save(root / sub / cls / f"{i}.png")


def test_imagefolder_class_without_images_is_refused(capsys, tmp_path):
    _two_class_folder(tmp_path, images_per_class=0)
    _one_line_error(capsys, ["train", "--dataset", "imagefolder", "--data-root", str(tmp_path),
                             "--out", str(tmp_path / "o")], "every class folder needs images")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_imagefolder_unreadable_image_names_the_file(capsys, tmp_path, workers):
    _two_class_folder(tmp_path)
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    _one_line_error(capsys, ["train", "--dataset", "imagefolder", "--data-root", str(tmp_path), "--image-size", "8",
                             "--val-size", "2", "--epochs", "1", "--quiet", "--workers", workers,
                             "--out", str(tmp_path / "o")], "broken.png is not a readable image")


def test_eval_of_a_strategy_the_run_did_not_train(capsys, tmp_path):
    assert main(["train", *TINY_RUN, "--method", "bp", "--epochs", "1", "--out", str(tmp_path / "bp")]) == 0
    _one_line_error(capsys, ["eval", str(tmp_path / "bp"), "--strategy", "best"], "use last")


def test_non_empty_out_is_not_overwritten(capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    _one_line_error(capsys, ["train", *TINY_RUN, "--out", str(tmp_path)], "--force")
    assert (tmp_path / "keep.txt").read_text() == "precious"


def _copy_run(run: Path, to: Path) -> Path:
    """The files that training wrote in ``run`` (not what other tests exported into it), in ``to``."""
    to.mkdir()
    for name in RUN_FILES:
        shutil.copy(run / name, to / name)
    return to


@pytest.mark.parametrize("flags,needle", [
    (["--val-size", "100000"], "--val-size must be between"),   # refused by the data
    (["--input-shape", "1x4x4"], "input 4x4 is too small"),     # by the model
    (["--memory-budget", "1KB"], "the smallest that works"),    # by the planner
])
def test_force_refused_later_leaves_the_old_run_whole(capsys, tiny_run, tmp_path, flags, needle):
    run = _copy_run(tiny_run, tmp_path / "run")
    before = {name: (run / name).read_bytes() for name in RUN_FILES}
    _one_line_error(capsys, ["train", *TINY_RUN, *flags, "--force", "--out", str(run)], needle)
    assert {name: (run / name).read_bytes() for name in RUN_FILES} == before


def test_force_keeps_other_files_and_names_them(capsys, tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    (run / "model_exit3.onnx").write_bytes(b"old export")
    assert main(["train", *TINY_RUN, "--epochs", "1", "--force", "--out", str(run)]) == 0
    assert "keeps model_exit3.onnx, made before this run: export again" in capsys.readouterr().err
    assert (run / "model_exit3.onnx").read_bytes() == b"old export"
    assert len(read_metrics(run / "metrics.jsonl")) == 1   # the old run's 3 epochs are gone


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(capsys, tmp_path):
    import os

    from asge_edge.runlock import run_lock

    out = tmp_path / "run"
    out.mkdir()
    with run_lock(out):   # as a first run would, from another open of the lock file
        _one_line_error(capsys, ["train", *TINY_RUN, "--out", str(out)], f"in use by another asge-edge train (pid {os.getpid()})")
        _one_line_error(capsys, ["train", *TINY_RUN, "--out", str(out), "--force"], "in use")
    assert main(["train", *TINY_RUN, "--epochs", "1", "--out", str(out)]) == 0   # the file left behind blocks nothing
    assert main(["train", *TINY_RUN, "--epochs", "1", "--out", str(out)]) == 2   # the run's outputs do


def test_resume_refuses_a_flag_that_would_change_the_run(capsys, tiny_run):
    before = (tiny_run / "state.safetensors").read_bytes()
    _one_line_error(capsys, ["train", "--resume", "--out", str(tiny_run), "--epochs=9", "--model", "vgg11",
                             "--width", "0.125"],   # the run's own width: no change
                    "--model vgg11 (the run has vgg8); --epochs 9 (the run has 3) would change; drop those flags")
    assert (tiny_run / "state.safetensors").read_bytes() == before


def test_resume_takes_a_layer_list_typed_another_way_and_refuses_another_list(capsys, tmp_path):
    out, args = tmp_path / "run", [*TINY_RUN, "--train-size", "128", "--epochs", "1"]
    assert main(["train", *args, "--model", "8,P,16", "--out", str(out)]) == 0
    assert main(["train", *args, "--model", " 8, p,16", "--resume", "--out", str(out)]) == 0   # the same list
    _one_line_error(capsys, ["train", *args, "--model", "8,P,32", "--resume", "--out", str(out)],
                    "--model 8,P,32 (the run has 8,P,16) would change")


def test_resume_without_state(capsys, tmp_path):
    _one_line_error(capsys, ["train", *TINY_RUN, "--out", str(tmp_path), "--resume"], "nothing to resume")


def test_eval_of_a_directory_that_is_not_a_run(capsys, tmp_path):
    _one_line_error(capsys, ["eval", str(tmp_path)], "not found")


def test_corrupt_checkpoint(capsys, tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    _one_line_error(capsys, ["eval", str(run)], "corrupt or truncated")


@pytest.mark.parametrize("section,name,value,needle", [
    ("model", "width", "abc", "model.width is 'abc', not float"),
    ("train", "epochs", 1.5, "train.epochs is 1.5, not int"),
    ("data", "augment", 0, "data.augment is 0, not bool"),
    ("train", "method", "xyz", "unknown method 'xyz': use asge, bp"),
    ("model", "pool", "xyz", "unknown pool 'xyz'"),
    ("model", "arch", "P,16", "model 'P,16': each P must follow a conv layer's channel count"),
])
def test_a_config_edited_wrong_is_one_line(capsys, tiny_run, tmp_path, section, name, value, needle):
    import json

    run = _copy_run(tiny_run, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg[section][name] = value
    (run / "config.json").write_text(json.dumps(cfg))
    _one_line_error(capsys, ["eval", str(run)], needle)
    _one_line_error(capsys, ["train", "--resume", "--out", str(run)], needle)


@pytest.mark.parametrize("text", ['{"best_layer": "x"}', "[1, 2]", '{"best_layer": 99}'])
def test_a_summary_edited_wrong_is_one_line_and_resume_writes_it_again(capsys, tiny_run, tmp_path, text):
    import json

    run = _copy_run(tiny_run, tmp_path / "run")
    (run / "summary.json").write_text(text)
    _one_line_error(capsys, ["export", str(run), "--early-exit"], "write it again with 'asge-edge train --resume")
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text()) == json.loads((tiny_run / "summary.json").read_text())


def test_resume_with_its_metrics_lost_is_one_line(capsys, tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    (run / "metrics.jsonl").unlink()
    _one_line_error(capsys, ["train", "--resume", "--out", str(run)], "metrics.jsonl holds 0 epochs where the saved state has 3")


@pytest.mark.parametrize("line", ["{bad", '{"epoch": 1}', "[1, 2]"])
def test_resume_with_a_metrics_line_edited_wrong_is_one_line(capsys, tiny_run, tmp_path, line):
    run = _copy_run(tiny_run, tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], line, *lines[2:]]) + "\n")
    _one_line_error(capsys, ["train", "--resume", "--out", str(run)], "metrics.jsonl line 2 is not an epoch's record")


def test_pickle_is_refused(capsys, tiny_run, tmp_path):
    import pickle
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    _one_line_error(capsys, ["eval", str(run)], "corrupt or truncated")


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "asge_edge", "train", "--width", "0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_reader_gone_from_stdout_stops_quietly_as_a_pipes_writer_does():
    read_end, write_end = os.pipe()
    os.close(read_end)   # no reader at all, so the first write fails, whatever the timing
    done = subprocess.run([sys.executable, "-m", "asge_edge", "plan", "--input-shape", "3x32x32", "--json"],
                          stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    assert done.returncode == 141 and done.stderr == ""
