"""``eqat pull``: download a quantized model from the Hub and inspect it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from eqat_cli.cli.common import JsonOpt, WaitOpt, console, emit_json, progress_bars, render_lock_event


def _bars() -> tuple[Any, Any]:
    """The download's Rich bars (bytes with size and speed, files as a count) and the library
    callback that draws ``pull_from_spec``'s ``download`` events and the output lock's events."""
    from rich.progress import DownloadColumn, ProgressColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.text import Text

    class AmountColumn(ProgressColumn):
        """Bytes for the bytes bar, a plain count for the files bar."""

        def __init__(self):
            super().__init__()
            self._bytes = DownloadColumn()

        def render(self, task):
            if task.fields.get("unit") == "B":
                return self._bytes.render(task)
            total = "?" if task.total is None else int(task.total)
            return Text(f"{int(task.completed)}/{total}", style="progress.download")

    class SpeedColumn(TransferSpeedColumn):
        def render(self, task):
            return super().render(task) if task.fields.get("unit") == "B" else Text("")

    bars = progress_bars(columns=(AmountColumn(), SpeedColumn(), TimeRemainingColumn()))
    tasks: dict[int, Any] = {}

    def progress(event: str, info: dict) -> None:
        if render_lock_event(event, info) or event != "download":
            return
        if info["bar"] not in tasks:
            unit = "B" if info["label"] == "bytes" else "files"
            tasks[info["bar"]] = bars.add_task(info["label"], total=info["total"], unit=unit)
        bars.update(tasks[info["bar"]], completed=info["done"], total=info["total"])

    return bars, progress


def pull_cmd(
    repo_id: Annotated[str, typer.Argument(help="Hub repo id, e.g. ChenMnZ/Llama-2-7b-EfficientQAT-w2g64.", show_default=False)],
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit.")] = None,
    local_dir: Annotated[Optional[Path], typer.Option("--local-dir", help="Download here instead of the HF cache.")] = None,
    wait: WaitOpt = False,
    json_out: JsonOpt = None,
):
    """Bits and group size are detected from the safetensors headers (tensor shapes), so
    EfficientQAT releases without an eqat section in config.json are recognised too.
    HF_ENDPOINT and HF_HUB_OFFLINE are honoured.

    Example: [bold]eqat pull ChenMnZ/Llama-2-7b-EfficientQAT-w2g64[/]
    """
    from rich.table import Table

    from eqat_cli.pull import pull_from_spec

    bars, progress = _bars()
    with bars:
        info = pull_from_spec(repo_id, revision, local_dir, progress=progress, wait=wait)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("model", repo_id + (f" @ {revision}" if revision else ""))
    table.add_row("path", info.path)
    for key, value in info.summary_lines():
        table.add_row(key, value)
    console.print(table)
    for note in info.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"next: [bold]{info.next_command()}[/]", soft_wrap=True)
    data = info.to_dict()
    data["repo_id"] = repo_id
    data["revision"] = revision
    emit_json(data, json_out)
