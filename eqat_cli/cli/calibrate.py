"""``eqat calibrate``: draw calibration windows from a corpus and save them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from eqat_cli.cli.common import DataDirOpt, ModelArg, OutOpt, OverwriteOpt, SeedOpt, guarded
from eqat_cli.errors import NotBuiltError


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    @guarded
    def calibrate_cmd(
        model: ModelArg,
        dataset: Annotated[str, typer.Option("--dataset", "-d", help="redpajama, c4, wikitext2, or a .txt/.jsonl/.parquet file.")],
        output: OutOpt,
        samples: Annotated[int, typer.Option("--samples", "-n", help="Training windows.")] = 4096,
        seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per window.")] = 2048,
        val_samples: Annotated[int, typer.Option("--val-samples", help="Validation windows (disjoint text).")] = 64,
        seed: SeedOpt = 2,
        data_dir: DataDirOpt = None,
        overwrite: OverwriteOpt = False,
    ):
        """Tokenize a corpus into random calibration windows (safetensors + metadata).

        Example: [bold]eqat calibrate smollm2 --dataset c4 --samples 128 --seqlen 512 -o calib.safetensors[/]
        """
        raise NotBuiltError("`eqat calibrate` is not built yet (calibration sampling is tracked in the Block-AP issue)")
