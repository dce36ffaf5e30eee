"""``eqat e2e-qp``: end-to-end training of step sizes with frozen integer codes."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from eqat_cli.cli.common import (
    AT_LEAST_1, LEARNING_RATE, NON_NEGATIVE, DataDirOpt, DeviceOpt, JsonOpt, ModelArg, OutOpt, OverwriteOpt,
    PrecisionOpt, Range, SeedOpt, TrustRemoteCodeOpt, WaitOpt, console, emit_json, progress_bars, render_lock_event,
)


class _LiveProgress:
    """Renders E2E-QP's events: the run line once prepared, then one bar of optimizer steps
    (rank 0 only) and a line per held-out evaluation."""

    def __init__(self, loss: str):
        self.loss = loss
        self.bar = None

    def __call__(self, event: str, info: dict) -> None:
        if render_lock_event(event, info):
            return
        if event == "prepared":
            if info["rank"] == 0:
                console.print(f"E2E-QP ({info['loss']}) on {info['device']} x{info['world_size']}: {info['train']} "
                              f"train / {info['val']} val examples of {info['seqlen']} tokens, lr {info['lr']:g}, "
                              f"global batch {info['global_batch']} ({info['world_size']} x {info['micro_batch']} x "
                              f"{info['grad_accum']} accumulation)")
            self.bar = progress_bars(eta=True, info=True, disable=info["rank"] != 0)
            self.task = self.bar.add_task("E2E-QP", total=None, info="")
            self.bar.start()
        elif event == "start":
            self.bar.update(self.task, total=info["total"], completed=info["step"])
        elif event == "step":
            self.bar.update(self.task, completed=info["step"],
                            info=f"loss {info['loss']:.4f} lr {info['lr']:.2e} {info['tokens_per_second']:.0f} tok/s")
        elif event == "eval":
            extra = "".join(f", {name} {info[k]:.4f}" for k, name in (("nll", "next-token"), ("kl", "KL"))
                            if k in info and info[k] != info["val_loss"])
            self.bar.console.print(f"step {info['step']}: held-out {self.loss} loss {info['val_loss']:.4f} "
                                   f"(best {info['best']:.4f}{extra})")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


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
    precision: PrecisionOpt = "auto",
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the last saved step.")] = True,
    seed: SeedOpt = 2,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    overwrite: OverwriteOpt = False,
    wait: WaitOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = None,
):
    """Runs on one process, or data-parallel on many:
    [bold]torchrun --nproc-per-node 2 -m eqat_cli e2e-qp ...[/] (gloo on CPU, nccl on GPU);
    the global batch stays --global-batch whatever the number of processes.

    Example: [bold]eqat e2e-qp out/w2g64 --dataset c4 --seqlen 1024 --samples 512 -o out/w2g64-e2e[/]
    """
    from eqat_cli.train.e2e_qp import E2EConfig, e2e_qp_from_spec

    cfg = E2EConfig(epochs=epochs, lr=lr, global_batch=global_batch, batch_size=batch_size,
                    warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm or None, weight_decay=weight_decay,
                    eval_steps=eval_steps, save_steps=save_steps, train_zeros=train_zeros,
                    gradient_checkpointing=gradient_checkpointing, seed=seed, loss=loss, precision=precision)
    live = _LiveProgress(loss)
    try:
        res = e2e_qp_from_spec(model, dataset, output, cfg, data_format=data_format, teacher=teacher,
                               samples=samples, seqlen=seqlen, val_samples=val_samples, device=device,
                               data_dir=data_dir, progress=live, resume=resume, overwrite=overwrite, wait=wait)
    finally:
        live.close()
    if res.rank == 0:
        console.print(f"wrote {res.output} (best held-out loss {res.best_val}; last step in {res.output}/last), "
                      f"{res.tokens_per_second:.0f} tokens/s  next: [bold]eqat eval {res.output} --ppl wikitext2[/]")
        emit_json({"output": str(res.output), "steps": res.steps, "loss": loss, "best_val_loss": res.best_val,
                   "val_loss": res.val_loss, "train_loss": res.train_loss, "seconds": res.seconds,
                   "tokens_per_second": res.tokens_per_second, "resumed_from_step": res.resumed_from_step,
                   "world_size": res.world_size, "global_batch": res.global_batch, "micro_batch": res.micro_batch,
                   "grad_accum": res.grad_accum}, json_out)
