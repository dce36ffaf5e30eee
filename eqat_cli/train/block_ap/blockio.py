"""Blocks and their data: activation storage, weights read block by block, batched block
forwards and the reconstruction losses."""

from __future__ import annotations

import math
from pathlib import Path

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
            kw = block_kwargs_cached(kw_cache, arch, model, x, block)
            outputs[s : s + batch] = block(x, **kw).to(outputs.dtype).cpu()


def block_kwargs_cached(cache: dict, arch, model, x: torch.Tensor, block: nn.Module) -> dict:
    key = (tuple(x.shape), x.device, x.dtype, id(block))
    if key not in cache:
        cache[key] = arch.block_kwargs(model, x, block)
    return cache[key]


def eval_block_loss(block, model, arch, inputs, targets, batch, device, dtype, kind: str = "mse") -> float:
    if len(inputs) == 0:
        return float("nan")
    total, kw_cache = 0.0, {}
    with torch.no_grad():
        for s in range(0, len(inputs), batch):
            x = inputs[s : s + batch].to(device=device, dtype=dtype)
            y = targets[s : s + batch].to(device=device, dtype=torch.float32)
            out = block(x, **block_kwargs_cached(kw_cache, arch, model, x, block)).float()
            total += float(block_loss(out, y, kind)) * len(x)
    return total / len(inputs)

