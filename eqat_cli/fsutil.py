"""Atomic writes: write to a temporary sibling, then rename. Nothing is ever half-written.

A write that fails because the file system is full (``ENOSPC``/``EDQUOT``, also as reported by
safetensors' Rust writer) removes its temporary and raises :class:`DiskFullError` naming the
target, so the CLI prints one line and finished work stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from eqat_cli.errors import BadInputError, DiskFullError


def check_output(target: str | os.PathLike, overwrite: bool = False, kind: str = "directory") -> Path:
    """Refuse an output path before anything is created: it exists (without ``overwrite``), it
    is of the other kind (file vs directory), or its parent is a file or not writable."""
    target = Path(target).expanduser()
    if str(target).strip() in ("", "."):
        raise BadInputError(f"output path {str(target)!r} is not a new {kind} name")
    if target.exists():
        if not overwrite:
            raise BadInputError(f"output {target} already exists (pass --overwrite to replace it)")
        if kind == "directory" and not target.is_dir():
            raise BadInputError(f"output {target} exists and is a file; this command writes a directory")
        if kind == "file" and target.is_dir():
            raise BadInputError(f"output {target} is a directory; this command writes a file")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BadInputError(f"output {target}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"output {target}: {parent} is not writable")
    return target


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in ("No space left on device", "os error 28", "StorageFull", "Disk quota exceeded"))


def _disk_full(e: BaseException, target: Path) -> None:
    """Re-raise a disk-full failure while writing ``target`` as DiskFullError."""
    if is_disk_full(e) and not isinstance(e, DiskFullError):
        raise DiskFullError(target) from e


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory next to ``target``; rename it into place on success."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise BadInputError(f"output {target} already exists (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _disk_full(e, target)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "wb"):
    """Yield a temporary path next to ``target``; ``os.replace`` it into place on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _disk_full(e, target)
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def dir_size(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
