"""param="auto": the default picks round or free by the steps per block (issue #28), records the
choice in the checkpoint and shows it; the hybrid's switch from round to free starts exactly at the
rounded result."""

import json

import pytest
import torch

from eqat_cli.scheme import QuantScheme

from conftest import build, save_tiny, tiny_llama_config, tiny_tokenizer
from eqat_cli.formats.checkpoint import Checkpoint
from eqat_cli.quant.linear import QuantLinear
from eqat_cli.quant.rounding import RoundQuantLinear, round_to_free
from eqat_cli.train.block_ap import BlockAPConfig, run_block_ap
from eqat_cli.train.block_ap import config as config_mod
from eqat_cli.train.block_ap.config import AUTO_FREE_MIN_STEPS, auto_param
from eqat_cli.train.calib import build_windows

TEXT = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(60)) for i in range(40)]


def test_chooser_picks_by_steps_per_block():
    assert auto_param(AUTO_FREE_MIN_STEPS - 1) == "round" and auto_param(AUTO_FREE_MIN_STEPS) == "free"
    d = BlockAPConfig(bits=2)
    assert d.param == "auto" and d.optimizer is None and d.schedule is None
    small = d.resolve(64)  # 64 windows at batch 8: 32 steps
    assert (small.param, small.optimizer, small.schedule, small.param_auto) == ("round", "sign", "linear", True)
    assert small.resolved_weight_lr(32) == 1 / 32
    n = AUTO_FREE_MIN_STEPS * 8 // 2  # two epochs at batch 8: exactly the threshold
    assert d.total_steps(n) == AUTO_FREE_MIN_STEPS
    big = d.resolve(n)
    assert (big.param, big.optimizer, big.schedule, big.param_auto) == ("free", "adamw", "cosine", True)
    assert big.resolved_weight_lr() == 2e-5 and big.resolved_quant_lr() == 1e-4  # the paper's
    assert d.resolve(n - 8).param == "round"  # one step fewer
    assert BlockAPConfig(steps=AUTO_FREE_MIN_STEPS).resolve(8).param == "free"  # --steps counts, not windows
    # Explicit choices are kept, whatever the budget; resolving is idempotent.
    assert BlockAPConfig(param="round", steps=10 * AUTO_FREE_MIN_STEPS).resolve(8).param == "round"
    kept = BlockAPConfig(param="free", optimizer="sign", steps=8).resolve(8)
    assert (kept.param, kept.optimizer, kept.schedule, kept.param_auto) == ("free", "sign", "cosine", False)
    assert big.resolve(8) == big and small.resolve(n) == small
    assert BlockAPConfig.paper().resolve(8) == BlockAPConfig.paper()


@pytest.mark.parametrize("threshold,param", [(None, "round"), (1, "free")])
def test_choice_written_to_and_read_from_the_checkpoint(tmp_path, monkeypatch, threshold, param):
    if threshold is not None:
        monkeypatch.setattr(config_mod, "AUTO_FREE_MIN_STEPS", threshold)
    model_dir = save_tiny(build(tiny_llama_config()), tmp_path / "fp")
    c = build_windows(TEXT, tiny_tokenizer(), 8, 32, 2, 0, source="synthetic")
    cfg = BlockAPConfig(bits=4, group_size=32, steps=2)
    res = run_block_ap(model_dir, tiny_tokenizer(), c.train, c.val, cfg, tmp_path / "out", torch.device("cpu"))
    assert res.config.param == param and res.config.param_auto
    meta = Checkpoint.open(res.output).meta
    assert meta.block_ap["param"] == param and meta.block_ap["param_auto"] is True
    assert meta.block_ap["optimizer"] == ("sign" if param == "round" else "adamw")


def test_cli_summary_shows_the_choice(tmp_path):
    from typer.testing import CliRunner

    from eqat_cli.cli.app import build_app
    from eqat_cli.train.calib import save_calibration

    model_dir = save_tiny(build(tiny_llama_config()), tmp_path / "fp")
    save_calibration(build_windows(TEXT, tiny_tokenizer(), 8, 32, 2, 0, source="synthetic"), tmp_path / "c.safetensors")
    res = CliRunner().invoke(build_app(), ["block-ap", str(model_dir), "--bits", "4", "--group", "32", "--steps", "2",
                                           "--calib", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "out"),
                                           "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    assert f"round (auto: < {AUTO_FREE_MIN_STEPS} steps per block) parameters" in " ".join(res.output.split())
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["config"]["param"] == "round" and summary["config"]["param_auto"] is True


@pytest.mark.parametrize("bits", [2, 4])
def test_round_to_free_starts_exactly_at_the_rounded_result(bits):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 24)
    q = QuantLinear(lin, QuantScheme(bits, 32))
    r = RoundQuantLinear.from_quant_linear(q)
    with torch.no_grad():
        r.offset.uniform_(-0.5, 0.5)
        r.offset[0, :8] = 0.5  # on the boundary, as projection leaves them
        r.clip_max.uniform_(0.5, 1.0)
        r.clip_min.uniform_(0.5, 1.0)
    f = round_to_free(r)
    with torch.no_grad():
        assert torch.equal(f.quantizer(f.weight), r.fake_weight())
        a, b = f.to_packed(), r.to_packed()
    for name in ("qweight", "scales", "qzeros"):
        if hasattr(a, name):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(f.bias, r.bias)
    # codes stay in the grid
    from eqat_cli.quant.primitives import quantize_codes

    codes = quantize_codes(f.weight.detach(), f.quantizer.scale, f.quantizer.zero, bits, 32)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2 ** bits - 1
