"""Shared CLI pieces: one Rich console (stderr), option aliases and ranges, the class of the
built-in commands, and the ``eqat`` group whose ``main`` maps every error to one line and an exit
code.

Nothing here imports torch: ``eqat --help`` must stay fast.
"""

from __future__ import annotations

import errno
import inspect
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import ClickException as _ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException as _ClickException
try:  # typer >= 0.20 has its own Exit and Abort
    from typer.exceptions import Abort as _Abort, Exit as _Exit
except ImportError:  # pragma: no cover
    from click.exceptions import Abort as _Abort, Exit as _Exit

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
    """The allowed values of a numeric option, checked by :class:`EqatCommand` before the command runs.

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


# ---------------------------------------------------------------------- built-in commands


class EqatCommand(TyperCommand):
    """The class of the built-in commands (``cli/app.py`` registers them with it; a plugin command
    may pass ``cls=EqatCommand`` to get the same). Before the command function runs, its numeric
    options are checked against their :class:`Range` and ``--trust-remote-code`` is applied for
    the duration of the command. Errors are not handled here but in :meth:`OneLineErrorsGroup.main`.
    """

    def invoke(self, ctx):
        from eqat_cli import model_files

        # --trust-remote-code allows; without it EQAT_TRUST_REMOTE_CODE=1 decides (default: refuse)
        model_files.set_trust_remote_code(True if ctx.params.get("trust_remote_code") else None)
        try:
            check_options(numeric_options(inspect.unwrap(self.callback)), ctx.params)
            return super().invoke(ctx)
        finally:
            model_files.set_trust_remote_code(None)


# ---------------------------------------------------------------------- errors -> one line


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class _CommandFailed(Exception):
    """Carries the exception of a command, unchanged, past typer's own ``main`` (which turns
    Ctrl-C and a broken pipe into silent exits) to :meth:`OneLineErrorsGroup.main`."""

    def __init__(self, error: BaseException):
        super().__init__(repr(error))
        self.error = error


def _report(e: BaseException) -> Optional[int]:
    """Print a known failure as one line on stderr and return its exit code; None for anything
    else (a bug: it propagates with its traceback), and for everything but Ctrl-C when
    ``EQAT_DEBUG=1``.

    Exit codes: 2 for bad input (:class:`EqatError`, an option out of range, an unreadable file,
    a missing optional dependency), 1 for a failure of the machine (disk full, I/O error), 130 for
    Ctrl-C. Finished work (Block-AP blocks, E2E-QP steps) is kept in every case; re-running the
    command resumes.
    """
    if isinstance(e, KeyboardInterrupt):
        console.print("[yellow]interrupted[/]: finished work is kept; re-run to resume")
        return 130
    if debug_enabled():
        return None
    if isinstance(e, EqatError):
        return fail(str(e), e.hint, e.exit_code).exit_code
    if isinstance(e, ModuleNotFoundError):
        return fail(f"missing optional dependency: {e.name}", f"pip install {e.name}").exit_code
    if isinstance(e, OSError) and e.errno is not None:
        if e.errno in DISK_FULL_ERRNOS:
            from eqat_cli.errors import DiskFullError

            err = DiskFullError(e.filename or "the output", os.strerror(e.errno).lower())
            return fail(str(err), err.hint, err.exit_code).exit_code
        where = f" ({e.filename})" if e.filename else ""
        return fail(f"{os.strerror(e.errno)}{where}", code=1).exit_code
    return None


class OneLineErrorsGroup(TyperGroup):
    """The ``eqat`` group, and the one place where errors become one ``error:`` line and an exit
    code: usage errors (unknown option, bad type, missing argument; exit 2) and the failures of
    every command, built-in or added by a plugin (see :func:`_report`). ``EQAT_DEBUG=1`` shows
    the traceback instead.

    The console script (``cli.app.main``) and ``typer.testing.CliRunner`` both enter through
    :meth:`main`, so tests exercise exactly this mapping. With ``standalone_mode=False`` nothing
    is mapped: exceptions reach the caller as they were raised.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (_ClickException, _Exit, _Abort):
            raise  # usage errors and typer's own exits: handled in main()
        except (Exception, KeyboardInterrupt) as e:
            raise _CommandFailed(e) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        failed: Optional[BaseException] = None
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _CommandFailed as e:
            failed = e.error
        except _ClickException as e:
            if not standalone_mode:
                raise
            if type(e).__name__ == "NoArgsIsHelpError":  # `eqat` alone: the help, as before
                if e.format_message().strip():
                    e.show()
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            fail(f"{e.format_message()}{where}", code=e.exit_code)
            sys.exit(e.exit_code)
        except _Abort:
            if not standalone_mode:
                raise
            console.print("aborted")
            sys.exit(1)
        if failed is not None:
            code = _report(failed) if standalone_mode else None
            if code is None:
                raise failed  # outside the except block: its own traceback, no chained carrier
            sys.exit(code)
        if not standalone_mode:
            return rv
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


# ---------------------------------------------------------------------- progress


def progress_bars(*, eta: bool = False, info: bool = False, columns: tuple = (), transient: bool = False,
                  disable: bool = False) -> Any:
    """The CLI's one Rich progress display, on the shared console (stderr).

    Each bar shows its description and the bar, then ``columns`` if given, else done/total and
    the elapsed time, plus the time remaining with ``eta`` and the task's ``info`` field with
    ``info`` (tasks must then be added with ``info=...``). Library functions report through
    :class:`eqat_cli.progress.Progress`; a command turns those events into bars on this display.
    """
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    if not columns:
        columns = (MofNCompleteColumn(), TimeElapsedColumn()) + ((TimeRemainingColumn(),) if eta else ())
        columns += (TextColumn("{task.fields[info]}"),) if info else ()
    return Progress(TextColumn("{task.description}"), BarColumn(), *columns, console=console,
                    transient=transient, disable=disable)


def counting_bars(bars: Any, key: Callable[[str, dict], Any], describe: Callable[[str, dict], str]):
    """A library progress callback that draws counting events (``label``, ``done``, ``total``) on
    ``bars``: one bar per ``key(event, info)``, its description ``describe(event, info)``."""
    ids: dict = {}

    def progress(event: str, info: dict) -> None:
        k = key(event, info)
        if k not in ids:
            ids[k] = bars.add_task(describe(event, info), total=info["total"])
        bars.update(ids[k], description=describe(event, info), completed=info["done"], total=info["total"])

    return progress


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
PrecisionOpt = Annotated[
    str,
    typer.Option("--precision", help="Training forwards: auto (bf16 on GPUs and on CPUs with bf16 units such as "
                 "AVX512-BF16/AMX, else fp32), fp32, bf16, fp16 (GPU, with loss scaling)."),
]


def backend_help(names: Optional[list[str]] = None) -> str:
    """``--backend``'s help: ``auto`` and the registered backends' ``names`` (best first)."""
    if not names:
        return "Kernel backend for packed layers: auto, or a backend `eqat plugins` lists."
    return (f"Kernel backend for packed layers: auto (the highest-priority one that runs here), "
            f"{', '.join(names)}; see `eqat plugins`.")


BACKEND_OPTION = typer.Option("--backend", help=backend_help())
BackendOpt = Annotated[str, BACKEND_OPTION]

QuantizeHeadOpt = Annotated[
    Optional[int],
    typer.Option("--quantize-head", help="Also quantize the token embedding and lm_head (min-max, "
                 "group 64): 8 or 4 bits. They stay full precision otherwise.", show_default=False),
    Range(ge=4, le=8),
]


def name_backends() -> None:
    """Name every registered backend, built-in or plugin, in ``--backend``'s help (``build_app``
    calls this once the plugins are loaded; the registry is torch-free)."""
    from eqat_cli.registry import get_registry

    backends = sorted(get_registry().backends.values(), key=lambda r: -r.spec.priority)
    BACKEND_OPTION.help = backend_help([r.spec.name for r in backends])
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
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="If another eqat process is writing the same output, wait for it "
                                      "instead of refusing.")
]


def render_lock_event(event: str, info: dict) -> bool:
    """Draw the output lock's events (``fsutil.output_lock``); ``True`` if ``event`` was one."""
    if event == "lock_wait":
        who = f"PID {info['pid']}" if info.get("pid") else "another process"
        console.print(f"waiting for {who} to finish writing {info['output']} (--wait)...", soft_wrap=True)
        return True
    if event == "lock_takeover":
        state = "still running but no longer holding it" if info.get("alive") else "no longer running"
        console.print(f"[yellow]note:[/] took over the lock of {info['output']} left by PID {info['pid']} ({state})",
                      soft_wrap=True)
        return True
    return False
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Allow models whose config needs the Python code shipped with them (runs that code).",
    ),
]
