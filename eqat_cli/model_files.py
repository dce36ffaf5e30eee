"""A model directory's files, checked before any model is built.

* :func:`read_model_config`: ``config.json`` with a model type, the remote-code gate and
  :func:`check_config` (every size positive and consistent, special token ids inside the
  vocabulary), so a damaged config is one line naming the field, never a traceback from torch;
* :func:`check_weight_shapes`: the shard headers (no tensor data) against the config: the
  embedding is ``[vocab_size, hidden_size]``, blocks ``0 .. num_hidden_layers - 1`` are there and
  no others, and each block's linear layers read and write ``hidden_size`` where the
  architecture's :class:`~eqat_cli.specs.ArchitectureSpec` says they do;
* :func:`check_model_weights`, :func:`check_model_dir`, :func:`check_full_precision_model`:
  the index and every shard header, the tokenizer's JSON files;
* :func:`set_trust_remote_code`, :func:`hf_load`, :func:`load_config`, :func:`load_tokenizer`:
  Hugging Face loaders with the remote-code gate (``--trust-remote-code``).

Sits between :mod:`eqat_cli.readers` (bytes) and ``formats/`` / ``models`` (which load what
passed here). Nothing here imports torch at module level.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from eqat_cli.errors import BadInputError, EqatError
from eqat_cli.readers import check_safetensors, first_line, read_json, reading, safetensors_header
from eqat_cli.registry import get_registry

TRUST_REMOTE_CODE_ENV = "EQAT_TRUST_REMOTE_CODE"
_trust_remote_code: bool | None = None  # None: follow the environment variable


# ---------------------------------------------------------------------- config.json

def read_model_config(path: str | os.PathLike) -> dict:
    """``config.json`` of a model directory, checked for a model type and the remote-code gate."""
    p = Path(path)
    cfg_file = p / "config.json" if p.is_dir() or not p.name.endswith(".json") else p
    cfg = read_json(cfg_file, "model config (config.json)")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    model_type = cfg.get("model_type") or text.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise BadInputError(f"{cfg_file}: model config has no model_type (not a transformers model?)")
    _check_remote_code(cfg, cfg_file, model_type)
    check_config(cfg, cfg_file)
    return cfg


# Sizes a decoder config must give as positive integers when it names them (transformers' own
# names; a family that calls them differently is not checked on those).
POSITIVE_SIZES = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "max_position_embeddings", "head_dim",
)
SPECIAL_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id")
POSITIVE_FLOATS = ("rms_norm_eps", "layer_norm_eps", "rope_theta")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def text_config(cfg: dict) -> dict:
    """The decoder's part of a config: ``text_config`` (multimodal models) over the top level."""
    text = cfg.get("text_config")
    return {**cfg, **text} if isinstance(text, dict) else cfg


def check_config(cfg: dict, file: str | os.PathLike = "config.json") -> None:
    """Refuse a config whose sizes cannot build a model, in one line naming the field.

    Checked when present (at the top level and in ``text_config``): :data:`POSITIVE_SIZES` are
    positive integers; ``hidden_size`` is a multiple of ``num_attention_heads`` unless
    ``head_dim`` is given; ``num_attention_heads`` is a multiple of ``num_key_value_heads``;
    every special token id is inside the vocabulary; norm epsilons and ``rope_theta`` are finite
    and positive.
    """
    for key in ("text_config", "quantization_config", "rope_scaling", "rope_parameters"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise BadInputError(f"{file}: {key} must be a JSON object, found {type(cfg[key]).__name__}")
    scopes = [("", cfg)]
    if isinstance(cfg.get("text_config"), dict):
        scopes.append(("text_config.", cfg["text_config"]))
    for prefix, scope in scopes:
        for key in POSITIVE_SIZES:
            if key in scope and scope[key] is not None:
                v = scope[key]
                if not _is_int(v) or v <= 0:
                    raise BadInputError(f"{file}: {prefix}{key} must be a positive integer, found {v!r}")
        for key in POSITIVE_FLOATS:
            v = scope.get(key)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)
                                  or not math.isfinite(v) or v <= 0):
                raise BadInputError(f"{file}: {prefix}{key} must be a finite positive number, found {v!r}")
        hidden, heads = scope.get("hidden_size"), scope.get("num_attention_heads")
        kv = scope.get("num_key_value_heads")
        if _is_int(hidden) and _is_int(heads) and scope.get("head_dim") is None and hidden % heads:
            raise BadInputError(
                f"{file}: {prefix}hidden_size {hidden} is not a multiple of "
                f"{prefix}num_attention_heads {heads} (and no head_dim is given)"
            )
        if _is_int(heads) and _is_int(kv) and heads % kv:
            raise BadInputError(
                f"{file}: {prefix}num_attention_heads {heads} is not a multiple of "
                f"{prefix}num_key_value_heads {kv}"
            )
        vocab = scope.get("vocab_size")
        for key in SPECIAL_TOKENS:
            ids = scope.get(key)
            for tid in ids if isinstance(ids, list) else [ids]:
                if tid is None:
                    continue
                if not _is_int(tid):
                    raise BadInputError(f"{file}: {prefix}{key} must be a token id (an integer), found {tid!r}")
                # A negative pad id counts from the end, as torch's padding_idx does.
                low = -vocab if key == "pad_token_id" and _is_int(vocab) else 0
                if tid < low or (_is_int(vocab) and tid >= vocab):
                    raise BadInputError(
                        f"{file}: {prefix}{key} {tid} is outside the vocabulary "
                        f"({prefix}vocab_size {vocab})"
                    )


def _shape(header: dict, key: str) -> list[int] | None:
    info = header.get(key)
    return info["shape"] if isinstance(info, dict) else None


def check_weight_shapes(cfg: dict, cfg_file: str | os.PathLike, files: list[Path] = (),
                        shapes: dict[str, tuple[Path, list[int]]] | None = None) -> None:
    """The shard headers against the config: one line naming the tensor, its file and the field.

    Generic: the input embedding (a tensor named ``...embed_tokens.weight``) is
    ``[vocab_size, hidden_size]``. With the registry's architecture for the model type: the
    shards hold blocks ``0 .. num_hidden_layers - 1`` and no others, and in every block each
    linear layer of the first group reads ``hidden_size`` features, the layers of one group read
    the same number, and the last layer writes ``hidden_size`` (full-precision weights; packed
    layers are checked by their loader). ``shapes`` (tensor key -> (file, shape)) stands for
    headers already parsed, e.g. by :class:`eqat_cli.formats.checkpoint.Checkpoint`.
    """
    text = text_config(cfg)
    vocab, hidden, n_layers = text.get("vocab_size"), text.get("hidden_size"), text.get("num_hidden_layers")
    where: dict[str, tuple[Path, list[int]]] = dict(shapes or {})  # headers already parsed
    for f in files:
        header, _ = safetensors_header(f, "safetensors weight shard")
        for k, v in header.items():
            if k != "__metadata__":
                where[k] = (f, v["shape"])
    arch = _architecture(cfg)
    if arch is not None and arch.checkpoint_renames:
        where = {arch.module_key(k): v for k, v in where.items()}
    embeds = sorted(k for k in where if k.endswith("embed_tokens.weight"))
    if embeds and _is_int(vocab) and _is_int(hidden):
        f, shape = where[embeds[0]]
        if shape != [vocab, hidden]:
            raise BadInputError(
                f"{f}: {embeds[0]} has shape {shape}, but {cfg_file} says vocab_size {vocab} x "
                f"hidden_size {hidden}"
            )
    if arch is None or not _is_int(n_layers):
        return
    pat = re.compile(re.escape(arch.layers_path) + r"\.(\d+)\.")
    found = sorted({int(m.group(1)) for k in where if (m := pat.match(k))})
    if not found:
        return  # the blocks live under another name: nothing to compare
    extra = [i for i in found if i >= n_layers]
    if extra:
        raise BadInputError(
            f"{cfg_file}: num_hidden_layers is {n_layers}, but the weights hold block {extra[-1]} "
            f"({arch.layers_path}.{extra[-1]}.*)"
        )
    # The first absent block, without building range(num_hidden_layers): the config may claim 2^62.
    missing = next((i for i, j in enumerate(found) if i != j), len(found))
    if missing < n_layers:
        raise BadInputError(
            f"{cfg_file}: num_hidden_layers is {n_layers}, but the weights have no block {missing} "
            f"({arch.layers_path}.{missing}.*)"
        )
    if not _is_int(hidden):
        return
    last = arch.linear_names[-1]
    for i in range(n_layers):
        prefix = arch.layer_prefix(i)
        for g, group in enumerate(arch.linear_groups):
            reads = None
            for name in group:
                key = f"{prefix}{name}.weight"
                shape = where.get(key, (None, None))[1]
                if shape is None or len(shape) != 2:
                    continue  # packed (qweight) or absent: the loader checks
                f = where[key][0]
                if g == 0 and shape[1] != hidden:
                    raise BadInputError(
                        f"{f}: {key} reads {shape[1]} features, but {cfg_file} says hidden_size {hidden}"
                    )
                if reads is not None and shape[1] != reads:
                    raise BadInputError(
                        f"{f}: {key} reads {shape[1]} features, the other layers of its group {reads}"
                    )
                reads = shape[1]
                if name == last and shape[0] != hidden:
                    raise BadInputError(
                        f"{f}: {key} writes {shape[0]} features, but {cfg_file} says hidden_size {hidden}"
                    )


def _architecture(cfg: dict) -> Any:
    """The registry's architecture for this config's model type, or None."""
    model_type = cfg.get("model_type") or text_config(cfg).get("model_type")
    try:
        return get_registry().find_architecture(model_type)
    except EqatError:
        return None


# ---------------------------------------------------------------------- remote code


def set_trust_remote_code(value: bool | None) -> None:
    """Allow (``True``) or refuse (``False``) models that need their own Python code.

    ``None`` follows ``EQAT_TRUST_REMOTE_CODE`` (refused unless it is ``1``). The CLI sets it from
    ``--trust-remote-code``.
    """
    global _trust_remote_code
    _trust_remote_code = value


def trust_remote_code() -> bool:
    if _trust_remote_code is not None:
        return _trust_remote_code
    return os.environ.get(TRUST_REMOTE_CODE_ENV, "") in ("1", "true", "yes")


def _known_model_type(model_type: str) -> bool:
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except Exception:  # pragma: no cover - transformers is a dependency
        return False
    return model_type in CONFIG_MAPPING


def _check_remote_code(cfg: dict, file: Path, model_type: str) -> None:
    """Refuse a config that can only be loaded by running the code it ships (``auto_map`` and a
    model type transformers does not implement) unless remote code is trusted. A known model type
    with an ``auto_map`` loads with transformers' own class (the shipped code is not run)."""
    if cfg.get("auto_map") and not trust_remote_code():
        if _known_model_type(model_type):
            return
        raise BadInputError(
            f"{file}: model type {model_type!r} needs the Python code shipped with the "
            f"model (auto_map in {file.name}); eqat does not run it unless you pass --trust-remote-code",
            hint="only pass --trust-remote-code for a model whose code you have read",
        )


# ---------------------------------------------------------------------- Hugging Face loaders


def hf_load(fn: Callable, path: str | os.PathLike, what: str, **kwargs) -> Any:
    """Call a Hugging Face ``from_pretrained``-style loader on ``path`` with the remote-code gate.

    Any failure becomes one line naming the file: ``path``, or ``path / gguf_file`` when a GGUF
    file is loaded from its directory (never the bare directory, which is ``.`` for a file in the
    working directory). Transformers raises OSError, ValueError, json errors, tokenizers
    exceptions, safetensors errors for damaged files.
    """
    kwargs.setdefault("trust_remote_code", trust_remote_code())
    shown = Path(path) / kwargs["gguf_file"] if kwargs.get("gguf_file") else path
    try:
        with reading(shown, what):
            return fn(str(path), **kwargs)
    except EqatError:
        raise
    except (RuntimeError, AttributeError, AssertionError, MemoryError, OverflowError) as e:
        raise BadInputError(f"{shown}: cannot load the {what} ({first_line(e)})") from e


def load_config(path: str | os.PathLike) -> Any:
    """``AutoConfig`` of a model directory, after :func:`read_model_config` checked the file."""
    from transformers import AutoConfig

    read_model_config(path)
    return hf_load(AutoConfig.from_pretrained, path, "model config")


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Any of these makes a directory worth handing to AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt", "merges.txt")


def load_tokenizer(path: str | os.PathLike, **kwargs) -> Any:
    """``AutoTokenizer`` of a model directory; its JSON files are checked first."""
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_dir() and not any((p / name).exists() for name in TOKENIZER_FILES):
        raise BadInputError(
            f"{p}: the model has no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])})",
            hint="copy the tokenizer files of the model it was made from into the directory",
        )
    if p.is_dir():
        for name in TOKENIZER_JSON_FILES:
            if (p / name).exists():
                cfg = read_json(p / name, f"tokenizer file ({name})")
                if name == "tokenizer_config.json" and cfg.get("auto_map") and not trust_remote_code():
                    raise BadInputError(
                        f"{p}: the tokenizer needs the Python code shipped with the model (auto_map in "
                        f"{name}); eqat does not run it unless you pass --trust-remote-code"
                    )
    try:
        tok = hf_load(AutoTokenizer.from_pretrained, p, "tokenizer", **kwargs)
    except BadInputError as e:
        raise BadInputError(f"{p}: no usable tokenizer ({str(e).split(': ', 1)[-1]})") from e
    if tok is None or isinstance(tok, bool):
        raise BadInputError(f"{p}: no usable tokenizer")
    return tok


INDEX_FILE = "model.safetensors.index.json"


def read_index(path: str | os.PathLike) -> dict | None:
    """A model directory's safetensors index (``model.safetensors.index.json``) as JSON, or None."""
    index = Path(path) / INDEX_FILE
    return read_json(index, "safetensors index") if index.exists() else None


def shard_files(path: str | os.PathLike, index: dict | None = None) -> list[Path]:
    """The weight shards of a model directory: those its ``index`` (the parsed index file, see
    :func:`read_index`) lists, each checked to be a name inside the directory and an existing
    file; else ``model.safetensors``; else every ``*.safetensors``. The one home of these checks
    (:func:`check_model_weights` and :class:`eqat_cli.formats.checkpoint.Checkpoint` use it)."""
    p = Path(path)
    if index is None:
        if (p / "model.safetensors").exists():
            return [p / "model.safetensors"]
        return sorted(p.glob("*.safetensors"))
    idx_file = p / INDEX_FILE
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise BadInputError(f"{idx_file}: safetensors index has no weight_map of tensor -> file")
    files = []
    for name in sorted(set(wm.values())):
        f = p / name
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise BadInputError(f"{idx_file}: shard name {name!r} points outside the model directory")
        if len(name) > 4096 or any(len(part.encode()) > 255 for part in Path(name).parts):
            raise BadInputError(f"{idx_file}: shard name {name[:60]!r}... is too long for a file name")
        with reading(idx_file, "safetensors index"):
            exists = f.is_file()
        if not exists:
            raise BadInputError(f"{idx_file}: lists shard {name[:200]}, which is missing")
        files.append(f)
    return files


def check_model_weights(path: str | os.PathLike) -> list[Path]:
    """Validate the index (if any) and every safetensors shard header of a model directory."""
    files = shard_files(path, read_index(path))
    for f in files:
        check_safetensors(f, "safetensors weight shard")
    return files


def model_dir_files(p: Path) -> tuple[dict, list[Path]]:
    """:func:`check_model_dir`'s checks; returns the config dict and the weight shards."""
    cfg = read_model_config(p)
    for name in TOKENIZER_JSON_FILES:
        if (p / name).exists():
            read_json(p / name, f"tokenizer file ({name})")
    files = check_model_weights(p)
    if not files:
        raise BadInputError(f"{p} holds no .safetensors weights")
    check_weight_shapes(cfg, p / "config.json", files)
    return cfg, files


def check_model_dir(path: str | os.PathLike) -> dict:
    """Validate a local model directory without loading it: ``config.json`` (incl. the
    remote-code gate), the tokenizer's JSON files and every weight shard's header. Returns the
    config dict."""
    return model_dir_files(Path(path))[0]


def quantized(cfg: dict, files: list[Path]) -> bool:
    return bool(cfg.get("quantization_config")) or any(
        k.endswith((".qweight", ".kq_blocks")) for f in files for k in check_safetensors(f)
    )


def check_full_precision_model(path: str | os.PathLike) -> dict:
    """:func:`check_model_dir`, and refuse a quantized checkpoint (GPTQ, eqat native, ...)."""
    p = Path(path)
    cfg, files = model_dir_files(p)
    if quantized(cfg, files):
        raise BadInputError(f"{p} is already quantized; Block-AP needs a full-precision model")
    return cfg
