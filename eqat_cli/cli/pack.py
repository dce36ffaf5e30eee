"""``eqat pack``: convert a quantized model between checkpoint formats."""

from __future__ import annotations

from typing import Annotated

import typer

from eqat_cli.cli.common import ModelArg, OutOpt, OverwriteOpt, guarded
from eqat_cli.errors import NotBuiltError

FORMATS = ("eqat", "gptq", "gptq_v2", "fp16", "gguf")


def register(app: typer.Typer) -> None:
    @app.command("pack")
    @guarded
    def pack_cmd(
        model: ModelArg,
        fmt: Annotated[str, typer.Option("--format", "-f", help=f"One of: {', '.join(FORMATS)}.")],
        output: OutOpt,
        overwrite: OverwriteOpt = False,
    ):
        """Write a quantized model as eqat native, GPTQ v1/v2, dense fp16, or GGUF.

        Example: [bold]eqat pack out/w4g64 --format gguf -o out/w4g64.gguf[/]
        """
        raise NotBuiltError("`eqat pack` is not built yet (tracked in the eval/pack/pull issue)")
