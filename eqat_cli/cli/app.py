"""The ``eqat`` command: a thin Typer app. Each command is a module-level function in its own
module, registered here, in :data:`COMMANDS`; plugins add theirs through ``register_commands``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from eqat_cli import __version__
from eqat_cli.cli import bench, block_ap, calibrate, common, e2e_qp, generate, pack, plugins, pull
from eqat_cli.cli import eval as eval_

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

# The built-in commands, in help order: (name, function, help). ``help`` is the line shown in
# ``eqat --help``; ``eqat NAME --help`` shows it followed by the function's docstring.
COMMANDS = (
    ("calibrate", calibrate.calibrate_cmd,
     "Tokenize a corpus into random calibration windows (safetensors + metadata)."),
    ("block-ap", block_ap.block_ap_cmd,
     "Block-AP: train each decoder block's quantization to reproduce the full-precision block (MSE)."),
    ("e2e-qp", e2e_qp.e2e_qp_cmd,
     "E2E-QP: train step sizes end to end (codes stay frozen), by distillation or next-token loss."),
    ("pack", pack.pack_cmd,
     "Write a quantized model as eqat native, GPTQ v1/v2, dense fp16, or GGUF."),
    ("eval", eval_.eval_cmd,
     "Measure perplexity (GPTQ protocol) and zero-shot accuracy (lm-eval)."),
    ("generate", generate.generate_cmd,
     "Generate text with any model eqat loads: a prompt or an interactive chat, streamed, with tokens/s."),
    ("pull", pull.pull_cmd,
     "Download a model (resumable), then print its format, bits, group and size."),
    ("bench", bench.bench_cmd,
     "Benchmark quantized layers against dense ones (median and spread of several runs)."),
    ("plugins", plugins.plugins_cmd,
     "List registered architectures, kernel backends and data sets, with their sources."),
)


def _version(value: bool):
    if value:
        typer.echo(f"eqat {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    import inspect

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

    for name, fn, help_line in COMMANDS:
        details = (inspect.getdoc(fn) or "").strip()
        app.command(name, cls=common.EqatCommand, help=f"{help_line}\n\n{details}" if details else help_line)(fn)

    # Plugins may add commands; built-in plugins load through the same path.
    try:
        from eqat_cli.plugin_manager import get_plugin_manager

        get_plugin_manager().hook.register_commands(app=app)
    except Exception as e:  # a broken plugin must not take the whole CLI down
        if common.debug_enabled():
            raise
        common.console.print(f"[yellow]warning:[/] plugins not loaded: {e}")
    try:
        common.name_backends()
        pack.name_formats()
    except Exception:  # a registry that fails to build fails the command that needs it, not --help
        if common.debug_enabled():
            raise
    for info in app.registered_commands:  # before typer builds the options: their help shows the Range
        if isinstance(info.cls, type) and issubclass(info.cls, common.EqatCommand):
            common.numeric_options(info.callback)
    return app


def main() -> None:
    """The console script ``eqat``. Errors are mapped to one line and an exit code in
    :meth:`common.OneLineErrorsGroup.main`, which this call, and ``CliRunner``, run."""
    build_app()(prog_name="eqat")
