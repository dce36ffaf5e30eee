"""``eqat generate``: the same greedy tokens from a model's native, GPTQ and GGUF forms; seeded
sampling repeats; chat template, EOS, streaming of multi-byte text; the CLI, its --json and the
interactive chat; the real SmolLM2 (skipped when its package is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_CONFIGS, build, save_tiny, tiny_llama_config
from test_pack import byte_level_tokenizer, save_native_dir, sentencepiece_style_tokenizer

from eqat_cli.scheme import QuantScheme

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
PROMPT = "the quick brown fox"


def invoke(*args, input=None):
    from eqat_cli.cli.app import build_app

    return CliRunner().invoke(build_app(), [str(a) for a in args], prog_name="eqat", input=input)


def chat_tokenizer():
    tok = byte_level_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def gguf_exact_rtn(bits=4, group=32, seed=0):
    """A tiny Llama, RTN-quantized, whose step sizes keep 7 significant bits: GGUF Q4_1's
    ``m = -z*s`` is then exact in fp16, so the GGUF form holds exactly the packed weights."""
    from eqat_cli.quant.linear import PackedLinear
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    model = build(tiny_llama_config(vocab_size=320), seed=seed)
    rtn_quantize_model(model, get_registry().architecture_for("llama"), QuantScheme(bits, group))
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, PackedLinear):
                mant, exp = torch.frexp(mod.scales.float())
                mod.scales.copy_(torch.ldexp(torch.round(mant * 128) / 128, exp).to(mod.scales.dtype))
    return model


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """One w4g32 model as native, GPTQ v1, GPTQ v2 and GGUF (through `eqat pack`)."""
    root = tmp_path_factory.mktemp("forms")
    native = save_native_dir(gguf_exact_rtn(), chat_tokenizer(), root / "native",
                             {"bits": 4, "group_size": 32, "architecture": "llama", "trained_with": "rtn"})
    out = {"native": native}
    for fmt, name in (("gptq", "gptq"), ("gptq_v2", "gptq_v2"), ("gguf", "m.gguf")):
        res = invoke("pack", native, "--format", fmt, "-o", root / name)
        assert res.exit_code == 0, res.output
        out[fmt] = root / name
    return out


@pytest.fixture(scope="module")
def native_gen(forms):
    from eqat_cli.generate import load_generator

    return load_generator(str(forms["native"]), device="cpu")


def greedy(n=24):
    from eqat_cli.generate import SamplingConfig

    return SamplingConfig(max_new_tokens=n, temperature=0.0)


# ---------------------------------------------------------------------- formats agree


def test_greedy_tokens_equal_across_native_gptq_gguf(forms, native_gen):
    from eqat_cli.generate import load_generator

    ref = native_gen.generate_text(PROMPT, greedy())
    assert ref.new_tokens >= 8 and native_gen.info["format"] == "eqat"
    assert native_gen.info["quant"]["bits"] == 4
    for fmt in ("gptq", "gptq_v2", "gguf"):
        gen = load_generator(str(forms[fmt]), device="cpu")
        got = gen.generate_text(PROMPT, greedy())
        assert gen.info["format"] == ("fp" if fmt == "gguf" else fmt)
        assert got.prompt_tokens == ref.prompt_tokens, fmt
        assert (got.token_ids, got.stop) == (ref.token_ids, ref.stop), fmt
        assert got.text == ref.text


def test_kv_cache_decode_equals_full_forward_argmax(native_gen):
    """Each greedy token is the argmax of a full (cache-free) forward over everything before it."""
    ids, _ = native_gen.encode(PROMPT)
    res = native_gen.generate(ids, greedy(12))
    seq = list(ids)
    with torch.no_grad():
        for tok in res.token_ids:
            logits = native_gen.model(input_ids=torch.tensor([seq])).logits[0, -1]
            assert int(torch.argmax(logits)) == tok
            seq.append(tok)


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_every_architecture_decodes_like_full_forwards(arch, tmp_path):
    """Greedy decoding on the KV cache (sliding windows, GQA, q/k norms, Gemma-3's layer types,
    LLaVA's text model) picks the argmax of a cache-free forward at every step."""
    from eqat_cli.generate import load_generator

    d = save_tiny(build(TINY_CONFIGS[arch]()), tmp_path / arch)
    gen = load_generator(str(d), device="cpu")
    ids, _ = gen.encode(PROMPT)
    cfg = greedy(12)
    cfg.ignore_eos = True
    res = gen.generate(ids, cfg)
    assert len(res.token_ids) == 12 and len(ids) + 12 > 8  # past the sliding windows
    seq = list(ids)
    with torch.no_grad():
        for tok in res.token_ids:
            logits = gen.model(input_ids=torch.tensor([seq])).logits[0, -1]
            assert int(torch.argmax(logits)) == tok, arch
            seq.append(tok)


def test_full_precision_model_generates(tmp_path):
    from eqat_cli.generate import load_generator

    fp = save_tiny(build(tiny_llama_config()), tmp_path / "fp")
    gen = load_generator(str(fp), device="cpu")
    res = gen.generate_text(PROMPT, greedy(5))
    assert gen.info["format"] == "fp" and gen.info["quant"] == {}
    assert res.new_tokens + (res.stop == "eos") >= 1 and res.prefill_tokens_per_s > 0


# ---------------------------------------------------------------------- sampling


def test_seeded_sampling_repeats_and_seeds_differ(native_gen):
    from eqat_cli.generate import SamplingConfig

    def sample(seed, **kw):
        cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, seed=seed, **kw)
        return native_gen.generate_text(PROMPT, cfg)

    a, b, c = sample(1), sample(1), sample(2)
    assert a.token_ids == b.token_ids and a.text == b.text and a.seed == 1
    assert a.token_ids != c.token_ids
    d, e = sample(7, top_p=0.9, top_k=50, repetition_penalty=1.3), sample(7, top_p=0.9, top_k=50, repetition_penalty=1.3)
    assert d.token_ids == e.token_ids
    # top-k 1 and a tiny top-p keep only the best token: sampling becomes greedy
    ref = native_gen.generate_text(PROMPT, greedy(16)).token_ids
    assert sample(3, top_k=1).token_ids == ref
    assert sample(4, top_p=1e-6).token_ids == ref


def test_pick_token_filters():
    from eqat_cli.generate import SamplingConfig, make_rng, pick_token

    logits = torch.tensor([2.0, 1.0, -1.0, 0.5])
    ctx = torch.tensor([0, 2])
    g = SamplingConfig(temperature=0)
    assert pick_token(logits, None, g) == 0
    # penalty 4: logit 2 -> 0.5, logit -1 -> -4; token 1 (1.0) wins
    assert pick_token(logits, ctx, SamplingConfig(temperature=0, repetition_penalty=4.0)) == 1
    rng, _ = make_rng(0)
    draws = {pick_token(logits, None, SamplingConfig(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert draws == {0, 1}
    # p(0) = 0.61, p(1) = 0.22: top_p 0.7 keeps exactly tokens 0 and 1
    draws = {pick_token(logits, None, SamplingConfig(temperature=1.0, top_p=0.7), rng) for _ in range(300)}
    assert draws == {0, 1}


# ---------------------------------------------------------------------- EOS, chat, streaming


def test_stops_at_eos(native_gen):
    ref = native_gen.generate_text(PROMPT, greedy(24))
    k = next(i for i in range(2, len(ref.token_ids)) if ref.token_ids[i] not in ref.token_ids[:i])
    stop_id = ref.token_ids[k]
    saved = native_gen.eos_ids
    native_gen.eos_ids = [stop_id]
    try:
        res = native_gen.generate_text(PROMPT, greedy(24))
        cfg = greedy(24)
        cfg.ignore_eos = True
        full = native_gen.generate_text(PROMPT, cfg)
    finally:
        native_gen.eos_ids = saved
    assert res.stop == "eos" and res.stop_token_id == stop_id
    assert res.token_ids == ref.token_ids[:k]
    assert res.decode_steps == k  # k forwards after the prefill produced tokens 1..k
    assert full.stop == "length" and full.token_ids == ref.token_ids[:24] and full.decode_steps == 23


def test_eos_ids_cover_every_generation_config_id(native_gen):
    from eqat_cli.generate import eos_token_ids

    model, tok = native_gen.model, native_gen.tokenizer
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [5, 7]
    try:
        ids = eos_token_ids(model, tok)
    finally:
        model.generation_config.eos_token_id = old
    assert {5, 7, tok.eos_token_id} <= set(ids)


def test_chat_template_applied(native_gen):
    tok = native_gen.tokenizer
    res = native_gen.generate_text("hello there", greedy(4), chat=True, system="be brief")
    want = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
                                   tokenize=False, add_generation_prompt=True)
    assert res.prompt == want and want.endswith("<s>assistant\n")
    assert res.prompt_tokens == len(tok(want, add_special_tokens=False)["input_ids"])
    raw = native_gen.generate_text("hello there", greedy(4))
    assert raw.prompt == "hello there" and raw.prompt_tokens < res.prompt_tokens


@pytest.mark.parametrize("make_tok", [byte_level_tokenizer, sentencepiece_style_tokenizer])
def test_text_stream_pieces_make_the_text(make_tok):
    """Byte tokens of multi-byte characters wait until whole; leading spaces survive."""
    from eqat_cli.generate import TextStream

    tok = make_tok()
    text = "héllo wörld, the fox 日本 ok ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    want = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert "".join(pieces) == want == stream.text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5  # it streamed, not one piece at the end


def test_streamed_text_equals_result(native_gen):
    pieces: list[str] = []
    res = native_gen.generate_text(PROMPT, greedy(20), on_text=pieces.append)
    assert "".join(pieces) == res.text
    assert res.text == native_gen.tokenizer.decode(res.token_ids, skip_special_tokens=True,
                                                   clean_up_tokenization_spaces=False)


def test_prompt_checks(native_gen):
    from eqat_cli.errors import BadInputError

    with pytest.raises(BadInputError, match="empty"):
        native_gen.generate_text("  \n", greedy())
    with pytest.raises(BadInputError, match="context of 256 tokens"):
        native_gen.generate_text("x" * 250, greedy(10))


# ---------------------------------------------------------------------- sessions


def test_chat_session_keeps_history_and_resets(native_gen):
    from eqat_cli.generate import chat_session

    lines = iter(["hello", "and then?", "/reset", "again", "/exit", "never read"])
    events = []
    out = chat_session(native_gen, greedy(6), lambda: next(lines, None), on_event=lambda e, i: events.append((e, i)),
                       system="sys msg")
    turns = out["turns"]
    assert [e for e, _ in events] == ["turn", "turn", "reset", "turn"]
    assert len(turns) == 3
    assert "hello" in turns[1]["prompt"] and turns[0]["text"] in turns[1]["prompt"]
    assert turns[1]["prompt"].startswith(turns[0]["prompt"])
    assert "hello" not in turns[2]["prompt"] and "sys msg" in turns[2]["prompt"]
    assert next(lines) == "never read"


# ---------------------------------------------------------------------- the command


def test_cli_prompt_json(forms, tmp_path):
    out = tmp_path / "g.json"
    res = invoke("generate", forms["native"], "-p", PROMPT, "-n", "10", "--json", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    for key in ("text", "token_ids", "prompt_tokens", "new_tokens", "prefill_tokens_per_s", "decode_tokens_per_s",
                "peak_rss_bytes", "stop", "backend", "format", "sampling"):
        assert key in d, key
    assert d["format"] == "eqat" and d["new_tokens"] == len(d["token_ids"]) <= 10
    assert d["prefill_tokens_per_s"] > 0 and d["peak_rss_bytes"] > 0 and d["chat"] is False
    assert d["text"] in res.stdout  # streamed to stdout
    assert "tok/s" in res.stderr and "peak RSS" in res.stderr
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_cli_stdin_prompt_chat_and_seed(forms, tmp_path):
    out1, out2 = tmp_path / "a.json", tmp_path / "b.json"
    for out in (out1, out2):
        res = invoke("generate", forms["gguf"], "--chat", "-t", "0.9", "--seed", "5", "-n", "8", "--json", out,
                     input="hello from stdin\n")
        assert res.exit_code == 0, res.output
    a, b = json.loads(out1.read_text()), json.loads(out2.read_text())
    assert a["token_ids"] == b["token_ids"] and a["seed"] == 5
    assert a["chat"] is True and a["prompt"].startswith("<s>user\nhello from stdin")


def test_cli_json_stdout_does_not_stream(forms):
    res = invoke("generate", forms["native"], "-p", PROMPT, "-n", "5", "--json", "-")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["new_tokens"] + (d["stop"] == "eos") >= 1


def test_cli_interactive_keeps_history(forms, tmp_path):
    out = tmp_path / "chat.json"
    res = invoke("generate", forms["native"], "-i", "-n", "6", "--json", out, input="first question\nsecond one\n\nignored\n")
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    turns = d["turns"]
    assert len(turns) == 2 and d["interactive"] is True
    assert "first question" in turns[1]["prompt"] and turns[0]["text"] in turns[1]["prompt"]
    assert "second one" in turns[1]["prompt"] and "ignored" not in json.dumps(d)
    assert [m["role"] for m in d["messages"]] == ["user", "assistant", "user", "assistant"]
    assert res.stderr.count("tok/s") >= 2


def test_cli_refuses_interactive_with_prompt(forms):
    res = invoke("generate", forms["native"], "-i", "-p", "hi")
    assert res.exit_code == 2 and "--interactive" in res.output


# ---------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_greedy(smollm2_dir):
    from eqat_cli.generate import load_generator

    gen = load_generator("smollm2", device="cpu")
    res = gen.generate_text("What is the capital of France?", greedy(12), chat=True)
    assert "Paris" in res.text
    assert res.decode_tokens_per_s and res.decode_tokens_per_s > 0
    assert 2 in gen.eos_ids  # <|im_end|>


def test_quantize_head_passes_through(forms, tmp_path):
    """`--quantize-head 8` loads the model with its embedding and lm_head packed (8-bit) and
    generates; the library entry takes the same `head_bits`."""
    from eqat_cli.generate import load_generator
    from eqat_cli.quant.linear import PackedLinear

    gen = load_generator(str(forms["native"]), device="cpu", head_bits=8)
    assert isinstance(gen.model.get_output_embeddings(), PackedLinear)
    assert gen.model.get_output_embeddings().bits == 8
    out = tmp_path / "h.json"
    res = invoke("generate", forms["native"], "-p", PROMPT, "-n", "6", "--quantize-head", "8", "--json", out,
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert 0 < json.loads(out.read_text())["new_tokens"] <= 6
    bad = invoke("generate", forms["native"], "-p", PROMPT, "--quantize-head", "5", "--device", "cpu")
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1
