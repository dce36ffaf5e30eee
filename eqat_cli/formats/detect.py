"""What a checkpoint is, read from its files without loading the model (and without torch).

The one place that detects formats: ``models.resolve`` (loading), ``formats.native`` (bits and group
of each packed layer), ``formats.gptq`` and ``eqat pull`` all ask this module.

* :func:`detect_layout`: ``fp``, ``eqat`` (native / EfficientQAT release), ``gptq``, ``gptq_v2`` or
  ``other (METHOD)``, and how packed tensors are read (GPTQ v1's zero offset, GPTQ 3-bit packing);
* :func:`gptq_version`: v1 or v2 from ``checkpoint_format`` or the legacy ``format`` key;
* :func:`layer_quant`: bits and group of one packed layer from its tensor shapes;
* :func:`inspect_path`: all of that for ``eqat pull``, plus the architecture, size on disk and bits
  per weight, reading ``config.json`` and the safetensors *headers* only (``g_idx`` data, a few KB,
  is the one tensor read), or a GGUF file's metadata.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import struct
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from eqat_cli.errors import BadInputError
from eqat_cli.scheme import SUPPORTED_BITS

_COMMON_GROUPS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

@dataclass
class LayerQuant:
    name: str
    bits: int
    group_size: int
    in_features: int
    out_features: int


@dataclass
class ModelInfo:
    path: str
    format: str  # eqat | gptq | gptq_v2 | fp | gguf
    architecture: str | None
    model_type: str | None
    bits: int | list[int] | None = None
    group_size: int | list[int] | None = None
    quantized_layers: int = 0
    size_bytes: int = 0
    bits_per_weight: float | None = None
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def is_quantized(self) -> bool:
        return self.quantized_layers > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["next_command"] = self.next_command()
        return d

    def format_label(self) -> str:
        return {
            "eqat": "eqat native (EfficientQAT layout)",
            "gptq": "GPTQ v1",
            "gptq_v2": "GPTQ v2",
            "fp": "full precision (unquantized)",
            "gguf": "GGUF (llama.cpp)",
        }.get(self.format, self.format)

    def next_command(self) -> str:
        p = _shell_quote(self.path)
        return f"eqat eval {p} --ppl wikitext2"

    def summary_lines(self) -> list[tuple[str, str]]:
        rows = [("format", self.format_label())]
        arch = self.architecture or f"unsupported (model_type {self.model_type!r})"
        if self.architecture and self.model_type and self.architecture != self.model_type:
            arch += f" (model_type {self.model_type})"
        rows.append(("architecture", arch))
        if self.is_quantized:
            rows.append(("bits", _fmt_multi(self.bits)))
            rows.append(("group size", _fmt_group(self.group_size)))
            rows.append(("quantized layers", str(self.quantized_layers)))
            if self.bits_per_weight is not None:
                rows.append(("bits / weight", f"{self.bits_per_weight:.2f} (quantized layers, incl. scales and zeros)"))
        elif self.format == "gguf" and self.details.get("tensor_types"):
            types = ", ".join(f"{k} x{v}" for k, v in sorted(self.details["tensor_types"].items()))
            rows.append(("tensor types", types))
        rows.append(("size on disk", human_bytes(self.size_bytes)))
        return rows


def _shell_quote(s: str) -> str:
    return shlex.quote(s)


def _fmt_multi(v: Any) -> str:
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)


def _fmt_group(v: Any) -> str:
    vals = v if isinstance(v, list) else [v]
    return ", ".join("per-channel (-1)" if g == -1 else str(g) for g in vals)


def human_bytes(n: int) -> str:
    x = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if x < 1024 or unit == "TB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{n} B"


def size_on_disk(path: Path) -> int:
    """Bytes of the model's files (hidden folders such as huggingface_hub's ``.cache`` excluded)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for f in path.rglob("*"):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if f.is_file():
            total += f.stat().st_size
    return total


# ---------------------------------------------------------------------- safetensors headers


@dataclass
class TensorMeta:
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offsets: tuple[int, int]  # relative to the data section
    data_start: int

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


def read_safetensors_header(file: Path) -> dict[str, TensorMeta]:
    """Tensor name -> dtype/shape/offsets, from the JSON header only."""
    from eqat_cli.readers import safetensors_header

    header, data_start = safetensors_header(file, "safetensors weight shard")
    header.pop("__metadata__", None)
    return {
        k: TensorMeta(v["dtype"], tuple(v["shape"]), file, tuple(v["data_offsets"]), data_start)
        for k, v in header.items()
    }


def read_small_tensor(meta: TensorMeta) -> list[int]:
    """Read a small integer tensor (``g_idx``) without numpy or torch."""
    fmt = {"I32": "i", "I64": "q", "I16": "h"}.get(meta.dtype)
    if fmt is None:
        raise BadInputError(f"{meta.file}: cannot read a {meta.dtype} index tensor")
    with open(meta.file, "rb") as fh:
        fh.seek(meta.data_start + meta.offsets[0])
        data = fh.read(meta.nbytes)
    return list(struct.unpack(f"<{len(data) // struct.calcsize(fmt)}{fmt}", data))


def safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        from eqat_cli.readers import check_model_weights

        return check_model_weights(path)
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    return sorted(path.glob("*.safetensors"))


def read_headers(path: Path) -> dict[str, TensorMeta]:
    files = safetensor_files(path)
    if not files:
        raise BadInputError(f"{path} holds no .safetensors weights")
    out: dict[str, TensorMeta] = {}
    for f in files:
        out.update(read_safetensors_header(f))
    return out


# ---------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Layout:
    """A checkpoint's format and how its packed tensors are read."""

    format: str  # fp | eqat | gptq | gptq_v2 | other (METHOD)
    zero_offset: int = 0  # added to stored zero points (GPTQ v1 stores z - 1)
    gptq3: bool = False  # 3-bit codes in GPTQ's layout (32 codes in 3 words)

    @property
    def packed(self) -> bool:
        return self.format in ("eqat", "gptq", "gptq_v2")


def read_config_dict(path: str | os.PathLike) -> dict:
    from eqat_cli.readers import read_model_config

    if not (Path(path) / "config.json").exists():
        raise BadInputError(f"{path} has no config.json")
    return read_model_config(path)


def quantized_layer_names(names: Iterable[str]) -> list[str]:
    """Layers stored packed: every ``X`` with an ``X.qweight`` tensor."""
    return sorted(n[: -len(".qweight")] for n in names if n.endswith(".qweight"))


def gptq_version(qc: dict) -> str:
    """``gptq`` (v1) or ``gptq_v2`` from a GPTQ ``quantization_config``: ``checkpoint_format``, or
    the legacy ``format`` key that older GPTQModel releases wrote."""
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    return "gptq_v2" if fmt == "gptq_v2" else "gptq"


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
    tensor_names = names
    return Layout("eqat" if quantized_layer_names(tensor_names) else "fp")


def detect_layout(path: str | os.PathLike) -> Layout:
    """The layout of a model directory, from ``config.json`` and the safetensors headers (a
    directory without safetensors files, e.g. ``pytorch_model.bin`` only, is left to transformers)."""
    path = Path(path)
    return layout_of(read_config_dict(path), read_headers(path) if safetensor_files(path) else ())


def detect_format(path: str | os.PathLike) -> str:
    """``fp``, ``eqat``, ``gptq``, ``gptq_v2`` or ``other (METHOD)``."""
    return detect_layout(path).format


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
) -> LayerQuant:
    """Bits and group of one packed layer from its tensor shapes.

    Bits: ``qweight`` rows against ``in_features`` and ``qzeros`` columns against ``out_features``
    (either unknown: taken from the shapes). Group: :func:`group_from_rows`, ``group_hint`` being
    the number of zeros in ``g_idx``. ``gptq3`` checks GPTQ's 3-bit packing instead.
    """
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


def detect_layer(name: str, t: dict[str, TensorMeta], gptq3: bool = False) -> LayerQuant:
    """:func:`layer_quant` of a layer in safetensors headers (``g_idx`` read when small)."""
    qw, qz, sc = t.get(f"{name}.qweight"), t.get(f"{name}.qzeros"), t.get(f"{name}.scales")
    if qw is None or qz is None or sc is None:
        raise BadInputError(f"{name}: packed layer lacks qweight/qzeros/scales")
    gi = t.get(f"{name}.g_idx")
    hint = None
    if gi is not None and sc.shape[0] > 1 and gi.nbytes <= 4 * 1024 * 1024:
        hint = sum(1 for v in read_small_tensor(gi) if v == 0)
    return layer_quant(name, qw.shape, qz.shape, sc.shape, in_features=gi.shape[0] if gi is not None else None,
                       group_hint=hint, gptq3=gptq3)


def _single_or_list(values: list[int]) -> int | list[int] | None:
    s = sorted(set(values))
    if not s:
        return None
    return s[0] if len(s) == 1 else s


def _architecture_name(model_type: str | None) -> str | None:
    if not model_type:
        return None
    try:
        from eqat_cli.registry import get_registry

        spec = get_registry().find_architecture(model_type)
    except Exception:  # a broken third-party plugin must not stop a description
        return None
    return spec.name if spec is not None else None


def inspect_path(path: str | os.PathLike) -> ModelInfo:
    """Describe a model directory or ``.gguf`` file without loading it."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return inspect_gguf(p)
    if not p.is_dir():
        raise BadInputError(f"{path} is neither a model directory nor a .gguf file")
    cfg_file = p / "config.json"
    if not cfg_file.exists():
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            info = inspect_gguf(ggufs[0])
            if len(ggufs) > 1:
                info.notes.append(f"{len(ggufs)} .gguf files here; described {ggufs[0].name}")
            return info
        raise BadInputError(f"{path} is not a model directory (no config.json)")
    cfg = read_config_dict(p)
    text_cfg = cfg.get("text_config") or {}
    model_type = cfg.get("model_type") or text_cfg.get("model_type")
    headers = read_headers(p)
    qc = cfg.get("quantization_config") or {}
    notes: list[str] = []
    layout = layout_of(cfg, headers)
    fmt = layout.format
    if fmt.startswith("gptq") and qc.get("desc_act"):
        notes.append("desc_act (act-order) checkpoint: eqat loads only sequential g_idx")
    elif fmt.startswith("other"):
        notes.append(f"quantization method {qc['quant_method']!r} is not one eqat reads")
    packed = quantized_layer_names(headers)
    info = ModelInfo(str(p), fmt, _architecture_name(model_type), model_type, notes=notes)
    info.size_bytes = size_on_disk(p)
    sec = cfg.get("eqat")
    if isinstance(sec, dict):
        info.details["eqat"] = sec
    if fmt == "eqat" and not isinstance(sec, dict):
        notes.append("no eqat section in config.json: bits and group detected from tensor shapes")
    if isinstance(sec, dict) and sec.get("format") == "fp16" and not packed:
        notes.append("dense fp16 export made by eqat pack")
    if not packed or not layout.packed:
        return info
    layers = [detect_layer(n, headers, gptq3=layout.gptq3) for n in packed]
    info.quantized_layers = len(layers)
    info.bits = _single_or_list([lq.bits for lq in layers])
    info.group_size = _single_or_list([lq.group_size for lq in layers])
    nbytes = sum(
        headers[f"{lq.name}.{k}"].nbytes for lq in layers for k in ("qweight", "qzeros", "scales")
    )
    nweights = sum(lq.in_features * lq.out_features for lq in layers)
    info.bits_per_weight = 8 * nbytes / nweights if nweights else None
    # Cross-check declared sections against the shapes.
    declared = qc if fmt.startswith("gptq") else (sec or {})
    for key, found in (("bits", info.bits), ("group_size", info.group_size)):
        if key in declared and declared[key] != found:
            notes.append(f"config declares {key}={declared[key]} but the tensors say {found}")
    return info


def inspect_gguf(file: Path) -> ModelInfo:
    """GGUF metadata: architecture, tensor types (no tensor data is read)."""
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - gguf is a core dependency
        raise BadInputError("reading GGUF metadata needs the 'gguf' package") from e
    try:
        reader = GGUFReader(str(file))
    except Exception as e:
        raise BadInputError(f"{file}: not a readable GGUF file ({e})") from e
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    types = Counter(t.tensor_type.name for t in reader.tensors)
    info = ModelInfo(str(file), "gguf", _architecture_name(arch), arch)
    info.size_bytes = file.stat().st_size
    info.details["tensor_types"] = dict(types)
    for key in ("eqat.bits", "eqat.group_size"):
        f = reader.fields.get(key)
        if f is not None:
            info.details[key] = f.contents()
    return info
