"""Shared CLI pieces: one Rich console (stderr), option aliases, error -> exit-code mapping.

Nothing here imports torch: ``eqat --help`` must stay fast.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import ClickException as _ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException as _ClickException

from eqat_cli.errors import EqatError

# Human output goes to stderr; machine output (--json -) to stdout.
console = Console(stderr=True, highlight=False)
DEBUG_ENV = "EQAT_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "no")


def fail(message: str, hint: str | None = None, code: int = 2) -> "typer.Exit":
    """Print ``error: MESSAGE (hint: HINT)`` as one line on stderr; return the Exit to raise."""
    from rich.markup import escape

    line = " ".join(str(message).split())  # one line, whatever the message held
    if hint:
        line += f" (hint: {' '.join(str(hint).split())})"
    console.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True)
    return typer.Exit(code)


# ---------------------------------------------------------------------- option ranges


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric option, checked by :func:`guarded` before the command runs.

    Put it in the option's ``Annotated`` metadata, next to ``typer.Option``::

        quant_lr: Annotated[float, typer.Option("--quant-lr", help="..."), Range(gt=0)] = 1e-4
        group: Annotated[int, typer.Option("--group"), Range(ge=1, also=(-1,))] = 64

    ``ge``/``gt``/``le``/``lt`` are bounds, ``also`` lists extra allowed values outside them.
    Floats must also be finite (no nan/inf). An unset ``Optional`` option (None) is not checked.
    A numeric option without a Range gets :data:`DEFAULT_RANGE` (finite, >= 0); the test suite
    (tests/test_bad_inputs.py) requires every numeric option to declare its own.
    The range is appended to the option's help text.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple = ()

    def describe(self) -> str:
        fmt = lambda v: str(v) if isinstance(v, int) else f"{v:g}"  # noqa: E731
        parts = [f"{op} {fmt(v)}" for op, v in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
                 if v is not None]
        text = " and ".join(parts) or "finite"
        if self.also:
            text += " or " + " or ".join(fmt(v) for v in self.also)
        return text

    def ok(self, value: float) -> bool:
        if value in self.also:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )


DEFAULT_RANGE = Range(ge=0)
POSITIVE = Range(gt=0)  # learning rates, factors
NON_NEGATIVE = Range(ge=0)  # weight decay, counts that may be 0
AT_LEAST_1 = Range(ge=1)  # counts, lengths, sizes
FRACTION = Range(ge=0, le=1)
LEARNING_RATE = Range(ge=0, le=1)  # 0 freezes that group of parameters
BITS = Range(ge=2, le=4, also=(8,))
GROUP = Range(ge=2, also=(-1,))  # -1 = per-channel


@dataclass(frozen=True)
class _NumericOption:
    param: str
    flag: str
    range: Range
    declared: bool


def numeric_options(fn: Callable) -> list[_NumericOption]:
    """The int/float options (and arguments) of a command function with their ranges."""
    import typing

    hints = typing.get_type_hints(fn, include_extras=True)
    out = []
    for name, hint in hints.items():
        if name == "return" or typing.get_origin(hint) is not Annotated:
            continue
        base, *meta = typing.get_args(hint)
        args = [a for a in typing.get_args(base) if a is not type(None)] if typing.get_origin(base) is not None else [base]
        if len(args) != 1 or args[0] not in (int, float):
            continue
        info = next((m for m in meta if hasattr(m, "param_decls")), None)
        # In the Annotated form typer keeps the first declaration in ``default``.
        first = getattr(info, "default", None)
        decls = [d for d in ([first] if isinstance(first, str) else []) + list(getattr(info, "param_decls", None) or ())
                 if d.startswith("--")]
        flag = decls[0] if decls else "--" + name.replace("_", "-")
        rng = next((m for m in meta if isinstance(m, Range)), None)
        if rng is not None and info is not None and getattr(info, "help", None) and "(allowed:" not in info.help:
            info.help = f"{info.help} (allowed: {rng.describe()})"
        out.append(_NumericOption(name, flag, rng or DEFAULT_RANGE, rng is not None))
    return out


def check_options(options: list[_NumericOption], values: dict) -> None:
    """Raise BadInputError for the first option whose value is outside its range."""
    from eqat_cli.errors import BadInputError

    for opt in options:
        v = values.get(opt.param)
        if v is None or isinstance(v, bool):
            continue
        if not opt.range.ok(v):
            raise BadInputError(f"{opt.flag} must be {opt.range.describe()}, got {v!r}")


# ---------------------------------------------------------------------- the command guard


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def guarded(fn: Callable) -> Callable:
    """Wrap a command: validate its numeric options, apply ``--trust-remote-code``, and map known
    failures to one line (``EQAT_DEBUG=1`` re-raises).

    Exit codes: 2 for bad input (:class:`EqatError`, an option out of range, an unreadable
    file), 1 for a failure of the machine (disk full, I/O error), 130 for Ctrl-C. Finished work
    (Block-AP blocks, E2E-QP steps) is kept in every case; re-running the command resumes.
    """
    options = numeric_options(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from eqat_cli import readers

        # --trust-remote-code allows; without it EQAT_TRUST_REMOTE_CODE=1 decides (default: refuse)
        readers.set_trust_remote_code(True if kwargs.get("trust_remote_code") else None)
        try:
            check_options(options, kwargs)
            return fn(*args, **kwargs)
        except EqatError as e:
            if debug_enabled():
                raise
            raise fail(str(e), e.hint, e.exit_code) from None
        except ModuleNotFoundError as e:
            if debug_enabled():
                raise
            raise fail(
                f"missing optional dependency: {e.name}", f"pip install {e.name}"
            ) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: finished work is kept; re-run to resume")
            raise typer.Exit(130) from None
        except OSError as e:
            if debug_enabled() or e.errno is None:
                raise
            if e.errno in DISK_FULL_ERRNOS:
                from eqat_cli.errors import DiskFullError

                err = DiskFullError(e.filename or "the output", os.strerror(e.errno).lower())
                raise fail(str(err), err.hint, err.exit_code) from None
            where = f" ({e.filename})" if e.filename else ""
            raise fail(f"{os.strerror(e.errno)}{where}", code=1) from None
        finally:
            readers.set_trust_remote_code(None)

    wrapper.__eqat_options__ = options
    return wrapper


# ---------------------------------------------------------------------- usage errors


class OneLineErrorsGroup(TyperGroup):
    """The ``eqat`` group: usage errors (unknown option, bad type, missing argument) are one
    ``error:`` line with exit code 2, like every other refused input."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `eqat` alone: the help, as before
                if e.format_message().strip():
                    e.show()
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            fail(f"{e.format_message()}{where}", code=e.exit_code)
            sys.exit(e.exit_code)
        except typer.Abort:
            console.print("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def emit_json(obj: Any, target: Optional[Path]) -> None:
    """``--json -`` prints to stdout; ``--json FILE`` writes atomically."""
    if target is None:
        return
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    if str(target) == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        from eqat_cli.fsutil import atomic_file

        with atomic_file(target) as tmp:
            tmp.write_text(text + "\n")
        console.print(f"wrote {target}")


# ---------------------------------------------------------------------- option aliases

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Model: Hub repo id (owner/name), local directory, .gguf file, or alias 'smollm2'.",
        show_default=False,
    ),
]
BitsOpt = Annotated[int, typer.Option("--bits", "-b", help="Weight bits: 2, 3, 4 or 8."), BITS]
GroupOpt = Annotated[
    int, typer.Option("--group", "-g", help="Group size along the input dim; -1 = per-channel."),
    GROUP,
]
OutOpt = Annotated[Path, typer.Option("--output", "-o", help="Output path.", show_default=False)]
JsonOpt = Annotated[
    Optional[Path],
    typer.Option("--json", help="Write machine-readable results to FILE ('-' = stdout)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")]
BackendOpt = Annotated[
    str, typer.Option("--backend", help="Kernel backend for packed layers: auto, torch, triton.")
]
DataDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--data-dir",
        envvar="EQAT_DATA_DIR",
        help="Folder with local copies of named data sets (instead of the Hub).",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed."), Range(ge=0, lt=2**32)]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace the output if it exists.")
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Allow models whose config needs the Python code shipped with them (runs that code).",
    ),
]
