"""The public math API against the paper and against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from asge_edge import partition_factor, rms_pool, spatial_goodness
from asge_edge.asge import RMS_EPS, layer_norm_chw, make_projection, project, relu_goodness
from asge_edge.config import ModelConfig
from asge_edge.models import layer_specs

# Table 1 of the paper: VGG8 layers with C_l in {128, 256, 512}.
TABLE1 = {0.0: (1, 1, 1), 0.5: (2, 1, 1), 1.0: (4, 2, 1), 1.5: (6, 3, 1), 2.0: (8, 4, 2)}


@pytest.mark.parametrize("alpha,expected", TABLE1.items())
def test_table1_partitions_formula(alpha, expected):
    assert tuple(partition_factor(alpha, 512, c, 32, 32) for c in (128, 256, 512)) == expected


@pytest.mark.parametrize("alpha,expected", TABLE1.items())
def test_table1_partitions_vgg8_preset(alpha, expected):
    specs = layer_specs(ModelConfig(arch="vgg8", alpha=alpha), (3, 32, 32), 10)
    by_channels = {s.channels: s.partition for s in specs}
    assert tuple(by_channels[c] for c in (128, 256, 512)) == expected


def test_partition_clamps_to_spatial_size():
    assert partition_factor(2.0, 512, 128, 3, 5) == 3
    assert partition_factor(100.0, 512, 1, 7, 2) == 2
    with pytest.raises(ValueError):
        partition_factor(-1.0, 512, 128, 8, 8)


def test_goodness_matches_hand_computation():
    y = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4) / 10
    g = spatial_goodness(y, 2)
    assert g.shape == (2, 3 * 2 * 2)
    expected = torch.empty(2, 3, 2, 2)
    for b in range(2):
        for c in range(3):
            for i in range(2):
                for j in range(2):
                    patch = y[b, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                    expected[b, c, i, j] = sum(float(v) ** 2 for v in patch.flatten()) / 4
    torch.testing.assert_close(g, expected.flatten(1), rtol=1e-6, atol=0)


def test_goodness_uneven_patches_use_adaptive_boundaries():
    y = torch.randn(1, 1, 7, 5)
    g = spatial_goodness(y, 2).view(2, 2)
    # adaptive pooling: rows [0, 4) and [3, 7), columns [0, 3) and [2, 5)
    rows, cols = ((0, 4), (3, 7)), ((0, 3), (2, 5))
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            torch.testing.assert_close(g[i, j], y[0, 0, r0:r1, c0:c1].square().mean())


def test_goodness_of_half_precision_is_fp32_and_does_not_overflow():
    y = torch.full((1, 1, 2, 2), 300.0, dtype=torch.float16)   # 300^2 > fp16 max 65504
    g = spatial_goodness(y, 1)
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.item() == 90000.0


def test_rms_pool_matches_hand_computation():
    x = torch.tensor([[[[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0]]]])
    out = rms_pool(x, 2)
    assert out.shape == (1, 1, 1, 2)
    assert out[0, 0, 0, 0].item() == pytest.approx(math.sqrt((1 + 4 + 9 + 16) / 4))
    assert out[0, 0, 0, 1].item() == pytest.approx(math.sqrt(RMS_EPS))   # all-zero window


def test_rms_pool_gradient_is_finite_on_zero_windows():
    x = torch.zeros(1, 2, 4, 4, requires_grad=True)
    rms_pool(x, 2).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("shape,p", [((3, 8, 8, 8), 4), ((2, 5, 6, 6), 2), ((2, 4, 7, 7), 2), ((2, 4, 3, 3), 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_relu_goodness_equals_reference(shape, p, channels_last):
    z = torch.randn(*shape, dtype=torch.float64)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    a, g = relu_goodness(z1, p)
    g_ref = spatial_goodness(torch.relu(z2), p)
    torch.testing.assert_close(a, torch.relu(z))
    torch.testing.assert_close(g, g_ref)
    w = torch.randn_like(g)
    (g * w).sum().backward()
    (g_ref * w).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm_chw_equals_layer_norm(channels_last):
    x = torch.randn(3, 4, 5, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(layer_norm_chw(x), F.layer_norm(x, x.shape[1:]), rtol=1e-5, atol=1e-5)


def test_projection_is_seeded_with_paper_scale():
    n = 10
    w1, b1 = make_projection(4096, n, torch.Generator().manual_seed(3))
    w2, b2 = make_projection(4096, n, torch.Generator().manual_seed(3))
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    assert w1.shape == (4096, n) and b1.shape == (n,)
    assert w1.std().item() == pytest.approx(1 / math.sqrt(n), rel=0.03)
    assert abs(w1.mean().item()) < 0.01


def test_project_is_affine():
    g, w, b = torch.randn(5, 7), torch.randn(7, 3), torch.randn(3)
    torch.testing.assert_close(project(g, w, b), g @ w + b)
