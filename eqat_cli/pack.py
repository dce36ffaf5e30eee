"""``eqat pack`` as one function: convert a quantized model between checkpoint formats.

:func:`pack_model` loads any model the resolver accepts and writes it as eqat native, GPTQ v1/v2,
dense fp16, GGUF or MLX through the writers in :mod:`eqat_cli.formats`. No Rich, no typer here; torch
is imported only when a model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from eqat_cli.errors import BadInputError
from eqat_cli.progress import Progress, count

FORMATS = ("eqat", "gptq", "gptq_v2", "fp16", "gguf", "mlx")

HOW_TO_LOAD = {
    "eqat": "eqat eval {out} --ppl wikitext2",
    "gptq": "eqat eval {out}  |  AutoModelForCausalLM.from_pretrained('{out}') (needs optimum + gptqmodel)",
    "gptq_v2": "eqat eval {out}  |  GPTQModel.load('{out}')  |  AutoModelForCausalLM.from_pretrained('{out}')"
               " (needs optimum + gptqmodel)",
    "fp16": "AutoModelForCausalLM.from_pretrained('{out}')  |  eqat eval {out}",
    "gguf": "llama-cli -m {out}  |  AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)",
    "mlx": "mlx_lm.generate --model {out} --prompt 'Hello'  |  mlx_lm.load('{out}')",
}


def normalize_format(fmt: str) -> str:
    """The canonical name of ``fmt`` (``native`` -> ``eqat``, ``gptq-v2`` -> ``gptq_v2``, ...)."""
    f = fmt.strip().lower().replace("-", "_")
    f = {"native": "eqat", "efficientqat": "eqat", "gptq_v1": "gptq", "gptqv2": "gptq_v2",
         "fp": "fp16", "dense": "fp16"}.get(f, f)
    if f not in FORMATS:
        raise BadInputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return f


def check_output(fmt: str, output: Path, overwrite: bool) -> None:
    """Fail before loading anything if the output path is unusable."""
    if output.exists() and not overwrite:
        raise BadInputError(f"output {output} already exists (pass --overwrite to replace it)")
    if fmt == "gguf":
        if output.suffix != ".gguf":
            raise BadInputError(f"--format gguf writes a single file: give an output path ending in .gguf, not {output}")
        if output.is_dir():
            raise BadInputError(f"output {output} is a directory; GGUF output is a file")
    elif output.suffix == ".gguf":
        raise BadInputError(f"--format {fmt} writes a directory; {output} looks like a GGUF file name")
    elif output.exists() and not output.is_dir():
        raise BadInputError(f"output {output} exists and is a file; --format {fmt} writes a directory")


def pack_model(spec: str, fmt: str, output: Path, overwrite: bool = False,
               progress: Optional[Progress] = None) -> dict[str, Any]:
    """Load ``spec`` (any model the resolver accepts) and write it as ``fmt`` at ``output``; return
    a JSON-ready summary (format, output, size, source, what the writer reports, how to load it).

    Checks that need no model run before it is loaded; the output appears atomically (a hidden
    sibling renamed into place). Progress: ``load`` (label ``spec``) counts 0 of 1 before the
    model is loaded and 1 of 1 after."""
    fmt = normalize_format(fmt)
    output = Path(output).expanduser()
    check_output(fmt, output, overwrite)

    from eqat_cli.fsutil import atomic_dir, atomic_file, dir_size
    from eqat_cli.models import resolve
    from eqat_cli.readers import preflight_model

    def refuse_full_precision():
        return BadInputError(
            f"{spec} is a full-precision model; --format {fmt} writes quantized checkpoints",
            hint="quantize it first, e.g. `eqat block-ap MODEL --bits 4 --group 128 -o OUT`",
        )

    if preflight_model(spec) is False and fmt != "fp16":
        raise refuse_full_precision()
    count(progress, "load", str(spec), 0, 1)
    # CPU and fp32: packed layers stay packed, the fp16-stored rest is widened losslessly.
    lm = resolve(spec, device="cpu", dtype="fp32")
    count(progress, "load", str(spec), 1, 1)
    if lm.format == "fp" and fmt != "fp16":
        raise refuse_full_precision()
    source = {
        "source": str(spec),
        "source_format": lm.format,
        "architecture": lm.arch.name,
    }
    if lm.quant:
        source.update(bits=lm.quant["bits"], group_size=lm.quant["group_size"])

    result: dict[str, Any]
    if fmt == "eqat":
        from eqat_cli.formats.native import eqat_section, save_native

        meta = dict(source)
        old = eqat_section(lm.path) if lm.path is not None and lm.format == "eqat" else None
        if old:
            meta = {**{k: v for k, v in old.items() if k not in ("format", "format_version")}, **meta}
        with atomic_dir(output, overwrite=overwrite) as tmp:
            save_native(lm.model, lm.tokenizer, tmp, meta)
        result = {"bits": lm.quant["bits"], "group_size": lm.quant["group_size"]}
    elif fmt in ("gptq", "gptq_v2"):
        from eqat_cli.formats.gptq import check_gptq_compatible, save_gptq

        check_gptq_compatible(lm.model, fmt)  # before any file is created
        with atomic_dir(output, overwrite=overwrite) as tmp:
            result = save_gptq(lm.model, lm.tokenizer, tmp, fmt, provenance=source)
    elif fmt == "fp16":
        from eqat_cli.formats.dense import save_dense

        with atomic_dir(output, overwrite=overwrite) as tmp:
            result = save_dense(lm.model, lm.tokenizer, tmp, provenance={"dequantized_from": source})
    elif fmt == "mlx":
        from eqat_cli.formats import mlx

        mlx.check(lm.model)  # before any file is created
        with atomic_dir(output, overwrite=overwrite) as tmp:
            result = mlx.write(lm.model, lm.tokenizer, tmp, provenance=source)
    else:
        from eqat_cli.formats.gguf_export import check_gguf_exportable, save_gguf, tokenizer_metadata

        check_gguf_exportable(lm.model)
        tokenizer_metadata(lm.tokenizer, lm.model.config.vocab_size)  # fail early on the vocabulary
        output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(output) as tmp:
            result = save_gguf(lm.model, lm.tokenizer, tmp, provenance=source, name=output.stem)
    summary = {
        "format": fmt,
        "output": str(output),
        "size_bytes": dir_size(output),
        "source": source,
        **result,
        "load_with": HOW_TO_LOAD[fmt].format(out=output),
    }
    return summary
