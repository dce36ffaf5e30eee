"""``eqat pack``: convert a quantized model between checkpoint formats."""

from __future__ import annotations

from typing import Annotated

import typer

from eqat_cli.cli.common import (
    JsonOpt, ModelArg, OutOpt, OverwriteOpt, TrustRemoteCodeOpt, console, emit_json,
)
from eqat_cli.pack import FORMATS


def pack_cmd(
    model: ModelArg,
    fmt: Annotated[str, typer.Option("--format", "-f", help=f"One of: {', '.join(FORMATS)}.")],
    output: OutOpt,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = None,
):
    """GPTQ needs in_features to be a multiple of the group size; v1 cannot hold a zero point of
    0 (use gptq_v2, which is lossless). GGUF: 2/3-bit models as Q4_0 (exact), 4-bit as Q4_1,
    groups multiples of 32. MLX (mlx-lm): 2/3/4/8 bits, groups 32/64/128. Output is written
    atomically.

    Example: [bold]eqat pack out/w4g64 --format gguf -o out/w4g64.gguf[/]
    """
    from eqat_cli.formats.detect import human_bytes
    from eqat_cli.pack import pack_model

    def progress(event: str, info: dict) -> None:
        if event == "load" and info["done"] == 0:
            console.print(f"loading [bold]{info['label']}[/]")

    summary = pack_model(model, fmt, output, overwrite, progress)
    console.print(f"[green]wrote[/] {summary['output']} ({summary['format']}, "
                  f"{human_bytes(summary['size_bytes'])})")
    for note in summary.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"load with: {summary['load_with']}", soft_wrap=True)
    emit_json(summary, json_out)
