"""The default recipe's parametrisation (learned rounding offsets and clipping factors) and the
default Block-AP recipe: exact starting points, codes inside the grid, bit-exact packing, resume."""

import json

import pytest
import torch

from conftest import build, tiny_llama_config
from test_block_ap import calib, llama_dir, run, tensors  # noqa: F401  (llama_dir is a fixture)
from eqat_cli.quant.gptq import gptq_quantize
from eqat_cli.quant.linear import QuantLinear
from eqat_cli.quant.primitives import expand_groups, qmax
from eqat_cli.quant.rounding import CLIP_LO, OFFSET_MAX, RoundQuantLinear
from eqat_cli.scheme import QuantScheme
from eqat_cli.train.block_ap import BlockAPConfig, SignSGD


def linear(out_f=24, in_f=80, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    lin.weight.data.normal_(0, 0.05)
    lin.weight.data[3, 5] = 0.4  # an outlier that widens one group's range
    return lin


@pytest.mark.parametrize("bits,group", [(2, 16), (3, 32), (4, 64), (4, -1), (2, 32)])
def test_starts_exactly_at_rtn_and_packs_the_same(bits, group):
    """In 80 columns, group 32 and 64 leave ragged last groups."""
    q = QuantLinear(linear(), QuantScheme(bits, group))
    r = RoundQuantLinear.from_quant_linear(q)
    with torch.no_grad():
        assert torch.equal(r.fake_weight(), q.quantizer(q.weight))
        x = torch.randn(5, 80)
        assert torch.equal(r(x), q(x))
    a, b = q.to_packed(), r.to_packed()
    for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_starts_exactly_at_gptq():
    """From GPTQ's error-compensated weights, step sizes and zeros: GPTQ's codes exactly."""
    from eqat_cli.train.block_ap import gptq_init_block

    lin = linear(bias=False)
    x = torch.randn(256, 80) * torch.linspace(0.2, 3, 80)
    h = 2 * x.T @ x / len(x)
    q = QuantLinear(lin, QuantScheme(2, 16))
    gptq_init_block({"l": q}, {"l": h}, QuantScheme(2, 16), 0.01)
    r = RoundQuantLinear.from_quant_linear(q)
    codes, scale, zero = gptq_quantize(lin.weight, h, QuantScheme(2, 16), 0.01)
    p = r.to_packed()
    assert torch.equal(p.codes().t(), codes)
    assert torch.equal(p.zero_points().t(), zero.to(torch.int32))
    assert torch.equal(p.scales.t(), scale.half())


def test_training_keeps_codes_in_the_grid_and_packs_bit_exactly():
    bits, group = 2, 16
    r = RoundQuantLinear.from_quant_linear(QuantLinear(linear(), QuantScheme(bits, group)))
    start = r.to_packed().codes()
    opt = SignSGD([{"params": [r.offset, r.clip_max, r.clip_min], "lr": 0.3}], lr=0.3)  # far too large
    x, y = torch.randn(32, 80), torch.randn(32, 24)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.mse_loss(r(x), y).backward()
        opt.step()
        r.project()
    assert r.offset.abs().max() <= OFFSET_MAX
    assert CLIP_LO <= float(r.clip_max.detach().min()) and float(r.clip_max.detach().max()) <= 1
    assert CLIP_LO <= float(r.clip_min.detach().min()) and float(r.clip_min.detach().max()) <= 1
    p = r.to_packed()
    codes = p.codes()
    assert int(codes.min()) >= 0 and int(codes.max()) <= qmax(bits)
    assert not torch.equal(codes, start)  # it did train
    # The packed layer holds exactly the trained codes and zero points; its weight differs from
    # the training forward only by the fp16 storage of the step sizes.
    with torch.no_grad():
        q, _, ze = r._codes_and_grid()
        s, _ = r.grid()
        assert torch.equal(codes.t(), q.to(torch.int32))
        want = (q - ze) * expand_groups(s.half().float(), group, 80)
        assert torch.equal(p.dequantize(), want)
        torch.testing.assert_close(p.dequantize(), r.fake_weight(), rtol=1e-3, atol=1e-6)


def test_sign_sgd_moves_every_parameter_by_the_lr():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    p.grad = torch.tensor([1e-9, -5.0, 0.0])
    SignSGD([p], lr=0.25).step()
    assert torch.equal(p.data, torch.tensor([0.75, 2.25, 3.0]))


@pytest.mark.parametrize("init", ["minmax", "gptq"])
def test_default_recipe_without_steps_is_exactly_its_start(llama_dir, tmp_path, init):
    """No steps: the round parametrisation packs exactly RTN (min-max) or GPTQ."""
    a = tensors(run(llama_dir, tmp_path / "a", BlockAPConfig(bits=2, group_size=32, epochs=0, batch_size=2,
                                                            init=init, channel_scale=False)).output)
    b = tensors(run(llama_dir, tmp_path / "b", BlockAPConfig.paper(bits=2, group_size=32, epochs=0, init=init)).output)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_default_recipe_trains_keeps_best_state_and_resumes(llama_dir, tmp_path):
    cfg = BlockAPConfig(bits=2, group_size=32, steps=12, batch_size=2)
    full = run(llama_dir, tmp_path / "full", cfg)
    for b in full.blocks:
        h = b["history"]
        assert len(h["val_loss"]) == 3 and 0 <= h["best_epoch"] <= 3
        # Never worse on validation than the GPTQ start (up to the fp16 storage of the result).
        assert b["loss_after"] <= b["loss_before"] * 1.001
        assert b["loss_after"] <= min(h["val_loss"]) * 1.001
    meta = json.loads((full.output / "config.json").read_text())["eqat"]
    assert meta["block_ap"]["param"] == "round" and meta["block_ap"]["recipe"] == "default"

    def stop_at_block_1(event, info):
        if event == "block_start" and info["block"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(llama_dir, tmp_path / "resumed", cfg, progress=stop_at_block_1)
    res = run(llama_dir, tmp_path / "resumed", cfg)
    assert res.resumed_from == 1
    a, b = tensors(full.output), tensors(res.output)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_best_step_is_the_lowest_training_loss():
    """--best train ends the block in the state whose training-batch loss was the lowest seen,
    i.e. the state *before* that step's update; --best last ends after the last update."""
    from eqat_cli.registry import get_registry
    from eqat_cli.train.block_ap import quantize_block_start, train_block
    from eqat_cli.train.block_ap.train import snapshot

    torch.manual_seed(0)
    model = build(tiny_llama_config())
    arch = get_registry().architecture_for("llama")
    cpu = torch.device("cpu")
    x = torch.randn(6, 16, model.config.hidden_size)
    xv = torch.randn(2, 16, model.config.hidden_size)

    def trained(best):
        block = build(tiny_llama_config()).model.layers[0]
        with torch.no_grad():
            y, yv = (block(t, **arch.block_kwargs(model, t, 0)) for t in (x, xv))
        cfg = BlockAPConfig(bits=2, group_size=32, steps=9, batch_size=2, best=best)
        quantize_block_start(block, model, arch, cfg, x, 2, cpu)
        states, losses = [snapshot(block)], []

        def progress(event, info):
            if event == "step":
                losses.append(info["loss"])
                states.append(snapshot(block))  # after this step's update
        hist = train_block(block, model, arch, 0, cfg, x, y, xv, yv, cpu, progress)
        return hist, losses, states, snapshot(block)

    hist, losses, states, final = trained("train")
    best = min(range(len(losses)), key=losses.__getitem__)
    assert hist["best_step"] == best and hist["best_train_loss"] == losses[best]
    for k, v in final.items():
        assert torch.equal(v, states[best][k]), k
    _, losses_last, states_last, final_last = trained("last")
    assert losses_last == losses  # the same run; only the end state differs
    for k, v in final_last.items():
        assert torch.equal(v, states_last[-1][k]), k


def test_recipes_and_bad_options():
    from eqat_cli.errors import BadInputError

    p = BlockAPConfig.paper(bits=3)
    assert (p.param, p.optimizer, p.schedule, p.epochs, p.batch_size, p.init, p.best) == \
        ("free", "adamw", "cosine", 2, 2, "minmax", "last")
    assert p.resolved_quant_lr() == 1e-4 and p.resolved_weight_lr() == 1e-5
    assert BlockAPConfig.paper(bits=2).resolved_weight_lr() == 2e-5
    d = BlockAPConfig(param="round")
    assert d.resolved_weight_lr(50) == d.resolved_quant_lr(50) == 1 / 50
    assert BlockAPConfig.from_recipe("paper", bits=2) == BlockAPConfig.paper(bits=2)
    for bad in (dict(param="x"), dict(optimizer="sgd"), dict(best="x"), dict(steps=-1), dict(quant_lr=-1.0),
                dict(weight_lr=float("nan")), dict(schedule="step"), dict(min_lr_factor=0.5)):
        with pytest.raises(BadInputError):
            BlockAPConfig(**bad)
    with pytest.raises(BadInputError):
        BlockAPConfig.from_recipe("fast")
    # bits and group size are validated through QuantScheme (one SUPPORTED_BITS)
    from eqat_cli.errors import UnsupportedError
    from eqat_cli.scheme import QuantScheme

    with pytest.raises(UnsupportedError, match="unsupported bit width 5"):
        BlockAPConfig(bits=5)
    for bad_group in (0, 1, -2):
        with pytest.raises(BadInputError, match="group size"):
            BlockAPConfig(group_size=bad_group)
    assert BlockAPConfig(bits=3, group_size=-1).scheme == QuantScheme(3, -1)


def test_default_recipe_without_validation_windows(llama_dir, tmp_path):
    """No validation windows: the default recipe's best-state choice uses a slice of the training
    windows (as the reported losses do) instead of refusing; --keep-best still asks for them."""
    from eqat_cli.errors import BadInputError

    c = calib(val=0)
    res = run(llama_dir, tmp_path / "a", BlockAPConfig(bits=2, group_size=32, steps=8, batch_size=2), c)
    for b in res.blocks:
        assert b["loss_after"] <= b["loss_before"] * 1.001
        assert all(v == v for v in b["history"]["val_loss"])  # measured, not NaN
    with pytest.raises(BadInputError, match="--keep-best needs validation windows"):
        run(llama_dir, tmp_path / "b", BlockAPConfig(bits=2, group_size=32, steps=8, keep_best=True), c)


def test_default_steps_follow_the_calibration_budget():
    """The default recipe: two passes over the windows, never fewer than 32 steps per block; an
    explicit --epochs or --steps wins; the paper's recipe is untouched (2 epochs of batch 2)."""
    d = BlockAPConfig()
    assert d.epochs is None and d.trains
    assert [d.total_steps(n) for n in (8, 64, 100, 128, 256, 512)] == [32, 32, 39, 32, 64, 128]
    assert [d.resolved_epochs(n) for n in (8, 64, 128, 256)] == [32, 4, 2, 2]
    assert BlockAPConfig(epochs=4).total_steps(128) == 64
    assert BlockAPConfig(steps=10).total_steps(128) == 10
    assert not BlockAPConfig(epochs=0).trains
    assert BlockAPConfig.paper().total_steps(64) == 64
