"""Output formats as objects, and the one vocabulary of format names.

A checkpoint format eqat can write is one :class:`Format` value. ``eqat pack --format NAME`` looks
it up (:func:`eqat_cli.registry.Registry.format`, aliases included) and calls it; there is no other
table of format names. Built-in formats live in :mod:`eqat_cli.formats.builtin` and are registered
by the ``formats`` plugin; a third-party package adds one the same way, from a pluggy hook::

    from eqat_cli.hookspecs import hookimpl
    from eqat_cli.format_spec import Format

    def _check(model, tokenizer=None):  # raise an EqatError saying why the model cannot be written
        ...

    def _write(job):  # job: WriteJob; write into job.target (a temporary dir, or file path)
        ...
        return {"bits": 4}  # what the writer reports, merged into pack's summary

    MY_FORMAT = Format(name="myfmt", aliases=("my-fmt",), description="...", check=_check,
                       write=_write, load_hint="my-runtime {out}", output="file", suffix=".bin")

    @hookimpl
    def register_formats(register):
        register(MY_FORMAT)

What a ``Format`` is (all fields plain data or callables; no torch at import):

* ``name``: the canonical name (lower case, ``_`` not ``-``); ``aliases``: other spellings
  accepted on input (:func:`normalize` also folds case and ``-``);
* ``description``: one line for humans (``eqat pull``'s "format" row, ``eqat plugins``);
* ``check(model, tokenizer=None)``: raise an :class:`~eqat_cli.errors.EqatError` (one line, with
  a hint) when ``model`` cannot be written exactly in this format; return nothing otherwise.
  ``eqat pack`` calls it before any file is created;
* ``write(job)``: write ``job.model`` into ``job.target`` and return a JSON-ready dict of what was
  written. ``job.target`` is a temporary directory (``output="directory"``) or a temporary file
  path (``output="file"``); the caller renames it into place (:mod:`eqat_cli.fsutil`), so a writer
  never needs its own atomicity;
* ``load_hint``: how to load the result, with ``{out}`` for the output path;
* ``output``: ``"directory"`` or ``"file"``; ``suffix``: the file name ending a file format's
  output must have (``".gguf"``);
* ``quantized_only``: whether a full-precision model is refused (every format but dense ``fp``).

A new format (GGUF ``Q4_0`` for 2/3-bit, MLX) is one more ``Format`` value registered beside the
others; its detection, if eqat should also *read* it, goes into :mod:`eqat_cli.formats.detect`.
This module imports nothing of eqat but :mod:`eqat_cli.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from eqat_cli.errors import BadInputError, EqatError


def normalize(name: str) -> str:
    """How a format name is compared: stripped, lower case, ``-`` as ``_``."""
    return str(name).strip().lower().replace("-", "_")


@dataclass
class WriteJob:
    """Everything a :class:`Format`'s ``write`` receives.

    ``provenance`` is what eqat records about the source (``source``, ``source_format``,
    ``architecture``, and ``bits``/``group_size`` when quantized); ``source_meta`` is the source
    checkpoint's own ``eqat`` section (a :class:`~eqat_cli.formats.meta.CheckpointMeta`) when it
    has one; ``output`` is the final path (for names), ``target`` where to write now."""

    model: Any
    tokenizer: Any
    target: Path
    output: Path
    provenance: dict = field(default_factory=dict)
    source_meta: Any = None
    quant: dict = field(default_factory=dict)  # the loaded model's {"bits", "group_size", "layers"}


@dataclass(frozen=True)
class Format:
    """One checkpoint format eqat writes (see the module docstring for each field)."""

    name: str
    check: Callable[..., None]
    write: Callable[[WriteJob], dict]
    load_hint: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    output: str = "directory"  # or "file"
    suffix: str | None = None
    quantized_only: bool = True

    def __post_init__(self):
        if normalize(self.name) != self.name or not self.name:
            raise ValueError(f"format name {self.name!r} must be lower case with '_' (normalized)")
        if self.output not in ("directory", "file"):
            raise ValueError(f"format {self.name!r}: output must be 'directory' or 'file', not {self.output!r}")
        if self.output == "file" and not self.suffix:
            raise ValueError(f"format {self.name!r} writes a file and must name its suffix")

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical name and every alias, normalized."""
        return (self.name, *(normalize(a) for a in self.aliases))

    def how_to_load(self, out: Path | str) -> str:
        return self.load_hint.format(out=out)

    def check_output(self, output: Path, overwrite: bool, others: Iterable["Format"] = ()) -> None:
        """Refuse an unusable output path before anything is loaded: it exists (without
        ``overwrite``), it is of the wrong kind, or its name ends like another format's file."""
        if output.exists() and not overwrite:
            raise BadInputError(f"output {output} already exists (pass --overwrite to replace it)")
        if self.output == "file":
            if output.suffix != self.suffix:
                raise BadInputError(
                    f"--format {self.name} writes a single file: give an output path ending in "
                    f"{self.suffix}, not {output}"
                )
            if output.is_dir():
                raise BadInputError(f"output {output} is a directory; {self.suffix[1:].upper()} output is a file")
            return
        for other in others:
            if other.output == "file" and other.suffix and output.suffix == other.suffix:
                raise BadInputError(
                    f"--format {self.name} writes a directory; {output} looks like a "
                    f"{other.suffix[1:].upper()} file name"
                )
        if output.exists() and not output.is_dir():
            raise BadInputError(f"output {output} exists and is a file; --format {self.name} writes a directory")


class FormatTable:
    """Formats by canonical name, with every alias resolving to one of them."""

    def __init__(self, formats: Iterable[Format] = ()):
        self._formats: dict[str, Format] = {}
        self._names: dict[str, str] = {}
        for f in formats:
            self.add(f)

    def add(self, fmt: Format, plugin: str = "") -> None:
        for n in fmt.names:
            if n in self._names:
                raise EqatError(
                    f"format name {n!r} of {fmt.name!r}" + (f" (plugin {plugin!r})" if plugin else "")
                    + f" is already taken by format {self._names[n]!r}"
                )
        self._formats[fmt.name] = fmt
        for n in fmt.names:
            self._names[n] = fmt.name

    def __iter__(self):
        return iter(self._formats.values())

    def __contains__(self, name: str) -> bool:
        return normalize(name) in self._names

    def canonical(self, name: str) -> str:
        """The canonical name of ``name`` (any alias or spelling); a one-line error listing the
        choices when no format has it."""
        n = normalize(name)
        if n not in self._names:
            choices = ", ".join(
                f.name + (f" ({', '.join(f.aliases)})" if f.aliases else "") for f in self._formats.values()
            )
            raise BadInputError(f"unknown format {name!r}; choose one of {choices}")
        return self._names[n]

    def get(self, name: str) -> Format:
        return self._formats[self.canonical(name)]

    def names(self) -> tuple[str, ...]:
        return tuple(self._formats)
