"""``eqat eval``: perplexity and zero-shot accuracy of any model the resolver accepts."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from eqat_cli.cli.common import BackendOpt, DataDirOpt, DeviceOpt, JsonOpt, ModelArg, guarded
from eqat_cli.errors import NotBuiltError


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @guarded
    def eval_cmd(
        model: ModelArg,
        ppl: Annotated[Optional[str], typer.Option("--ppl", help="Perplexity sets, e.g. wikitext2,c4.")] = None,
        tasks: Annotated[Optional[str], typer.Option("--tasks", help="Zero-shot tasks, e.g. piqa,arc_easy,hellaswag.")] = None,
        seqlen: Annotated[int, typer.Option("--seqlen", help="Perplexity context length.")] = 2048,
        limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate only N windows / examples.")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size")] = 1,
        device: DeviceOpt = "auto",
        backend: BackendOpt = "auto",
        data_dir: DataDirOpt = None,
        json_out: JsonOpt = None,
    ):
        """Measure perplexity (GPTQ protocol) and zero-shot accuracy (lm-eval).

        Example: [bold]eqat eval ./out --ppl wikitext2 --tasks piqa,arc_easy[/]
        """
        raise NotBuiltError("`eqat eval` is not built yet (tracked in the eval/pack/pull issue)")
