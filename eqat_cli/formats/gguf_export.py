"""GGUF (llama.cpp) export of 2/3-bit layers as Q4_0 (exact), 4-bit as Q4_1 and 8-bit as Q8_0 (exact
when it fits), one GGML type per tensor (mixed-precision models included); and a reader.

An asymmetric b-bit group with step ``s`` and integer zero point ``z`` is ``w = s * (q - z)``.

* ``Q4_0`` stores blocks of 32 weights as an fp16 scale ``d`` and 32 4-bit codes, ``w = d * (q' - 8)``.
  For b <= 3, ``q - z`` lies in [-7, 7], so ``q' = q - z + 8`` is in [1, 15] and ``d = s`` holds the
  group *exactly* (``s`` is an fp16 value). 2- and 3-bit models cost 4.5 bits per weight this way.
* ``Q4_1`` stores ``d``, an fp16 minimum ``m`` and 32 unsigned codes, ``w = d * q + m``: a 4-bit group
  gets ``d = s``, ``m = -z * s`` (rounded once to fp16) and the *same codes*.

Both need the group size and ``in_features`` to be multiples of 32 (a ragged last group is fine).
:func:`check` refuses, in one line, what cannot be written this way (8-bit layers whose ``q - z``
leaves int8's range (``Q8_0``, ``w = d * q``, ``d = +-s``, holds the rest exactly), groups
that do not split into 32-blocks, step sizes that are not fp16 values, architectures or rope
variants llama.cpp's graph would compute differently); :func:`save_gguf` (= :func:`write`) writes.

Architectures, following llama.cpp's ``convert_hf_to_gguf.py``: Llama (Llama-3 rope scaling as the
``rope_freqs`` tensor) and Mistral as ``llama``
(rows of ``q_proj``/``k_proj`` permuted to llama.cpp's rotary layout; transformers undoes it on
load), Qwen2 (q/k/v biases) as ``qwen2``, Qwen3 (q/k norms) as ``qwen3``, Gemma-3 text models as
``gemma3`` (norm gains stored as ``1 + w``, sliding window, per-layer sliding pattern and the
sliding layers' RoPE base; llama.cpp scales the embeddings by sqrt(hidden) itself). Embeddings
and a separate output head are F16, norms and biases F32, plus the ``tokenizer.ggml.*`` vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from eqat_cli.errors import BadInputError, UnsupportedError
from eqat_cli.formats.checkpoint import GGUFFile
from eqat_cli.formats.gptq import uniform_scheme
from eqat_cli.model_files import hf_load
from eqat_cli.quant.kquant import KQuantPacked
from eqat_cli.quant.linear import PackedLinear

QK = 32  # Q4_1 block length

# llama.cpp's tokenizer.ggml.pre is chosen by hashing how the tokenizer splits this text
# (convert_hf_to_gguf.py, get_vocab_base_pre). A few common ones; unknown hashes get "default".
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
    "?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM/SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
}

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


# ---------------------------------------------------------------------- checks

# model_type -> llama.cpp architecture (convert_hf_to_gguf.py: LlamaModel also takes Mistral).
ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
SUPPORTED_MODEL_TYPES = tuple(ARCHES)
# bits -> GGML type: b <= 3 -> Q4_0 with q' = q - z + 8 in [1, 15] (exact); 4 -> Q4_1 (m rounded once).
QTYPE_FOR_BITS = {2: "Q4_0", 3: "Q4_0", 4: "Q4_1"}


@dataclass(frozen=True)
class GGUFPlan:
    """What :func:`check` decided: the llama.cpp architecture, the model's bits and group size
    (None when layers use different compatible groups), the GGML type of the quantized layers."""

    arch: str
    bits: int
    group_size: int | None
    qtype: str
    qtypes: dict | None = None  # layer path -> GGML type (mixed precision: several)


def _rope(config: Any) -> tuple[str, float]:
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get("full_attention", params)  # Gemma-3: one entry per layer type
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope_type, float(theta)


def _swa_rope(config: Any) -> tuple[str, float] | None:
    params = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention")
    if not params:
        return None
    return params.get("rope_type") or "default", float(params.get("rope_theta", 10000.0))


def _check_arch(config: Any) -> str:
    mt = config.model_type
    if mt not in ARCHES:
        raise UnsupportedError(
            f"GGUF export supports {', '.join(SUPPORTED_MODEL_TYPES)} models (llama.cpp archs "
            f"{', '.join(sorted(set(ARCHES.values())))}); this one is {mt!r}",
            hint="use --format gptq_v2, eqat or fp16",
        )
    arch = ARCHES[mt]
    rope_types = {_rope(config)[0]} | ({_swa_rope(config)[0]} if _swa_rope(config) else set())
    if arch == "llama" and rope_types == {"llama3"}:
        rope_types = {"default"}  # written as llama.cpp's rope_freqs tensor (see llama3_rope_factors)
    if rope_types != {"default"}:
        raise UnsupportedError(
            f"GGUF export of rope scaling {sorted(rope_types - {'default'})[0]!r} is not implemented "
            "(only default RoPE and Llama-3's llama3 scaling are written and verified here)",
            hint="use --format gptq_v2 or fp16 for this model",
        )
    if arch == "gemma3":
        head_dim = config.head_dim
        qpas = getattr(config, "query_pre_attn_scalar", head_dim)
        if qpas != head_dim:
            # llama.cpp's gemma3 scales attention by 1/sqrt(head_dim) (27B excepted): no key holds it
            raise UnsupportedError(
                f"GGUF export: this Gemma-3 has query_pre_attn_scalar {qpas} != head_dim {head_dim}; "
                "llama.cpp's gemma3 graph always scales attention by 1/sqrt(head_dim)",
                hint="use --format gptq_v2 or fp16",
            )
        if getattr(config, "attn_logit_softcapping", None):
            raise UnsupportedError("GGUF export: llama.cpp's gemma3 has no attention logit soft-capping")
        act = getattr(config, "hidden_activation", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise UnsupportedError(
                f"GGUF export: llama.cpp's gemma3 uses tanh-approximated GELU; this model uses {act!r}"
            )
    return arch


def llama3_rope_factors(config: Any) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for Llama-3 rope scaling: one divisor per frequency pair, so that
    ``base^(-2i/d) / factor_i`` equals transformers' llama3 inverse frequency (1 for short
    wavelengths, ``factor`` for long ones, a smooth blend between)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    base = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / float(f)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _scales_fp16_exact(layer: PackedLinear) -> bool:
    s = layer.scales.detach()
    if s.dtype == torch.float16:
        return True
    s32 = s.float()
    return bool(torch.equal(s32.half().float(), s32))


def check(model: nn.Module, tokenizer: Any = None) -> GGUFPlan:
    """Raise a one-line error unless every quantized layer maps exactly onto its GGML type
    (``Q4_0`` for 2/3-bit, ``Q4_1`` for 4-bit, ``Q8_0`` for an 8-bit layer whose ``q - z`` fits
    int8; each tensor its own type, so mixed-precision models are written too) and llama.cpp runs
    the architecture; the plan.
    With ``tokenizer``, its vocabulary is checked too (a GGUF file carries it)."""
    config = model.config
    arch = _check_arch(config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    kq = {n: m for n, m in model.named_modules() if isinstance(m, KQuantPacked)}
    if kq:
        return _check_kquant(arch, config, layers, kq, tokenizer)
    if not layers:
        raise BadInputError(
            "the model has no quantized (packed) layers; GGUF export maps quantized 2/3/4-bit layers "
            "to Q4_0/Q4_1",
            hint="quantize it first (eqat block-ap ... --bits 4 --group 128)",
        )
    combos = sorted({(m.bits, m.group_size) for m in layers.values()})
    bits = sorted({b for b, _ in combos})
    described = ", ".join(f"w{b}g{g}" for b, g in combos)
    bad_bits = [b for b in bits if b not in QTYPE_FOR_BITS and b != 8]
    if bad_bits:
        raise UnsupportedError(
            f"GGUF export is exact for 2/3-bit (Q4_0), 4-bit (Q4_1) and some 8-bit (Q8_0) layers; this model "
            f"has {described}",
            hint="use --format gptq_v2 or fp16",
        )
    qtypes = {}  # a GGML type per tensor: mixed widths are fine (llama.cpp reads each tensor's type)
    for name, m in layers.items():
        qtypes[name] = QTYPE_FOR_BITS.get(m.bits) or _q8_0_or_refuse(name, m)
        g = m.in_features if m.group_size == -1 else m.group_size
        if g % QK or m.in_features % QK:
            raise UnsupportedError(
                f"{name}: group size {m.group_size} with in_features {m.in_features} does not split "
                f"into GGUF blocks of {QK} (the group and in_features must be multiples of {QK})",
                hint="re-quantize with group 32, 64 or 128, or use --format gptq_v2 / fp16",
            )
        if not _scales_fp16_exact(m):
            raise UnsupportedError(
                f"{name}: step sizes are not fp16 values, so the GGUF block scale d = s would round",
                hint="save the model with `eqat pack --format eqat` first (fp16 step sizes), then export",
            )

    # The file's type and eqat.bits name the width of most weights (a mixed-precision model's other
    # layers have their own tensor types).
    weight = {b: sum(m.in_features * m.out_features for m in layers.values() if m.bits == b) for b in bits}
    main = max(bits, key=lambda b: weight[b])
    try:
        group = uniform_scheme({n: m for n, m in layers.items() if m.bits == main}, "GGUF").group_size
    except UnsupportedError:  # mixed (compatible) group sizes are fine: every 32-block has its own d
        group = None
    if tokenizer is not None:
        tokenizer_metadata(tokenizer, config.vocab_size)
    return GGUFPlan(arch=arch, bits=main, group_size=group, qtype=qtypes[next(n for n, m in layers.items() if m.bits == main)],
                    qtypes=qtypes)


def _q8_0_or_refuse(name: str, m: PackedLinear) -> str:
    """``Q8_0`` for an 8-bit layer whose every 32-block holds ``q - z`` in int8's range, read as
    ``d = s`` or (the block's values negated) ``d = -s``: ``[-128, 127]`` or ``[-127, 128]``.
    A group whose zero point is 127 or 128 (a grid about symmetric around 0) always fits; a
    min-max grid of a lopsided group does not, and then the layer is refused (Q8_1 and the other
    8-bit GGML types with a minimum are activation-only in llama.cpp)."""
    g = m.in_features if m.group_size == -1 else m.group_size
    if g % QK or m.in_features % QK:
        return "Q8_0"  # refused below with the block-size reason
    d = q8_0_signed_diffs(m.codes().t(), m.zero_points().t(), m.group_size)
    if d is None:
        raise UnsupportedError(
            f"{name}: 8-bit codes minus zero points span more than int8 in some 32-block, so Q8_0 "
            "(symmetric int8, w = d * q) cannot hold this 8-bit layer exactly",
            hint="use --format eqat or gptq_v2 (both hold mixed widths exactly), or fp16",
        )
    return "Q8_0"


def _check_kquant(arch: str, config: Any, layers: dict, kq: dict, tokenizer: Any) -> GGUFPlan:
    """A model trained on a GGML grid (``--target gguf:q2_k`` ...): its layers hold the GGUF blocks
    themselves, so the export is exact; the file type is the target's (the most common type)."""
    if layers:
        raise UnsupportedError(
            f"GGUF export: this model mixes {len(kq)} GGML-grid layers with {len(layers)} uniform packed "
            f"layers ({next(iter(layers))}); one file type per model",
            hint="train every layer with the same --target",
        )
    types = Counter(m.type_name for m in kq.values())
    main = next((t for t in ("Q2_K", "Q3_K", "Q4_K") if t in types), None) or types.most_common(1)[0][0]
    if tokenizer is not None:
        tokenizer_metadata(tokenizer, config.vocab_size)
    return GGUFPlan(arch=arch, bits=0, group_size=None, qtype=main)


def check_gguf_exportable(model: nn.Module) -> tuple[int, int | None]:
    """:func:`check` as ``(bits, group)`` (kept for callers of the Q4_1-only version)."""
    plan = check(model)
    return plan.bits, plan.group_size


# ---------------------------------------------------------------------- tensors


def permute_rows(t: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's q/k permutation (convert_hf_to_gguf.py LlamaModel.permute) along dim 0."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def unpermute_rows(t: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """Inverse of :func:`permute_rows` (what transformers' GGUF loader applies)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = t.shape[0]
    return t.reshape(n_head, rows // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def q4_1_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> np.ndarray:
    """Codes ``[out, in]`` (0..15), step ``[out, n_groups]`` (fp16), zeros ``[out, n_groups]`` ->
    Q4_1 bytes ``[out, in / 32 * 20]`` (``d``, ``m`` as fp16, then 16 bytes of nibbles: element
    ``j`` in the low nibble of byte ``j``, element ``j + 16`` in its high nibble). A byte-layout
    kernel: the group length as an int (the bit width is fixed by the block type)."""
    out_f, in_f = codes.shape
    nb = in_f // QK
    g = in_f if group == -1 else group
    block_group = torch.arange(nb) * QK // g  # each 32-block lies inside one group
    s = scale.to(torch.float16)[:, block_group]  # [out, nb]
    z = zero.to(torch.float32)[:, block_group]
    d = s.numpy()
    m = (-(z * s.to(torch.float32))).to(torch.float16).numpy()
    q = codes.to(torch.uint8).reshape(out_f, nb, QK).numpy()
    qs = (q[:, :, :16] | (q[:, :, 16:] << 4)).astype(np.uint8)
    blocks = np.concatenate(
        [d.reshape(out_f, nb, 1).view(np.uint8), m.reshape(out_f, nb, 1).view(np.uint8), qs], axis=2
    )
    return np.ascontiguousarray(blocks.reshape(out_f, nb * 20))


def q8_0_signed_diffs(codes: torch.Tensor, zero: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(q, sign)``: per 32-block int8 values ``q = sign * (codes - z)`` and ``sign`` in {1, -1}
    ``[out, nb]`` so that ``q`` fits ``[-128, 127]``; ``None`` when some block fits neither way."""
    out_f, in_f = codes.shape
    nb = in_f // QK
    g = in_f if group == -1 else group
    block_group = torch.arange(nb) * QK // g
    diff = codes.to(torch.int32).reshape(out_f, nb, QK) - zero.to(torch.int32)[:, block_group].unsqueeze(-1)
    lo, hi = diff.amin(-1), diff.amax(-1)
    plus = (lo >= -128) & (hi <= 127)
    minus = (lo >= -127) & (hi <= 128)
    if not bool((plus | minus).all()):
        return None
    sign = torch.where(plus, 1, -1).to(torch.int32)
    return diff * sign.unsqueeze(-1), sign


def q8_0_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> np.ndarray:
    """8-bit codes ``[out, in]``, step ``[out, n_groups]`` (fp16 values), zeros -> Q8_0 bytes
    ``[out, in / 32 * 34]``: ``d = sign * s`` (fp16), then 32 int8 ``sign * (q - z)``, so that
    ``d * q8 = s * (q - z)`` exactly (see :func:`q8_0_signed_diffs`)."""
    out_f, in_f = codes.shape
    nb = in_f // QK
    g = in_f if group == -1 else group
    block_group = torch.arange(nb) * QK // g
    got = q8_0_signed_diffs(codes, zero, group)
    if got is None:  # check() refuses first; never write a wrong byte
        raise AssertionError("Q8_0: q - z outside int8 in some block")
    q, sign = got
    d = (scale.to(torch.float32)[:, block_group] * sign).to(torch.float16).numpy()
    qs = q.to(torch.int8).numpy().view(np.uint8)
    blocks = np.concatenate([d.reshape(out_f, nb, 1).view(np.uint8), qs], axis=2)
    return np.ascontiguousarray(blocks.reshape(out_f, nb * 34))


def q4_0_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> np.ndarray:
    """2/3-bit codes ``[out, in]``, step ``[out, n_groups]`` (fp16 values), zeros ``[out, n_groups]``
    -> Q4_0 bytes ``[out, in / 32 * 18]``: ``d = s`` (fp16), then 16 bytes of nibbles
    ``q' = q - z + 8`` (element ``j`` low nibble of byte ``j``, ``j + 16`` high nibble), so that
    ``d * (q' - 8) = s * (q - z)`` exactly. ``q - z`` must lie in [-7, 7] (b <= 3 bits)."""
    out_f, in_f = codes.shape
    nb = in_f // QK
    g = in_f if group == -1 else group
    block_group = torch.arange(nb) * QK // g
    d = scale.to(torch.float16)[:, block_group].numpy()  # [out, nb]
    z = zero.to(torch.int32)[:, block_group]
    q = codes.to(torch.int32).reshape(out_f, nb, QK) - z.unsqueeze(-1) + 8
    if int(q.min()) < 1 or int(q.max()) > 15:  # cannot happen for b <= 3; never write a wrong nibble
        raise AssertionError("Q4_0: q - z + 8 outside [1, 15]")
    q = q.to(torch.uint8).numpy()
    qs = (q[:, :, :16] | (q[:, :, 16:] << 4)).astype(np.uint8)
    blocks = np.concatenate([d.reshape(out_f, nb, 1).view(np.uint8), qs], axis=2)
    return np.ascontiguousarray(blocks.reshape(out_f, nb * 18))


# ---------------------------------------------------------------------- tokenizer


def _tokenizer_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise UnsupportedError(
            f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}"
        )
    return json.loads(backend.to_str())


def _has_type(node: Any, type_name: str) -> bool:
    if isinstance(node, dict):
        if node.get("type") == type_name:
            return True
        return any(_has_type(v, type_name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, type_name) for v in node)
    return False


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` values llama.cpp's converter would write for this tokenizer."""
    if tokenizer is None:
        raise BadInputError(
            "the model has no tokenizer; a GGUF file must carry its vocabulary",
            hint="put the tokenizer files (tokenizer.json, tokenizer_config.json) next to the model",
        )
    tj = _tokenizer_json(tokenizer)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedError(
            f"GGUF export handles BPE tokenizers (byte-level like GPT-2/Llama-3/SmolLM, or "
            f"sentencepiece-style like Llama-2); this one is {model.get('type')!r}"
        )
    byte_level = _has_type(tj.get("pre_tokenizer"), "ByteLevel") or _has_type(tj.get("decoder"), "ByteLevel")
    if byte_level:
        kind = "gpt2"
    elif model.get("byte_fallback") or _has_type(tj.get("pre_tokenizer"), "Metaspace") or _has_type(
        tj.get("decoder"), "Metaspace"
    ):
        kind = "llama"
    else:
        raise UnsupportedError("GGUF export: BPE tokenizer is neither byte-level nor sentencepiece-style")

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise BadInputError(
            f"tokenizer has token id {max(vocab.values())} but the model's vocab_size is {vocab_size}"
        )
    added = {i: t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    tokens, types, scores = [], [], []
    unk_id = getattr(tokenizer, "unk_token_id", None)
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
            scores.append(-1000.0)
            continue
        tokens.append(tok)
        if i in added:
            types.append(TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED)
            scores.append(0.0)
        elif kind == "llama" and _BYTE_TOKEN.match(tok):
            types.append(TOKEN_BYTE)
            scores.append(0.0)
        elif kind == "llama" and i == unk_id:
            types.append(TOKEN_UNKNOWN)
            scores.append(0.0)
        else:
            types.append(TOKEN_NORMAL)
            scores.append(-float(i))  # BPE ids follow merge order; sentencepiece BPE scores do too
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    meta: dict[str, Any] = {"model": kind, "tokens": tokens, "token_type": types, "merges": merges}
    if kind == "llama":
        meta["scores"] = scores
        meta["pre"] = "default"
        meta["add_space_prefix"] = _has_type(tj.get("pre_tokenizer"), "Metaspace") or _has_type(
            tj.get("normalizer"), "Prepend"
        )
    else:
        chk = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
        meta["pre"] = KNOWN_PRE.get(chk, "default")
        meta["pre_known"] = chk in KNOWN_PRE
        meta["add_space_prefix"] = False
    for key in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{key}_token_id", None)
        if tid is not None:
            meta[f"{key}_token_id"] = int(tid)
    probe = tokenizer("a")["input_ids"]
    meta["add_bos_token"] = bool(probe) and probe[0] == meta.get("bos_token_id")
    meta["add_eos_token"] = bool(probe) and len(probe) > 1 and probe[-1] == meta.get("eos_token_id")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        meta["chat_template"] = template
    return meta


def _write_tokenizer(writer: Any, meta: dict[str, Any]) -> None:
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_type"])
    if "scores" in meta:
        writer.add_token_scores(meta["scores"])
    if meta["merges"]:
        writer.add_token_merges(meta["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if f"{key}_token_id" in meta:
            add(meta[f"{key}_token_id"])
    writer.add_add_bos_token(meta["add_bos_token"])
    writer.add_add_eos_token(meta["add_eos_token"])
    writer.add_add_space_prefix(meta["add_space_prefix"])
    if "chat_template" in meta:
        writer.add_chat_template(meta["chat_template"])


# ---------------------------------------------------------------------- write


def _layer_types(config: Any) -> list[str] | None:
    types = getattr(config, "layer_types", None)
    return list(types) if types else None


def _write_hparams(writer: Any, plan: GGUFPlan, config: Any, gguf: Any) -> list[str]:
    """The ``{arch}.*`` keys llama.cpp's converter writes for this architecture; returns notes."""
    notes: list[str] = []
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_kv))
    writer.add_rope_freq_base(_rope(config)[1])
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if plan.arch == "llama":
        writer.add_vocab_size(int(config.vocab_size))
        writer.add_rope_dimension_count(int(head_dim))
    if plan.arch != "llama" or head_dim != config.hidden_size // n_head:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    types = _layer_types(config)
    window = getattr(config, "sliding_window", None)
    if plan.arch == "gemma3":
        if window and types and "sliding_attention" in types:
            writer.add_sliding_window(int(window))
            # exact per-layer pattern (llama.cpp's default is 5 sliding : 1 global)
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
            swa = _swa_rope(config)
            if swa:
                writer.add_rope_freq_base_swa(swa[1])
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    elif window and (
        config.model_type == "mistral"
        or (getattr(config, "use_sliding_window", False) and types and "sliding_attention" in types)
    ):
        notes.append(
            f"{config.model_type} sliding window ({window}) is not stored: llama.cpp's {plan.arch} "
            "arch attends to the whole context (as its converter does)"
        )
    return notes


def save_gguf(
    model: nn.Module,
    tokenizer: Any,
    out_file: str | os.PathLike,
    provenance: dict | None = None,
    name: str | None = None,
) -> dict:
    """Write ``model`` (packed 2/3/4-bit) as a GGUF file at ``out_file`` (caller makes it atomic):
    Q4_0 for 2/3-bit layers (exact), Q4_1 for 4-bit layers (``m`` rounded once to fp16)."""
    import gguf

    plan = check(model)
    config = model.config
    n_layers = config.num_hidden_layers
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tok_meta = tokenizer_metadata(tokenizer, config.vocab_size)
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == plan.arch)
    tmap = gguf.get_tensor_name_map(model_arch, n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # k-quant files are labelled with the llama.cpp mix closest to "every linear at the type"
    file_type = getattr(gguf.LlamaFileType, {"Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S"}.get(
        plan.qtype, f"MOSTLY_{plan.qtype}"))
    kmode = not plan.qtypes  # layers trained on a GGML grid (no per-tensor plan): blocks as they are

    writer = gguf.GGUFWriter(str(out_file), plan.arch)
    writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model")
    writer.add_type("model")
    notes = _write_hparams(writer, plan, config, gguf)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, tok_meta)
    from eqat_cli import __version__

    writer.add_string("eqat.version", __version__)
    if kmode:
        writer.add_string("eqat.target", plan.qtype)
    else:
        writer.add_uint32("eqat.bits", int(plan.bits))
    if plan.group_size is not None:
        writer.add_int32("eqat.group_size", int(plan.group_size))
    if provenance and provenance.get("source"):
        writer.add_string("eqat.source", str(provenance["source"]))

    def gguf_name(hf_key: str) -> str:
        g = tmap.get_name(hf_key, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise UnsupportedError(f"GGUF export: no llama.cpp {plan.arch} tensor name for {hf_key}")
        return g

    def qk_permute(hf_name: str, t: torch.Tensor) -> torch.Tensor:
        if plan.arch != "llama":  # qwen2/qwen3/gemma3 use NeoX-style rotary: no permutation
            return t
        if hf_name.endswith("self_attn.q_proj"):
            return permute_rows(t, n_head, n_head)
        if hf_name.endswith("self_attn.k_proj"):
            return permute_rows(t, n_head, n_kv)
        return t

    def norm_shift(key: str, t: torch.Tensor) -> torch.Tensor:
        # Gemma3RMSNorm computes x * (1 + w) in fp32; llama.cpp multiplies by the stored gain
        if plan.arch == "gemma3" and key.endswith("norm.weight"):
            return t + 1.0
        return t

    packed = {n: m for n, m in model.named_modules() if isinstance(m, (PackedLinear, KQuantPacked))}
    prefixes = tuple(n + "." for n in packed)
    counts = Counter({**{t: 0 for t in sorted(set((plan.qtypes or {}).values()))}, plan.qtype: 0, "F16": 0, "F32": 0})
    if plan.arch == "llama" and _rope(config)[0] == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))
        counts["F32"] += 1
        notes.append("Llama-3 rope scaling is stored as llama.cpp's rope_freqs tensor; transformers' "
                     "GGUF loader ignores it (use llama.cpp for this file)")
    for key, t in model.state_dict().items():
        if prefixes and key.startswith(prefixes):
            continue
        if tied and key == "lm_head.weight":
            continue  # llama.cpp ties output to token_embd when output.weight is absent
        if not t.is_floating_point():
            raise UnsupportedError(f"GGUF export: unexpected non-float tensor {key}")
        mod_name = key.rsplit(".", 1)[0]
        arr = qk_permute(mod_name, t.detach().float())
        if arr.ndim == 1:
            writer.add_tensor(gguf_name(key), norm_shift(key, arr).numpy().astype(np.float32))
            counts["F32"] += 1
        elif kmode and arr.shape[-1] % 32 == 0:
            # llama-quantize's k-quant mixes give token_embd/output Q6_K, Q8_0 when rows are not a
            # multiple of 256 (SmolLM2 576, Gemma-3 640); eqat writes Q8_0 (gguf-py's quantizer)
            writer.add_tensor(gguf_name(key), gguf.quants.quantize(arr.numpy(), gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            counts["Q8_0"] += 1
        else:
            writer.add_tensor(gguf_name(key), arr.to(torch.float16).numpy())
            counts["F16"] += 1
    for name_, layer in packed.items():
        if isinstance(layer, KQuantPacked):
            blocks = qk_permute(name_, layer.kq_blocks.detach().cpu()).numpy()
            writer.add_tensor(gguf_name(name_ + ".weight"), blocks,
                              raw_dtype=getattr(gguf.GGMLQuantizationType, layer.type_name))
            counts[layer.type_name] += 1
            if layer.bias is not None:
                writer.add_tensor(gguf_name(name_ + ".bias"), qk_permute(name_, layer.bias.detach().float()).numpy())
                counts["F32"] += 1
            continue
        codes = qk_permute(name_, layer.codes().t())  # [out, in]
        scale = qk_permute(name_, layer.scales.detach().t().to(torch.float16))
        zero = qk_permute(name_, layer.zero_points().t())
        ttype = plan.qtypes[name_]
        blocks = {"Q4_0": q4_0_blocks, "Q4_1": q4_1_blocks, "Q8_0": q8_0_blocks}[ttype](
            codes, scale, zero, layer.group_size)
        writer.add_tensor(gguf_name(name_ + ".weight"), blocks, raw_dtype=getattr(gguf.GGMLQuantizationType, ttype))
        counts[ttype] += 1
        if layer.bias is not None:
            writer.add_tensor(gguf_name(name_ + ".bias"), qk_permute(name_, layer.bias.detach().float()).numpy())
            counts["F32"] += 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if not tok_meta.get("pre_known", True):
        notes.append(
            "tokenizer pre-tokenizer not recognised by llama.cpp's hash table: wrote 'default' "
            "(transformers is unaffected; llama.cpp may split text differently)"
        )
    return {"bits": plan.bits, "group_size": plan.group_size, "gguf_arch": plan.arch,
            "quant_type": plan.qtype, "exact": "Q4_1" not in (plan.qtypes.values() if plan.qtypes else (plan.qtype,)),
            "tensor_types": dict(counts), "tokenizer": tok_meta["model"],
            "tokenizer_pre": tok_meta["pre"], "notes": notes}


# The two entry points a format registry needs: a refusal check and a writer.
write = save_gguf


def write_job(job: Any) -> dict:
    """``write`` for a format registry's job object (``model``, ``tokenizer``, ``target`` file,
    ``output``, ``provenance``)."""
    return save_gguf(job.model, job.tokenizer, job.target, provenance=job.provenance, name=Path(job.output).stem)


# ---------------------------------------------------------------------- read


def read_gguf_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized to float32, in numpy/torch layout ``[rows, cols]``."""
    return GGUFFile.open(path).tensors()


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every metadata field of a GGUF file."""
    return GGUFFile.open(path).metadata


def load_gguf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Load through transformers (``gguf_file=``), the way users will. The header is checked first
    (:meth:`GGUFFile.check_header`) and every failure names the file, not its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    GGUFFile.check_header(p)

    def from_directory(fn):  # hf_load names its path argument in errors: pass the file, load the directory
        return lambda _file, **kw: fn(str(p.parent), gguf_file=p.name, **kw)

    model = hf_load(from_directory(AutoModelForCausalLM.from_pretrained), p, "GGUF model", dtype=dtype)
    tok = hf_load(from_directory(AutoTokenizer.from_pretrained), p, "GGUF tokenizer")
    return model.eval(), tok
