"""Fuzz targets: every eqat reader of untrusted bytes, a valid file for each, and structured
mutations of it (issue #29).

A *target* is a valid seed file (or model directory) and the reader that eqat runs on it. A
*mutation* turns the seed's bytes into a damaged copy: bit flips, truncation, "interesting"
integers written over length and count fields (2^32-1, 2^40, 2^63, -1 ...), inserted and
duplicated chunks, and for JSON (a config, a tokenizer file, the safetensors header, the GGUF-free
JSON parts) a structured edit of one value: huge, negative or zero numbers, NaN and infinities,
wrong types, deeply nested arrays, long strings, deleted keys.

The reader must succeed or raise an :class:`~eqat_cli.errors.EqatError` whose message is one
line: any other exception is a crash. Used by ``tests/test_fuzz.py`` (hypothesis, a bounded and
derandomized number of examples per target) and ``bench/fuzz_readers.py`` (10,000 inputs per
target, each in a watched worker process).

Every draw goes through a :class:`Source`, so the same mutations run from hypothesis
(:class:`HypothesisSource`) or from a seeded :class:`random.Random` (:class:`RandomSource`).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

INTERESTING_INTS = [0, 1, -1, 7, 255, 256, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
                    2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 10**30, -(2**63)]
ODD_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, -1.5]
MAX_INPUT = (1 << 20) - 1  # every mutated input stays under 1 MB


class Source:
    """Where a mutation's choices come from."""

    def int(self, lo: int, hi: int) -> int:  # inclusive
        raise NotImplementedError

    def choice(self, seq: list) -> Any:
        return seq[self.int(0, len(seq) - 1)]

    def bytes(self, n: int) -> bytes:
        return bytes(self.int(0, 255) for _ in range(n))


class RandomSource(Source):
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)


class HypothesisSource(Source):
    def __init__(self, data: Any):
        self.data = data

    def int(self, lo: int, hi: int) -> int:
        from hypothesis import strategies as st

        return self.data.draw(st.integers(lo, hi))

    def bytes(self, n: int) -> bytes:
        from hypothesis import strategies as st

        return self.data.draw(st.binary(min_size=n, max_size=n))


# ---------------------------------------------------------------------- mutations


def odd_value(src: Source) -> Any:
    """A JSON value a parser must survive and a reader must refuse or accept calmly."""
    kind = src.int(0, 9)
    if kind == 0:
        return src.choice(INTERESTING_INTS)
    if kind == 1:
        return src.choice(ODD_FLOATS)
    if kind == 2:
        return src.choice(["", "x" * src.int(1, 64), "\x00", "../../etc/passwd", "/abs", "ü€😀", "NaN"])
    if kind == 3:
        return src.choice([True, False, None])
    if kind == 4:
        return [src.choice(INTERESTING_INTS) for _ in range(src.int(0, 4))]
    if kind == 5:
        return {"a": src.choice(INTERESTING_INTS), "": None}
    if kind == 6:
        return "y" * src.int(1000, 200_000)  # long string, input stays < 1 MB
    if kind == 7:
        return [[1.5, "a"], {"b": [None]}]
    if kind == 8:
        return -src.int(1, 10**6)
    return src.int(-10, 10)


DEEP = "\x00DEEP\x00"  # replaced by deeply nested brackets after serialisation


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            out += _paths(v, prefix + (i,))
    return out


def mutate_json_value(obj: Any, src: Source) -> Any:
    """One structured edit of a parsed JSON document (a copy is returned)."""
    obj = json.loads(json.dumps(obj))
    paths = _paths(obj)
    path = src.choice(paths)
    op = src.int(0, 5)
    if not path:
        return odd_value(src) if op < 4 else DEEP
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if op == 0 and isinstance(parent, dict):
        del parent[key]
    elif op == 1 and isinstance(parent, dict):
        parent[src.choice(["__metadata__", "auto_map", "weight_map", "model_type", "text_config", "x"])] = odd_value(src)
    elif op == 2:
        parent[key] = DEEP
    else:
        parent[key] = odd_value(src)
    return obj


def dump_json(obj: Any, src: Source) -> bytes:
    text = json.dumps(obj, allow_nan=True)
    if json.dumps(DEEP) in text:
        depth = src.choice([50, 1000, 20_000, 200_000])
        nest = "[" * depth + "]" * depth if src.int(0, 1) else '{"a":' * depth + "1" + "}" * depth
        text = text.replace(json.dumps(DEEP), nest)
    return text.encode()


def mutate_bytes(data: bytes, src: Source, fields: list[tuple[int, int]] = ()) -> bytes:
    """Byte-level damage; ``fields`` lists (offset, width) of known length/count fields."""
    data = bytearray(data)
    op = src.int(0, 5)
    n = len(data)
    if op == 0 and n:  # bit flips
        for _ in range(src.int(1, 8)):
            i = src.int(0, n - 1)
            data[i] ^= 1 << src.int(0, 7)
    elif op == 1:  # truncation
        del data[src.int(0, n):]
    elif op == 2 and n:  # an interesting integer over a length/count field or anywhere
        if fields and src.int(0, 3):
            off, width = src.choice(list(fields))
        else:
            off, width = src.int(0, max(0, n - 1)), src.choice([1, 2, 4, 8])
        v = src.choice(INTERESTING_INTS) % (1 << (8 * width))
        data[off:off + width] = v.to_bytes(width, "little")
    elif op == 3:  # inserted garbage
        i = src.int(0, n)
        data[i:i] = src.bytes(src.int(1, 64))
    elif op == 4 and n:  # a duplicated chunk
        a = src.int(0, n - 1)
        b = min(n, a + src.int(1, 4096))
        data[a:a] = data[a:b]
    else:  # padded
        data += src.bytes(src.int(1, 32))
    return bytes(data[:MAX_INPUT])


# ---------------------------------------------------------------------- seeds


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def small_safetensors() -> tuple[dict, bytes]:
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "I64", "shape": [4], "data_offsets": [24, 56]},
        "c": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [56, 64]},
    }
    data = struct.pack("<6f", *range(6)) + struct.pack("<4q", 1, 2, 3, 4) + bytes(8)
    return header, data


def mutate_safetensors(header: dict, data: bytes, src: Source) -> bytes:
    """Half structured (a header edit, re-serialised with the right length), half raw bytes."""
    if src.int(0, 1):
        return safetensors_bytes_raw(dump_json(mutate_json_value(header, src), src), data)
    return mutate_bytes(safetensors_bytes(header, data), src, [(0, 8)])


def safetensors_bytes_raw(blob: bytes, data: bytes) -> bytes:
    return (struct.pack("<Q", len(blob)) + blob + data)[:MAX_INPUT]


TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 8,
    "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False,
}
GPTQ_SECTION = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                "checkpoint_format": "gptq"}
TOKENIZER_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "model_max_length": 32,
                    "tokenizer_class": "PreTrainedTokenizerFast"}
TOKENIZER_JSON = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
                  "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
                  "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}}


def tiny_model_weights() -> tuple[dict, bytes]:
    """Header and data of a tiny llama's model.safetensors matching :data:`TINY_CONFIG` (F32 zeros)."""
    shapes = {
        "model.embed_tokens.weight": [16, 8], "lm_head.weight": [16, 8], "model.norm.weight": [8],
        "model.layers.0.input_layernorm.weight": [8], "model.layers.0.post_attention_layernorm.weight": [8],
        "model.layers.0.self_attn.q_proj.weight": [8, 8], "model.layers.0.self_attn.k_proj.weight": [4, 8],
        "model.layers.0.self_attn.v_proj.weight": [4, 8], "model.layers.0.self_attn.o_proj.weight": [8, 8],
        "model.layers.0.mlp.gate_proj.weight": [12, 8], "model.layers.0.mlp.up_proj.weight": [12, 8],
        "model.layers.0.mlp.down_proj.weight": [8, 12],
    }
    header, pos = {}, 0
    for k, shape in shapes.items():
        n = 4 * math.prod(shape)
        header[k] = {"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    return header, bytes(pos)


def gguf_seed() -> tuple[bytes, list[tuple[int, int]]]:
    """A small valid GGUF file (gguf's own writer) and the offsets of its count/length fields."""
    import tempfile

    import numpy as np
    from gguf import GGUFWriter

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "m.gguf"
        w = GGUFWriter(str(f), "llama")
        w.add_block_count(1)
        w.add_context_length(32)
        w.add_uint32("eqat.bits", 4)
        w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
        w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
        w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        w.add_tensor("blk.0.attn_q.weight", np.ones((8, 8), dtype=np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        data = f.read_bytes()
    # magic, version, tensor count, kv count; then every 8-byte string/array length we can find
    fields = [(4, 4), (8, 8), (16, 8)]
    i = 24
    while i + 8 <= min(len(data), 4096):
        v = int.from_bytes(data[i:i + 8], "little")
        if 0 < v < 64:
            fields.append((i, 8))
        i += 1
    return data, fields


# ---------------------------------------------------------------------- targets


def _check_dir(path: Path) -> None:
    from eqat_cli.model_files import check_model_dir

    check_model_dir(path)


@dataclass
class Target:
    """A reader and how to make one mutated input for it in ``work`` (a fresh directory)."""

    name: str
    make: Callable[[Path, Source], Path]  # writes a mutated input, returns what the reader reads
    read: Callable[[Path], Any]


def _model_dir(work: Path, files: dict[str, bytes]) -> Path:
    d = work / "model"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def _valid_model_files(config: dict | None = None) -> dict[str, bytes]:
    header, data = tiny_model_weights()
    return {
        "config.json": json.dumps(config or TINY_CONFIG).encode(),
        "model.safetensors": safetensors_bytes(header, data),
        "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG).encode(),
        "tokenizer.json": json.dumps(TOKENIZER_JSON).encode(),
    }


def _json_mutant(obj: Any, src: Source) -> bytes:
    if src.int(0, 2):
        return dump_json(mutate_json_value(obj, src), src)[:MAX_INPUT]
    return mutate_bytes(json.dumps(obj).encode(), src)


def make_safetensors(work: Path, src: Source) -> Path:
    header, data = small_safetensors()
    f = work / "x.safetensors"
    f.write_bytes(mutate_safetensors(header, data, src))
    return f


def read_safetensors_tensors(path: Path) -> None:
    """Header check, then every tensor through safetensors itself (what loaders do)."""
    from eqat_cli.readers import open_safetensors

    with open_safetensors(path) as fh:
        for k in fh.keys():
            fh.get_tensor(k)


def make_shard_dir(work: Path, src: Source) -> Path:
    files = _valid_model_files()
    header, data = tiny_model_weights()
    files["model.safetensors"] = mutate_safetensors(header, data, src)
    return _model_dir(work, files)


def make_config_dir(work: Path, src: Source) -> Path:
    files = _valid_model_files()
    files["config.json"] = _json_mutant(TINY_CONFIG, src)
    return _model_dir(work, files)


def make_gptq_config_dir(work: Path, src: Source) -> Path:
    files = _valid_model_files({**TINY_CONFIG, "quantization_config": GPTQ_SECTION})
    files["config.json"] = _json_mutant({**TINY_CONFIG, "quantization_config": GPTQ_SECTION}, src)
    return _model_dir(work, files)


def read_layout(path: Path) -> None:
    from eqat_cli.formats.describe import inspect_path
    from eqat_cli.formats.checkpoint import detect_layout

    detect_layout(path)
    inspect_path(path)


def make_tokenizer_dir(work: Path, src: Source) -> Path:
    files = _valid_model_files()
    name = src.choice(["tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"])
    seed = {"tokenizer_config.json": TOKENIZER_CONFIG, "tokenizer.json": TOKENIZER_JSON,
            "special_tokens_map.json": {"bos_token": "<s>"}}[name]
    files[name] = _json_mutant(seed, src)
    return _model_dir(work, files)


def make_index_dir(work: Path, src: Source) -> Path:
    files = _valid_model_files()
    index = {"metadata": {"total_size": 1}, "weight_map": {"lm_head.weight": "model.safetensors",
                                                           "model.norm.weight": "model.safetensors"}}
    files["model.safetensors.index.json"] = _json_mutant(index, src)
    return _model_dir(work, files)


_GGUF: list = []


def make_gguf(work: Path, src: Source) -> Path:
    if not _GGUF:
        _GGUF.append(gguf_seed())
    data, fields = _GGUF[0]
    f = work / "m.gguf"
    f.write_bytes(mutate_bytes(data, src, fields))
    return f


def read_gguf(path: Path) -> None:
    from eqat_cli.formats.describe import inspect_gguf

    inspect_gguf(path)


def make_calibration(work: Path, src: Source) -> Path:
    meta = {"format": "eqat-calibration", "format_version": 1, "tokenizer_fingerprint": "x", "seqlen": 4}
    header = {
        "__metadata__": {"json": json.dumps(meta), "format": "eqat-calibration"},
        "train": {"dtype": "I32", "shape": [2, 4], "data_offsets": [0, 32]},
        "val": {"dtype": "I32", "shape": [1, 4], "data_offsets": [32, 48]},
    }
    data = struct.pack("<12i", *range(12))
    f = work / "calib.safetensors"
    op = src.int(0, 2)
    if op == 0:  # the JSON inside the metadata
        header = json.loads(json.dumps(header))
        header["__metadata__"]["json"] = _json_mutant(meta, src).decode("utf-8", "replace")
        f.write_bytes(safetensors_bytes(header, data))
    else:
        f.write_bytes(mutate_safetensors(header, data, src))
    return f


def read_calibration(path: Path) -> None:
    from eqat_cli.train.calib import load_calibration

    load_calibration(path)


JSONL_SEED = b'{"text": "the cat sat"}\n{"text": "on the mat", "id": 2}\n\n{"text": "\\u00fc"}\n'
TEXT_SEED = "first paragraph line\nsecond line\n\n = Heading = \n\nü and € text\n".encode()


def make_jsonl(work: Path, src: Source) -> Path:
    f = work / "d.jsonl"
    if src.int(0, 1):
        lines = [json.loads(x) for x in JSONL_SEED.decode().splitlines() if x.strip()]
        i = src.int(0, len(lines) - 1)
        lines[i] = mutate_json_value(lines[i], src)
        f.write_bytes(b"\n".join(dump_json(x, src) for x in lines)[:MAX_INPUT])
    else:
        f.write_bytes(mutate_bytes(JSONL_SEED, src))
    return f


def make_text(work: Path, src: Source) -> Path:
    f = work / src.choice(["d.txt", "d.raw"])
    f.write_bytes(mutate_bytes(TEXT_SEED, src))
    return f


def read_data_file(path: Path) -> None:
    from eqat_cli.data import read_file
    from eqat_cli.readers import sniff_text

    if path.suffix != ".parquet":
        sniff_text(path, "data file")
    read_file(path)


_PARQUET: list = []


def make_parquet(work: Path, src: Source) -> Path:
    if not _PARQUET:
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.table({"text": ["the cat sat", "on the mat", "ü"], "n": [1, 2, 3]}), buf)
        data = buf.getvalue()
        # the footer length (last 8 bytes: length, "PAR1") and the magic
        _PARQUET.append((data, [(len(data) - 8, 4), (0, 4)]))
    data, fields = _PARQUET[0]
    f = work / "d.parquet"
    f.write_bytes(mutate_bytes(data, src, fields))
    return f


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("safetensors_header", make_safetensors, lambda p: __import__("eqat_cli.readers").readers.safetensors_header(p)),
    Target("safetensors_tensors", make_safetensors, read_safetensors_tensors),
    Target("model_shard", make_shard_dir, _check_dir),
    Target("config_json", make_config_dir, _check_dir),
    Target("gptq_config_detect", make_gptq_config_dir, read_layout),
    Target("tokenizer_files", make_tokenizer_dir, _check_dir),
    Target("safetensors_index", make_index_dir, _check_dir),
    Target("gguf", make_gguf, read_gguf),
    Target("calibration", make_calibration, read_calibration),
    Target("jsonl", make_jsonl, read_data_file),
    Target("text", make_text, read_data_file),
    Target("parquet", make_parquet, read_data_file),
]}


def run_one(target: Target, work: Path, src: Source) -> str | None:
    """Make one mutated input and read it: None when the reader succeeded or refused it in one
    line, else a description of the crash."""
    from eqat_cli.errors import EqatError

    path = target.make(work, src)
    try:
        target.read(path)
    except EqatError as e:
        msg = str(e)
        if "\n" in msg or not msg.strip():
            return f"EqatError not on one line: {msg!r}"
        return None
    except RecursionError:
        return "RecursionError"
    except Exception as e:  # noqa: BLE001 - anything else is the crash we look for
        return f"{type(e).__module__}.{type(e).__name__}: {str(e)[:200]}"
    return None


def classify_one(target: Target, work: Path, src: Source) -> tuple[str, str, int]:
    """``(status, detail, input bytes)``: status ``ok`` (read), ``refused`` (a one-line
    EqatError) or ``crash`` (anything else; detail says what)."""
    from eqat_cli.errors import EqatError

    path = target.make(work, src)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    try:
        target.read(path)
    except EqatError as e:
        msg = str(e)
        if "\n" in msg or not msg.strip():
            return "crash", f"EqatError not on one line: {msg[:200]!r}", size
        return "refused", "", size
    except RecursionError:
        return "crash", "RecursionError", size
    except Exception as e:  # noqa: BLE001
        return "crash", f"{type(e).__module__}.{type(e).__name__}: {str(e)[:200]}", size
    return "ok", "", size


def _selftest_make(work: Path, src: Source) -> Path:
    f = work / "selftest"
    f.write_bytes(bytes([src.int(0, 2)]))
    return f


def _selftest_read(path: Path) -> None:
    """Checks the bench's watchdog: 0 hangs, 1 allocates 300 MB, 2 raises a plain ValueError."""
    import time

    kind = path.read_bytes()[0]
    if kind == 0:
        time.sleep(60)
    elif kind == 1:
        blob = bytearray(300 << 20)
        time.sleep(2)
        del blob
    else:
        raise ValueError("selftest crash")


if __import__("os").environ.get("EQAT_FUZZ_SELFTEST") == "1":
    TARGETS["selftest"] = Target("selftest", _selftest_make, _selftest_read)


INSTRUCT_SEED = (b'{"instruction": "Say hi", "output": "hi"}\n'
                 b'{"instruction": "Add", "input": "1 and 2", "output": "3"}\n'
                 b'{"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"}]}\n')
_TOKENIZER: list = []


def make_instruct(work: Path, src: Source) -> Path:
    f = work / "i.jsonl"
    if src.int(0, 2):
        lines = [json.loads(x) for x in INSTRUCT_SEED.decode().splitlines()]
        i = src.int(0, len(lines) - 1)
        lines[i] = mutate_json_value(lines[i], src)
        f.write_bytes(b"\n".join(dump_json(x, src) for x in lines)[:MAX_INPUT])
    else:
        f.write_bytes(mutate_bytes(INSTRUCT_SEED, src))
    return f


def read_instruct(path: Path) -> None:
    """E2E-QP's instruction data (Alpaca and chat records) through a tiny byte-level tokenizer."""
    if not _TOKENIZER:
        from conftest import tiny_tokenizer

        _TOKENIZER.append(tiny_tokenizer())
    from eqat_cli.train.sft_data import load_instruct

    load_instruct(path, _TOKENIZER[0], seqlen=64)


TARGETS["instruct_jsonl"] = Target("instruct_jsonl", make_instruct, read_instruct)


def read_gguf_config(path: Path) -> None:
    """What ``eqat eval m.gguf`` reads first: transformers' GGUF parser building the config."""
    from transformers import AutoConfig

    from eqat_cli.model_files import hf_load

    hf_load(AutoConfig.from_pretrained, path.parent, "GGUF model", gguf_file=path.name)


TARGETS["gguf_transformers"] = Target("gguf_transformers", make_gguf, read_gguf_config)
