"""Layer-wise training invariants: locality, fixed projections, learning, determinism."""

import copy

import pytest
import torch

from asge_edge.config import ModelConfig, RunConfig, TrainConfig, auto_lr
from asge_edge.methods import ASGEMethod, BPMethod, make_method
from asge_edge.models import ASGENet
from asge_edge.schedule import cosine_lr


def _net(device, seed=0):
    return ASGENet(ModelConfig(width=0.125), (1, 16, 16), 4, (0.5,), (0.25,), seed=seed).to(
        device, memory_format=torch.channels_last)


def _batch(device, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g).to(device), torch.randint(4, (n,), generator=g).to(device)


def test_training_one_layer_leaves_every_other_tensor_bit_identical(device):
    net = _net(device)
    method = ASGEMethod(net, TrainConfig(lr=1e-2))
    x, y = _batch(device)
    with torch.no_grad():
        h = net.normalize(x)
        h = net.layers[0].transition(net.layers[0].activate(h))
    before = copy.deepcopy(net.state_dict())
    method.layer_backward(1, h, y)
    others = [p for i, layer in enumerate(net.layers) if i != 1 for p in layer.parameters()]
    assert all(p.grad is None for p in others)
    method.step_layers()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"layers.1.conv.weight", "layers.1.conv.bias"}


def test_an_empty_micro_batch_runs_every_layer_and_adds_a_zero_gradient(device):
    """A torchrun rank's part of a short last batch may be empty: its layers still run, so
    that it joins every reduction, with a zero gradient, a zero loss and no features."""
    net = _net(device)
    method = ASGEMethod(net, TrainConfig())
    x, y = _batch(device, n=0)
    h = method.conv_input(net.normalize(x))
    for i, layer in enumerate(net.layers):
        h, feat, loss_sum, hits = method.layer_backward(i, h, y, total=64)
        assert h.shape[0] == 0 and feat.shape == (0, layer.spec.channels)
        assert loss_sum.item() == 0 and hits.item() == 0
        assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())


def test_no_gradient_is_computed_for_any_layer_input(device):
    net = _net(device)
    method = ASGEMethod(net, TrainConfig())
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].requires_grad))
             for layer in net.layers]
    method.train_step(*_batch(device))
    for hk in hooks:
        hk.remove()
    assert seen == [False] * len(net.layers)


def test_projections_never_change_and_are_not_parameters(device):
    net = _net(device)
    proj = {k: v.clone() for k, v in net.state_dict().items() if "proj_" in k}
    assert len(proj) == 2 * len(net.layers)
    assert not any("proj_" in name for name, _ in net.named_parameters())
    method = ASGEMethod(net, TrainConfig(lr=1e-2))
    for step in range(3):
        method.train_step(*_batch(device, seed=step))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in proj.items())


def test_every_conv_and_head_gets_updated(device):
    net = _net(device)
    before = copy.deepcopy(net.state_dict())
    ASGEMethod(net, TrainConfig(lr=1e-2)).train_step(*_batch(device))
    params = [k for k, _ in net.named_parameters()]
    assert all(not torch.equal(before[k], net.state_dict()[k]) for k in params)


def test_bp_step_trains_every_conv_through_one_loss(device):
    net = _net(device)
    before = copy.deepcopy(net.state_dict())
    stats = BPMethod(net, TrainConfig(method="bp", lr=1e-2)).train_step(*_batch(device))
    after = net.state_dict()
    assert all(not torch.equal(before[f"layers.{i}.conv.weight"], after[f"layers.{i}.conv.weight"])
               for i in range(len(net.layers)))
    assert torch.equal(before["fusion_head.fc.weight"], after["fusion_head.fc.weight"])   # BP trains Last only
    assert torch.isfinite(stats.head_loss[0])


def test_asge_steps_are_deterministic_on_cpu():
    runs = []
    for _ in range(2):
        net = _net("cpu")
        method = make_method(net, TrainConfig())
        for step in range(2):
            method.train_step(*_batch("cpu", seed=step))
        runs.append(net.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_local_losses_fall_on_a_fixed_batch(device):
    net = _net(device)
    method = ASGEMethod(net, TrainConfig(lr=3e-3))
    x, y = _batch(device, n=64)
    first = method.train_step(x, y).layer_loss
    for _ in range(15):
        last = method.train_step(x, y).layer_loss
    assert (last < first).all()


def test_cosine_schedule_endpoints():
    assert cosine_lr(0, 100, 1e-3, 1e-5) == pytest.approx(1e-3)
    assert cosine_lr(100, 100, 1e-3, 1e-5) == pytest.approx(1e-5)
    assert cosine_lr(50, 100, 1e-3, 1e-5) == pytest.approx((1e-3 + 1e-5) / 2)


def test_default_final_lr_never_exceeds_a_small_initial_lr():
    assert TrainConfig(lr=1e-3).lr_range(1.0) == pytest.approx((1e-3, 1e-5))           # AdamW's default
    assert TrainConfig(optimizer="sgd", lr=1e-4).lr_range(1.0) == pytest.approx((1e-4, 1e-4))   # not SGD's 5e-4
    with pytest.raises(ValueError, match="--lr-min"):
        RunConfig(train=TrainConfig(lr=1e-3, lr_min=1e-2)).lr_range
    # the auto lr at width 1, 3 epochs, is 7.5e-4; such a config still loads (a finished run
    # from before the width-aware rule must still eval and export), and refuses to train
    cfg = RunConfig.from_dict(RunConfig(model=ModelConfig(width=1.0), train=TrainConfig(lr_min=1e-3)).to_dict())
    with pytest.raises(ValueError, match="at most 0.00075"):
        cfg.lr_range


@pytest.mark.parametrize("method", [ASGEMethod, BPMethod])
def test_optimisers_start_at_the_auto_lr_of_the_nets_width(method):
    net = ASGENet(ModelConfig(width=0.5), (1, 16, 16), 4, (0.5,), (0.25,))
    optimizers = method(net, TrainConfig(method=method.name, epochs=3)).optimizers
    lrs = [opt.param_groups[0]["lr"] for opt in optimizers.values()]
    assert lrs and lrs == pytest.approx([1.5e-3] * len(lrs))   # widest layer 256 channels: 15 x 128 / 256 = 7.5x the paper's lr


def test_auto_lr_keeps_the_papers_lr_for_long_runs_and_shrinks_the_short_run_boost_with_width():
    # by the widest layer's channels: 512 x width for vgg8 and vgg11
    assert auto_lr(100, "adamw", 512) == pytest.approx(2e-4)      # the paper's recipe, at any width
    assert auto_lr(400, "adamw", 128) == pytest.approx(2e-4)
    assert auto_lr(3, "adamw", 128) == pytest.approx(3e-3)        # the demo: the cap, measured stable
    assert auto_lr(3, "adamw", 64) == pytest.approx(3e-3)         # narrower: no higher than measured
    assert auto_lr(3, "adamw", 512) == pytest.approx(7.5e-4)      # 4x the fan-in, a quarter the cap
    assert auto_lr(10, "adamw", 256) == pytest.approx(1.5e-3)
    assert auto_lr(3, "adamw", 4096) == pytest.approx(2e-4)       # never below the paper's lr
    assert auto_lr(3, "sgd", 512) == pytest.approx(0.05)          # SGD: the paper's ImageNet lr


@pytest.mark.parametrize("model,widest,lr", [
    (ModelConfig(width=0.25), 128, 3e-3), (ModelConfig(arch="vgg11", width=1.0), 512, 7.5e-4),
    (ModelConfig(arch="16,32,P,64", width=1.0), 64, 3e-3),   # a small net of the user's: the cap, not vgg8's
    (ModelConfig(arch="16,1024,P,64", width=0.5), 512, 7.5e-4),
])
def test_the_auto_lr_follows_the_widest_layer_of_any_architecture(model, widest, lr):
    assert model.widest == widest
    assert RunConfig(model=model).lr_range[0] == pytest.approx(lr)


def test_each_layer_hands_on_what_its_whole_path_computes(device):
    # layer_backward makes a pooling layer's exit after backward, from the RMS pool's energy
    # (a is dL/dz by then), and the others' before it: either way the next layer's input and
    # its GAP are those of the whole forward path.
    net = _net(device)
    method = ASGEMethod(net, TrainConfig())
    x, y = _batch(device)
    h = net.normalize(x)
    waits = []
    for i, layer in enumerate(net.layers):
        with torch.no_grad():
            want, want_feat, _ = layer.run(h)
            waits.append(layer(h)[1] is not None)
        got, feat, _, _ = method.layer_backward(i, h, y)
        assert torch.equal(got, want) and torch.equal(feat, want_feat)
        h = got
    assert waits == [spec.energy_window > 1 for spec in net.specs] and any(waits) and not all(waits)
