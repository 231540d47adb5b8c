"""bench/offload.py's baseline and byte counts, and bench/soak.py's judge of each life: the
figures in docs/BENCHMARKS.md rest on them.

- OffloadedBP, with the logical batch in one micro-batch, is methods.BPMethod to the bit;
- the counted bytes follow each schedule: ASGE's layer-major schedule moves the same bytes
  whatever the micro-batch, BP's weight streaming grows by 2 W + G per extra micro-batch;
- the device peak that the ledger measures for ASGE's --offload stays within the planner's
  peak for that micro-batch (offload.py says the plan is an upper bound there);
- soak.ending fails a life on any rank's traceback or on ranks stopped at different steps,
  and lets torchrun's own traceback on the signal pass;
- plan_sweep draws what it says, and measures a net within its plan;
- export_sweep draws what it says, and runs its three checks on a net.
"""

import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import export_sweep  # noqa: E402
import plan_sweep  # noqa: E402
from offload import OffloadedBP, SimulatedOffloader, measure  # noqa: E402
from soak import ending  # noqa: E402
from workload import make_batch, make_net  # noqa: E402

from asge_edge.config import ModelConfig, TrainConfig  # noqa: E402
from asge_edge.methods import ASGEMethod, BPMethod  # noqa: E402
from asge_edge.planner import plan_memory  # noqa: E402

SHAPE, CFG = (1, 16, 16), ModelConfig(width=0.125)


def test_offloaded_bp_in_one_micro_batch_is_bp():
    x, y = make_batch(12, SHAPE)
    bp = BPMethod(make_net(CFG, SHAPE), TrainConfig(method="bp"))
    off = OffloadedBP(make_net(CFG, SHAPE), TrainConfig(method="bp"), 12, SimulatedOffloader())
    for _ in range(2):
        a, b = bp.train_step(x, y), off.train_step(x, y)
    assert torch.equal(a.head_loss[0], b.head_loss[0])
    for (k, v), w in zip(bp.net.state_dict().items(), off.net.state_dict().values()):
        assert torch.equal(v, w), k


def _row(method_for, micro_batch: int) -> dict:
    x, y = make_batch(12, SHAPE)
    off = SimulatedOffloader()
    return measure("", method_for(micro_batch, off), off, x, y)


def _asge(micro_batch, off):
    method = ASGEMethod(make_net(CFG, SHAPE), TrainConfig())
    method.micro_batch, method.offloader = micro_batch, off
    return method


def _bp(micro_batch, off):
    return OffloadedBP(make_net(CFG, SHAPE), TrainConfig(method="bp"), micro_batch, off)


def test_byte_counts_follow_each_schedule():
    net = make_net(CFG, SHAPE)
    w = sum(p.numel() * p.element_size() for layer in net.layers for p in layer.conv.parameters())
    asge_3 = _row(_asge, 4)["moved"]    # 3 micro-batches
    asge_12 = _row(_asge, 1)["moved"]   # 12
    assert asge_3 == asge_12            # each layer once per logical batch; the activations, whatever their split
    bp_3 = _row(_bp, 4)["moved"]
    bp_12 = _row(_bp, 1)["moved"]
    assert bp_12 - bp_3 == 9 * 3 * w   # 9 more micro-batches, each: weights in twice, gradient out once
    assert bp_12 > asge_12


def test_offload_peak_stays_within_the_plan():
    plan = plan_memory(make_net(CFG, SHAPE).specs, SHAPE, 12, None, "fp32")
    for micro_batch in (1, 4, 12):
        assert _row(_asge, micro_batch)["peak"] <= plan.peak_at(micro_batch), micro_batch


def test_soak_judges_a_torchrun_life_by_its_ranks_lines():
    term = signal.SIGTERM
    line = "asge-edge: interrupted (SIGTERM) at epoch 1, step 7; the state is saved in R: continue with --resume\n"
    torchrun = ("Traceback (most recent call last):\n  File \"run.py\", line 1, in <module>\n"
                "torch.distributed.elastic.multiprocessing.api.SignalException: Process 9 got signal: 15\n")
    rank_died = "[rank0]: Traceback (most recent call last):\n[rank0]: RuntimeError: Connection closed by peer\n"
    assert ending(1, line + line + torchrun, term, 2) == "saved and stopped"
    assert ending(1, line + line.replace("step 7", "step 8") + torchrun, term, 2) is None   # not one step
    assert ending(1, line + rank_died + torchrun, term, 2) is None
    assert ending(1, torchrun, term, 2) == "ended by the signal"   # before the ranks' handlers
    assert ending(-term, "", term, 2) == "ended by the signal"   # before torchrun's
    assert ending(128 + term, line, term, 1) == "saved and stopped"
    assert ending(1, line + torchrun, term, 1) is None   # one process prints no torchrun traceback


def test_plan_sweep_draws_its_ranges_and_measures_within_the_plan():
    import random

    rng = random.Random(0)
    configs = [plan_sweep.draw(rng) for _ in range(200)]
    assert {c["precision"] for c in configs} == {"fp32", "bf16", "fp16"} and {c["pool"] for c in configs} == {
        "rms", "avg", "max"}
    assert all(8 <= min(c["shape"][1:]) <= max(c["shape"][1:]) <= 40 for c in configs)
    small = {"arch": "vgg8", "width": 0.125, "alpha": 1.5, "pool": "avg", "precision": "fp16", "optimizer": "sgd",
             "shape": (3, 13, 9), "batch": 7, "classes": 3, "budget_scale": 1.0}   # uneven patches, fp16 with SGD
    worst, micro = plan_sweep.measure(small, torch.device("cpu"), seed=0)
    assert 0.85 <= worst <= 1.0 and micro == "1 x 7"


def test_export_sweep_draws_its_ranges_and_checks_exit_fusion_and_firmware(tmp_path):
    import random

    from export.firmware import build_fsim

    rng = random.Random(0)
    configs = [export_sweep.draw(rng, half=False) for _ in range(200)]
    assert {c["pool"] for c in configs} == {"rms", "avg", "max"} and {c["half"] for c in configs} == {True, False}
    assert all(c["half"] for c in (export_sweep.draw(rng, half=True) for _ in range(20)))
    small = {"arch": "vgg8", "width": 0.125, "alpha": 1.5, "pool": "avg", "shape": (3, 13, 9), "classes": 3,
             "half": False, "fusion": True, "exit": 0.1}   # exit 1: P = 6 on 13x9, uneven patches
    ratios = export_sweep.check(small, 0, build_fsim(), tmp_path)
    assert set(ratios) == {"exit 1", "fusion", "fsim"} and all(0 < r <= 1.0 for r in ratios.values())
