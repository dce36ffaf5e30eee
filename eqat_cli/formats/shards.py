"""Safetensors checkpoints shard by shard: read tensors by module-path prefix without loading the
whole model (Block-AP reads one decoder block at a time), and write the shard index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from eqat_cli.formats.checkpoint import INDEX_FILE, Checkpoint
from eqat_cli.readers import reading


class ShardReader:
    """Reads tensors by name prefix from a model's safetensors shards (never the whole model).

    ``arch`` (an ``ArchitectureSpec``) maps key names on disk to module paths where the two differ
    (legacy LLaVA checkpoints); the tensor list comes from the index or the shards' headers.
    ``path`` may be an open :class:`~eqat_cli.formats.checkpoint.Checkpoint` (headers read once).
    """

    def __init__(self, path: Path | Checkpoint, arch: Any = None):
        ckpt = path if isinstance(path, Checkpoint) else Checkpoint.open(path, config=False)
        ckpt.weight_files()  # one clear error when there are none
        weight_map = ckpt.index["weight_map"] if ckpt.index is not None else ckpt.weight_map()
        self.path = ckpt.path
        # module path -> (file, key on disk)
        rename = arch.module_key if arch is not None else (lambda k: k)
        self.weight_map = {rename(k): (f, k) for k, f in weight_map.items()}

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.weight_map if k.startswith(prefix)]

    def read(self, prefix: str, dtype: torch.dtype, exclude: str | None = None) -> dict[str, torch.Tensor]:
        """Tensors whose module path starts with ``prefix`` (minus ``exclude``), prefix stripped.

        Only the requested tensors are read from disk.
        """
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for k in self.keys(prefix):
            if exclude is None or not k.startswith(exclude):
                by_file.setdefault(self.weight_map[k][0], []).append(k)
        for fname, keys in by_file.items():
            # The header was validated when the checkpoint was opened.
            with reading(self.path / fname, "safetensors weight shard"), safe_open(str(self.path / fname), "pt") as fh:
                for k in keys:
                    t = fh.get_tensor(self.weight_map[k][1])
                    out[k[len(prefix):]] = t.to(dtype) if t.is_floating_point() else t
        return out


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json``: which shard file holds each tensor."""
    (Path(directory) / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2, sort_keys=True)
    )
