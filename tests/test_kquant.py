"""GGML-grid (k-quant) training targets: Q2_K/Q3_K/Q4_K and the fallbacks IQ4_NL/Q5_0 (issue #27, item 2).

The reference is the ``gguf`` package's own dequantizer (``gguf.quants.dequantize``), never eqat's
code: eqat's fake-quantized weights must be exactly what it decodes from eqat's bytes, for random
grids (random rounding offsets and scale factors), for whole tiny models exported with
``eqat pack --format gguf`` (Llama with q/k rows permuted, and Gemma-3 with a fallback-width
``down_proj``), and after a short Block-AP run with ``--target``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIGS, build
from test_pack import byte_level_tokenizer, invoke, save_native_dir

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_0", "IQ4_NL"]


def gguf_dequantize(blocks: np.ndarray, type_name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return np.asarray(dequantize(blocks, getattr(GGMLQuantizationType, type_name)), dtype=np.float32)


@pytest.mark.parametrize("type_name", TYPES)
def test_fake_weight_is_what_the_gguf_reader_decodes(type_name):
    from eqat_cli.quant.kquant import KQuantLinear

    torch.manual_seed(0)
    w = torch.randn(6, 512) * 0.05
    w[0, :64] = 0.0  # zero sub-blocks (d or dmin 0)
    w[1] = w[1].abs() + 0.01  # no negative weight: every minimum 0
    w[2, 256:] *= 1e-4  # tiny block: subnormal fp16 super-scales
    layer = KQuantLinear(w, type_name)
    with torch.no_grad():
        layer.offset.uniform_(-0.5, 0.5)
        for p in layer.factors():
            p.uniform_(0.5, 1.5)
    fake = layer.fake_weight().detach()
    blocks = layer.to_blocks()
    from eqat_cli.quant.kquant import TYPES as GRIDS

    gt = GRIDS[type_name]
    assert blocks.shape == (6, 512 // gt.block * gt.block_bytes) and blocks.dtype == np.uint8
    np.testing.assert_array_equal(gguf_dequantize(blocks, type_name), fake.numpy())
    assert torch.equal(layer.to_packed().weight, fake)
    # training reaches the rounding offsets and the scale factors
    layer.fake_weight().square().sum().backward()
    assert layer.offset.grad.abs().sum() > 0 and layer.fs.grad.abs().sum() > 0


@pytest.mark.parametrize("type_name", TYPES)
def test_start_is_a_good_round_to_nearest(type_name):
    """The start's error is below a plain min-max start's on the same grid (the search helps)."""
    from eqat_cli.quant.kquant import KQuantLinear

    torch.manual_seed(1)
    w = torch.randn(16, 256) * 0.02
    layer = KQuantLinear(w, type_name)
    err = float(((layer.fake_weight().detach() - w) ** 2).mean() / (w**2).mean())
    bound = {"Q2_K": 0.12, "Q3_K": 0.035, "Q4_K": 0.01, "Q5_0": 0.003, "IQ4_NL": 0.01}[type_name]
    assert err < bound, err


def test_fallback_types_follow_llama_quantize():
    from eqat_cli.errors import BadInputError, UnsupportedError
    from eqat_cli.quant.kquant import parse_target, tensor_type

    assert parse_target("gguf:q2_k") == "Q2_K" and parse_target("GGUF:Q4_K") == "Q4_K"
    assert parse_target(None) is None
    with pytest.raises(BadInputError, match="unknown --target"):
        parse_target("gguf:q5_k")
    assert tensor_type("Q2_K", 1536) == "Q2_K"
    assert tensor_type("Q2_K", 576) == "IQ4_NL"  # SmolLM2's hidden width
    assert tensor_type("Q3_K", 640) == "IQ4_NL"  # Gemma-3 270M
    assert tensor_type("Q4_K", 576) == "Q5_0"
    with pytest.raises(UnsupportedError, match="multiple of neither"):
        tensor_type("Q3_K", 100)


# ---------------------------------------------------------------------- whole models

# llama: every width 256 (all k-quant), down_proj 512; gemma3: down_proj input 320 -> the fallback
MODELS = {
    "llama": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2),
    "gemma3": dict(hidden_size=256, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64, query_pre_attn_scalar=64, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"]),
}
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def kquant_model(key, target, seed=0):
    from eqat_cli.quantize import rtn_kquant_model
    from eqat_cli.registry import get_registry

    config = TINY_CONFIGS[key](vocab_size=320, **MODELS[key])
    model = build(config, seed=seed)
    return rtn_kquant_model(model, get_registry().architecture_for(config.model_type), target)


@pytest.mark.parametrize("target", ["Q2_K", "Q3_K", "Q4_K"])
@pytest.mark.parametrize("key", list(MODELS))
def test_kquant_model_exports_exactly(tmp_path, key, target):
    from eqat_cli.formats.gguf_export import read_gguf_metadata, unpermute_rows
    from eqat_cli.quant.kquant import FALLBACK, KQuantPacked
    from test_gguf_export import gguf_reader_tensors

    tok = byte_level_tokenizer()
    model = kquant_model(key, target)
    src = save_native_dir(model, tok, tmp_path / "src")
    out = tmp_path / "m.gguf"
    res = invoke("pack", src, "--format", "gguf", "-o", out)
    assert res.exit_code == 0, res.output
    tensors, meta = gguf_reader_tensors(out), read_gguf_metadata(out)
    assert meta["eqat.target"] == target
    import gguf

    label = {"Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S"}[target]
    assert meta["general.file_type"] == int(getattr(gguf.LlamaFileType, label))
    cfg = model.config
    permuted = key == "llama"
    seen = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, KQuantPacked):
            continue
        i, kind = name.split(".")[2], name.split(".")[-1]
        ttype, w = tensors[f"blk.{i}.{GGUF_NAMES[kind]}.weight"]
        assert ttype == (target if mod.in_features % 256 == 0 else FALLBACK[target]), name
        seen.add(ttype)
        w = torch.from_numpy(w)
        if permuted and kind in ("q_proj", "k_proj"):
            w = unpermute_rows(w, cfg.num_attention_heads,
                               cfg.num_attention_heads if kind == "q_proj" else cfg.num_key_value_heads)
        assert torch.equal(w, mod.weight), name  # bit-exact
    assert seen == ({target} if key == "llama" else {target, FALLBACK[target]})
    assert tensors["token_embd.weight"][0] == "Q8_0"  # as llama-quantize's mix for a 256-free width


def test_kquant_checkpoint_round_trips_through_eval(tmp_path):
    """Native checkpoint and its GGUF give eqat the same weights (the GGUF's embedding is Q8_0, so
    the perplexities agree closely, not exactly); the native checkpoint reloads bit-exactly."""
    import json

    from eqat_cli.models import resolve
    from eqat_cli.quant.kquant import KQuantPacked

    tok = byte_level_tokenizer()
    model = kquant_model("llama", "Q3_K")
    src = save_native_dir(model, tok, tmp_path / "src")
    lm = resolve(str(src), device="cpu", dtype="fp32")
    loaded = {n: m for n, m in lm.model.named_modules() if isinstance(m, KQuantPacked)}
    assert len(loaded) == 7 * model.config.num_hidden_layers and lm.quant["gguf_types"] == ["Q3_K"]
    for n, m in model.named_modules():
        if isinstance(m, KQuantPacked):
            assert torch.equal(loaded[n].weight, m.weight) and torch.equal(loaded[n].kq_blocks, m.kq_blocks)
    out = tmp_path / "m.gguf"
    assert invoke("pack", src, "--format", "gguf", "-o", out).exit_code == 0
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    ppl = {}
    for what, spec in (("native", src), ("gguf", out)):
        res = invoke("eval", spec, "--ppl", text, "--seqlen", "32", "--limit", "4", "--json", "-")
        assert res.exit_code == 0, res.output
        (p,) = json.loads(res.stdout)["perplexity"].values()
        ppl[what] = p["ppl"]
    assert abs(ppl["native"] - ppl["gguf"]) / ppl["native"] < 0.02, ppl


def test_kquant_refusals_leave_nothing(tmp_path):
    from conftest import random_packed_layer
    from test_gguf_export import one_error_line

    tok = byte_level_tokenizer()
    model = kquant_model("llama", "Q2_K")
    model.model.layers[1].mlp.down_proj = random_packed_layer(512, 256, 2, 32)
    src = save_native_dir(model, tok, tmp_path / "mixed")
    res = invoke("pack", src, "--format", "gguf", "-o", tmp_path / "m.gguf")
    assert "GGML-grid layers with 1 uniform packed" in one_error_line(res)
    assert not list(tmp_path.glob("*.gguf")) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------- Block-AP --target


def test_block_ap_target_trains_on_the_grid_and_exports_exactly(tmp_path):
    import json

    from conftest import save_tiny, tiny_tokenizer
    from eqat_cli.formats.gguf_export import unpermute_rows
    from eqat_cli.models import resolve
    from eqat_cli.quant.kquant import KQuantPacked
    from eqat_cli.train.block_ap import BlockAPConfig, run_block_ap
    from test_block_ap import calib
    from test_gguf_export import gguf_reader_tensors

    config = TINY_CONFIGS["llama"](**{**MODELS["llama"], "intermediate_size": 320})  # down_proj: IQ4_NL
    src = save_tiny(build(config), tmp_path / "fp")
    c = calib()
    cfg = BlockAPConfig(bits=2, group_size=64, target="gguf:q2_k", steps=4, batch_size=4)
    res = run_block_ap(src, tiny_tokenizer(), c.train, c.val, cfg, tmp_path / "q", torch.device("cpu"))
    for b in res.blocks:
        assert b["loss_after"] <= b["loss_before"], b  # the best state (val) is never worse than the start
    meta = json.loads((res.output / "config.json").read_text())["eqat"]
    assert meta["target"] == "gguf:q2_k" and "bits" not in meta and meta["block_ap"]["target"] == "gguf:q2_k"
    lm = resolve(str(res.output), device="cpu", dtype="fp32")
    assert lm.quant["gguf_types"] == ["IQ4_NL", "Q2_K"]
    out = tmp_path / "q.gguf"
    r = invoke("pack", res.output, "--format", "gguf", "-o", out)
    assert r.exit_code == 0, r.output
    tensors = gguf_reader_tensors(out)
    n = 0
    for name, mod in lm.model.named_modules():
        if isinstance(mod, KQuantPacked):
            i, kind = name.split(".")[2], name.split(".")[-1]
            ttype, w = tensors[f"blk.{i}.{GGUF_NAMES[kind]}.weight"]
            assert ttype == ("IQ4_NL" if kind == "down_proj" else "Q2_K")
            w = torch.from_numpy(w)
            if kind in ("q_proj", "k_proj"):
                w = unpermute_rows(w, config.num_attention_heads,
                                   config.num_attention_heads if kind == "q_proj" else config.num_key_value_heads)
            assert torch.equal(w, mod.weight), name
            n += 1
    assert n == 7 * config.num_hidden_layers


def test_target_refuses_what_it_cannot_train():
    from eqat_cli.errors import BadInputError
    from eqat_cli.train.block_ap import BlockAPConfig

    with pytest.raises(BadInputError, match="needs --param round and --init minmax"):
        BlockAPConfig(target="gguf:q3_k", param="free")
    with pytest.raises(BadInputError, match="needs --param round and --init minmax"):
        BlockAPConfig(target="gguf:q3_k", init="gptq")
    with pytest.raises(BadInputError, match="unknown --target"):
        BlockAPConfig(target="gguf:q8_0")
    assert BlockAPConfig(target="GGUF:Q4_K").target == "gguf:q4_k"


def test_e2e_qp_refuses_grid_checkpoints_in_one_line(tmp_path):
    """E2E-QP trains uniform step sizes; a --target checkpoint is refused before anything is written."""
    from eqat_cli.errors import UnsupportedError
    from test_e2e_qp import ntp, train

    src = save_native_dir(kquant_model("llama", "Q2_K"), byte_level_tokenizer(), tmp_path / "src")
    with pytest.raises(UnsupportedError, match="does not train GGML-grid layers yet"):
        train(src, tmp_path / "out", ntp())
    assert not (tmp_path / "out").exists()
