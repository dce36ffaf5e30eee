"""The E2E-QP driver: :func:`run_e2e_qp` as named steps over one shared :class:`_Run`."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from eqat_cli.errors import BadInputError, UnsupportedError
from eqat_cli.formats.meta import CheckpointMeta
from eqat_cli.formats.native import save_native
from eqat_cli.fsutil import atomic_dir
from eqat_cli.progress import Progress, no_progress
from eqat_cli.quant.linear import PackedLinear
from eqat_cli.train import schedule
from eqat_cli.train.amp import Amp
from eqat_cli.train.e2e_qp.config import LOSSES, E2EConfig
from eqat_cli.train.e2e_qp.dist import world
from eqat_cli.train.e2e_qp.evaluate import evaluate
from eqat_cli.train.e2e_qp.losses import loss_sums
from eqat_cli.train.e2e_qp.state import (
    STATE_FILE, STATE_FORMAT, STATE_KEY, _load_optimizer, _optimizer_tensors, _TrainState, read_state,
)
from eqat_cli.train.e2e_qp.student import (
    _disable_checkpointing, _load_trainable, _trainable_state, prepare_student, trainable_layers,
)
from eqat_cli.train.runs import NonFiniteLossError, WorkDir, check_new_output, json_key, run_lock, work_dir_for
from eqat_cli.train.sft_data import Examples


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
    global_batch: int = 0
    micro_batch: int = 0
    grad_accum: int = 0
    world_size: int = 1  # processes that trained (torchrun)
    rank: int = 0  # this process's rank


def run_e2e_qp(
    model: torch.nn.Module,
    tokenizer: Any,
    train: Examples,
    val: Examples,
    cfg: E2EConfig,
    output: Path,
    device: torch.device,
    bits: int,
    eqat_meta: "CheckpointMeta | dict",
    progress: Progress = no_progress,
    resume: bool = True,
    overwrite: bool = False,
    teacher: torch.nn.Module | None = None,
    amp: Amp | None = None,
) -> E2EResult:
    """Train the packed layers' step sizes end to end; write the best (by held-out loss) and the last.

    Rank 0 holds the output's lock for the run (a no-op inside :func:`e2e_qp_from_spec`, which
    took it); another process writing the same output is refused.
    """
    rank, ws = world()
    output = Path(output)
    with run_lock(output, owner=rank == 0, progress=progress):
        layers = _check_inputs(model, cfg, output, overwrite, teacher)
        sched = _Schedule.plan(cfg, len(train), ws, bits)
        # With ntp a teacher, when given, only measures the held-out KL beside the next-token loss.
        eval_teacher, teacher = teacher, (teacher if cfg.loss == "kd" else None)
        params, amp = _prepare_models(model, eval_teacher, cfg, device, amp)
        run = _Run(
            model=model, layers=layers, params=params, amp=amp,
            opt=torch.optim.AdamW(params, lr=sched.lr, weight_decay=cfg.weight_decay),
            teacher=teacher, eval_teacher=eval_teacher, train=train, val=val, cfg=cfg, sched=sched,
            device=device, rank=rank, ws=ws, work=WorkDir(work_dir_for(output), STATE_FILE),
            run_key=_run_key(cfg, train, ws, eval_teacher), progress=progress,
        )
        _resume_or_start(run, resume)
        seconds = _train(run)
        _write_output(run, output, tokenizer, eqat_meta)
    st = run.state
    return E2EResult(output, st.step, st.history["train_loss"], st.history["val_loss"], st.best_val, seconds,
                     run.tokens / max(seconds, 1e-9), run.resumed_from, cfg.global_batch, sched.micro, sched.accum,
                     world_size=ws, rank=rank)


# ---------------------------------------------------------------------- the steps


def _check_inputs(model: torch.nn.Module, cfg: E2EConfig, output: Path, overwrite: bool,
                  teacher: torch.nn.Module | None) -> dict[str, PackedLinear]:
    """Fail on an existing output, a bad objective or a model without packed layers; return those."""
    check_new_output(output, overwrite)
    if cfg.loss not in LOSSES:
        raise BadInputError(f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    if cfg.loss == "kd" and teacher is None:
        raise BadInputError("--loss kd needs the full-precision teacher (--teacher MODEL)")
    layers = trainable_layers(model)
    kq = getattr(model, "eqat_kquant", None)
    if kq:  # Block-AP --target: layers are GGML blocks (quant/kquant.py), not uniform step sizes
        raise UnsupportedError(
            f"E2E-QP does not train GGML-grid layers yet ({len(kq)} layers of "
            f"{', '.join(sorted(set(kq.values())))} from Block-AP --target); export this checkpoint as it is",
            hint="eqat pack CHECKPOINT --format gguf -o model.gguf")
    if not layers:
        raise BadInputError("E2E-QP needs a quantized model (no packed layers found); run `eqat block-ap` first")
    return layers


@dataclass(frozen=True)
class _Schedule:
    """The batch split over processes and micro-batches, and the learning-rate schedule."""

    micro: int  # examples per process per micro-step
    accum: int  # micro-steps per optimizer step
    n: int  # training examples
    lr: float  # peak learning rate
    steps_per_epoch: int
    total: int  # optimizer steps
    warmup: int  # warmup steps

    @classmethod
    def plan(cls, cfg: E2EConfig, n: int, ws: int, bits: int) -> "_Schedule":
        micro, accum = cfg.micro_batches(ws)
        if n < cfg.global_batch:
            raise BadInputError(f"{n} training examples are fewer than one global batch ({cfg.global_batch})")
        steps_per_epoch = n // cfg.global_batch
        total = steps_per_epoch * cfg.epochs
        return cls(micro, accum, n, cfg.resolved_lr(bits), steps_per_epoch, total,
                   schedule.warmup_steps(cfg.warmup_ratio, total))

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step``: warmup, then cosine to 0."""
        return self.lr * schedule.warmup_cosine(step, self.total, self.warmup)


def _prepare_models(model: torch.nn.Module, eval_teacher: torch.nn.Module | None, cfg: E2EConfig, device,
                    amp: Amp | None) -> tuple[list[torch.nn.Parameter], Amp]:
    """The student's trainable step sizes on the device, the frozen teacher beside it, the precision."""
    params = prepare_student(model, cfg.train_zeros, cfg.gradient_checkpointing, torch.device(device).type)
    model.to(device)
    if eval_teacher is not None:
        eval_teacher.to(device).eval()
        for p in eval_teacher.parameters():
            p.requires_grad_(False)
    # Under autocast the torch kernel trains through a dequantized weight and an autocast matmul
    # (eqat_cli/quant/torch_kernel.py), so bf16 pays off on CPUs with bf16 units as on GPUs.
    amp = amp or Amp.for_device(device, precision=cfg.precision)
    return params, amp


def _run_key(cfg: E2EConfig, train: Examples, ws: int, eval_teacher: torch.nn.Module | None) -> dict:
    """What a resume file must match: the config, the data, the process count and the teacher."""
    run_key = {"cfg": dataclasses.asdict(cfg), "n": len(train), "world": ws, "data": train.fingerprint(),
               "teacher": None if eval_teacher is None else sum(p.numel() for p in eval_teacher.parameters())}
    return json_key(run_key)  # as it reads back from the JSON header


@dataclass
class _Run:
    """Everything the training steps share."""

    model: torch.nn.Module
    layers: dict[str, PackedLinear]
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    amp: Amp
    teacher: torch.nn.Module | None  # the KD teacher (None with ntp)
    eval_teacher: torch.nn.Module | None  # the teacher given, for the held-out KL
    train: Examples
    val: Examples
    cfg: E2EConfig
    sched: _Schedule
    device: Any
    rank: int
    ws: int
    work: WorkDir  # OUT.partial/ and its resume state file
    run_key: dict
    progress: Progress
    state: _TrainState = field(default_factory=_TrainState)
    resumed_from: int = 0
    tokens: int = 0  # tokens trained on by this process since it started

    @property
    def objective(self) -> str:
        return "kl" if self.teacher is not None else "nll"


def _resume_or_start(run: _Run, resume: bool) -> None:
    """Load the resume file when it was written by this same run; create the work directory."""
    previous = run.work.previous(resume, read_state, lambda old: old[0]["run_key"] == run.run_key)
    if previous is not None:
        meta, tensors = previous
        _load_trainable(run.layers, {k[len("trainable."):]: v for k, v in tensors.items()
                                     if k.startswith("trainable.")})
        _load_optimizer(run.opt, tensors, meta["optimizer_scalars"])
        run.amp.load_state_dict(meta["scaler"])
        best_state = None
        if meta["has_best"]:
            best_state = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
        run.state = _TrainState(meta["step"], meta["best_val"], best_state, meta["history"])
    run.resumed_from = run.state.step
    if run.rank == 0:
        run.work.create()


def _save_resume_state(run: _Run) -> None:
    """Write the resume file (rank 0 only): trainable tensors, optimizer, loss scale, best, history."""
    if run.rank != 0:
        return
    st = run.state
    opt_tensors, opt_scalars = _optimizer_tensors(run.opt)
    tensors = {f"trainable.{k}": v for k, v in _trainable_state(run.layers).items()}
    tensors.update(opt_tensors)
    if st.best_state is not None:
        tensors.update({f"best.{k}": v for k, v in st.best_state.items()})
    meta = {"format": STATE_FORMAT, "version": 1, "run_key": run.run_key, "step": st.step,
            "best_val": st.best_val, "has_best": st.best_state is not None, "history": st.history,
            "scaler": run.amp.state_dict(), "optimizer_scalars": opt_scalars}
    run.work.save_tensors(meta, tensors, STATE_KEY)


def _validate(run: _Run) -> None:
    """Held-out loss; keep the step sizes when it is the best so far."""
    st, objective = run.state, run.objective
    v = evaluate(run.model, run.val, run.sched.micro, run.device, run.eval_teacher, run.amp)
    other = [v["nll"] if objective == "kl" else v["kl"]] if run.eval_teacher is not None else []
    st.history["val_loss"].append([st.step, v[objective], *other])
    if not math.isnan(v[objective]) and (st.best_val is None or v[objective] < st.best_val):
        st.best_val, st.best_state = v[objective], _trainable_state(run.layers)
    run.progress("eval", {"step": st.step, "val_loss": v[objective], "best": st.best_val, **v})
    run.model.train()


def _train(run: _Run) -> float:
    """Optimizer steps from the current one to the last, validating and saving on schedule, and
    a held-out loss at the end; returns the seconds spent."""
    cfg, sched, st = run.cfg, run.sched, run.state
    t0 = time.time()
    run.model.train()
    run.progress("start", {"total": sched.total, "step": st.step, "lr": sched.lr, "global_batch": cfg.global_batch,
                           "micro_batch": sched.micro, "grad_accum": sched.accum, "amp": run.amp.name,
                           "loss": cfg.loss})
    if st.step == 0:
        _validate(run)  # the starting point: its loss is the baseline, and "best" if training hurts
    while st.step < sched.total:
        gb = _global_batch(run)
        loss_value, nll = _optimizer_step(run, gb)
        st.step += 1
        run.tokens += run.train.n_tokens(gb)
        st.history["train_loss"].append([st.step, loss_value, *([nll] if run.teacher is not None else [])])
        elapsed = time.time() - t0
        run.progress("step", {"step": st.step, "total": sched.total, "loss": loss_value,
                              "lr": run.opt.param_groups[0]["lr"],
                              "tokens_per_second": run.tokens / max(elapsed, 1e-9)})
        if (cfg.eval_steps and st.step % cfg.eval_steps == 0) or st.step % sched.steps_per_epoch == 0:
            _validate(run)
        if cfg.save_steps and st.step % cfg.save_steps == 0 and st.step < sched.total:
            _save_resume_state(run)
    if not st.history["val_loss"] or st.history["val_loss"][-1][0] != st.step:
        _validate(run)
    return time.time() - t0


def _global_batch(run: _Run) -> torch.Tensor:
    """The examples of the current step: a pure function of (seed, step)."""
    sched, gbs = run.sched, run.cfg.global_batch
    epoch, in_epoch = divmod(run.state.step, sched.steps_per_epoch)
    perm = torch.randperm(sched.n, generator=torch.Generator().manual_seed(run.cfg.seed * 1000 + epoch))
    return perm[in_epoch * gbs : (in_epoch + 1) * gbs]


def _optimizer_step(run: _Run, gb: torch.Tensor) -> tuple[float, float]:
    """One optimizer step on a global batch, accumulated over micro-batches and summed over the
    processes; returns the batch's (objective, NLL) per learned token. A non-finite loss saves the
    resume state and stops."""
    sched, rank, ws, device, step = run.sched, run.rank, run.ws, run.device, run.state.step
    count = run.train.n_targets(gb)  # learned tokens of the whole global batch: the loss divisor
    for g in run.opt.param_groups:
        g["lr"] = sched.lr_at(step)
    run.opt.zero_grad(set_to_none=True)
    step_loss = torch.zeros(2, dtype=torch.float64)  # objective, NLL (sums over this rank)
    for a in range(sched.accum):
        start = (a * ws + rank) * sched.micro
        ids, labels, mask = run.train.collate(gb[start : start + sched.micro])
        obj, nll, _ = loss_sums(run.model, ids.to(device), labels.to(device), mask.to(device), run.teacher, run.amp)
        run.amp.backward(obj / max(count, 1))
        step_loss += torch.tensor([float(obj.detach()), float(nll)], dtype=torch.float64)
    if ws > 1:
        for p in run.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        dist.all_reduce(step_loss)
    step_loss /= max(count, 1)
    loss_value = float(step_loss[0])
    if not math.isfinite(loss_value):
        _save_resume_state(run)
        raise NonFiniteLossError(
            f"E2E-QP: loss became {loss_value} at step {step + 1}; the last saved state is kept in {run.work.path}"
        )
    run.amp.unscale_(run.opt)
    if run.cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.params, run.cfg.max_grad_norm)
    run.amp.step(run.opt)
    return loss_value, float(step_loss[1])


def _write_output(run: _Run, output: Path, tokenizer: Any, eqat_meta: "CheckpointMeta | dict") -> None:
    """Rank 0 writes the best step sizes to ``output`` and the last to ``output/last``, with the
    history; the work directory goes. Every process waits for it."""
    cfg, sched, st, model, layers = run.cfg, run.sched, run.state, run.model, run.layers
    model.eval()
    _disable_checkpointing(model)
    base = eqat_meta if isinstance(eqat_meta, CheckpointMeta) else CheckpointMeta().updated(eqat_meta)
    meta = base.updated(e2e_qp={**dataclasses.asdict(cfg), "lr": sched.lr, "world_size": run.ws,
                                "micro_batch": sched.micro, "grad_accum": sched.accum, "steps": st.step,
                                "warmup_steps": sched.warmup, "amp": run.amp.name, "best_val_loss": st.best_val,
                                "data": run.train.meta})
    if run.rank == 0:
        last_state = _trainable_state(layers)
        with atomic_dir(output, overwrite=True) as tmp:
            # The output is the best step sizes by held-out loss; last/ holds the final step's.
            for name, state in (("last", last_state), ("best", st.best_state or last_state)):
                for m in layers.values():
                    m.start_training(cfg.train_zeros)
                _load_trainable(layers, state)
                for m in layers.values():
                    m.finish_training()  # zero points rounded, clamped, re-packed
                target = tmp / "last" if name == "last" else tmp
                target.mkdir(exist_ok=True)
                save_native(model, tokenizer, target, meta.updated(e2e_selected=name))
            (tmp / "e2e_history.json").write_text(json.dumps(st.history, indent=2))
        run.work.discard()
    if run.ws > 1:
        dist.barrier()
