"""--offload: the layer-major schedule, the moves of weights and optimiser state, refusals.

No GPU is needed: park and compute may be the same device (the schedule still runs), and
the meta device stands in for a second device where only placement is checked.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from asge_edge.cli import main
from asge_edge.config import ModelConfig, TrainConfig
from asge_edge.methods import ASGEMethod
from asge_edge.models import ASGENet
from asge_edge.offload import Offloader, host_tensors
from conftest import TINY_RUN

CPU = torch.device("cpu")


def _net():
    return ASGENet(ModelConfig(width=0.125), (1, 16, 16), 4, (0.5,), (0.25,), seed=0).place(CPU)


def _train(offloader, micro_batch, steps=3):
    net = _net()
    method = ASGEMethod(net, TrainConfig())
    method.micro_batch, method.offloader = micro_batch, offloader
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        stats = method.train_step(torch.rand(48, 1, 16, 16, generator=g), torch.randint(4, (48,), generator=g))
    return net.state_dict(), stats


@pytest.mark.parametrize("micro_batch", [None, 7])
def test_layer_major_schedule_equals_streaming(micro_batch):
    plain, s1 = _train(None, micro_batch)
    offloaded, s2 = _train(Offloader(CPU, CPU), micro_batch)
    for k in plain:
        assert torch.equal(plain[k], offloaded[k]), k
    assert torch.equal(s1.layer_loss, s2.layer_loss) and torch.equal(s1.head_loss, s2.head_loss)


def test_a_move_converts_weights_buffers_and_optimiser_state_and_keeps_identity():
    # A dtype stands in for a second device: Module.to swaps storage in place for both.
    net = _net()
    method = ASGEMethod(net, TrainConfig())
    method.train_step(torch.rand(8, 1, 16, 16), torch.randint(4, (8,)))   # creates AdamW state
    layer, opt = net.layers[2], method.optimizers["layer3"]
    params = list(layer.parameters())
    Offloader._move(layer, opt, torch.float64)
    assert [p is q for p, q in zip(params, layer.parameters())] == [True] * len(params)
    assert all(t.dtype == torch.float64 for t in (*layer.parameters(), *layer.buffers()))
    state = [v for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    assert len(state) == 3 * len(params) and all(v.dtype == torch.float64 for v in state)   # step, m, v
    assert net.layers[1].conv.weight.dtype == torch.float32   # other layers stay


class _Recorder(Offloader):
    """Records loads, state loads, parks (and whether they take optimiser state) and drops."""

    def __init__(self):
        super().__init__(CPU, CPU)
        self.events = []

    def load(self, module):
        self.events.append(("load", module.spec.index))
        super().load(module)

    def load_state(self, module, optimizer):
        self.events.append(("state", module.spec.index))
        super().load_state(module, optimizer)

    def park(self, module, optimizer=None):
        self.events.append(("park", module.spec.index, optimizer is not None))
        super().park(module, optimizer)

    def drop(self, module, host):
        self.events.append(("drop", module.spec.index))
        super().drop(module, host)


def test_inference_streaming_loads_one_layer_at_a_time():
    net = _net()
    rec = _Recorder()
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        plain = net(x)
        with rec.streaming(net.layers):
            streamed = net(x)
    n = len(net.layers)
    assert rec.events == [(e, i) for i in range(1, n + 1) for e in ("load", "drop")]   # nothing copied back
    assert torch.equal(plain.fusion, streamed.fusion)


def test_dropping_a_copy_made_under_inference_mode_leaves_the_layer_trainable():
    # On a GPU, evaluation loads each layer under torch.inference_mode. Parking it would copy
    # it back as inference tensors, which autograd refuses to save: a step that used the
    # parked weights directly, as this one without offloading does, would fail. (--offload's
    # training loads a fresh copy first.) A dtype stands in for the GPU, as above.
    net = _net()
    method = ASGEMethod(net, TrainConfig())
    x, y = torch.rand(8, 1, 16, 16), torch.randint(4, (8,))
    method.train_step(x, y)
    layer = net.layers[0]
    before = [t.data_ptr() for t in (*layer.parameters(), *layer.buffers())]
    with torch.inference_mode():
        host = host_tensors(layer)
        Offloader._move(layer, None, torch.float64)
        Offloader.drop(layer, host)
    assert [t.data_ptr() for t in (*layer.parameters(), *layer.buffers())] == before   # the host tensors, not copies
    assert not any(t.is_inference() for t in (*layer.parameters(), *layer.buffers()))
    method.train_step(x, y)   # after a park: "Inference tensors cannot be saved for backward"


def test_training_brings_a_layers_optimiser_state_for_its_step_only():
    net = _net()
    rec = _Recorder()
    method = ASGEMethod(net, TrainConfig())
    method.micro_batch, method.offloader = 7, rec
    for layer in net.layers:
        layer.register_forward_pre_hook(lambda m, _args: rec.events.append(("forward", m.spec.index)))
    method.train_step(torch.rand(20, 1, 16, 16), torch.randint(4, (20,)))   # 3 micro-batches
    expected = [e for i in range(1, len(net.layers) + 1)
                for e in [("load", i), *[("forward", i)] * 3, ("state", i), ("park", i, True)]]
    assert rec.events == expected


class _CopyingOffloader(Offloader):
    """Park and compute on the CPU, but every move makes new tensors, as a transfer to
    another device does (under torch.inference_mode, inference tensors, as on a GPU)."""

    @staticmethod
    def _move(module, optimizer, target):
        for p in module.parameters():
            p.data = p.data.clone()
            if p.grad is not None:
                p.grad = p.grad.clone()
        for owner in module.modules():
            for name, buf in owner.named_buffers(recurse=False):
                setattr(owner, name, buf.clone())
        _CopyingOffloader._move_state(module, optimizer, target)

    @staticmethod
    def _move_state(module, optimizer, target):
        for p in module.parameters():
            state = {} if optimizer is None else optimizer.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    state[k] = v.clone()

    def to_park(self, t):
        return t.clone()

    def to_compute(self, t):
        return t.clone()


def test_offloaded_run_with_copying_moves_equals_a_plain_run(tmp_path, monkeypatch):
    # The whole trainer under --offload (training, each epoch's validation, checkpoints,
    # test), with moves that copy as a GPU's would: the same run, tensor for tensor.
    budget = ["--memory-budget", "1MB", "--epochs", "2"]   # several micro-batches
    assert main(["train", *TINY_RUN, *budget, "--out", str(tmp_path / "plain")]) == 0
    monkeypatch.setattr("asge_edge.train.make_offloader",
                        lambda offload, device: _CopyingOffloader(CPU, CPU) if offload else None)
    assert main(["train", *TINY_RUN, *budget, "--offload", "--out", str(tmp_path / "off")]) == 0
    plain, off = (load_file(tmp_path / d / "model.safetensors") for d in ("plain", "off"))
    assert plain.keys() == off.keys()
    for k in plain:
        assert torch.equal(plain[k], off[k]), k
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("plain", "off")]
    assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]
    memory = [m["memory"] for m in summaries]
    assert memory[1]["offload"] and memory[1]["micro_batch"] == memory[0]["micro_batch"]
    assert memory[1]["accumulation_steps"] > 1


def test_offload_on_cpu_is_refused(capsys, tmp_path):
    assert main(["train", *TINY_RUN, "--device", "cpu", "--offload", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "drop --offload" in err


def test_offload_with_bp_is_refused(capsys, tmp_path):
    assert main(["train", *TINY_RUN, "--method", "bp", "--offload", "--out", str(tmp_path / "o")]) == 2
    assert "cannot stream" in capsys.readouterr().err
