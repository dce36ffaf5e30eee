"""Block-AP on tiny models: data flow as published, RTN baseline, resume, calibration files."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import build, save_tiny, tiny_llama_config, tiny_llava_config, tiny_mistral_config, tiny_tokenizer
from eqat_cli.errors import BadInputError
from eqat_cli.train.block_ap import BlockAPConfig, NonFiniteLossError, run_block_ap
from eqat_cli.train.calib import build_windows, check_tokenizer, load_calibration, save_calibration
from eqat_cli.scheme import QuantScheme

TEXT = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(60)) for i in range(40)]


def calib(n=8, seqlen=32, val=2, seed=0):
    return build_windows(TEXT, tiny_tokenizer(), n, seqlen, val, seed, source="synthetic")


@pytest.fixture
def llama_dir(tmp_path):
    return save_tiny(build(tiny_llama_config()), tmp_path / "fp")


def run(model_dir, out, cfg, c=None, **kw):
    c = c or calib()
    return run_block_ap(model_dir, tiny_tokenizer(), c.train, c.val, cfg, out, torch.device("cpu"), **kw)


def tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_epochs0_is_exactly_rtn(llama_dir, tmp_path):
    from eqat_cli.formats.native import load_packed_model, packed_state_dict
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    res = run(llama_dir, tmp_path / "rtn", BlockAPConfig.paper(bits=2, group_size=32, epochs=0))
    got = tensors(res.output)
    ref = build(tiny_llama_config())
    rtn_quantize_model(ref, get_registry().architecture_for("llama"), QuantScheme(2, 32))
    want = packed_state_dict(ref)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    cfg = json.loads((res.output / "config.json").read_text())
    assert cfg["eqat"]["method"] == "rtn" and cfg["eqat"]["bits"] == 2
    model, layers = load_packed_model(res.output)
    assert len(layers) == 14


def test_training_data_flow_and_loss_drop(llama_dir, tmp_path):
    """Block 1's starting loss equals MSE(RTN_block1(quantized chain), FP_block1(FP chain))."""
    from eqat_cli.formats.native import load_packed_model
    from eqat_cli.quantize import fake_quantize_block
    from eqat_cli.registry import get_registry

    c = calib()
    cfg = BlockAPConfig.paper(bits=2, group_size=32, epochs=2, batch_size=2, quant_lr=1e-3, weight_lr=1e-4)
    res = run(llama_dir, tmp_path / "q", cfg, c)
    blocks = res.blocks
    assert len(blocks) == 2
    for b in blocks:
        assert b["loss_after"] < b["loss_before"]  # training helps at 2 bits
        assert len(b["history"]["val_loss"]) == 2
    # Independent recomputation of block 1's starting point.
    arch = get_registry().architecture_for("llama")
    fp = build(tiny_llama_config())
    qmodel, _ = load_packed_model(res.output)
    val = c.val
    with torch.no_grad():
        h_fp = arch.embed(fp)(val)
        h_fp = arch.layers(fp)[0](h_fp, **arch.block_kwargs(fp, h_fp, 0))
        target = arch.layers(fp)[1](h_fp, **arch.block_kwargs(fp, h_fp, 1))
        h_q = arch.embed(fp)(val)
        h_q = arch.layers(qmodel)[0](h_q, **arch.block_kwargs(qmodel, h_q, 0))
        rtn1 = build(tiny_llama_config())
        b1 = arch.layers(rtn1)[1]
        fake_quantize_block(b1, arch, QuantScheme(2, 32))
        start = b1(h_q, **arch.block_kwargs(rtn1, h_q, b1))
    expected = float(torch.nn.functional.mse_loss(start, target))
    assert blocks[1]["loss_before"] == pytest.approx(expected, rel=1e-4)


def test_block_loss_numbers():
    from eqat_cli.train.block_ap import block_loss

    out = torch.zeros(1, 2, 2)
    target = torch.tensor([[[100.0, 0.0], [1.0, 1.0]]])  # token 0 is a "massive activation"
    assert float(block_loss(out, target, "mse")) == pytest.approx((100.0**2 + 2) / 4)
    # token-rel: each token's mean squared error / its target's mean square, then the token mean
    assert float(block_loss(out, target, "token-rel")) == pytest.approx(1.0)
    out2 = torch.tensor([[[99.0, 0.0], [0.0, 1.0]]])
    assert float(block_loss(out2, target, "token-rel")) == pytest.approx(((1 / 2) / 5000 + (1 / 2) / 1) / 2)
    with pytest.raises(BadInputError, match="unknown Block-AP loss"):
        BlockAPConfig.paper(loss="l1")


def test_token_rel_training_uses_its_loss_throughout(llama_dir, tmp_path):
    """With --loss token-rel the reported before/after/val losses are token-rel, and training lowers it."""
    from eqat_cli.quantize import fake_quantize_block
    from eqat_cli.registry import get_registry
    from eqat_cli.train.block_ap import block_loss

    c = calib()
    cfg = BlockAPConfig.paper(bits=2, group_size=32, epochs=2, quant_lr=1e-3, weight_lr=1e-4, loss="token-rel")
    res = run(llama_dir, tmp_path / "rel", cfg, c)
    assert all(b["loss_after"] < b["loss_before"] for b in res.blocks)
    arch = get_registry().architecture_for("llama")
    fp = build(tiny_llama_config())
    with torch.no_grad():
        h = arch.embed(fp)(c.val)
        target = arch.layers(fp)[0](h, **arch.block_kwargs(fp, h, 0))
        b0 = build(tiny_llama_config())
        blk = arch.layers(b0)[0]
        fake_quantize_block(blk, arch, QuantScheme(2, 32))
        start = blk(h, **arch.block_kwargs(b0, h, blk))
    assert res.blocks[0]["loss_before"] == pytest.approx(float(block_loss(start, target, "token-rel")), rel=1e-4)
    assert json.loads((res.output / "config.json").read_text())["eqat"]["block_ap"]["loss"] == "token-rel"


def test_resume_equals_uninterrupted(llama_dir, tmp_path):
    cfg = BlockAPConfig.paper(bits=3, group_size=32, epochs=1, quant_lr=1e-3, weight_lr=1e-4)
    full = run(llama_dir, tmp_path / "full", cfg)

    def stop_at_block_1(event, info):
        if event == "block_start" and info["block"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(llama_dir, tmp_path / "resumed", cfg, progress=stop_at_block_1)
    partial = tmp_path / "resumed.partial"
    assert (partial / "blockap_state.json").exists() and not (tmp_path / "resumed").exists()
    assert json.loads((partial / "blockap_state.json").read_text())["finished"] == [0]
    res = run(llama_dir, tmp_path / "resumed", cfg)
    assert res.resumed_from == 1 and not partial.exists()
    a, b = tensors(full.output), tensors(res.output)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_across_an_upgrade_that_added_options(llama_dir, tmp_path):
    """A work directory written before --init/--keep-best/--channel-scale existed resumes; a real change restarts."""
    cfg = BlockAPConfig.paper(bits=3, group_size=32, epochs=1, quant_lr=1e-3, weight_lr=1e-4)

    def stop_at_block_1(event, info):
        if event == "block_start" and info["block"] == 1:
            raise KeyboardInterrupt

    state_path = tmp_path / "out.partial" / "blockap_state.json"
    for drop, resumed in ((("init", "gptq_damp", "keep_best", "channel_scale"), 1), (("init",), 1), ((), 0)):
        with pytest.raises(KeyboardInterrupt):
            run(llama_dir, tmp_path / "out", cfg, progress=stop_at_block_1)
        state = json.loads(state_path.read_text())
        for k in drop:
            del state["run_key"]["config"][k]
        if not drop:  # a different setting, not a missing one
            state["run_key"]["config"]["init"] = "gptq"
        state_path.write_text(json.dumps(state))
        res = run(llama_dir, tmp_path / "out", cfg)
        assert res.resumed_from == resumed, drop
        shutil.rmtree(res.output)


def test_offload_to_disk_same_result(llama_dir, tmp_path):
    cfg = BlockAPConfig.paper(bits=2, group_size=32, epochs=1)
    a = tensors(run(llama_dir, tmp_path / "ram", cfg).output)
    b = tensors(run(llama_dir, tmp_path / "disk", BlockAPConfig.paper(bits=2, group_size=32, epochs=1, offload_to_disk=True)).output)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (tmp_path / "disk" / "activations").exists()


@pytest.mark.parametrize("cfg_fn", [tiny_mistral_config, tiny_llava_config])
def test_other_architectures(tmp_path, cfg_fn):
    from eqat_cli.models import resolve
    from eqat_cli.quant.linear import PackedLinear

    d = save_tiny(build(cfg_fn()), tmp_path / "fp")
    res = run(d, tmp_path / "q", BlockAPConfig.paper(bits=4, group_size=32, epochs=1))
    lm = resolve(str(res.output))
    assert lm.format == "eqat" and lm.quant["bits"] == 4
    packed = [n for n, m in lm.model.named_modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 14
    assert all(".layers." in n and "vision" not in n for n in packed)
    with torch.no_grad():
        assert torch.isfinite(lm.model(input_ids=torch.randint(0, 200, (1, 12))).logits).all()


def test_non_finite_loss_stops_cleanly(llama_dir, tmp_path):
    cfg = BlockAPConfig.paper(bits=2, group_size=32, epochs=1, weight_lr=1e36, quant_lr=1e36)
    with pytest.raises(NonFiniteLossError, match=r"block 0: loss became .* step \d+"):
        run(llama_dir, tmp_path / "nan", cfg)
    assert not (tmp_path / "nan").exists()


def test_existing_output_refused(llama_dir, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(BadInputError, match="already exists"):
        run(llama_dir, tmp_path / "exists", BlockAPConfig.paper(epochs=0))


# ---------------------------------------------------------------------- calibration


def test_calibration_deterministic_disjoint_and_roundtrip(tmp_path):
    a, b = calib(seed=5), calib(seed=5)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert not torch.equal(a.train, calib(seed=6).train)
    # Validation windows are the tail slots; no training window overlaps them.
    train_rows = {tuple(r.tolist()) for r in a.train}
    assert not any(tuple(r.tolist()) in train_rows for r in a.val)
    save_calibration(a, tmp_path / "c.safetensors")
    c = load_calibration(tmp_path / "c.safetensors")
    assert torch.equal(c.train, a.train) and c.meta["seed"] == 5 and c.meta["source"] == "synthetic"
    check_tokenizer(c, tiny_tokenizer(), "c.safetensors")


def test_corpus_too_short_says_how_many():
    with pytest.raises(BadInputError, match=r"give \d+ windows of 512 tokens"):
        build_windows(TEXT[:2], tiny_tokenizer(), 100, 512, 4, 0, source="tiny")


def test_calibration_for_a_file_or_on_the_fly(llama_dir, tmp_path):
    """Block-AP's windows come from one library call: a calibration file, or a corpus tokenized on
    the fly exactly as `eqat calibrate` would (same seed, same windows)."""
    from eqat_cli.train.calib import calibrate, calibration_for

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXT))
    made, tok, path = calibrate(str(llama_dir), str(corpus), 6, 32, 2, 3)
    assert made.train.shape == (6, 32) and made.val.shape == (2, 32) and made.meta["model"] == str(llama_dir)
    assert path == llama_dir
    fly, _, _ = calibration_for(str(llama_dir), dataset=str(corpus), samples=6, seqlen=32, val_samples=2, seed=3)
    assert torch.equal(fly.train, made.train) and torch.equal(fly.val, made.val)
    save_calibration(made, tmp_path / "c.safetensors")
    got, tok2, _ = calibration_for(str(llama_dir), tmp_path / "c.safetensors")
    assert torch.equal(got.train, made.train) and len(tok2) == len(tok)
    with pytest.raises(BadInputError, match="exactly one of --calib"):
        calibration_for(str(llama_dir))


def test_block_ap_from_spec_is_the_command(llama_dir, tmp_path):
    """`eqat block-ap`'s one library entry: from a model spec and a calibration file (or a corpus)
    to the checkpoint, the same bytes as the driver on the same windows; events before training say
    what runs."""
    from eqat_cli.train.block_ap import block_ap_from_spec

    c = calib(n=6)
    save_calibration(c, tmp_path / "c.safetensors")
    cfg = BlockAPConfig(bits=4, group_size=32, epochs=1, batch_size=2)
    events = []
    res = block_ap_from_spec(str(llama_dir), tmp_path / "a", cfg, calib=tmp_path / "c.safetensors", device="cpu",
                             progress=lambda e, i: events.append((e, i)))
    ref = run(llama_dir, tmp_path / "b", cfg, c)
    assert res.output == tmp_path / "a" and len(res.blocks) == 2
    for name in ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert json.loads((tmp_path / "a" / "config.json").read_text())["eqat"]["source_model"] == str(llama_dir)
    names = [e for e, _ in events]
    assert names.index("prepared") < names.index("block_start") and "calibration" not in names
    prepared = dict(events[names.index("prepared")][1])
    assert prepared.pop("config") == cfg.resolve(6)  # what runs: param="auto" resolved (round at 3 steps)
    assert prepared == {"device": "cpu", "train": (6, 32), "val": (2, 32), "steps": 3}
    with pytest.raises(BadInputError, match="exactly one of --calib"):
        block_ap_from_spec(str(llama_dir), tmp_path / "c", cfg)
    with pytest.raises(BadInputError, match="already exists"):
        block_ap_from_spec(str(llama_dir), tmp_path / "a", cfg, calib=tmp_path / "c.safetensors")


def test_other_tokenizer_refused(tmp_path, smollm2_dir):
    from eqat_cli.models import load_tokenizer

    save_calibration(calib(), tmp_path / "c.safetensors")
    c = load_calibration(tmp_path / "c.safetensors")
    with pytest.raises(BadInputError, match="made with another tokenizer"):
        check_tokenizer(c, load_tokenizer(smollm2_dir), "c.safetensors")


def test_cli_block_ap_and_calibrate(llama_dir, tmp_path):
    from typer.testing import CliRunner

    from eqat_cli.cli.app import build_app

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXT))
    r = CliRunner()
    app = build_app()
    res = r.invoke(app, ["calibrate", str(llama_dir), "--dataset", str(corpus), "--samples", "6",
                         "--seqlen", "32", "--val-samples", "2", "-o", str(tmp_path / "c.safetensors")])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["block-ap", str(llama_dir), "--bits", "4", "--group", "32", "--epochs", "1",
                         "--calib", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "out"),
                         "--init", "gptq", "--keep-best", "--channel-scale", "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["config"]["bits"] == 4 and len(summary["blocks"]) == 2
    assert summary["config"]["init"] == "gptq" and summary["config"]["keep_best"] is True
    assert all("best_epoch" in b["history"] for b in summary["blocks"])
    assert summary["config"]["channel_scale"] is True and all(len(b["channel_scale"]) == 1 for b in summary["blocks"])
    res = r.invoke(app, ["block-ap", str(llama_dir), "--bits", "4", "--group", "32", "--epochs", "0",
                         "--calib", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "plain"),
                         "--no-channel-scale", "--json", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    plain = json.loads((tmp_path / "p.json").read_text())
    assert plain["config"]["channel_scale"] is False and all("channel_scale" not in b for b in plain["blocks"])
    assert 50 < summary["peak_rss_mb"] < 64 * 1024  # MiB of this process, not KiB or bytes
    # Bad input: both sources, unsupported bits, tokenizer/file errors -> exit 2, one line.
    for args in (
        ["block-ap", str(llama_dir), "--calib", "x", "--dataset", "c4", "-o", str(tmp_path / "o2")],
        ["block-ap", str(llama_dir), "--bits", "5", "--dataset", "c4", "-o", str(tmp_path / "o3")],
        ["block-ap", str(llama_dir), "--calib", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "o4")],
        ["block-ap", str(llama_dir), "--loss", "l1", "--dataset", "c4", "-o", str(tmp_path / "o5")],
        ["block-ap", str(llama_dir), "--init", "awq", "--dataset", "c4", "-o", str(tmp_path / "o6")],
        ["calibrate", str(llama_dir), "--dataset", str(corpus), "--samples", "5000", "--seqlen", "32",
         "-o", str(tmp_path / "big.safetensors")],
    ):
        res = r.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "error:" in res.output


def test_killed_process_resumes_to_same_result(tmp_path):
    """SIGKILL a real `eqat block-ap` mid-way; re-running the command gives the uninterrupted result."""
    import os
    import signal
    import subprocess
    import sys
    import time

    d = save_tiny(build(tiny_llama_config(num_hidden_layers=4)), tmp_path / "fp")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXT * 3))
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def cmd(out):
        return [sys.executable, "-m", "eqat_cli", "block-ap", str(d), "--bits", "2", "--group", "32",
                "--dataset", str(corpus), "--samples", "48", "--seqlen", "32", "--val-samples", "2",
                "--epochs", "3", "--batch-size", "1", "-o", str(out)]

    ref = subprocess.run(cmd(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    state = tmp_path / "run.partial" / "blockap_state.json"
    proc = subprocess.Popen(cmd(tmp_path / "run"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and len(json.loads(state.read_text())["finished"]) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run").exists()
    finished = json.loads(state.read_text())["finished"]
    assert 1 <= len(finished) < 4
    again = subprocess.run(cmd(tmp_path / "run"), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = tensors(tmp_path / "ref"), tensors(tmp_path / "run")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
