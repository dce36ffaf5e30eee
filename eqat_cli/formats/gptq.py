"""GPTQ v1 / v2 checkpoints: the writer.

They are read like native checkpoints, by ``formats/native.load_packed_model`` with the zero offset
and 3-bit packing of the layout ``formats/detect.py`` finds (``models.resolve`` does both).

Same tensor names as the native layout (``X.qweight``, ``X.qzeros``, ``X.scales``, ``X.g_idx``) and
the same packing for 2/4/8 bits. Differences (see ``docs/FORMATS.md``):

* v1 stores ``z - 1`` in ``qzeros`` (kernels add 1 back); v2 stores ``z``. An asymmetric model with
  a zero point of 0 cannot be written as v1 (``-1`` does not fit the unsigned field, and GPTQModel's
  v1->v2 conversion adds 1 to the packed word, carrying into the neighbour). We refuse and point to
  ``gptq_v2``, which is lossless.
* 3 bits use GPTQ's layout: 32 codes in 3 int32 words, for ``qweight`` rows and ``qzeros`` columns.
* GPTQ loaders assume ``in_features % group_size == 0`` (they allocate ``in // group`` scale rows);
  a model with a ragged last group is rejected with the group sizes that would fit.
* ``config.json`` carries ``quantization_config`` (``quant_method: gptq``, ``sym: false``,
  ``desc_act: false``, ``checkpoint_format``); ``quantize_config.json`` repeats it for
  AutoGPTQ-era loaders.
"""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eqat_cli.errors import BadInputError, UnsupportedError
from eqat_cli.formats.native import (
    write_sidecars,
    config_dict_for_save,
    packed_state_dict,
    save_state_dict_sharded,
)
from eqat_cli.quant import packing
from eqat_cli.quant.linear import PackedLinear
from eqat_cli.scheme import QuantScheme

VERSIONS = ("gptq", "gptq_v2")
# Group sizes GPTQ kernels/loaders accept (GPTQModel's TorchLinear; -1 = per-channel).
GPTQ_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)


def packed_layers(model: nn.Module) -> dict[str, PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def uniform_scheme(layers: dict[str, PackedLinear], what: str) -> QuantScheme:
    """The model's single scheme (bits and group size).

    A layer whose row is one group (``in_features <= group``) reads back as per-channel (-1), so
    such layers agree with any group size at least their width.
    """
    if not layers:
        raise BadInputError(
            f"the model has no quantized (packed) layers; {what} needs a quantized model",
            hint="quantize it first, e.g. `eqat block-ap MODEL --bits 4 --group 128 -o OUT`",
        )
    bits = sorted({m.bits for m in layers.values()})
    multi = sorted({m.group_size for m in layers.values() if m.scales.shape[0] > 1})
    group = multi[0] if len(multi) == 1 else -1
    single_too_wide = [m for m in layers.values() if m.scales.shape[0] == 1 and group != -1 and m.in_features > group]
    if len(bits) > 1 or len(multi) > 1 or single_too_wide:
        combos = sorted({(m.bits, m.group_size) for m in layers.values()})
        raise UnsupportedError(
            f"{what} needs one bit width and group size for every layer; this model mixes "
            + ", ".join(f"w{b}g{g}" for b, g in combos)
        )
    return QuantScheme(bits[0], group)


def base_scheme_and_dynamic(layers: dict[str, PackedLinear], group: int) -> tuple[QuantScheme, dict[str, QuantScheme]]:
    """A mixed-width model in GPTQModel's terms, at the model's one ``group`` size: the top-level
    scheme (the width of most weights) and the layers of any other width (for
    ``quantization_config.dynamic``)."""
    weight: dict[int, int] = {}
    for m in layers.values():
        weight[m.bits] = weight.get(m.bits, 0) + m.in_features * m.out_features
    base = max(sorted(weight), key=lambda b: weight[b])
    return QuantScheme(base, group), {n: QuantScheme(m.bits, group) for n, m in layers.items() if m.bits != base}


def dynamic_section(per_layer: dict[str, QuantScheme], base: QuantScheme) -> dict[str, dict[str, int]]:
    """GPTQModel's ``dynamic`` overrides: one exact-match pattern per layer (``+:^path$``, the
    path's dots escaped), each giving that layer's ``bits`` (and ``group_size`` where it differs
    from ``base``'s)."""
    return {f"+:^{re.escape(name)}$": {"bits": s.bits,
                                       **({"group_size": s.group_size} if s.group_size != base.group_size else {})}
            for name, s in sorted(per_layer.items())}


def _as_bits(m: PackedLinear, bits: int) -> SimpleNamespace:
    """A layer's shape and group as :func:`uniform_scheme` sees them, at ``bits`` (mixed widths
    share one group-size check)."""
    return SimpleNamespace(bits=bits, group_size=m.group_size, scales=m.scales, in_features=m.in_features)


def fitting_group_sizes(in_features: list[int]) -> list[int]:
    return [g for g in GPTQ_GROUP_SIZES if all(i % g == 0 for i in in_features)]


def check_gptq_compatible(model: nn.Module, version: str) -> QuantScheme:
    """Raise a one-line error if the model cannot be written as ``version``; return its scheme."""
    if version not in VERSIONS:
        raise BadInputError(f"unknown GPTQ version {version!r}; choose one of {', '.join(VERSIONS)}")
    layers = packed_layers(model)
    what = f"--format {version}"
    widths = sorted({m.bits for m in layers.values()})
    if len(widths) > 1:  # mixed precision: the widths go to `dynamic`; the group size is one for all
        try:
            group = uniform_scheme({n: _as_bits(m, widths[0]) for n, m in layers.items()}, what).group_size
        except UnsupportedError:
            combos = sorted({(m.bits, m.group_size) for m in layers.values()})
            raise UnsupportedError(
                f"{what} needs one group size for every layer (mixed widths are written as "
                f"quantization_config.dynamic); this model mixes " + ", ".join(f"w{b}g{g}" for b, g in combos)
            ) from None
        scheme = base_scheme_and_dynamic(layers, group)[0]
    else:
        scheme = uniform_scheme(layers, what)
    bits, group = scheme.bits, scheme.group_size
    ins = sorted({m.in_features for m in layers.values()})
    if group != -1:
        for name, m in layers.items():
            if m.in_features % group:
                fits = fitting_group_sizes(ins)
                raise UnsupportedError(
                    f"{name} has in_features {m.in_features}, not a multiple of group size {group} "
                    f"(its last group holds {m.in_features % group} columns); GPTQ loaders need "
                    f"in_features % group_size == 0. Group sizes that fit every layer: "
                    f"{', '.join(map(str, fits + [-1]))} (-1 = per-channel)",
                    hint="re-quantize with one of those group sizes, or export with "
                    "--format eqat, fp16 or gguf (GGUF takes ragged groups that are multiples of 32)",
                )
    if group != -1 and group not in GPTQ_GROUP_SIZES:
        raise UnsupportedError(
            f"group size {group} is not one GPTQ kernels accept ({', '.join(map(str, GPTQ_GROUP_SIZES))}, -1)"
        )
    for name, m in layers.items():
        if m.bits == 3:
            for dim, n in (("in_features", m.in_features), ("out_features", m.out_features)):
                if n % 32:
                    raise UnsupportedError(
                        f"{name}: {dim} {n} is not a multiple of 32, which GPTQ's 3-bit packing "
                        "(32 codes in 3 words) needs"
                    )
        else:
            pf = packing.pack_factor(m.bits)
            for dim, n in (("in_features", m.in_features), ("out_features", m.out_features)):
                if n % pf:
                    raise UnsupportedError(
                        f"{name}: {dim} {n} is not a multiple of {pf} ({bits}-bit codes per int32 word)"
                    )
    if version == "gptq":
        zero_count = sum(int((m.zero_points() == 0).sum()) for m in layers.values())
        if zero_count:
            total = sum(m.zero_points().numel() for m in layers.values())
            worst = next(n for n, m in layers.items() if bool((m.zero_points() == 0).any()))
            raise UnsupportedError(
                f"cannot write GPTQ v1: {zero_count} of {total} zero points are 0 (first in {worst}); "
                "v1 stores z-1 and -1 does not fit the unsigned field (a corrupt file, not a lossy one)",
                hint="use --format gptq_v2, which stores z as-is and is lossless "
                "(GPTQModel, and transformers through it, load v2)",
            )
    return scheme


def gptq_tensors(layer: PackedLinear, version: str) -> dict[str, torch.Tensor]:
    """qweight/qzeros for one layer in the GPTQ layout, verified by unpacking."""
    codes = layer.codes()  # [in, out]
    zeros = layer.zero_points()  # [n_groups, out]
    stored = zeros - 1 if version == "gptq" else zeros
    if layer.bits == 3:
        qweight = packing.pack_rows_gptq3(codes)
        qzeros = packing.pack_cols_gptq3(stored)
        back_c = packing.unpack_rows_gptq3(qweight, layer.in_features)
        back_z = packing.unpack_cols_gptq3(qzeros, layer.out_features)
    else:
        qweight = layer.qweight.detach().clone()
        qzeros = packing.pack_cols(stored, layer.bits)
        back_c = packing.unpack_rows(qweight, layer.bits, layer.in_features)
        back_z = packing.unpack_cols(qzeros, layer.bits, layer.out_features)
    if not torch.equal(back_c, codes) or not torch.equal(back_z, stored.to(torch.int32)):
        raise AssertionError("GPTQ pack/unpack mismatch: refusing to write a corrupt file")
    return {"qweight": qweight.contiguous(), "qzeros": qzeros.contiguous()}


def quantization_config(scheme: QuantScheme, version: str, provenance: dict | None = None,
                        dynamic: dict[str, QuantScheme] | None = None) -> dict:
    """The GPTQ ``quantization_config``; ``dynamic`` (mixed precision: layer path -> scheme for the
    layers whose scheme is not ``scheme``) becomes GPTQModel's per-module ``dynamic`` section."""
    from eqat_cli import __version__

    meta: dict[str, Any] = {"quantizer": [f"eqat:{__version__}"]}
    if provenance:
        meta["eqat"] = provenance
    return {
        "quant_method": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "sym": False,
        "desc_act": False,
        "static_groups": False,
        "true_sequential": True,
        "lm_head": False,
        "pack_dtype": "int32",
        "checkpoint_format": version,
        "meta": meta,
        **({"dynamic": dynamic_section(dynamic, scheme)} if dynamic else {}),
    }


def save_gptq(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    version: str = "gptq_v2",
    provenance: dict | None = None,
) -> dict:
    """Write ``model`` (packed) as a GPTQ ``version`` checkpoint into the empty dir ``out_dir``."""
    scheme = check_gptq_compatible(model, version)
    bits, group = scheme.bits, scheme.group_size
    out = Path(out_dir)
    sd = packed_state_dict(model)
    for name, layer in packed_layers(model).items():
        for k, v in gptq_tensors(layer, version).items():
            sd[f"{name}.{k}"] = v
    save_state_dict_sharded(sd, out)
    _, dynamic = base_scheme_and_dynamic(packed_layers(model), group)
    qc = quantization_config(scheme, version, provenance, dynamic)
    cfg = config_dict_for_save(model.config, None)
    cfg["quantization_config"] = qc
    write_sidecars(model, tokenizer, out, cfg)
    (out / "quantize_config.json").write_text(json.dumps(qc, indent=2, sort_keys=True))
    notes = []
    if dynamic:
        notes.append(f"mixed widths: {len(dynamic)} layers differ from the top-level {bits} bits, listed in "
                     "quantization_config.dynamic (GPTQModel reads it; loaders without it cannot load this file)")
    if bits == 3 or any(d.bits == 3 for d in dynamic.values()):
        # T-MAC's converter derives bits from scales/qzeros widths (32 // (out / qzeros cols)),
        # which assumes 32 % bits == 0: it cannot read GPTQ's 3-bit layout (32 codes in 3 words).
        notes.append("T-MAC cannot read GPTQ's 3-bit layout (it assumes 32 // bits codes per word); "
                     "vLLM's gptq kernel and GPTQModel can")
    return {"bits": bits, "group_size": group, "checkpoint_format": version, "notes": notes,
            **({"dynamic": len(dynamic)} if dynamic else {})}

