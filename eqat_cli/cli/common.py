"""Shared CLI pieces: one Rich console (stderr), option aliases, error -> exit-code mapping.

Nothing here imports torch: ``eqat --help`` must stay fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from eqat_cli.errors import EqatError

# Human output goes to stderr; machine output (--json -) to stdout.
console = Console(stderr=True, highlight=False)
DEBUG_ENV = "EQAT_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "no")


def fail(message: str, hint: str | None = None, code: int = 2) -> "typer.Exit":
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    if hint:
        console.print(f"[dim]hint: {hint}[/]", soft_wrap=True)
    if not debug_enabled():
        console.print(f"[dim](set {DEBUG_ENV}=1 for the traceback)[/]")
    return typer.Exit(code)


def guarded(fn: Callable) -> Callable:
    """Map known failures to one line and exit 2 (``EQAT_DEBUG=1`` re-raises)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
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

    return wrapper


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
BitsOpt = Annotated[int, typer.Option("--bits", "-b", help="Weight bits: 2, 3, 4 or 8.")]
GroupOpt = Annotated[
    int, typer.Option("--group", "-g", help="Group size along the input dim; -1 = per-channel.")
]
OutOpt = Annotated[Path, typer.Option("--output", "-o", help="Output path.", show_default=False)]
JsonOpt = Annotated[
    Optional[Path],
    typer.Option("--json", help="Write machine-readable results to FILE ('-' = stdout)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="Compute precision: auto (fp32 on CPU, bf16/fp16 on GPU).")
]
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
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace the output if it exists.")
]
