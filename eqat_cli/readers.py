"""Every file eqat reads goes through here: a damaged or foreign file becomes one line.

Each reader raises :class:`~eqat_cli.errors.BadInputError` whose message names the file and what
is wrong with it (``config.json: not valid JSON (line 3, column 5: Expecting ',' delimiter)``,
``model.safetensors: truncated: header promises 388440 bytes of tensor data, the file has
1000``), which the CLI prints as one line with exit code 2. Readers never execute code from a
file: JSON, safetensors and text are parsed as data, ``torch.load`` is never used, and
Hugging Face loaders run with ``trust_remote_code`` only after the user passed
``--trust-remote-code`` (:func:`set_trust_remote_code`).

The readers:

* :func:`read_json`, :func:`read_model_config`: JSON files / ``config.json``;
* :func:`safetensors_header`, :func:`check_safetensors`, :func:`open_safetensors`,
  :func:`load_safetensors`: safetensors headers (fully validated: offsets, sizes, dtypes,
  truncation) and tensors;
* :func:`read_text`, :func:`text_lines`, :func:`read_jsonl`: UTF-8 text and JSON lines;
* :func:`load_config`, :func:`load_tokenizer`, :func:`hf_load`: Hugging Face loaders, with the
  remote-code gate;
* :func:`reading`: the context manager the others use, for any other read.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

from eqat_cli.errors import BadInputError, EqatError

TRUST_REMOTE_CODE_ENV = "EQAT_TRUST_REMOTE_CODE"
_trust_remote_code: bool | None = None  # None: follow the environment variable

# Bytes per element of every safetensors dtype.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 0.5, "F6_E2M3": 0.75,
    "F6_E3M2": 0.75, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------- the generic guard


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str = "file") -> Iterator[None]:
    """Turn any failure while reading ``path`` into one line naming it.

    Maps decoding errors, JSON errors, safetensors errors, ``ValueError``/``KeyError``/
    ``TypeError`` raised by parsers and OS errors (missing file, permission, directory) to
    :class:`BadInputError`; :class:`EqatError` passes through unchanged.
    """
    try:
        yield
    except EqatError:
        raise
    except FileNotFoundError as e:
        raise BadInputError(f"{e.filename or path}: {what} not found") from e
    except IsADirectoryError as e:
        raise BadInputError(f"{e.filename or path}: is a directory, expected a {what}") from e
    except PermissionError as e:
        raise BadInputError(f"{e.filename or path}: permission denied reading the {what}") from e
    except UnicodeDecodeError as e:
        raise BadInputError(
            f"{path}: {what} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
            f"{e.start}; a binary file?)"
        ) from e
    except json.JSONDecodeError as e:
        raise BadInputError(
            f"{path}: {what} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise BadInputError(f"{path}: cannot read the {what} ({_first_line(e)})") from e
    except (ValueError, KeyError, TypeError, IndexError, struct.error, EOFError) as e:
        raise BadInputError(f"{path}: not a valid {what} ({_first_line(e)})") from e
    except Exception as e:
        # safetensors, tokenizers, pyarrow and gguf raise their own exception types.
        mod = type(e).__module__ or ""
        if mod.split(".")[0] in ("safetensors", "tokenizers", "pyarrow", "gguf", "huggingface_hub", "google"):
            raise BadInputError(f"{path}: not a valid {what} ({_first_line(e)})") from e
        raise


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise BadInputError(f"{path}: {what} not found")
    if not path.is_file():
        raise BadInputError(f"{path}: is not a file, expected a {what}")


# ---------------------------------------------------------------------- text and JSON


def read_text(path: str | os.PathLike, what: str = "text file") -> str:
    """A UTF-8 text file. Binary content (invalid UTF-8 or NUL bytes) is refused."""
    p = Path(path)
    _require_file(p, what)
    with reading(p, what):
        data = p.read_bytes()
        text = data.decode("utf-8")
    nul = text.find("\x00")
    if nul >= 0:
        raise BadInputError(f"{p}: {what} contains NUL bytes (at offset {nul}; a binary file?)")
    return text


def text_lines(path: str | os.PathLike, what: str = "text file", opener: Callable | None = None) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file, read lazily; ``opener`` for .gz/.bz2."""
    p = Path(path)
    _require_file(p, what)
    with reading(p, what):
        fh = opener(p) if opener is not None else p.open(encoding="utf-8")
        with fh:
            for i, line in enumerate(fh, 1):
                if "\x00" in line:
                    raise BadInputError(f"{p}:{i}: {what} contains NUL bytes (a binary file?)")
                yield i, line


def sniff_text(path: str | os.PathLike, what: str = "text file", size: int = 1 << 16) -> None:
    """Refuse a binary file cheaply: its first ``size`` bytes must be UTF-8 without NUL bytes."""
    import codecs

    p = Path(path)
    _require_file(p, what)
    with reading(p, what):
        with open(p, "rb") as fh:
            head = fh.read(size)
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut character is fine
    nul = head.find(b"\x00")
    if nul >= 0:
        raise BadInputError(f"{p}: {what} contains NUL bytes (at offset {nul}; a binary file?)")


def read_jsonl(path: str | os.PathLike, what: str = "JSON lines file", opener: Callable | None = None) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of a JSON-lines file; blank lines are skipped."""
    for i, line in text_lines(path, what, opener):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInputError(f"{path}:{i}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise BadInputError(f"{path}:{i}: expected a JSON object, found {type(obj).__name__}")
        yield i, obj


def read_json(path: str | os.PathLike, what: str = "JSON file", kind: type = dict) -> Any:
    """A JSON file whose top level is a ``kind`` (dict by default)."""
    p = Path(path)
    text = read_text(p, what)
    with reading(p, what):
        obj = json.loads(text)
    if kind is not None and not isinstance(obj, kind):
        raise BadInputError(
            f"{p}: {what} must hold a JSON {'object' if kind is dict else kind.__name__}, "
            f"found {type(obj).__name__}"
        )
    return obj


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
    return cfg


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
            f"{file.parent}: model type {model_type!r} needs the Python code shipped with the "
            f"model (auto_map in {file.name}); eqat does not run it unless you pass --trust-remote-code",
            hint="only pass --trust-remote-code for a model whose code you have read",
        )


# ---------------------------------------------------------------------- Hugging Face loaders


def hf_load(fn: Callable, path: str | os.PathLike, what: str, **kwargs) -> Any:
    """Call a Hugging Face ``from_pretrained``-style loader on ``path`` with the remote-code gate.

    Any failure becomes one line naming ``path`` (transformers raises OSError, ValueError,
    json errors, tokenizers exceptions, safetensors errors for damaged files).
    """
    kwargs.setdefault("trust_remote_code", trust_remote_code())
    try:
        with reading(path, what):
            return fn(str(path), **kwargs)
    except EqatError:
        raise
    except (RuntimeError, AttributeError, AssertionError) as e:
        raise BadInputError(f"{path}: cannot load the {what} ({_first_line(e)})") from e


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


# ---------------------------------------------------------------------- safetensors


def safetensors_header(path: str | os.PathLike, what: str = "safetensors file") -> tuple[dict, int]:
    """Parse and validate a safetensors header without reading tensor data.

    Returns ``(header, data_start)``; ``header`` maps tensor names to ``{"dtype", "shape",
    "data_offsets"}`` (``__metadata__`` included if present). Checks what the format promises:
    header length, JSON, dtypes, shapes, offsets inside the file and matching the shape, and a
    data section that ends exactly where the file ends (a truncated or padded file is refused).
    """
    p = Path(path)
    _require_file(p, what)
    with reading(p, what):
        size = p.stat().st_size
        with open(p, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise BadInputError(f"{p}: not a {what} (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise BadInputError(
                    f"{p}: not a {what} or truncated (header length field says {n} bytes, "
                    f"the file has {size})"
                )
            blob = fh.read(n)
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadInputError(f"{p}: not a {what} (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise BadInputError(f"{p}: not a {what} (its header is not a JSON object)")
    data_size = size - 8 - n
    end = 0
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise BadInputError(f"{p}: damaged {what}: __metadata__ must map strings to strings")
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise BadInputError(f"{p}: damaged {what}: entry {name!r} lacks dtype/shape/data_offsets") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise BadInputError(f"{p}: damaged {what}: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise BadInputError(f"{p}: damaged {what}: tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b):
            raise BadInputError(f"{p}: damaged {what}: tensor {name!r} has invalid offsets {[a, b]!r}")
        want = math.ceil(math.prod(shape) * SAFETENSORS_DTYPES[dtype])
        if b - a != want:
            raise BadInputError(
                f"{p}: damaged {what}: tensor {name!r} {dtype}{shape} needs {want} bytes, "
                f"its offsets span {b - a}"
            )
        spans.append((a, b))
        end = max(end, b)
    if end > data_size:
        raise BadInputError(
            f"{p}: truncated {what}: the header promises {end} bytes of tensor data, the file has {data_size}"
        )
    spans.sort()
    pos = 0
    for a, b in spans:
        if a != pos:
            raise BadInputError(f"{p}: damaged {what}: tensor data overlaps or has gaps (offset {a}, expected {pos})")
        pos = b
    if data_size != end:
        raise BadInputError(
            f"{p}: damaged {what}: {data_size - end} bytes after the last tensor (the header ends its data at {end})"
        )
    return header, 8 + n


def check_safetensors(path: str | os.PathLike, what: str = "safetensors file") -> list[str]:
    """Validate a safetensors file's header; return its tensor names."""
    header, _ = safetensors_header(path, what)
    return [k for k in header if k != "__metadata__"]


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, what: str = "safetensors file", framework: str = "pt"):
    """``safetensors.safe_open`` after the header was validated; failures name the file."""
    from safetensors import safe_open

    safetensors_header(path, what)
    with reading(path, what):
        with safe_open(str(path), framework=framework) as fh:
            yield fh


def load_safetensors(path: str | os.PathLike, what: str = "safetensors file") -> dict:
    """``safetensors.torch.load_file`` after the header was validated; failures name the file."""
    from safetensors.torch import load_file

    safetensors_header(path, what)
    with reading(path, what):
        return load_file(str(path))


def check_model_weights(path: str | os.PathLike) -> list[Path]:
    """Validate the index (if any) and every safetensors shard header of a model directory."""
    p = Path(path)
    index = p / "model.safetensors.index.json"
    if index.exists():
        idx = read_json(index, "safetensors index")
        wm = idx.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise BadInputError(f"{index}: safetensors index has no weight_map of tensor -> file")
        files = []
        for name in sorted(set(wm.values())):
            f = (p / name)
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise BadInputError(f"{index}: shard name {name!r} points outside the model directory")
            if not f.exists():
                raise BadInputError(f"{index}: lists shard {name}, which is missing")
            files.append(f)
    elif (p / "model.safetensors").exists():
        files = [p / "model.safetensors"]
    else:
        files = sorted(p.glob("*.safetensors"))
    for f in files:
        check_safetensors(f, "safetensors weight shard")
    return files


def _model_dir(p: Path) -> tuple[dict, list[Path]]:
    cfg = read_model_config(p)
    for name in TOKENIZER_JSON_FILES:
        if (p / name).exists():
            read_json(p / name, f"tokenizer file ({name})")
    files = check_model_weights(p)
    if not files:
        raise BadInputError(f"{p} holds no .safetensors weights")
    return cfg, files


def check_model_dir(path: str | os.PathLike) -> dict:
    """Validate a local model directory without loading it: ``config.json`` (incl. the
    remote-code gate), the tokenizer's JSON files and every weight shard's header. Returns the
    config dict."""
    return _model_dir(Path(path))[0]


def _quantized(cfg: dict, files: list[Path]) -> bool:
    return bool(cfg.get("quantization_config")) or any(
        k.endswith(".qweight") for f in files for k in check_safetensors(f)
    )


def check_full_precision_model(path: str | os.PathLike) -> dict:
    """:func:`check_model_dir`, and refuse a quantized checkpoint (GPTQ, eqat native, ...)."""
    p = Path(path)
    cfg, files = _model_dir(p)
    if _quantized(cfg, files):
        raise BadInputError(f"{p} is already quantized; Block-AP needs a full-precision model")
    return cfg


def preflight_model(spec: str) -> bool | None:
    """Cheap checks of a model spec before anything is printed, created or loaded: a local
    directory is validated with :func:`check_model_dir`, a ``.gguf`` file must start with the
    GGUF magic. Hub ids and aliases are checked when they are fetched.

    Returns whether a local directory holds a quantized checkpoint (None for other specs)."""
    from eqat_cli.models import classify

    src = classify(spec)
    if src.kind == "dir" and src.path is not None:
        return _quantized(*_model_dir(Path(src.path)))
    if src.kind == "gguf" and src.path is not None:
        f = Path(src.path) / str(src.gguf_file)
        with reading(f, "GGUF file"), open(f, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise BadInputError(f"{f}: not a GGUF file (no GGUF magic at the start)")
    return None
