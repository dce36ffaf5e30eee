"""The Qwen2, Qwen3 and Gemma-3 plugins and the layer-aware block hook, on tiny random models.

Each architecture: the block-by-block forward equals the Hugging Face forward for every layer; RTN
Block-AP (``--epochs 0``) equals per-layer fake quantization; the packed result round-trips through
``eqat pack`` and ``eqat eval``. Plus: ``eqat eval`` of a full-precision model no plugin knows.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import TINY_CONFIGS, build, save_tiny, tiny_tokenizer
from eqat_cli.registry import get_registry
from eqat_cli.scheme import QuantScheme

NEW = ["qwen2", "qwen3", "gemma3"]
REL = 2e-3  # x max|logit|: fp16 storage of embeddings, norms and scales


def invoke(*args):
    from eqat_cli.cli.app import build_app

    return CliRunner().invoke(build_app(), [str(a) for a in args], prog_name="eqat", env={"EQAT_DATA_DIR": ""})


def layer_outputs(model, layers, ids):
    """Every decoder layer's output in the model's own forward."""
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o)) for layer in layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return outs


def test_plugins_claim_their_model_types():
    reg = get_registry()
    assert reg.architecture_for("qwen2").name == "qwen2"
    assert reg.architecture_for("qwen3").name == "qwen3"
    assert reg.architecture_for("gemma3_text").name == "gemma3"
    for name in NEW:
        assert reg.architectures[name].plugin == name


def test_layer_types_follow_the_config():
    reg = get_registry()
    gemma = build(TINY_CONFIGS["gemma3"]())
    arch = reg.architecture_for("gemma3_text")
    kinds = [arch.layer_type(gemma, i) for i in range(6)]
    assert kinds == ["sliding_attention"] * 5 + ["full_attention"]  # 5:1
    assert arch.layer_type(gemma, arch.layers(gemma)[5]) == "full_attention"  # module or index
    qwen = build(TINY_CONFIGS["qwen2"]())
    assert [reg.architecture_for("qwen2").layer_type(qwen, i) for i in range(2)] == [
        "full_attention", "sliding_attention"]  # sliding from max_window_layers on
    mistral = build(TINY_CONFIGS["mistral"]())
    assert reg.architecture_for("mistral").layer_type(mistral, 1) == "sliding_attention"
    llama = build(TINY_CONFIGS["llama"]())
    assert reg.architecture_for("llama").layer_type(llama, 1) == "full_attention"


@pytest.mark.filterwarnings("error::FutureWarning")
@pytest.mark.parametrize("name", NEW)
def test_block_by_block_equals_hf_forward(name):
    model = build(TINY_CONFIGS[name]())
    arch = get_registry().architecture_for(model.config.model_type)
    layers = arch.layers(model)
    ids = torch.randint(0, 200, (2, 24))  # longer than the sliding window (8)
    want = layer_outputs(model, layers, ids)
    h = arch.embed(model)(ids)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            h = layer(h, **arch.block_kwargs(model, h, i))
            torch.testing.assert_close(h, want[i], rtol=0, atol=1e-5, msg=f"{name} layer {i}")
        out = model(input_ids=ids, output_hidden_states=True)
        torch.testing.assert_close(arch.norm(model)(h), out.hidden_states[-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NEW)
def test_the_layer_type_matters(name):
    """The hook's layer argument is not decoration: a block run with the other layer type's mask
    and rotary embedding gives another output."""
    model = build(TINY_CONFIGS[name]())
    arch = get_registry().architecture_for(model.config.model_type)
    layers = arch.layers(model)
    full = next(i for i in range(len(layers)) if arch.layer_type(model, i) == "full_attention")
    sliding = next(i for i in range(len(layers)) if arch.layer_type(model, i) == "sliding_attention")
    h = torch.randn(1, 24, model.config.hidden_size)
    with torch.no_grad():
        right = layers[full](h, **arch.block_kwargs(model, h, full))
        wrong = layers[full](h, **arch.block_kwargs(model, h, sliding))
    assert not torch.allclose(right, wrong, atol=1e-4)


def test_qwen2_keeps_qkv_biases_through_packing():
    from eqat_cli.quant.linear import PackedLinear
    from eqat_cli.quantize import rtn_quantize_model

    model = build(TINY_CONFIGS["qwen2"]())
    arch = get_registry().architecture_for("qwen2")
    biases = {n: arch.layers(model)[0].get_submodule(n).bias.clone() for n in arch.linear_groups[0]}
    rtn_quantize_model(model, arch, QuantScheme(4, 32))
    for n, b in biases.items():
        layer = arch.layers(model)[0].get_submodule(n)
        assert isinstance(layer, PackedLinear) and torch.equal(layer.bias, b)


@pytest.fixture(scope="module", params=NEW)
def rtn_run(request, tmp_path_factory):
    """A tiny model of each architecture through Block-AP with ``--epochs 0`` (w4g32)."""
    from eqat_cli.train.block_ap import BlockAPConfig, run_block_ap
    from eqat_cli.train.calib import build_windows

    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    src = save_tiny(build(TINY_CONFIGS[name]()), tmp / "fp")
    text = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(60)) for i in range(20)]
    calib = build_windows(text, tiny_tokenizer(), 4, 24, 1, 0, source="synthetic")
    res = run_block_ap(src, tiny_tokenizer(), calib.train, calib.val,
                       BlockAPConfig(bits=4, group_size=32, epochs=0, channel_scale=False), tmp / "rtn", torch.device("cpu"))
    return name, src, res.output, tmp, calib, res.blocks


def test_rtn_block_ap_equals_per_layer_fake_quant(rtn_run):
    from eqat_cli.formats.native import load_packed_model, packed_state_dict
    from eqat_cli.quant.linear import QuantLinear, replace_linears
    from eqat_cli.quantize import rtn_quantize_model

    name, _, out, _, calib, blocks = rtn_run
    arch = get_registry().architecture(name)
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(str(f)))
    ref = rtn_quantize_model(build(TINY_CONFIGS[name]()), arch, QuantScheme(4, 32))
    want = packed_state_dict(ref)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # The packed model computes what the model with every linear fake-quantized computes.
    fake = build(TINY_CONFIGS[name]())
    for block in arch.layers(fake):
        replace_linears(block, list(arch.linear_names), lambda n, lin: QuantLinear(lin, QuantScheme(4, 32)))
    packed, layers = load_packed_model(out)
    assert len(layers) == len(arch.layers(fake)) * len(arch.linear_names)
    ids = torch.randint(0, 200, (1, 20))
    with torch.no_grad():
        a, b = fake(input_ids=ids).logits, packed(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=0, atol=REL * float(a.abs().max()))
    assert json.loads((out / "config.json").read_text())["eqat"]["architecture"] == name
    # Block-AP ran each block with its own layer's mask and RoPE: every block's reported loss is
    # loss (the default recipe's token-rel) between the packed block on the quantized chain and the
    # FP block on the FP chain, recomputed here.
    from eqat_cli.train.block_ap.blockio import block_loss

    fp = build(TINY_CONFIGS[name]())
    with torch.no_grad():
        h_fp = h_q = arch.embed(fp)(calib.val)
        for i, (fp_block, q_block) in enumerate(zip(arch.layers(fp), arch.layers(packed))):
            h_fp = fp_block(h_fp, **arch.block_kwargs(fp, h_fp, i))
            h_q = q_block(h_q, **arch.block_kwargs(packed, h_q, i))
            want = float(block_loss(h_q, h_fp, "token-rel"))
            assert blocks[i]["loss_after"] == pytest.approx(want, rel=1e-4), (name, i)


def test_pack_and_eval_round_trip(rtn_run):
    from eqat_cli.models import resolve

    name, _, out, tmp, _, _ = rtn_run
    ids = torch.randint(0, 200, (1, 20))
    native = resolve(str(out), device="cpu")
    assert native.arch.name == name and native.quant["bits"] == 4
    with torch.no_grad():
        ref = native.model(input_ids=ids).logits
    for fmt in ("gptq_v2", "fp16"):
        dest = tmp / f"packed-{fmt}"
        res = invoke("pack", out, "--format", fmt, "-o", dest, "--overwrite")
        assert res.exit_code == 0, res.output
        lm = resolve(str(dest), device="cpu")
        with torch.no_grad():
            got = lm.model(input_ids=ids).logits
        tol = 1e-5 if fmt == "gptq_v2" else REL * float(ref.abs().max())
        torch.testing.assert_close(got, ref, rtol=0, atol=tol)
    corpus = tmp / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 12)
    ppl = {}
    for d in (out, tmp / "packed-gptq_v2"):
        res = invoke("eval", d, "--ppl", corpus, "--seqlen", "16", "--limit", "2", "--json", "-")
        assert res.exit_code == 0, res.output
        r = json.loads(res.stdout)
        assert r["architecture"] == name and r["quant"]["bits"] == 4
        (p,) = r["perplexity"].values()
        ppl[d.name] = p["ppl"]
    assert ppl["rtn"] == pytest.approx(ppl["packed-gptq_v2"], rel=1e-5)


def test_eval_full_precision_model_without_a_plugin(tmp_path):
    """``eqat eval`` needs only what transformers can load; quantizing still needs a plugin."""
    from transformers import GPT2Config

    from eqat_cli.errors import UnknownArchitectureError
    from eqat_cli.models import resolve

    cfg = GPT2Config(vocab_size=272, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=256, eos_token_id=257)
    src = save_tiny(build(cfg), tmp_path / "gpt2")
    assert get_registry().find_architecture("gpt2") is None
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 12)
    res = invoke("eval", src, "--ppl", corpus, "--seqlen", "16", "--limit", "2", "--json", "-")
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["format"] == "fp" and r["model_type"] == "gpt2" and r["architecture"] is None
    (p,) = r["perplexity"].values()
    assert p["windows"] == 2 and p["ppl"] > 1
    with pytest.raises(UnknownArchitectureError, match="gpt2"):
        resolve(str(src), device="cpu")


def test_readme_third_party_plugin_example_works():
    """The README's plugin example, registered as an installed package's module would be, makes a
    model no built-in knows (Phi-3) run block by block exactly like its own forward."""
    import re
    import types

    from transformers import Phi3Config

    from conftest import REPO
    from eqat_cli.plugin_manager import build_plugin_manager
    from eqat_cli.registry import Registry

    readme = (REPO / "README.md").read_text()
    code = re.search(r"`eqat_phi3/plugin\.py`.*?```python\n(.*?)```", readme, re.S).group(1)
    module = types.ModuleType("eqat_phi3.plugin")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    pm = build_plugin_manager(load_entry_points=False)
    pm.register(module, name="phi3")
    reg = Registry(pm)
    arch = reg.architecture_for("phi3")
    assert reg.architectures["phi3"].plugin == "phi3"
    model = build(Phi3Config(vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    ids = torch.randint(0, 200, (1, 24))
    want = layer_outputs(model, arch.layers(model), ids)
    h = arch.embed(model)(ids)
    with torch.no_grad():
        for i, layer in enumerate(arch.layers(model)):
            for name in arch.linear_names:
                assert isinstance(layer.get_submodule(name), torch.nn.Linear)
            h = layer(h, **arch.block_kwargs(model, h, i))
            torch.testing.assert_close(h, want[i], rtol=0, atol=1e-5)


def test_gemma2_needs_only_data():
    """Gemma-2 (sliding and global layers alternating 1:1, one RoPE) is not built in, but a spec
    that is Llama's under another name runs it block by block exactly: the hook's layer argument is
    all its alternating layers need."""
    from transformers import Gemma2Config

    from eqat_cli.plugins.llama import LLAMA
    from eqat_cli.registry import replace

    arch = replace(LLAMA, name="gemma2", model_types=("gemma2",))
    model = build(Gemma2Config(vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               sliding_window=8, query_pre_attn_scalar=16))
    assert [arch.layer_type(model, i) for i in range(4)] == ["sliding_attention", "full_attention"] * 2
    ids = torch.randint(0, 200, (1, 24))
    want = layer_outputs(model, arch.layers(model), ids)
    h = arch.embed(model)(ids)
    with torch.no_grad():
        for i, layer in enumerate(arch.layers(model)):
            h = layer(h, **arch.block_kwargs(model, h, i))
            torch.testing.assert_close(h, want[i], rtol=0, atol=1e-5)
