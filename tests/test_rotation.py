"""Residual-stream rotation folded into the weights (eqat_cli.rotate, eqat_cli.quant.rotation)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_CONFIGS, build, save_tiny, tiny_tokenizer  # noqa: F401

from eqat_cli.errors import UnsupportedError
from eqat_cli.quant.rotation import hadamard, rotation_matrix
from eqat_cli.registry import get_registry
from eqat_cli.rotate import rotate_model
from eqat_cli.scheme import QuantScheme

ROTATABLE = [name for name in TINY_CONFIGS if name != "gemma3"]


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 64, 76, 576, 896])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert h is not None
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_hadamard_refuses_impossible_orders():
    assert hadamard(6) is None and hadamard(10) is None
    with pytest.raises(UnsupportedError, match="no Hadamard"):
        rotation_matrix(10, "hadamard")


@pytest.mark.parametrize("kind,n,expect", [("auto", 64, "hadamard"), ("auto", 10, "orthogonal"),
                                           ("orthogonal", 64, "orthogonal"), ("hadamard", 576, "hadamard")])
def test_rotation_matrix_is_orthogonal_and_seeded(kind, n, expect):
    q, got = rotation_matrix(n, kind, seed=3)
    assert got == expect and q.dtype == torch.float64
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, rotation_matrix(n, kind, seed=3)[0])
    assert not torch.equal(q, rotation_matrix(n, kind, seed=4)[0])


def _randomize_norms(model, offset):
    """Random gains (tiny models start with all-ones gains, which would hide a missing fold)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if "norm" in type(mod).__name__.lower() and isinstance(getattr(mod, "weight", None), torch.Tensor):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) * 1.5 + 0.25 - offset)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits.double()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _model(name, tie):
    config = TINY_CONFIGS[name]()
    text = config.get_text_config()
    text.tie_word_embeddings = tie
    config.tie_word_embeddings = tie
    model = build(config).double()  # float64: the check measures the algebra, not fp32 rounding
    arch = get_registry().architecture_for(model.config.model_type)
    _randomize_norms(model, arch.norm_gain_offset)
    return model, arch


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("name", ROTATABLE)
def test_rotation_keeps_logits(name, tie, kind):
    model, arch = _model(name, tie)
    assert (model.lm_head.weight is arch.embed(model).weight) == tie
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    info = rotate_model(model, arch, kind=kind, seed=5, untie=True)
    assert info.kind == kind and info.untied == tie
    after = _logits(model, ids)
    assert _rel(after, before) < 1e-4
    # the stream really is rotated: embeddings changed, gains are all one
    assert all(torch.all(n.weight == 1) for m, n in arch.layers(model).named_modules() if m.endswith("layernorm"))
    assert torch.all(arch.norm(model).weight == 1)
    if tie:
        assert model.lm_head.weight is not arch.embed(model).weight
        assert model.config.get_text_config().tie_word_embeddings is False


def test_rotation_keeps_logits_in_float32():
    """The fold runs in float64 and casts once: a float32 model stays within 1e-4 relative."""
    model = build(TINY_CONFIGS["llama"]())
    arch = get_registry().architecture_for("llama")
    _randomize_norms(model, 0.0)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    rotate_model(model, arch, seed=1)
    assert model.lm_head.weight.dtype == torch.float32
    assert _rel(_logits(model, ids), before) < 1e-4


def test_tied_head_with_uniform_final_gain_stays_tied():
    model, arch = _model("qwen3", True)
    with torch.no_grad():
        arch.norm(model).weight.fill_(0.7)
    ids = torch.randint(0, 200, (1, 10), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    info = rotate_model(model, arch, seed=2)
    assert not info.untied
    assert model.lm_head.weight is arch.embed(model).weight
    assert _rel(_logits(model, ids), before) < 1e-4


def test_tied_head_refused_without_untie_and_model_untouched():
    model, arch = _model("qwen3", True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedError, match="tied to the embedding"):
        rotate_model(model, arch)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_llava_image_features_rotate_with_the_stream():
    """The projector writes the stream in place of token embeddings: image positions too."""
    model, arch = _model("llava", False)
    config = model.config
    ids = torch.randint(0, 200, (1, 10), generator=torch.Generator().manual_seed(0))
    n_img = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    ids[0, 1:1 + n_img] = config.image_token_index
    pixels = torch.randn(1, 3, config.vision_config.image_size, config.vision_config.image_size,
                         generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    before = _logits(model, ids, pixel_values=pixels)
    rotate_model(model, arch, seed=0)
    assert _rel(_logits(model, ids, pixel_values=pixels), before) < 1e-4


def test_gemma3_refused_in_one_line():
    """Post-attention/post-feedforward norms sit between the writers and the stream."""
    model = build(TINY_CONFIGS["gemma3"]())
    arch = get_registry().architecture_for(model.config.model_type)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedError, match="cannot rotate a gemma3 model") as err:
        rotate_model(model, arch)
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_quantized_model_refused(tiny_llama):
    from eqat_cli.quantize import rtn_quantize_model

    arch = get_registry().architecture_for("llama")
    rtn_quantize_model(tiny_llama, arch, QuantScheme(4, 32))
    with pytest.raises(UnsupportedError, match="full-precision"):
        rotate_model(tiny_llama, arch)


def test_writers_default_to_linears_no_norm_feeds():
    arch = get_registry().architecture_for("llama")
    assert arch.rotation_writers == ("self_attn.o_proj", "mlp.down_proj")


@pytest.mark.parametrize("tie", [False, True])
def test_rotated_model_quantizes_packs_and_round_trips(tmp_path, tie):
    """A rotated model is an ordinary model: RTN w4, native save, `eqat pack` to native and GGUF
    give back its quantized logits (a tied head comes back untied in both)."""
    import json

    from test_pack import GGUF_REL, REL, SAMPLE, assert_close_rel, byte_level_tokenizer, invoke, logits, save_native_dir

    from conftest import tiny_llama_config
    from eqat_cli.formats.gguf_export import load_gguf_model
    from eqat_cli.formats.native import load_packed_model
    from eqat_cli.models import resolve
    from eqat_cli.quantize import rtn_quantize_model

    tok = byte_level_tokenizer()
    model = build(tiny_llama_config(vocab_size=320, tie_word_embeddings=tie))
    arch = get_registry().architecture_for("llama")
    _randomize_norms(model, 0.0)
    ids = torch.tensor([tok(SAMPLE)["input_ids"]])
    fp = logits(model, ids)
    info = rotate_model(model, arch, seed=0, untie=True)
    assert info.untied == tie
    assert _rel(logits(model, ids).double(), fp.double()) < 1e-4
    rtn_quantize_model(model, arch, QuantScheme(4, 32))
    ref = logits(model, ids)
    src = save_native_dir(model, tok, tmp_path / "src",
                          {"bits": 4, "group_size": 32, "architecture": "llama", "trained_with": "rtn"})
    reloaded, _ = load_packed_model(src)
    native = logits(reloaded, ids)
    assert_close_rel(native, ref, REL)  # fp16 storage of embeddings, head and norms

    res = invoke("pack", src, "--format", "eqat", "-o", tmp_path / "native")
    assert res.exit_code == 0, res.output
    lm = resolve(str(tmp_path / "native"), device="cpu")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(logits(lm.model, ids), native, rtol=0, atol=1e-5)

    res = invoke("pack", src, "--format", "gguf", "-o", tmp_path / "m.gguf")
    assert res.exit_code == 0, res.output
    gm, _ = load_gguf_model(tmp_path / "m.gguf")
    assert_close_rel(logits(gm, ids), ref, GGUF_REL)


def test_rotate_block_matches_rotate_model():
    """Block by block (what a streaming trainer would do) gives the whole-model rotation's blocks."""
    import copy

    a, arch = _model("llama", False)
    b = copy.deepcopy(a)
    rotate_model(a, arch, seed=7)
    q, _ = rotation_matrix(a.config.hidden_size, "auto", seed=7)
    for i, block in enumerate(arch.layers(b)):
        from eqat_cli.rotate import rotate_block

        rotate_block(block, arch, q, arch.layer_prefix(i))
    for (name, x), (_, y) in zip(arch.layers(a).state_dict().items(), arch.layers(b).state_dict().items()):
        assert torch.equal(x, y), name
