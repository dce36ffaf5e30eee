"""The quantizer math against a direct, independent formula."""

import pytest
import torch

from eqat_cli.errors import BadInputError, UnsupportedError
from eqat_cli.quant.linear import UniformAffineQuantizer
from eqat_cli.quant.primitives import (
    dequantize_codes, fake_quantize, minmax_init, n_groups, quantize_codes,
)
from eqat_cli.scheme import QuantScheme


def reference_minmax_fakequant(w, bits, group):
    """Loop-per-group reference: W ~= (clamp(round(W/s)+z, 0, 2^b-1) - z) * s."""
    out = torch.empty_like(w)
    inf = w.shape[1]
    g = inf if group == -1 else group
    for o in range(w.shape[0]):
        for start in range(0, inf, g):
            x = w[o, start : start + g].double()
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            s = max((hi - lo) / (2**bits - 1), 1e-5)
            z = min(max(round(-lo / s), 0), 2**bits - 1)
            q = torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1)
            out[o, start : start + g] = ((q - z) * s).float()
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,inf", [(32, 64), (64, 64), (128, 576), (-1, 40), (16, 40)])
def test_fake_quant_matches_reference(bits, group, inf):
    torch.manual_seed(bits + inf)
    w = torch.randn(6, inf)
    scale, zero = minmax_init(w, bits, group)
    assert scale.shape == zero.shape == (6, n_groups(inf, group))
    got = fake_quantize(w, scale, zero, bits, group)
    torch.testing.assert_close(got, reference_minmax_fakequant(w, bits, group), rtol=0, atol=1e-5)


def test_ragged_group_count():
    assert n_groups(576, 128) == 5
    assert n_groups(576, 64) == 9
    assert n_groups(576, -1) == 1


def test_codes_and_dequant_agree_with_fake_quant():
    torch.manual_seed(0)
    w = torch.randn(10, 100)
    scale, zero = minmax_init(w, 3, 32)
    q = quantize_codes(w, scale, zero, 3, 32)
    assert q.min() >= 0 and q.max() <= 7
    torch.testing.assert_close(dequantize_codes(q, scale, zero, 32), fake_quantize(w, scale, zero, 3, 32))


def test_straight_through_gradients():
    torch.manual_seed(0)
    w = torch.randn(4, 64, requires_grad=True)
    quant = UniformAffineQuantizer(w.detach(), QuantScheme(2, 32))
    with torch.no_grad():  # a narrower grid clips some weights: only those move the zero point
        quant.scale.mul_(0.5)
    loss = (quant(w) - torch.randn(4, 64)).pow(2).sum()
    loss.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert quant.scale.grad is not None and quant.scale.grad.abs().sum() > 0
    assert quant.zero.grad is not None and quant.zero.grad.abs().sum() > 0
    # Identity gradient through rounding inside the clamp range: d(fq)/dw = 1 there.
    w2 = torch.zeros(1, 32, requires_grad=True)
    w_init = torch.linspace(-1, 1, 32).view(1, 32)
    q2 = UniformAffineQuantizer(w_init, QuantScheme(4, 32))
    with torch.no_grad():
        w2.copy_(w_init * 0.5)
    q2(w2).sum().backward()
    assert torch.allclose(w2.grad, torch.ones_like(w2))


def test_zero_is_clamped_into_range():
    w = torch.randn(2, 32)
    scale, zero = minmax_init(w, 2, 32)
    zero = zero + 10  # learned zero drifted out of range
    q = quantize_codes(w, scale, zero, 2, 32)
    assert q.max() <= 3
    torch.testing.assert_close(
        fake_quantize(w, scale, zero, 2, 32), fake_quantize(w, scale, torch.full_like(zero, 3.0), 2, 32)
    )


def test_bad_bits_and_group():
    with pytest.raises(UnsupportedError, match="unsupported bit width 5"):
        minmax_init(torch.randn(2, 8), 5, 8)
    with pytest.raises(BadInputError, match="group size"):
        minmax_init(torch.randn(2, 8), 4, 0)
