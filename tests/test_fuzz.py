"""Every reader of untrusted bytes, fuzzed with hypothesis (issue #29).

Each target (``tests/fuzz_targets.py``) mutates a valid file: bit flips, truncation, huge counts
and lengths over the length fields, inserted and duplicated chunks, structured JSON edits (wrong
types, NaN, huge numbers, deep nesting, long strings). The reader must succeed or raise an
``EqatError`` with a one-line message. Bounded and derandomized here (a fixed set of examples
per target, no example database); ``bench/fuzz_readers.py`` runs 10,000 inputs per target with
a hang and memory watchdog. The regression tests below are the crashes fuzzing found.
"""

from __future__ import annotations

import json
import signal
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_targets as ft
from eqat_cli.errors import BadInputError

EXAMPLES = {"safetensors_tensors": 40, "calibration": 40, "parquet": 40, "gguf": 60, "instruct_jsonl": 40, "gguf_transformers": 30}
DEFAULT_EXAMPLES = 60
WATCHDOG_S = 20  # one input taking this long is a hang


def _alarm(signum, frame):
    raise TimeoutError(f"one fuzz input took more than {WATCHDOG_S} s")


@pytest.mark.parametrize("name", sorted(ft.TARGETS))
def test_reader_survives_mutations(name, tmp_path):
    target = ft.TARGETS[name]

    @settings(max_examples=EXAMPLES.get(name, DEFAULT_EXAMPLES), derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(st.data())
    def run(data):
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(WATCHDOG_S)
        try:
            crash = ft.run_one(target, tmp_path, ft.HypothesisSource(data))
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        assert crash is None, f"{name}: {crash}"

    run()


def test_the_seeds_are_valid(tmp_path):
    """Unmutated, every target's seed reads without error (else fuzzing tests only refusals)."""

    class Identity(ft.Source):  # a source whose every mutation is a no-op is hard to build; check
        pass                    # the seeds through the readers directly instead

    header, data = ft.small_safetensors()
    f = tmp_path / "x.safetensors"
    f.write_bytes(ft.safetensors_bytes(header, data))
    ft.read_safetensors_tensors(f)
    d = ft._model_dir(tmp_path, ft._valid_model_files())
    ft._check_dir(d)
    g = tmp_path / "m.gguf"
    g.write_bytes(ft.gguf_seed()[0])
    ft.read_gguf(g)
    j = tmp_path / "d.jsonl"
    j.write_bytes(ft.JSONL_SEED)
    ft.read_data_file(j)
    t = tmp_path / "d.txt"
    t.write_bytes(ft.TEXT_SEED)
    ft.read_data_file(t)


# ---------------------------------------------------------------------- crashes fuzzing found


def test_safetensors_dtype_of_the_wrong_type(tmp_path):
    """Found by fuzzing: a dtype that is a list made ``dtype in DTYPES`` raise TypeError."""
    from eqat_cli.readers import safetensors_header

    f = tmp_path / "x.safetensors"
    f.write_bytes(ft.safetensors_bytes({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4)))
    with pytest.raises(BadInputError, match=r"x.safetensors: damaged safetensors file: tensor 'a' has unknown dtype"):
        safetensors_header(f)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000])
def test_json_nested_too_deeply(tmp_path, text):
    """Found by fuzzing: deep nesting made ``json.loads`` raise RecursionError (a traceback)."""
    from eqat_cli.readers import read_json, read_jsonl, safetensors_header

    f = tmp_path / "config.json"
    f.write_text(text)
    with pytest.raises(BadInputError, match=r"config.json: JSON file is nested too deeply to read"):
        read_json(f)
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "a"}\n' + text + "\n")
    with pytest.raises(BadInputError, match=r"d.jsonl:2: JSON nested too deeply"):
        list(read_jsonl(j))
    s = tmp_path / "x.safetensors"
    blob = text.encode()
    s.write_bytes(struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(BadInputError, match=r"x.safetensors: not a safetensors file \(its header is not JSON\)"):
        safetensors_header(s)


@pytest.mark.parametrize("value", [5, [1], "gptq"])
def test_quantization_config_not_an_object(tmp_path, value):
    """Found by fuzzing: ``quantization_config: 5`` crashed format detection with AttributeError."""
    from eqat_cli.formats.checkpoint import detect_layout

    d = ft._model_dir(tmp_path, ft._valid_model_files({**ft.TINY_CONFIG, "quantization_config": value}))
    with pytest.raises(BadInputError, match=r"config.json: quantization_config must be a JSON object"):
        detect_layout(d)


@pytest.mark.parametrize("weight_map, message", [
    ({"lm_head.weight": "y" * 5000}, r"shard name 'y+'... is too long for a file name"),
    ({"lm_head.weight": "../x.safetensors"}, r"shard name '../x.safetensors' points outside the model directory"),
    ({"lm_head.weight": "model-2.safetensors"}, r"lists shard model-2.safetensors, which is missing"),
    ([1], r"safetensors index has no weight_map of tensor -> file"),
])
def test_index_checks_are_the_same_for_every_reader(tmp_path, weight_map, message):
    """Found by fuzzing: a shard name longer than the file system allows raised OSError
    (ENAMETOOLONG) from ``Path.exists``. The index has one home (``model_files.shard_files``):
    the preflight check and the :class:`Checkpoint` reader refuse a bad index alike."""
    from eqat_cli.formats.checkpoint import Checkpoint
    from eqat_cli.model_files import check_model_weights

    files = ft._valid_model_files()
    files["model.safetensors.index.json"] = json.dumps({"weight_map": weight_map}).encode()
    d = ft._model_dir(tmp_path, files)
    for read in (check_model_weights, Checkpoint.open):
        with pytest.raises(BadInputError, match=r"model.safetensors.index.json: " + message):
            read(d)


@pytest.mark.parametrize("record", ['{"instruction": "a", "output": 5}', '{"instruction": ["a"], "output": "b"}',
                                    '{"instruction": "a", "input": {"x": 1}, "output": "b"}',
                                    '{"instruction": "a", "output": null}'])
def test_instruct_fields_of_the_wrong_type(tmp_path, record):
    """Found by fuzzing: a non-string Alpaca field reached the tokenizer, which raised ValueError."""
    from conftest import tiny_tokenizer
    from eqat_cli.train.sft_data import load_instruct

    f = tmp_path / "i.jsonl"
    f.write_text('{"instruction": "hi", "output": "ho"}\n' + record + "\n")
    with pytest.raises(BadInputError, match=r"i.jsonl:2: '(instruction|input|output)' must be a string, found"):
        load_instruct(f, tiny_tokenizer(), seqlen=64)


@pytest.mark.parametrize("layers", [2**32 - 1, 2**62])
def test_huge_layer_count_is_refused_without_allocating(tmp_path, layers):
    """Found by bench/fuzz_readers.py (seeds 3572, 4486 of config_json): ``num_hidden_layers``
    of 2^32 - 1 made the shape check build ``set(range(n))``: 10 s and > 2 GB per input."""
    import resource

    from eqat_cli.model_files import check_model_dir

    d = ft._model_dir(tmp_path, ft._valid_model_files({**ft.TINY_CONFIG, "num_hidden_layers": layers}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadInputError, match=rf"config.json: num_hidden_layers is {layers}, but the weights have no block 1"):
        check_model_dir(d)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB: no 2^32-set


@pytest.mark.parametrize("seed", [359, 450])
def test_gguf_counts_bounded_before_gguf_py_reads_them(tmp_path, seed):
    """Found by bench/fuzz_readers.py (gguf seeds 359, 450: one flipped bit in an array length):
    gguf-py's GGUFReader looped over 2^62 array elements (a hang, > 2 GB). ``check_gguf`` walks
    the header with every count bounded by the file size first."""
    from eqat_cli.formats.describe import inspect_gguf
    from eqat_cli.readers import check_gguf

    f = ft.TARGETS["gguf"].make(tmp_path, ft.RandomSource(seed))
    with pytest.raises(BadInputError, match=r"m.gguf: damaged GGUF file: array .* elements\) needs \d+ bytes"):
        check_gguf(f)
    with pytest.raises(BadInputError, match=r"m.gguf: damaged GGUF file"):
        inspect_gguf(f)


def test_gguf_header_claims(tmp_path):
    """The issue's file (2^40 tensors), an over-long string, too many dimensions; and the real
    SmolLM2 GGUF passes."""
    from eqat_cli.readers import check_gguf

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0) + bytes(64))
    with pytest.raises(BadInputError, match=r"m.gguf: damaged GGUF file: the header claims 1099511627776 tensors"):
        check_gguf(f)
    f.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**60) + b"key" + bytes(16))
    with pytest.raises(BadInputError, match=r"the key of metadata entry 0 claims 1152921504606846976 bytes"):
        check_gguf(f)
    data, _ = ft.gguf_seed()
    assert check_gguf(_write(tmp_path / "ok.gguf", data)) == {"version": 3, "tensors": 2, "metadata": 6}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("seed", [4872, 5561, 6492])
def test_parquet_with_invalid_utf8_strings(tmp_path, seed):
    """Found by bench/fuzz_readers.py (parquet seeds 4872, 5561, 6492): a damaged string column
    raised UnicodeDecodeError from pyarrow's ``to_pylist``, outside the error mapping."""
    from eqat_cli.data import read_file

    f = ft.TARGETS["parquet"].make(tmp_path, ft.RandomSource(seed))
    with pytest.raises(BadInputError, match=r"d.parquet: cannot read parquet"):
        read_file(f)


@pytest.mark.parametrize("seed", [2044, 3609, 6281])
def test_gguf_strings_that_are_not_utf8(tmp_path, seed):
    """Found by bench/fuzz_readers.py (gguf seeds 2044, 3609, 6281): a metadata string that is not
    UTF-8 raised UnicodeDecodeError from ``GGUFField.contents()``, outside the error mapping."""
    from eqat_cli.formats.describe import inspect_gguf

    f = ft.TARGETS["gguf"].make(tmp_path, ft.RandomSource(seed))
    with pytest.raises(BadInputError, match=r"m.gguf: not a readable GGUF file"):
        inspect_gguf(f)
