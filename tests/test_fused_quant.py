"""The fused fake-quant kernel (quant/fused_quant.py) against the torch reference path: forward
bit-identical, element gradients bit-identical, per-group gradients to 1e-5 relative, at 2/3/4
bits, every group size (ragged last groups and per-channel included), both Block-AP
parametrisations; and a short Block-AP run gives the same losses on either path."""

import copy

import pytest
import torch
from torch import nn

from conftest import build, tiny_llama_config
from eqat_cli.quant import fused_quant
from eqat_cli.quant.linear import QuantLinear
from eqat_cli.quant.rounding import RoundQuantLinear
from eqat_cli.scheme import QuantScheme

pytestmark = pytest.mark.skipif(not fused_quant.library_status()[0], reason="no C++ compiler for the fused kernel")

# (in_features, group): whole groups, ragged last groups, per-channel.
SHAPES = [(128, 32), (192, 64), (200, 64), (576, 128), (100, 128), (96, -1), (72, 16)]


def quant_linear(in_f: int, group: int, bits: int, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, 24, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, in_f, generator=g) * 0.05)
        lin.weight[3, 5] = 0.4  # an outlier: other weights of its group sit at the grid's ends
    q = QuantLinear(lin, QuantScheme(bits, group))
    with torch.no_grad():  # move the grid so that some codes clamp at 0 and at qmax
        q.quantizer.scale.mul_(0.6 + 0.5 * torch.rand(q.quantizer.scale.shape, generator=g))
        q.quantizer.zero.add_(torch.randn(q.quantizer.zero.shape, generator=g) * 0.7)
    return q


def rel_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    scale = want.abs().max().clamp_min(1e-30)
    assert float((got - want).abs().max() / scale) <= rel, float((got - want).abs().max() / scale)


def grads(layer: nn.Module, params: list[nn.Parameter], x: torch.Tensor, fused: bool):
    for p in params:
        p.grad = None
    ctx = fused_quant.disabled() if not fused else torch.enable_grad()
    with ctx:
        w = layer.fake_weight() if isinstance(layer, RoundQuantLinear) else layer.quantizer(layer.weight)
        out = torch.nn.functional.linear(x, w)
    (out.pow(2).sum() + out.sum()).backward()
    return w.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("in_f,group", SHAPES)
def test_free_matches_reference(bits, in_f, group):
    q = quant_linear(in_f, group, bits)
    params = [q.weight, q.quantizer.scale, q.quantizer.zero]
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(1))
    assert fused_quant.applies(q.weight)
    w_ref, g_ref = grads(q, params, x, fused=False)
    w_new, g_new = grads(q, params, x, fused=True)
    assert torch.equal(w_new, w_ref)
    assert torch.equal(g_new[0], g_ref[0])  # weights: elementwise, the same operations
    rel_close(g_new[1], g_ref[1])  # step sizes and zero points: per-group sums
    rel_close(g_new[2], g_ref[2])


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("in_f,group", SHAPES)
def test_round_matches_reference(bits, in_f, group):
    r = RoundQuantLinear.from_quant_linear(quant_linear(in_f, group, bits))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        r.offset.copy_(torch.rand(r.offset.shape, generator=g) - 0.5)
        r.clip_max.copy_(0.5 + 0.5 * torch.rand(r.clip_max.shape, generator=g))
        r.clip_min.copy_(0.5 + 0.5 * torch.rand(r.clip_min.shape, generator=g))
    params = [r.offset, r.clip_max, r.clip_min]
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(1))
    w_ref, g_ref = grads(r, params, x, fused=False)
    w_new, g_new = grads(r, params, x, fused=True)
    assert torch.equal(w_new, w_ref)
    assert torch.equal(g_new[0], g_ref[0])  # offsets: elementwise
    rel_close(g_new[1], g_ref[1])
    rel_close(g_new[2], g_ref[2])


def test_fused_keeps_nothing_weight_sized_but_its_inputs():
    """The forward saves its inputs only: codes and masks are recomputed in the backward."""
    r = RoundQuantLinear.from_quant_linear(quant_linear(192, 64, 2))
    w = r.fake_weight()
    saved = w.grad_fn.saved_tensors
    assert {t.data_ptr() for t in saved if t.numel() == r.w0.numel()} == {r.w0.data_ptr(), r.offset.data_ptr()}


def test_disabled_and_non_cpu_fp32_fall_back():
    q = quant_linear(128, 32, 2)
    with fused_quant.disabled():
        assert not fused_quant.applies(q.weight)
    assert fused_quant.applies(q.weight)
    assert not fused_quant.applies(q.weight.double())


@pytest.mark.parametrize("param", ["round", "free"])
def test_short_block_ap_same_losses(param):
    """A few training steps of one block on either path: the same losses (to float rounding)."""
    from eqat_cli.registry import get_registry
    from eqat_cli.train.block_ap import BlockAPConfig, quantize_block_start, train_block

    arch = get_registry().architecture_for("llama")
    model = build(tiny_llama_config())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, model.config.hidden_size, generator=g)
    with torch.no_grad():
        y = arch.layers(model)[0](x, **arch.block_kwargs(model, x, 0))
    if param == "round":
        cfg = BlockAPConfig(bits=2, group_size=32, steps=6, batch_size=4, precision="fp32", channel_scale=False)
    else:
        cfg = BlockAPConfig.paper(bits=2, group_size=32, epochs=3, batch_size=4, quant_lr=1e-3, weight_lr=1e-3,
                                  precision="fp32")
    cpu = torch.device("cpu")
    histories = []
    for fused in (False, True):
        block = copy.deepcopy(arch.layers(model)[0])
        quantize_block_start(block, model, arch, cfg, x, 4, cpu)
        losses = []
        ctx = fused_quant.disabled() if not fused else torch.enable_grad()
        with ctx:
            train_block(block, model, arch, 0, cfg, x, y, x[:4], y[:4], cpu,
                        lambda ev, info: losses.append(info["loss"]) if ev == "step" else None)
        histories.append(losses)
    assert len(histories[0]) >= 6
    assert histories[1] == pytest.approx(histories[0], rel=1e-5)
