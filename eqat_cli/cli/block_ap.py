"""``eqat block-ap``: block-wise training of all parameters, then freeze as integers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from eqat_cli.cli.common import (
    BitsOpt, DataDirOpt, DeviceOpt, GroupOpt, JsonOpt, ModelArg, OutOpt, OverwriteOpt, SeedOpt, guarded,
)
from eqat_cli.errors import NotBuiltError


def register(app: typer.Typer) -> None:
    @app.command("block-ap")
    @guarded
    def block_ap_cmd(
        model: ModelArg,
        output: OutOpt,
        bits: BitsOpt = 2,
        group: GroupOpt = 64,
        calib: Annotated[Optional[Path], typer.Option("--calib", help="File from `eqat calibrate`.")] = None,
        dataset: Annotated[Optional[str], typer.Option("--dataset", help="Calibrate on the fly from this corpus.")] = None,
        samples: Annotated[int, typer.Option("--samples", help="Calibration windows (with --dataset).")] = 4096,
        seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per window (with --dataset).")] = 2048,
        val_samples: Annotated[int, typer.Option("--val-samples", help="Validation windows.")] = 64,
        epochs: Annotated[int, typer.Option("--epochs", help="Epochs per block; 0 = min-max (RTN) only.")] = 2,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per step.")] = 2,
        quant_lr: Annotated[float, typer.Option("--quant-lr", help="Learning rate of step sizes and zero points.")] = 1e-4,
        weight_lr: Annotated[Optional[float], typer.Option("--weight-lr", help="Weight learning rate (default 2e-5 at 2 bits, else 1e-5).")] = None,
        min_lr_factor: Annotated[float, typer.Option("--min-lr-factor", help="Cosine schedule ends at lr / this.")] = 20.0,
        weight_decay: Annotated[float, typer.Option("--wd", help="AdamW weight decay.")] = 0.0,
        max_grad_norm: Annotated[Optional[float], typer.Option("--max-grad-norm", help="Gradient clipping (off if unset).")] = None,
        early_stop: Annotated[int, typer.Option("--early-stop", help="Stop a block after N epochs without val improvement (0 = off).")] = 0,
        offload_to_disk: Annotated[bool, typer.Option("--offload-to-disk", help="Keep block inputs/targets in memory-mapped files.")] = False,
        resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the last finished block.")] = True,
        seed: SeedOpt = 2,
        device: DeviceOpt = "auto",
        data_dir: DataDirOpt = None,
        overwrite: OverwriteOpt = False,
        json_out: JsonOpt = None,
    ):
        """Block-AP: train each decoder block's weights, step sizes and zero points (MSE to FP).

        Examples:

          [bold]eqat block-ap meta-llama/Llama-2-70b --bits 2 --group 64 --calib calib.safetensors -o out/70b-w2g64[/]

          [bold]eqat block-ap smollm2 --bits 4 --group 64 --epochs 0 --dataset c4 -o out/rtn-w4g64[/]  (RTN baseline)
        """
        raise NotBuiltError("`eqat block-ap` is not built yet (tracked in the Block-AP issue)")
