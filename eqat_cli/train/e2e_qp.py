"""E2E-QP: end-to-end training of step sizes with frozen integer codes (EfficientQAT, phase 2).

Only ``scales`` of every :class:`PackedLinear` train (``train_zeros`` adds zero points); codes stay
packed. AdamW, linear warmup then cosine, gradient clipping, gradient checkpointing, autocast
(``precision``: bf16 on GPUs and on CPUs with bf16 units, fp16 with loss scaling on other GPUs:
:mod:`eqat_cli.train.amp`). Held-out loss every
``eval_steps``; the best and the last step sizes are both kept.

Objectives (``loss``):

* ``ntp``: next-token cross-entropy on the learned tokens.
* ``kd``: distillation, ``KL(teacher || student)`` between the full-precision teacher's next-token
  distribution and the student's, on the same learned tokens (temperature 1). The teacher runs
  alongside (no gradient) on each micro-batch; see ``docs/RESULTS.md`` for why that was chosen
  over cached top-k logits or a block-streamed teacher.

Both are sums over the learned tokens of the whole *global* batch divided by their count, so
gradient accumulation and N processes give the gradient of one big batch however the batch is
split. Logits are only formed at learned positions, a chunk of tokens at a time.

Global batch: ``global_batch`` examples per optimizer step (the paper's 32), split over the
processes and into micro-batches of at most ``batch_size``; the accumulation count follows.
Data parallel over ``torch.distributed`` (``torchrun``): gradients are summed with ``all_reduce``.

Resumable: every ``save_steps`` the trainable tensors, optimizer moments, loss scale, best-so-far,
history and step are written atomically to one safetensors file (the scalars as JSON in its
header: nothing is unpickled on resume); data order and learning rate are pure functions of
(seed, step), so a resumed run is bit-identical to an uninterrupted one.

:func:`run_e2e_qp` is a sequence of named steps: check the inputs, plan the batch split and the
schedule (:class:`_Schedule`), prepare the student (and teacher), resume or start, train, write the
output. The steps share one :class:`_Run` (the models, optimizer and data) whose :class:`_TrainState`
(step, best-so-far, history) is what a resume file restores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from eqat_cli.device import PRECISIONS
from eqat_cli.errors import BadInputError, EqatError
from eqat_cli.progress import Progress, no_progress
from eqat_cli.quant.linear import PackedLinear
from eqat_cli.train.amp import Amp
from eqat_cli.train.sft_data import IGNORE, Examples

STATE_FILE = "e2e_state.safetensors"
STATE_KEY = "eqat_e2e_state"
WORK_SUFFIX = ".partial"
LOSSES = ("ntp", "kd")
# Learned positions whose logits are formed at once (chunks beyond the first are recomputed in
# the backward instead of keeping [tokens, vocab] logits alive).
LOGIT_CHUNK = 2048


@dataclass(frozen=True)
class E2EConfig:
    epochs: int = 1
    lr: float | None = None  # paper: 2e-5 at 2 bits, 1e-5 otherwise
    global_batch: int = 32  # examples per optimizer step over all processes (paper: 4 x 8 accumulation)
    batch_size: int = 4  # at most this many examples per process per micro-step
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 0.3
    weight_decay: float = 0.0
    eval_steps: int = 64  # 0: evaluate at the end of each epoch only
    save_steps: int = 50
    train_zeros: bool = False
    gradient_checkpointing: bool = True
    seed: int = 2
    loss: str = "kd"
    # autocast of the training forwards: "auto" is bf16 on GPUs and on CPUs with bf16 units, else
    # fp32 (fp16 with loss scaling on GPUs without bf16); or fp32 / bf16 / fp16
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BadInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def resolved_lr(self, bits: int) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-5 if bits == 2 else 1e-5

    def micro_batches(self, world_size: int) -> tuple[int, int]:
        """``(micro_batch, accumulation)`` per process so that ``micro * accum * world == global``."""
        if self.global_batch % world_size:
            raise BadInputError(f"--global-batch {self.global_batch} is not divisible by the {world_size} processes")
        share = self.global_batch // world_size
        micro = min(self.batch_size, share)
        if share % micro:
            raise BadInputError(f"--global-batch {self.global_batch} over {world_size} process(es) gives {share} "
                                f"examples each, not a multiple of --batch-size {micro}")
        return micro, share // micro


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


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup ``(step + 1) / warmup``, then cosine to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(ratio: float, total: int) -> int:
    return math.ceil(ratio * total)  # as transformers' Trainer (the paper's scripts)


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


# ---------------------------------------------------------------------- losses


def _hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[batch, seq, hidden]`` (the body of the model, no LM head)."""
    out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _chunk_terms(head, h, targets, t_logp):
    """Per-chunk sums: (objective, next-token NLL). ``t_logp``: teacher log-probs or None (ntp)."""
    logp = F.log_softmax(head(h).float(), dim=-1)
    nll = -logp.gather(1, targets[:, None]).sum()
    if t_logp is None:
        return nll, nll.detach()
    return F.kl_div(logp, t_logp, log_target=True, reduction="sum"), nll.detach()


def loss_sums(model, ids, labels, mask, teacher=None, amp: Amp | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(objective sum, NLL sum, learned tokens)`` over one micro-batch.

    Objective: NLL without a teacher, else ``sum KL(teacher || student)`` over the positions whose
    next token is learned (label not IGNORE), i.e. masked like the LM loss.
    """
    amp = amp or Amp("cpu", None)
    sel = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][sel]
    n = int(targets.numel())
    with amp.autocast():
        h = _hidden(model, ids, mask)[:, :-1][sel]
        t_h = None
        if teacher is not None:
            with torch.no_grad():
                t_h = _hidden(teacher, ids, mask)[:, :-1][sel]
    head = model.get_output_embeddings()
    t_head = teacher.get_output_embeddings() if teacher is not None else None
    obj = h.new_zeros((), dtype=torch.float32)
    nll = torch.zeros((), dtype=torch.float32)
    for a in range(0, n, LOGIT_CHUNK):
        hc, tc = h[a : a + LOGIT_CHUNK], targets[a : a + LOGIT_CHUNK]
        t_logp = None
        if teacher is not None:
            with torch.no_grad(), amp.autocast():
                t_logp = F.log_softmax(t_head(t_h[a : a + LOGIT_CHUNK]).float(), dim=-1)

        def terms(hc=hc, tc=tc, t_logp=t_logp):
            with amp.autocast():
                return _chunk_terms(head, hc, tc, t_logp)

        o, l = checkpoint(terms, use_reentrant=False) if n > LOGIT_CHUNK and hc.requires_grad else terms()
        obj, nll = obj + o, nll + l.cpu()
    return obj, nll, n


def evaluate(model, data: Examples, batch: int, device, teacher=None, amp: Amp | None = None) -> dict:
    """Held-out mean next-token NLL (and KL to the teacher when given) over all learned tokens."""
    if len(data) == 0:
        return {"nll": float("nan"), **({"kl": float("nan")} if teacher is not None else {})}
    rank, ws = world()
    total = torch.zeros(3, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for s in range(rank * batch, len(data), batch * ws):
            ids, labels, mask = data.collate(range(s, min(s + batch, len(data))))
            obj, nll, n = loss_sums(model, ids.to(device), labels.to(device), mask.to(device), teacher, amp)
            total += torch.tensor([float(nll), float(obj), n], dtype=torch.float64)
    if ws > 1:
        dist.all_reduce(total)
    count = max(float(total[2]), 1.0)
    out = {"nll": float(total[0]) / count}
    if teacher is not None:
        out["kl"] = float(total[1]) / count
    return out


def evaluate_loss(model, data: Examples, batch: int, device) -> float:
    """Held-out next-token loss (the tests' and benchmarks' yardstick)."""
    return evaluate(model, data, batch, device)["nll"]


# ---------------------------------------------------------------------- resume state


def _save_state(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    from eqat_cli.fsutil import atomic_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={STATE_KEY: json.dumps(meta)})


def _read_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON header and tensors of a resume file; a damaged file is a one-line error."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[STATE_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any damage: name the file, say what to do
        raise BadInputError(
            f"{path}: damaged E2E-QP resume state ({type(e).__name__}: {str(e)[:120]}); "
            f"delete it or pass --no-resume to start over") from None
    if not isinstance(meta, dict) or meta.get("format") != "eqat-e2e-state":
        raise BadInputError(f"{path}: not an E2E-QP resume state; delete it or pass --no-resume")
    return meta, tensors


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{pid}.{name}"] = v
            else:
                scalars[f"{pid}.{name}"] = v
    return tensors, scalars


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            pid, name = key[len("optimizer."):].split(".", 1)
            state.setdefault(int(pid), {})[name] = v
    for key, v in scalars.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


# ---------------------------------------------------------------------- training


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


def _enable_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _disable_checkpointing(model) -> None:
    off = getattr(model, "activation_checkpointing_disable", None) or getattr(model, "gradient_checkpointing_disable", None)
    if off is not None:
        off()


def training_kernel(layers: dict[str, PackedLinear], train_zeros: bool, device: str | None = None):
    """The kernel E2E-QP trains these layers with, from the registry: the highest-priority
    backend available on ``device`` (default: where the layers are) for their bit widths and
    group sizes whose kernel has a backward for the step sizes (and the zero points with
    ``train_zeros``). Raises :class:`~eqat_cli.errors.UnsupportedError` when none has."""
    from eqat_cli.registry import get_registry

    if device is None:
        device = next(iter(layers.values())).qweight.device.type
    trains = ("scales", "zeros") if train_zeros else ("scales",)
    bits = sorted({m.bits for m in layers.values()})
    groups = sorted({m.group_size for m in layers.values()})
    spec, _why = get_registry().training_backend(bits, device, groups, trains)
    return spec.kernel()


def prepare_student(
    model: torch.nn.Module, train_zeros: bool, checkpointing: bool, device: str | None = None
) -> list[torch.nn.Parameter]:
    """Freeze everything but the packed layers' step sizes (and zero points); return those.

    The packed layers get the kernel :func:`training_kernel` picks for ``device`` (a device type;
    default: where the layers are now).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    layers = trainable_layers(model)
    kernel = training_kernel(layers, train_zeros, device) if layers else None
    params = []
    for m in layers.values():
        m.set_kernel(kernel)
        params.extend(m.start_training(train_zeros))
    if checkpointing:
        _enable_checkpointing(model)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return params


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
    """Train the packed layers' step sizes end to end; write the best (by held-out loss) and the last."""
    rank, ws = world()
    output = Path(output)
    layers = _check_inputs(model, cfg, output, overwrite, teacher)
    sched = _Schedule.plan(cfg, len(train), ws, bits)
    # With ntp a teacher, when given, only measures the held-out KL beside the next-token loss.
    eval_teacher, teacher = teacher, (teacher if cfg.loss == "kd" else None)
    params, amp = _prepare_models(model, eval_teacher, cfg, device, amp)
    run = _Run(
        model=model, layers=layers, params=params, amp=amp,
        opt=torch.optim.AdamW(params, lr=sched.lr, weight_decay=cfg.weight_decay),
        teacher=teacher, eval_teacher=eval_teacher, train=train, val=val, cfg=cfg, sched=sched,
        device=device, rank=rank, ws=ws, work=output.with_name(output.name + WORK_SUFFIX),
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
    if output.exists() and not overwrite:
        raise BadInputError(f"output {output} already exists (pass --overwrite to replace it)")
    if cfg.loss not in LOSSES:
        raise BadInputError(f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    if cfg.loss == "kd" and teacher is None:
        raise BadInputError("--loss kd needs the full-precision teacher (--teacher MODEL)")
    layers = trainable_layers(model)
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
                   warmup_steps(cfg.warmup_ratio, total))


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
    return json.loads(json.dumps(run_key))  # as it reads back from the JSON header


@dataclass
class _TrainState:
    """What a resume file restores besides tensors: the step, the best held-out loss and its step
    sizes, and the loss history."""

    step: int = 0
    best_val: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    history: dict = field(default_factory=lambda: {"train_loss": [], "val_loss": []})


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
    work: Path
    run_key: dict
    progress: Progress
    state: _TrainState = field(default_factory=_TrainState)
    resumed_from: int = 0
    tokens: int = 0  # tokens trained on by this process since it started

    @property
    def state_path(self) -> Path:
        return self.work / STATE_FILE

    @property
    def objective(self) -> str:
        return "kl" if self.teacher is not None else "nll"


def _resume_or_start(run: _Run, resume: bool) -> None:
    """Load the resume file when it was written by this same run; create the work directory."""
    if resume and run.state_path.exists():
        meta, tensors = _read_state(run.state_path)
        if meta["run_key"] == run.run_key:
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
        run.work.mkdir(parents=True, exist_ok=True)


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
    meta = {"format": "eqat-e2e-state", "version": 1, "run_key": run.run_key, "step": st.step,
            "best_val": st.best_val, "has_best": st.best_state is not None, "history": st.history,
            "scaler": run.amp.state_dict(), "optimizer_scalars": opt_scalars}
    _save_state(run.state_path, meta, tensors)


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
        g["lr"] = sched.lr * lr_factor(step, sched.total, sched.warmup)
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
            f"E2E-QP: loss became {loss_value} at step {step + 1}; the last saved state is kept in {run.work}"
        )
    run.amp.unscale_(run.opt)
    if run.cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.params, run.cfg.max_grad_norm)
    run.amp.step(run.opt)
    return loss_value, float(step_loss[1])


def _write_output(run: _Run, output: Path, tokenizer: Any, eqat_meta: "CheckpointMeta | dict") -> None:
    """Rank 0 writes the best step sizes to ``output`` and the last to ``output/last``, with the
    history; the work directory goes. Every process waits for it."""
    from eqat_cli.formats.meta import CheckpointMeta
    from eqat_cli.formats.native import save_native
    from eqat_cli.fsutil import atomic_dir

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
        shutil.rmtree(run.work, ignore_errors=True)
    if run.ws > 1:
        dist.barrier()
