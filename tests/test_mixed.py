"""Mixed precision (``eqat block-ap --avg-bits``, issue #28 item 3): the allocation under a bit
budget, the per-layer record in the checkpoint, and mixed widths packed and read back bit-exactly
through native, GPTQ (``quantization_config.dynamic``, read by GPTQModel's own parser) and GGUF
(one GGML type per tensor)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, build, random_packed_layer, save_tiny, tiny_llama_config, tiny_tokenizer
from test_block_ap import calib, run, tensors
from test_pack import byte_level_tokenizer, invoke, quantized_tiny, save_native_dir
from eqat_cli.errors import BadInputError
from eqat_cli.scheme import QuantScheme
from eqat_cli.train.block_ap import BlockAPConfig
from eqat_cli.train.block_ap.mixed import allocate


# ---------------------------------------------------------------------- allocation


def test_allocation_meets_the_budget_and_follows_sensitivity():
    """Four equal layers, one very sensitive, one insensitive: at 3 bits on average the sensitive
    one gets the most bits, the insensitive one the fewest, and the budget holds exactly."""
    params = {"a": 100, "b": 100, "c": 100, "d": 100}
    errors = {
        "a": {2: 100.0, 3: 10.0, 4: 1.0, 8: 0.0},  # very sensitive
        "b": {2: 10.0, 3: 3.0, 4: 1.0, 8: 0.0},
        "c": {2: 8.0, 3: 3.0, 4: 1.0, 8: 0.0},
        "d": {2: 0.01, 3: 0.005, 4: 0.001, 8: 0.0},  # insensitive
    }
    bits = allocate(params, errors, 3.0)
    assert sum(params[n] * b for n, b in bits.items()) <= 3.0 * 400
    assert bits["d"] == 2 and bits["a"] == max(bits.values()) and bits["a"] >= 4
    assert bits["b"] >= bits["c"] >= bits["d"]
    # The optimum of this small case by brute force: the greedy's total error is no worse.
    from itertools import product

    best = min(sum(errors[n][b] for n, b in zip(params, combo))
               for combo in product((2, 3, 4, 8), repeat=4) if sum(combo) * 100 <= 1200)
    assert sum(errors[n][b] for n, b in bits.items()) == pytest.approx(best)
    # Bigger layers cost more: with the same errors, the small one is upgraded first.
    sized = allocate({"big": 300, "small": 100}, {"big": errors["b"], "small": errors["b"]}, 2.25)
    assert sized == {"big": 2, "small": 3}
    # The ends of the range: everything at the smallest / largest width.
    assert set(allocate(params, errors, 2).values()) == {2}
    assert set(allocate(params, errors, 8).values()) == {8}
    # A layer whose error does not fall with more bits is never upgraded.
    flat = allocate({"x": 10, "y": 10}, {"x": {2: 1.0, 3: 1.0, 4: 1.0, 8: 1.0}, "y": errors["b"]}, 8)
    assert flat["x"] == 2 and flat["y"] == 8


def test_allocation_bad_inputs():
    errors = {"a": {2: 1.0, 3: 0.5, 4: 0.2, 8: 0.0}}
    for bad in (1.5, 8.5, True, "3"):
        with pytest.raises(BadInputError, match="--avg-bits"):
            allocate({"a": 10}, errors, bad)
    with pytest.raises(BadInputError, match="different layers"):
        allocate({"b": 10}, errors, 3)
    with pytest.raises(BadInputError, match="expected"):
        allocate({"a": 10}, {"a": {2: 1.0, 4: 0.1}}, 3)
    with pytest.raises(BadInputError, match="non-finite"):
        allocate({"a": 10}, {"a": {2: float("nan"), 3: 1.0, 4: 0.1, 8: 0.0}}, 3)
    with pytest.raises(BadInputError, match="--avg-bits"):
        BlockAPConfig(avg_bits=9)


# ---------------------------------------------------------------------- Block-AP


@pytest.fixture
def llama_dir(tmp_path):
    return save_tiny(build(tiny_llama_config()), tmp_path / "fp")


def test_block_ap_avg_bits_records_every_layer_and_resumes(llama_dir, tmp_path):
    from eqat_cli.formats.checkpoint import Checkpoint
    from eqat_cli.formats.native import load_packed_model

    cfg = BlockAPConfig(bits=2, group_size=32, avg_bits=3.0, steps=2)
    events = []
    full = run(llama_dir, tmp_path / "full", cfg, progress=lambda e, i: events.append((e, i)))
    mixed = [i for e, i in events if e == "mixed"]
    assert len(mixed) == 1 and mixed[0]["code_bits"] <= 3.0 + 1e-9
    assert len([1 for e, _ in events if e == "sensitivity"]) == 2  # one per block
    meta = Checkpoint.open(full.output).meta
    assert meta.scheme is None and len(meta.modules) == 14
    assert len({s.bits for s in meta.modules.values()}) > 1  # really mixed at this budget
    section = json.loads((full.output / "config.json").read_text())["eqat"]
    assert section["bits"] == sorted({s.bits for s in meta.modules.values()}) and section["group_size"] == 32
    assert section["block_ap"]["avg_bits"] == 3.0
    model, layers = load_packed_model(full.output)
    assert layers == meta.modules
    params = {n: m.in_features * m.out_features for n, m in model.named_modules() if hasattr(m, "qweight")}
    assert sum(params[n] * s.bits for n, s in meta.modules.items()) <= 3.0 * sum(params.values()) + 1e-6
    # Each block's summary names its widths.
    summary = json.loads((full.output / "blockap_summary.json").read_text())
    assert summary[0]["bits"] == {k[len("model.layers.0."):]: s.bits for k, s in meta.modules.items()
                                  if k.startswith("model.layers.0.")}

    # Resume: the allocation is measured once, kept in the work directory, and the result is identical.
    def stop_at_block_1(event, info):
        if event == "block_start" and info["block"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(llama_dir, tmp_path / "resumed", cfg, progress=stop_at_block_1)
    state = json.loads((tmp_path / "resumed.partial" / "blockap_state.json").read_text())
    assert state["mixed"]["modules"] == section["modules"]
    again = []
    res = run(llama_dir, tmp_path / "resumed", cfg, progress=lambda e, i: again.append(e))
    assert res.resumed_from == 1 and "sensitivity" not in again
    a, b = tensors(full.output), tensors(res.output)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- formats


def minmax_packed_layer(k, n, bits, group, seed=0):
    """A packed layer made by min-max quantizing a random weight."""
    from torch import nn

    from eqat_cli.quant.linear import QuantLinear

    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    return QuantLinear(lin, QuantScheme(bits, group)).to_packed()


def symmetric_w8_layer(k, n, group, seed=0):
    """An 8-bit layer whose zero points are 127 or 128 (``q - z`` fits int8: Q8_0 holds it exactly)."""
    from eqat_cli.quant.linear import PackedLinear

    g = torch.Generator().manual_seed(seed)
    ng = -(-k // group)
    zero = 127 + torch.randint(0, 2, (n, ng), generator=g)
    codes = torch.randint(0, 256, (n, k), generator=g)
    codes = torch.minimum(codes, zero.repeat_interleave(group, 1)[:, :k] + 127)  # zero 127: q - z <= 127
    scale = torch.rand(n, ng, generator=g) * 0.02 + 1e-3
    return PackedLinear.from_codes(codes, scale, zero, QuantScheme(8, group))


def mixed_tiny():
    """The tiny Llama at 2 bits with layers at 3, 4 and 8 bits (group 32 everywhere)."""
    model = quantized_tiny(2, 32)
    l0, l1 = model.model.layers[0], model.model.layers[1]
    l0.self_attn.q_proj = minmax_packed_layer(64, 64, 3, 32, seed=1)
    l0.mlp.down_proj = minmax_packed_layer(96, 64, 4, 32, seed=2)
    l1.self_attn.v_proj = symmetric_w8_layer(64, 32, 32, seed=3)
    l1.mlp.up_proj = minmax_packed_layer(64, 96, 3, 32, seed=4)
    return model


def packed(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "qweight")}


def assert_same_layers(a, b):
    pa, pb = packed(a), packed(b)
    assert set(pa) == set(pb)
    for n in pa:
        x, y = pa[n], pb[n]
        assert (x.bits, x.group_size) == (y.bits, y.group_size), n
        assert torch.equal(x.codes(), y.codes()) and torch.equal(x.zero_points(), y.zero_points()), n
        assert torch.equal(x.scales.half(), y.scales.half()), n


def test_mixed_widths_round_trip_native_gptq_gguf(tmp_path):
    from eqat_cli.formats.checkpoint import Checkpoint
    from eqat_cli.formats.gguf_export import read_gguf_metadata, read_gguf_tensors
    from eqat_cli.formats.native import load_packed_model

    model = mixed_tiny()
    tok = byte_level_tokenizer()
    src = save_native_dir(model, tok, tmp_path / "src")
    # eqat pack --format eqat records every layer's scheme (a model saved without them still reads by shape)
    assert invoke("pack", src, "--format", "eqat", "-o", tmp_path / "native").exit_code == 0
    meta = Checkpoint.open(tmp_path / "native").meta
    assert meta.modules["model.layers.1.self_attn.v_proj"] == QuantScheme(8, 32)
    assert meta.modules["model.layers.0.self_attn.k_proj"] == QuantScheme(2, 32)
    back, layers = load_packed_model(tmp_path / "native")
    assert_same_layers(model, back)

    for version in ("gptq_v2",):
        out = tmp_path / version
        res = invoke("pack", tmp_path / "native", "--format", version, "-o", out)
        assert res.exit_code == 0, res.output
        qc = json.loads((out / "quantize_config.json").read_text())
        assert qc["bits"] == 2 and qc["dynamic"] == {
            r"+:^model\.layers\.0\.mlp\.down_proj$": {"bits": 4},
            r"+:^model\.layers\.0\.self_attn\.q_proj$": {"bits": 3},
            r"+:^model\.layers\.1\.mlp\.up_proj$": {"bits": 3},
            r"+:^model\.layers\.1\.self_attn\.v_proj$": {"bits": 8},
        }
        assert Checkpoint.open(out).declared_modules == {
            "model.layers.0.mlp.down_proj": QuantScheme(4, 32), "model.layers.0.self_attn.q_proj": QuantScheme(3, 32),
            "model.layers.1.mlp.up_proj": QuantScheme(3, 32), "model.layers.1.self_attn.v_proj": QuantScheme(8, 32)}
        back, _ = load_packed_model(out)
        assert_same_layers(model, back)

    # GGUF: a type per tensor; Q4_0 (2/3-bit) and Q8_0 (8-bit) hold the weights exactly, Q4_1 (4-bit)
    # up to its fp16 minimum m = -z * s.
    res = invoke("pack", tmp_path / "native", "--format", "gguf", "-o", tmp_path / "m.gguf")
    assert res.exit_code == 0, res.output
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_k.weight"] == "Q4_0"
    assert types["blk.0.ffn_down.weight"] == "Q4_1" and types["blk.1.attn_v.weight"] == "Q8_0"
    assert read_gguf_metadata(tmp_path / "m.gguf")["eqat.bits"] == 2
    from eqat_cli.formats.gguf_export import permute_rows

    tensors_ = read_gguf_tensors(tmp_path / "m.gguf")
    for hf, g in (("model.layers.1.self_attn.v_proj", "blk.1.attn_v.weight"),
                  ("model.layers.1.mlp.up_proj", "blk.1.ffn_up.weight"),
                  ("model.layers.0.self_attn.k_proj", "blk.0.attn_k.weight")):
        want = packed(model)[hf].dequantize()
        if hf.endswith("k_proj"):
            want = permute_rows(want, 4, 2)
        assert np.array_equal(tensors_[g], want.numpy()), hf
    got = tensors_["blk.0.ffn_down.weight"]
    want = packed(model)["model.layers.0.mlp.down_proj"].dequantize().numpy()
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    # and eqat reads the file back (through transformers, as users load it) with the same weights
    from eqat_cli.formats.gguf_export import load_gguf_model

    loaded, _ = load_gguf_model(tmp_path / "m.gguf")
    for hf in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.gate_proj"):
        got = loaded.get_submodule(hf).weight.detach()
        assert torch.equal(got, packed(model)[hf].dequantize()), hf


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="gptqmodel is not installed")
def test_gptqmodel_reads_the_dynamic_widths(tmp_path):
    """GPTQModel's own QuantizeConfig parses the dynamic section eqat writes and gives every layer its
    width (in a subprocess: importing gptqmodel changes process-wide settings)."""
    from eqat_cli.formats.gptq import quantization_config

    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.10.mlp.down_proj",
             "model.layers.1.self_attn.v_proj"]
    qc = quantization_config(QuantScheme(2, 64), "gptq_v2", dynamic={"model.layers.0.mlp.down_proj": QuantScheme(4, 64),
                                                                    "model.layers.1.self_attn.v_proj": QuantScheme(8, 64)})
    code = (
        "import json, sys\n"
        "from gptqmodel.quantization.config import QuantizeConfig\n"
        "qc, names = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
        "q = QuantizeConfig.from_quant_config(qc)\n"
        "print('RESULT' + json.dumps({n: q.dynamic_get(n, 'bits', q.bits) for n in names}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, json.dumps(qc), json.dumps(names)], capture_output=True,
                       text=True, cwd=REPO)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line is not None, r.stderr[-2000:]
    got = json.loads(line[len("RESULT"):])
    # layers.10 must not match layers.1's pattern, nor layers.0's down_proj pattern match layers.10's
    assert got == {names[0]: 2, names[1]: 4, names[2]: 2, names[3]: 8}
    # eqat's own reading of the section agrees
    from eqat_cli.formats.detect import gptq_dynamic_bits

    assert {n: s.bits for n, s in gptq_dynamic_bits(qc, names).items()} == {names[1]: 4, names[3]: 8}


# ---------------------------------------------------------------------- refusals


def one_error_line(res) -> str:
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.output, res.output
    return " ".join(res.output.split())


def test_mixed_refusals_leave_nothing_behind(tmp_path):
    tok = byte_level_tokenizer()
    # An 8-bit layer whose q - z leaves int8 (zero points anywhere): Q8_0 cannot hold it exactly.
    model = mixed_tiny()
    model.model.layers[1].self_attn.o_proj = random_packed_layer(64, 64, 8, 32, seed=5)
    src = save_native_dir(model, tok, tmp_path / "w8")
    msg = one_error_line(invoke("pack", src, "--format", "gguf", "-o", tmp_path / "w8.gguf"))
    assert "model.layers.1.self_attn.o_proj" in msg and "Q8_0" in msg and "int8" in msg
    # Mixed widths and mixed group sizes: GPTQ has one group size (dynamic carries the widths).
    model = mixed_tiny()
    model.model.layers[1].mlp.gate_proj = minmax_packed_layer(64, 96, 4, 16)
    src = save_native_dir(model, tok, tmp_path / "groups")
    msg = one_error_line(invoke("pack", src, "--format", "gptq_v2", "-o", tmp_path / "g"))
    assert "one group size" in msg and "w4g16" in msg
    # MLX writes one scheme plus per-layer entries; the dense format has no widths at all: both fine.
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))
    # A malformed modules record is one line naming config.json.
    bad = tmp_path / "bad"
    src = save_native_dir(mixed_tiny(), tok, bad, meta={"method": "rtn"})
    cfg = json.loads((bad / "config.json").read_text())
    cfg["eqat"]["modules"] = {"model.layers.0.mlp.up_proj": "w5g32"}
    (bad / "config.json").write_text(json.dumps(cfg))
    msg = one_error_line(invoke("eval", bad, "--ppl", "wikitext2"))
    assert "config.json" in msg and "modules" in msg
    # --avg-bits outside the widths
    msg = one_error_line(invoke("block-ap", "smollm2", "--avg-bits", "1.5", "--dataset", "c4", "-o", tmp_path / "x"))
    assert "--avg-bits" in msg and not (tmp_path / "x").exists()
