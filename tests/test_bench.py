"""``eqat bench``: JSON structure, exact weight bytes, ratio math, the backend line, bad input.

Timings are never asserted (they are measurements, not tests): only that every figure is a
median with its spread over the requested number of runs.
"""

from __future__ import annotations

import shutil
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import build, save_tiny, tiny_llama_config, tiny_tokenizer
from eqat_cli.cli.app import build_app
from eqat_cli.quant.linear import PackedLinear
from eqat_cli.scheme import QuantScheme

FAST = ["--repeats", "2", "--prefill-tokens", "8", "--new-tokens", "4"]


def invoke(*args):
    return CliRunner().invoke(build_app(), list(args), prog_name="eqat")


def expected_packed_bytes(k: int, n: int, bits: int, group: int) -> int:
    """qweight + qzeros + scales + g_idx of a PackedLinear of this shape (its own buffers)."""
    layer = PackedLinear(k, n, QuantScheme(bits, group))
    return sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales, layer.g_idx))


def check_stats(s: dict, runs: int, unit: str) -> None:
    assert s["unit"] == unit and s["runs"] == runs and len(s["values"]) == runs
    assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    assert s["min"] == min(s["values"]) and s["max"] == max(s["values"])
    assert math.isclose(s["iqr"], s["q3"] - s["q1"])


def check_layers(data: dict, bits: int, group: int, batches: list[int], runs: int) -> None:
    for e in data["layers"]:
        k, n = e["in_features"], e["out_features"]
        wb = e["weight_bytes"]
        assert wb["dense"] == k * n * 4  # fp32 on CPU
        assert wb["packed"] == expected_packed_bytes(k, n, bits, group)
        assert wb["packed"] == sum(wb["packed_parts"].values())
        assert math.isclose(e["memory_ratio"], wb["packed"] / wb["dense"])
        assert math.isclose(e["compression"], wb["dense"] / wb["packed"])
        assert math.isclose(e["bits_per_weight"], 8 * wb["packed"] / (k * n))
        assert wb["kernel_cache"] >= 0
        assert e["kernel_rel_error"] < 1e-4  # the kernel computes what the codes say
        assert [r["tokens"] for r in e["batches"]] == batches
        for r in e["batches"]:
            check_stats(r["dense"], runs, "ms")
            check_stats(r["quant"], runs, "ms")
            assert math.isclose(r["time_ratio"], r["quant"]["median"] / r["dense"]["median"])
    tot = data["model_totals"]
    per_block_dense = sum(e["weight_bytes"]["dense"] * len(e["names"]) for e in data["layers"])
    per_block_packed = sum(e["weight_bytes"]["packed"] * len(e["names"]) for e in data["layers"])
    assert tot["dense_bytes"] == per_block_dense * tot["num_layers"]
    assert tot["packed_bytes"] == per_block_packed * tot["num_layers"]
    assert math.isclose(tot["memory_ratio"], per_block_packed / per_block_dense)
    ratios = [r["time_ratio"] for e in data["layers"] for r in e["batches"] if r["tokens"] == 1]
    assert math.isclose(data["summary"]["decode_time_ratio_max"], max(ratios))
    assert math.isclose(data["summary"]["memory_ratio_max"], max(e["memory_ratio"] for e in data["layers"]))


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 32), (4, -1)])
def test_tiny_preset_json_bytes_and_ratios(bits, group):
    res = invoke("bench", "--bits", str(bits), "--group", str(group), "--shapes", "tiny", *FAST,
                 "--json", "-")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data) >= {"config", "machine", "backend", "shapes", "layers", "model_totals",
                         "summary", "generation", "measured"}
    # Which backend ran and why: the registry's own explanation, printed and recorded.
    from eqat_cli.registry import get_registry

    spec, why = get_registry().select_backend("auto", bits, "cpu")
    assert data["backend"]["name"] == spec.name and data["backend"]["why"] == why
    assert f"backend: {why}" in res.output.replace("\n", " ") or f"backend: {why}" in res.stderr
    assert {c["name"] for c in data["backend"]["candidates"]} >= {"torch", "triton"}
    # Machine info.
    m = data["machine"]
    assert m["torch"] == torch.__version__ and m["threads"] >= 1 and m["cpu_model"]
    # The tiny preset's distinct shapes (GQA k/v: 2 heads of 32).
    shapes = {(e["in_features"], e["out_features"]): e["label"] for e in data["layers"]}
    assert shapes == {
        (128, 128): "q_proj,o_proj", (128, 64): "k_proj,v_proj",
        (128, 320): "gate_proj,up_proj", (320, 128): "down_proj",
    }
    assert data["config"]["repeats_layers"] == 2 and data["config"]["batches"] == [1, 8]
    check_layers(data, bits, group, [1, 8], runs=2)
    assert data["generation"] is None  # a preset has no model to run


def test_library_reports_progress_in_the_one_form():
    """``eqat_cli.benchmark`` reports through ``eqat_cli.progress.Progress``: counting events
    ``progress(event, {label, done, total})``, passed straight through by ``eqat bench``."""
    from eqat_cli.benchmark import BenchConfig, plan, run

    events = []
    cfg = BenchConfig(shapes="tiny", repeats=2, prefill_tokens=8, warmup=0, device="cpu")
    run(plan(cfg), lambda event, info: events.append((event, dict(info))))
    assert {e for e, _ in events} == {"shapes", "layer"}
    assert all(set(info) == {"label", "done", "total"} for _, info in events)
    assert events[0] == ("shapes", {"label": "tiny", "done": 0, "total": 4})
    assert events[-1] == ("shapes", {"label": "tiny", "done": 4, "total": 4})
    layer_ends = [i for e, i in events if e == "layer" and i["done"] == i["total"]]
    assert len(layer_ends) == 4 and all(i["total"] == 2 for i in layer_ends)  # batches 1 and 8


def test_llama_presets_resolve_to_published_shapes():
    from eqat_cli.benchmark import resolve_shapes

    l2 = {(s.in_features, s.out_features): s.names for s in resolve_shapes("llama-2-7b").shapes}
    assert set(l2) == {(4096, 4096), (4096, 11008), (11008, 4096)}
    assert len(l2[(4096, 4096)]) == 4
    l3 = resolve_shapes("llama-3-8b")
    assert {(s.in_features, s.out_features) for s in l3.shapes} == {
        (4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)
    }
    assert l3.num_layers == 32 and l3.model["num_key_value_heads"] == 8


def _linear_bytes(model, bits, group):
    """Dense and packed bytes of every decoder-block linear of ``model``, independently."""
    dense = packed = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
            dense += mod.weight.numel() * 4
            packed += expected_packed_bytes(mod.in_features, mod.out_features, bits, group)
    return dense, packed


def test_model_dir_generation_fp_vs_rtn(tmp_path):
    model = build(tiny_llama_config())
    path = save_tiny(model, tmp_path / "fp")
    out = tmp_path / "bench.json"
    res = invoke("bench", "--shapes", str(path), "--bits", "2", "--group", "32", *FAST,
                 "--json", str(out))
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["shapes"]["source"] == "model"
    want = {(m.in_features, m.out_features) for m in model.model.layers[0].modules()
            if isinstance(m, torch.nn.Linear)}
    assert {(e["in_features"], e["out_features"]) for e in data["layers"]} == want
    check_layers(data, 2, 32, [1, 8], runs=2)

    gen = data["generation"]
    fp, q = gen["variants"]["fp"], gen["variants"]["quant"]
    for v in (fp, q):
        assert v["new_tokens"] == 4
        check_stats(v["tokens_per_s"], 2, "tokens/s")
        check_stats(v["ms_per_token"], 2, "ms")
        assert set(v["rss"]) >= {"baseline", "after_load_delta", "load_peak_delta",
                                 "generate_peak_delta", "method"}
    # fp weight bytes: parameters + buffers of the loaded model (tied once).
    fresh = build(tiny_llama_config())
    params = sum(p.numel() * p.element_size() for p in fresh.parameters())
    buffers = sum(b.numel() * b.element_size() for b in fresh.buffers())
    assert fp["weight_bytes"]["total"] == params + buffers
    # Quantized in process: every block linear's fp32 weight replaced by its packed tensors.
    dense, packed = _linear_bytes(fresh, 2, 32)
    assert q["weight_bytes"]["packed_layers"] == packed
    assert q["weight_bytes"]["total"] == params + buffers - dense + packed
    assert q["bits"] == 2 and q["group"] == 32 and ("cpu" if shutil.which("g++") else "torch") in q["backend"]
    r = gen["ratios"]
    assert math.isclose(r["weight_bytes_quant_over_fp"], q["weight_bytes"]["total"] / fp["weight_bytes"]["total"])
    assert math.isclose(r["slowdown_fp_over_quant"], fp["tokens_per_s"]["median"] / q["tokens_per_s"]["median"])
    assert math.isclose(r["speed_quant_over_fp"] * r["slowdown_fp_over_quant"], 1.0)
    assert gen["notes"] == []


def _save_quantized(tmp_path, meta_source: str | None):
    from eqat_cli.formats.native import save_native
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    model = build(tiny_llama_config())
    fp_dir = save_tiny(model, tmp_path / "fp")
    rtn_quantize_model(model, get_registry().architecture("llama"), QuantScheme(4, 32))
    q_dir = tmp_path / "q"
    q_dir.mkdir()
    meta = {"bits": 4, "group_size": 32}
    if meta_source == "fp":
        meta["source_model"] = str(fp_dir)
    save_native(model, tiny_tokenizer(), q_dir, meta)
    return q_dir


@pytest.mark.parametrize("with_source", [True, False])
def test_quantized_dir_loaded_directly(tmp_path, with_source):
    q_dir = _save_quantized(tmp_path, "fp" if with_source else None)
    res = invoke("bench", "--shapes", str(q_dir), "--bits", "4", "--group", "32", *FAST,
                 "--json", "-")
    assert res.exit_code == 0, res.output
    gen = json.loads(res.stdout)["generation"]
    q = gen["variants"]["quant"]
    assert q["format"] == "eqat" and q["bits"] == 4 and q["group"] == 32
    if with_source:
        assert gen["variants"]["fp"]["source"] == str(tmp_path / "fp")
        assert "ratios" in gen and gen["notes"] == []
    else:
        assert "fp" not in gen["variants"] and "ratios" not in gen
        assert any("names no source model" in n for n in gen["notes"])
        assert "names no source model" in res.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--shapes", "no-such-model-xyz"], "neither a preset"),
        (["--shapes", "tiny", "--bits", "5"], "--bits must be >= 2 and <= 4 or 8, got 5"),
        (["--shapes", "tiny", "--group", "0"], "--group must be >= 2 or -1"),
        (["--shapes", "tiny", "--repeats", "1"], "--repeats"),
        (["--shapes", "tiny", "--backend", "nope"], "unknown backend"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    res = invoke("bench", *args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output


def test_triton_on_cpu_exits_2_with_reason():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may run Triton")
    res = invoke("bench", "--shapes", "tiny", "--backend", "triton")
    assert res.exit_code == 2 and "triton" in res.output


def test_summarize_median_and_quartiles():
    from eqat_cli.benchmark import summarize

    s = summarize([4.0, 1.0, 3.0, 2.0, 5.0], "ms")
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"], s["iqr"]) == (3.0, 1.0, 5.0, 2.0, 4.0, 2.0)
    assert s["values"] == [4.0, 1.0, 3.0, 2.0, 5.0] and s["runs"] == 5


def test_compare_backend_and_quantized_head(tmp_path):
    """``--compare-backend torch`` times the torch kernel on the same layers and model in the same
    run; ``--quantize-head 8`` packs the tied-or-not embedding and lm_head of the quantized model."""
    model = build(tiny_llama_config())
    path = save_tiny(model, tmp_path / "fp")
    out = tmp_path / "bench.json"
    res = invoke("bench", "--shapes", str(path), "--bits", "4", "--group", "32", *FAST,
                 "--compare-backend", "torch", "--quantize-head", "8", "--json", str(out))
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["backend"]["compare"] == (["torch"] if data["backend"]["name"] != "torch" else [])
    for name in data["backend"]["compare"]:
        for e in data["layers"]:
            for r in e["batches"]:
                check_stats(r[name], 2, "ms")
        assert "decode_time_ratio_max_torch" in data["summary"]
        gen = data["generation"]
        assert gen["variants"]["quant-torch"]["new_tokens"] == 4
        assert "speed_quant_torch_over_fp" in gen["ratios"]
    q = data["generation"]["variants"]["quant"]
    assert q["head_bits"] == 8
    # The 272 x 64 embedding and lm_head, fp32 before, now packed 8-bit (untied: two tables).
    dense, packed = _linear_bytes(build(tiny_llama_config()), 4, 32)
    fp_total = data["generation"]["variants"]["fp"]["weight_bytes"]["total"]
    assert q["weight_bytes"]["total"] < fp_total - dense + packed - 2 * 272 * 64 * 2.5
    res = invoke("bench", "--shapes", "tiny", "--quantize-head", "5", *FAST)
    assert res.exit_code == 2 and "--quantize-head must be 4 or 8" in res.output
