"""``eqat e2e-qp``: end-to-end training of step sizes with frozen integer codes."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from eqat_cli.cli.common import (
    AT_LEAST_1, LEARNING_RATE, NON_NEGATIVE, DataDirOpt, DeviceOpt, JsonOpt, ModelArg, OutOpt, OverwriteOpt, Range,
    SeedOpt, TrustRemoteCodeOpt, console, emit_json, progress_bars,
)


def load_teacher(spec: str, student, device: str):
    """The full-precision teacher for ``--loss kd``; refused unless it is FP with the student's vocabulary."""
    from eqat_cli.errors import BadInputError
    from eqat_cli.models import resolve

    t = resolve(spec, device=device)
    if t.format != "fp":
        raise BadInputError(f"--teacher {spec} is a {t.format} checkpoint; the teacher must be full precision")
    tv, sv = t.model.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if tv != sv:
        raise BadInputError(f"--teacher {spec} has a vocabulary of {tv}, the quantized model {sv}: not its source model")
    return t.model


def e2e_qp_cmd(
    model: ModelArg,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Corpus name or file (.txt/.jsonl/.parquet); instruction .jsonl with --format instruct.")],
    output: OutOpt,
    data_format: Annotated[str, typer.Option("--format", help="pt (pre-training text) or instruct (only assistant turns learned).")] = "pt",
    loss: Annotated[str, typer.Option("--loss", help="kd: match the full-precision teacher's next-token distribution (KL); ntp: next-token loss.")] = "kd",
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="Full-precision teacher for --loss kd (default: the model Block-AP quantized); with --loss ntp it only adds the held-out KL.")] = None,
    seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per example (instruct: at most)."), Range(ge=2)] = 4096,
    samples: Annotated[int, typer.Option("--samples", help="Training examples."), AT_LEAST_1] = 4096,
    val_samples: Annotated[int, typer.Option("--val-samples", help="Held-out examples."), NON_NEGATIVE] = 64,
    epochs: Annotated[int, typer.Option("--epochs"), AT_LEAST_1] = 1,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Default 2e-5 at 2 bits, else 1e-5."), LEARNING_RATE] = None,
    global_batch: Annotated[int, typer.Option("--global-batch", help="Examples per optimizer step over all processes (paper: 32)."), AT_LEAST_1] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", help="At most this many examples per process per micro-step; gradient accumulation makes up the global batch."), AT_LEAST_1] = 4,
    warmup_ratio: Annotated[float, typer.Option("--warmup-ratio"), Range(ge=0, lt=1)] = 0.03,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="0 disables clipping."), NON_NEGATIVE] = 0.3,
    weight_decay: Annotated[float, typer.Option("--wd"), NON_NEGATIVE] = 0.0,
    eval_steps: Annotated[int, typer.Option("--eval-steps", help="Held-out loss every K steps (0 = per epoch)."), NON_NEGATIVE] = 64,
    save_steps: Annotated[int, typer.Option("--save-steps", help="Resume state every K steps."), AT_LEAST_1] = 50,
    train_zeros: Annotated[bool, typer.Option("--train-zeros", help="Also train zero points.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")] = True,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the last saved step.")] = True,
    seed: SeedOpt = 2,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = None,
):
    """Runs on one process, or data-parallel on many:
    [bold]torchrun --nproc-per-node 2 -m eqat_cli e2e-qp ...[/] (gloo on CPU, nccl on GPU);
    the global batch stays --global-batch whatever the number of processes.

    Example: [bold]eqat e2e-qp out/w2g64 --dataset c4 --seqlen 1024 --samples 512 -o out/w2g64-e2e[/]
    """
    from eqat_cli.errors import BadInputError
    from eqat_cli.models import resolve
    from eqat_cli.train.e2e_qp import LOSSES, E2EConfig, init_distributed, run_e2e_qp, world

    from eqat_cli.fsutil import check_output
    from eqat_cli.readers import preflight_model, read_jsonl
    from eqat_cli.train.sft_data import training_examples

    if data_format not in ("pt", "instruct"):
        raise BadInputError(f"--format must be pt or instruct, got {data_format!r}")
    if loss not in LOSSES:
        raise BadInputError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    cfg = E2EConfig(epochs=epochs, lr=lr, global_batch=global_batch, batch_size=batch_size,
                    warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm or None, weight_decay=weight_decay,
                    eval_steps=eval_steps, save_steps=save_steps, train_zeros=train_zeros,
                    gradient_checkpointing=gradient_checkpointing, seed=seed, loss=loss)
    init_distributed()
    rank, ws = world()
    micro, accum = cfg.micro_batches(ws)
    check_output(output, overwrite)
    if preflight_model(model) is False:
        raise BadInputError(f"{model} is not quantized; run `eqat block-ap` first")
    if data_format == "instruct":  # every line readable before the model is loaded
        for _ in read_jsonl(dataset, "instruction data file"):
            pass
    lm = resolve(model, device=device)
    if lm.format == "fp":
        raise BadInputError(f"{model} is not quantized; run `eqat block-ap` first")
    if lm.format != "eqat":
        raise BadInputError(f"{model} is a {lm.format} checkpoint; E2E-QP trains eqat/EfficientQAT native models")
    bits = lm.quant["bits"] if isinstance(lm.quant["bits"], int) else max(lm.quant["bits"])
    from eqat_cli.formats.native import eqat_section

    eqat_meta = {k: v for k, v in (eqat_section(lm.path) or {}).items() if k not in ("format", "format_version")}
    teacher_model = None
    if loss == "kd" or teacher:  # with ntp, --teacher adds the held-out KL to the evaluations
        spec = teacher or eqat_meta.get("source_model")
        if not spec:
            raise BadInputError(f"{model} does not record the model it was quantized from; pass --teacher MODEL "
                                f"(its full-precision source) or use --loss ntp")
        teacher_model = load_teacher(spec, lm.model, device)
    train, val = training_examples(dataset, lm.tokenizer, data_format, samples, seqlen, val_samples, seed, data_dir)
    dev = next(lm.model.parameters()).device
    eqat_meta.setdefault("bits", bits)
    eqat_meta.setdefault("group_size", lm.quant["group_size"])
    eqat_meta.setdefault("architecture", lm.arch.name)
    if rank == 0:
        console.print(f"E2E-QP ({loss}) on {dev} x{ws}: {len(train)} train / {len(val)} val examples "
                      f"of {seqlen} tokens, lr {cfg.resolved_lr(bits):g}, global batch {global_batch} "
                      f"({ws} x {micro} x {accum} accumulation)")
    bar = progress_bars(eta=True, info=True, disable=rank != 0)
    task = bar.add_task("E2E-QP", total=None, info="")

    def progress(event, info):
        if event == "start":
            bar.update(task, total=info["total"], completed=info["step"])
        elif event == "step":
            bar.update(task, completed=info["step"],
                       info=f"loss {info['loss']:.4f} lr {info['lr']:.2e} {info['tokens_per_second']:.0f} tok/s")
        elif event == "eval":
            extra = "".join(f", {name} {info[k]:.4f}" for k, name in (("nll", "next-token"), ("kl", "KL"))
                            if k in info and info[k] != info["val_loss"])
            bar.console.print(f"step {info['step']}: held-out {loss} loss {info['val_loss']:.4f} "
                              f"(best {info['best']:.4f}{extra})")

    with bar:
        res = run_e2e_qp(lm.model, lm.tokenizer, train, val, cfg, output, dev, bits, eqat_meta,
                         progress=progress, resume=resume, overwrite=overwrite, teacher=teacher_model)
    if rank == 0:
        console.print(f"wrote {res.output} (best held-out loss {res.best_val}; last step in {res.output}/last), "
                      f"{res.tokens_per_second:.0f} tokens/s  next: [bold]eqat eval {res.output} --ppl wikitext2[/]")
        emit_json({"output": str(res.output), "steps": res.steps, "loss": loss, "best_val_loss": res.best_val,
                   "val_loss": res.val_loss, "train_loss": res.train_loss, "seconds": res.seconds,
                   "tokens_per_second": res.tokens_per_second, "resumed_from_step": res.resumed_from_step,
                   "world_size": ws, "global_batch": res.global_batch, "micro_batch": res.micro_batch,
                   "grad_accum": res.grad_accum}, json_out)
