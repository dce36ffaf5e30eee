"""``eqat bench``: quantized vs dense layer latency and memory, and end-to-end generation."""

from __future__ import annotations

from typing import Annotated

import typer

from eqat_cli.cli.common import BackendOpt, JsonOpt, guarded
from eqat_cli.errors import NotBuiltError


def register(app: typer.Typer) -> None:
    @app.command("bench")
    @guarded
    def bench_cmd(
        bits: Annotated[int, typer.Option("--bits", "-b")] = 2,
        group: Annotated[int, typer.Option("--group", "-g")] = 64,
        shapes: Annotated[str, typer.Option("--shapes", help="llama-2-7b, llama-3-8b, or a model spec.")] = "llama-2-7b",
        backend: BackendOpt = "auto",
        json_out: JsonOpt = None,
    ):
        """Benchmark quantized layers against dense ones (median and spread of several runs).

        Example: [bold]eqat bench --bits 2 --group 64 --shapes llama-2-7b[/]
        """
        raise NotBuiltError("`eqat bench` is not built yet (tracked in the kernels issue)")
