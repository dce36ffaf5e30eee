"""E2E-QP: end-to-end training of step sizes with frozen integer codes (EfficientQAT, phase 2).

Only ``scales`` of every :class:`PackedLinear` train (``train_zeros`` adds zero points); codes stay
packed. Next-token loss, AdamW, linear warmup then cosine, gradient clipping, gradient
accumulation, gradient checkpointing, bf16 autocast on GPUs. Held-out loss every ``eval_steps``;
the best and the last step sizes are both kept.

Data parallel over ``torch.distributed`` (``torchrun``): each rank takes its slice of every global
batch and gradients are averaged with ``all_reduce`` before the step, so N processes follow the
same trajectory as one process with the same global batch.

Resumable: every ``save_steps`` the trainable tensors, optimizer, scheduler, best-so-far and step
are written atomically; data order is a pure function of (seed, epoch), so a resumed run sees the
same batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from eqat_cli.errors import BadInputError, EqatError
from eqat_cli.quant.linear import REFERENCE_KERNEL, PackedLinear
from eqat_cli.train.sft_data import Examples

STATE_FILE = "e2e_state.pt"
WORK_SUFFIX = ".partial"


@dataclass(frozen=True)
class E2EConfig:
    epochs: int = 1
    lr: float | None = None  # paper: 2e-5 at 2 bits, 1e-5 otherwise
    batch_size: int = 1  # per process, per micro-step
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 0.3
    weight_decay: float = 0.0
    eval_steps: int = 0  # 0: evaluate at the end of each epoch only
    save_steps: int = 50
    train_zeros: bool = False
    gradient_checkpointing: bool = True
    seed: int = 2

    def resolved_lr(self, bits: int) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-5 if bits == 2 else 1e-5


class NonFiniteLossError(EqatError):
    pass


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join a torchrun process group when launched by one (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return True


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def trainable_layers(model: torch.nn.Module) -> dict[str, PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def _trainable_state(layers: dict[str, PackedLinear]) -> dict[str, torch.Tensor]:
    out = {}
    for n, m in layers.items():
        out[f"{n}.scales"] = m.scales.detach().clone().cpu()
        if m.zeros_fp is not None:
            out[f"{n}.zeros_fp"] = m.zeros_fp.detach().clone().cpu()
    return out


def _load_trainable(layers: dict[str, PackedLinear], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, m in layers.items():
            m.scales.copy_(state[f"{n}.scales"])
            if m.zeros_fp is not None:
                m.zeros_fp.copy_(state[f"{n}.zeros_fp"])


def evaluate(model, data: Examples, batch: int, device) -> float:
    if len(data.input_ids) == 0:
        return float("nan")
    rank, ws = world()
    total = torch.zeros(2, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for s in range(rank * batch, len(data.input_ids), batch * ws):
            sl = slice(s, s + batch)
            out = model(input_ids=data.input_ids[sl].to(device), attention_mask=data.attention_mask[sl].to(device),
                        labels=data.labels[sl].to(device))
            n_tok = int((data.labels[sl][:, 1:] != -100).sum())
            total += torch.tensor([float(out.loss) * n_tok, n_tok], dtype=torch.float64)
    if ws > 1:
        dist.all_reduce(total)
    return float(total[0] / max(total[1], 1))


@dataclass
class E2EResult:
    output: Path
    steps: int
    train_loss: list
    val_loss: list
    best_val: float | None
    seconds: float
    tokens_per_second: float
    resumed_from_step: int


def run_e2e_qp(
    model: torch.nn.Module,
    tokenizer: Any,
    train: Examples,
    val: Examples,
    cfg: E2EConfig,
    output: Path,
    device: torch.device,
    bits: int,
    eqat_meta: dict,
    progress: Callable[[str, dict], None] = lambda e, i: None,
    resume: bool = True,
    overwrite: bool = False,
) -> E2EResult:
    from eqat_cli.formats.native import save_native
    from eqat_cli.fsutil import atomic_dir, atomic_file

    rank, ws = world()
    output = Path(output)
    if output.exists() and not overwrite:
        raise BadInputError(f"output {output} already exists (pass --overwrite to replace it)")
    work = output.with_name(output.name + WORK_SUFFIX)
    layers = trainable_layers(model)
    if not layers:
        raise BadInputError("E2E-QP needs a quantized model (no packed layers found); run `eqat block-ap` first")
    for p in model.parameters():
        p.requires_grad_(False)
    from eqat_cli.quant.cpu_kernel import TORCH_KERNEL

    # The torch kernel differentiates w.r.t. step sizes; float zero points need the reference.
    kernel = REFERENCE_KERNEL if cfg.train_zeros else TORCH_KERNEL
    params = []
    for m in layers.values():
        m.set_kernel(kernel)
        params.extend(m.start_training(cfg.train_zeros))
    model.to(device)
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False

    lr = cfg.resolved_lr(bits)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    n = len(train.input_ids)
    global_batch = cfg.batch_size * cfg.grad_accum * ws
    if n < global_batch:
        raise BadInputError(f"{n} training examples are fewer than one global batch ({global_batch})")
    steps_per_epoch = n // global_batch
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, warmup))

    run_key = {"cfg": dataclasses.asdict(cfg), "n": n, "world": ws, "sum": int(train.input_ids.sum())}
    step, best_val, best_state = 0, None, None
    history = {"train_loss": [], "val_loss": []}
    state_path = work / STATE_FILE
    if resume and state_path.exists():
        st = torch.load(state_path, weights_only=False)
        if st["run_key"] == run_key:
            _load_trainable(layers, st["trainable"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            step, best_val, best_state, history = st["step"], st["best_val"], st["best"], st["history"]
    resumed_from = step
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)

    def save_state():
        if rank != 0:
            return
        with atomic_file(state_path) as tmp:
            torch.save({"run_key": run_key, "trainable": _trainable_state(layers), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "step": step, "best_val": best_val, "best": best_state,
                        "history": history}, tmp)

    def validate():
        nonlocal best_val, best_state
        v = evaluate(model, val, cfg.batch_size, device)
        history["val_loss"].append([step, v])
        if not math.isnan(v) and (best_val is None or v < best_val):
            best_val, best_state = v, _trainable_state(layers)
        progress("eval", {"step": step, "val_loss": v, "best": best_val})
        model.train()

    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    t0, tokens = time.time(), 0
    model.train()
    tokens_per_step = global_batch * train.input_ids.shape[1]
    progress("start", {"total": total, "step": step, "lr": lr, "global_batch": global_batch})
    if step == 0:
        validate()  # the starting point: its loss is the baseline, and "best" if training hurts
    while step < total:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        gb = perm[in_epoch * global_batch : (in_epoch + 1) * global_batch]
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for a in range(cfg.grad_accum):
            start = (a * ws + rank) * cfg.batch_size
            idx = gb[start : start + cfg.batch_size]
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                out = model(input_ids=train.input_ids[idx].to(device),
                            attention_mask=train.attention_mask[idx].to(device),
                            labels=train.labels[idx].to(device))
            loss = out.loss / cfg.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
        if ws > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= ws
            t = torch.tensor([step_loss], dtype=torch.float64)
            dist.all_reduce(t)
            step_loss = float(t) / ws
        if not math.isfinite(step_loss):
            save_state()
            raise NonFiniteLossError(
                f"E2E-QP: loss became {step_loss} at step {step + 1}; the last saved state is kept in {work}"
            )
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        step += 1
        tokens += tokens_per_step
        history["train_loss"].append([step, step_loss])
        elapsed = time.time() - t0
        progress("step", {"step": step, "total": total, "loss": step_loss, "lr": sched.get_last_lr()[0],
                          "tokens_per_second": tokens / max(elapsed, 1e-9)})
        if cfg.eval_steps and step % cfg.eval_steps == 0:
            validate()
        elif step % steps_per_epoch == 0:
            validate()
        if cfg.save_steps and step % cfg.save_steps == 0 and step < total:
            save_state()
    if not history["val_loss"] or history["val_loss"][-1][0] != step:
        validate()
    seconds = time.time() - t0

    model.eval()
    ckpt_off = getattr(model, "activation_checkpointing_disable", None) or getattr(model, "gradient_checkpointing_disable", None)
    if ckpt_off is not None:
        ckpt_off()
    meta = dict(eqat_meta)
    meta["e2e_qp"] = {**dataclasses.asdict(cfg), "lr": lr, "world_size": ws, "steps": step,
                      "best_val_loss": best_val, "data": train.meta}
    if rank == 0:
        last_state = _trainable_state(layers)
        with atomic_dir(output, overwrite=True) as tmp:
            # The output is the best step sizes by held-out loss; last/ holds the final step's.
            for name, state in (("last", last_state), ("best", best_state or last_state)):
                for m in layers.values():
                    m.start_training(cfg.train_zeros)
                _load_trainable(layers, state)
                for m in layers.values():
                    m.finish_training()  # zero points rounded, clamped, re-packed
                target = tmp / "last" if name == "last" else tmp
                target.mkdir(exist_ok=True)
                save_native(model, tokenizer, target, {**meta, "e2e_selected": name})
            (tmp / "e2e_history.json").write_text(json.dumps(history, indent=2))
        shutil.rmtree(work, ignore_errors=True)
    if ws > 1:
        dist.barrier()
    return E2EResult(output, step, history["train_loss"], history["val_loss"], best_val, seconds,
                     (step - resumed_from) * tokens_per_step / max(seconds, 1e-9), resumed_from)
