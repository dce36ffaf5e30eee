"""The resumable-run skeleton both trainers (Block-AP, E2E-QP) share.

A run that writes ``OUT``:

* holds ``OUT``'s lock for the whole run (:func:`run_lock`, :func:`eqat_cli.fsutil.output_lock`):
  one writer per output, so a second run cannot resume a work directory being written;
* refuses an existing ``OUT`` before anything is read or written (:func:`check_new_output`);
* works in ``OUT.partial/`` (:class:`WorkDir`), whose resume state records the run's key (what a
  later run must match to continue: recipe, model, data), written atomically;
* resumes when the key matches, otherwise starts over;
* moves the finished result into place as ``OUT`` and drops the work directory.

A training loss that stops being finite raises :class:`NonFiniteLossError`; finished work stays
in the work directory.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from eqat_cli.errors import BadInputError, EqatError
from eqat_cli.fsutil import atomic_file, output_lock, write_json_atomic
from eqat_cli.readers import read_json

WORK_SUFFIX = ".partial"


class NonFiniteLossError(EqatError):
    """The training loss became NaN or infinite; the finished work is kept for a resume."""


def work_dir_for(output: Path) -> Path:
    """``OUT.partial`` beside ``OUT``."""
    output = Path(output)
    return output.with_name(output.name + WORK_SUFFIX)


def check_new_output(output: Path, overwrite: bool) -> None:
    """The output check: ``output`` must not exist unless ``overwrite``."""
    if Path(output).exists() and not overwrite:
        raise BadInputError(f"output {output} already exists (pass --overwrite to replace it)")


def run_lock(output: Path, owner: bool = True, wait: bool = False, progress=None):
    """The output's lock for the run (re-entrant: a no-op inside a library entry that holds it);
    ``owner=False`` (the other ranks of a ``torchrun`` group) takes none."""
    return output_lock(output, wait=wait, progress=progress) if owner else contextlib.nullcontext()


def json_key(key: dict) -> dict:
    """A run key as it reads back from JSON (tuples become lists, and so on)."""
    return json.loads(json.dumps(key))


@dataclass
class WorkDir:
    """The work directory ``OUT.partial/`` and its resume state file."""

    path: Path
    state_file: str

    @property
    def state_path(self) -> Path:
        return self.path / self.state_file

    def previous(self, resume: bool, load: Callable[[Path], Any], matches: Callable[[Any], bool]) -> Any:
        """The resume state an earlier run of this same run left (``load``-ed, ``matches`` the key),
        or ``None``: no resume asked, none there, or another run's."""
        if resume and self.state_path.exists():
            old = load(self.state_path)
            if matches(old):
                return old
        return None

    def clear(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    # -- atomic state writes -----------------------------------------------------------------
    def save_json(self, obj: Any) -> None:
        write_json_atomic(self.state_path, obj)

    def save_tensors(self, meta: dict, tensors: dict, key: str) -> None:
        """Tensors in one safetensors file, the scalars as JSON under ``key`` in its header
        (nothing is unpickled on resume)."""
        from safetensors.torch import save_file

        with atomic_file(self.state_path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={key: json.dumps(meta)})


def read_json_state(path: Path, what: str) -> dict:
    return read_json(path, what)


def read_tensor_state(path: Path, key: str, fmt: str, what: str) -> tuple[dict, dict]:
    """The JSON header (``meta["format"] == fmt``) and tensors of a resume file; a damaged file is a
    one-line error naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[key])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any damage: name the file, say what to do
        raise BadInputError(
            f"{path}: damaged {what} ({type(e).__name__}: {str(e)[:120]}); "
            f"delete it or pass --no-resume to start over") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise BadInputError(f"{path}: not an {what}; delete it or pass --no-resume")
    return meta, tensors
