"""Network shapes, presets and the early exit."""

import pytest
import torch

from asge_edge.config import ModelConfig
from asge_edge.device import channels_last
from asge_edge.models import ASGENet, layer_specs
from asge_edge.presets import PRESETS, canonical, layer_list


def test_vgg8_matches_paper_table3():
    specs = layer_specs(ModelConfig(arch="vgg8"), (3, 32, 32), 100)
    assert len(specs) == 7
    assert {s.channels for s in specs} == {128, 256, 512}
    # Table 3 (CIFAR-100, batch 128): Fusion stores 1.25 MiB of fp32 GAP features, Last 0.25 MiB.
    assert sum(s.channels for s in specs[1:]) * 128 * 4 == 1.25 * 2**20
    assert specs[-1].channels * 128 * 4 == 0.25 * 2**20
    # ... and the Last head has 5.13e4 parameters.
    assert specs[-1].channels * 100 + 100 == 51_300


def test_width_scales_channels_and_keeps_partitions():
    full = layer_specs(ModelConfig(width=1.0), (1, 28, 28), 10)
    small = layer_specs(ModelConfig(width=0.25), (1, 28, 28), 10)
    assert [s.channels for s in small] == [c.channels // 4 for c in full]
    assert [s.partition for s in small] == [s.partition for s in full]


def test_layer_lists_read_as_presets_do():
    assert layer_list("vgg8") == PRESETS["vgg8"] and canonical("vgg11") == "vgg11"
    assert layer_list(" 16, 32,p ,8") == ((16, False), (32, True), (8, False))
    assert canonical(" 16, 32,p ,8") == "16,32,P,8" and layer_list("16,32,P,8") == layer_list(" 16, 32,p ,8")
    assert layer_list("24") == ((24, False),) and layer_list("24,P") == ((24, True),)
    assert canonical("016,p, 8") == "16,P,8"   # one list, one spelling: no leading zeros either


@pytest.mark.parametrize("arch", ["P,16", "16,P,P", "16,M,32", "", "0", "16,,32", "16,-8", "vgg9", "\uff11\uff16"])
def test_bad_layer_lists_say_what_to_write(arch):
    with pytest.raises(ValueError, match="give vgg8, vgg11 or a layer list such as 16,32,P,32,64,P,64"):
        layer_list(arch)
    with pytest.raises(ValueError):
        ModelConfig(arch=arch)


def test_a_layer_list_scales_and_partitions_as_a_preset_does():
    specs = layer_specs(ModelConfig(arch="16,32,P,64", width=0.5, alpha=1.0), (1, 16, 16), 3)
    assert [s.channels for s in specs] == [8, 16, 32]
    assert [s.pool for s in specs] == [None, "rms", None]
    assert [(s.height, s.width) for s in specs] == [(16, 16), (16, 16), (8, 8)]
    assert [s.partition for s in specs] == [4, 2, 1]   # Eq. (3): floor(C_L / C_l) with C_L = 32


def test_too_small_input_is_refused():
    with pytest.raises(ValueError, match="at least 8x8"):
        layer_specs(ModelConfig(), (1, 4, 4), 10)


@pytest.mark.parametrize("arch", ["vgg8", "vgg11"])
@pytest.mark.parametrize("pool", ["rms", "avg", "max"])
def test_forward_shapes_and_finite(arch, pool, device):
    net = ASGENet(ModelConfig(arch=arch, width=0.0625, pool=pool), (3, 32, 32), 7, (0.5,) * 3, (0.25,) * 3).to(device)
    out = net(torch.rand(5, 3, 32, 32, device=device))
    assert len(out.layer_logits) == len(net.layers)
    for logits in (*out.layer_logits, out.last, out.fusion):
        assert logits.shape == (5, 7) and torch.isfinite(logits).all()


def test_early_exit_equals_first_k_layers_of_full_net(device):
    net = ASGENet(ModelConfig(width=0.125), (1, 28, 28), 10, (0.3,), (0.35,)).to(device).eval()
    x = torch.rand(4, 1, 28, 28, device=device)
    with torch.no_grad():
        full = net(x).layer_logits
        for k in range(1, len(net.layers) + 1):
            torch.testing.assert_close(net.exit_logits(x, k), full[k - 1], rtol=0, atol=0)
    with pytest.raises(ValueError):
        net.exit_logits(x, len(net.layers) + 1)


def test_same_seed_same_network_different_seed_different():
    make = lambda seed: ASGENet(ModelConfig(width=0.125), (1, 16, 16), 4, (0.5,), (0.25,), seed=seed)  # noqa: E731
    a, b, c = make(0).state_dict(), make(0).state_dict(), make(1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.proj_w"], c["layers.0.proj_w"])
    assert not torch.equal(a["layers.0.conv.weight"], c["layers.0.conv.weight"])


def test_heads_standardise_in_training_and_fold_to_affine_in_eval():
    from asge_edge.models import LinearHead

    torch.manual_seed(0)
    head = LinearHead(6, 3)
    f = torch.randn(64, 6) * 5 + 2
    head(f)                                                      # training: batch stats, running stats move
    assert not torch.equal(head.running_mean, torch.zeros(6))
    head(f[:1])                                                  # a batch of one sample does not fail
    head.eval()
    scale = (head.running_var + 1e-5).rsqrt()
    folded = torch.nn.functional.linear(f, head.fc.weight * scale, head.fc.bias - (head.fc.weight * scale) @ head.running_mean)
    torch.testing.assert_close(head(f), folded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c", [1, 3])
def test_channels_last_input_makes_the_first_conv_run_in_nhwc(c):
    x = torch.rand(4, c, 8, 8)
    w = torch.randn(5, c, 3, 3).contiguous(memory_format=torch.channels_last)
    xl = channels_last(x)
    assert torch.equal(xl, x) and xl.stride()[1] == 1
    if c == 1:
        assert xl.data_ptr() == x.data_ptr()   # a view: the bytes are the same in both layouts
    out = torch.nn.functional.conv2d(xl, w, padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
