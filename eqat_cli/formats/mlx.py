"""MLX (mlx-lm) export: affine quantization, 2/3/4/8 bits, groups 32/64/128.

mlx's affine mode stores, per quantized linear ``X`` (``mlx.core.quantize`` / ``nn.QuantizedLinear``):

* ``X.weight``: uint32 ``[out, in * bits / 32]``. Each row is a little-endian bit stream: code ``j``
  of the row occupies bits ``[bits*j, bits*j + bits)``, least significant first. For 2/4/8 bits that
  is ``32 // bits`` codes per word, code ``k`` of a word at bit ``bits*k``; for 3 bits, 8 codes fill 3
  bytes and codes straddle word boundaries (mlx's ``extract_bits``).
* ``X.scales`` and ``X.biases``: ``[out, in / group]``; mlx dequantizes ``w = scale * q + bias``.

An eqat group is ``w = s * (q - z) = s * q - s * z``, so the codes are unchanged, ``scales = s``
(fp16, exact) and ``biases = -s * z``. mlx-lm stores scales and biases in the model's dtype; in fp16
``-s*z`` is rounded once (at most half an fp16 ulp of ``s*z``, like GGUF Q4_1's minimum). With
``exact=True`` the biases are fp32, where ``-s*z`` is exact, and mlx's ``scale*q + bias`` (computed
in fp32: mlx promotes to the wider of scales/biases and activations) reproduces eqat's weights bit
for bit, for 0.25 extra bits per weight at group 64.

Layout (mlx-lm ``load_model``): ``model.safetensors`` with the Hugging Face tensor names (mlx-lm's
llama/qwen2/qwen3/gemma3_text modules use the same paths), ``config.json`` with
``quantization = {"group_size", "bits", "mode": "affine"}`` (plus an entry per layer whose bits or
group differ, keyed by its module path, which mlx-lm's ``class_predicate`` reads) repeated as
``quantization_config``, and the tokenizer files. mlx-lm quantizes every layer that has ``.scales``
in the file; embeddings, norms and the head stay fp16 here (mlx-lm's own ``convert -q`` would
quantize the embeddings and head too; eqat did not train them). mlx-lm reads RoPE and sliding-window
settings from top-level keys (``rope_theta``, Gemma-3's ``rope_local_base_freq`` and
``sliding_window_pattern``) that transformers 5 keeps under ``rope_parameters`` / ``layer_types``;
the writer adds them.

:func:`check` refuses, in one line, what mlx cannot hold (ragged groups, groups mlx does not
support, architectures mlx-lm does not run the way transformers does); :func:`write` writes.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from eqat_cli.errors import BadInputError, UnsupportedError
from eqat_cli.formats.native import config_dict_for_save, packed_state_dict, write_sidecars
from eqat_cli.quant.linear import PackedLinear

MLX_GROUPS = (32, 64, 128)  # mlx affine_quantize accepts these
MLX_BITS = (2, 3, 4, 8)  # eqat's widths mlx holds (mlx: 2, 3, 4, 5, 6, 8)
# model_type -> mlx-lm model module (mlx_lm.utils.MODEL_REMAPPING sends mistral to llama)
MLX_MODULES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma3_text": "gemma3_text"}


@dataclass
class MLXPlan:
    bits: int
    group_size: int
    per_layer: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _group(m: PackedLinear) -> int:
    return m.in_features if m.group_size == -1 else m.group_size


def _rope_params(config: Any) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        return params
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"full_attention": {**scaling, **params}}


def _swa_pattern(types: list[str]) -> int | None:
    """The p of mlx-lm's ``(i + 1) % p != 0`` (sliding) rule that gives ``types``, or None."""
    n = len(types)
    for p in range(1, n + 2):
        if all((t == "sliding_attention") == ((i + 1) % p != 0) for i, t in enumerate(types)):
            return p
    return None


def check(model: nn.Module, tokenizer: Any = None) -> MLXPlan:
    """Raise a one-line error unless mlx-lm can load and run the model as eqat does; the plan.
    (``tokenizer`` is accepted for a format registry's ``check(model, tokenizer)``; unused.)"""
    config = model.config
    mt = config.model_type
    if mt not in MLX_MODULES:
        raise UnsupportedError(
            f"MLX export supports {', '.join(MLX_MODULES)} models (mlx-lm modules); this one is {mt!r}",
            hint="use --format gptq_v2, eqat or fp16",
        )
    rope = _rope_params(config)
    bad = sorted({p.get("rope_type", "default") for p in rope.values()} - {"default"})
    if bad:
        raise UnsupportedError(
            f"MLX export of rope scaling {bad[0]!r} is not implemented (mlx-lm's rope config could "
            "not be verified here)",
            hint="use --format gptq_v2 or fp16 for this model",
        )
    notes: list[str] = []
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    if mt == "qwen2" and head_dim != config.hidden_size // n_head:
        raise UnsupportedError(
            f"MLX export: mlx-lm's qwen2 derives head_dim = hidden/heads = {config.hidden_size // n_head}; "
            f"this model has head_dim {head_dim}"
        )
    types = list(getattr(config, "layer_types", None) or [])
    if mt == "gemma3_text":
        if types and _swa_pattern(types) is None:
            raise UnsupportedError(
                "MLX export: mlx-lm's gemma3_text takes sliding layers as (i + 1) % p != 0; this model's "
                f"layer_types ({types}) follow no such p"
            )
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
            raise UnsupportedError("MLX export: mlx-lm's gemma3_text has no logit soft-capping")
    elif getattr(config, "sliding_window", None) and (
        mt == "mistral" or (getattr(config, "use_sliding_window", False) and "sliding_attention" in types)
    ):
        notes.append(
            f"{mt} sliding window ({config.sliding_window}) is not applied by mlx-lm's "
            f"{MLX_MODULES[mt]} module (it attends to the whole context)"
        )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    if not layers:
        raise BadInputError(
            "the model has no quantized (packed) layers; MLX export writes quantized layers",
            hint="quantize it first, e.g. `eqat block-ap MODEL --bits 4 --group 64 -o OUT`",
        )
    for name, m in layers.items():
        if m.bits not in MLX_BITS:
            raise UnsupportedError(f"{name}: {m.bits}-bit codes; MLX affine quantization holds {MLX_BITS}")
        g = _group(m)
        if m.in_features % g:
            fits = [x for x in MLX_GROUPS if all(l.in_features % x == 0 for l in layers.values())]
            raise UnsupportedError(
                f"{name} has in_features {m.in_features}, not a multiple of group size {g} (its last "
                f"group holds {m.in_features % g} columns); mlx needs whole groups. Group sizes that fit "
                f"every layer: {', '.join(map(str, fits)) or 'none'}",
                hint="re-quantize with one of those group sizes, or use --format gguf / eqat / fp16",
            )
        if g not in MLX_GROUPS:
            raise UnsupportedError(
                f"{name}: group size {g} is not one mlx supports ({', '.join(map(str, MLX_GROUPS))})",
                hint="re-quantize with group 32, 64 or 128, or use --format gptq_v2 / fp16",
            )
        if (m.in_features * m.bits) % 32:
            raise UnsupportedError(f"{name}: a row of {m.in_features} {m.bits}-bit codes is not whole uint32 words")
    combos = Counter((m.bits, _group(m)) for m in layers.values())
    (bits, group), _ = combos.most_common(1)[0]
    per_layer = {n: {"group_size": _group(m), "bits": m.bits}
                 for n, m in layers.items() if (m.bits, _group(m)) != (bits, group)}
    return MLXPlan(bits=bits, group_size=group, per_layer=per_layer, notes=notes)


# ---------------------------------------------------------------------- packing (numpy)


def pack_weight(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[out, in]`` (0 .. 2^bits - 1) -> mlx's uint32 ``[out, in * bits / 32]`` (each row a
    little-endian bit stream, code ``j`` at bit ``bits * j``). Like the functions below, a numpy
    kernel of the layout: plain ``bits`` / ``group`` ints, not a ``QuantScheme`` (``check`` and
    ``write`` work from the model's layers and their schemes)."""
    out_f, in_f = codes.shape
    c = codes.astype(np.uint64)
    if 32 % bits == 0:
        pf = 32 // bits
        c = c.reshape(out_f, in_f // pf, pf)
        shifts = (np.arange(pf, dtype=np.uint64) * np.uint64(bits))
        return (c << shifts).sum(axis=2).astype(np.uint32)
    # 3 bits: 8 codes -> 3 bytes (24 bits), bytes in order, read back as little-endian uint32
    per = 8
    c = c.reshape(out_f, in_f // per, per)
    shifts = np.arange(per, dtype=np.uint64) * np.uint64(bits)
    packs = (c << shifts).sum(axis=2)  # [out, in/8] 24-bit values
    by = np.stack([(packs >> np.uint64(8 * k)) & np.uint64(0xFF) for k in range(3)], axis=2).astype(np.uint8)
    return np.ascontiguousarray(by.reshape(out_f, -1)).view("<u4").astype(np.uint32)


def unpack_weight(w: np.ndarray, bits: int, in_features: int) -> np.ndarray:
    """Inverse of :func:`pack_weight`, written from the same bit-stream definition."""
    by = np.ascontiguousarray(w.astype("<u4")).view(np.uint8)  # [out, 4 * words]
    bitsarr = np.unpackbits(by, axis=1, bitorder="little")[:, : in_features * bits]
    bitsarr = bitsarr.reshape(w.shape[0], in_features, bits).astype(np.uint32)
    return (bitsarr << np.arange(bits, dtype=np.uint32)).sum(axis=2).astype(np.uint32)


def dequantize(w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group: int) -> np.ndarray:
    """mlx's documented affine dequantization ``w = scale * q + bias`` per group, in float32
    (the promoted type of fp16 scales/biases and fp32 activations)."""
    in_f = w.shape[1] * 32 // bits
    q = unpack_weight(w, bits, in_f).astype(np.float32)
    s = np.repeat(scales.astype(np.float32), group, axis=1)
    b = np.repeat(biases.astype(np.float32), group, axis=1)
    return s * q + b


# ---------------------------------------------------------------------- write


def mlx_config(model: nn.Module, plan: MLXPlan) -> dict:
    """config.json: the Hugging Face config plus the keys mlx-lm reads."""
    config = model.config
    cfg = config_dict_for_save(config, None)
    rope = _rope_params(config)
    full = rope.get("full_attention", {})
    cfg["rope_theta"] = float(full.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    cfg["tie_word_embeddings"] = bool(getattr(config, "tie_word_embeddings", False))
    if config.model_type == "gemma3_text":
        if "sliding_attention" in rope:
            cfg["rope_local_base_freq"] = float(rope["sliding_attention"].get("rope_theta", 10000.0))
        types = list(getattr(config, "layer_types", None) or [])
        if types:
            cfg["sliding_window_pattern"] = _swa_pattern(types)
        cfg["rope_scaling"] = None
    q: dict[str, Any] = {"group_size": plan.group_size, "bits": plan.bits, "mode": "affine"}
    q.update(plan.per_layer)
    cfg["quantization"] = q
    cfg["quantization_config"] = dict(q)
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "float16"
    return cfg


def mlx_tensors(model: nn.Module, exact: bool = False) -> dict[str, np.ndarray]:
    """Every tensor in mlx-lm's layout, verified by unpacking each packed weight."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    prefixes = tuple(n + "." for n in packed)
    out: dict[str, np.ndarray] = {}
    for key, t in packed_state_dict(model).items():
        if key.startswith(prefixes) or (tied and key == "lm_head.weight"):
            continue
        if not t.is_floating_point():
            raise UnsupportedError(f"MLX export: unexpected non-float tensor {key}")
        out[key] = t.detach().to(torch.float16).numpy()
    for name, m in packed.items():
        codes = m.codes().t().contiguous().numpy().astype(np.uint32)  # [out, in]
        s = m.scales.detach().t().to(torch.float16)  # [out, groups]; fp16 values (check() holds them)
        z = m.zero_points().t().to(torch.float32)
        bias = -(s.float() * z)  # exact in fp32
        w = pack_weight(codes, m.bits)
        if not np.array_equal(unpack_weight(w, m.bits, m.in_features), codes):
            raise AssertionError("MLX pack/unpack mismatch: refusing to write a corrupt file")
        out[f"{name}.weight"] = w
        out[f"{name}.scales"] = s.contiguous().numpy()
        out[f"{name}.biases"] = (bias if exact else bias.to(torch.float16)).contiguous().numpy()
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().to(torch.float16).numpy()
    return out


def write(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    provenance: dict | None = None,
    exact: bool = False,
) -> dict:
    """Write ``model`` (packed) in mlx-lm's layout into the empty directory ``out_dir``."""
    from safetensors.numpy import save_file

    plan = check(model)
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            s = m.scales.detach()
            if s.dtype != torch.float16 and not torch.equal(s.float().half().float(), s.float()):
                raise UnsupportedError(
                    f"{name}: step sizes are not fp16 values; mlx scales are fp16",
                    hint="save the model with `eqat pack --format eqat` first (fp16 step sizes)",
                )
    out = Path(out_dir)
    # safetensors.numpy writes the raw buffer: every array must be C-contiguous
    tensors = {k: np.ascontiguousarray(v) for k, v in mlx_tensors(model, exact=exact).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "mlx"})
    cfg = mlx_config(model, plan)
    if provenance:
        cfg["eqat"] = {"format": "mlx", "exact_biases": exact, **provenance}
    write_sidecars(model, tokenizer, out, cfg)
    return {"bits": plan.bits, "group_size": plan.group_size, "per_layer": len(plan.per_layer),
            "biases_dtype": "float32" if exact else "float16", "notes": plan.notes}


save_mlx = write


def write_job(job: Any) -> dict:
    """``write`` for a format registry's job object (``model``, ``tokenizer``, ``target`` directory,
    ``provenance``)."""
    return write(job.model, job.tokenizer, job.target, provenance=job.provenance)
