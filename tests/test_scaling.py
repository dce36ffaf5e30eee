"""Equivalent channel scaling before quantization (AWQ's search on up_proj -> down_proj)."""

import json

import pytest
import torch

from conftest import TINY_CONFIGS, build, save_tiny, tiny_llama_config
from eqat_cli.quant.scaling import apply_scales, rtn, search_scales
from eqat_cli.registry import get_registry
from eqat_cli.train.block_ap import BlockAPConfig, run_block_ap
from eqat_cli.train.block_ap.start import scale_block_pairs
from test_block_ap import calib, tiny_tokenizer

from eqat_cli.scheme import QuantScheme


def massive_inputs(tokens=512, channels=128, big=(5, 77), seed=0):
    """Inputs like SmolLM2's block-11 down_proj: two channels ~1000x the others on some tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g) * 0.1
    x[::64, big[0]] = 300.0  # every 64th token (a window's first position)
    x[::64, big[1]] = -120.0
    return x


def quant_error(w, x, s, bits, group):
    ref = x @ w.T
    return float(((x / s) @ rtn(w * s, QuantScheme(bits, group)).T - ref).pow(2).mean() / ref.pow(2).mean())


def test_search_protects_massive_channels_and_never_loses_to_no_scaling():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 128, generator=g) * 0.05
    x = massive_inputs()
    for bits in (2, 4):
        s, choice = search_scales(w, x, x.abs().mean(0), QuantScheme(bits, 32))
        assert choice.alpha > 0
        assert choice.error <= choice.error_unscaled / 4  # the massive columns dominate the unscaled error
        # the reported errors are what the scales give, measured independently
        assert choice.error == pytest.approx(quant_error(w, x, s, bits, 32), rel=1e-4)
        assert choice.error_unscaled == pytest.approx(quant_error(w, x, torch.ones(128), bits, 32), rel=1e-4)
        assert s[5] > s.median() * 10 and s[77] > s.median() * 5
    # no channel stands out: every candidate is the identity, and alpha 0 is kept
    flat = torch.ones(128)
    s, choice = search_scales(w, torch.randn(256, 128, generator=g), flat, QuantScheme(4, 32))
    assert choice.alpha == 0 and torch.equal(s, torch.ones(128))


def test_apply_scales_keeps_the_mlp_and_the_producers_quantization():
    torch.manual_seed(0)
    model = build(tiny_llama_config())
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight[3] *= 50  # a channel with a large activation
    x = torch.randn(2, 9, model.config.hidden_size)
    with torch.no_grad():
        before = mlp(x)
        up_q = rtn(mlp.up_proj.weight, QuantScheme(4, 32))
    s = torch.rand(mlp.up_proj.out_features) * 10 + 0.1
    apply_scales(mlp.up_proj, [mlp.down_proj], s)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), before, rtol=1e-5, atol=1e-5)
        # min-max quantization of the producer is the same, row by row, up to the scale
        torch.testing.assert_close(rtn(mlp.up_proj.weight, QuantScheme(4, 32)) * s[:, None], up_q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_every_architecture_declares_its_mlp_pair_and_scaling_keeps_the_block(name):
    model = build(TINY_CONFIGS[name]())
    arch = get_registry().architecture_for(model.config.model_type)
    assert arch.scale_pairs == (("mlp.up_proj", ("mlp.down_proj",)),)
    block = arch.layers(model)[1]
    hidden = arch.text_config(model.config).hidden_size
    with torch.no_grad():  # a channel with a large activation into down_proj
        block.mlp.up_proj.weight[2] *= 40
    x = torch.randn(4, 16, hidden)
    kw = arch.block_kwargs(model, x, block)
    with torch.no_grad():
        before = block(x, **kw)
    rec = scale_block_pairs(block, model, arch, x, 2, torch.device("cpu"), QuantScheme(4, 32))
    assert [r["pair"] for r in rec] == ["mlp.up_proj->mlp.down_proj"]
    assert rec[0]["alpha"] > 0 and rec[0]["error"] <= rec[0]["error_unscaled"]
    with torch.no_grad():
        out = block(x, **kw)
    out, before = (t[0] if isinstance(t, tuple) else t for t in (out, before))
    torch.testing.assert_close(out, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_norm_scale_pairs_keep_the_block(name):
    """Norm producers (declared by no built-in spec: on SmolLM2 they lost to the MLP pair alone)
    fold into the gain, ``1 + weight`` for Gemma-3, and the block is unchanged."""
    from eqat_cli.specs import replace

    model = build(TINY_CONFIGS[name]())
    base = get_registry().architecture_for(model.config.model_type)
    mlp_norm = "pre_feedforward_layernorm" if name == "gemma3" else "post_attention_layernorm"
    arch = replace(base, scale_pairs=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        (mlp_norm, ("mlp.gate_proj", "mlp.up_proj")), *base.scale_pairs))
    block = arch.layers(model)[1]
    with torch.no_grad():
        for norm, _ in arch.scale_pairs[:2]:
            block.get_submodule(norm).weight[3] = 30.0
    gains = {norm: block.get_submodule(norm).weight.detach().clone() for norm, _ in arch.scale_pairs[:2]}
    x = torch.randn(4, 16, arch.text_config(model.config).hidden_size)
    kw = arch.block_kwargs(model, x, block)
    with torch.no_grad():
        before = block(x, **kw)
    rec = scale_block_pairs(block, model, arch, x, 2, torch.device("cpu"), QuantScheme(4, 32))
    assert len(rec) == 3 and all(r["error"] <= r["error_unscaled"] for r in rec)
    for (norm, _), r in zip(arch.scale_pairs[:2], rec):
        assert r["alpha"] > 0 and not torch.equal(block.get_submodule(norm).weight, gains[norm])
    with torch.no_grad():
        out = block(x, **kw)
    out, before = (t[0] if isinstance(t, tuple) else t for t in (out, before))
    torch.testing.assert_close(out, before, rtol=1e-4, atol=1e-4)


def test_norm_gain_with_an_offset_folds_exactly():
    from eqat_cli.quant.scaling import apply_scales as fold

    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.randn(8))
    lin = torch.nn.Linear(8, 5, bias=False)
    x = torch.randn(3, 8)
    s = torch.rand(8) + 0.5
    for offset in (0.0, 1.0):
        w0, l0 = norm.weight.detach().clone(), lin.weight.detach().clone()
        want = lin(x * (offset + norm.weight))
        fold(norm, [lin], s, offset)
        torch.testing.assert_close(lin(x * (offset + norm.weight)), want, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            norm.weight.copy_(w0), lin.weight.copy_(l0)


def test_spec_rejects_a_scale_pair_that_is_not_its_linears():
    from eqat_cli.plugins.llama import LLAMA
    from eqat_cli.specs import replace

    with pytest.raises(ValueError, match="scale pair"):
        replace(LLAMA, scale_pairs=(("mlp.up_proj", ("mlp.nowhere",)),))
    with pytest.raises(ValueError, match="scale pair"):
        replace(LLAMA, scale_pairs=(("mlp.up_proj", "mlp.down_proj"),))  # consumers must be a tuple


def test_block_ap_default_scales_paper_does_not(tmp_path):
    d = save_tiny(build(tiny_llama_config()), tmp_path / "fp")
    c = calib()
    with torch.no_grad():  # a massive channel in every block's MLP, so the search has work to do
        m = build(tiny_llama_config())
        for layer in m.model.layers:
            layer.mlp.up_proj.weight[1] *= 60
    d2 = save_tiny(m, tmp_path / "fp-massive")
    assert BlockAPConfig.paper(bits=2).resolved_channel_scale is False
    # default recipe: on at 2 and 3 bits, off from 4 (where it did not help on SmolLM2)
    assert [BlockAPConfig(bits=b).to_json()["channel_scale"] for b in (2, 3, 4, 8)] == [True, True, False, False]
    assert BlockAPConfig(bits=4, channel_scale=True).resolved_channel_scale is True
    paper = run_block_ap(d, tiny_tokenizer(), c.train, c.val, BlockAPConfig.paper(bits=4, group_size=32, epochs=0),
                         tmp_path / "paper", torch.device("cpu"))
    assert all("channel_scale" not in b for b in paper.blocks)
    outs = {}
    for on in (False, True):
        cfg = BlockAPConfig(bits=4, group_size=32, epochs=0, channel_scale=on)
        outs[on] = run_block_ap(d2, tiny_tokenizer(), c.train, c.val, cfg, tmp_path / f"rtn-{on}", torch.device("cpu"))
    recs = [r for b in outs[True].blocks for r in b["channel_scale"]]
    assert len(recs) == len(outs[True].blocks)
    assert all(0 <= r["alpha"] <= 1 and r["error"] <= r["error_unscaled"] for r in recs)
    assert any(r["alpha"] > 0 for r in recs)
    # the scaled start is at least as good on the blocks' own validation loss, summed over blocks
    assert sum(b["loss_after"] for b in outs[True].blocks) < sum(b["loss_after"] for b in outs[False].blocks)
    summary = json.loads((outs[True].output / "blockap_summary.json").read_text())
    assert summary[0]["channel_scale"] == outs[True].blocks[0]["channel_scale"]
    assert json.loads((outs[True].output / "config.json").read_text())["eqat"]["block_ap"]["channel_scale"] is True
