"""The memory budget: size parsing, the planner, exact micro-batching, measured peaks."""

import json

import pytest
import torch

from asge_edge import asge, memory
from asge_edge.budget import format_size, parse_size
from asge_edge.cli import main
from asge_edge.config import ModelConfig, TrainConfig
from asge_edge.memory import measure_step, warm_up
from asge_edge.methods import AMP_DTYPES, ASGEMethod
from asge_edge.models import ASGELayer, ASGENet, layer_specs
from asge_edge.planner import BudgetTooSmall, even_micro_batch, plan_memory
from conftest import TINY_RUN

# Micro-batched vs full-batch weights after 4 AdamW steps, fp32 on the CPU: measured at
# most 1.5e-5 (summation order differs); 1e-4 leaves room, and a wrong loss weighting
# (sum instead of mean over the logical batch) misses it by orders of magnitude.
STREAMING_ATOL = 1e-4


@pytest.mark.parametrize("text,expected", [
    ("64MB", 64_000_000), ("64MiB", 64 * 2**20), ("0.5GB", 500_000_000), ("65536KB", 65_536_000),
    ("1234", 1234), ("4 mib", 4 * 2**20), ("2k", 2000),
    # exact decimal arithmetic: as binary floats, 64.1 * 10**6 is 64100000.00000001
    ("64.1MB", 64_100_000), ("4.35MB", 4_350_000), ("9223372036854775807", 2**63 - 1),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "-5MB", "0", "0.5", "64XB", "1e-9MB", "nan"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="64MB, 64MiB"):
        parse_size(text)


@pytest.mark.parametrize("text,message", [
    ("2.3MiB", "is 2411724.8 bytes, not a whole number: give a whole number of bytes, such as 2411724"),
    ("1e400", "above 9223372036854775807 bytes"),
    ("9223372036854775808", "above 9223372036854775807 bytes"),
])
def test_parse_size_says_why_a_number_is_not_a_size(text, message):
    with pytest.raises(ValueError, match=message):
        parse_size(text)


def _specs():
    return layer_specs(ModelConfig(width=0.125), (1, 16, 16), 4)


def test_plan_without_budget_is_the_whole_batch():
    plan = plan_memory(_specs(), (1, 16, 16), 48, None)
    assert (plan.micro_batch, plan.accumulation_steps) == (48, 1)


def _peak(plan, micro):
    return max(lm.peak(micro) for lm in plan.layers) + plan.batch_bytes


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_planner_takes_the_fewest_steps_that_fit_in_even_micro_batches(fraction):
    specs = _specs()
    full = plan_memory(specs, (1, 16, 16), 48, None)
    budget = int(full.min_budget + fraction * (full.planned_peak - full.min_budget))
    plan = plan_memory(specs, (1, 16, 16), 48, budget)
    assert 1 <= plan.micro_batch < 48 and plan.planned_peak == _peak(plan, plan.micro_batch) <= budget
    steps = plan.accumulation_steps
    assert steps == -(-48 // plan.micro_batch)
    assert _peak(plan, -(-48 // (steps - 1))) > budget          # one step fewer does not fit
    assert plan.micro_batch == -(-48 // steps)                   # the smallest micro-batch with that many steps


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_largest_micro_batch_is_the_last_that_fits(precision):
    # Full-width VGG8: layer 4's forward, with its squares' chunk (or, under bf16, its exit
    # with the exit's chunk), binds at small micro-batches and its backward at large ones;
    # every layer must invert its peak exactly.
    layers = plan_memory(layer_specs(ModelConfig(), (3, 32, 32), 10), (3, 32, 32), 128, None, precision).layers
    assert layers[3].peak(1) > layers[3].fixed + layers[3].per_sample       # a chunk binds...
    assert layers[3].peak(40) == layers[3].fixed + 40 * layers[3].per_sample   # ...until it does not
    for lm in layers:
        for m in range(1, 41):
            assert lm.largest_micro_batch(lm.peak(m)) == m
            assert lm.largest_micro_batch(lm.peak(m + 1) - 1) == m
        assert lm.largest_micro_batch(lm.peak(1) - 1) < 1


def test_even_micro_batch():
    assert even_micro_batch(128, 18) == 16     # 8 steps: 8 x 16, not 7 x 18 + 2
    assert even_micro_batch(128, 128) == 128
    assert even_micro_batch(100, 17) == 17     # 6 steps: 5 x 17 + 15
    assert even_micro_batch(48, 1) == 1


def test_budget_below_minimum_reports_the_minimum():
    specs = _specs()
    with pytest.raises(BudgetTooSmall) as e:
        plan_memory(specs, (1, 16, 16), 48, 1000)
    assert plan_memory(specs, (1, 16, 16), 48, e.value.min_budget).micro_batch == 1
    with pytest.raises(BudgetTooSmall):
        plan_memory(specs, (1, 16, 16), 48, e.value.min_budget - 1)


def test_planner_counts_layer_state_once_not_per_layer():
    plan = plan_memory(layer_specs(ModelConfig(), (3, 32, 32), 10), (3, 32, 32), 128, None)
    total_state = sum(lm.fixed for lm in plan.layers)
    assert plan.min_budget < total_state   # streaming holds one layer's state at a time
    assert plan.planned_peak == _peak(plan, 128)
    assert plan.parked_bytes == total_state - max(lm.fixed for lm in plan.layers)


def _train(micro_batch, optimizer="adamw", steps=4):
    net = ASGENet(ModelConfig(width=0.125), (1, 16, 16), 4, (0.5,), (0.25,), seed=0).to(
        memory_format=torch.channels_last)
    method = ASGEMethod(net, TrainConfig(optimizer=optimizer))
    method.micro_batch = micro_batch
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        method.train_step(torch.rand(48, 1, 16, 16, generator=g), torch.randint(4, (48,), generator=g))
    return net.state_dict()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("micro_batch", [1, 7, 16])
def test_micro_batched_training_equals_full_batch(optimizer, micro_batch):
    full, streamed = _train(None, optimizer), _train(micro_batch, optimizer)
    for k in full:
        torch.testing.assert_close(streamed[k], full[k], rtol=0, atol=STREAMING_ATOL, msg=k)


def test_sliced_gradient_accumulation_equals_full_batch(monkeypatch):
    full = _train(None)
    monkeypatch.setattr(asge, "GRAD_SLICE_BYTES", 256)   # a few output channels per slice in every layer
    assert all(asge.grad_slice(s.channels, s.in_channels * 9) < s.channels for s in _specs()[1:])
    streamed = _train(7)
    for k in full:
        torch.testing.assert_close(streamed[k], full[k], rtol=0, atol=STREAMING_ATOL, msg=k)


def test_the_batch_waits_as_uint8_and_each_micro_batch_is_scaled_beside_the_last_layer():
    shape = (3, 32, 32)
    specs = layer_specs(ModelConfig(width=0.25), shape, 10)
    for precision, scaled in (("fp32", 4), ("bf16", 4 + 2)):   # normalize's fp32 output (+ its bf16 cast)
        plan = plan_memory(specs, shape, 128, None, precision)
        assert [lm.after for lm in plan.layers] == [0] * 6 + [3 * 32 * 32 * scaled]
    more = plan_memory(specs, shape, 256, None)   # 128 more images: their pixels (1 B), labels, features
    assert more.batch_bytes - plan_memory(specs, shape, 128, None).batch_bytes == 128 * (3 * 32 * 32 + 8 + 4 * sum(
        s.channels for s in specs))


def test_sliced_accumulation_lowers_the_floor_of_full_width_vgg8():
    specs = layer_specs(ModelConfig(), (3, 32, 32), 10)
    plan = plan_memory(specs, (3, 32, 32), 128, None)
    deep = plan.layers[-1]   # 512 -> 512: 2.36M parameters
    params = 512 * (512 * 9 + 1) * 4
    assert deep.fixed < params * 4 + 2 * 2 ** 21   # weights, gradient, 2 moments, one slice + projection
    assert plan.min_budget < 45_000_000


# Slices of 512 KiB (two per 128-channel layer) are large enough that two of them alive at
# once would overrun the smallest budget (tiny slices' values are checked above). Under
# bf16, the smallest budget holds the weights' bf16 copy and a whole gradient in bf16 and in
# fp32; with slices, the first micro-batch's whole gradient in bf16 beside its cast, which
# only the wide net on 8x8 images shows: its weights, not its images, set the peak.
# At alpha 1.5 the first three layers' patches (6, 3, 3 per side on 28, 28, 14) are uneven.
# Max and average pools make their outputs from a before backward, as uneven patches do.
@pytest.mark.parametrize("budget_scale,slice_bytes,precision,width,side,alpha,pool", [
    (1.0, None, "fp32", 0.25, 28, 1.0, "rms"), (1.5, None, "fp32", 0.25, 28, 1.0, "rms"),
    (1.0, 2 ** 19, "fp32", 0.25, 28, 1.0, "rms"), (1.0, None, "bf16", 0.25, 28, 1.0, "rms"),
    (1.5, None, "bf16", 0.25, 28, 1.0, "rms"), (1.0, 2 ** 18, "bf16", 0.5, 8, 1.0, "rms"),
    (1.5, None, "fp32", 0.25, 28, 1.5, "rms"), (1.5, None, "bf16", 0.25, 28, 1.5, "rms"),
    (1.5, None, "fp32", 0.25, 28, 1.0, "max"), (1.5, None, "bf16", 0.25, 28, 1.0, "avg")])
def test_measured_peak_stays_within_budget(budget_scale, slice_bytes, precision, width, side, alpha, pool, monkeypatch):
    if slice_bytes is not None:
        monkeypatch.setattr(asge, "GRAD_SLICE_BYTES", slice_bytes)
    shape = (1, side, side)
    net = ASGENet(ModelConfig(width=width, alpha=alpha, pool=pool), shape, 10, (0.5,), (0.25,), seed=0
                  ).to(memory_format=torch.channels_last)
    method = ASGEMethod(net, TrainConfig(), precision)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(256, (64, *shape), generator=g, dtype=torch.uint8)   # raw pixels, as data.batches yields them
    y = torch.randint(10, (64,), generator=g)
    warm_up(method, x, y)   # every optimiser's state now exists, as in every later step
    budget = int(plan_memory(net.specs, shape, 64, None, precision).min_budget * budget_scale)
    plan = plan_memory(net.specs, shape, 64, budget, precision)
    method.micro_batch = plan.micro_batch
    _, measured = measure_step(method, x, y)
    assert measured.measured_by == "cpu-live-tensors"
    assert measured.peak <= budget
    # The plan is tight as well as safe: these measure 0.93-1.00 of it. Before the exit's
    # pooling was counted per kind, max and average pools planned a third too much.
    assert measured.peak >= 0.85 * plan.planned_peak
    # It holds phase by phase too, each layer's and the heads'. Before phases were measured
    # one by one, two things went unplanned: the statistics that batch norm returns in the
    # heads' phase, and each layer's logits and its cross-entropy's tensors.
    assert all(m <= p for m, p in zip(measured.layers, plan.layer_peaks()))
    assert measured.heads <= plan.heads_bytes
    assert measured.peak == max(*measured.layers, measured.heads)


def _overflowing_scalers(monkeypatch):
    """fp16's GradScalers start at a scale whose first step overflows, then drop to 1."""
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler",
                        lambda device: scaler(device, init_scale=2.0 ** 100, backoff_factor=2.0 ** -100))


def test_memory_is_measured_once_every_optimiser_has_stepped(monkeypatch):
    # A GradScaler skips a step whose fp16 gradients overflow, and SGD makes its momentum only
    # in a step taken; measured before, that state's making counted in the phases after it
    # (a sweep of random nets in fp16 with SGD measured peaks up to 1.34x their budget).
    _overflowing_scalers(monkeypatch)
    shape = (1, 8, 8)   # a wide net on small images: its optimiser steps, not its activations, set the peaks
    net = ASGENet(ModelConfig(width=0.5), shape, 4, (0.5,), (0.25,), seed=0).to(memory_format=torch.channels_last)
    method = ASGEMethod(net, TrainConfig(optimizer="sgd"), "fp16")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(256, (8, *shape), generator=g, dtype=torch.uint8), torch.randint(4, (8,), generator=g)
    method.train_step(x, y)   # every layer's step skipped; the heads (fp32) stepped
    assert not method.state_ready and not method.optimizers["layer1"].state
    with pytest.raises(ValueError, match="call warm_up first"):
        measure_step(method, x, y)
    assert warm_up(method, x, y) == 1 and method.state_ready
    stepped = measure_step(method, x, y)[1]
    # A layer's step that fp16 skips still begins its phase, so no phase measures more than
    # when every layer steps. With the optimisers' own step hooks, which a skipped step never
    # calls, layer 4's phase took in layer 5's step: 2.2 MB more.
    scaler = method.scalers["layer5"]
    scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0 ** 100})
    skipped = measure_step(method, x, y)[1]
    assert scaler.get_scale() == 1.0   # layer 5's step overflowed and was skipped
    assert all(s <= m for s, m in zip((*skipped.layers, skipped.heads), (*stepped.layers, stepped.heads)))


def test_the_trainer_measures_memory_after_fp16_skipped_steps(monkeypatch, tmp_path):
    _overflowing_scalers(monkeypatch)
    budget = plan_memory(layer_specs(ModelConfig(width=0.125), (1, 16, 16), 4), (1, 16, 16), 64, None, "fp16",
                         "sgd").min_budget
    assert main(["train", *TINY_RUN, "--epochs", "1", "--amp", "fp16", "--optimizer", "sgd",
                 "--memory-budget", str(budget), "--out", str(tmp_path)]) == 0
    memory = json.loads((tmp_path / "summary.json").read_text())["memory"]
    assert memory["measured_peak_bytes"] <= budget
    assert all(ph["measured_peak_bytes"] <= ph["planned_peak_bytes"] for ph in memory["phases"])


def test_the_cuda_counter_reads_what_the_cpu_tracker_reads(monkeypatch):
    """measure_step's CUDA path (CudaAllocated), on the CUDA allocator's statistics faked
    from the CPU tracker, as no GPU is here: whatever the allocator held before the step,
    every phase reads as the CPU's does."""
    tracker = memory.LiveTensorBytes()
    held = 12_345_678   # what the allocator holds before the step: the model, the batch...
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: held + tracker.current)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: held + tracker.peak)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: setattr(tracker, "peak", tracker.current))

    class Allocated(memory.CudaAllocated):
        def __enter__(self):
            tracker.__enter__()
            return self

        def __exit__(self, *exc):
            tracker.__exit__(*exc)

    measured = {}
    for counter in ("cpu", "cuda"):
        if counter == "cuda":
            monkeypatch.setattr(memory, "_counter", lambda device: (Allocated(device), "cuda-peak-stats"))
        net = ASGENet(ModelConfig(width=0.25), (1, 28, 28), 10, (0.5,), (0.25,), seed=0).to(
            memory_format=torch.channels_last)
        method = ASGEMethod(net, TrainConfig())
        g = torch.Generator().manual_seed(0)
        x = torch.randint(256, (64, 1, 28, 28), generator=g, dtype=torch.uint8)
        y = torch.randint(10, (64,), generator=g)
        warm_up(method, x, y)
        method.micro_batch = 16   # four micro-batches: every layer's gradient lives across them
        measured[counter] = measure_step(method, x, y)[1]
    assert measured["cuda"].measured_by == "cuda-peak-stats"
    assert (measured["cuda"].peak, measured["cuda"].layers, measured["cuda"].heads) == (
        measured["cpu"].peak, measured["cpu"].layers, measured["cpu"].heads)


def test_a_large_logical_batch_is_bounded_by_the_heads_phase():
    # The heads train on the whole logical batch's features after the layers: at 512 small
    # images their phase outweighs any layer's, whatever the micro-batch.
    shape, batch = (1, 8, 8), 512
    net = ASGENet(ModelConfig(width=0.125), shape, 10, (0.5,), (0.25,), seed=0).to(memory_format=torch.channels_last)
    method = ASGEMethod(net, TrainConfig())
    g = torch.Generator().manual_seed(0)
    x = torch.randint(256, (batch, *shape), generator=g, dtype=torch.uint8)
    y = torch.randint(10, (batch,), generator=g)
    warm_up(method, x, y)
    floor = plan_memory(net.specs, shape, batch, None).min_budget
    plan = plan_memory(net.specs, shape, batch, floor)
    assert plan.peak_layer() is None and plan.planned_peak == plan.heads_bytes == floor
    with pytest.raises(BudgetTooSmall) as e:
        plan_memory(net.specs, shape, batch, floor - 1)
    assert e.value.min_budget == floor
    method.micro_batch = plan.micro_batch
    _, measured = measure_step(method, x, y)
    assert 0.85 * floor <= measured.peak == measured.heads <= floor


def test_sweep_gives_the_smallest_budget_of_every_plan():
    specs = _specs()
    rows = plan_memory(specs, (1, 16, 16), 48, None).sweep()
    assert rows[0][:2] == (1, 48) and rows[-1][:2] == (48, 1)
    assert [r[0] for r in rows] == sorted({r[0] for r in rows})   # steps rise, each once
    for steps, micro, peak in rows:
        plan = plan_memory(specs, (1, 16, 16), 48, peak)           # that budget gets that plan...
        assert (plan.accumulation_steps, plan.micro_batch, plan.planned_peak) == (steps, micro, peak)
        if micro > 1:                                              # ...and a byte less does not
            assert plan_memory(specs, (1, 16, 16), 48, peak - 1).micro_batch < micro
        else:
            with pytest.raises(BudgetTooSmall):
                plan_memory(specs, (1, 16, 16), 48, peak - 1)


def test_plan_command_sweep_marks_the_plan(capsys):
    assert main(["plan", "--input-shape", "3x32x32", "--memory-budget", "64MB", "--sweep"]) == 0
    marked = [line.split() for line in capsys.readouterr().out.splitlines() if "<- this plan" in line]
    assert len(marked) == 1 and marked[0][:2] == ["5", "26"]   # docs/BENCHMARKS.md: 26 x 5 at 64MB


def test_plan_command_plans_the_pool_that_train_runs(capsys):
    peaks = {}
    for pool in ("rms", "max"):
        assert main(["plan", "--width", "0.25", "--pool", pool, "--json"]) == 0
        peaks[pool] = json.loads(capsys.readouterr().out)["planned_peak_bytes"]
        specs = layer_specs(ModelConfig(width=0.25, pool=pool), (1, 28, 28), 10)
        assert peaks[pool] == plan_memory(specs, (1, 28, 28), 128, None).planned_peak
    assert peaks["rms"] != peaks["max"]


def test_plan_command_json(capsys):
    assert main(["plan", "--model", "vgg8", "--input-shape", "3x32x32", "--batch-size", "128",
                 "--memory-budget", "64MB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["budget_bytes"] == 64_000_000 and plan["planned_peak_bytes"] <= 64_000_000
    assert plan["micro_batch"] * plan["accumulation_steps"] >= 128 and len(plan["layers"]) == 7
    phases = plan["layer_peak_bytes"]   # each layer's phase; the largest of them and the heads' is the peak
    assert max(*phases, plan["heads_bytes"]) == plan["planned_peak_bytes"] == phases[plan["peak_layer"] - 1]


def test_a_budget_too_small_names_the_widest_width_within_it(capsys):
    assert main(["plan", "--input-shape", "3x32x32", "--memory-budget", "16MB"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the smallest that works is 42272320 B" in err
    width = float(err.split("--width ")[1].split()[0])

    def fits(w: float) -> bool:
        specs = layer_specs(ModelConfig(width=w), (3, 32, 32), 10)
        return plan_memory(specs, (3, 32, 32), 128, None).min_budget <= 16_000_000

    assert 0 < width < 1 and fits(width) and not fits(round(width + 0.01, 2))
    assert main(["plan", "--input-shape", "3x32x32", "--memory-budget", "16MB", "--width", str(width)]) == 0
    capsys.readouterr()
    assert main(["plan", "--memory-budget", "1KB"]) == 2   # not even the narrowest net: no width to give
    assert "--width" not in capsys.readouterr().err


def test_plan_command_too_small_gives_the_minimum(capsys):
    assert main(["plan", "--memory-budget", "1MB"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "smallest that works is" in err


def test_train_with_budget_records_plan_and_measurement(tmp_path, capsys):
    out = tmp_path / "run"
    plan = plan_memory(layer_specs(ModelConfig(width=0.125), (1, 16, 16), 4), (1, 16, 16), 64, None)
    budget = int(plan.min_budget * 1.3)
    loud = [a for a in TINY_RUN if a != "--quiet"]
    assert main(["train", *loud, "--epochs", "1", "--memory-budget", str(budget), "--out", str(out)]) == 0
    memory = json.loads((out / "summary.json").read_text())["memory"]
    assert memory["budget_bytes"] == budget and memory["micro_batch"] < 64
    assert memory["measured_peak_bytes"] <= budget and memory["measured_by"] == "cpu-live-tensors"
    phases = memory["phases"]   # every layer's phase, then the heads', each within its plan
    assert [ph["phase"] for ph in phases] == [f"layer {i}" for i in range(1, 8)] + ["heads"]
    assert all(ph["measured_peak_bytes"] <= ph["planned_peak_bytes"] for ph in phases)
    assert max(ph["measured_peak_bytes"] for ph in phases) == memory["measured_peak_bytes"]
    *table, last = capsys.readouterr().out.splitlines()[-10:]   # the run ends with what it measured
    assert table[0].split() == ["phase", "planned", "measured", "measured/planned"]
    assert table[-1].split()[0] == "heads" and table[1].split()[:2] == ["layer", "1"]
    assert last.startswith("training working set: measured peak ")
    assert format_size(memory["measured_peak_bytes"]) in last and format_size(budget) in last


def test_a_run_of_one_step_records_its_plan_and_says_it_measured_none(tmp_path, capsys):
    # memory is measured on the second step, once optimiser state exists; a run of one step has none
    out = tmp_path / "run"
    loud = [a for a in TINY_RUN if a != "--quiet"]
    assert main(["train", *loud, "--train-size", "64", "--val-size", "8", "--epochs", "1", "--memory-budget", "2MB",
                 "--out", str(out)]) == 0
    memory = json.loads((out / "summary.json").read_text())["memory"]
    assert memory["budget_bytes"] == 2_000_000 and memory["accumulation_steps"] > 1
    assert 0 < memory["planned_peak_bytes"] <= 2_000_000
    assert memory["measured_peak_bytes"] is None and memory["measured_by"] is None
    assert [ph["measured_peak_bytes"] for ph in memory["phases"]] == [None] * 8
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("training working set: not measured (") and "budget 2.00 MB" in last


def test_bp_refuses_a_budget(capsys, tmp_path):
    assert main(["train", *TINY_RUN, "--method", "bp", "--memory-budget", "64MB", "--out", str(tmp_path / "o")]) == 2
    assert "cannot stream" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_keep_goodness_fp32(precision):
    net = ASGENet(ModelConfig(width=0.125), (1, 16, 16), 4, (0.5,), (0.25,), seed=0).to(
        memory_format=torch.channels_last)
    method = ASGEMethod(net, TrainConfig(), precision)
    assert bool(method.scalers) == (precision == "fp16")   # one GradScaler per layer under fp16
    x, y = torch.rand(32, 1, 16, 16), torch.randint(4, (32,))
    with method.autocast("cpu"):
        h_next, feat, logits = net.layers[1].run(torch.randn(32, net.specs[1].in_channels, 16, 16))
        assert net.layers[1].activate(torch.randn(2, net.specs[1].in_channels, 16, 16)).dtype == AMP_DTYPES[precision]
    assert logits.dtype == feat.dtype == h_next.dtype == torch.float32
    before = net.layers[3].conv.weight.detach().clone()
    for _ in range(3):
        stats = method.train_step(x, y)
    assert torch.isfinite(stats.layer_loss).all()
    assert not torch.equal(before, net.layers[3].conv.weight)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_exits_in_the_compute_dtype_change_no_value(precision, monkeypatch):
    """Under mixed precision each layer's exit is made a chunk of samples at a time and held
    in the convs' dtype (ASGELayer.exit); the conv would cast the whole fp32 exit to the
    same values, so the weights come out bit-identical either way."""
    monkeypatch.setattr(asge, "ENERGY_CHUNK_BYTES", 2 ** 14)   # chunks of 4 samples here, not the whole batch
    x, y = torch.rand(32, 1, 16, 16), torch.randint(4, (32,))
    exit_, weights = ASGELayer.exit, {}
    for held in ("compute dtype, chunked", "fp32, whole"):
        if held == "fp32, whole":   # exits whole, in fp32, and inputs held as they come
            monkeypatch.setattr(ASGELayer, "exit", lambda self, a, energy=None, dtype=None: exit_(self, a, energy))
            monkeypatch.setattr(ASGEMethod, "conv_input", lambda self, h: h)
        net = ASGENet(ModelConfig(width=0.125), (1, 16, 16), 4, (0.5,), (0.25,), seed=0).to(
            memory_format=torch.channels_last)
        method = ASGEMethod(net, TrainConfig(), precision)
        h_next, feat, _, _ = method.layer_backward(0, method.conv_input(net.normalize(x)), y)
        assert h_next.dtype == (torch.float32 if held == "fp32, whole" else AMP_DTYPES[precision])
        assert feat.dtype == torch.float32
        net.zero_grad(set_to_none=True)
        for _ in range(3):
            method.train_step(x, y)
        weights[held] = [t.clone() for t in net.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(*weights.values()))


def test_asge_working_set_is_smaller_than_bp_at_the_same_batch():
    from asge_edge.methods import BPMethod

    def peak(method_cls, cfg):
        net = ASGENet(ModelConfig(width=0.25), (1, 28, 28), 10, (0.5,), (0.25,), seed=0).to(
            memory_format=torch.channels_last)
        method = method_cls(net, cfg)
        x, y = torch.rand(32, 1, 28, 28).contiguous(memory_format=torch.channels_last), torch.randint(10, (32,))
        warm_up(method, x, y)
        return measure_step(method, x, y)[1].peak

    asge, bp = peak(ASGEMethod, TrainConfig()), peak(BPMethod, TrainConfig(method="bp"))
    assert asge < 0.5 * bp   # BP keeps every layer's activations and all state; ASGE one layer's
