"""GPTQ initialisation: the lazy-batch Cholesky solver against the textbook OBS recursion, and its
use inside Block-AP (``--init gptq``)."""

import json

import pytest
import torch

from conftest import build, save_tiny, tiny_llama_config
from eqat_cli.errors import BadInputError
from eqat_cli.quant.gptq import HessianAccumulator, gptq_quantize
from eqat_cli.quant.primitives import dequantize_codes, effective_group, minmax_init, quantize_codes
from eqat_cli.train.block_ap import BlockAPConfig

from test_block_ap import calib, run, tensors

from eqat_cli.scheme import QuantScheme


def reference_gptq(w, h, bits, group, damp=0.01):
    """Algorithm 1 of the GPTQ paper without its tricks: quantize column j, push its error onto the
    later columns with the explicit inverse Hessian, then remove j from the inverse (OBS)."""
    w = w.double().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    out_f, in_f = w.shape
    g = effective_group(group, in_f)
    codes = torch.zeros(out_f, in_f, dtype=torch.int32)
    scales, zeros = [], []
    for j in range(in_f):
        if j % g == 0:  # group parameters from the group's weights as they are now
            s, z = minmax_init(w[:, j : j + g], bits, -1)
            s, z = s[:, 0].double(), z[:, 0].double()
            scales.append(s)
            zeros.append(z)
        q = (torch.round(w[:, j] / s) + z).clamp(0, 2**bits - 1)
        codes[:, j] = q.to(torch.int32)
        err = (w[:, j] - (q - z) * s) / hinv[j, j]
        w[:, j:] -= err.unsqueeze(1) * hinv[j, j:].unsqueeze(0)
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes, torch.stack(scales, 1).float(), torch.stack(zeros, 1).float()


def correlated_inputs(n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / d**0.5 + torch.eye(d)
    scale = torch.rand(d, generator=gen) * 3 + 0.1
    return (torch.randn(n, d, generator=gen) @ mix) * scale


@pytest.mark.parametrize(
    "bits,group,width",
    [(2, 16, 48), (3, 20, 48), (4, -1, 48), (4, 16, 48), (3, -1, 384), (2, 512, 640)],
    ids=["w2g16", "w3g20-ragged", "w4-per-channel", "w4g16", "w3-per-channel-3-batches", "w2g512-ragged"],
)
def test_matches_textbook_obs_recursion(bits, group, width):
    gen = torch.Generator().manual_seed(bits * 100 + group)
    w = torch.randn(12, width, generator=gen)
    acc = HessianAccumulator(width)
    x = correlated_inputs(3 * width + 60, width, seed=bits)
    acc.add(x[:100])
    acc.add(x[100:].reshape(-1, 2, width))  # any leading shape; the running mean equals the batch one
    want_h = 2.0 / len(x) * x.double().T @ x.double()
    assert torch.allclose(acc.h, want_h, rtol=1e-5, atol=1e-5 * want_h.abs().max())
    codes, scale, zero = gptq_quantize(w, acc.h, QuantScheme(bits, group))
    ref_codes, ref_scale, ref_zero = reference_gptq(w, acc.h, bits, group)
    assert torch.equal(codes, ref_codes)
    assert torch.allclose(scale, ref_scale, rtol=1e-6) and torch.equal(zero, ref_zero)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1


def test_diagonal_hessian_is_round_to_nearest():
    """With uncorrelated, equally scaled inputs there is no error to spread: GPTQ is RTN."""
    w = torch.randn(10, 40, generator=torch.Generator().manual_seed(1))
    codes, scale, zero = gptq_quantize(w, torch.eye(40) * 3.0, QuantScheme(3, 8))
    s, z = minmax_init(w, 3, 8)
    assert torch.equal(codes, quantize_codes(w, s, z, 3, 8))
    assert torch.allclose(scale, s) and torch.equal(zero, z)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lower_output_error_than_rtn(bits):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(bits))
    x = correlated_inputs(512, 64)
    acc = HessianAccumulator(64)
    acc.add(x)
    codes, scale, zero = gptq_quantize(w, acc.h, QuantScheme(bits, 16))
    wq = dequantize_codes(codes, scale, zero, 16)
    s, z = minmax_init(w, bits, 16)
    wr = dequantize_codes(quantize_codes(w, s, z, bits, 16), s, z, 16)
    err_gptq = (x @ (w - wq).T).pow(2).mean()
    err_rtn = (x @ (w - wr).T).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn


def test_dead_inputs_and_bad_shapes():
    w = torch.randn(6, 16)
    x = correlated_inputs(100, 16)
    x[:, 3] = 0.0  # an input that is never active
    acc = HessianAccumulator(16)
    acc.add(x)
    codes, scale, zero = gptq_quantize(w, acc.h, QuantScheme(4, 8))
    wq = dequantize_codes(codes, scale, zero, 8)
    assert torch.isfinite(wq).all() and torch.all(wq[:, 3] == 0)
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(w, torch.eye(8), QuantScheme(4, 8))


# ---------------------------------------------------------------------- inside Block-AP


@pytest.fixture
def llama_dir(tmp_path):
    return save_tiny(build(tiny_llama_config()), tmp_path / "fp")


def test_block_ap_gptq_init_uses_the_blocks_inputs(llama_dir, tmp_path):
    """--init gptq --epochs 0 writes, for every linear of block 0, exactly the GPTQ codes of the
    Hessian of that linear's inputs on the training windows, recomputed here independently."""
    from eqat_cli.formats.native import load_packed_model
    from eqat_cli.registry import get_registry

    c = calib(n=16)
    rtn = run(llama_dir, tmp_path / "rtn", BlockAPConfig.paper(bits=2, group_size=32, epochs=0), c)
    res = run(llama_dir, tmp_path / "gptq", BlockAPConfig.paper(bits=2, group_size=32, epochs=0, init="gptq"), c)
    assert json.loads((res.output / "config.json").read_text())["eqat"]["method"] == "gptq"
    arch = get_registry().architecture_for("llama")
    fp = build(tiny_llama_config())
    layer0 = arch.layers(fp)[0]
    accs, hooks = {}, []
    for name in arch.linear_names:  # every linear's own input, captured from the FP model
        lin = layer0.get_submodule(name)
        accs[name] = HessianAccumulator(lin.in_features)
        hooks.append(lin.register_forward_hook(lambda m, a, o, acc=accs[name]: acc.add(a[0])))
    with torch.no_grad():
        h = arch.embed(fp)(c.train)
        layer0(h, **arch.block_kwargs(fp, h, layer0))
    for hk in hooks:
        hk.remove()
    model, _ = load_packed_model(res.output)
    for name in arch.linear_names:
        want, _, want_zero = gptq_quantize(layer0.get_submodule(name).weight, accs[name].h, QuantScheme(2, 32))
        q = arch.layers(model)[0].get_submodule(name)
        assert torch.equal(q.codes().t(), want), name  # checkpoint layout is [in, out]
        assert torch.equal(q.zero_points().t().float(), want_zero), name
    # At 2 bits the GPTQ start is a better start: every block's validation loss is lower than RTN's.
    for a, b in zip(res.blocks, rtn.blocks):
        assert a["loss_before"] < b["loss_before"]
    assert tensors(res.output).keys() == tensors(rtn.output).keys()


def test_block_ap_trains_from_gptq_and_resumes(llama_dir, tmp_path):
    cfg = BlockAPConfig.paper(bits=2, group_size=32, epochs=2, quant_lr=1e-4, weight_lr=1e-4, init="gptq")
    c = calib(n=32)
    full = run(llama_dir, tmp_path / "full", cfg, c)
    assert all(b["loss_after"] < b["loss_before"] for b in full.blocks)

    def stop_at_block_1(event, info):
        if event == "block_start" and info["block"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(llama_dir, tmp_path / "resumed", cfg, c, progress=stop_at_block_1)
    res = run(llama_dir, tmp_path / "resumed", cfg, c)
    assert res.resumed_from == 1
    a, b = tensors(full.output), tensors(res.output)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_init_refused():
    with pytest.raises(BadInputError, match="unknown Block-AP init"):
        BlockAPConfig.paper(init="awq")
    with pytest.raises(BadInputError, match="gptq-damp"):
        BlockAPConfig.paper(init="gptq", gptq_damp=0.0)


def test_keep_best_never_ends_worse_than_the_start(llama_dir, tmp_path):
    """A learning rate far too high for 8 windows makes training from GPTQ worse than GPTQ itself;
    --keep-best restores the starting point for such a block and keeps trained blocks that improved."""
    c = calib(n=8)
    kw = dict(bits=2, group_size=32, epochs=2, quant_lr=1e-3, weight_lr=1e-4, init="gptq")
    plain = run(llama_dir, tmp_path / "plain", BlockAPConfig.paper(**kw), c)
    assert plain.blocks[0]["loss_after"] > 1.5 * plain.blocks[0]["loss_before"]  # the failure it guards
    events = []
    kept = run(llama_dir, tmp_path / "kept", BlockAPConfig.paper(**kw, keep_best=True), c,
               progress=lambda e, i: events.append((e, i)))
    b0 = kept.blocks[0]
    assert b0["history"]["best_epoch"] == 0
    assert b0["loss_after"] == pytest.approx(b0["loss_before"], rel=1e-2)  # only fp16 rounding differs
    assert ("restored", {"block": 0, "epoch": 0, "val_loss": pytest.approx(b0["loss_before"])}) in events
    gptq_only = run(llama_dir, tmp_path / "g", BlockAPConfig.paper(bits=2, group_size=32, epochs=0, init="gptq"), c)
    g0 = "model.layers.0."
    a, b = tensors(kept.output), tensors(gptq_only.output)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(g0))  # block 0 is exactly GPTQ
    for blk in kept.blocks:
        assert blk["loss_after"] <= blk["loss_before"] * 1.01


def test_keep_best_is_a_no_op_when_the_last_epoch_is_best(llama_dir, tmp_path):
    kw = dict(bits=2, group_size=32, epochs=2, quant_lr=1e-3, weight_lr=1e-4)  # min-max start: training helps
    a = run(llama_dir, tmp_path / "a", BlockAPConfig.paper(**kw))
    b = run(llama_dir, tmp_path / "b", BlockAPConfig.paper(**kw, keep_best=True))
    assert [x["history"]["best_epoch"] for x in b.blocks] == [2, 2]
    ta, tb = tensors(a.output), tensors(b.output)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_keep_best_needs_validation_windows(llama_dir, tmp_path):
    c = calib(val=0)
    with pytest.raises(BadInputError, match="--keep-best needs validation windows"):
        run(llama_dir, tmp_path / "o", BlockAPConfig.paper(epochs=1, keep_best=True), c)
    assert not (tmp_path / "o.partial").exists()
