"""firmware_sim: the C build and CTest, export to C, the arena planner, parity with ONNX Runtime."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from asge_edge.checkpoint import load_run
from asge_edge.cli import main
from asge_edge.config import ModelConfig
from asge_edge.data import load_splits
from asge_edge.errors import UserError
from asge_edge.models import ASGENet, layer_specs
from export import firmware
from export.firmware import ROOT, build_fsim, compare, run_fsim
from export.graph import LayerTrace
from export.to_c import C_MAX_ABS_TOL, C_NMSE_TOL, MAX_LAYERS, TILE, arena_bytes, write_c_model
from export.to_onnx import export_onnx
from export.verify import session

# The CPU-sized demo model (vgg8 x0.25 on Fashion-MNIST) cut after layer 6, its usual best.
DEMO_ARENA_BYTES = 230_416


@pytest.fixture(scope="session")
def fsim(tmp_path_factory):
    """fsim built with warnings as errors, ASan and UBSan; CTest run once in that build."""
    build = tmp_path_factory.mktemp("fsim-build")
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DFSIM_WERROR=ON", "-DFSIM_SANITIZE=ON"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    return build


def test_ctest_passes_under_sanitizers(fsim):
    done = subprocess.run(["ctest", "--test-dir", str(fsim), "--output-on-failure"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 tests passed" in done.stdout or "100% tests passed" in done.stdout


def test_portable_kernel_passes_ctest(tmp_path):
    """Without -march=native (baseline x86-64: no AVX2) the portable C tile kernel runs."""
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DFSIM_NATIVE=OFF", "-DFSIM_WERROR=ON",
                    "-DFSIM_SANITIZE=ON"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(tmp_path), "-j2"], check=True, capture_output=True)
    done = subprocess.run(["ctest", "--test-dir", str(tmp_path), "--output-on-failure"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def c_model(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("c")
    assert main(["export", str(tiny_run), "--early-exit", "--format", "c", "--out", str(out)]) == 0
    return out


def _images(run, n):
    cfg, net, _ = load_run(run)
    return (load_splits(cfg.data).test.images[:n].float() / 255).numpy(), cfg, net.eval()


def test_c_and_python_planners_agree_and_model_h_carries_the_arena(tiny_run, c_model, fsim):
    x, cfg, net = _images(tiny_run, 2)
    k = json.loads((tiny_run / "summary.json").read_text())["best_layer"]
    _, _, used = run_fsim(fsim / "fsim", c_model / "model.bin", x)
    assert used == arena_bytes(net.specs, k)
    header = (c_model / "model.h").read_text()
    assert f"#define FSIM_ARENA_BYTES {used}u" in header
    assert f"#define FSIM_MODEL_BYTES {(c_model / 'model.bin').stat().st_size}u" in header


def test_demo_model_arena_is_pinned_and_fits_256kb():
    specs = layer_specs(ModelConfig(width=0.25), (1, 28, 28), 10)
    assert arena_bytes(specs, 6) == DEMO_ARENA_BYTES <= 256_000


def test_layer_by_layer_parity_with_onnx_runtime(tiny_run, c_model, fsim, tmp_path):
    x, cfg, net = _images(tiny_run, 6)
    k = json.loads((tiny_run / "summary.json").read_text())["best_layer"]
    names = [f"layer{i}" for i in range(1, k)] + ["logits"]
    export_onnx(LayerTrace(net, k), tuple(cfg.info.input_shape), tmp_path / "t.onnx", "images", names, 18, {})
    ref = session(tmp_path / "t.onnx").run(None, {"images": x})
    logits, _, _ = run_fsim(fsim / "fsim", c_model / "model.bin", x, dump_prefix=str(tmp_path / "layer"))
    for i, r in enumerate(ref[:-1], start=1):
        got = np.fromfile(tmp_path / f"layer{i}.f32", dtype="<f4").reshape(r.shape)
        nmse, max_abs = compare(got, r)
        print(f"layer {i}: nmse {nmse:.2e} max abs {max_abs:.2e}")
        assert nmse <= C_NMSE_TOL and max_abs <= C_MAX_ABS_TOL
    nmse, max_abs = compare(logits, ref[-1])
    print(f"logits: nmse {nmse:.2e} max abs {max_abs:.2e}")
    assert nmse <= C_NMSE_TOL and max_abs <= C_MAX_ABS_TOL


def test_model_h_links_into_a_firmware_style_program(tiny_run, c_model, fsim, tmp_path):
    x, _, _ = _images(tiny_run, 1)
    src = tmp_path / "app.c"
    src.write_text(f"""
#include <stdio.h>
#include "fsim.h"
#include "{c_model / 'model.h'}"
static unsigned char arena_mem[FSIM_ARENA_BYTES];
static const float image[] = {{{", ".join(f"{v:.9g}f" for v in x.flatten())}}};
int main(void) {{
    fsim_model m; fsim_arena a; float logits[16]; unsigned i;
    if (fsim_model_load(&m, fsim_model_data, FSIM_MODEL_BYTES) != FSIM_OK) return 3;
    fsim_arena_init(&a, arena_mem, sizeof arena_mem);
    if (fsim_run(&m, &a, image, logits, NULL, NULL) != FSIM_OK) return 4;
    for (i = 0; i < m.num_classes; ++i) printf("%.9g\\n", logits[i]);
    return 0;
}}
""")
    exe = tmp_path / "app"
    subprocess.run(["cc", "-std=c99", "-O2", f"-I{ROOT / 'firmware_sim/include'}", str(src),
                    str(ROOT / "firmware_sim/src/fsim.c"), "-lm", "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    logits, _, _ = run_fsim(fsim / "fsim", c_model / "model.bin", x)
    np.testing.assert_allclose(np.array(out, np.float32), logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["truncated", "foreign", "small-arena"])
def test_fsim_refuses_bad_models_and_small_arenas(c_model, fsim, tmp_path, case):
    data = (c_model / "model.bin").read_bytes()
    model, extra = tmp_path / "m.bin", []
    model.write_bytes({"truncated": data[:-8], "foreign": b"\x7fELF" + data[4:], "small-arena": data}[case])
    if case == "small-arena":
        extra = ["--arena-bytes", "1000"]
    np.zeros((1, 1, 16, 16), "<f4").tofile(tmp_path / "x.f32")
    done = subprocess.run([str(fsim / "fsim"), str(model), str(tmp_path / "x.f32"), str(tmp_path / "o.f32"), *extra],
                          capture_output=True, text=True)
    assert done.returncode == 2
    needle = {"truncated": "truncated", "foreign": "bad magic", "small-arena": "arena bytes"}[case]
    assert needle in done.stderr and done.stderr.count("\n") == 1


def test_simulate_refuses_too_little_ram(tiny_run, capsys):
    assert main(["simulate", str(tiny_run), "--ram", "1KB"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "more than --ram 1000 B" in err


def test_uneven_patches_match_onnx_runtime(uneven_run, capsys):
    """fsim takes adaptive pooling's boundaries where P does not divide the map, as training does."""
    _, _, net = _images(uneven_run, 1)
    assert [(s.partition, s.height) for s in net.specs[:3]] == [(6, 16), (3, 16), (3, 8)]
    build_fsim()
    for k in (1, 2, 3):
        assert main(["simulate", str(uneven_run), "--ram", "256KB", "--samples", "32", "--exit-layer", str(k), "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["max_abs_diff_vs_ort"] <= C_MAX_ABS_TOL and r["accuracy"] == r["ort_accuracy"], (k, r)


def test_simulate_matches_onnx_runtime(tiny_run, capsys):
    build_fsim()   # the release build that simulate uses
    assert main(["simulate", str(tiny_run), "--ram", "256KB", "--samples", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["samples"] == 64 and r["accuracy"] == r["ort_accuracy"] > 0.85 and r["ok"]
    assert r["max_abs_diff_vs_ort"] <= C_MAX_ABS_TOL and r["arena_bytes"] <= r["ram_bytes"]
    assert 0 < r["max_abs_diff_vs_ort"] <= r["tolerance"] * r["logit_scale"] and r["nmse_vs_ort"] <= r["nmse_tolerance"]
    assert r["flash_bytes"] == Path(r["model_bin"]).stat().st_size and r["us_per_image"] > 0


def test_simulate_fails_where_the_c_runtime_strays_from_onnx_runtime(tiny_run, capsys, monkeypatch):
    build_fsim()
    run = firmware.run_fsim

    def off_by_a_hundredth(*args, **kwargs):
        logits, *rest = run(*args, **kwargs)
        return (logits + 0.01, *rest)

    monkeypatch.setattr(firmware, "run_fsim", off_by_a_hundredth)
    assert main(["simulate", str(tiny_run), "--ram", "256KB", "--samples", "16"]) == 1
    assert capsys.readouterr().out.splitlines()[1].endswith(": OVER")


def test_simulate_reads_an_imagefolder_test_set(folder_run, capsys):
    build_fsim()
    run, _, _ = folder_run
    assert main(["simulate", str(run), "--ram", "256KB", "--samples", "7", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["samples"] == 7 and r["accuracy"] == r["ort_accuracy"] and r["max_abs_diff_vs_ort"] <= C_MAX_ABS_TOL


def test_a_user_layer_list_trains_exports_and_runs_in_firmware(tmp_path, capsys):
    """An MCU-sized net of the user's own layers goes the whole way: config.json keeps the
    list in one spelling, and eval, export and simulate rebuild it from there."""
    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--input-shape", "1x16x16", "--num-classes", "4",
                 "--train-size", "768", "--model", "8, 16,p,16,P, 24", "--epochs", "3", "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["arch"] == "8,16,P,16,P,24"
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["layer_val_accuracy"]) == 4 and summary["test_accuracy"]["fusion"] > 0.85
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == summary["test_accuracy"]
    build_fsim()
    assert main(["simulate", str(out), "--ram", "64KB", "--samples", "32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ok"] and r["accuracy"] == r["ort_accuracy"] and r["exit_layer"] == summary["best_layer"]


def test_the_c_export_refuses_more_layers_than_firmware_sim_runs(tmp_path):
    net = ASGENet(ModelConfig(arch=",".join(["2"] * (MAX_LAYERS + 1))), (1, 4, 4), 2, (0.5,), (0.25,))
    write_c_model(net, MAX_LAYERS, tmp_path, "test")   # as many as it runs
    with pytest.raises(UserError, match=f"firmware_sim runs at most {MAX_LAYERS} layers.*--exit-layer {MAX_LAYERS} or less"):
        write_c_model(net, MAX_LAYERS + 1, tmp_path, "test")


def test_the_c_exporter_mirrors_fsim_h():
    header = (ROOT / "firmware_sim" / "include" / "fsim.h").read_text()
    assert f"#define FSIM_MAX_LAYERS {MAX_LAYERS}u" in header and f"#define FSIM_TILE {TILE}u" in header
