"""GGUF (llama.cpp) export of 4-bit models as Q4_1, exact up to fp16 rounding; and a reader.

``Q4_1`` stores blocks of 32 weights along the input dimension as an fp16 scale ``d``, an fp16
minimum ``m`` and 32 unsigned 4-bit codes, ``w = d * q + m``. An asymmetric 4-bit group with step
``s`` and zero point ``z`` is ``w = (q - z) * s = s * q - z * s``, so every 32-block of a group
gets ``d = s`` (already fp16, exact) and ``m = -z * s`` (rounded once to fp16) and the *same
codes*. That needs the group size to be a multiple of 32 (a ragged last group is fine as long as
``in_features`` is a multiple of 32). Other bit widths have no exact GGUF type and are refused.

Like llama.cpp's ``convert_hf_to_gguf.py`` for the ``llama`` architecture we permute the rows of
``q_proj``/``k_proj`` (llama.cpp's rotary layout; transformers undoes it on load), keep the
embeddings and output head in F16 and the norms in F32, and write the ``llama.*`` hyperparameters
and the ``tokenizer.ggml.*`` vocabulary so transformers (``gguf_file=``) and llama.cpp can load the
file on their own.
"""

from __future__ import annotations

import json
import os
import re
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from eqat_cli.errors import BadInputError, UnsupportedError
from eqat_cli.quant.linear import PackedLinear

QK = 32  # Q4_1 block length
SUPPORTED_MODEL_TYPES = ("llama", "mistral")

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


def _rope(config: Any) -> tuple[str, float]:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope_type, float(theta)


def check_gguf_exportable(model: nn.Module) -> tuple[int, int | None]:
    """Raise a one-line error unless the model maps exactly onto Q4_1.

    Returns ``(4, group)``; ``group`` is None when layers use different (compatible) group sizes.
    """
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedError(
            f"GGUF export supports {', '.join(SUPPORTED_MODEL_TYPES)} models (llama.cpp arch 'llama'); "
            f"this one is {config.model_type!r}",
            hint="use --format gptq_v2, eqat or fp16",
        )
    rope_type, _ = _rope(config)
    if rope_type != "default":
        raise UnsupportedError(
            f"GGUF export of rope scaling {rope_type!r} is not implemented: llama.cpp needs a "
            "rope_freqs tensor and transformers' GGUF loader ignores it, so the export could not be "
            "verified",
            hint="use --format gptq_v2 or fp16 for this model",
        )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    if not layers:
        raise BadInputError(
            "the model has no quantized (packed) layers; GGUF export maps quantized 4-bit layers to Q4_1",
            hint="quantize it first (eqat block-ap ... --bits 4 --group 128)",
        )
    combos = sorted({(m.bits, m.group_size) for m in layers.values()})
    bad_bits = sorted({b for b, _ in combos if b != 4})
    if bad_bits:
        raise UnsupportedError(
            f"GGUF export is exact only for 4-bit models (Q4_1: d = s, m = -z*s per 32-block); this "
            f"model has {', '.join(f'w{b}g{g}' for b, g in combos)}. {bad_bits[0]}-bit codes have no "
            "exact GGUF type (Q2_K/Q3_K use 256-wide super-blocks with 4/6-bit sub-scales that cannot "
            "hold learned step sizes and zero points)",
            hint="use --format gptq_v2 (2/3/4/8-bit) or fp16",
        )
    for name, m in layers.items():
        g = m.in_features if m.group_size == -1 else m.group_size
        if g % QK or m.in_features % QK:
            raise UnsupportedError(
                f"{name}: group size {m.group_size} with in_features {m.in_features} does not split "
                f"into Q4_1 blocks of {QK} (the group and in_features must be multiples of {QK})",
                hint="re-quantize with group 32, 64 or 128, or use --format gptq_v2 / fp16",
            )
    from eqat_cli.formats.gptq import uniform_bits_group

    try:
        return uniform_bits_group(layers, "GGUF")
    except UnsupportedError:  # mixed (compatible) group sizes are fine for Q4_1
        return 4, None


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
    ``j`` in the low nibble of byte ``j``, element ``j + 16`` in its high nibble)."""
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


def save_gguf(
    model: nn.Module,
    tokenizer: Any,
    out_file: str | os.PathLike,
    provenance: dict | None = None,
    name: str | None = None,
) -> dict:
    """Write ``model`` (packed 4-bit) as a Q4_1 GGUF file at ``out_file`` (caller makes it atomic)."""
    import gguf

    bits, group = check_gguf_exportable(model)
    config = model.config
    n_layers = config.num_hidden_layers
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tok_meta = tokenizer_metadata(tokenizer, config.vocab_size)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))

    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model")
    writer.add_type("model")
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(n_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_kv))
    writer.add_rope_freq_base(_rope(config)[1])
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, tok_meta)
    from eqat_cli import __version__

    writer.add_string("eqat.version", __version__)
    writer.add_uint32("eqat.bits", int(bits))
    if group is not None:
        writer.add_int32("eqat.group_size", int(group))
    if provenance and provenance.get("source"):
        writer.add_string("eqat.source", str(provenance["source"]))

    def gguf_name(hf_key: str) -> str:
        g = tmap.get_name(hf_key, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise UnsupportedError(f"GGUF export: no llama.cpp tensor name for {hf_key}")
        return g

    def qk_permute(hf_name: str, t: torch.Tensor) -> torch.Tensor:
        if hf_name.endswith("self_attn.q_proj"):
            return permute_rows(t, n_head, n_head)
        if hf_name.endswith("self_attn.k_proj"):
            return permute_rows(t, n_head, n_kv)
        return t

    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    prefixes = tuple(n + "." for n in packed)
    counts = {"Q4_1": 0, "F16": 0, "F32": 0}
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
            writer.add_tensor(gguf_name(key), arr.numpy().astype(np.float32))
            counts["F32"] += 1
        else:
            writer.add_tensor(gguf_name(key), arr.to(torch.float16).numpy())
            counts["F16"] += 1
    for name_, layer in packed.items():
        codes = qk_permute(name_, layer.codes().t())  # [out, in]
        scale = qk_permute(name_, layer.scales.detach().t().to(torch.float16))
        zero = qk_permute(name_, layer.zero_points().t())
        blocks = q4_1_blocks(codes, scale, zero, layer.group_size)
        writer.add_tensor(gguf_name(name_ + ".weight"), blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        counts["Q4_1"] += 1
        if layer.bias is not None:
            writer.add_tensor(gguf_name(name_ + ".bias"), qk_permute(name_, layer.bias.detach().float()).numpy())
            counts["F32"] += 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    notes = []
    if not tok_meta.get("pre_known", True):
        notes.append(
            "tokenizer pre-tokenizer not recognised by llama.cpp's hash table: wrote 'default' "
            "(transformers is unaffected; llama.cpp may split text differently)"
        )
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        notes.append("Mistral sliding window is not stored in GGUF llama arch (llama.cpp ignores it too)")
    return {"bits": bits, "group_size": group, "tensor_types": counts, "tokenizer": tok_meta["model"],
            "tokenizer_pre": tok_meta["pre"], "notes": notes}


# ---------------------------------------------------------------------- read


def read_gguf_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized to float32, in numpy/torch layout ``[rows, cols]``."""
    from eqat_cli.formats.checkpoint import GGUFFile

    return GGUFFile.open(path).tensors()


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every metadata field of a GGUF file."""
    from eqat_cli.formats.checkpoint import GGUFFile

    return GGUFFile.open(path).metadata


def load_gguf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Load through transformers (``gguf_file=``), the way users will. The header is checked first
    (:meth:`GGUFFile.check_header`) and every failure names the file, not its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eqat_cli.formats.checkpoint import GGUFFile
    from eqat_cli.model_files import hf_load

    p = Path(path)
    GGUFFile.check_header(p)

    def from_directory(fn):  # hf_load names its path argument in errors: pass the file, load the directory
        return lambda _file, **kw: fn(str(p.parent), gguf_file=p.name, **kw)

    model = hf_load(from_directory(AutoModelForCausalLM.from_pretrained), p, "GGUF model", dtype=dtype)
    tok = hf_load(from_directory(AutoTokenizer.from_pretrained), p, "GGUF tokenizer")
    return model.eval(), tok
