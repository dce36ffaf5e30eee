"""Fake-quant linear -> packed linear: same outputs, stated tolerances.

* With fp16-representable step sizes the packed layer reproduces the fake-quant layer up to
  matmul summation order: max |diff| <= 1e-5 * max |y|.
* In general the packed layer stores fp16 step sizes; the extra error is fp16 rounding of each
  step size (relative 2^-11): max |diff| <= 2e-3 * max |y|.
"""

import pytest
import torch
from torch import nn

from eqat_cli.quant.linear import PackedLinear, QuantLinear
from eqat_cli.scheme import QuantScheme

EXACT_TOL = 1e-5
FP16_SCALE_TOL = 2e-3


def _pair(inf, outf, bits, group, seed=0, bias=False):
    torch.manual_seed(seed)
    lin = nn.Linear(inf, outf, bias=bias)
    q = QuantLinear(lin, QuantScheme(bits, group))
    return lin, q


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,inf,outf", [(32, 96, 40), (64, 64, 64), (128, 576, 192), (-1, 80, 33)])
def test_packed_matches_fake_quant(bits, group, inf, outf):
    _, q = _pair(inf, outf, bits, group, seed=bits)
    x = torch.randn(3, 5, inf)
    with torch.no_grad():
        y_fake = q(x)
        packed = q.to_packed()
        assert _rel(packed(x), y_fake) <= FP16_SCALE_TOL
        # Make step sizes fp16-representable: then agreement is exact up to summation order.
        q.quantizer.scale.copy_(q.quantizer.scale.half().float())
        y_fake = q(x)
        assert _rel(q.to_packed()(x), y_fake) <= EXACT_TOL


def test_bias_is_kept():
    _, q = _pair(64, 16, 4, 32, bias=True)
    x = torch.randn(2, 64)
    with torch.no_grad():
        q.quantizer.scale.copy_(q.quantizer.scale.half().float())
        assert _rel(q.to_packed()(x), q(x)) <= EXACT_TOL


def test_trained_zero_out_of_range_is_clamped_when_packing():
    _, q = _pair(64, 8, 2, 32)
    with torch.no_grad():
        q.quantizer.zero.add_(7.3)  # drifted far out of [0, 3]
        q.quantizer.scale.copy_(q.quantizer.scale.half().float())
        packed = q.to_packed()
    assert packed.zero_points().max() <= 3 and packed.zero_points().min() >= 0
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert _rel(packed(x), q(x)) <= EXACT_TOL


def test_from_codes_rejects_bad_zero():
    codes = torch.zeros(4, 32, dtype=torch.int32)
    with pytest.raises(ValueError, match="zero points out of range"):
        PackedLinear.from_codes(codes, torch.ones(4, 1), torch.full((4, 1), 4), QuantScheme(2, 32))


def test_packed_shapes_native_layout():
    _, q = _pair(576, 192, 2, 64)
    p = q.to_packed()
    assert p.qweight.shape == (576 // 16, 192) and p.qweight.dtype == torch.int32
    assert p.qzeros.shape == (9, 192 // 16)
    assert p.scales.shape == (9, 192) and p.scales.dtype == torch.float16
    assert torch.equal(p.g_idx, torch.arange(576, dtype=torch.int32) // 64)
    p3 = _pair(576, 192, 3, 128)[1].to_packed()  # 3-bit: 10 codes/word, ragged last group
    assert p3.qweight.shape == (58, 192) and p3.scales.shape == (5, 192)
