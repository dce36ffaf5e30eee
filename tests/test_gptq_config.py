"""The GPTQ ``quantization_config`` eqat writes, parsed by the loaders' own config code on CPU
(issue #27): transformers' ``GPTQConfig`` and GPTQModel's ``QuantizeConfig``. vLLM's parser cannot be
imported here (CUDA build); docs/FORMATS.md, "GPTQ for GPU runtimes", says what was checked by reading
its source instead. T-MAC's converter needs one group size for every layer and no act-order: eqat
never writes act-order and refuses mixed group sizes (tested below)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO, random_packed_layer
from test_pack import byte_level_tokenizer, invoke, quantized_tiny, save_native_dir

from eqat_cli.scheme import QuantScheme


@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_transformers_gptq_config_reads_what_eqat_writes(bits, version):
    from transformers import GPTQConfig

    from eqat_cli.formats.gptq import quantization_config

    qc = quantization_config(QuantScheme(bits, 64), version, {"source": "x"})
    cfg = GPTQConfig.from_dict(qc)
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act) == (bits, 64, False, False)
    assert cfg.format == version  # transformers keeps checkpoint_format as `format`
    assert cfg.meta["quantizer"][0].startswith("eqat:")


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="gptqmodel is not installed")
def test_gptqmodel_quantize_config_reads_what_eqat_writes(tmp_path):
    """In a subprocess: importing gptqmodel changes process-wide settings."""
    from eqat_cli.formats.gptq import quantization_config

    cases = {f"{b}-{v}": quantization_config(QuantScheme(b, 32), v) for b in (2, 3, 4) for v in ("gptq", "gptq_v2")}
    code = (
        "import json, sys\n"
        "from gptqmodel.quantization.config import QuantizeConfig\n"
        "out = {}\n"
        "for k, qc in json.loads(sys.argv[1]).items():\n"
        "    q = QuantizeConfig.from_quant_config(qc)\n"
        "    out[k] = [q.bits, q.group_size, q.sym, q.desc_act, str(q.format).split('.')[-1].lower()]\n"
        "print('RESULT' + json.dumps(out))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True, cwd=REPO)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT"))
    got = json.loads(line[len("RESULT"):])
    for k, (bits, group, sym, desc_act, fmt) in got.items():
        b, v = k.split("-")
        assert (bits, group, sym, desc_act, fmt) == (int(b), 32, False, False, v), k


def test_one_group_size_per_model_for_gptq_and_t_mac(tmp_path):
    model = quantized_tiny(2, 32)
    model.model.layers[1].mlp.up_proj = random_packed_layer(64, 96, 2, 16)
    src = save_native_dir(model, byte_level_tokenizer(), tmp_path / "src")
    res = invoke("pack", src, "--format", "gptq_v2", "-o", tmp_path / "g")
    assert res.exit_code == 2 and "one bit width and group size for every layer" in " ".join(res.output.split())
    assert "w2g16, w2g32" in res.output and not (tmp_path / "g").exists()
