"""The Hub policy: when eqat may reach the Hugging Face Hub, and what it accepts from it.

* :func:`hub_offline_reason`, :func:`hub_access`: offline mode and an unreachable network fail at
  once (one short TCP probe per process) instead of after ~30 s of retries; while the Hub cannot
  be reached, huggingface_hub and datasets run in offline mode (cached copies only).
* :func:`check_repo_files`, :func:`verify_download`: pull integrity (``eqat pull``, the model
  resolver's downloads): a repo whose file list holds absolute paths, ``..`` or a symlink out of
  the download is refused, a pickle-only repo is refused with a hint to its safetensors revision,
  and every downloaded file is checked against the Hub's recorded sha256 (LFS files) or git blob
  id (other files).

Imports nothing of eqat but ``errors``; huggingface_hub is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from eqat_cli.errors import BadInputError, EqatError

HUB_PROBE_TIMEOUT = 3.0  # seconds to wait for a TCP connection to the Hub
_hub_probe: dict[str, str | None] = {}


def hub_offline_reason(datasets: bool = False) -> str | None:
    """Why the Hub cannot be used right now (``HF_HUB_OFFLINE``, for data sets also
    ``HF_DATASETS_OFFLINE``; no route), or None.

    The network is probed once per process with one short TCP connection to ``HF_ENDPOINT``, so
    a machine without network fails at once instead of after ~30 s of retries.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE)"
    if datasets and os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "offline mode is on (HF_DATASETS_OFFLINE)"
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if endpoint not in _hub_probe:

        u = urlsplit(endpoint)
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            with socket.create_connection((u.hostname or "", port), timeout=HUB_PROBE_TIMEOUT):
                _hub_probe[endpoint] = None
        except OSError as e:
            _hub_probe[endpoint] = f"the Hub ({u.hostname}) is unreachable: {e.strerror or e}"
    return _hub_probe[endpoint]


@contextlib.contextmanager
def hub_access(datasets: bool = False) -> Iterator[str | None]:
    """Yield :func:`hub_offline_reason`; while the Hub is unreachable, huggingface_hub and datasets
    run in offline mode (cached copies only), so a missing copy fails at once."""
    reason = hub_offline_reason(datasets)
    if reason is None:
        yield None
        return

    from huggingface_hub import constants

    saved = [(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)]
    dconfig = sys.modules.get("datasets.config")
    if dconfig is None:
        try:
            import datasets.config as dconfig
        except ImportError:  # pragma: no cover - datasets is a dependency
            dconfig = None
    if dconfig is not None:
        saved += [(dconfig, k, getattr(dconfig, k)) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(dconfig, k)]
    try:
        for mod, k, _ in saved:
            setattr(mod, k, True)
        yield reason
    finally:
        for mod, k, v in saved:
            setattr(mod, k, v)


# ---------------------------------------------------------------------- pull integrity

# Weights stored as Python pickles: loading one can run code. eqat never loads them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".gguf")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a Hub repo as the Hub records it."""

    path: str
    size: int | None = None
    sha256: str | None = None  # LFS files: the sha256 of the content
    blob_id: str | None = None  # every file: the git blob id (sha1 of "blob N\0" + content)


def remote_files(info: Any) -> list[RemoteFile]:
    """The files of a ``huggingface_hub`` ``ModelInfo`` fetched with ``files_metadata=True``."""
    out = []
    for s in info.siblings or []:
        lfs = getattr(s, "lfs", None)
        out.append(RemoteFile(s.rfilename, s.size, getattr(lfs, "sha256", None) if lfs else None, s.blob_id))
    return out


def _unsafe_name(name: str) -> bool:
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return True
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return True
    return any(part in ("", ".", "..") for part in name.split("/"))


def check_repo_files(repo_id: str, files: list[RemoteFile], revision: str | None = None) -> list[str]:
    """Refuse a repo eqat must not download; return the patterns of files to skip.

    Refused: a file list with an absolute path, a ``..`` (or empty, ``.``) component or a
    backslash, which could write outside the download folder; a repo whose weights are pickles
    only (``*.bin``, ``*.pt``, ...: loading one can run code), with a hint to its safetensors
    revision. Pickle files beside safetensors or GGUF weights are skipped (eqat never reads them).
    """
    for f in files:
        if _unsafe_name(f.path):
            raise BadInputError(
                f"{repo_id}: refused: its file list holds {f.path!r}, a path that would leave the "
                "download folder (absolute, '..' or a backslash)"
            )
    pickles = sorted(f.path for f in files if f.path.lower().endswith(PICKLE_SUFFIXES))
    has_weights = any(f.path.lower().endswith(WEIGHT_SUFFIXES) for f in files)
    if pickles and not has_weights:
        rev = f" at revision {revision!r}" if revision else ""
        raise BadInputError(
            f"{repo_id}{rev} holds only pickle weights ({', '.join(pickles[:3])}"
            f"{', ...' if len(pickles) > 3 else ''}), which eqat does not load (unpickling can run code)",
            hint="look for a safetensors revision of it: the Hub's conversion bot opens pull requests "
            f"(eqat pull {repo_id} --revision refs/pr/N), or convert the weights to safetensors yourself",
        )
    return [f"*{s}" for s in PICKLE_SUFFIXES] if pickles else []


def git_blob_id(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _discard(p: Path) -> None:
    """Remove a corrupt download (and, in the cache, the blob its link points to) so that the
    next pull fetches it again."""
    with contextlib.suppress(OSError):
        if p.is_symlink():
            target = p.resolve()
            p.unlink()
            target.unlink()
        else:
            p.unlink()


def verify_download(repo_id: str, root: Path, files: list[RemoteFile], confine: Path,
                    skip: list[str] = ()) -> int:
    """Check a finished download against the Hub's records; return the number of files checked.

    Every file under ``root`` must stay inside ``confine`` (the download folder, or the repo's
    folder of the Hugging Face cache, whose snapshots link to its blobs): a symlink out of it is
    refused. Every listed file (but the ``skip`` patterns) must be there with the recorded size
    and hash: the sha256 for LFS files, the git blob id for the others. A mismatching file is
    removed (a re-run downloads it again) and reported in one line.
    """
    for p in sorted(root.rglob("*")):
        if p.is_symlink() and not _inside(p, confine):
            raise BadInputError(
                f"{p}: refused: a symlink pointing outside the download ({os.readlink(p)})"
            )
    checked = 0
    for f in files:
        if any(fnmatch.fnmatch(f.path, pat) for pat in skip):
            continue
        p = root / f.path
        if not p.is_file():
            raise EqatError(f"{p}: listed by the Hub for {repo_id} but not downloaded",
                            hint="run the same command again to resume")
        if f.size is not None and p.stat().st_size != f.size:
            got = p.stat().st_size
            _discard(p)
            raise EqatError(f"{p}: size {got} bytes, the Hub records {f.size} for {repo_id} (removed)",
                            hint="run the same command again to download it anew")
        if f.sha256:
            want, got, kind = f.sha256, file_sha256(p), "sha256"
        elif f.blob_id:
            want, got, kind = f.blob_id, git_blob_id(p), "git blob id"
        else:
            continue
        if got != want:
            _discard(p)
            raise EqatError(
                f"{p}: checksum mismatch: the Hub records {kind} {want[:16]}... for {repo_id}, "
                f"the downloaded file has {got[:16]}... (removed)",
                hint="run the same command again; if it repeats, the mirror (HF_ENDPOINT) or the repo is damaged",
            )
        checked += 1
    return checked
