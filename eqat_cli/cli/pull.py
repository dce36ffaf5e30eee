"""``eqat pull``: download a quantized model from the Hub and inspect it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from eqat_cli.cli.common import guarded
from eqat_cli.errors import NotBuiltError


def register(app: typer.Typer) -> None:
    @app.command("pull")
    @guarded
    def pull_cmd(
        repo_id: Annotated[str, typer.Argument(help="Hub repo id, e.g. ChenMnZ/Llama-2-7b-EfficientQAT-w2g64.", show_default=False)],
        revision: Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit.")] = None,
        local_dir: Annotated[Optional[Path], typer.Option("--local-dir", help="Download here instead of the HF cache.")] = None,
    ):
        """Download a model (resumable), then print its format, bits, group and size.

        Example: [bold]eqat pull ChenMnZ/Llama-2-7b-EfficientQAT-w2g64[/]
        """
        raise NotBuiltError("`eqat pull` is not built yet (tracked in the eval/pack/pull issue)")
