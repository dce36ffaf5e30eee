"""``eqat e2e-qp``: end-to-end training of step sizes with frozen integer codes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from eqat_cli.cli.common import DataDirOpt, DeviceOpt, JsonOpt, ModelArg, OutOpt, OverwriteOpt, SeedOpt, guarded
from eqat_cli.errors import NotBuiltError


def register(app: typer.Typer) -> None:
    @app.command("e2e-qp")
    @guarded
    def e2e_qp_cmd(
        model: ModelArg,
        dataset: Annotated[str, typer.Option("--dataset", "-d", help="Corpus name or file (.txt/.jsonl/.parquet).")],
        output: OutOpt,
        data_format: Annotated[str, typer.Option("--format", help="pt (pre-training text) or instruct (prompt masked).")] = "pt",
        seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per window.")] = 4096,
        samples: Annotated[int, typer.Option("--samples", help="Training windows.")] = 4096,
        epochs: Annotated[int, typer.Option("--epochs")] = 1,
        lr: Annotated[Optional[float], typer.Option("--lr", help="Default 2e-5 at 2 bits, else 1e-5.")] = None,
        train_zeros: Annotated[bool, typer.Option("--train-zeros", help="Also train zero points.")] = False,
        seed: SeedOpt = 2,
        device: DeviceOpt = "auto",
        data_dir: DataDirOpt = None,
        overwrite: OverwriteOpt = False,
        json_out: JsonOpt = None,
    ):
        """E2E-QP: train step sizes end to end on next-token loss (codes stay frozen).

        Example: [bold]eqat e2e-qp out/w2g64 --dataset c4 --seqlen 1024 -o out/w2g64-e2e[/]
        """
        raise NotBuiltError("`eqat e2e-qp` is not built yet (tracked in the E2E-QP issue)")
