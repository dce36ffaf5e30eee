"""``eqat pack``: convert a quantized model between checkpoint formats."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from eqat_cli.cli.common import (
    JsonOpt, ModelArg, OutOpt, OverwriteOpt, TrustRemoteCodeOpt, console, emit_json,
)
from eqat_cli.errors import BadInputError

FORMATS = ("eqat", "gptq", "gptq_v2", "fp16", "gguf")

HOW_TO_LOAD = {
    "eqat": "eqat eval {out} --ppl wikitext2",
    "gptq": "eqat eval {out}  |  AutoModelForCausalLM.from_pretrained('{out}') (needs optimum + gptqmodel)",
    "gptq_v2": "eqat eval {out}  |  GPTQModel.load('{out}')  |  AutoModelForCausalLM.from_pretrained('{out}')"
               " (needs optimum + gptqmodel)",
    "fp16": "AutoModelForCausalLM.from_pretrained('{out}')  |  eqat eval {out}",
    "gguf": "llama-cli -m {out}  |  AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)",
}


def _normalize_format(fmt: str) -> str:
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


def pack_model(spec: str, fmt: str, output: Path, overwrite: bool = False) -> dict[str, Any]:
    """Load ``spec`` (any model the resolver accepts) and write it as ``fmt`` at ``output``."""
    fmt = _normalize_format(fmt)
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
    console.print(f"loading [bold]{spec}[/]")
    # CPU and fp32: packed layers stay packed, the fp16-stored rest is widened losslessly.
    lm = resolve(spec, device="cpu", dtype="fp32")
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


def pack_cmd(
    model: ModelArg,
    fmt: Annotated[str, typer.Option("--format", "-f", help=f"One of: {', '.join(FORMATS)}.")],
    output: OutOpt,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = None,
):
    """GPTQ needs in_features to be a multiple of the group size; v1 cannot hold a zero point of
    0 (use gptq_v2, which is lossless). GGUF is exact for 4-bit models with groups that are
    multiples of 32 (Q4_1). Output is written atomically.

    Example: [bold]eqat pack out/w4g64 --format gguf -o out/w4g64.gguf[/]
    """
    from eqat_cli.formats.detect import human_bytes

    summary = pack_model(model, fmt, output, overwrite)
    console.print(f"[green]wrote[/] {summary['output']} ({summary['format']}, "
                  f"{human_bytes(summary['size_bytes'])})")
    for note in summary.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"load with: {summary['load_with']}", soft_wrap=True)
    emit_json(summary, json_out)
