"""The formats eqat writes out of the box, one :class:`~eqat_cli.format_spec.Format` each.

Registered by the built-in ``formats`` plugin (:mod:`eqat_cli.plugins.formats`) exactly as a
third-party format would be. Nothing here imports torch: each writer imports its module from
:mod:`eqat_cli.formats` when called.
"""

from __future__ import annotations

from eqat_cli.format_spec import Format, WriteJob
from eqat_cli.formats.meta import CheckpointMeta

# -- eqat native (EfficientQAT layout) ----------------------------------------------------------


def _check_native(model, tokenizer=None) -> None:
    return None  # every packed model the loader accepts has a native layout


def _write_native(job: WriteJob) -> dict:
    from eqat_cli.formats.native import save_native

    # A native source keeps its section (recipe, calibration, ...); the provenance is laid over it.
    meta = (job.source_meta or CheckpointMeta()).updated(job.provenance)
    layers = {n: m.scheme for n, m in job.model.named_modules() if hasattr(m, "qweight") and hasattr(m, "scheme")}
    if len(set(layers.values())) > 1:  # mixed precision (e.g. from GPTQ's dynamic): every layer's scheme recorded
        meta = meta.updated(modules=layers)
    save_native(job.model, job.tokenizer, job.target, meta)
    return {"bits": job.quant["bits"], "group_size": job.quant["group_size"]}


NATIVE = Format(
    name="eqat",
    aliases=("native", "efficientqat"),
    description="eqat native (EfficientQAT layout)",
    check=_check_native,
    write=_write_native,
    load_hint="eqat eval {out} --ppl wikitext2",
)

# -- GPTQ v1 / v2 ------------------------------------------------------------------------------


def _gptq(version: str):
    def check(model, tokenizer=None) -> None:
        from eqat_cli.formats.gptq import check_gptq_compatible

        check_gptq_compatible(model, version)

    def write(job: WriteJob) -> dict:
        from eqat_cli.formats.gptq import save_gptq

        return save_gptq(job.model, job.tokenizer, job.target, version, provenance=job.provenance)

    return check, write


_gptq1_check, _gptq1_write = _gptq("gptq")
_gptq2_check, _gptq2_write = _gptq("gptq_v2")

GPTQ_V1 = Format(
    name="gptq",
    aliases=("gptq_v1", "gptqv1"),
    description="GPTQ v1",
    check=_gptq1_check,
    write=_gptq1_write,
    load_hint="eqat eval {out}  |  AutoModelForCausalLM.from_pretrained('{out}') (needs optimum + gptqmodel)",
)

GPTQ_V2 = Format(
    name="gptq_v2",
    aliases=("gptqv2",),
    description="GPTQ v2",
    check=_gptq2_check,
    write=_gptq2_write,
    load_hint="eqat eval {out}  |  GPTQModel.load('{out}')  |  AutoModelForCausalLM.from_pretrained('{out}')"
              " (needs optimum + gptqmodel)",
)

# -- dense (dequantized) -----------------------------------------------------------------------


def _check_dense(model, tokenizer=None) -> None:
    return None  # every model dequantizes


def _write_dense(job: WriteJob) -> dict:
    from eqat_cli.formats.dense import save_dense

    return save_dense(job.model, job.tokenizer, job.target, provenance={"dequantized_from": job.provenance})


DENSE = Format(
    name="fp16",
    aliases=("fp", "dense", "float16"),
    description="dense fp16 (no quantization_config; also: any full-precision checkpoint)",
    check=_check_dense,
    write=_write_dense,
    load_hint="AutoModelForCausalLM.from_pretrained('{out}')  |  eqat eval {out}",
    quantized_only=False,
)

# -- GGUF: Q4_0 for 2/3-bit, Q4_1 for 4-bit ------------------------------------------------------


def _lazy(module: str, name: str):
    """``module.name``, imported on the first call (the writers import torch; this module must not)."""

    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = name
    return call


GGUF = Format(
    name="gguf",
    aliases=("gguf_q4_1", "q4_1", "gguf_q4_0", "q4_0"),
    description="GGUF (llama.cpp): 2/3-bit as Q4_0, 4-bit as Q4_1, exactly",
    check=_lazy("eqat_cli.formats.gguf_export", "check"),
    write=_lazy("eqat_cli.formats.gguf_export", "write_job"),
    load_hint="llama-cli -m {out}  |  AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)",
    output="file",
    suffix=".gguf",
)

# -- MLX (mlx-lm affine layout) ------------------------------------------------------------------

MLX = Format(
    name="mlx",
    aliases=("mlx_lm",),
    description="MLX (mlx-lm affine quantization): 2/3/4/8 bits, groups 32/64/128",
    check=_lazy("eqat_cli.formats.mlx", "check"),
    write=_lazy("eqat_cli.formats.mlx", "write_job"),
    load_hint="mlx_lm.generate --model {out} --prompt 'Hello'  |  mlx_lm.load('{out}')",
)

BUILTIN_FORMATS: tuple[Format, ...] = (NATIVE, GPTQ_V1, GPTQ_V2, DENSE, GGUF, MLX)
