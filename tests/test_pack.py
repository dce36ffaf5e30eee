"""``eqat pack``: every format round-trips to the same logits; refusals are one line, exit 2.

Tolerances (docs/FORMATS.md, "Round-trip tolerances"), as max|diff| / max|logit|:

* eqat, GPTQ v1/v2: the reloaded tensors are bit-identical to a native reload -> 1e-5 absolute;
* fp16 (dequantized weights rounded to fp16): 2e-3;
* GGUF Q4_1 (``m = -z*s`` rounded to fp16 per 32-block): 5e-3 (full 30-layer SmolLM2 w4g64
  measures 2.5e-3);
* against the in-memory source (fp32 embeddings and norms): the same bounds, since every format
  stores unquantized tensors in fp16 (F32 norms in GGUF).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import build, tiny_llama_config

from eqat_cli.scheme import QuantScheme

runner = CliRunner()
CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    "EfficientQAT trains step sizes and zero points: 2, 3 and 4 bits!",
    "Pack it as GGUF, GPTQ or fp16; load it anywhere.",
] * 20
SAMPLE = "the lazy fox packs 4 bits, hello world!"
REL = 2e-3  # x max|logit|: fp16 storage of embeddings/norms, fp16 dequantized weights
GGUF_REL = 5e-3  # x max|logit|: plus the fp16 rounding of the Q4_1 minimum m = -z*s


def invoke(*args):
    from eqat_cli.cli.app import build_app

    return runner.invoke(build_app(), [str(a) for a in args], prog_name="eqat")


# ---------------------------------------------------------------------- tiny tokenizers


def byte_level_tokenizer():
    """GPT-2 style byte-level BPE (like SmolLM2 / Llama-3), trained in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    ))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<|endoftext|>")


def sentencepiece_style_tokenizer():
    """Llama-2 style BPE: Metaspace, byte fallback with <0xXX> tokens at ids 3..258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = meta
    base.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    trained = json.loads(base.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for tok, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = meta
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# ---------------------------------------------------------------------- helpers


def quantized_tiny(bits=4, group=32, seed=0, vocab_size=320, **cfg):
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    model = build(tiny_llama_config(vocab_size=vocab_size, **cfg), seed=seed)
    return rtn_quantize_model(model, get_registry().architecture_for("llama"), QuantScheme(bits, group))


def save_native_dir(model, tokenizer, path: Path, meta=None) -> Path:
    from eqat_cli.formats.native import save_native

    path.mkdir(parents=True)
    save_native(model, tokenizer, path, meta)
    return path


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def assert_close_rel(a, b, rel=REL):
    scale = float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=0, atol=rel * scale)


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    """A w4g32 tiny Llama with a byte-level tokenizer, saved natively; plus its reference logits."""
    from eqat_cli.formats.native import load_packed_model

    tok = byte_level_tokenizer()
    model = quantized_tiny(4, 32)
    src = save_native_dir(model, tok, tmp_path_factory.mktemp("src") / "w4g32",
                          {"bits": 4, "group_size": 32, "architecture": "llama", "trained_with": "rtn"})
    ids = torch.tensor([tok(SAMPLE)["input_ids"]])
    reloaded, _ = load_packed_model(src)
    return {"dir": src, "model": model, "tok": tok, "ids": ids,
            "ref": logits(model, ids), "native": logits(reloaded, ids)}


# ---------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["eqat", "gptq", "gptq_v2", "fp16", "gguf"])
def test_pack_round_trip_same_logits(tiny_src, tmp_path, fmt):
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "out")
    res = invoke("pack", tiny_src["dir"], "--format", fmt, "-o", out, "--json", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["format"] == fmt and summary["size_bytes"] > 0
    ids = tiny_src["ids"]
    if fmt in ("eqat", "gptq", "gptq_v2"):
        from eqat_cli.models import resolve

        lm = resolve(str(out), device="cpu")
        assert lm.format == fmt and (lm.quant["bits"], lm.quant["group_size"]) == (4, 32)
        got = logits(lm.model, ids)
        torch.testing.assert_close(got, tiny_src["native"], rtol=0, atol=1e-5)
        assert lm.tokenizer(SAMPLE)["input_ids"] == tiny_src["tok"](SAMPLE)["input_ids"]
    elif fmt == "fp16":
        from transformers import AutoModelForCausalLM

        cfg = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in cfg and cfg["eqat"]["format"] == "fp16"
        plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        got = logits(plain, ids)
        assert_close_rel(got, tiny_src["native"])
    else:
        from eqat_cli.formats.gguf_export import load_gguf_model

        gm, gtok = load_gguf_model(out)
        got = logits(gm, ids)
        assert_close_rel(got, tiny_src["native"], GGUF_REL)
        assert gtok(SAMPLE)["input_ids"] == tiny_src["tok"](SAMPLE)["input_ids"]
    assert_close_rel(got, tiny_src["ref"], GGUF_REL if fmt == "gguf" else REL)
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_gptq_v1_converts_back_to_native(tiny_src, tmp_path):
    """gptq (z-1 stored) -> eqat (raw z): the zero offset is undone, logits unchanged."""
    from eqat_cli.formats.native import load_packed_model

    assert invoke("pack", tiny_src["dir"], "-f", "gptq", "-o", tmp_path / "v1").exit_code == 0
    res = invoke("pack", tmp_path / "v1", "-f", "eqat", "-o", tmp_path / "back")
    assert res.exit_code == 0, res.output
    back, layers = load_packed_model(tmp_path / "back")
    assert set(layers.values()) == {QuantScheme(4, 32)}
    sec = json.loads((tmp_path / "back" / "config.json").read_text())["eqat"]
    assert sec["source_format"] == "gptq" and "quantization_config" not in json.loads(
        (tmp_path / "back" / "config.json").read_text())
    torch.testing.assert_close(logits(back, tiny_src["ids"]), tiny_src["native"], rtol=0, atol=1e-5)


def test_pack_eqat_adds_the_eqat_section_to_a_release(tmp_path):
    from eqat_cli.formats.describe import inspect_path

    src = save_native_dir(quantized_tiny(2, 32), byte_level_tokenizer(), tmp_path / "release", None)
    assert "eqat" not in json.loads((src / "config.json").read_text())
    res = invoke("pack", src, "--format", "eqat", "-o", tmp_path / "norm")
    assert res.exit_code == 0, res.output
    sec = json.loads((tmp_path / "norm" / "config.json").read_text())["eqat"]
    assert (sec["format"], sec["bits"], sec["group_size"], sec["architecture"]) == ("eqat", 2, 32, "llama")
    info = inspect_path(tmp_path / "norm")
    assert (info.format, info.bits, info.group_size, info.notes) == ("eqat", 2, 32, [])


@pytest.mark.parametrize("bits,version", [(3, "gptq"), (3, "gptq_v2"), (2, "gptq_v2"), (8, "gptq_v2")])
def test_gptq_layouts_read_back(tmp_path, bits, version):
    from safetensors import safe_open

    from eqat_cli.formats.gptq import save_gptq
    from eqat_cli.formats.describe import inspect_path
    from eqat_cli.formats.native import load_packed_model
    from eqat_cli.models import resolve

    model = quantized_tiny(bits, 32, seed=1)
    if version == "gptq":  # v1 needs zero points >= 1
        for mod in model.modules():
            if hasattr(mod, "zero_points"):
                assert int(mod.zero_points().min()) >= 1
    (tmp_path / "g").mkdir()
    save_gptq(model, byte_level_tokenizer(), tmp_path / "g", version)
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc == {**qc, "quant_method": "gptq", "bits": bits, "group_size": 32, "sym": False,
                  "desc_act": False, "checkpoint_format": version}
    assert json.loads((tmp_path / "g" / "quantize_config.json").read_text()) == qc
    with safe_open(str(tmp_path / "g" / "model.safetensors"), "pt") as f:
        qw = f.get_slice("model.layers.0.self_attn.q_proj.qweight").get_shape()
        qz = f.get_slice("model.layers.0.self_attn.q_proj.qzeros").get_shape()
    if bits == 3:  # GPTQ 3-bit: 32 codes in 3 words (not the native 10 per word)
        assert (qw, qz) == ([64 * 3 // 32, 64], [2, 64 * 3 // 32])
    else:
        assert (qw, qz) == ([64 * bits // 32, 64], [2, 64 * bits // 32])
    info = inspect_path(tmp_path / "g")
    assert (info.format, info.bits, info.group_size) == (version, bits, 32)
    lm = resolve(str(tmp_path / "g"), device="cpu")
    ids = torch.randint(0, 300, (1, 12))
    ref, _ = load_packed_model(save_native_dir(model, None, tmp_path / "n"))
    torch.testing.assert_close(logits(lm.model, ids), logits(ref, ids), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- refusals


def model_with_zero_point_zero():
    """w4g32 where every weight of one group is >= 0, so min-max gives zero point 0."""
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    model = build(tiny_llama_config(vocab_size=320))
    with torch.no_grad():
        w = model.model.layers[1].mlp.up_proj.weight
        w[:, :32] = w[:, :32].abs()
    return rtn_quantize_model(model, get_registry().architecture_for("llama"), QuantScheme(4, 32))


def test_gptq_v1_refuses_zero_point_underflow_and_v2_is_lossless(tmp_path):
    src = save_native_dir(model_with_zero_point_zero(), byte_level_tokenizer(), tmp_path / "src")
    res = invoke("pack", src, "--format", "gptq", "-o", tmp_path / "v1")
    assert res.exit_code == 2
    assert "zero points are 0" in res.output and "gptq_v2" in res.output
    assert "model.layers.1.mlp.up_proj" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "v1").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    res = invoke("pack", src, "--format", "gptq_v2", "-o", tmp_path / "v2")
    assert res.exit_code == 0, res.output
    from eqat_cli.formats.native import load_packed_model
    from eqat_cli.models import resolve

    ids = torch.randint(0, 300, (1, 10))
    torch.testing.assert_close(logits(resolve(str(tmp_path / "v2"), device="cpu").model, ids),
                               logits(load_packed_model(src)[0], ids), rtol=0, atol=1e-5)


def test_gptq_rejects_ragged_groups_naming_layer_and_fitting_groups(tmp_path):
    # intermediate 96 with group 64: down_proj's last group has 32 columns
    src = save_native_dir(quantized_tiny(4, 64), byte_level_tokenizer(), tmp_path / "src")
    res = invoke("pack", src, "--format", "gptq_v2", "-o", tmp_path / "g")
    assert res.exit_code == 2
    assert "model.layers.0.mlp.down_proj" in res.output and "in_features 96" in res.output
    assert "16, 32, -1" in res.output
    assert not (tmp_path / "g").exists()


def test_gguf_refuses_what_q4_1_cannot_hold(tmp_path):
    tok = byte_level_tokenizer()
    w8 = save_native_dir(quantized_tiny(8, 32), tok, tmp_path / "w8")
    res = invoke("pack", w8, "--format", "gguf", "-o", tmp_path / "w8.gguf")
    assert res.exit_code == 2 and "Q8_0" in res.output and "int8" in res.output
    w4g16 = save_native_dir(quantized_tiny(4, 16), tok, tmp_path / "g16")
    res = invoke("pack", w4g16, "--format", "gguf", "-o", tmp_path / "g16.gguf")
    assert res.exit_code == 2 and "blocks of 32" in res.output
    res = invoke("pack", w4g16, "--format", "gguf", "-o", tmp_path / "not-a-gguf-name")
    assert res.exit_code == 2 and "ending in .gguf" in res.output
    assert not list(tmp_path.glob("*.gguf"))


def test_pack_model_is_a_library_function(tiny_src, tmp_path):
    """`eqat pack` is one library call: it reports progress through the callback, never prints."""
    from eqat_cli.errors import BadInputError
    from eqat_cli.pack import normalize_format, pack_model

    assert normalize_format("GPTQ-v2") == "gptq_v2" and normalize_format("native") == "eqat"
    with pytest.raises(BadInputError, match="unknown format"):
        pack_model(str(tiny_src["dir"]), "awq", tmp_path / "x")
    events = []
    summary = pack_model(str(tiny_src["dir"]), "gptq-v2", tmp_path / "out",
                         progress=lambda event, info: events.append((event, info)))
    label = str(tiny_src["dir"])
    assert events == [("load", {"label": label, "done": 0, "total": 1}),
                      ("load", {"label": label, "done": 1, "total": 1})]
    assert summary["format"] == "gptq_v2" and summary["output"] == str(tmp_path / "out")
    assert summary["source"]["bits"] == 4 and (tmp_path / "out" / "config.json").exists()


def test_pack_refuses_overwrite_unless_asked(tiny_src, tmp_path):
    out = tmp_path / "o"
    assert invoke("pack", tiny_src["dir"], "--format", "fp16", "-o", out).exit_code == 0
    (out / "marker").write_text("old")
    res = invoke("pack", tiny_src["dir"], "--format", "fp16", "-o", out)
    assert res.exit_code == 2 and "already exists" in res.output and "--overwrite" in res.output
    assert (out / "marker").exists()
    res = invoke("pack", tiny_src["dir"], "--format", "fp16", "-o", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert not (out / "marker").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_pack_refuses_a_full_precision_source(tmp_path):
    model = build(tiny_llama_config(vocab_size=320))
    model.save_pretrained(str(tmp_path / "fp"))
    byte_level_tokenizer().save_pretrained(str(tmp_path / "fp"))
    res = invoke("pack", tmp_path / "fp", "--format", "gptq_v2", "-o", tmp_path / "g")
    assert res.exit_code == 2 and "full-precision" in res.output
    res = invoke("pack", tmp_path / "fp", "--format", "nope", "-o", tmp_path / "g")
    assert res.exit_code == 2 and "unknown format" in res.output


# ---------------------------------------------------------------------- GGUF specifics


def test_gguf_reads_back_with_the_gguf_package(tiny_src, tmp_path):
    """GGUFReader + gguf.quants.dequantize give the packed weights (q/k un-permuted) up to the
    fp16 rounding of m = -z*s; metadata carries the llama hyperparameters and the vocabulary."""
    from eqat_cli.formats.gguf_export import read_gguf_metadata, read_gguf_tensors, save_gguf, unpermute_rows
    from eqat_cli.quant.linear import PackedLinear

    model, tok = tiny_src["model"], tiny_src["tok"]
    save_gguf(model, tok, tmp_path / "m.gguf")
    tensors = read_gguf_tensors(tmp_path / "m.gguf")
    meta = read_gguf_metadata(tmp_path / "m.gguf")
    cfg = model.config
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 3
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"],
            meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"],
            meta["llama.context_length"], meta["llama.vocab_size"]) == (
        2, 64, 96, 4, 2, cfg.max_position_embeddings, 320)
    assert meta["llama.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == 320
    assert meta["tokenizer.ggml.tokens"][tok.eos_token_id] == "</s>"
    assert meta["tokenizer.ggml.token_type"][tok.eos_token_id] == 3  # CONTROL
    assert meta["tokenizer.ggml.token_type"][-1] == 5  # UNUSED padding up to vocab_size
    assert (meta["eqat.bits"], meta["eqat.group_size"]) == (4, 32)
    from eqat_cli.formats.describe import inspect_path

    info = inspect_path(tmp_path / "m.gguf")
    assert (info.format, info.architecture, info.details["tensor_types"]) == (
        "gguf", "llama", {"Q4_1": 14, "F16": 2, "F32": 5})
    n_q = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, PackedLinear):
            continue
        i, kind = name.split(".")[2], name.split(".")[-1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        w = torch.from_numpy(tensors[f"blk.{i}.{gname}.weight"])
        if kind == "q_proj":
            w = unpermute_rows(w, 4, 4)
        elif kind == "k_proj":
            w = unpermute_rows(w, 4, 2)
        ref = mod.dequantize(torch.float32)
        zs = (mod.zero_points().t().float() * mod.scales.t().float()).repeat_interleave(32, 1)
        bound = zs.abs() * 2.0**-11 + 1e-7  # half an fp16 ulp of m
        assert bool(((w - ref).abs() <= bound).all()), name
        n_q += 1
    assert n_q == 14
    emb = torch.from_numpy(tensors["token_embd.weight"])
    torch.testing.assert_close(emb, model.model.embed_tokens.weight.half().float(), rtol=0, atol=0)


def test_gguf_takes_a_ragged_last_group(tmp_path):
    """in_features 96 with group 64: the last group (32 columns) is one Q4_1 block."""
    from eqat_cli.formats.gguf_export import load_gguf_model, save_gguf

    tok = byte_level_tokenizer()
    model = quantized_tiny(4, 64)
    save_gguf(model, tok, tmp_path / "r.gguf")
    gm, _ = load_gguf_model(tmp_path / "r.gguf")
    ids = torch.tensor([tok(SAMPLE)["input_ids"]])
    assert_close_rel(logits(gm, ids), logits(model, ids), GGUF_REL)


def test_gguf_mistral_is_written_as_llama_arch(tmp_path):
    """Mistral = Llama + sliding window; llama.cpp's llama arch ignores the window (so do we)."""
    from conftest import tiny_mistral_config
    from eqat_cli.formats.gguf_export import load_gguf_model, save_gguf
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    tok = byte_level_tokenizer()
    model = build(tiny_mistral_config(vocab_size=320))
    rtn_quantize_model(model, get_registry().architecture_for("mistral"), QuantScheme(4, 32))
    info = save_gguf(model, tok, tmp_path / "mistral.gguf")
    assert any("sliding window" in n for n in info["notes"])
    gm, _ = load_gguf_model(tmp_path / "mistral.gguf")
    ids = torch.tensor([tok(SAMPLE)["input_ids"][:16]])  # within the window of 16
    assert_close_rel(logits(gm, ids), logits(model, ids), GGUF_REL)


def test_gguf_sentencepiece_style_tokenizer_loads_in_transformers(tmp_path):
    from eqat_cli.formats.gguf_export import load_gguf_model, read_gguf_metadata

    tok = sentencepiece_style_tokenizer()
    model = quantized_tiny(4, 32, vocab_size=len(tok) + 8)
    src = save_native_dir(model, tok, tmp_path / "src")
    res = invoke("pack", src, "--format", "gguf", "-o", tmp_path / "spm.gguf")
    assert res.exit_code == 0, res.output
    meta = read_gguf_metadata(tmp_path / "spm.gguf")
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.token_type"][3] == 6  # <0x00> is a BYTE token
    gm, gtok = load_gguf_model(tmp_path / "spm.gguf")
    for text in (SAMPLE, "Pack it as GGUF; load it anywhere.", "zebra ünïcode"):
        assert gtok(text, add_special_tokens=False)["input_ids"] == tok(text)["input_ids"], text
    ids = torch.tensor([tok(SAMPLE)["input_ids"]])
    assert_close_rel(logits(gm, ids), logits(model, ids), GGUF_REL)


# ---------------------------------------------------------------------- real SmolLM2


def smollm2_truncated(smollm2_dir, n_layers):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(smollm2_dir))
    cfg.num_hidden_layers = n_layers
    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), config=cfg, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm2_src(smollm2_dir, tmp_path_factory):
    """The real SmolLM2-135M (hidden 576, GQA 9/3, tied embeddings, real 49k tokenizer), truncated
    to its first 2 decoder blocks to keep the test fast, RTN-quantized to w4g64, saved natively."""
    from transformers import AutoTokenizer

    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    text = ("The capital of France is Paris. EfficientQAT trains quantized language models block by "
            "block, then end to end, and packs them for every runtime: GPTQ, GGUF, fp16 and more.")
    ids = torch.tensor([tok(text)["input_ids"][:32]])
    assert ids.shape[1] == 32
    model = smollm2_truncated(smollm2_dir, 2)
    rtn_quantize_model(model, get_registry().architecture_for("llama"), QuantScheme(4, 64))
    src = save_native_dir(model, tok, tmp_path_factory.mktemp("smollm2") / "w4g64")
    return {"tok": tok, "ids": ids, "dir": src, "ref": logits(model, ids)}


def test_smollm2_gguf_loads_in_transformers(smollm2_src, tmp_path):
    from eqat_cli.formats.gguf_export import read_gguf_metadata
    from transformers import AutoModelForCausalLM

    res = invoke("pack", smollm2_src["dir"], "--format", "gguf", "-o", tmp_path / "smol.gguf")
    assert res.exit_code == 0, res.output
    meta = read_gguf_metadata(tmp_path / "smol.gguf")
    tok = smollm2_src["tok"]
    # The vocabulary as llama.cpp's converter writes it ("smollm" is llama.cpp's name for it);
    # the tiny tests above show transformers rebuilds identical token ids from these keys.
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.model"] == "gpt2"
    vocab = tok.get_vocab()
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert len(meta["tokenizer.ggml.merges"]) == 48900
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (
        tok.bos_token_id, tok.eos_token_id)
    assert meta["llama.rope.dimension_count"] == 64 and meta["llama.attention.head_count_kv"] == 3
    gm = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="smol.gguf", dtype=torch.float32)
    assert gm.config.tie_word_embeddings and gm.config.num_key_value_heads == 3
    got = logits(gm, smollm2_src["ids"])
    assert_close_rel(got, smollm2_src["ref"], GGUF_REL)
    assert bool((got.argmax(-1) == smollm2_src["ref"].argmax(-1)).float().mean() >= 0.95)


def test_smollm2_gptq_v2_round_trips(smollm2_src, tmp_path):
    from eqat_cli.models import resolve

    res = invoke("pack", smollm2_src["dir"], "--format", "gptq_v2", "-o", tmp_path / "g64")
    assert res.exit_code == 0, res.output
    lm = resolve(str(tmp_path / "g64"), device="cpu")
    assert (lm.format, lm.quant["bits"], lm.quant["group_size"], lm.quant["layers"]) == ("gptq_v2", 4, 64, 14)
    assert_close_rel(logits(lm.model, smollm2_src["ids"]), smollm2_src["ref"])


def test_smollm2_g128_is_ragged_for_gptq_but_fine_for_gguf(smollm2_dir, tmp_path):
    """576 = 4 x 128 + 64: GPTQ loaders cannot express it, Q4_1 blocks of 32 can."""
    from eqat_cli.errors import UnsupportedError
    from eqat_cli.formats.gguf_export import check_gguf_exportable
    from eqat_cli.formats.gptq import check_gptq_compatible
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    model = rtn_quantize_model(smollm2_truncated(smollm2_dir, 1), get_registry().architecture_for("llama"), QuantScheme(4, 128))
    with pytest.raises(UnsupportedError) as e:
        check_gptq_compatible(model, "gptq_v2")
    assert "model.layers.0.self_attn.q_proj has in_features 576" in str(e.value)
    assert "(its last group holds 64 columns)" in str(e.value)
    assert "16, 32, 64, -1" in str(e.value)
    assert check_gguf_exportable(model) == (4, 128)
