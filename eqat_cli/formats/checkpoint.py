"""Reading a checkpoint's description once: :class:`Checkpoint` (a safetensors model directory) and
:class:`GGUFFile` (a ``.gguf`` file), both without torch.

``Checkpoint.open(path)`` reads ``config.json`` (checked by :func:`eqat_cli.model_files.read_model_config`),
the shard index if any, and every shard's safetensors header exactly once (each validated by
:func:`eqat_cli.readers.safetensors_header`); detection (:mod:`eqat_cli.formats.detect`), loading
(:mod:`eqat_cli.models`, :mod:`eqat_cli.formats.native`) and shard reading
(:mod:`eqat_cli.formats.shards`) all ask the same object. Tensor data is read later, by whoever
needs it.

``GGUFFile.open(path)`` is the one GGUF reader: it checks the fixed header (magic, version, counts
that fit the file) itself, so a damaged file is one line naming the file, then parses the rest
with the ``gguf`` package.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from eqat_cli.errors import BadInputError, MissingDependencyError
from eqat_cli.formats.detect import TensorMeta, gptq_dynamic_bits, layout_of, quantized_layer_names, read_safetensors_header  # noqa: F401
from eqat_cli.formats.meta import CheckpointMeta
from eqat_cli.model_files import INDEX_FILE, read_index, read_model_config, shard_files  # noqa: F401 (re-exported)
from eqat_cli.readers import check_gguf, reading
from eqat_cli.scheme import QuantScheme

@dataclass
class Checkpoint:
    """A model directory's ``config.json``, shard index and safetensors headers, each read once."""

    path: Path
    config: dict
    files: list[Path]
    tensors: dict[str, TensorMeta]  # every stored tensor, by its key on disk
    index: dict | None = None
    _layout: Any = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike, require_weights: bool = False, config: bool = True) -> "Checkpoint":
        """Read ``path``'s description. A directory without safetensors files (e.g.
        ``pytorch_model.bin`` only) opens with no tensors unless ``require_weights``;
        ``config=False`` reads the weights' description only (no ``config.json`` needed)."""
        p = Path(path)
        if config and not (p / "config.json").exists():
            raise BadInputError(f"{path} has no config.json")
        config = read_model_config(p) if config else {}
        index = read_index(p)
        files = shard_files(p, index)
        if not files and require_weights:
            raise BadInputError(f"{p} holds no .safetensors weights")
        tensors: dict[str, TensorMeta] = {}
        for f in files:
            tensors.update(read_safetensors_header(f))
        return cls(p, config, files, tensors, index)  # type: ignore[arg-type]

    # -- what it is -----------------------------------------------------------------------------
    @property
    def layout(self):
        """The :class:`~eqat_cli.formats.detect.Layout` of the checkpoint."""
        if self._layout is None:
            self._layout = layout_of(self.config, self.tensors)
        return self._layout

    @property
    def format(self) -> str:
        return self.layout.format

    @cached_property
    def meta(self) -> CheckpointMeta | None:
        """The ``eqat`` section of ``config.json`` (``None`` for checkpoints eqat did not write)."""
        return CheckpointMeta.from_config(self.config, str(self.path / "config.json"))

    @property
    def declared_scheme(self) -> QuantScheme | None:
        """Bits and group size as eqat recorded them for a native checkpoint's packed layers;
        ``None`` for foreign checkpoints (their layers' shapes tell)."""
        meta = self.meta
        if meta is None or meta.format != "eqat" or self.layout.format != "eqat":
            return None
        return meta.scheme

    @cached_property
    def declared_modules(self) -> dict[str, QuantScheme]:
        """Per-layer schemes of a mixed-precision checkpoint (module path -> scheme): the ``eqat``
        section's ``modules`` of a native checkpoint, GPTQ's ``dynamic`` overrides (only the layers
        that differ from the top level); empty when every layer has one scheme."""
        fmt = self.layout.format
        if fmt == "eqat":
            meta = self.meta
            return dict(meta.modules) if meta is not None and meta.format == "eqat" and meta.modules else {}
        if fmt in ("gptq", "gptq_v2"):
            return gptq_dynamic_bits(self.config.get("quantization_config") or {}, quantized_layer_names(self.tensors))
        return {}

    @property
    def model_type(self) -> str | None:
        text = self.config.get("text_config") if isinstance(self.config.get("text_config"), dict) else {}
        return self.config.get("model_type") or text.get("model_type")

    def weight_files(self) -> list[Path]:
        if not self.files:
            raise BadInputError(f"{self.path} holds no .safetensors weights")
        return self.files

    def weight_map(self) -> dict[str, str]:
        """Tensor key -> shard file name (from the headers, which the index must agree with)."""
        return {k: t.file.name for k, t in self.tensors.items()}

    def quantized_layers(self) -> list[str]:
        return quantized_layer_names(self.tensors)


def detect_layout(path: str | os.PathLike):
    """The :class:`~eqat_cli.formats.detect.Layout` of a model directory, from ``config.json`` and the
    safetensors headers (a directory without safetensors files, e.g. ``pytorch_model.bin`` only, is
    left to transformers)."""
    return Checkpoint.open(path).layout


def detect_format(path: str | os.PathLike) -> str:
    """``fp``, ``eqat``, ``gptq``, ``gptq_v2`` or ``other (METHOD)``."""
    return detect_layout(path).format


# ---------------------------------------------------------------------- GGUF

GGUF_MAGIC = b"GGUF"
_MIN_KV_BYTES = 8 + 1 + 4  # key length, a one-byte key, value type (a value of 0 bytes: none)
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


class GGUFFile:
    """A ``.gguf`` file's metadata and tensor table, parsed once (tensor data stays memory-mapped).

    Every failure is one :class:`BadInputError` naming the file."""

    def __init__(self, path: Path, reader: Any):
        self.path = path
        self.reader = reader

    @classmethod
    def check_header(cls, path: str | os.PathLike) -> tuple[int, int, int]:
        """Magic, version and the tensor and metadata counts, checked against the file's size
        before any parser trusts them. Returns ``(version, n_tensors, n_kv)``."""
        p = Path(path)
        with reading(p, "GGUF file"):
            size = p.stat().st_size
            with open(p, "rb") as fh:
                head = fh.read(24)
        if head[:4] != GGUF_MAGIC:
            raise BadInputError(f"{p}: not a GGUF file (no GGUF magic at the start)")
        if len(head) < 24:
            raise BadInputError(f"{p}: truncated GGUF file ({size} bytes, shorter than its header)")
        version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
        if version not in (2, 3):
            raise BadInputError(f"{p}: GGUF version {version} is not one eqat reads (2 or 3)")
        need = 24 + n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES
        if need > size:
            raise BadInputError(
                f"{p}: damaged GGUF header: it claims {n_tensors} tensors and {n_kv} metadata entries, "
                f"more than a file of {size} bytes can hold"
            )

        check_gguf(p)  # every length and count of the metadata and tensor table bounded (fuzzed)
        return version, n_tensors, n_kv

    @classmethod
    def open(cls, path: str | os.PathLike) -> "GGUFFile":
        p = Path(path)
        cls.check_header(p)
        try:
            from gguf import GGUFReader
        except ImportError as e:  # pragma: no cover - gguf is a core dependency

            raise MissingDependencyError("gguf", "reading a .gguf file") from e
        try:
            with reading(p, "GGUF file"):
                reader = GGUFReader(str(p))
        except BadInputError:
            raise
        except Exception as e:  # the parser's own exception types
            raise BadInputError(f"{p}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
        return cls(p, reader)

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """Every metadata field's value (fields of exotic types are left out)."""
        out = {}
        for k, f in self.reader.fields.items():
            try:
                out[k] = f.contents()
            except Exception:  # pragma: no cover - exotic field types
                continue
        return out

    def field(self, key: str) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return None
        try:  # gguf-py decodes lazily: a string that is not UTF-8, an unknown type
            return f.contents()
        except Exception as e:
            raise BadInputError(f"{self.path}: not a readable GGUF file (metadata {key!r}: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from e

    @property
    def architecture(self) -> str | None:
        return self.field("general.architecture")

    def tensor_types(self) -> dict[str, int]:
        try:
            return dict(Counter(t.tensor_type.name for t in self.reader.tensors))
        except Exception as e:
            raise BadInputError(f"{self.path}: not a readable GGUF file (tensor table: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from e

    def tensors(self) -> dict[str, Any]:
        """Every tensor dequantized to float32 numpy, in numpy/torch layout ``[rows, cols]``."""
        import numpy as np
        from gguf.quants import dequantize

        return {t.name: np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32) for t in self.reader.tensors}
