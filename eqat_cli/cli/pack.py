"""``eqat pack``: convert a quantized model between checkpoint formats."""

from __future__ import annotations

from typing import Annotated

import typer

from eqat_cli.cli.common import (
    JsonOpt, ModelArg, OutOpt, OverwriteOpt, TrustRemoteCodeOpt, WaitOpt, console, emit_json, render_lock_event,
)
from eqat_cli.formats.builtin import BUILTIN_FORMATS


def _format_help(names) -> str:
    return f"One of: {', '.join(names)}."


FORMAT_OPTION = typer.Option("--format", "-f", help=_format_help(f.name for f in BUILTIN_FORMATS))


def name_formats() -> None:
    """Name every registered output format, built-in or plugin, in ``--format``'s help
    (``build_app`` calls this once the plugins are loaded; the registry is torch-free)."""
    from eqat_cli.registry import get_registry

    FORMAT_OPTION.help = _format_help(get_registry().format_names())


def pack_cmd(
    model: ModelArg,
    fmt: Annotated[str, FORMAT_OPTION],
    output: OutOpt,
    overwrite: OverwriteOpt = False,
    wait: WaitOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = None,
):
    """GPTQ needs in_features to be a multiple of the group size; v1 cannot hold a zero point of
    0 (use gptq_v2, which is lossless). GGUF: 2/3-bit models as Q4_0 (exact), 4-bit as Q4_1,
    groups multiples of 32. MLX (mlx-lm): 2/3/4/8 bits, groups 32/64/128. Output is written
    atomically.

    Example: [bold]eqat pack out/w4g64 --format gguf -o out/w4g64.gguf[/]
    """
    from eqat_cli.formats.describe import human_bytes
    from eqat_cli.pack import pack_from_spec

    def progress(event: str, info: dict) -> None:
        if render_lock_event(event, info):
            return
        if event == "load" and info["done"] == 0:
            console.print(f"loading [bold]{info['label']}[/]")

    summary = pack_from_spec(model, fmt, output, overwrite, progress, wait=wait)
    console.print(f"[green]wrote[/] {summary['output']} ({summary['format']}, "
                  f"{human_bytes(summary['size_bytes'])})")
    for note in summary.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"load with: {summary['load_with']}", soft_wrap=True)
    emit_json(summary, json_out)
