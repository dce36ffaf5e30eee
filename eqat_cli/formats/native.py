"""The EfficientQAT native checkpoint layout (``ChenMnZ/*-EfficientQAT-w{b}g{g}``), read and write.

Every quantized linear ``X`` is stored as ``X.qweight``, ``X.qzeros`` (raw zeros), ``X.scales``
(fp16) and ``X.g_idx``; everything else (embeddings, norms, head) is stored in fp16. eqat adds an
``eqat`` section to ``config.json`` recording bits, group size, architecture and how the
checkpoint was made; bits and group size are also detected from tensor shapes, so releases
without that section load too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eqat_cli.errors import BadInputError, UnsupportedError
from eqat_cli.formats.detect import layer_quant, quantized_layer_names, read_config_dict, safetensor_files
from eqat_cli.formats.shards import write_index
from eqat_cli.quant import packing
from eqat_cli.quant.linear import PackedLinear, set_submodule

FORMAT_NAME = "eqat"
FORMAT_VERSION = 1
SHARD_BYTES = 4 * 1024**3


# ---------------------------------------------------------------------- helpers


def model_class_for(config: Any):
    """The transformers class a config's ``architectures`` names (fallback: causal LM)."""
    import transformers
    from transformers.models.auto import modeling_auto as ma

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    for mapping in (ma.MODEL_FOR_CAUSAL_LM_MAPPING, ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING):
        if type(config) in mapping:
            return mapping[type(config)]
    raise BadInputError(f"no transformers model class for model_type {config.model_type!r}")


def _safetensor_files(path: Path) -> list[Path]:
    files = safetensor_files(path)
    if not files:
        raise BadInputError(f"{path} holds no .safetensors weights")
    return files


def eqat_section(path: str | os.PathLike) -> dict | None:
    return read_config_dict(path).get(FORMAT_NAME)


# ---------------------------------------------------------------------- write


def packed_state_dict(model: nn.Module, storage_dtype: torch.dtype = torch.float16) -> dict:
    """State dict in the native layout: packed layers as-is (fp16 scales), the rest in fp16."""
    sd: dict[str, torch.Tensor] = {}
    packed_prefixes = []
    for name, mod in model.named_modules():
        if isinstance(mod, PackedLinear):
            packed_prefixes.append(name + ".")
            sd[f"{name}.qweight"] = mod.qweight.detach().contiguous()
            sd[f"{name}.qzeros"] = mod.qzeros.detach().contiguous()
            sd[f"{name}.scales"] = mod.scales.detach().to(torch.float16).contiguous()
            sd[f"{name}.g_idx"] = mod.g_idx.detach().contiguous()
            if mod.bias is not None:
                sd[f"{name}.bias"] = mod.bias.detach().to(torch.float16).contiguous()
    seen_ptrs = {}
    for key, t in model.state_dict().items():
        if any(key.startswith(p) for p in packed_prefixes):
            continue
        # Tied weights (e.g. lm_head = embed_tokens) are stored once.
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ptr in seen_ptrs:
            continue
        seen_ptrs[ptr] = key
        t = t.detach()
        if t.is_floating_point():
            t = t.to(storage_dtype)
        sd[key] = t.contiguous()
    return sd


def save_state_dict_sharded(sd: dict, out_dir: Path, max_shard_bytes: int = SHARD_BYTES) -> None:
    from safetensors.torch import save_file

    total = sum(t.numel() * t.element_size() for t in sd.values())
    meta = {"format": "pt"}
    if total <= max_shard_bytes:
        save_file({k: v.cpu() for k, v in sd.items()}, str(out_dir / "model.safetensors"), metadata=meta)
        return
    shards, cur, cur_bytes = [], {}, 0
    for k, v in sd.items():
        nb = v.numel() * v.element_size()
        if cur and cur_bytes + nb > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k] = v
        cur_bytes += nb
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.cpu() for k, v in shard.items()}, str(out_dir / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    write_index(out_dir, weight_map, total)


def config_dict_for_save(config: Any, eqat_meta: dict | None) -> dict:
    d = config.to_dict()
    d.pop("quantization_config", None)
    d["dtype"] = "float16"
    if eqat_meta is not None:
        d[FORMAT_NAME] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **eqat_meta}
    return d


def save_native(
    model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, eqat_meta: dict
) -> None:
    """Write a packed model into ``out_dir`` (an existing, empty, temporary directory)."""
    out = Path(out_dir)
    save_state_dict_sharded(packed_state_dict(model), out)
    write_sidecars(model, tokenizer, out, config_dict_for_save(model.config, eqat_meta))


def write_sidecars(model: nn.Module, tokenizer: Any, out: Path, config: dict) -> None:
    """``config.json``, generation config and tokenizer beside the weights."""
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


# ---------------------------------------------------------------------- read


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from eqat_cli.readers import load_safetensors

    sd = {}
    for f in _safetensor_files(path):
        sd.update(load_safetensors(f, "safetensors weight shard"))
    return sd


def build_skeleton(config: Any) -> nn.Module:
    """The model with parameters on the meta device and real buffers (rotary tables)."""
    from accelerate import init_empty_weights

    cls = model_class_for(config)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config)
    return model


def install_packed_layers(
    model: nn.Module, sd: dict[str, torch.Tensor], zero_offset: int = 0, gptq3: bool = False
) -> dict[str, tuple[int, int]]:
    """Replace every ``nn.Linear`` that has a ``qweight`` in ``sd`` by a loaded PackedLinear.

    ``zero_offset`` is added to stored zeros (GPTQ v1 stores ``z - 1``); ``gptq3`` reads GPTQ's
    3-bit packing. Consumes the quantized tensors from ``sd``. Returns ``{name: (bits, group)}``.
    """
    found = {}
    for name in quantized_layer_names(sd.keys()):
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise BadInputError(f"{name} holds packed weights but is not a linear layer")
        qweight, qzeros, scales = sd.pop(f"{name}.qweight"), sd.pop(f"{name}.qzeros"), sd.pop(f"{name}.scales")
        g_idx = sd.pop(f"{name}.g_idx", None)
        bias = sd.pop(f"{name}.bias", None)
        hint = int((g_idx == 0).sum()) if g_idx is not None and g_idx.numel() == lin.in_features else None
        lq = layer_quant(name, qweight.shape, qzeros.shape, scales.shape, lin.in_features, lin.out_features,
                         group_hint=hint, gptq3=gptq3)
        bits, group = lq.bits, lq.group_size
        if gptq3:
            codes = packing.unpack_rows_gptq3(qweight, lin.in_features)
            zeros = packing.unpack_cols_gptq3(qzeros, lin.out_features)
        else:
            codes = packing.unpack_rows(qweight, bits, lin.in_features)
            zeros = packing.unpack_cols(qzeros, bits, lin.out_features)
        if g_idx is not None:
            expected = torch.arange(lin.in_features, dtype=torch.int32) // (
                lin.in_features if group == -1 else group
            )
            if not torch.equal(g_idx.to(torch.int32), expected):
                raise UnsupportedError(
                    f"{name}: act-order (non-sequential g_idx) checkpoints are not supported"
                )
        zeros = zeros + zero_offset
        if int(zeros.min()) < 0 or int(zeros.max()) > 2**bits - 1:
            raise BadInputError(f"{name}: zero points out of range after offset {zero_offset}")
        layer = PackedLinear.from_codes(
            codes.t(), scales.t().float(), zeros.t(), bits, group, bias=bias, scales_dtype=torch.float16
        )
        set_submodule(model, name, layer)
        found[name] = (bits, group)
    return found


def load_packed_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    zero_offset: int = 0,
    gptq3: bool = False,
) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
    """Load a packed checkpoint (native or GPTQ-style tensors) into a transformers model."""
    from eqat_cli.model_files import load_config

    path = Path(path)
    config = load_config(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = build_skeleton(config)
    sd = load_state(path)
    layers = install_packed_layers(model, sd, zero_offset=zero_offset, gptq3=gptq3)
    if not layers:
        raise BadInputError(f"{path} holds no packed (qweight) layers")
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.unexpected_keys:
        raise BadInputError(f"{path}: unexpected tensors {result.unexpected_keys[:5]}")
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise BadInputError(f"{path}: missing tensors {still_meta[:5]}")
    model.eval()
    return model, layers
