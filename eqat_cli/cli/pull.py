"""``eqat pull``: download a quantized model from the Hub and inspect it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from eqat_cli.cli.common import JsonOpt, WaitOpt, console, emit_json, progress_bars, render_lock_event


def rich_tqdm_class(progress: Any) -> type:
    """A tqdm subclass that mirrors huggingface_hub's bars onto a Rich ``Progress``.

    ``snapshot_download(tqdm_class=...)`` instantiates the class for the file-count bar
    ("Fetching N files"), a bytes-written bar and a network-transfer bar (see
    huggingface_hub/_snapshot_download.py); tqdm keeps the counts, Rich draws them. The transfer bar
    duplicates the bytes bar for plain HTTP downloads, so it is not shown.
    """
    from tqdm.std import tqdm as std_tqdm

    class RichTqdm(std_tqdm):
        _task = None  # set after tqdm's __init__, which already calls display()

        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["file"] = io.StringIO()  # tqdm's own text rendering is discarded
            kwargs.setdefault("mininterval", 0.1)
            super().__init__(*args, **kwargs)
            desc = (kwargs.get("desc") or "").strip()
            self._hidden = desc.startswith("Downloading bytes")
            if desc.startswith("Fetching"):
                label = "files"
            elif kwargs.get("unit") == "B" or desc.startswith("Reconstruct"):
                label = "bytes"
            else:
                label = desc or "progress"
            self._label = label
            if not self._hidden:
                unit = "B" if label == "bytes" else "files"
                self._task = progress.add_task(label, total=self.total or None, unit=unit)
            self._sync()

        def _sync(self) -> None:
            if self._task is None:
                return
            progress.update(self._task, completed=self.n, total=self.total or None)

        def display(self, msg=None, pos=None):  # called by tqdm on refresh
            self._sync()
            return True

        def update(self, n=1):
            # huggingface_hub never closes its aggregate byte bars: mirror every update.
            out = super().update(n)
            self._sync()
            return out

        def set_description(self, desc=None, refresh=True):  # keep our own labels
            self.desc = desc or ""

        def set_description_str(self, desc=None, refresh=True):
            self.desc = desc or ""

        def close(self):
            self._sync()
            super().close()

    return RichTqdm


def check_repo_id(repo_id: str) -> None:
    """A Hub repo id is ``owner/name``: no path, no ``..``, nothing that could leave the cache."""
    from eqat_cli.errors import BadInputError
    from eqat_cli.models import HUB_ID

    parts = repo_id.split("/")
    if (
        not HUB_ID.match(repo_id)
        or any(p in ("", ".", "..") or p.startswith((".", "-")) or ".." in p or p.endswith(".") for p in parts)
        or len(repo_id) > 96
    ):
        raise BadInputError(
            f"{repo_id!r} is not a Hub repo id: expected owner/name (letters, digits, '-', '_', '.'; "
            "no path, no '..'), e.g. ChenMnZ/Llama-2-7b-EfficientQAT-w2g64"
        )


def pull(repo_id: str, revision: str | None = None, local_dir: Path | None = None,
         show_progress: bool = True, wait: bool = False) -> Any:
    """Download ``repo_id`` (resumable) and return its :class:`ModelInfo`. With ``local_dir``, the
    directory's output lock is held for the whole download (one writer per output; the Hub cache
    has huggingface_hub's own file locks)."""
    check_repo_id(repo_id)
    if revision is not None and (not revision.strip() or ".." in revision or revision.startswith(("/", "-"))):
        from eqat_cli.errors import BadInputError

        raise BadInputError(f"--revision {revision!r} is not a branch, tag or commit")
    from rich.progress import DownloadColumn, ProgressColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.text import Text

    from eqat_cli.formats.describe import inspect_path
    from eqat_cli.models import download

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

    from contextlib import nullcontext

    from eqat_cli.fsutil import output_lock

    lock = output_lock(local_dir, wait=wait, progress=render_lock_event) if local_dir else nullcontext()
    with lock:
        progress = progress_bars(columns=(AmountColumn(), SpeedColumn(), TimeRemainingColumn()),
                                 disable=not show_progress)
        with progress:
            path = download(
                repo_id, revision=revision, local_dir=str(local_dir) if local_dir else None,
                tqdm_class=rich_tqdm_class(progress),
            )
        return inspect_path(path)


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

    info = pull(repo_id, revision, local_dir, wait=wait)
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
