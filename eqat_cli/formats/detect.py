"""What a checkpoint is, read from its files without loading the model (and without torch).

The one place that detects formats: ``models.resolve`` (loading), ``formats.native`` (bits and group
of each packed layer), ``formats.gptq`` and ``eqat pull`` all ask this module. It reads through
:class:`~eqat_cli.formats.checkpoint.Checkpoint` (``config.json`` and each shard header read once).

* :func:`detect_layout`: ``fp``, ``eqat`` (native / EfficientQAT release), ``gptq``, ``gptq_v2`` or
  ``other (METHOD)``, and how packed tensors are read (GPTQ v1's zero offset, GPTQ 3-bit packing).
  These names are the output formats' names (:mod:`eqat_cli.format_spec`; ``fp`` is an alias
  of the dense ``fp16`` format), so ``eqat pack --format X`` and detection speak one vocabulary;
* :func:`gptq_version`: v1 or v2 from ``checkpoint_format`` or the legacy ``format`` key;
* :func:`layer_quant`: bits and group of one packed layer: the scheme eqat recorded in
  ``config.json`` when there is one (checked against the shapes), else inferred from the tensor
  shapes (foreign checkpoints: EfficientQAT releases, GPTQ).

Describing a checkpoint for ``eqat pull`` is :mod:`eqat_cli.formats.describe`.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from eqat_cli.errors import BadInputError
from eqat_cli.readers import safetensors_header
from eqat_cli.scheme import SUPPORTED_BITS, QuantScheme

FULL_PRECISION = "fp"  # the layout of an unquantized checkpoint (an alias of the dense format)


@dataclass
class TensorMeta:
    """One tensor as a safetensors header describes it."""

    dtype: str
    shape: tuple[int, ...]
    file: Path
    offsets: tuple[int, int]  # relative to the data section
    data_start: int

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


def read_safetensors_header(file: Path) -> dict[str, TensorMeta]:
    """Tensor name -> dtype/shape/offsets, from the validated JSON header only."""
    header, data_start = safetensors_header(file, "safetensors weight shard")
    header.pop("__metadata__", None)
    return {
        k: TensorMeta(v["dtype"], tuple(v["shape"]), Path(file), tuple(v["data_offsets"]), data_start)
        for k, v in header.items()
    }
PACKED_FORMATS = ("eqat", "gptq", "gptq_v2")

_COMMON_GROUPS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

@dataclass
class LayerQuant:
    name: str
    bits: int
    group_size: int
    in_features: int
    out_features: int

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.group_size)


# ---------------------------------------------------------------------- safetensors headers


def read_small_tensor(meta: TensorMeta) -> list[int]:
    """Read a small integer tensor (``g_idx``) without numpy or torch."""
    fmt = {"I32": "i", "I64": "q", "I16": "h"}.get(meta.dtype)
    if fmt is None:
        raise BadInputError(f"{meta.file}: cannot read a {meta.dtype} index tensor")
    with open(meta.file, "rb") as fh:
        fh.seek(meta.data_start + meta.offsets[0])
        data = fh.read(meta.nbytes)
    return list(struct.unpack(f"<{len(data) // struct.calcsize(fmt)}{fmt}", data))


# ---------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Layout:
    """A checkpoint's format and how its packed tensors are read."""

    format: str  # fp | eqat | gptq | gptq_v2 | other (METHOD)
    zero_offset: int = 0  # added to stored zero points (GPTQ v1 stores z - 1)
    gptq3: bool = False  # 3-bit codes in GPTQ's layout (32 codes in 3 words)

    @property
    def packed(self) -> bool:
        return self.format in PACKED_FORMATS


def quantized_layer_names(names: Iterable[str]) -> list[str]:
    """Layers stored packed: every ``X`` with an ``X.qweight`` tensor."""
    return sorted(n[: -len(".qweight")] for n in names if n.endswith(".qweight"))


def gptq_version(qc: dict) -> str:
    """``gptq`` (v1) or ``gptq_v2`` from a GPTQ ``quantization_config``: ``checkpoint_format``, or
    the legacy ``format`` key that older GPTQModel releases wrote."""
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    return "gptq_v2" if fmt == "gptq_v2" else "gptq"


def gptq_dynamic_bits(qc: dict, names: Iterable[str]) -> dict[str, QuantScheme]:
    """Per-module schemes a GPTQ ``quantization_config``'s ``dynamic`` section gives ``names`` (the
    packed layers), as GPTQModel reads it: keys are regular expressions matched from the start of
    the module path (``re.match``), optionally prefixed ``+:`` (override) or ``-:`` (the module is
    not quantized); the first matching key wins; its ``bits`` / ``group_size`` override the
    top-level ones. Only modules whose scheme differs from the top level are returned."""
    dynamic = qc.get("dynamic")
    if not dynamic:
        return {}
    if not isinstance(dynamic, dict):
        raise BadInputError("quantization_config.dynamic is not a JSON object")
    base_bits, base_group = qc.get("bits"), qc.get("group_size", -1)
    compiled = []
    for key, override in dynamic.items():
        raw = key[2:] if key.startswith(("+:", "-:")) else key
        try:
            compiled.append((key.startswith("-:"), re.compile(raw), override))
        except re.error as e:
            raise BadInputError(f"quantization_config.dynamic: bad pattern {key!r} ({e})") from None
    out: dict[str, QuantScheme] = {}
    for name in names:
        for negative, rx, override in compiled:
            if rx.match(name):
                if negative or not isinstance(override, dict):
                    break
                bits, group = override.get("bits", base_bits), override.get("group_size", base_group)
                if (bits, group) != (base_bits, base_group):
                    try:
                        out[name] = QuantScheme(int(bits), int(group))
                    except (TypeError, ValueError) as e:
                        raise BadInputError(f"quantization_config.dynamic: {name}: bits={bits!r}, "
                                            f"group_size={group!r} ({e})") from None
                break
    return out


def layout_of(cfg: dict, tensor_names: Iterable[str]) -> Layout:
    """The layout a ``config.json`` dict and the stored tensor names describe."""
    qc = cfg.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "gptq":
        version = gptq_version(qc)
        return Layout(version, 1 if version == "gptq" else 0, qc.get("bits") == 3)
    if method:
        return Layout(f"other ({method})")
    names = list(tensor_names)
    if isinstance(cfg.get("quantization"), dict) and any(n.endswith(".biases") for n in names):
        return Layout("other (mlx)")  # mlx-lm affine layout (eqat writes it, does not read it)
    kquant = any(n.endswith(".kq_blocks") for n in names)  # GGML-grid layers (eqat_cli/quant/kquant.py)
    return Layout("eqat" if quantized_layer_names(names) or kquant else FULL_PRECISION)


def _pf(bits: int) -> int:
    return 32 // bits


def group_from_rows(name: str, in_features: int, n_groups: int, hint: int | None = None) -> int:
    """Group size from the number of ``scales`` rows: ``hint`` (the size of ``g_idx``'s first
    group) when it fits, else the smallest common group size that gives that many rows (a ragged
    last group included), else the rows' even split."""
    if n_groups == 1:
        return -1
    if hint and math.ceil(in_features / hint) == n_groups:
        return hint
    fits = [g for g in _COMMON_GROUPS if math.ceil(in_features / g) == n_groups]
    if fits:
        return fits[0]
    group = math.ceil(in_features / n_groups)
    if math.ceil(in_features / group) != n_groups:
        raise BadInputError(f"{name}: {n_groups} scale rows fit no group size for {in_features} inputs")
    return group


def layer_quant(
    name: str,
    qweight_shape: Sequence[int],
    qzeros_shape: Sequence[int],
    scales_shape: Sequence[int],
    in_features: int | None = None,
    out_features: int | None = None,
    group_hint: int | None = None,
    gptq3: bool = False,
    declared: QuantScheme | None = None,
) -> LayerQuant:
    """Bits and group of one packed layer.

    ``declared`` (the scheme eqat recorded in ``config.json``) comes first: the shapes must fit it
    (else one error naming the layer); one group is reported as per-channel (-1), as the shapes
    say. Without it (foreign checkpoints), from the shapes: bits from ``qweight`` rows against
    ``in_features`` and ``qzeros`` columns against ``out_features`` (either unknown: taken from
    the shapes); group from :func:`group_from_rows`, ``group_hint`` being the number of zeros in
    ``g_idx``. ``gptq3`` checks GPTQ's 3-bit packing instead.
    """
    if declared is not None and not gptq3:
        return _declared_layer(name, qweight_shape, qzeros_shape, scales_shape, in_features, out_features, declared)
    qw_rows, qw_cols = qweight_shape
    qz_rows, qz_cols = qzeros_shape
    n_groups, sc_cols = scales_shape
    out_f = qw_cols if out_features is None else out_features
    if qw_cols != out_f or sc_cols != out_f or qz_rows != n_groups:
        raise BadInputError(
            f"{name}: inconsistent shapes qweight {tuple(qweight_shape)}, qzeros {tuple(qzeros_shape)}, "
            f"scales {tuple(scales_shape)} for {out_f} outputs"
        )
    if gptq3:
        in_f = in_features if in_features is not None else qw_rows * 32 // 3
        if qz_cols * 32 != out_f * 3 or qw_rows * 32 != in_f * 3:
            raise BadInputError(
                f"{name}: shapes qweight {tuple(qweight_shape)}, qzeros {tuple(qzeros_shape)} are not "
                "GPTQ 3-bit packing"
            )
        return LayerQuant(name, 3, group_from_rows(name, in_f, n_groups, group_hint), in_f, out_f)
    cands = [
        (b, in_features if in_features is not None else qw_rows * _pf(b))
        for b in SUPPORTED_BITS
        if qz_cols == math.ceil(out_f / _pf(b))
        and (in_features is None or qw_rows == math.ceil(in_features / _pf(b)))
    ]
    if not cands:
        raise BadInputError(
            f"{name}: shapes qweight {tuple(qweight_shape)}, qzeros {tuple(qzeros_shape)} match no bit "
            f"width in {SUPPORTED_BITS}" + (f" for {in_features} inputs" if in_features else "")
        )
    bits, in_f = cands[0]
    return LayerQuant(name, bits, group_from_rows(name, in_f, n_groups, group_hint), in_f, out_f)


def _declared_layer(name, qweight_shape, qzeros_shape, scales_shape, in_features, out_features,
                    declared: QuantScheme) -> LayerQuant:
    qw_rows, qw_cols = qweight_shape
    qz_rows, qz_cols = qzeros_shape
    n_groups, sc_cols = scales_shape
    out_f = qw_cols if out_features is None else out_features
    in_f = in_features if in_features is not None else qw_rows * declared.pack_factor
    fits = (qw_cols == out_f and sc_cols == out_f and qz_rows == n_groups
            and qw_rows == declared.packed_rows(in_f) and qz_cols == declared.packed_rows(out_f)
            and n_groups == declared.n_groups(in_f))
    if not fits:
        raise BadInputError(
            f"{name}: config.json's eqat section declares {declared.tag}, but the shapes qweight "
            f"{tuple(qweight_shape)}, qzeros {tuple(qzeros_shape)}, scales {tuple(scales_shape)} do not "
            f"fit it for {in_f} inputs and {out_f} outputs"
        )
    return LayerQuant(name, declared.bits, -1 if n_groups == 1 else declared.group_size, in_f, out_f)


def detect_layer(name: str, t: dict[str, TensorMeta], gptq3: bool = False,
                 declared: QuantScheme | None = None) -> LayerQuant:
    """:func:`layer_quant` of a layer in safetensors headers (``g_idx`` read when small)."""
    qw, qz, sc = t.get(f"{name}.qweight"), t.get(f"{name}.qzeros"), t.get(f"{name}.scales")
    if qw is None or qz is None or sc is None:
        raise BadInputError(f"{name}: packed layer lacks qweight/qzeros/scales")
    gi = t.get(f"{name}.g_idx")
    hint = None
    if gi is not None and sc.shape[0] > 1 and gi.nbytes <= 4 * 1024 * 1024:
        hint = sum(1 for v in read_small_tensor(gi) if v == 0)
    return layer_quant(name, qw.shape, qz.shape, sc.shape, in_features=gi.shape[0] if gi is not None else None,
                       group_hint=hint, gptq3=gptq3, declared=declared)
