"""Typed plugin hooks. Each hook receives a ``register`` callback (or the Typer app).

A plugin is any module or object with ``@hookimpl`` functions named like the specs below,
published under the entry-point group ``eqat``::

    [project.entry-points.eqat]
    myarch = "my_package.eqat_plugin"

Plugin modules must not import torch at import time (``eqat --help`` stays fast). The specs they
register come from :mod:`eqat_cli.specs` (torch-free) and, for formats,
:mod:`eqat_cli.format_spec`; this module imports nothing else of eqat at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

from eqat_cli.specs import ArchitectureSpec, BackendSpec, DatasetSpec

if TYPE_CHECKING:  # format_spec is torch-free too, but only the type is needed here
    from eqat_cli.format_spec import Format

PROJECT = "eqat"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_architectures(register: Callable[[ArchitectureSpec], None]) -> None:
    """Register model architectures with ``register(ArchitectureSpec(...))``."""


@hookspec
def register_backends(register: Callable[[BackendSpec], None]) -> None:
    """Register kernel backends with ``register(BackendSpec(...))``."""


@hookspec
def register_datasets(register: Callable[[DatasetSpec], None]) -> None:
    """Register named data sets (calibration text, perplexity, zero-shot tasks)."""


@hookspec
def register_formats(register: Callable[["Format"], None]) -> None:
    """Register output formats (``eqat pack --format``) with ``register(Format(...))``; see
    :mod:`eqat_cli.format_spec` for what a ``Format`` is."""


@hookspec
def register_commands(app: Any) -> None:
    """Add commands to the ``eqat`` Typer app (``@app.command()``)."""
