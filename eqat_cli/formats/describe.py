"""Describing a checkpoint without loading it: what ``eqat pull`` shows (and ``--json`` prints).

:func:`inspect_path` reads a model directory through :class:`~eqat_cli.formats.checkpoint.Checkpoint`
(``config.json`` and the safetensors *headers* only; ``g_idx`` data, a few KB, is the one tensor
read) and asks :mod:`eqat_cli.formats.detect` what it is; a ``.gguf`` file is read through
:class:`~eqat_cli.formats.checkpoint.GGUFFile` (metadata only). :class:`ModelInfo` holds the
answer and its rendering as (label, value) rows; the CLI only lays them out. Torch-free.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import os

from eqat_cli.errors import BadInputError
from eqat_cli.formats.checkpoint import Checkpoint, GGUFFile
from eqat_cli.formats.detect import detect_layer
from eqat_cli.registry import get_registry


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


def _single_or_list(values: list[int]) -> int | list[int] | None:
    s = sorted(set(values))
    if not s:
        return None
    return s[0] if len(s) == 1 else s


def _architecture_name(model_type: str | None) -> str | None:
    if not model_type:
        return None
    try:
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
    ckpt = Checkpoint.open(p, require_weights=True)
    cfg, headers, model_type = ckpt.config, ckpt.tensors, ckpt.model_type
    qc = cfg.get("quantization_config") or {}
    notes: list[str] = []
    layout = ckpt.layout
    fmt = layout.format
    if fmt.startswith("gptq") and qc.get("desc_act"):
        notes.append("desc_act (act-order) checkpoint: eqat loads only sequential g_idx")
    elif fmt.startswith("other"):
        notes.append(f"quantization method {qc['quant_method']!r} is not one eqat reads")
    packed = ckpt.quantized_layers()
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
    g = GGUFFile.open(file)
    arch = g.architecture
    info = ModelInfo(str(file), "gguf", _architecture_name(arch), arch)
    info.size_bytes = Path(file).stat().st_size
    info.details["tensor_types"] = g.tensor_types()
    for key in ("eqat.bits", "eqat.group_size"):
        value = g.field(key)
        if value is not None:
            info.details[key] = value
    return info
