"""The public math API against the paper and against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from asge_edge import partition_factor, rms_pool, spatial_goodness
from asge_edge import asge
from asge_edge.asge import RMS_EPS, conv_relu_goodness, layer_norm_chw, make_projection, project
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


@pytest.mark.parametrize("h, w, p", [(8, 8, 2), (16, 16, 6), (10, 7, 3), (5, 3, 3)])
def test_patch_matrices_give_the_patch_means(h, w, p):
    e = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))    # B, C, H, W
    rows, cols = asge.patch_matrix(h, p), asge.patch_matrix(w, p)             # P, H and P, W
    assert torch.allclose(rows.sum(1), torch.ones(p)) and rows.shape == (p, h)
    torch.testing.assert_close(rows @ e @ cols.T, asge.patch_mean(e, p), rtol=1e-6, atol=1e-7)


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


def _reference(h, w, b, p, k):
    """conv, ReLU, goodness and k x k energy by plain autograd."""
    a = torch.relu(F.conv2d(h, w, b, padding=1))
    return a, spatial_goodness(a, p), F.avg_pool2d(a.square(), k)


# (input shape, out channels, p, k): even patches, uneven patches (adaptive boundaries; 7x9
# in 3x3 overlap), energy shared with the goodness, and energy not shareable (7 // 2 rows drop one).
CASES = [((3, 5, 8, 8), 4, 4, 1), ((2, 3, 6, 6), 4, 4, 1), ((3, 2, 7, 9), 4, 3, 2), ((2, 3, 8, 8), 6, 2, 2),
         ((2, 3, 7, 7), 4, 1, 2), ((2, 3, 3, 3), 4, 1, 1)]


@pytest.mark.parametrize("shape,c,p,k", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_relu_goodness_equals_autograd(shape, c, p, k, channels_last):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(*shape, dtype=torch.float64, generator=g)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    w1 = torch.randn(c, shape[1], 3, 3, dtype=torch.float64, generator=g).requires_grad_()
    b1 = torch.randn(c, dtype=torch.float64, generator=g).requires_grad_()
    w2, b2 = w1.detach().clone().requires_grad_(), b1.detach().clone().requires_grad_()
    a_ref, g_ref, e_ref = _reference(h, w2, b2, p, k)
    a, gd, energy = conv_relu_goodness(h, w1, b1, (1, 1), p, k)
    torch.testing.assert_close(a, a_ref.detach())
    torch.testing.assert_close(gd, g_ref)
    if energy is not None:
        torch.testing.assert_close(energy, e_ref.detach())
    shareable = k > 1 and shape[2] % k == 0 and (shape[2] // k) % p == 0
    assert (energy is not None) == shareable
    u = torch.randn(gd.shape, dtype=torch.float64, generator=g)
    (gd * u).sum().backward()
    (g_ref * u).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_squares_in_chunks_equal_the_whole_batch(monkeypatch, k, dtype, channels_last):
    # 5 samples of 3x8x8 in chunks of 2 fp32 samples: two whole chunks and a short one.
    monkeypatch.setattr(asge, "ENERGY_CHUNK_BYTES", 2 * 3 * 8 * 8 * 4)
    assert asge.energy_rows(3 * 8 * 8, 5) == 2 and asge.energy_rows(3 * 8 * 8, 1) == 1   # never more than the batch
    a = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(3)).mul(400).to(dtype)   # fp16 squares overflow
    if channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
    g, energy = asge.goodness_and_energy(a, 2, k)
    whole = asge.square(a)                                     # 5, 3, 8, 8 fp32
    assert torch.isfinite(g).all() and g.dtype == torch.float32
    if k == 1:
        assert energy is None
        assert torch.equal(g, spatial_goodness(a, 2))
    else:   # the goodness is read from the window energies: the same patches, averaged in two steps
        assert torch.equal(energy, F.avg_pool2d(whole, k))
        assert torch.equal(g, asge.patch_mean(energy, 2).flatten(1))
        torch.testing.assert_close(g, spatial_goodness(a, 2))
        assert energy.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_a_large_batch_squares_in_at_most_energy_chunks_chunks(monkeypatch):
    # One-sample chunks by size; 100 samples would take 100 of them, which costs dispatch.
    monkeypatch.setattr(asge, "ENERGY_CHUNK_BYTES", 3 * 8 * 8 * 4)
    assert asge.energy_rows(3 * 8 * 8, asge.ENERGY_CHUNKS) == 1
    rows = asge.energy_rows(3 * 8 * 8, 100)
    assert -(-100 // rows) <= asge.ENERGY_CHUNKS and -(-100 // (rows - 1)) > asge.ENERGY_CHUNKS
    a = torch.rand(100, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    g, energy = asge.goodness_and_energy(a, 2, 2)
    assert torch.equal(energy, torch.nn.functional.avg_pool2d(asge.square(a), 2))


def test_later_micro_batches_add_their_gradient_in_slices(monkeypatch):
    monkeypatch.setattr(asge, "GRAD_SLICE_BYTES", 2 * 5 * 9 * 8)   # 2 of 7 output channels per fp64 slice
    assert asge.grad_slice(7, 5 * 9, 8) == 2
    g = torch.Generator().manual_seed(2)
    w1 = torch.randn(7, 5, 3, 3, dtype=torch.float64, generator=g).requires_grad_()
    b1 = torch.randn(7, dtype=torch.float64, generator=g).requires_grad_()
    w2, b2 = w1.detach().clone().requires_grad_(), b1.detach().clone().requires_grad_()
    for _ in range(3):   # the first micro-batch creates .grad; the next two add to it in slices
        h = torch.randn(2, 5, 8, 8, dtype=torch.float64, generator=g)
        u = torch.randn(2, 7 * 4, dtype=torch.float64, generator=g)
        _, gd, _ = conv_relu_goodness(h, w1, b1, (1, 1), 2)
        (gd * u).sum().backward()
        (spatial_goodness(torch.relu(F.conv2d(h, w2, b2, padding=1)), 2) * u).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_uneven_patches_spread_their_gradient_in_chunks(monkeypatch, precision, channels_last):
    # 5 samples of 4x28x28 in 6x6 adaptive patches (28 / 6 is not whole: they overlap),
    # spread 2 samples at a time: two whole chunks and a short one.
    monkeypatch.setattr(asge, "ENERGY_CHUNK_BYTES", 2 * 4 * 28 * 28 * 4)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(5, 3, 28, 28, generator=g)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    w1 = (torch.randn(4, 3, 3, 3, generator=g) * 0.3).requires_grad_()
    b1 = torch.randn(4, generator=g).requires_grad_()
    w2, b2 = w1.detach().clone().requires_grad_(), b1.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        _, gd, _ = conv_relu_goodness(h, w1, b1, (1, 1), 6)
        g_ref = spatial_goodness(torch.relu(F.conv2d(h, w2, b2, padding=1)), 6)
    u = torch.randn(gd.shape, generator=g)
    (gd * u).sum().backward()
    (g_ref * u).sum().backward()
    if precision == "fp32":   # doubling is exact: autograd's grad * (2 * a), to the bit
        assert torch.equal(gd, g_ref) and torch.equal(w1.grad, w2.grad) and torch.equal(b1.grad, b2.grad)
    else:
        torch.testing.assert_close(gd, g_ref, rtol=1e-6, atol=1e-6)   # same bf16 conv, fp32 squares
        torch.testing.assert_close(w1.grad, w2.grad, rtol=2e-2, atol=2e-2)   # bf16 gradients
        torch.testing.assert_close(b1.grad, b2.grad, rtol=2e-2, atol=2e-2)


def test_conv_relu_goodness_computes_no_input_gradient():
    h = torch.randn(2, 3, 8, 8, requires_grad=True)
    w, b = torch.randn(4, 3, 3, 3, requires_grad=True), torch.zeros(4, requires_grad=True)
    _, g, _ = conv_relu_goodness(h, w, b, (1, 1), 2)
    g.sum().backward()
    assert h.grad is None and w.grad is not None


def test_conv_relu_goodness_under_bf16_autocast_matches_autograd():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 8, 8, 8, generator=g)
    w1 = (torch.randn(16, 8, 3, 3, generator=g) * 0.2).requires_grad_()
    b1 = torch.zeros(16, requires_grad=True)
    w2, b2 = w1.detach().clone().requires_grad_(), b1.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, gd, _ = conv_relu_goodness(h, w1, b1, (1, 1), 2)
        g_ref = spatial_goodness(torch.relu(F.conv2d(h, w2, b2, padding=1)), 2)
    assert a.dtype == torch.bfloat16 and gd.dtype == torch.float32
    torch.testing.assert_close(gd, g_ref, rtol=1e-6, atol=1e-6)   # same bf16 conv, fp32 squares
    gd.sum().backward()
    g_ref.sum().backward()
    assert w1.grad.dtype == torch.float32
    torch.testing.assert_close(w1.grad, w2.grad, rtol=2e-2, atol=2e-2)   # bf16 gradients


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
