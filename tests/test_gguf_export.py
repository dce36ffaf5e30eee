"""GGUF export of every architecture llama.cpp runs, at 2, 3 and 4 bits (issue #27).

The files are read back with the ``gguf`` package's own reader (``gguf.GGUFReader`` +
``gguf.quants.dequantize``), never with eqat's code:

* 2/3-bit layers are ``Q4_0`` with ``d = s`` and ``q' = q - z + 8``: bit-identical to eqat's
  dequantized weights ``(q - z) * s`` (both are the fp32 product of an fp16 scale and a small integer);
* 4-bit layers are ``Q4_1`` (``d = s``, ``m = -z*s`` rounded once to fp16): within half an fp16 ulp of m;
* every other tensor (embeddings fp16, norms fp32 with Gemma's ``1 + w``, biases) and the
  per-architecture metadata are what llama.cpp's converter writes.

Refusals are one line, exit 2, and leave no file behind.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIGS, build
from test_pack import byte_level_tokenizer, invoke, quantized_tiny, save_native_dir

from eqat_cli.scheme import QuantScheme

ARCHS = {  # TINY_CONFIGS key -> (llama.cpp arch, q/k rows permuted)
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "gemma3": ("gemma3", False),
}
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def quantized_arch(key, bits, group=32, seed=0):
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    config = TINY_CONFIGS[key](vocab_size=320)
    model = build(config, seed=seed)
    return rtn_quantize_model(model, get_registry().architecture_for(config.model_type), QuantScheme(bits, group))


def gguf_reader_tensors(path):
    """Every tensor through the gguf package alone: name -> (GGML type name, float32 array)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
            for t in reader.tensors}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each architecture at 2, 3 and 4 bits, saved natively and exported with `eqat pack`."""
    from eqat_cli.formats.gguf_export import read_gguf_metadata

    root = tmp_path_factory.mktemp("gguf")
    tok = byte_level_tokenizer()
    out = {}

    def get(key, bits):
        if (key, bits) not in out:
            model = quantized_arch(key, bits)
            src = save_native_dir(model, tok, root / f"{key}-w{bits}")
            path = root / f"{key}-w{bits}.gguf"
            res = invoke("pack", src, "--format", "gguf", "-o", path)
            assert res.exit_code == 0, res.output
            out[key, bits] = (model, gguf_reader_tensors(path), read_gguf_metadata(path))
        return out[key, bits]

    return get


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("key", list(ARCHS))
def test_every_arch_dequantizes_through_the_gguf_reader(exported, key, bits):
    from eqat_cli.formats.gguf_export import unpermute_rows
    from eqat_cli.quant.linear import PackedLinear

    model, tensors, meta = exported(key, bits)
    arch, permuted = ARCHS[key]
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    qtype = "Q4_0" if bits < 4 else "Q4_1"
    assert meta["general.architecture"] == arch
    assert meta["general.file_type"] == (2 if bits < 4 else 3)  # MOSTLY_Q4_0 / MOSTLY_Q4_1
    assert (meta["eqat.bits"], meta["eqat.group_size"]) == (bits, 32)
    n_q = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, PackedLinear):
            continue
        i, kind = name.split(".")[2], name.split(".")[-1]
        ttype, w = tensors[f"blk.{i}.{GGUF_NAMES[kind]}.weight"]
        assert ttype == qtype, name
        w = torch.from_numpy(w)
        if permuted and kind == "q_proj":
            w = unpermute_rows(w, n_head, n_head)
        elif permuted and kind == "k_proj":
            w = unpermute_rows(w, n_head, n_kv)
        ref = mod.dequantize(torch.float32)
        if bits < 4:
            assert torch.equal(w, ref), name  # bit-exact
        else:
            zs = (mod.zero_points().t().float() * mod.scales.t().float()).repeat_interleave(32, 1)
            assert bool(((w - ref).abs() <= zs.abs() * 2.0**-11 + 1e-7).all()), name
        if mod.bias is not None:
            b = torch.from_numpy(tensors[f"blk.{i}.{GGUF_NAMES[kind]}.bias"][1])
            b = unpermute_rows(b, n_head, n_head if kind == "q_proj" else n_kv) if permuted and kind in (
                "q_proj", "k_proj") else b
            assert torch.equal(b, mod.bias.float()), name
        n_q += 1
    assert n_q == 7 * cfg.num_hidden_layers
    emb = torch.from_numpy(tensors["token_embd.weight"][1])
    assert torch.equal(emb, model.model.embed_tokens.weight.half().float())
    assert ("output.weight" in tensors) == (not cfg.tie_word_embeddings)
    # norms: F32, Gemma's (1 + w) folded in, as llama.cpp's converter does
    shift = 1.0 if arch == "gemma3" else 0.0
    norms = {"input_layernorm": "attn_norm", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "post_attention_layernorm": "post_attention_norm" if arch == "gemma3" else "ffn_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
    seen = 0
    for hf, gg in norms.items():
        mod = model.model.layers[1].get_submodule(hf) if _has(model.model.layers[1], hf) else None
        if mod is None:
            continue
        ttype, t = tensors[f"blk.1.{gg}.weight"]
        assert ttype == "F32"
        assert torch.equal(torch.from_numpy(t), mod.weight.float() + shift), hf
        seen += 1
    assert seen == {"llama": 2, "qwen2": 2, "qwen3": 4, "gemma3": 6}[arch]
    assert torch.equal(torch.from_numpy(tensors["output_norm.weight"][1]), model.model.norm.weight.float() + shift)


def _has(module, path):
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


@pytest.mark.parametrize("key", list(ARCHS))
def test_every_arch_writes_llama_cpp_hyperparameters(exported, key):
    model, _, meta = exported(key, 2)
    cfg = model.config
    arch = ARCHS[key][0]
    a = arch
    assert (meta[f"{a}.block_count"], meta[f"{a}.embedding_length"], meta[f"{a}.feed_forward_length"],
            meta[f"{a}.attention.head_count"], meta[f"{a}.attention.head_count_kv"],
            meta[f"{a}.context_length"]) == (cfg.num_hidden_layers, 64, 96, 4, 2, 256)
    assert meta[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == 320
    if arch == "llama":
        assert meta["llama.rope.dimension_count"] == 16 and meta["llama.vocab_size"] == 320
    else:
        assert meta[f"{a}.attention.key_length"] == meta[f"{a}.attention.value_length"] == 16
    if arch == "gemma3":
        # window, exact per-layer pattern, and each layer type's RoPE base
        assert meta["gemma3.attention.sliding_window"] == 8
        assert list(meta["gemma3.attention.sliding_window_pattern"]) == [True] * 5 + [False]
        assert meta["gemma3.rope.freq_base"] == pytest.approx(1e6)
        assert meta["gemma3.rope.freq_base_swa"] == pytest.approx(1e4)
    else:
        assert meta[f"{a}.rope.freq_base"] == pytest.approx(10000.0)
        assert not any("sliding_window" in k for k in meta)


def test_ragged_group_is_exact_in_q4_0(tmp_path):
    """in_features 96 with group 64 (down_proj's last group holds 32 columns): each Q4_0 block lies
    inside one group."""
    from eqat_cli.formats.gguf_export import save_gguf
    from eqat_cli.quant.linear import PackedLinear

    model = quantized_tiny(3, 64)
    save_gguf(model, byte_level_tokenizer(), tmp_path / "r.gguf")
    tensors = gguf_reader_tensors(tmp_path / "r.gguf")
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, PackedLinear) and down.in_features == 96
    assert torch.equal(torch.from_numpy(tensors["blk.0.ffn_down.weight"][1]), down.dequantize(torch.float32))


def test_q4_0_logits_in_transformers_match_eqat(tmp_path):
    """transformers reads Q4_0 too (llama arch): same logits as eqat up to fp16 embeddings."""
    from eqat_cli.formats.gguf_export import load_gguf_model, save_gguf
    from test_pack import GGUF_REL, SAMPLE, assert_close_rel, logits

    tok = byte_level_tokenizer()
    model = quantized_tiny(2, 32)
    save_gguf(model, tok, tmp_path / "w2.gguf")
    gm, _ = load_gguf_model(tmp_path / "w2.gguf")
    ids = torch.tensor([tok(SAMPLE)["input_ids"]])
    assert_close_rel(logits(gm, ids), logits(model, ids), GGUF_REL)


# ---------------------------------------------------------------------- refusals


def one_error_line(res) -> str:
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.output, res.output
    return " ".join(res.output.split())


def test_refuses_what_gguf_cannot_hold_exactly(tmp_path):
    tok = byte_level_tokenizer()
    cases = {
        "w8": (save_native_dir(quantized_tiny(8, 32), tok, tmp_path / "w8"), "8-bit"),
        "g16": (save_native_dir(quantized_tiny(2, 16), tok, tmp_path / "g16"), "blocks of 32"),
    }
    # Mixed widths are written, a GGML type per tensor (tests/test_mixed.py); an 8-bit layer only
    # when Q8_0 holds it exactly.
    for what, (src, msg) in cases.items():
        res = invoke("pack", src, "--format", "gguf", "-o", tmp_path / f"{what}.gguf")
        assert msg in one_error_line(res), (what, res.output)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_refuses_fp32_step_sizes_and_foreign_architectures(tmp_path):
    from eqat_cli.errors import UnsupportedError
    from eqat_cli.formats.gguf_export import check
    from conftest import random_packed_layer

    model = quantized_tiny(3, 32)
    # E2E-QP trains step sizes in fp32: d = s would round
    model.model.layers[0].mlp.up_proj = random_packed_layer(64, 96, 3, 32, scales_dtype=torch.float32)
    model.model.layers[0].mlp.up_proj.scales.data += 1e-6
    with pytest.raises(UnsupportedError, match="not fp16 values"):
        check(model)
    model.model.layers[0].mlp.up_proj.scales.data = model.model.layers[0].mlp.up_proj.scales.data.half().float()
    assert check(model).qtype == "Q4_0"  # fp32 storage of fp16 values is fine
    gem = quantized_arch("gemma3", 2)
    gem.config.query_pre_attn_scalar = 32
    with pytest.raises(UnsupportedError, match="query_pre_attn_scalar"):
        check(gem)
    linear = quantized_tiny(4, 32, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(UnsupportedError, match="rope scaling 'linear'"):
        check(linear)


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path):
    """Llama-3.x: llama.cpp divides each RoPE frequency by rope_freqs[i]; base^(-2i/d) / rope_freqs
    must be transformers' own llama3 inverse frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from eqat_cli.formats.gguf_export import save_gguf

    model = quantized_arch("llama3", 2)
    info = save_gguf(model, byte_level_tokenizer(), tmp_path / "l3.gguf")
    assert any("rope_freqs" in n for n in info["notes"])
    ttype, factors = gguf_reader_tensors(tmp_path / "l3.gguf")["rope_freqs.weight"]
    cfg = model.config
    inv_llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    d = cfg.head_dim
    base = torch.tensor(cfg.rope_parameters["rope_theta"], dtype=torch.float64)
    inv_default = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    assert ttype == "F32" and factors.shape == (d // 2,)
    assert len(set(np.round(factors, 4))) > 2  # short, long and blended wavelengths all occur
    torch.testing.assert_close(inv_default / torch.from_numpy(factors).double(), inv_llama3.double(),
                               rtol=1e-6, atol=0)
