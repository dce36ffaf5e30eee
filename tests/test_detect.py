"""Format detection lives in one place (``eqat_cli.formats.detect``) and every reader agrees with it."""

import json

import pytest
import torch

from conftest import build, tiny_llama_config, tiny_tokenizer
from eqat_cli.errors import BadInputError
from eqat_cli.formats.detect import Layout, gptq_version, layer_quant, layout_of
from eqat_cli.scheme import QuantScheme


def test_layer_quant_cases():
    bg = lambda lq: (lq.bits, lq.group_size)  # noqa: E731
    # Llama-2-7B q_proj w2g64 (FORMATS.md table), with and without the layer's sizes
    assert bg(layer_quant("q", (256, 4096), (64, 256), (64, 4096), 4096, 4096)) == (2, 64)
    lq = layer_quant("q", (256, 4096), (64, 256), (64, 4096))
    assert (lq.bits, lq.group_size, lq.in_features, lq.out_features) == (2, 64, 4096, 4096)
    # 3-bit: 10 codes per word; ragged last group (576 = 4 x 128 + 64), from g_idx or from the rows
    assert bg(layer_quant("x", (58, 192), (5, 20), (5, 192), 576, 192, group_hint=128)) == (3, 128)
    assert bg(layer_quant("x", (58, 192), (5, 20), (5, 192), 576, 192)) == (3, 128)
    assert bg(layer_quant("x", (72, 192), (1, 24), (1, 192), 576, 192)) == (4, -1)
    # GPTQ 3-bit: 32 codes in 3 words along both packed dimensions
    assert bg(layer_quant("x", (18, 64), (2, 6), (2, 64), 192, 64, gptq3=True)) == (3, 128)
    with pytest.raises(BadInputError, match="match no bit width"):
        layer_quant("x", (50, 192), (1, 24), (1, 192), 576, 192)
    with pytest.raises(BadInputError, match="inconsistent shapes"):
        layer_quant("x", (72, 192), (2, 24), (1, 192), 576, 192)
    with pytest.raises(BadInputError, match="not GPTQ 3-bit"):
        layer_quant("x", (58, 192), (5, 20), (5, 192), 576, 192, gptq3=True)


def test_layout_from_config_and_tensor_names():
    packed = ["model.layers.0.mlp.up_proj.qweight", "model.norm.weight"]
    assert layout_of({}, ["model.norm.weight"]) == Layout("fp")
    assert layout_of({}, packed) == Layout("eqat")
    gptq = {"quant_method": "gptq", "bits": 4}
    assert layout_of({"quantization_config": gptq}, packed) == Layout("gptq", zero_offset=1)
    v2 = {**gptq, "checkpoint_format": "gptq_v2", "bits": 3}
    assert layout_of({"quantization_config": v2}, packed) == Layout("gptq_v2", gptq3=True)
    assert layout_of({"quantization_config": {"quant_method": "awq"}}, packed).format == "other (awq)"
    # The legacy key older GPTQModel releases wrote; checkpoint_format wins when both are there.
    assert gptq_version({"quant_method": "gptq", "format": "gptq_v2"}) == "gptq_v2"
    assert gptq_version({"quant_method": "gptq", "format": "gptq_v2", "checkpoint_format": "gptq"}) == "gptq"
    assert gptq_version({"quant_method": "gptq"}) == "gptq"


def load_gptq(path, dtype=torch.float32):
    """A GPTQ v1/v2 reader of the test's own, beside ``models.resolve``: the layout detection
    finds, then the packed loader with its zero offset (v1 zeros get their +1 back)."""
    from eqat_cli.formats.checkpoint import detect_layout
    from eqat_cli.formats.native import load_packed_model

    layout = detect_layout(path)
    assert layout.format in ("gptq", "gptq_v2"), layout
    return load_packed_model(path, dtype, zero_offset=layout.zero_offset, gptq3=layout.gptq3)


def test_gptq_v2_with_the_legacy_format_key_loads_as_v2_everywhere(tmp_path):
    """A GPTQ v2 checkpoint that names its version only with the legacy ``format`` key: ``eqat
    pull``'s description, ``resolve`` (eval, pack) and the reader above all read v2 (resolve used
    to ignore the key and load it as v1, adding 1 to every zero point)."""
    from eqat_cli.formats.describe import inspect_path
    from eqat_cli.formats.gptq import save_gptq
    from eqat_cli.models import resolve
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    model = rtn_quantize_model(build(tiny_llama_config()), get_registry().architecture("llama"), QuantScheme(4, 32))
    out = tmp_path / "v2"
    out.mkdir()
    save_gptq(model, tiny_tokenizer(), out, "gptq_v2")
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    qc["format"] = qc.pop("checkpoint_format")
    (out / "config.json").write_text(json.dumps(cfg))
    assert inspect_path(out).format == "gptq_v2"
    lm = resolve(str(out), device="cpu")
    assert lm.format == "gptq_v2"
    direct, _ = load_gptq(out)
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for got in (lm.model(input_ids=ids).logits, direct(input_ids=ids).logits):
            torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * float(want.abs().max()))


def test_other_quantization_methods_are_named_not_misread(tmp_path):
    """A checkpoint of a method eqat does not read (AWQ also has ``qweight`` tensors) is reported as
    such, not taken for the native layout."""
    from safetensors.torch import save_file

    from eqat_cli.formats.describe import inspect_path
    from eqat_cli.formats.checkpoint import detect_format

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization_config": {"quant_method": "awq", "bits": 4}}))
    save_file({"model.layers.0.mlp.up_proj.qweight": torch.zeros(8, 4, dtype=torch.int32)},
              str(tmp_path / "model.safetensors"))
    assert detect_format(tmp_path) == "other (awq)"
    info = inspect_path(tmp_path)
    assert info.format == "other (awq)" and any("'awq'" in n for n in info.notes)


def test_a_directory_without_safetensors_is_left_to_transformers(tmp_path):
    from eqat_cli.formats.checkpoint import detect_format

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert detect_format(tmp_path) == "fp"


def test_shard_reader_reads_by_prefix_from_one_file_or_an_index(tmp_path):
    """Block-AP's reader lives with the formats, and only there (the trainer no longer re-exports it)."""
    import eqat_cli.train.block_ap as block_ap
    from eqat_cli.formats.native import save_state_dict_sharded
    from eqat_cli.formats.shards import ShardReader

    assert not hasattr(block_ap, "ShardReader")
    sd = {f"model.layers.{i}.w": torch.full((64,), float(i)) for i in range(3)}
    sd["lm_head.weight"] = torch.ones(4, 4, dtype=torch.float16)
    for name, shard_bytes in (("one", 10**9), ("sharded", 300)):
        d = tmp_path / name
        d.mkdir()
        save_state_dict_sharded(sd, d, max_shard_bytes=shard_bytes)
        assert (d / "model.safetensors.index.json").exists() == (name == "sharded")
        reader = ShardReader(d)
        assert reader.keys("model.layers.1.") == ["model.layers.1.w"]
        got = reader.read("model.layers.2.", torch.float64)
        assert set(got) == {"w"} and got["w"].dtype == torch.float64 and float(got["w"][0]) == 2.0
        rest = reader.read("", torch.float32, exclude="model.layers.")
        assert set(rest) == {"lm_head.weight"} and rest["lm_head.weight"].dtype == torch.float32
