"""One home for the checkpoint: the format registry and its vocabulary, the eqat metadata section
written once and read back first, the Checkpoint reader (each header parsed once), the one GGUF
reader (errors name the file), and the streaming native writer."""

import json
import struct

import pytest
import torch

from conftest import build, tiny_llama_config, tiny_tokenizer
from eqat_cli.errors import BadInputError
from eqat_cli.formats.meta import CheckpointMeta
from eqat_cli.quantize import rtn_quantize_model
from eqat_cli.registry import get_registry
from eqat_cli.scheme import QuantScheme


def _quantized(bits=4, group=32):
    model = build(tiny_llama_config())
    rtn_quantize_model(model, get_registry().architecture_for("llama"), QuantScheme(bits, group))
    return model


def _save(model, path, meta):
    from eqat_cli.formats.native import save_native

    path.mkdir()
    save_native(model, tiny_tokenizer(), path, meta)
    return path


# ---------------------------------------------------------------------- formats and their names


def test_builtin_formats_and_old_spellings():
    from eqat_cli.pack import normalize_format

    reg = get_registry()
    assert reg.format_names() == ("eqat", "gptq", "gptq_v2", "fp16", "gguf", "mlx")
    for spelling, name in [("native", "eqat"), ("EfficientQAT", "eqat"), ("GPTQ-v2", "gptq_v2"), ("gptqv2", "gptq_v2"),
                           ("gptq_v1", "gptq"), ("fp", "fp16"), ("dense", "fp16"), ("FP16", "fp16"), ("gguf", "gguf")]:
        assert normalize_format(spelling) == name
    with pytest.raises(BadInputError, match="unknown format 'awq'; choose one of eqat"):
        normalize_format("awq")
    gguf = reg.format("gguf")
    assert gguf.output == "file" and gguf.suffix == ".gguf" and not reg.format("fp16").quantized_only


def test_detect_and_pack_speak_one_vocabulary(tmp_path):
    """Every layout detection reports for a model eqat reads is a registered format name or alias."""
    from eqat_cli.formats.detect import FULL_PRECISION, PACKED_FORMATS, layout_of

    reg = get_registry()
    for name in (*PACKED_FORMATS, FULL_PRECISION):
        assert name in reg._format_table
    assert reg.format_name(FULL_PRECISION) == "fp16"
    assert reg.format_name(layout_of({"quantization_config": {"quant_method": "gptq", "checkpoint_format": "gptq_v2"}},
                                     ["a.qweight"]).format) == "gptq_v2"


def test_format_check_says_why_before_anything_is_written(tmp_path):
    from eqat_cli.errors import UnsupportedError

    model = _quantized(bits=8)
    with pytest.raises(UnsupportedError, match="cannot hold this 8-bit layer exactly"):  # lopsided min-max groups
        get_registry().format("gguf").check(model, tiny_tokenizer())
    get_registry().format("gptq_v2").check(model)  # 8-bit GPTQ v2 is fine
    get_registry().format("gguf").check(_quantized(bits=2), tiny_tokenizer())  # 2-bit: exact Q4_0


# ---------------------------------------------------------------------- metadata


def test_meta_round_trip_writes_the_scheme_once():
    block_ap = {"bits": 2, "group_size": 64, "epochs": 2, "loss": "mse"}
    meta = CheckpointMeta(scheme=QuantScheme(2, 64), architecture="llama", method="block-ap", block_ap=block_ap,
                          source_model="m", extra={"calibration_note": "x"})
    d = meta.to_dict()
    assert d == {"format": "eqat", "format_version": 1, "bits": 2, "group_size": 64, "architecture": "llama",
                 "method": "block-ap", "source_model": "m", "block_ap": {"epochs": 2, "loss": "mse"},
                 "calibration_note": "x"}
    back = CheckpointMeta.from_dict(d)
    assert back.scheme == QuantScheme(2, 64) and back.extra == {"calibration_note": "x"}
    assert back.to_dict() == d


def test_meta_reads_old_sections():
    # Written before the scheme was recorded once: both spellings present, or only block_ap's.
    both = {"format": "eqat", "format_version": 1, "bits": 3, "group_size": 128, "block_ap": {"bits": 3, "group_size": 128}}
    assert CheckpointMeta.from_dict(both).scheme == QuantScheme(3, 128)
    only_block_ap = {"format": "eqat", "format_version": 1, "block_ap": {"bits": 4, "group_size": 32, "epochs": 1}}
    assert CheckpointMeta.from_dict(only_block_ap).scheme == QuantScheme(4, 32)
    # Several schemes (lists) are kept as written, declaring none.
    mixed = CheckpointMeta.from_dict({"format": "eqat", "bits": [2, 4], "group_size": 64})
    assert mixed.scheme is None and mixed.to_dict()["bits"] == [2, 4]
    with pytest.raises(BadInputError, match="declares bits=5"):
        CheckpointMeta.from_dict({"format": "eqat", "bits": 5, "group_size": 64}, "x/config.json")


def test_load_reads_bits_and_group_from_the_metadata_first(tmp_path, monkeypatch):
    from eqat_cli.formats import detect
    from eqat_cli.formats.native import load_packed_model

    d = _save(_quantized(4, 32), tmp_path / "q", {"bits": 4, "group_size": 32, "architecture": "llama"})

    def no_guessing(*a, **k):
        raise AssertionError("shape inference used for a checkpoint that records its scheme")

    monkeypatch.setattr(detect, "group_from_rows", no_guessing)
    _, layers = load_packed_model(d)
    assert set(layers.values()) == {QuantScheme(4, 32)}
    # A foreign checkpoint (no eqat section) is inferred from shapes.
    cfg = json.loads((d / "config.json").read_text())
    del cfg["eqat"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AssertionError, match="shape inference"):
        load_packed_model(d)


def test_metadata_that_contradicts_the_tensors_is_one_error(tmp_path):
    from eqat_cli.formats.native import load_packed_model

    d = _save(_quantized(4, 32), tmp_path / "q", {"bits": 2, "group_size": 32, "architecture": "llama"})
    with pytest.raises(BadInputError, match=r"model\.layers\.0\.\S+: config.json's eqat section declares w2g32"):
        load_packed_model(d)


# ---------------------------------------------------------------------- reading once


def test_each_shard_header_is_parsed_once_per_load(tmp_path, monkeypatch):
    from eqat_cli import readers
    from eqat_cli.formats.native import NativeWriter, config_dict_for_save, packed_state_dict
    from eqat_cli.models import resolve

    model = _quantized(4, 32)
    d = tmp_path / "sharded"
    d.mkdir()
    w = NativeWriter(d)
    w.add_sharded(packed_state_dict(model), max_shard_bytes=30_000)
    meta = CheckpointMeta(scheme=QuantScheme(4, 32), architecture="llama")
    w.finish(config_dict_for_save(model.config, meta), tiny_tokenizer(), model.generation_config)
    assert len(w.shards) >= 3 and (d / "model.safetensors.index.json").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in packed_state_dict(model).values())

    from eqat_cli import model_files
    from eqat_cli.formats import checkpoint, detect

    parsed = []
    real = readers.safetensors_header
    counted = lambda p, *a, **k: parsed.append(p.name) or real(p, *a, **k)  # noqa: E731
    for mod in (readers, detect, model_files):  # the function and every module-level binding of it
        monkeypatch.setattr(mod, "safetensors_header", counted)
    config_reads = []
    real_cfg = model_files.read_model_config
    counted_cfg = lambda p: config_reads.append(p) or real_cfg(p)  # noqa: E731
    for mod in (model_files, checkpoint):
        monkeypatch.setattr(mod, "read_model_config", counted_cfg)
    lm = resolve(str(d), device="cpu")
    assert sorted(parsed) == sorted(w.shards)  # once each
    assert len(config_reads) == 1
    assert lm.quant["bits"] == 4 and lm.quant["group_size"] == 32
    ids = torch.randint(0, 200, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=5e-2)


# ---------------------------------------------------------------------- GGUF


def _huge_gguf(path):
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0))
    return path


@pytest.mark.parametrize("reader", ["resolve", "describe", "metadata"])
def test_gguf_header_claiming_2_40_tensors_names_the_file(tmp_path, monkeypatch, reader):
    from eqat_cli.formats.describe import inspect_path
    from eqat_cli.formats.gguf_export import read_gguf_metadata
    from eqat_cli.models import resolve

    monkeypatch.chdir(tmp_path)
    _huge_gguf(tmp_path / "big.gguf")
    call = {"resolve": lambda: resolve("big.gguf", device="cpu"), "describe": lambda: inspect_path("big.gguf"),
            "metadata": lambda: read_gguf_metadata("big.gguf")}[reader]
    with pytest.raises(BadInputError) as e:
        call()
    msg = str(e.value)
    assert msg.startswith("big.gguf: damaged GGUF header: it claims 1099511627776 tensors"), msg
    assert not msg.startswith(".:")


def test_gguf_reader_is_one(tmp_path):
    """eqat pull's description and the export's metadata reader see the same file the same way."""
    from eqat_cli.formats.checkpoint import GGUFFile
    from eqat_cli.formats.describe import inspect_path
    from eqat_cli.formats.gguf_export import read_gguf_metadata, save_gguf

    save_gguf(_quantized(4, 32), tiny_tokenizer(), tmp_path / "m.gguf")
    g = GGUFFile.open(tmp_path / "m.gguf")
    info = inspect_path(tmp_path / "m.gguf")
    assert info.details["tensor_types"] == g.tensor_types() and g.tensor_types()["Q4_1"] == 14
    assert read_gguf_metadata(tmp_path / "m.gguf")["eqat.bits"] == 4 == g.field("eqat.bits")
    (tmp_path / "x.gguf").write_bytes(b"GGUX" + bytes(20))
    with pytest.raises(BadInputError, match="x.gguf: not a GGUF file"):
        GGUFFile.open(tmp_path / "x.gguf")


# ---------------------------------------------------------------------- the one native writer


def test_block_ap_and_save_native_write_through_the_same_writer(tmp_path, monkeypatch):
    """Block-AP writes its checkpoint with NativeWriter (its rest shard included) and moves the work
    directory into place by renames; the metadata is one CheckpointMeta, the scheme written once."""
    from conftest import save_tiny
    from eqat_cli.formats import native
    from eqat_cli.formats.checkpoint import Checkpoint
    from eqat_cli.train.block_ap import BlockAPConfig, run_block_ap
    from eqat_cli.train.calib import build_windows

    added = []
    real_add = native.NativeWriter.add
    monkeypatch.setattr(native.NativeWriter, "add", lambda self, name, t: added.append(name) or real_add(self, name, t))
    fp = save_tiny(build(tiny_llama_config()), tmp_path / "fp")
    text = [f"Doc {i}: " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(60)) for i in range(20)]
    c = build_windows(text, tiny_tokenizer(), 4, 32, 0, 0, source="synthetic")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale").write_text("old")
    run_block_ap(fp, tiny_tokenizer(), c.train, c.val, BlockAPConfig.paper(bits=4, group_size=32, epochs=0), out,
                 torch.device("cpu"), overwrite=True)
    assert added == ["model-00003-of-00003.safetensors"]
    assert not (out / "stale").exists() and not list(tmp_path.glob(".out.old-*"))
    ck = Checkpoint.open(out)
    assert ck.meta.scheme == QuantScheme(4, 32) and ck.meta.method == "rtn"
    assert "bits" not in ck.config["eqat"]["block_ap"] and ck.config["eqat"]["bits"] == 4
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in ck.tensors.values())
