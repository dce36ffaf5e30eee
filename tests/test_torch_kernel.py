"""The fast torch kernel (``eqat_cli.quant.torch_kernel.TorchKernel``) against the reference kernel.

Tolerance: the kernel sums in another order than the reference and applies the zero points as
a separate per-group term, so each output may differ from the reference by fp32 rounding of
the magnitudes it adds up. We check, element-wise,
``|y - y_ref| <= 1e-5 * (|x| @ ((q + z) * s)^T) + 1e-6``
(``q``, ``z``, ``s`` the codes, zero points and step sizes of the row's group). The observed
error is below 2e-7 of that sum: the bound leaves 50x headroom. Gradients are compared with
``torch.testing.assert_close(rtol=1e-4)`` after the same fp32 reasoning.
"""

from __future__ import annotations

import pytest
import torch

from eqat_cli.quant import torch_kernel
from eqat_cli.quant.torch_kernel import TorchKernel
from eqat_cli.quant.linear import REFERENCE_KERNEL, PackedLinear
from eqat_cli.quant.primitives import expand_groups, n_groups

KERNEL = TorchKernel()


from conftest import random_packed_layer as make_layer  # noqa: E402

from eqat_cli.scheme import QuantScheme


def magnitude(layer):
    """``(q + z) * s`` in torch layout ``[out, in]``: what each product's size is bounded by."""
    q = layer.codes().t().float()
    z = expand_groups(layer.zero_points().t().float(), layer.group_size, layer.in_features)
    s = expand_groups(layer.scales.detach().t().float(), layer.group_size, layer.in_features)
    return (q + z) * s


def assert_matches_reference(layer, x, rel=1e-5):
    y = KERNEL.forward(layer, x)
    ref = REFERENCE_KERNEL.forward(layer, x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    x2 = x.reshape(-1, layer.in_features).float()
    bound = rel * (x2.abs() @ magnitude(layer).t()) + 1e-6
    err = (y.float() - ref.float()).reshape(-1, layer.out_features).abs()
    assert bool((err <= bound).all()), f"max err {err.max():.3g}"


# (in, out, group): odd sizes, a ragged last group (576 = 4 x 128 + 64) and per-channel; 100 is
# not a multiple of any pack factor, 96 with group 24 has groups that do not start on words.
SHAPES = [
    pytest.param(256, 72, 32, id="256x72-g32"),
    pytest.param(256, 72, 64, id="256x72-g64"),
    pytest.param(512, 40, 128, id="512x40-g128"),
    pytest.param(100, 40, -1, id="100x40-perchannel"),
    pytest.param(576, 192, 128, id="576x192-g128-ragged"),
]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,n,group", SHAPES)
def test_matches_reference(bits, k, n, group):
    """Decode ([1, K]), a few rows, and prefill ([B, T, K]) shapes, with a bias."""
    layer = make_layer(k, n, bits, group, bias=True, seed=bits)
    g = torch.Generator().manual_seed(1)
    for shape in ((1, k), (3, k), (2, 37, k)):
        assert_matches_reference(layer, torch.randn(*shape, generator=g))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_groups_not_starting_on_words(bits):
    layer = make_layer(96, 40, bits, 24, seed=5)
    for m in (1, 50):
        assert_matches_reference(layer, torch.randn(m, 96))


def test_many_chunks(monkeypatch):
    """Layers bigger than one chunk, including groups longer than a chunk (per-channel)."""
    monkeypatch.setattr(torch_kernel, "CHUNK_ELEMENTS", 64 * 48)
    monkeypatch.setattr(torch_kernel, "_GEOMETRIES", {})
    for bits, group in ((2, 32), (3, 64), (4, -1), (2, 128)):
        layer = make_layer(576, 48, bits, group, seed=bits)
        geo = torch_kernel.geometry(layer, torch.device("cpu"))
        assert geo.chunk < 576
        for m in (1, 8, 40):
            assert_matches_reference(layer, torch.randn(m, 576))


def test_dtypes_and_empty_input():
    layer = make_layer(256, 72, 2, 64, bias=True)
    x = torch.randn(5, 256)
    for dtype, rel in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        y = KERNEL.forward(layer, x.to(dtype))
        assert y.dtype == dtype
        ref = REFERENCE_KERNEL.forward(layer, x)
        bound = rel * (x.abs() @ magnitude(layer).t()) + 1e-3
        assert bool(((y.float() - ref).abs() <= bound).all())
    assert KERNEL.forward(layer, torch.randn(0, 256)).shape == (0, 72)
    with pytest.raises(ValueError, match="features"):
        KERNEL.forward(layer, torch.randn(2, 255))


def test_uses_current_scales():
    """E2E-QP updates the step sizes in place: no stale cached copy may be used."""
    layer = make_layer(256, 72, 2, 64, scales_dtype=torch.float32)
    x = torch.randn(2, 256)
    KERNEL.forward(layer, x)
    with torch.no_grad():
        layer.scales.mul_(1.5)
    assert_matches_reference(layer, x)
    layer.scales.data = torch.rand_like(layer.scales) * 0.01
    assert_matches_reference(layer, x)


def test_zero_point_cache_follows_the_buffer():
    layer = make_layer(256, 72, 4, 64, seed=1)
    other = make_layer(256, 72, 4, 64, seed=2)
    x = torch.randn(1, 256)
    assert_matches_reference(layer, x)
    layer.load_state_dict(other.state_dict())  # copies into the existing buffers
    assert_matches_reference(layer, x)
    layer.qzeros = make_layer(256, 72, 4, 64, seed=3).qzeros  # a new tensor
    assert_matches_reference(layer, x)
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(KERNEL.forward(layer, x), KERNEL.forward(other, x))


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128), (4, -1), (8, 32)])
@pytest.mark.parametrize("m", [1, 40])
def test_gradients_match_reference(bits, group, m):
    """Gradients w.r.t. the step sizes (fp32 and fp16) and the input, as the reference's."""
    k, n = 576, 48
    for scales_dtype in (torch.float32, torch.float16):
        layer = make_layer(k, n, bits, group, bias=True, seed=bits, scales_dtype=scales_dtype)
        layer.scales.requires_grad_(True)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(3))
        target = torch.randn(m, n, generator=torch.Generator().manual_seed(4))

        grads = []
        for kernel in (KERNEL, REFERENCE_KERNEL):
            xi = x.clone().requires_grad_(True)
            loss = ((kernel.forward(layer, xi) - target) ** 2).sum()
            loss.backward()
            grads.append((layer.scales.grad.clone(), xi.grad.clone()))
            layer.scales.grad = None
        (gs, gx), (gs_ref, gx_ref) = grads
        assert gs.dtype == scales_dtype
        tol = 1e-4 if scales_dtype == torch.float32 else 2e-3
        atol = tol * gs_ref.abs().max().item()
        torch.testing.assert_close(gs.float(), gs_ref.float(), rtol=tol, atol=atol)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4 * gx_ref.abs().max().item())


def test_gradient_for_scales_only_and_training_step():
    """A step of E2E-QP: only the scales train; the next forward sees the update."""
    layer = make_layer(256, 72, 2, 64, scales_dtype=torch.float32)
    layer.scales.requires_grad_(True)
    layer.set_kernel(KERNEL)
    opt = torch.optim.SGD([layer.scales], lr=1e-3)
    x = torch.randn(4, 256)
    before = layer(x).detach()
    layer(x).square().mean().backward()
    opt.step()
    after = layer(x).detach()
    assert not torch.allclose(before, after)
    with torch.no_grad():
        assert_matches_reference(layer, x)


def test_memory_stays_packed():
    """Nothing of the dense weight's size is kept per layer."""
    layer = make_layer(1024, 512, 2, 64)
    KERNEL.forward(layer, torch.randn(1, 1024))
    zo = torch_kernel._ZEROS[layer][-1]
    cached = zo.numel() * zo.element_size()
    packed = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales))
    dense = 1024 * 512 * 4
    assert packed + cached <= dense / 10


def test_inference_mode_then_no_grad_and_training():
    """Buffers first made under inference_mode must not break later no_grad or autograd runs."""
    from torch import nn

    from eqat_cli.quant.torch_kernel import TORCH_KERNEL
    from eqat_cli.quant.linear import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(4096 + 64, 80, bias=False), QuantScheme(2, 64)).to_packed()  # fresh sizes
    layer.set_kernel(TORCH_KERNEL)
    x = torch.randn(3, 4096 + 64)
    with torch.inference_mode():
        a = layer(x)
    with torch.no_grad():
        b = layer(x)
    torch.testing.assert_close(a, b)
    layer.start_training()
    layer(x).sum().backward()
    assert layer.scales.grad is not None
