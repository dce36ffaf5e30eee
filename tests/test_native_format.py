"""Native (EfficientQAT) checkpoints: write, detect bits/group from shapes, load, same logits."""

import json

import pytest
import torch

from conftest import build, tiny_llama_config, tiny_llava_config, tiny_mistral_config
from eqat_cli.formats.native import save_native
from eqat_cli.models import resolve
from eqat_cli.quant.linear import PackedLinear
from eqat_cli.quantize import rtn_quantize_model
from eqat_cli.registry import get_registry
from eqat_cli.scheme import QuantScheme


def _save(model, path, meta):
    path.mkdir()
    save_native(model, None, path, meta)


@pytest.mark.parametrize(
    "cfg,bits,group",
    [(tiny_llama_config, 2, 32), (tiny_llama_config, 3, -1), (tiny_mistral_config, 4, 32), (tiny_llava_config, 8, 32)],
)
def test_round_trip_same_logits(tmp_path, cfg, bits, group):
    from eqat_cli.formats.native import load_packed_model

    model = build(cfg())
    arch = get_registry().architecture_for(model.config.model_type)
    rtn_quantize_model(model, arch, QuantScheme(bits, group))
    _save(model, tmp_path / "q", {"bits": bits, "group_size": group, "architecture": arch.name})
    loaded, layers = load_packed_model(tmp_path / "q")
    assert len(layers) == len(arch.layers(model)) * len(arch.linear_names)
    assert set(layers.values()) == {QuantScheme(bits, group)}
    ids = torch.randint(0, 200, (1, 16))
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = loaded(input_ids=ids).logits
    # Non-quantized tensors are stored in fp16: tolerance is fp16 rounding of embeddings/norms.
    torch.testing.assert_close(b, a, rtol=0, atol=2e-3 * float(a.abs().max()))
    cfg_json = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg_json["eqat"]["bits"] == bits and cfg_json["eqat"]["format"] == "eqat"
    if arch.full_precision_paths:  # LLaVA vision tower stays dense
        for p in arch.full_precision_paths:
            assert not any(isinstance(m, PackedLinear) for m in loaded.get_submodule(p).modules())


def test_release_without_eqat_section_detected_from_shapes(tmp_path):
    model = build(tiny_llama_config())
    arch = get_registry().architecture_for("llama")
    rtn_quantize_model(model, arch, QuantScheme(2, 32))
    _save(model, tmp_path / "rel", None)
    assert "eqat" not in json.loads((tmp_path / "rel" / "config.json").read_text())
    from eqat_cli.formats.native import load_packed_model

    _, layers = load_packed_model(tmp_path / "rel")
    assert set(layers.values()) == {QuantScheme(2, 32)}


def test_tied_embeddings_stored_once(tmp_path):
    model = build(tiny_llama_config(tie_word_embeddings=True))
    arch = get_registry().architecture_for("llama")
    rtn_quantize_model(model, arch, QuantScheme(4, 32))
    _save(model, tmp_path / "t", {"bits": 4})
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    from eqat_cli.formats.native import load_packed_model

    loaded, _ = load_packed_model(tmp_path / "t")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_resolver_errors(tmp_path):
    from eqat_cli.errors import BadInputError, EqatError
    from eqat_cli.models import classify

    with pytest.raises(BadInputError, match="model not found"):
        classify(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no config.json"):
        classify(str(tmp_path / "empty"))
    with pytest.raises(BadInputError, match="GGUF file not found"):
        classify(str(tmp_path / "x.gguf"))
    assert classify("ChenMnZ/Llama-2-7b-EfficientQAT-w2g64").kind == "hub"
    assert classify("smollm2").kind == "alias"
    # Offline hub: a one-line error, not a traceback from deep inside huggingface_hub.
    with pytest.raises(EqatError, match="unreachable|not found|failed"):
        resolve("nobody-here/no-such-model")
