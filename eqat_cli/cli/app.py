"""The ``eqat`` command: a thin Typer app. Each subcommand lives in its own module."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from eqat_cli import __version__
from eqat_cli.cli import common

HELP = """EfficientQAT for everyone: quantize LLMs to 2-4 bits, evaluate, pack and serve them.

Typical flow:

  eqat calibrate smollm2 --dataset c4 -o calib.safetensors

  eqat block-ap smollm2 --bits 2 --group 64 --calib calib.safetensors -o out/w2g64

  eqat e2e-qp out/w2g64 --dataset c4 -o out/w2g64-e2e

  eqat eval out/w2g64-e2e --ppl wikitext2 --tasks piqa,arc_easy

  eqat pack out/w2g64-e2e --format gptq -o out/w2g64-gptq

A refused input is one `error:` line with exit code 2 and leaves nothing behind (EQAT_DEBUG=1
shows the traceback); disk full or an I/O error is exit code 1, Ctrl-C 130, and finished work
is kept for a resume in every case.
"""

# Modules that each add one command (kept in help order).
COMMAND_MODULES = (
    "calibrate",
    "block_ap",
    "e2e_qp",
    "pack",
    "eval",
    "pull",
    "bench",
    "plugins",
)


def _version(value: bool):
    if value:
        typer.echo(f"eqat {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    import importlib

    app = typer.Typer(
        name="eqat",
        cls=common.OneLineErrorsGroup,
        help=HELP,
        no_args_is_help=True,
        rich_markup_mode="rich",
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def root(
        version: Annotated[
            Optional[bool],
            typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
        ] = None,
    ):
        """EfficientQAT toolkit."""

    for name in COMMAND_MODULES:
        importlib.import_module(f"eqat_cli.cli.{name}").register(app)

    # Plugins may add commands; built-in plugins load through the same path.
    try:
        from eqat_cli.plugin_manager import get_plugin_manager

        get_plugin_manager().hook.register_commands(app=app)
    except Exception as e:  # a broken plugin must not take the whole CLI down
        if common.debug_enabled():
            raise
        common.console.print(f"[yellow]warning:[/] plugins not loaded: {e}")
    return app


def main() -> None:
    build_app()(prog_name="eqat")
