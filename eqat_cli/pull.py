"""``eqat pull``'s library side: check the repo id and revision, download the repo (resumable,
integrity-checked by :func:`eqat_cli.models.download`) under the output's lock, and describe
what arrived (:func:`eqat_cli.formats.describe.inspect_path`).

Progress: the download's bars arrive as counting events ``progress("download", {"label", "done",
"total", "bar"})``, ``label`` ``"files"`` (files fetched) or ``"bytes"`` (bytes written), ``bar``
one id per bar huggingface_hub opens; the output lock's ``lock_wait`` / ``lock_takeover`` events
come through the same callback. Never prints.
"""

from __future__ import annotations

import io
import itertools
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

from tqdm.std import tqdm as std_tqdm

from eqat_cli.errors import BadInputError
from eqat_cli.formats.describe import ModelInfo, inspect_path
from eqat_cli.fsutil import output_lock
from eqat_cli.models import HUB_ID, download
from eqat_cli.progress import Progress, no_progress


def check_repo_id(repo_id: str) -> None:
    """A Hub repo id is ``owner/name``: no path, no ``..``, nothing that could leave the cache."""
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


def check_revision(revision: Optional[str]) -> None:
    """A branch, tag or commit: not empty, no ``..``, not an option or an absolute path."""
    if revision is not None and (not revision.strip() or ".." in revision or revision.startswith(("/", "-"))):
        raise BadInputError(f"--revision {revision!r} is not a branch, tag or commit")


def progress_tqdm_class(progress: Progress) -> type:
    """A tqdm subclass that reports huggingface_hub's bars as ``download`` counting events.

    ``snapshot_download(tqdm_class=...)`` instantiates the class for the file-count bar
    ("Fetching N files"), a bytes-written bar and a network-transfer bar (see
    huggingface_hub/_snapshot_download.py); tqdm keeps the counts, ``progress`` receives them. The
    transfer bar duplicates the bytes bar for plain HTTP downloads, so it is not reported.
    """
    ids = itertools.count()

    class ProgressTqdm(std_tqdm):
        _bar = None  # set after tqdm's __init__, which already calls display()

        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["file"] = io.StringIO()  # tqdm's own text rendering is discarded
            kwargs.setdefault("mininterval", 0.1)
            super().__init__(*args, **kwargs)
            desc = (kwargs.get("desc") or "").strip()
            if desc.startswith("Downloading bytes"):
                return  # the transfer bar: not reported
            if desc.startswith("Fetching"):
                self._label = "files"
            elif kwargs.get("unit") == "B" or desc.startswith("Reconstruct"):
                self._label = "bytes"
            else:
                self._label = desc or "progress"
            self._bar = next(ids)
            self._report()

        def _report(self) -> None:
            if self._bar is not None:
                progress("download", {"label": self._label, "done": self.n, "total": self.total or None,
                                      "bar": self._bar})

        def display(self, msg=None, pos=None):  # called by tqdm on refresh
            self._report()
            return True

        def update(self, n=1):
            # huggingface_hub never closes its aggregate byte bars: report every update.
            out = super().update(n)
            self._report()
            return out

        def set_description(self, desc=None, refresh=True):  # keep our own labels
            self.desc = desc or ""

        def set_description_str(self, desc=None, refresh=True):
            self.desc = desc or ""

        def close(self):
            self._report()
            super().close()

    return ProgressTqdm


def pull_from_spec(repo_id: str, revision: Optional[str] = None, local_dir: Optional[Path] = None,
                   progress: Progress = no_progress, wait: bool = False) -> ModelInfo:
    """``eqat pull``: download ``repo_id`` (resumable) and return its :class:`ModelInfo`. With
    ``local_dir``, the directory's output lock is held for the whole download (one writer per
    output; the Hub cache has huggingface_hub's own file locks)."""
    check_repo_id(repo_id)
    check_revision(revision)
    lock = output_lock(local_dir, wait=wait, progress=progress) if local_dir else nullcontext()
    with lock:
        path = download(repo_id, revision=revision, local_dir=str(local_dir) if local_dir else None,
                        tqdm_class=progress_tqdm_class(progress))
        return inspect_path(path)
