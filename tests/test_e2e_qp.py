"""E2E-QP: only step sizes train, codes stay frozen; KD and next-token losses, multi-turn masking,
global batch, resume (in-process and after SIGKILL), data parallel over gloo, loss scaling."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, build, save_tiny, tiny_llama_config, tiny_tokenizer
from eqat_cli.errors import BadInputError
from eqat_cli.formats.native import save_native
from eqat_cli.quantize import rtn_quantize_model
from eqat_cli.registry import get_registry
from eqat_cli.train.amp import Amp
from eqat_cli.train.calib import build_windows
from eqat_cli.train.e2e_qp import E2EConfig, evaluate_loss, loss_sums, run_e2e_qp
from eqat_cli.train.sft_data import IGNORE, Examples, from_windows, load_instruct
from eqat_cli.scheme import QuantScheme

TEXT = [f"Story {i}: " + " ".join(f"tok{(i * 3 + j) % 17}" for j in range(80)) for i in range(60)]


@pytest.fixture
def fp_dir(tmp_path):
    return save_tiny(build(tiny_llama_config()), tmp_path / "fp")


@pytest.fixture
def quant_dir(tmp_path, fp_dir):
    model = build(tiny_llama_config())  # the same weights as fp_dir
    rtn_quantize_model(model, get_registry().architecture_for("llama"), QuantScheme(2, 32))
    d = tmp_path / "q"
    d.mkdir()
    save_native(model, tiny_tokenizer(), d, {"bits": 2, "group_size": 32, "architecture": "llama",
                                             "source_model": str(fp_dir)})
    return d


def data(n=8, val=4, seqlen=32):
    w = build_windows(TEXT, tiny_tokenizer(), n, seqlen, val, 0, source="synthetic")
    return from_windows(w.train, w.meta), from_windows(w.val, w.meta)


def train(quant_dir, out, cfg, teacher=None, **kw):
    from eqat_cli.models import resolve

    lm = resolve(str(quant_dir))
    tr, va = data()
    return run_e2e_qp(lm.model, lm.tokenizer, tr, va, cfg, out, torch.device("cpu"), 2,
                      {"bits": 2, "group_size": 32}, teacher=teacher, **kw), lm


def ntp(**kw):
    return E2EConfig(loss="ntp", **kw)


def test_defaults_are_the_papers():
    cfg = E2EConfig()
    assert (cfg.global_batch, cfg.epochs, cfg.warmup_ratio, cfg.max_grad_norm, cfg.weight_decay) == (32, 1, 0.03, 0.3, 0.0)
    assert cfg.resolved_lr(2) == 2e-5 and cfg.resolved_lr(4) == 1e-5 and cfg.eval_steps == 64
    assert cfg.micro_batches(1) == (4, 8) and cfg.micro_batches(2) == (4, 4) and cfg.micro_batches(8) == (4, 1)
    assert E2EConfig(global_batch=2).micro_batches(1) == (2, 1)
    with pytest.raises(BadInputError, match="not divisible"):
        cfg.micro_batches(3)
    with pytest.raises(BadInputError, match="multiple of --batch-size"):
        E2EConfig(global_batch=6, batch_size=4).micro_batches(1)


def test_only_scales_train_and_loss_drops(quant_dir, tmp_path):
    from eqat_cli.models import resolve

    tr, va = data()
    before = evaluate_loss(resolve(str(quant_dir)).model, va, 2, torch.device("cpu"))
    # fp32: the baseline held-out loss below must equal evaluate_loss's (fp32) to 1e-5
    res, _ = train(quant_dir, tmp_path / "e2e", ntp(epochs=3, lr=5e-3, global_batch=2, warmup_ratio=0.0,
                                                    precision="fp32"))
    after = evaluate_loss(resolve(str(res.output)).model, va, 2, torch.device("cpu"))
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
    res, _ = train(quant_dir, tmp_path / "e2e0", ntp(epochs=1, lr=0.0, global_batch=2))
    a, b = load_file(str(quant_dir / "model.safetensors")), load_file(str(res.output / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_zeros_repacked_in_range(quant_dir, tmp_path):
    from eqat_cli.models import resolve
    from eqat_cli.quant.linear import PackedLinear

    res, _ = train(quant_dir, tmp_path / "z", ntp(epochs=2, lr=0.5, global_batch=2, train_zeros=True,
                                                   max_grad_norm=None))
    lm = resolve(str(res.output))
    zs = [m.zero_points() for m in lm.model.modules() if isinstance(m, PackedLinear)]
    assert all(int(z.min()) >= 0 and int(z.max()) <= 3 for z in zs)
    a, b = load_file(str(quant_dir / "model.safetensors")), load_file(str(res.output / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith(".qzeros"))


def _student_teacher(quant_dir, fp_dir):
    from eqat_cli.models import resolve

    return resolve(str(quant_dir)).model, resolve(str(fp_dir)).model


def _ragged_batch():
    """Three examples of different lengths, some positions not learned: padded per batch."""
    tok = tiny_tokenizer()
    ids = [torch.tensor(tok(t[:n])["input_ids"]) for t, n in zip(TEXT, (40, 25, 33))]
    labels = [x.clone() for x in ids]
    labels[0][:10] = IGNORE
    labels[2][5:12] = IGNORE
    return Examples(ids, labels, {}, pad_id=0)


def test_kd_loss_equals_reference_kl(quant_dir, fp_dir):
    student, teacher = _student_teacher(quant_dir, fp_dir)
    ex = _ragged_batch()
    ids, labels, mask = ex.collate([0, 1, 2])
    assert ids.shape == (3, 40) and int(mask.sum()) == 98  # padded to the longest in the batch only
    with torch.no_grad():
        obj, nll, n = loss_sums(student, ids, labels, mask, teacher)
        ls = F.log_softmax(student(input_ids=ids, attention_mask=mask).logits.double(), -1)[:, :-1]
        lt = F.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.double(), -1)[:, :-1]
        hf = student(input_ids=ids, attention_mask=mask, labels=labels).loss
    sel = labels[:, 1:] != IGNORE
    ref_kl = (lt.exp() * (lt - ls)).sum(-1)[sel].sum()
    ref_nll = -ls.gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0][sel].sum()
    assert n == int(sel.sum()) == ex.n_targets([0, 1, 2]) == 98 - 3 - 9 - 7  # first tokens; 10 masked incl. a first one; 7
    assert float(obj) > 0
    torch.testing.assert_close(obj.double(), ref_kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(nll.double(), ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll / n, hf, rtol=1e-5, atol=1e-6)  # same as transformers' LM loss
    # The FP model distilled into itself: zero.
    with torch.no_grad():
        self_kl, _, _ = loss_sums(teacher, ids, labels, mask, teacher)
    assert abs(float(self_kl)) < 1e-4


def test_kd_loss_chunked_gradient_equals_unchunked(quant_dir, fp_dir, monkeypatch):
    import eqat_cli.train.e2e_qp as e2e
    import eqat_cli.train.e2e_qp.losses as e2e_losses

    ex = _ragged_batch()
    ids, labels, mask = ex.collate([0, 1, 2])
    grads = []
    for chunk in (4096, 16):
        monkeypatch.setattr(e2e_losses, "LOGIT_CHUNK", chunk)
        student, teacher = _student_teacher(quant_dir, fp_dir)
        params = [p for m in e2e.trainable_layers(student).values() for p in m.start_training()]
        from eqat_cli.quant.torch_kernel import TORCH_KERNEL

        for m in e2e.trainable_layers(student).values():
            m.set_kernel(TORCH_KERNEL)
        obj, _, _ = loss_sums(student, ids, labels, mask, teacher)
        obj.backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_kd_training_lowers_held_out_kl(quant_dir, fp_dir, tmp_path):
    _, teacher = _student_teacher(quant_dir, fp_dir)
    res, _ = train(quant_dir, tmp_path / "kd", E2EConfig(epochs=3, lr=5e-3, global_batch=2, warmup_ratio=0.0),
                   teacher=teacher)
    assert res.val_loss[0][0] == 0 and res.val_loss[-1][1] < 0.9 * res.val_loss[0][1]  # KL
    assert len(res.val_loss[0]) == 3  # [step, KL, next-token loss]
    meta = json.loads((res.output / "config.json").read_text())["eqat"]["e2e_qp"]
    assert meta["loss"] == "kd" and meta["global_batch"] == 2
    with pytest.raises(BadInputError, match="needs the full-precision teacher"):
        train(quant_dir, tmp_path / "kd2", E2EConfig(global_batch=2))


def test_resume_equals_uninterrupted_and_state_is_safetensors(quant_dir, tmp_path):
    cfg = ntp(epochs=2, lr=5e-3, global_batch=2, save_steps=2, warmup_ratio=0.25)
    full, _ = train(quant_dir, tmp_path / "full", cfg)

    def stop(event, info):
        if event == "step" and info["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(quant_dir, tmp_path / "res", cfg, progress=stop)
    state = tmp_path / "res.partial" / "e2e_state.safetensors"
    with safe_open(str(state), framework="pt") as f:  # plain safetensors + a JSON header: no pickle
        meta = json.loads(f.metadata()["eqat_e2e_state"])
        keys = list(f.keys())
    assert meta["step"] == 4 and any(k.endswith("exp_avg_sq") for k in keys)
    res, _ = train(quant_dir, tmp_path / "res", cfg)
    assert res.resumed_from_step == 4
    for sub in ("", "last"):
        a = load_file(str(full.output / sub / "model.safetensors"))
        b = load_file(str(res.output / sub / "model.safetensors"))
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert res.train_loss == full.train_loss and res.val_loss == full.val_loss


def test_damaged_resume_state_is_one_clear_error(quant_dir, tmp_path):
    work = tmp_path / "dmg.partial"
    work.mkdir()
    (work / "e2e_state.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(BadInputError, match="damaged E2E-QP resume state.*--no-resume"):
        train(quant_dir, tmp_path / "dmg", ntp(global_batch=2))


CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _runs(labels, ids):
    """Contiguous runs of learned positions, as token lists."""
    runs, cur = [], []
    for lab, tok in zip(labels.tolist(), ids.tolist()):
        if lab == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == tok
            cur.append(tok)
    return runs + ([cur] if cur else [])


def test_multi_turn_masking_marks_exactly_the_assistant_tokens(tmp_path):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "six, I think"}, {"role": "user", "content": "thanks"}]
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": conv}) + "\n")
    for template in (CHATML, None):
        tok = tiny_tokenizer()
        tok.chat_template = template
        ex = load_instruct(p, tok, 512)
        ids, labels = ex.input_ids[0], ex.labels[0]
        runs = _runs(labels, ids)
        want = ["4</s>", "six, I think</s>"]
        assert [tok.decode(r) for r in runs] == want  # every assistant turn, nothing else
        assert int((labels != IGNORE).sum()) == sum(len(tok(w, add_special_tokens=False)["input_ids"]) for w in want)
        if template:
            assert tok.decode(ids) == tok.apply_chat_template(conv, tokenize=False)


def test_chat_template_that_is_not_a_prefix_is_refused(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello"}]}) + "\n")
    tok = tiny_tokenizer()
    tok.chat_template = "{{ messages|length }}" + CHATML  # renders a turn count first: not prefix-stable
    with pytest.raises(BadInputError, match=r"chat\.jsonl:1: .*assistant turn 2"):
        load_instruct(p, tok, 512)


def test_instruct_alpaca_masks_prompt_and_pads_per_batch(tmp_path):
    p = tmp_path / "sft.jsonl"
    p.write_text(
        json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}) + "\n"
    )
    tok = tiny_tokenizer()
    ex = load_instruct(p, tok, 256)
    assert len(ex) == 2 and len(ex.input_ids[0]) != len(ex.input_ids[1]) < 256  # not padded to --seqlen
    ids, labels, mask = ex.collate([0, 1])
    assert ids.shape[1] == max(len(ex.input_ids[0]), len(ex.input_ids[1]))
    learned = labels[0][labels[0] != IGNORE].tolist()
    assert learned == tok("hi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = int(mask[1].sum())
    assert (labels[1][n:] == IGNORE).all() and (mask[1][n:] == 0).all()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(BadInputError, match="bad.jsonl:1"):
        load_instruct(bad, tok, 64)


@pytest.mark.filterwarnings("ignore:.*GradScaler is enabled, but CUDA is not available")
def test_amp_choice_and_fp16_loss_scaling():
    from eqat_cli.device import cpu_has_bf16

    assert Amp.for_device("cpu", precision="fp32").dtype is None and Amp.for_device("cpu").scaler is None
    assert Amp.for_device("cpu").dtype == (torch.bfloat16 if cpu_has_bf16() else None)
    assert Amp.for_device("cuda", bf16_supported=True).dtype == torch.bfloat16
    amp = Amp.for_device("cuda", bf16_supported=False)
    assert amp.dtype == torch.float16 and amp.scaler is not None and amp.name == "fp16 + loss scaling"
    # On the CPU with a scaler: the step equals the unscaled one, an overflowing step is skipped.
    amp = Amp.fp16("cpu")
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ref = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt, opt_ref = torch.optim.SGD([w], lr=0.1), torch.optim.SGD([ref], lr=0.1)
    amp.backward((w * torch.tensor([3.0, 4.0])).sum())
    assert float(w.grad[0]) == 3.0 * amp.scaler.get_scale()
    amp.unscale_(opt)
    assert w.grad.tolist() == [3.0, 4.0]
    assert amp.step(opt)
    (ref * torch.tensor([3.0, 4.0])).sum().backward()
    opt_ref.step()
    assert torch.equal(w, ref)
    before, scale = w.detach().clone(), amp.scaler.get_scale()
    opt.zero_grad()
    amp.backward((w * torch.tensor([float("inf"), 1.0])).sum())
    amp.unscale_(opt)
    assert not amp.step(opt) and torch.equal(w, before) and amp.scaler.get_scale() < scale
    assert json.loads(json.dumps(amp.state_dict()))["scale"] == amp.scaler.get_scale()


def test_torch_kernel_trains_through_an_autocast_matmul(quant_dir):
    """While step sizes train under bf16 autocast, the torch kernel multiplies by the dequantized
    weight in bf16 (the reference kernel's math, autocast); its step-size gradient stays close to
    the fp32 streaming path's."""
    from eqat_cli.models import resolve
    from eqat_cli.quant.linear import PackedLinear
    from eqat_cli.quant.torch_kernel import TORCH_KERNEL

    layer = next(m for m in resolve(str(quant_dir)).model.modules() if isinstance(m, PackedLinear))
    layer.set_kernel(TORCH_KERNEL)
    layer.start_training()
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))

    def forward_backward(autocast):
        layer.scales.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        (y.float() ** 2).sum().backward()
        return y.detach(), layer.scales.grad.clone()

    y32, g32 = forward_backward(False)
    y16, g16 = forward_backward(True)
    assert y32.dtype == torch.float32 and y16.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(y16, F.linear(x, layer.dequantize(torch.float32)))
    assert float((y16.float() - y32).norm() / y32.norm()) < 0.02
    assert float((g16 - g32).norm() / g32.norm()) < 0.05


def test_precision_bf16_trains_and_is_recorded(quant_dir, tmp_path):
    with pytest.raises(BadInputError, match="--precision must be one of"):
        E2EConfig(precision="fp8")
    res, _ = train(quant_dir, tmp_path / "bf16", ntp(epochs=3, lr=5e-3, global_batch=2, warmup_ratio=0.0,
                                                    precision="bf16"))
    assert res.val_loss[-1][1] < res.val_loss[0][1]
    meta = json.loads((res.output / "config.json").read_text())["eqat"]["e2e_qp"]
    assert meta["precision"] == "bf16" and meta["amp"] == "bf16"


def _cli(args, nproc=None, env_extra=None, popen=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "eqat_cli", *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "eqat_cli", *args]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def test_data_parallel_gloo_keeps_the_global_batch(quant_dir, tmp_path):
    """--global-batch 4 --batch-size 1: 1 process accumulates 4, 2 processes 2 each; same run (KD)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(TEXT))
    common = [str(quant_dir), "--dataset", str(corpus), "--seqlen", "32", "--samples", "8", "--val-samples", "2",
              "--lr", "5e-3", "--no-gradient-checkpointing", "--device", "cpu", "--global-batch", "4",
              "--batch-size", "1"]
    runs = {}
    for nproc in (None, 2):
        name = f"p{nproc or 1}"
        r = _cli(["e2e-qp", *common, "-o", str(tmp_path / name), "--json", str(tmp_path / f"{name}.json")], nproc=nproc)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    one, two = runs["p1"], runs["p2"]
    assert (one["world_size"], one["global_batch"], one["micro_batch"], one["grad_accum"]) == (1, 4, 1, 4)
    assert (two["world_size"], two["global_batch"], two["micro_batch"], two["grad_accum"]) == (2, 4, 1, 2)
    assert one["steps"] == two["steps"] == 2 and one["loss"] == "kd"
    torch.testing.assert_close(torch.tensor(two["train_loss"]), torch.tensor(one["train_loss"]), rtol=1e-5, atol=0)
    a = load_file(str(tmp_path / "p1" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "p2" / "last" / "model.safetensors"))
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


def _state_step(path):
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["eqat_e2e_state"])["step"]
    except Exception:  # not there yet, or being replaced
        return -1


def test_sigkill_mid_run_then_resume_is_bit_identical(quant_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(TEXT))
    args = ["e2e-qp", str(quant_dir), "--dataset", str(corpus), "--seqlen", "32", "--samples", "160",
            "--val-samples", "2", "--lr", "5e-3", "--no-gradient-checkpointing", "--device", "cpu",
            "--global-batch", "1", "--save-steps", "3", "--eval-steps", "40", "--loss", "ntp"]
    ref = _cli([*args, "-o", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "run"
    state = tmp_path / "run.partial" / "e2e_state.safetensors"
    proc = _cli([*args, "-o", str(out)], popen=True)
    deadline = time.time() + 300
    while _state_step(state) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = _state_step(state)
    assert 6 <= killed_at < 160 and not out.exists()
    again = _cli([*args, "-o", str(out), "--json", str(tmp_path / "again.json")])
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "again.json").read_text())["resumed_from_step"] >= killed_at
    for sub in ("", "last"):
        a = load_file(str(tmp_path / "ref" / sub / "model.safetensors"))
        b = load_file(str(out / sub / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert (out / "e2e_history.json").read_text() == (tmp_path / "ref" / "e2e_history.json").read_text()
    assert not (tmp_path / "run.partial").exists()


def test_cli_rejects_full_precision_and_bad_options(tmp_path, fp_dir):
    r = _cli(["e2e-qp", str(fp_dir), "--dataset", "c4", "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "not quantized" in r.stderr
    r = _cli(["e2e-qp", str(fp_dir), "--dataset", "c4", "--format", "chat", "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "--format must be pt or instruct" in r.stderr
    r = _cli(["e2e-qp", str(fp_dir), "--dataset", "c4", "--loss", "mse", "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "--loss must be one of ntp, kd" in r.stderr
    r = _cli(["e2e-qp", str(fp_dir), "--dataset", "c4", "--global-batch", "6", "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "multiple of --batch-size" in r.stderr
    assert not (tmp_path / "o").exists()


def test_library_prepares_the_run_from_a_model_spec(quant_dir, fp_dir, tmp_path):
    """`eqat e2e-qp` is one library call: load the student and the teacher (the recorded source),
    check the checkpoint, report what is about to run, train; it never prints."""
    from eqat_cli.train.e2e_qp_runner import e2e_qp_from_spec

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(TEXT))
    cfg = E2EConfig(global_batch=4, batch_size=2, gradient_checkpointing=False)
    kw = dict(seqlen=32, samples=8, val_samples=2, device="cpu")
    events = []
    res = e2e_qp_from_spec(str(quant_dir), str(corpus), tmp_path / "o", cfg,
                           progress=lambda event, info: events.append((event, info)), **kw)
    assert events[0] == ("prepared", {"rank": 0, "world_size": 1, "device": "cpu", "loss": "kd", "train": 8, "val": 2,
                                      "seqlen": 32, "lr": 2e-5, "global_batch": 4, "micro_batch": 2, "grad_accum": 2})
    assert {e for e, _ in events} >= {"start", "step", "eval"}
    assert (res.rank, res.world_size, res.steps) == (0, 1, 2) and (tmp_path / "o" / "last").is_dir()
    with pytest.raises(BadInputError, match="the teacher must be full precision"):
        e2e_qp_from_spec(str(quant_dir), str(corpus), tmp_path / "o2", cfg, teacher=str(quant_dir), **kw)
    with pytest.raises(BadInputError, match="is not quantized; run `eqat block-ap` first"):
        e2e_qp_from_spec(str(fp_dir), str(corpus), tmp_path / "o3", cfg, **kw)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_training_examples_pt_and_instruct(tmp_path):
    """E2E-QP's data in one library call: windows drawn on the fly (pt) or an instruction file
    whose last examples are held out (instruct)."""
    from eqat_cli.train.sft_data import training_examples

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXT))
    tok = tiny_tokenizer()
    train_ex, val_ex = training_examples(str(corpus), tok, "pt", samples=8, seqlen=32, val_samples=4, seed=0)
    from eqat_cli.data import read_corpus

    w = build_windows(read_corpus(str(corpus)), tok, 8, 32, 4, 0, source=str(corpus))
    assert len(train_ex) == 8 and len(val_ex) == 4
    assert torch.equal(torch.stack(train_ex.input_ids), w.train) and torch.equal(torch.stack(val_ex.input_ids), w.val)
    p = tmp_path / "sft.jsonl"
    p.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i} said"}) + "\n" for i in range(10)))
    train_ex, val_ex = training_examples(str(p), tok, "instruct", samples=5, seqlen=512, val_samples=3)
    first8 = load_instruct(p, tok, 512).input_ids[:8]  # the first 8 examples, the last 3 held out
    assert len(train_ex) == 5 and len(val_ex) == 3
    assert all(torch.equal(a, b) for a, b in zip(train_ex.input_ids + val_ex.input_ids, first8))
    with pytest.raises(BadInputError, match="--format must be pt or instruct"):
        training_examples(str(p), tok, "chat")
