"""The Triton kernels against the pure-torch reference, in Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before Triton (and ``eqat_kernels.triton_kernels``) is
imported: ``triton.jit`` picks the interpreter at decoration time.

Tolerances: ``dequantize`` must match the reference bit for bit. The matmuls accumulate in
fp32 in another order than the reference, so each output element may differ by a few fp32
roundings of the sum of the magnitudes it adds up; we allow
``|y - y_ref| <= 1e-5 * (|x| @ |W|^T) + 1e-6`` (with ``K <= 576`` the actual error is below
``K * 2^-24 ~ 3.5e-5`` of that sum in the worst case and ~100x smaller in practice).
Half-precision inputs get the half-precision analogue (``2e-3`` for fp16).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import torch  # noqa: E402

from eqat_cli.quant.linear import REFERENCE_KERNEL, PackedLinear  # noqa: E402
from eqat_cli.quant.primitives import n_groups  # noqa: E402

tk = pytest.importorskip("eqat_kernels.triton_kernels")
from eqat_kernels import reference  # noqa: E402
from eqat_kernels.backend import TritonKernel  # noqa: E402

if not tk.INTERPRETED:  # imported earlier in this process without TRITON_INTERPRET
    pytest.skip(
        "eqat_kernels.triton_kernels was imported before TRITON_INTERPRET=1 was set",
        allow_module_level=True,
    )


from conftest import random_packed_layer as make_layer  # noqa: E402


def tensors(layer):
    return layer.qweight, layer.qzeros, layer.scales, layer.bits, layer.group_size


def assert_close_matmul(y, x, layer, rel=1e-5):
    w = layer.dequantize(torch.float32)
    y_ref = x.float() @ w.t()
    if layer.bias is not None:
        y_ref = y_ref + layer.bias.float()
    bound = rel * (x.float().abs() @ w.abs().t()) + 1e-6
    err = (y.float() - y_ref).abs()
    assert y.shape == y_ref.shape
    assert bool((err <= bound).all()), f"max err {err.max():.3g}, bound at worst {bound.min():.3g}"


# (in, out, group): odd sizes (not multiples of the blocks or of the pack factor), a ragged
# last group (576 = 4 x 128 + 64, SmolLM2's width) and per-channel.
SHAPES = [
    pytest.param(96, 40, 32, id="96x40-g32"),
    pytest.param(256, 72, 64, id="256x72-g64"),
    pytest.param(256, 72, 128, id="256x72-g128"),
    pytest.param(96, 40, -1, id="96x40-perchannel"),
    pytest.param(576, 192, 128, id="576x192-g128-ragged"),
]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k,n,group", SHAPES)
def test_dequantize_exact(bits, k, n, group):
    layer = make_layer(k, n, bits, group)
    args = tensors(layer)
    ref = reference.dequantize(*args, k, torch.float32)
    assert torch.equal(ref, layer.dequantize(torch.float32))
    out = tk.dequantize(*args, k, dtype=torch.float32)
    assert out.shape == (n, k)
    assert torch.equal(out, ref)
    # The [in, out] layout is the same numbers transposed.
    assert torch.equal(tk.dequantize(*args, k, dtype=torch.float32, layout="in_out"), ref.t())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_exact_half(dtype):
    layer = make_layer(96, 40, 4, 32)
    args = tensors(layer)
    assert torch.equal(
        tk.dequantize(*args, 96, dtype=dtype), reference.dequantize(*args, 96, dtype)
    )


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k,n,group", SHAPES)
def test_matmul_decode_and_prefill(bits, k, n, group):
    """M=1 takes the decode kernel, M=33 the prefill kernel (not a multiple of any block)."""
    layer = make_layer(k, n, bits, group, seed=bits)
    g = torch.Generator().manual_seed(1)
    for m, expect in ((1, "decode"), (33, "prefill")):
        x = torch.randn(m, k, generator=g)
        assert (m <= tk.DECODE_MAX_ROWS) == (expect == "decode")
        assert_close_matmul(tk.matmul(x, *tensors(layer)), x, layer)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernels_off_their_usual_sizes(bits):
    """Decode with several rows (the tl.dot variant), prefill with one row."""
    layer = make_layer(576, 192, bits, 128, seed=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 576, generator=g)
    assert_close_matmul(tk.decode_matmul(x, *tensors(layer)), x, layer)
    assert_close_matmul(tk.prefill_matmul(x[:1], *tensors(layer)), x[:1], layer)


def test_decode_split_k_and_tiles_straddling_groups():
    """Explicit blocks: several K splits, and K-tiles wider than a group (per-row parameters)."""
    layer = make_layer(256, 72, 3, 32, seed=4)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(5))
    for split in (1, 2, 4):
        b = tk.Blocks(1, 64, 32, split_k=split, k_per_split=256 // split)
        assert_close_matmul(tk.decode_matmul(x, *tensors(layer), blocks=b), x, layer)
    x3 = torch.randn(3, 256, generator=torch.Generator().manual_seed(6))
    b = tk.Blocks(16, 64, 32, split_k=2, k_per_split=128)
    assert_close_matmul(tk.decode_matmul(x3, *tensors(layer), blocks=b), x3, layer)
    b = tk.Blocks(16, 64, 32)
    assert_close_matmul(tk.prefill_matmul(x3, *tensors(layer), blocks=b), x3, layer)


def test_half_precision_inputs():
    layer = make_layer(256, 72, 4, 64, seed=7)
    x = torch.randn(33, 256, generator=torch.Generator().manual_seed(8)).half()
    for xs in (x[:1], x):
        y = tk.matmul(xs, *tensors(layer))
        assert y.dtype == torch.float16
        assert_close_matmul(y, xs, layer, rel=2e-3)


@pytest.mark.parametrize("shape", [(1, 576), (2, 3, 576), (2, 20, 576)], ids=str)
def test_backend_matches_reference_kernel(shape):
    layer = make_layer(576, 192, 2, 64, bias=True, seed=9)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(10))
    kernel = TritonKernel()
    assert kernel.name == "triton"
    layer.set_kernel(kernel)
    y = layer(x)
    assert y.shape == (*shape[:-1], 192)
    ref = REFERENCE_KERNEL.forward(layer, x)
    assert_close_matmul(y.reshape(-1, 192), x.reshape(-1, 576), layer)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_backend_falls_back_to_differentiable_path_for_training():
    """Trained step sizes: the kernel the ``triton`` plugin builds runs a differentiable path
    (the torch kernel it passes in; eqat_kernels imports nothing of eqat_cli)."""
    from eqat_cli.plugins.backend_triton import TRITON_BACKEND

    layer = make_layer(96, 40, 2, 32, seed=11, scales_dtype=torch.float32)
    layer.scales.requires_grad_(True)
    layer.set_kernel(TRITON_BACKEND.kernel())
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(12))
    layer(x).square().sum().backward()
    got = layer.scales.grad.clone()
    layer.scales.grad = None
    REFERENCE_KERNEL.forward(layer, x).square().sum().backward()
    torch.testing.assert_close(got, layer.scales.grad, rtol=1e-4, atol=1e-6)


def test_kernel_without_a_grad_fallback_refuses_gradients():
    layer = make_layer(96, 40, 2, 32, seed=11, scales_dtype=torch.float32)
    layer.scales.requires_grad_(True)
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(12))
    with pytest.raises(RuntimeError, match="no backward"):
        TritonKernel().forward(layer, x)
    with torch.no_grad():  # inference still runs the Triton kernels
        assert_close_matmul(TritonKernel().forward(layer, x), x, layer)


def test_rejects_bad_inputs():
    layer = make_layer(96, 40, 2, 32)
    with pytest.raises(ValueError, match="features"):
        TritonKernel().forward(layer, torch.randn(1, 95))
    with pytest.raises(ValueError, match="shape"):
        tk.dequantize(layer.qweight[:-1], layer.qzeros, layer.scales, 2, 32, 96)
