"""``eqat pack`` as one function: convert a quantized model between checkpoint formats.

:func:`pack_model` loads any model the resolver accepts and hands it to the output
:class:`~eqat_cli.format_spec.Format` the registry finds under the given name (eqat native,
GPTQ v1/v2, dense fp16, GGUF, or a plugin's). No Rich, no typer here; torch is imported only when
a model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from eqat_cli.errors import BadInputError
from eqat_cli.format_spec import WriteJob
from eqat_cli.formats.checkpoint import Checkpoint
from eqat_cli.fsutil import atomic_dir, atomic_file, dir_size, output_lock
from eqat_cli.models import preflight_model, resolve
from eqat_cli.progress import Progress, count
from eqat_cli.registry import get_registry


def _registry():
    return get_registry()


def format_names() -> tuple[str, ...]:
    """The canonical names of every registered output format."""
    return _registry().format_names()


def normalize_format(fmt: str) -> str:
    """The canonical name of ``fmt`` (``native`` -> ``eqat``, ``gptq-v2`` -> ``gptq_v2``, ...)."""
    return _registry().format_name(fmt)


def check_output(fmt: str, output: Path, overwrite: bool) -> None:
    """Fail before loading anything if the output path is unusable."""
    reg = _registry()
    f = reg.format(fmt)
    f.check_output(Path(output), overwrite, others=[reg.format(n) for n in reg.format_names()])


def pack_model(spec: str, fmt: str, output: Path, overwrite: bool = False,
               progress: Optional[Progress] = None) -> dict[str, Any]:
    """Load ``spec`` (any model the resolver accepts) and write it as ``fmt`` at ``output``; return
    a JSON-ready summary (format, output, size, source, what the writer reports, how to load it).

    Checks that need no model run before it is loaded; the output appears atomically (a hidden
    sibling renamed into place). Progress: ``load`` (label ``spec``) counts 0 of 1 before the
    model is loaded and 1 of 1 after."""
    reg = _registry()
    form = reg.format(fmt)
    output = Path(output).expanduser()
    check_output(form.name, output, overwrite)

    def refuse_full_precision():
        return BadInputError(
            f"{spec} is a full-precision model; --format {form.name} writes quantized checkpoints",
            hint="quantize it first, e.g. `eqat block-ap MODEL --bits 4 --group 128 -o OUT`",
        )

    if preflight_model(spec) is False and form.quantized_only:
        raise refuse_full_precision()
    count(progress, "load", str(spec), 0, 1)
    # CPU and fp32: packed layers stay packed, the fp16-stored rest is widened losslessly.
    lm = resolve(spec, device="cpu", dtype="fp32")
    count(progress, "load", str(spec), 1, 1)
    if form.quantized_only and not lm.quant:
        raise refuse_full_precision()
    source = {
        "source": str(spec),
        "source_format": lm.format,
        "architecture": lm.arch.name,
    }
    if lm.quant:
        source.update({k: lm.quant[k] for k in ("bits", "group_size", "gguf_types") if k in lm.quant})
    source_meta = None
    if lm.path is not None and lm.format == "eqat":
        source_meta = Checkpoint.open(lm.path).meta

    form.check(lm.model, lm.tokenizer)  # before any file is created
    job = dict(model=lm.model, tokenizer=lm.tokenizer, output=output, provenance=source,
               source_meta=source_meta, quant=lm.quant)
    if form.output == "file":
        output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(output) as tmp:
            result = form.write(WriteJob(target=tmp, **job))
    else:
        with atomic_dir(output, overwrite=overwrite) as tmp:
            result = form.write(WriteJob(target=tmp, **job))
    return {
        "format": form.name,
        "output": str(output),
        "size_bytes": dir_size(output),
        "source": source,
        **result,
        "load_with": form.how_to_load(output),
    }


def pack_from_spec(spec: str, fmt: str, output: Path, overwrite: bool = False,
                   progress: Optional[Progress] = None, wait: bool = False) -> dict[str, Any]:
    """``eqat pack``'s library side: :func:`pack_model` while holding the output's lock (one writer
    per output; another process writing ``output`` is refused, or with ``wait`` waited for)."""
    fmt_name = normalize_format(fmt)
    output = Path(output).expanduser()
    check_output(fmt_name, output, overwrite)
    with output_lock(output, wait=wait, progress=progress):
        return pack_model(spec, fmt, output, overwrite, progress)
