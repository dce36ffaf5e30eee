"""The readers of untrusted bytes: a damaged or foreign file becomes one line.

Each reader raises :class:`~eqat_cli.errors.BadInputError` whose message names the file and what
is wrong with it (``config.json: not valid JSON (line 3, column 5: Expecting ',' delimiter)``,
``model.safetensors: truncated: header promises 388440 bytes of tensor data, the file has
1000``), which the CLI prints as one line with exit code 2. Readers never execute code from a
file: JSON, safetensors and text are parsed as data, and ``torch.load`` is never used.

The readers:

* :func:`read_json`: JSON files whose top level is an object (or another given type);
* :func:`safetensors_header`, :func:`check_safetensors`, :func:`open_safetensors`,
  :func:`load_safetensors`: safetensors headers (fully validated: offsets, sizes, dtypes,
  truncation) and tensors;
* :func:`read_text`, :func:`text_lines`, :func:`sniff_text`, :func:`read_jsonl`: UTF-8 text and
  JSON lines;
* :func:`reading`: the context manager the others use, for any other read.

This is the bottom of the reading side: it imports nothing of eqat but ``errors`` (a model
directory's files, the remote-code gate and the Hugging Face loaders are in
:mod:`eqat_cli.model_files`). Nothing here imports torch at module level. Every reader is fuzzed
(``tests/test_fuzz.py``, ``bench/fuzz_readers.py``).
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

from eqat_cli.errors import BadInputError, EqatError

# Bytes per element of every safetensors dtype.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 0.5, "F6_E2M3": 0.75,
    "F6_E3M2": 0.75, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
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
    except RecursionError as e:  # JSON arrays/objects nested thousands deep
        raise BadInputError(f"{path}: {what} is nested too deeply to read") from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise BadInputError(f"{path}: cannot read the {what} ({first_line(e)})") from e
    except (ValueError, KeyError, TypeError, IndexError, struct.error, EOFError) as e:
        raise BadInputError(f"{path}: not a valid {what} ({first_line(e)})") from e
    except Exception as e:
        # safetensors, tokenizers, pyarrow and gguf raise their own exception types.
        mod = type(e).__module__ or ""
        if mod.split(".")[0] in ("safetensors", "tokenizers", "pyarrow", "gguf", "huggingface_hub", "google"):
            raise BadInputError(f"{path}: not a valid {what} ({first_line(e)})") from e
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
        except RecursionError:
            raise BadInputError(f"{path}:{i}: JSON nested too deeply to read") from None
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
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
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
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




# ---------------------------------------------------------------------- GGUF headers

# Value types of GGUF metadata and their sizes in bytes (8: string, 9: array have none).
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
GGUF_MAX_KEY = 65535  # bytes; llama.cpp's keys are a few dozen


class _Cursor:
    """Bounded reads over a memory-mapped file: every length or count is checked against the
    bytes left before anything is read or allocated."""

    def __init__(self, buf, size: int, path: Path, what: str):
        self.buf, self.size, self.pos, self.path, self.what = buf, size, 4, path, what

    def fail(self, msg: str) -> BadInputError:
        return BadInputError(f"{self.path}: damaged {self.what}: {msg}")

    @property
    def left(self) -> int:
        return self.size - self.pos

    def skip(self, n: int, what: str) -> int:
        if n > self.left:
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos}, {self.left} are left")
        at = self.pos
        self.pos += n
        return at

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.skip(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.skip(8, what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        """A length-prefixed string; only strings under ``limit`` bytes are decoded (for names)."""
        n = self.u64(f"the length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} claims {n} bytes (at most {limit})")
        at = self.skip(n, what)
        if limit is None:
            return ""
        text = bytes(self.buf[at:at + n]).decode("utf-8", "replace")
        return "".join(ch if ch.isprintable() else "?" for ch in text[:80])


def _gguf_value(c: _Cursor, vtype: int, key: str, depth: int = 0) -> None:
    if vtype in _GGUF_SCALARS:
        c.skip(_GGUF_SCALARS[vtype], f"the value of {key}")
    elif vtype == 8:
        c.string(f"the string value of {key}")
    elif vtype == 9:
        if depth >= 2:
            raise c.fail(f"metadata {key} nests arrays more than two deep")
        etype = c.u32(f"the element type of {key}")
        count = c.u64(f"the length of array {key}")
        if etype in _GGUF_SCALARS:
            c.skip(count * _GGUF_SCALARS[etype], f"array {key} ({count} elements)")
        elif etype in (8, 9):
            minimum = 8 if etype == 8 else 12
            if count * minimum > c.left:
                raise c.fail(f"array {key} claims {count} elements, more than the {c.left} bytes left hold")
            for _ in range(count):
                _gguf_value(c, etype, key, depth + 1)
        else:
            raise c.fail(f"array {key} has unknown element type {etype}")
    else:
        raise c.fail(f"metadata {key} has unknown value type {vtype}")


def check_gguf(path: str | os.PathLike, what: str = "GGUF file") -> dict:
    """Walk a GGUF file's header, metadata and tensor infos with every count and length checked
    against the file's size, before a GGUF library builds anything from them.

    A header that claims 2^40 tensors, an array of 2^32 strings or a string longer than the file
    is one line naming the file, read in time and memory bounded by the file's size. Returns
    ``{"version", "tensors", "metadata"}`` (the counts). The values themselves are left to the
    GGUF readers (``gguf``'s ``GGUFReader``, transformers)."""
    p = Path(path)
    _require_file(p, what)
    with reading(p, what), open(p, "rb") as fh:
        size = p.stat().st_size
        if size < 4 or fh.read(4) != b"GGUF":
            raise BadInputError(f"{p}: not a {what} (no GGUF magic at the start)")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk_gguf(_Cursor(buf, size, p, what))


def _walk_gguf(c: _Cursor) -> dict:
    size = c.size
    version = c.u32("the version")
    if version not in (2, 3):
        raise c.fail(f"version {version} (eqat reads GGUF versions 2 and 3)")
    n_tensors = c.u64("the tensor count")
    n_kv = c.u64("the metadata count")
    # Each metadata entry takes at least 12 bytes, each tensor info at least 24.
    if n_kv * 12 + n_tensors * 24 > c.left:
        raise c.fail(f"the header claims {n_tensors} tensors and {n_kv} metadata entries, more "
                     f"than the file's {size} bytes hold")
    for i in range(n_kv):
        key = c.string(f"the key of metadata entry {i}", GGUF_MAX_KEY)
        _gguf_value(c, c.u32(f"the value type of {key}"), key)
    for i in range(n_tensors):
        name = c.string(f"the name of tensor {i}", GGUF_MAX_KEY)
        n_dims = c.u32(f"the dimension count of {name}")
        if n_dims > GGUF_MAX_DIMS:
            raise c.fail(f"tensor {name} has {n_dims} dimensions (at most {GGUF_MAX_DIMS})")
        dims = [c.u64(f"a dimension of {name}") for _ in range(n_dims)]
        c.u32(f"the type of {name}")
        offset = c.u64(f"the data offset of {name}")
        if offset > size or math.prod(dims) > 8 * size:  # >= 1/8 byte per element, in the file
            raise c.fail(f"tensor {name} {dims} at offset {offset} does not fit in the file's {size} bytes")
    return {"version": version, "tensors": n_tensors, "metadata": n_kv}
