"""Blocks and their data: activation storage, weights read block by block, batched block
forwards and the reconstruction losses."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eqat_cli.errors import BadInputError
from eqat_cli.quant.linear import PackedLinear

def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Reconstruction loss of a block's output against its full-precision target.

    ``mse``: the paper's mean squared error over all elements. ``token-rel``: each token's squared
    error relative to its target's mean square, averaged over tokens. Models with massive
    activations (one token whose hidden state is 10^3-10^4x the others, as SmolLM2 from block 12 on)
    make plain MSE spend nearly all of its weight on that token; the next block RMS-normalizes every
    token, so what it sees is each token's *relative* error, which ``token-rel`` weighs equally.
    """
    out, target = out.float(), target.float()
    if kind == "mse":
        return torch.nn.functional.mse_loss(out, target)
    err = (out - target).pow(2).mean(-1)
    scale = target.pow(2).mean(-1).clamp_min(1e-12)
    return (err / scale).mean()



# ---------------------------------------------------------------------- activation storage


class ActivationStore:
    """``[n, seqlen, hidden]`` activations in RAM or in a memory-mapped file."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, path: Path | None = None):
        self.path = path
        if path is None:
            self.data = torch.empty(shape, dtype=dtype)
        else:
            numel = math.prod(shape)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.data = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)

    def __len__(self) -> int:
        return self.data.shape[0]


# ---------------------------------------------------------------------- weights, block by block


class ShardReader:
    """Reads tensors by name prefix from a model's safetensors shards (never the whole model)."""

    def __init__(self, path: Path, arch: Any = None):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = [path / "model.safetensors"] if (path / "model.safetensors").exists() else sorted(path.glob("*.safetensors"))
            if not files:
                raise BadInputError(f"{path} holds no .safetensors weights")
            weight_map = {}
            for f in files:
                with safe_open(str(f), framework="pt") as fh:
                    weight_map.update({k: f.name for k in fh.keys()})
        self.path = path
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
            with safe_open(str(self.path / fname), framework="pt") as fh:
                for k in keys:
                    t = fh.get_tensor(self.weight_map[k][1])
                    out[k[len(prefix):]] = t.to(dtype) if t.is_floating_point() else t
        return out


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Load ``sd`` into ``module`` (assigning tensors); every non-packed tensor must be there."""
    res = module.load_state_dict(sd, strict=False, assign=True)
    packed = tuple(n + "." for n, m in module.named_modules() if isinstance(m, PackedLinear))
    missing = [k for k in res.missing_keys if not k.endswith("inv_freq") and not k.startswith(packed)]
    if missing or res.unexpected_keys:
        raise BadInputError(f"{what}: missing {missing[:3]}, unexpected {res.unexpected_keys[:3]}")



def forward_all(block, model, arch, inputs: torch.Tensor, outputs: torch.Tensor, batch: int, device, dtype) -> None:
    """``outputs[j] = block(inputs[j])`` in batches, no grad."""
    kw_cache: dict = {}
    with torch.no_grad():
        for s in range(0, len(inputs), batch):
            x = inputs[s : s + batch].to(device=device, dtype=dtype)
            kw = block_kwargs_cached(kw_cache, arch, model, x)
            outputs[s : s + batch] = block(x, **kw).to(outputs.dtype).cpu()


def block_kwargs_cached(cache: dict, arch, model, x: torch.Tensor) -> dict:
    key = (tuple(x.shape), x.device, x.dtype)
    if key not in cache:
        cache[key] = arch.block_kwargs(model, x)
    return cache[key]


def eval_block_loss(block, model, arch, inputs, targets, batch, device, dtype, kind: str = "mse") -> float:
    if len(inputs) == 0:
        return float("nan")
    total, kw_cache = 0.0, {}
    with torch.no_grad():
        for s in range(0, len(inputs), batch):
            x = inputs[s : s + batch].to(device=device, dtype=dtype)
            y = targets[s : s + batch].to(device=device, dtype=torch.float32)
            out = block(x, **block_kwargs_cached(kw_cache, arch, model, x)).float()
            total += float(block_loss(out, y, kind)) * len(x)
    return total / len(inputs)

