"""`eqat pack --format mlx`: mlx-lm's affine layout, checked without mlx (issue #27).

The files are read back with a numpy implementation of mlx's documented dequantization
``w = scale * q + bias`` (``eqat_cli.formats.mlx.dequantize``; the bit stream is unpacked with
``np.unpackbits``, independently of the packer) and compared with eqat's dequantized weights:

* ``exact=True`` (fp32 biases): bit-identical;
* default (fp16 biases, as mlx-lm stores them): within half an fp16 ulp of ``s*z``.

Loading in mlx-lm itself is checked by ``bench/mlx_check.py`` (not CI: mlx is not an eqat dependency).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIGS, build, random_packed_layer
from test_pack import byte_level_tokenizer, invoke, quantized_tiny, save_native_dir

from eqat_cli.scheme import QuantScheme


def read_dir(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors")), json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bit_order_is_mlx_little_endian_stream(bits):
    """Code j of a row sits at bits [bits*j, bits*j + bits) of the row's little-endian bytes; for
    3 bits, 8 codes fill 3 bytes (mlx's extract_bits)."""
    from eqat_cli.formats.mlx import pack_weight, unpack_weight

    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(5, 64)).astype(np.uint32)
    w = pack_weight(codes, bits)
    assert w.dtype == np.uint32 and w.shape == (5, 64 * bits // 32)
    assert np.array_equal(unpack_weight(w, bits, 64), codes)
    if bits == 3:  # first byte holds codes 0, 1 and the low 2 bits of code 2 (mlx extract_bits)
        b0 = w.view(np.uint8)[:, 0].astype(np.uint32)
        assert np.array_equal(b0 & 7, codes[:, 0]) and np.array_equal((b0 >> 3) & 7, codes[:, 1])
        b1 = w.view(np.uint8)[:, 1].astype(np.uint32)
        assert np.array_equal(((b0 >> 6) & 3) | ((b1 & 1) << 2), codes[:, 2])
    else:
        pf = 32 // bits
        assert np.array_equal((w[:, 0] >> (bits * (pf - 1))) & (2**bits - 1), codes[:, pf - 1])


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("bits,group", [(2, 32), (3, 32), (3, 64), (4, 32), (8, 32)])
def test_round_trip_through_numpy_mlx_dequantization(tmp_path, bits, group, exact):
    from eqat_cli.formats.mlx import dequantize, write
    from eqat_cli.quant.linear import PackedLinear

    model = quantized_tiny(bits, group, intermediate_size=128)
    out = tmp_path / "mlx"
    out.mkdir()
    info = write(model, byte_level_tokenizer(), out, exact=exact)
    tensors, cfg = read_dir(out)
    ng = 0
    for name, m in model.named_modules():
        if not isinstance(m, PackedLinear):
            continue
        g = m.in_features if m.group_size == -1 else m.group_size
        q = cfg["quantization"].get(name, cfg["quantization"])
        assert (q["bits"], q["group_size"]) == (bits, g), name
        w = tensors[f"{name}.weight"]
        assert w.dtype == np.uint32 and tensors[f"{name}.scales"].dtype == np.float16
        got = torch.from_numpy(dequantize(w, tensors[f"{name}.scales"], tensors[f"{name}.biases"], bits, g))
        ref = m.dequantize(torch.float32)
        if exact:
            assert torch.equal(got, ref), name
        else:
            sz = (m.zero_points().t().float() * m.scales.t().float()).repeat_interleave(g, 1)
            assert bool(((got - ref).abs() <= sz.abs() * 2.0**-11).all()), name
        ng += 1
    assert ng == 14
    assert cfg["quantization"]["mode"] == "affine" and cfg["quantization_config"] == cfg["quantization"]
    assert cfg["rope_theta"] == pytest.approx(10000.0) and cfg["tie_word_embeddings"] is False
    assert tensors["model.embed_tokens.weight"].dtype == np.float16 and "lm_head.weight" in tensors
    assert (tmp_path / "mlx" / "tokenizer.json").exists()
    assert info["biases_dtype"] == ("float32" if exact else "float16")


@pytest.mark.parametrize("key", ["qwen2", "qwen3", "gemma3", "mistral"])
def test_every_arch_via_pack_cli(tmp_path, key):
    from eqat_cli.formats.mlx import dequantize
    from eqat_cli.quant.linear import PackedLinear
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    config = TINY_CONFIGS[key](vocab_size=320)
    model = rtn_quantize_model(build(config), get_registry().architecture_for(config.model_type), QuantScheme(4, 32))
    src = save_native_dir(model, byte_level_tokenizer(), tmp_path / "src")
    res = invoke("pack", src, "--format", "mlx", "-o", tmp_path / "mlx")
    assert res.exit_code == 0, res.output
    tensors, cfg = read_dir(tmp_path / "mlx")
    if key == "gemma3":  # mlx-lm's gemma3_text reads these top-level keys
        assert (cfg["sliding_window_pattern"], cfg["rope_theta"], cfg["rope_local_base_freq"]) == (6, 1e6, 1e4)
        assert "lm_head.weight" not in tensors  # tied: mlx-lm's sanitize ties when absent
    if key == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in tensors
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            got = dequantize(tensors[f"{name}.weight"], tensors[f"{name}.scales"], tensors[f"{name}.biases"], 4, 32)
            ref = m.dequantize(torch.float32).numpy()
            assert np.abs(got - ref).max() <= 2.0**-11 * np.abs(ref).max() * 16, name
    from eqat_cli.formats.checkpoint import detect_format

    assert detect_format(tmp_path / "mlx") == "other (mlx)"


def test_mixed_layers_get_per_layer_entries(tmp_path):
    from eqat_cli.formats.mlx import check

    model = quantized_tiny(2, 32)
    model.model.layers[1].mlp.down_proj = random_packed_layer(96, 64, 4, 32)
    plan = check(model)
    assert (plan.bits, plan.group_size) == (2, 32)
    assert plan.per_layer == {"model.layers.1.mlp.down_proj": {"group_size": 32, "bits": 4}}


def test_refuses_what_mlx_cannot_hold(tmp_path):
    tok = byte_level_tokenizer()
    cases = {
        "ragged": (save_native_dir(quantized_tiny(4, 64), tok, tmp_path / "ragged"),
                   "model.layers.0.mlp.down_proj has in_features 96, not a multiple of group size 64"),
        "g16": (save_native_dir(quantized_tiny(2, 16), tok, tmp_path / "g16"), "group size 16 is not one mlx supports"),
    }
    for what, (src, msg) in cases.items():
        res = invoke("pack", src, "--format", "mlx", "-o", tmp_path / f"out-{what}")
        lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("error:")]
        assert res.exit_code == 2 and len(lines) == 1, res.output
        assert msg in " ".join(res.output.split()), res.output
        assert not (tmp_path / f"out-{what}").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    from eqat_cli.errors import UnsupportedError
    from eqat_cli.formats.mlx import check

    llama3 = quantized_tiny(4, 32, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 64})
    with pytest.raises(UnsupportedError, match="rope scaling 'llama3'"):
        check(llama3)
