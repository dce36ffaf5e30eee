"""E2E-QP: only step sizes train, codes stay frozen; masking, resume, data parallel over gloo."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, build, tiny_llama_config, tiny_tokenizer
from eqat_cli.formats.native import save_native
from eqat_cli.quantize import rtn_quantize_model
from eqat_cli.registry import get_registry
from eqat_cli.train.calib import build_windows
from eqat_cli.train.e2e_qp import E2EConfig, evaluate, run_e2e_qp
from eqat_cli.train.sft_data import IGNORE, from_windows, load_instruct

TEXT = [f"Story {i}: " + " ".join(f"tok{(i * 3 + j) % 17}" for j in range(80)) for i in range(60)]


@pytest.fixture
def quant_dir(tmp_path):
    model = build(tiny_llama_config())
    rtn_quantize_model(model, get_registry().architecture_for("llama"), 2, 32)
    d = tmp_path / "q"
    d.mkdir()
    save_native(model, tiny_tokenizer(), d, {"bits": 2, "group_size": 32, "architecture": "llama"})
    return d


def data(n=8, val=4, seqlen=32):
    w = build_windows(TEXT, tiny_tokenizer(), n, seqlen, val, 0, source="synthetic")
    return from_windows(w.train, w.meta), from_windows(w.val, w.meta)


def train(quant_dir, out, cfg, **kw):
    from eqat_cli.models import resolve

    lm = resolve(str(quant_dir))
    tr, va = data()
    return run_e2e_qp(lm.model, lm.tokenizer, tr, va, cfg, out, torch.device("cpu"), 2,
                      {"bits": 2, "group_size": 32}, **kw), lm


def test_only_scales_train_and_loss_drops(quant_dir, tmp_path):
    from eqat_cli.models import resolve

    tr, va = data()
    before = evaluate(resolve(str(quant_dir)).model, va, 2, torch.device("cpu"))
    cfg = E2EConfig(epochs=3, lr=5e-3, batch_size=2, warmup_ratio=0.0)
    res, _ = train(quant_dir, tmp_path / "e2e", cfg)
    after = evaluate(resolve(str(res.output)).model, va, 2, torch.device("cpu"))
    assert after < before
    a, b = load_file(str(quant_dir / "model.safetensors")), load_file(str(res.output / "model.safetensors"))
    changed = 0
    for k in a:
        if k.endswith((".qweight", ".qzeros", ".g_idx")) or not k.endswith(".scales"):
            assert torch.equal(a[k], b[k]), k  # codes, zeros, embeddings, norms frozen
        else:
            assert b[k].dtype == torch.float16
            changed += int(not torch.equal(a[k], b[k]))
    assert changed == 14
    cfgj = json.loads((res.output / "config.json").read_text())["eqat"]
    assert cfgj["e2e_qp"]["steps"] == res.steps == 12 and cfgj["e2e_selected"] == "best"
    assert res.val_loss[0][0] == 0 and res.val_loss[-1][1] < res.val_loss[0][1]  # baseline, then better
    assert res.val_loss[0][1] == pytest.approx(before, rel=1e-5)
    assert (res.output / "last" / "model.safetensors").exists()


def test_zero_lr_changes_nothing(quant_dir, tmp_path):
    res, _ = train(quant_dir, tmp_path / "e2e0", E2EConfig(epochs=1, lr=0.0, batch_size=2))
    a, b = load_file(str(quant_dir / "model.safetensors")), load_file(str(res.output / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_zeros_repacked_in_range(quant_dir, tmp_path):
    from eqat_cli.models import resolve
    from eqat_cli.quant.linear import PackedLinear

    res, _ = train(quant_dir, tmp_path / "z", E2EConfig(epochs=2, lr=0.5, batch_size=2, train_zeros=True,
                                                      max_grad_norm=None))
    lm = resolve(str(res.output))
    zs = [m.zero_points() for m in lm.model.modules() if isinstance(m, PackedLinear)]
    assert all(int(z.min()) >= 0 and int(z.max()) <= 3 for z in zs)
    a, b = load_file(str(quant_dir / "model.safetensors")), load_file(str(res.output / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith(".qzeros"))


def test_resume_equals_uninterrupted(quant_dir, tmp_path):
    cfg = E2EConfig(epochs=2, lr=5e-3, batch_size=2, save_steps=2, warmup_ratio=0.25)
    full, _ = train(quant_dir, tmp_path / "full", cfg)

    def stop(event, info):
        if event == "step" and info["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(quant_dir, tmp_path / "res", cfg, progress=stop)
    assert (tmp_path / "res.partial" / "e2e_state.pt").exists()
    res, _ = train(quant_dir, tmp_path / "res", cfg)
    assert res.resumed_from_step == 4
    a, b = load_file(str(full.output / "model.safetensors")), load_file(str(res.output / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_instruct_masks_prompt(tmp_path):
    p = tmp_path / "sft.jsonl"
    p.write_text(
        json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}) + "\n"
    )
    tok = tiny_tokenizer()
    ex = load_instruct(p, tok, 256)
    assert ex.input_ids.shape == (2, 256)
    for row, resp in zip(range(2), ["hi", "4"]):
        learned = ex.labels[row][ex.labels[row] != IGNORE].tolist()
        assert learned == tok(resp, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = int(ex.attention_mask[row].sum())
        assert (ex.labels[row][n:] == IGNORE).all()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    from eqat_cli.errors import BadInputError

    with pytest.raises(BadInputError, match="bad.jsonl:1"):
        load_instruct(bad, tok, 64)


def _cli(args, nproc=None, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "eqat_cli", *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "eqat_cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def test_data_parallel_gloo_matches_single_process(quant_dir, tmp_path):
    """2 processes x batch 1 == 1 process x batch 2 (same global batch): same final scales."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(TEXT))
    common = [str(quant_dir), "--dataset", str(corpus), "--seqlen", "32", "--samples", "8", "--val-samples", "2",
              "--lr", "5e-3", "--no-gradient-checkpointing", "--device", "cpu"]
    one = _cli(["e2e-qp", *common, "--batch-size", "2", "-o", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = _cli(["e2e-qp", *common, "--batch-size", "1", "-o", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_file(str(tmp_path / "one" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    base = load_file(str(quant_dir / "model.safetensors"))
    moved = 0
    for k in a:
        if k.endswith(".scales"):
            # fp16 storage: equal up to one fp16 ulp of the step size.
            torch.testing.assert_close(b[k].float(), a[k].float(), rtol=2e-3, atol=0)
            moved += int(not torch.equal(a[k], base[k]))
        else:
            assert torch.equal(a[k], b[k]), k
    assert moved > 0
    meta = json.loads((tmp_path / "two" / "config.json").read_text())["eqat"]["e2e_qp"]
    assert meta["world_size"] == 2


def test_cli_rejects_full_precision_and_bad_format(tmp_path):
    from conftest import save_tiny

    fp = save_tiny(build(tiny_llama_config()), tmp_path / "fp")
    r = _cli(["e2e-qp", str(fp), "--dataset", "c4", "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "not quantized" in r.stderr
    r = _cli(["e2e-qp", str(fp), "--dataset", "c4", "--format", "chat", "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "--format must be pt or instruct" in r.stderr
