"""``eqat block-ap``: block-wise training of all parameters, then freeze as integers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from eqat_cli.cli.common import (
    AT_LEAST_1, LEARNING_RATE, NON_NEGATIVE, POSITIVE, BitsOpt, DataDirOpt, DeviceOpt, GroupOpt, JsonOpt,
    ModelArg, OutOpt, OverwriteOpt, PrecisionOpt, Range, SeedOpt, TrustRemoteCodeOpt, WaitOpt, console, emit_json,
    progress_bars, render_lock_event,
)


class _LiveProgress:
    """Renders Block-AP progress events with Rich: the lock, the calibration spinner, the run line
    once prepared, then blocks, steps, losses, elapsed/remaining."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.progress = None
        self.status = None
        self.steps = None

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, event: str, info: dict) -> None:
        if render_lock_event(event, info):
            return
        if event == "calibration":
            if not info["done"]:
                self.status = console.status(f"reading and tokenizing {info['dataset']}...")
                self.status.start()
            elif self.status is not None:
                self.status.stop()
                self.status = None
            return
        if event == "sensitivity":
            if self.status is None:
                self.status = console.status("measuring each layer's sensitivity...")
                self.status.start()
            self.status.update(f"measuring each layer's sensitivity: block {info['block'] + 1}/{info['blocks']}")
            return
        if event == "mixed":
            if self.status is not None:
                self.status.stop()
                self.status = None
            hist = ", ".join(f"{b}-bit {share:.0%}" for b, share in info["histogram"].items())
            console.print(f"mixed precision: mean code width {info['code_bits']:.3f} bits "
                          f"(target {info['avg_bits']:g}): {hist} of the weights")
            return
        if event == "prepared":
            cfg = info.get("config", self.cfg)  # param="auto" resolved by the steps per block
            width = f"avg {cfg.avg_bits:g} bits g{cfg.group_size}" if cfg.avg_bits is not None else str(self.cfg.scheme)
            console.print(
                f"Block-AP {width} on {info['device']}: {info['train']} train / {info['val']} val "
                f"windows, recipe {cfg.recipe}: {info['steps']} steps of {cfg.batch_size} per block, "
                f"{cfg.describe_param()} parameters, {cfg.optimizer}, lr {cfg.describe_lr()}"
                + (f", target {cfg.target}" if cfg.target else "")
            )
            self.progress = progress_bars(eta=True, info=True)
            self.blocks = self.progress.add_task("blocks", total=None, info="")
            self.progress.start()
            return
        p = self.progress
        if p is None:
            return
        if event == "block_start":
            p.update(self.blocks, total=info["blocks"], description=f"block {info['block'] + 1}/{info['blocks']}",
                     info="(resumed: replaying)" if info["resumed"] else "")
            if self.steps is not None:
                p.remove_task(self.steps)
                self.steps = None
        elif event == "step":
            if self.steps is None:
                self.steps = p.add_task("  steps", total=info["total_steps"], info="")
            p.update(self.steps, advance=1, description=f"  epoch {info['epoch']}/{info['epochs']}",
                     info=f"loss {info['loss']:.3g}")
        elif event == "epoch":
            p.update(self.blocks, info=f"epoch {info['epoch']}: train {info['train_loss']:.3g} val {info['val_loss']:.3g}")
        elif event == "restored" and info.get("epoch") is not None:  # --best val; --best train is silent
            where = "its start" if info["epoch"] == 0 else f"epoch {info['epoch']}"
            console.print(f"block {info['block']}: kept {where} (best validation loss {info['val_loss']:.4g})")
        elif event == "block_end":
            p.update(self.blocks, advance=1,
                     info=f"loss {info['loss_before']:.3g} -> {info['loss_after']:.3g}")


def block_ap_cmd(
    model: ModelArg,
    output: OutOpt,
    bits: BitsOpt = 2,
    group: GroupOpt = 64,
    avg_bits: Annotated[Optional[float], typer.Option("--avg-bits", help="Mixed precision: give each linear layer 2, 3, 4 or 8 bits by its measured sensitivity (RTN error of the block's output on the calibration windows), so that the parameter-weighted mean code width is at most this (e.g. 2.5; step sizes and zero points not counted). --bits is then ignored."), Range(ge=2, le=8)] = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="File from `eqat calibrate`.")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Calibrate on the fly from this corpus.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Calibration windows (with --dataset)."), AT_LEAST_1] = 4096,
    seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per window (with --dataset)."), Range(ge=2)] = 2048,
    val_samples: Annotated[int, typer.Option("--val-samples", help="Validation windows (with --dataset)."), NON_NEGATIVE] = 64,
    recipe: Annotated[str, typer.Option("--recipe", help="default: eqat's recipe (min-max start; learned rounding offsets and clipping factors with signed gradient descent and a linear schedule, or from a measured number of steps per block the paper's free weights: --param auto; 2 epochs of batch 8, at least 32 steps; token-rel loss; each block ends at its best validation state); paper: EfficientQAT's Block-AP exactly as published (min-max start; weights, step sizes and zero points with AdamW; 2 epochs of batch 2; cosine). Options given below override the recipe's values.")] = "default",
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Epochs per block (default: 2, more if fewer than 32 steps; paper: 2); 0 with --steps 0 = the starting point only (RTN, or GPTQ with --init gptq; after channel scaling where it is on)."), NON_NEGATIVE] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps per block, instead of --epochs (0 = use --epochs)."), NON_NEGATIVE] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Windows per step (default 8; paper 2)."), AT_LEAST_1] = None,
    param: Annotated[Optional[str], typer.Option("--param", help="What trains: auto (default recipe: round below a measured number of steps per block, free from there; the run says which), round (rounding offsets in [-0.5, 0.5] and per-group clipping factors) or free (weights, step sizes, zero points; paper).")] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="sign (signed gradient descent; with round) or adamw (paper; with free). Default: the one that goes with --param.")] = None,
    schedule: Annotated[Optional[str], typer.Option("--schedule", help="Learning-rate schedule: linear to 0 (with round) or cosine to lr/--min-lr-factor (paper; with free). Default: the one that goes with --param.")] = None,
    quant_lr: Annotated[Optional[float], typer.Option("--quant-lr", help="Learning rate of step sizes and zero points (free; paper 1e-4) or clipping factors (round; default 1/steps)."), LEARNING_RATE] = None,
    weight_lr: Annotated[Optional[float], typer.Option("--weight-lr", help="Learning rate of weights (free; paper 2e-5 at 2 bits, else 1e-5) or rounding offsets (round; default 1/steps)."), LEARNING_RATE] = None,
    min_lr_factor: Annotated[float, typer.Option("--min-lr-factor", help="Cosine schedule ends at lr / this."), Range(ge=1)] = 20.0,
    weight_decay: Annotated[float, typer.Option("--wd", help="AdamW weight decay."), NON_NEGATIVE] = 0.0,
    max_grad_norm: Annotated[Optional[float], typer.Option("--max-grad-norm", help="Gradient clipping (off if unset)."), POSITIVE] = None,
    early_stop: Annotated[int, typer.Option("--early-stop", help="Stop a block after N epochs without val improvement (0 = off)."), NON_NEGATIVE] = 0,
    loss: Annotated[Optional[str], typer.Option("--loss", help="Block reconstruction loss: token-rel (default: each token's error relative to its size; models with massive activations) or mse (paper).")] = None,
    init: Annotated[Optional[str], typer.Option("--init", help="Starting point of each block: minmax (round-to-nearest; default and paper) or gptq (GPTQ codes from the block's own inputs). With no training steps this is the result: RTN or GPTQ.")] = None,
    gptq_damp: Annotated[float, typer.Option("--gptq-damp", help="GPTQ dampening: fraction of the mean Hessian diagonal added to it (with --init gptq)."), Range(gt=0, lt=1)] = 0.01,
    best: Annotated[Optional[str], typer.Option("--best", help="Which state a block ends with: val (best validation loss at an epoch end, its start included: never worse than RTN/GPTQ on validation; default), train (lowest training-batch loss at any step, as AutoRound) or last (paper).")] = None,
    keep_best: Annotated[bool, typer.Option("--keep-best", help="Same as --best val (the default recipe's choice).")] = False,
    target: Annotated[Optional[str], typer.Option("--target", help="Train on a llama.cpp GGML grid and store its blocks, so `eqat pack --format gguf` is exact at that type's size: gguf:q2_k, gguf:q3_k or gguf:q4_k (rows not a multiple of 256 get llama-quantize's fallback, IQ4_NL or Q5_0). Needs --param round --init minmax.")] = None,
    channel_scale: Annotated[Optional[bool], typer.Option("--channel-scale/--no-channel-scale", help="Before each block starts, move AWQ-searched per-channel scales within the architecture's scale pairs (up_proj rows -> down_proj columns): the block computes the same function, and its grids protect channels with large activations. Default: on at 2 and 3 bits, off at 4 and more; paper: off.")] = None,
    precision: PrecisionOpt = "auto",
    offload_to_disk: Annotated[bool, typer.Option("--offload-to-disk", help="Keep block inputs/targets in memory-mapped files.")] = False,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the last finished block.")] = True,
    seed: SeedOpt = 2,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    overwrite: OverwriteOpt = False,
    wait: WaitOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = None,
):
    """Blocks are trained in order; the inputs of block i are the outputs of the quantized blocks
    before it. Only one block is on the accelerator; weights are read block by block. A finished
    block is never lost: re-running the same command resumes after the last finished block.

    Examples:

      [bold]eqat block-ap meta-llama/Llama-2-70b --bits 2 --group 64 --calib calib.safetensors -o out/70b-w2g64[/]

      [bold]eqat block-ap smollm2 --bits 4 --group 64 --epochs 0 --dataset c4 -o out/rtn-w4g64[/]  (RTN baseline)

      [bold]eqat block-ap smollm2 --bits 2 --group 64 --recipe paper --dataset c4 -o out/w2g64-paper[/]  (the paper's recipe)
    """
    from rich.table import Table

    from eqat_cli.scheme import QuantScheme
    from eqat_cli.train.block_ap import BlockAPConfig, block_ap_from_spec

    QuantScheme(bits, group)  # bits first, before the recipe's options
    given = dict(epochs=epochs, steps=steps, batch_size=batch_size, param=param, optimizer=optimizer,
                 schedule=schedule, quant_lr=quant_lr, weight_lr=weight_lr, loss=loss, init=init, best=best,
                 channel_scale=channel_scale, target=target)
    cfg = BlockAPConfig.from_recipe(  # validates every option before any data is loaded
        recipe, bits=bits, group_size=group, min_lr_factor=min_lr_factor, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, early_stop=early_stop, seed=seed, offload_to_disk=offload_to_disk,
        gptq_damp=gptq_damp, keep_best=keep_best, precision=precision, avg_bits=avg_bits,
        **{k: v for k, v in given.items() if v is not None},
    )
    live = _LiveProgress(cfg)
    try:
        result = block_ap_from_spec(model, output, cfg, calib=calib, dataset=dataset, samples=samples,
                                    seqlen=seqlen, val_samples=val_samples, device=device, data_dir=data_dir,
                                    progress=live, resume=resume, overwrite=overwrite, wait=wait)
    finally:
        live.close()
    cfg = result.config or cfg
    t = Table(title=f"Block-AP summary ({result.seconds:.0f} s, {cfg.describe_param()} parameters)")
    for col in ("block", f"val {cfg.loss} before ({'RTN' if cfg.init == 'minmax' else 'GPTQ'})", f"val {cfg.loss} after", "time (s)"):
        t.add_column(col, justify="right")
    for b in result.blocks:
        t.add_row(str(b["block"]), f"{b['loss_before']:.4g}", f"{b['loss_after']:.4g}", f"{b['seconds']:.1f}")
    console.print(t)
    if result.resumed_from:
        console.print(f"resumed after {result.resumed_from} finished blocks")
    console.print(f"peak RSS {result.peak_rss_mb:,.0f} MiB")
    console.print(f"wrote {result.output}  next: [bold]eqat eval {result.output} --ppl wikitext2[/]")
    emit_json({"output": str(result.output), "seconds": result.seconds, "resumed_from": result.resumed_from,
               "peak_rss_mb": result.peak_rss_mb,
               "config": cfg.to_json(), "blocks": result.blocks}, json_out)
