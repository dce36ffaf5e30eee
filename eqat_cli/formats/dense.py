"""Dequantized dense checkpoints: a plain transformers model in fp16, read and write.

Every packed layer becomes an ordinary ``nn.Linear`` weight ``(q - z) * s`` computed in fp32 and
stored in fp16; every other tensor is stored in fp16 as well. The directory loads with
``AutoModelForCausalLM.from_pretrained`` and nothing else. ``config.json`` keeps a small ``eqat``
section (``format: fp16``) recording what it was dequantized from; it has no ``quantization_config``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eqat_cli.formats.meta import CheckpointMeta
from eqat_cli.formats.native import config_dict_for_save, save_state_dict_sharded, write_sidecars
from eqat_cli.quant.linear import PackedLinear

FORMAT_NAME = "fp16"


def dense_state_dict(model: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """State dict with every PackedLinear replaced by its dequantized ``weight`` (and bias)."""
    sd: dict[str, torch.Tensor] = {}
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    prefixes = tuple(n + "." for n in packed)
    for name, mod in packed.items():
        sd[f"{name}.weight"] = mod.dequantize(torch.float32).to(dtype).contiguous()
        if mod.bias is not None:
            sd[f"{name}.bias"] = mod.bias.detach().to(dtype).contiguous()
    seen = set()
    for key, t in model.state_dict().items():
        if prefixes and key.startswith(prefixes):
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ptr in seen:  # tied weights are stored once
            continue
        seen.add(ptr)
        t = t.detach()
        sd[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return sd


def save_dense(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    provenance: dict | None = None,
    dtype: torch.dtype = torch.float16,
) -> dict:
    """Write the dequantized model into ``out_dir`` (an existing, empty, temporary directory)."""
    out = Path(out_dir)
    save_state_dict_sharded(dense_state_dict(model, dtype), out)
    cfg = config_dict_for_save(model.config, CheckpointMeta(format=FORMAT_NAME).updated(provenance))
    write_sidecars(model, tokenizer, out, cfg)
    n_packed = sum(isinstance(m, PackedLinear) for m in model.modules())
    return {"dequantized_layers": n_packed, "dtype": str(dtype).replace("torch.", "")}
