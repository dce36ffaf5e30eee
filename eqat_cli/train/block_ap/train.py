"""Training one fake-quantized block: parameter groups, optimizer, schedule, best-state selection."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from eqat_cli.errors import BadInputError
from eqat_cli.progress import Progress
from eqat_cli.quant.kquant import KQuantLinear
from eqat_cli.quant.rounding import RoundQuantLinear
from eqat_cli.train import schedule
from eqat_cli.train.amp import Amp
from eqat_cli.train.block_ap.blockio import block_kwargs_cached, block_loss, eval_block_loss
from eqat_cli.train.block_ap.config import BlockAPConfig
from eqat_cli.train.runs import NonFiniteLossError


class SignSGD(torch.optim.Optimizer):
    """``p -= lr * sign(grad)``: every step moves each parameter by exactly the learning rate,
    whatever the scale of its gradient (SignRound's optimizer). Deterministic, stateless."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


def lr_factor(step: int, total: int, cfg: BlockAPConfig) -> float:
    """The learning-rate multiplier at ``step`` of ``total``: cosine to ``1/min_lr_factor`` (the
    paper) or linear to 0 (SignRound)."""
    if cfg.schedule == "linear":
        return schedule.linear(step, total)
    return schedule.cosine(step, total, 1.0 / cfg.min_lr_factor)


def param_groups(block: nn.Module, cfg: BlockAPConfig, total: int) -> tuple[list[dict], list[nn.Module]]:
    """Optimizer groups for the block's trainable parameters, and the modules to ``project()``
    after each step. ``free``: weights (and norms, biases) at the weight lr, step sizes and zero
    points at the quant lr. ``round``: offsets at the weight lr, clipping factors at the quant lr;
    everything else stays as it is."""
    for p in block.parameters():
        p.requires_grad_(False)
    if cfg.param == "round":
        layers = [m for m in block.modules() if isinstance(m, (RoundQuantLinear, KQuantLinear))]
        weight_params = [m.offset for m in layers]
        quant_params = [p for m in layers for p in (
            m.factors() if isinstance(m, KQuantLinear) else (m.clip_max, m.clip_min))]
    else:
        layers = []
        quant_params = [p for n, p in block.named_parameters() if n.endswith(("quantizer.scale", "quantizer.zero"))]
        quant_ids = {id(p) for p in quant_params}
        weight_params = [p for p in block.parameters() if id(p) not in quant_ids]
    groups = []
    for params, lr in ((quant_params, cfg.resolved_quant_lr(total)), (weight_params, cfg.resolved_weight_lr(total))):
        if lr and params:
            for p in params:
                p.requires_grad_(True)
            groups.append({"params": params, "lr": lr})
    return groups, layers


def make_optimizer(groups: list[dict], cfg: BlockAPConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sign":
        return SignSGD(groups, lr=groups[0]["lr"])
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def train_block(
    block: nn.Module,
    model: nn.Module,
    arch: Any,
    index: int,
    cfg: BlockAPConfig,
    q_in: torch.Tensor,
    fp_out: torch.Tensor,
    q_in_val: torch.Tensor,
    fp_out_val: torch.Tensor,
    device: torch.device,
    progress: Progress,
    start_val: float | None = None,
) -> dict:
    """Train one fake-quantized block in place. Returns its loss history.

    ``start_val``: the block's validation loss before training, if the caller has measured it
    (``best="val"`` needs it; otherwise it is measured here)."""
    n = len(q_in)
    cfg = cfg.resolve(n)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.total_steps(n)
    groups, projected = param_groups(block, cfg, total)
    history: dict = {"train_loss": [], "val_loss": []}
    if not groups or total == 0:
        return history
    trainable = [p for g in groups for p in g["params"]]
    keep = cfg.best != "last"
    best_state, best_at, best_loss = None, 0, float("inf")
    if cfg.best == "val":
        check_keep_best(cfg, len(q_in_val))
        best_loss = start_val if start_val is not None else eval_block_loss(
            block, model, arch, q_in_val, fp_out_val, cfg.batch_size, device, torch.float32, cfg.loss)
        best_state = snapshot(block, trainable)
    opt = make_optimizer(groups, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg))

    amp = Amp.for_device(device, precision=cfg.precision)
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + index)
    best_val, since_best = float("inf"), 0
    kw_cache: dict = {}
    epochs = math.ceil(total / steps_per_epoch)
    epoch_loss, epoch_steps, perm = 0.0, 0, None
    for step in range(total):
        epoch, b = divmod(step, steps_per_epoch)
        if b == 0:
            perm = torch.randperm(n, generator=gen)
        idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        x = q_in[idx].to(device=device, dtype=torch.float32)
        y = fp_out[idx].to(device=device, dtype=torch.float32)
        with amp.autocast():
            out = block(x, **block_kwargs_cached(kw_cache, arch, model, x, block))
            loss = block_loss(out, y, cfg.loss)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"block {index}: loss became {loss_value} at epoch {epoch + 1}, step {step + 1}; "
                f"finished blocks are kept (try a lower --quant-lr/--weight-lr or --max-grad-norm)"
            )
        if cfg.best == "train" and loss_value < best_loss:
            # The loss of the parameters *before* this step: they are the ones to keep.
            best_loss, best_at, best_state = loss_value, step, snapshot(block, trainable)
        opt.zero_grad(set_to_none=True)
        amp.backward(loss)  # fp16 (GPUs without bf16) scales the loss: its gradients would underflow
        if cfg.max_grad_norm is not None:
            amp.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        amp.step(opt)
        for m in projected:
            m.project()
        sched.step()
        epoch_loss += loss_value
        epoch_steps += 1
        progress("step", {"block": index, "epoch": epoch + 1, "epochs": epochs, "step": b + 1,
                          "steps": steps_per_epoch, "total_steps": total, "loss": loss_value})
        if b + 1 < steps_per_epoch and step + 1 < total:
            continue
        # End of an epoch (or of the last, partial one).
        val = eval_block_loss(block, model, arch, q_in_val, fp_out_val, cfg.batch_size, device, torch.float32, cfg.loss)
        history["train_loss"].append(epoch_loss / epoch_steps)
        history["val_loss"].append(val)
        progress("epoch", {"block": index, "epoch": epoch + 1, "train_loss": epoch_loss / epoch_steps, "val_loss": val})
        epoch_loss, epoch_steps = 0.0, 0
        if cfg.best == "val" and val < best_loss:
            best_loss, best_at = val, epoch + 1
            best_state = snapshot(block, trainable) if step + 1 < total else None  # last: it is the block
        if cfg.early_stop and not math.isnan(val):
            if val < best_val:
                best_val, since_best = val, 0
            else:
                since_best += 1
                if since_best >= cfg.early_stop:
                    progress("early_stop", {"block": index, "epoch": epoch + 1})
                    break
    if keep:
        finished_at = len(history["val_loss"]) if cfg.best == "val" else None
        if cfg.best == "val":
            history["best_epoch"] = best_at  # 0: training never beat the starting point
        else:
            history["best_step"] = best_at
            history["best_train_loss"] = best_loss
        if best_state is not None and best_at != finished_at:
            restore(block, best_state)
            where = {"epoch": best_at} if cfg.best == "val" else {"step": best_at}
            progress("restored", {"block": index, **where, "val_loss": best_loss})
    for p in block.parameters():
        p.requires_grad_(False)
    return history


def check_keep_best(cfg: BlockAPConfig, n_val: int) -> None:
    """``--keep-best`` asks for validation windows explicitly; the default recipe's ``best="val"``
    falls back to a slice of the training windows when there are none (see the driver)."""
    if cfg.keep_best and cfg.trains and n_val == 0:
        raise BadInputError("--keep-best needs validation windows (--val-samples > 0)")


def snapshot(block: nn.Module, params: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A host-memory copy of the block's parameters (or of ``params`` among them)."""
    ids = None if params is None else {id(p) for p in params}
    return {n: p.detach().to("cpu", copy=True) for n, p in block.named_parameters()
            if ids is None or id(p) in ids}


def restore(block: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in block.named_parameters():
            if n in state:
                p.copy_(state[n].to(p.device))
