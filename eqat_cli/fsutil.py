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

from eqat_cli.errors import BadInputError, DiskFullError, OutputBusyError


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


def replace_dir(src: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished directory ``src`` (a sibling of ``target``) to ``target`` by renames: an
    existing ``target`` is renamed aside first and removed only once ``src`` is in place, so at
    every moment either the old or the new directory is there."""
    src, target = Path(src), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(src, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, target)


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
        replace_dir(tmp, target)
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


# ---------------------------------------------------------------------- one writer per output

LOCK_SUFFIX = ".lock"
_held: dict[str, int] = {}  # lock files this process holds -> nesting depth (the lock is re-entrant)


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of output ``target``: ``OUT.lock`` beside it."""
    target = Path(target).expanduser()
    return target.with_name(target.name + LOCK_SUFFIX)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _recorded_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def _still_linked(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, wait: bool = False, progress=None):
    """Hold the exclusive lock of output ``target`` (``OUT.lock``, ``fcntl.flock``) for the block.

    One writer per output: a second process asking for the same output gets
    :class:`~eqat_cli.errors.OutputBusyError` naming the holder's PID, or with ``wait`` reports
    ``progress("lock_wait", {"output", "pid", "lock"})`` and blocks until the holder is done.
    The kernel releases the lock when its holder dies; a lock file left behind by a holder that
    did not finish (killed) still records its PID, and taking it over is reported as
    ``progress("lock_takeover", {"output", "pid", "alive", "lock"})``. A holder that finishes
    removes the file. The lock is re-entrant within one process (a command's library entry and
    the trainer it calls both take it). Directories it creates for the lock file are removed again
    if the run leaves them empty (a refused run creates nothing). Yields the lock file's path.
    """
    path = lock_path(target)
    made = []  # directories created for the lock file (deepest first): removed again if left empty
    d = path.parent
    while not d.exists() and d != d.parent:
        made.append(d)
        d = d.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    note = progress or (lambda event, info: None)
    try:
        fd = _acquire(path, target, wait, note)
    except BaseException:
        _remove_empty(made)
        raise
    previous = _recorded_pid(fd)
    if previous is not None and previous != os.getpid():
        note("lock_takeover", {"output": str(target), "pid": previous, "alive": pid_alive(previous),
                               "lock": str(path)})
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = 1
    try:
        yield path
    finally:
        del _held[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
        _remove_empty(made)


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the directories a refused or failed run created, deepest first, while empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def _acquire(path: Path, target, wait: bool, note) -> int:
    """Open and ``flock`` the lock file; return its descriptor."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _recorded_pid(fd)
                if not wait:
                    raise OutputBusyError(Path(target), holder) from None
                note("lock_wait", {"output": str(target), "pid": holder, "lock": str(path)})
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        # A finishing holder unlinks the file before it lets go: then lock the new one instead.
        if _still_linked(fd, path):
            return fd
        os.close(fd)
