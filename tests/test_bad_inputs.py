"""Bad inputs across every subcommand: exit code 2, exactly one ``error:`` line, no traceback,
nothing left behind in the output location (issue #16).

The table (:data:`CASES`) runs in-process through the Typer app (fast); a few cases also run as
real processes (:func:`test_real_process_one_line`). Every numeric option of every command must
declare a validated range (:func:`test_every_numeric_option_declares_a_range`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO, build, save_tiny, tiny_llama_config, tiny_tokenizer

from eqat_cli.scheme import QuantScheme

TEXT = "\n\n".join(
    " ".join(["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn"][i % 3] for _ in range(40))
    for i in range(30)
)


# ---------------------------------------------------------------------- the world the cases damage


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Pristine inputs: a tiny full-precision model, a quantized one, a corpus, a calibration file."""
    from eqat_cli.formats.native import save_native
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry
    from eqat_cli.train.calib import build_windows, save_calibration

    root = tmp_path_factory.mktemp("world")
    fp = save_tiny(build(tiny_llama_config()), root / "fp")
    q = root / "q4"
    q.mkdir()
    model = rtn_quantize_model(build(tiny_llama_config(), seed=1), get_registry().architecture_for("llama"), QuantScheme(4, 32))
    save_native(model, tiny_tokenizer(), q, {"bits": 4, "group_size": 32, "architecture": "llama"})
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    calib = root / "calib.safetensors"
    save_calibration(build_windows(TEXT.split("\n\n"), tiny_tokenizer(), 4, 16, 1, 0, "corpus"), calib)
    return {"fp": fp, "q": q, "corpus": corpus, "calib": calib}


class Scratch:
    """Copies of the world's inputs that one case may damage, and the output location it must
    leave untouched."""

    def __init__(self, world: dict[str, Path], tmp: Path):
        self.world, self.tmp = world, tmp
        self.out = tmp / "out" / "result"  # the output location of every case

    def copy(self, name: str) -> Path:
        src = self.world[name]
        dst = self.tmp / f"in-{name}{src.suffix if src.is_file() else ''}"
        if not dst.exists():
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
        return dst

    def file(self, name: str, data: bytes | str) -> Path:
        p = self.tmp / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p

    # damaged models -------------------------------------------------------------------

    def model_with(self, edit: Callable[[Path], None], base: str = "fp") -> Path:
        d = self.copy(base)
        edit(d)
        return d

    def config(self, text: str, base: str = "fp") -> Path:
        return self.model_with(lambda d: (d / "config.json").write_text(text), base)

    def config_edit(self, fn: Callable[[dict], None], base: str = "fp") -> Path:
        def edit(d: Path) -> None:
            cfg = json.loads((d / "config.json").read_text())
            fn(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        return self.model_with(edit, base)

    def shard(self, fn: Callable[[bytes], bytes], base: str = "fp") -> Path:
        def edit(d: Path) -> None:
            f = d / "model.safetensors"
            f.write_bytes(fn(f.read_bytes()))
        return self.model_with(edit, base)

    def calib_bytes(self, fn: Callable[[bytes], bytes]) -> Path:
        p = self.tmp / "bad-calib.safetensors"
        p.write_bytes(fn(self.world["calib"].read_bytes()))
        return p


def _random(n: int) -> bytes:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8).numpy().tobytes()


def _remote_code(cfg: dict) -> None:
    cfg["model_type"] = "eqat_test_custom"
    cfg["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                       "AutoModelForCausalLM": "modeling_custom.CustomModel"}


def _index_with(weight_map_value: str):
    def edit(d: Path) -> None:
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": weight_map_value}}))
    return edit


def _calib_with_ids(s: Scratch, ids_max: int) -> Path:
    from eqat_cli.train.calib import Calibration, save_calibration, tokenizer_fingerprint

    meta = {"format": "eqat-calibration", "format_version": 1, "tokenizer_fingerprint": tokenizer_fingerprint(tiny_tokenizer())}
    p = s.tmp / "ids.safetensors"
    save_calibration(Calibration(torch.full((2, 8), ids_max), torch.zeros(1, 8, dtype=torch.int64), meta), p)
    return p


@dataclass
class Case:
    id: str
    args: Callable[[Scratch], list]  # the command line, built from the scratch copies
    expect: str  # a fragment of the error line
    json_out: bool = False  # commands without -o: --json OUT is the output location
    env: dict = field(default_factory=dict)


def bap(s: Scratch, model: Path | str | None = None, *extra) -> list:
    return ["block-ap", model or s.world["fp"], "--bits", "4", "--group", "32", "--calib", s.world["calib"],
            "--epochs", "1", "-o", s.out, *extra]


def cal(s: Scratch, model=None, dataset=None, *extra) -> list:
    return ["calibrate", model or s.world["fp"], "--dataset", dataset or s.world["corpus"], "--samples", "4",
            "--seqlen", "16", "--val-samples", "1", "-o", s.out, *extra]


def ev(s: Scratch, model=None, *extra) -> list:
    return ["eval", model or s.world["fp"], "--ppl", s.world["corpus"], "--seqlen", "16", "--limit", "1", *extra]


def e2e(s: Scratch, model=None, *extra) -> list:
    return ["e2e-qp", model or s.world["q"], "--dataset", s.world["corpus"], "--seqlen", "16", "--samples", "2",
            "--val-samples", "1", "--loss", "ntp", "--global-batch", "1", "-o", s.out, *extra]


def gen(s: Scratch, model=None, *extra) -> list:
    return ["generate", model or s.world["fp"], "-p", "the cat", "-n", "4", *extra]


def _no_tokenizer(d: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (d / name).unlink(missing_ok=True)


def pk(s: Scratch, model=None, fmt="gptq_v2", *extra) -> list:
    return ["pack", model or s.world["q"], "--format", fmt, "-o", s.out, *extra]


CASES = [
    # --- the seven inputs of the issue ---------------------------------------------------
    Case("eval-config-not-json", lambda s: ev(s, s.config('{"model_type": "llama",')), "not valid JSON", json_out=True),
    Case("eval-truncated-shard", lambda s: ev(s, s.shard(lambda b: b[:1000])), "truncated", json_out=True),
    Case("eval-random-shard", lambda s: ev(s, s.shard(lambda b: _random(len(b)))), "model.safetensors", json_out=True),
    Case("calibrate-binary-text", lambda s: cal(s, None, s.file("bin.txt", _random(3000))), "not UTF-8 text"),
    Case("pull-path-traversal", lambda s: ["pull", "../../etc/passwd", "--local-dir", s.out], "not a Hub repo id"),
    Case("block-ap-negative-lr", lambda s: bap(s, None, "--quant-lr", "-1"), "--quant-lr must be"),
    Case("block-ap-already-quantized", lambda s: bap(s, s.world["q"]), "already quantized"),
    # --- model directories -----------------------------------------------------------------
    Case("calibrate-model-missing", lambda s: cal(s, s.tmp / "nope"), "model not found"),
    Case("calibrate-no-config", lambda s: cal(s, s.model_with(lambda d: (d / "config.json").unlink())), "no config.json"),
    Case("calibrate-config-is-list", lambda s: cal(s, s.config("[1, 2]")), "must hold a JSON object"),
    Case("calibrate-config-no-model-type", lambda s: cal(s, s.config_edit(lambda c: c.pop("model_type"))), "no model_type"),
    Case("calibrate-config-binary", lambda s: cal(s, s.model_with(lambda d: (d / "config.json").write_bytes(_random(200)))),
         "config.json"),
    Case("calibrate-remote-code", lambda s: cal(s, s.config_edit(_remote_code)), "--trust-remote-code"),
    Case("calibrate-tokenizer-json-damaged", lambda s: cal(s, s.model_with(lambda d: (d / "tokenizer.json").write_text("{oops"))),
         "tokenizer.json"),
    Case("calibrate-tokenizer-remote-code", lambda s: cal(s, s.model_with(lambda d: (d / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tok.Custom", None]}})))), "--trust-remote-code"),
    Case("eval-header-promises-more-data", lambda s: ev(s, s.shard(lambda b: b[:-64])), "truncated", json_out=True),
    Case("eval-shard-padded", lambda s: ev(s, s.shard(lambda b: b + b"\0" * 16)), "after the last tensor", json_out=True),
    Case("eval-empty-shard", lambda s: ev(s, s.shard(lambda b: b"")), "only 0 bytes", json_out=True),
    Case("eval-not-gguf", lambda s: ev(s, s.file("m.gguf", _random(4096))), "not a GGUF file", json_out=True),
    Case("eval-index-not-json", lambda s: ev(s, s.model_with(lambda d: (d / "model.safetensors.index.json").write_text("{"))),
         "not valid JSON", json_out=True),
    Case("block-ap-index-missing-shard", lambda s: bap(s, s.model_with(_index_with("model-00002-of-00002.safetensors"))),
         "missing"),
    Case("block-ap-index-escapes-dir", lambda s: bap(s, s.model_with(_index_with("../../etc/passwd"))), "outside the model"),
    Case("block-ap-truncated-shard", lambda s: bap(s, s.shard(lambda b: b[: len(b) // 2])), "truncated"),
    Case("pack-random-shard", lambda s: pk(s, s.shard(lambda b: _random(len(b)), base="q")), "model.safetensors"),
    Case("pack-full-precision", lambda s: pk(s, s.world["fp"]), "full-precision"),
    # --- config sanity (issue #29): one line naming the field, before any model is built ---------
    Case("eval-config-negative-layers-zero-vocab",
         lambda s: ev(s, s.config_edit(lambda c: c.update(num_hidden_layers=-3, vocab_size=0))),
         "must be a positive integer", json_out=True),
    Case("eval-config-negative-layers", lambda s: ev(s, s.config_edit(lambda c: c.update(num_hidden_layers=-3))),
         "num_hidden_layers must be a positive integer, found -3", json_out=True),
    Case("eval-config-vocab-zero", lambda s: ev(s, s.config_edit(lambda c: c.update(vocab_size=0))),
         "vocab_size must be a positive integer, found 0", json_out=True),
    Case("eval-config-heads-do-not-divide-hidden", lambda s: ev(s, s.config_edit(
        lambda c: (c.pop("head_dim", None), c.update(num_attention_heads=5, num_key_value_heads=1)))),
         "hidden_size 64 is not a multiple of num_attention_heads 5", json_out=True),
    Case("eval-config-kv-heads-do-not-divide-heads", lambda s: ev(s, s.config_edit(lambda c: c.update(num_key_value_heads=3))),
         "num_attention_heads 4 is not a multiple of num_key_value_heads 3", json_out=True),
    Case("eval-config-eos-beyond-vocab", lambda s: ev(s, s.config_edit(lambda c: c.update(eos_token_id=5000))),
         "eos_token_id 5000 is outside the vocabulary (vocab_size 272)", json_out=True),
    Case("eval-config-intermediate-string", lambda s: ev(s, s.config_edit(lambda c: c.update(intermediate_size="96"))),
         "intermediate_size must be a positive integer", json_out=True),
    Case("eval-config-max-positions-zero", lambda s: ev(s, s.config_edit(lambda c: c.update(max_position_embeddings=0))),
         "max_position_embeddings must be a positive integer", json_out=True),
    Case("eval-config-eps-nan", lambda s: ev(s, s.config_edit(lambda c: c.update(rms_norm_eps=float("nan")))),
         "rms_norm_eps must be a finite positive number", json_out=True),
    Case("eval-config-vocab-vs-embedding", lambda s: ev(s, s.config_edit(lambda c: c.update(vocab_size=300))),
         "model.embed_tokens.weight has shape [272, 64], but", json_out=True),
    Case("eval-config-more-layers-than-weights", lambda s: ev(s, s.config_edit(lambda c: c.update(num_hidden_layers=3))),
         "num_hidden_layers is 3, but the weights have no block 2", json_out=True),
    Case("eval-config-fewer-layers-than-weights", lambda s: ev(s, s.config_edit(lambda c: c.update(num_hidden_layers=1))),
         "num_hidden_layers is 1, but the weights hold block 1", json_out=True),
    Case("eval-config-hidden-vs-weights", lambda s: ev(s, s.config_edit(
        lambda c: c.update(hidden_size=32, num_attention_heads=2, num_key_value_heads=1))),
         "has shape [272, 64], but", json_out=True),
    Case("block-ap-config-negative-layers", lambda s: bap(s, s.config_edit(lambda c: c.update(num_hidden_layers=-3))),
         "num_hidden_layers must be a positive integer"),
    Case("calibrate-config-vocab-zero", lambda s: cal(s, s.config_edit(lambda c: c.update(vocab_size=0))),
         "vocab_size must be a positive integer"),
    Case("pack-packed-more-layers-than-weights", lambda s: pk(s, s.config_edit(lambda c: c.update(num_hidden_layers=4), base="q")),
         "num_hidden_layers is 4, but the weights have no block 2"),
    Case("e2e-qp-config-heads", lambda s: e2e(s, s.config_edit(lambda c: c.update(num_attention_heads=3), base="q")),
         "num_attention_heads 3 is not a multiple of num_key_value_heads 2"),
    # --- calibration files -------------------------------------------------------------------
    Case("block-ap-calib-truncated", lambda s: ["block-ap", s.world["fp"], "--calib", s.calib_bytes(lambda b: b[:-10]),
                                                "-o", s.out], "truncated"),
    Case("block-ap-calib-garbage", lambda s: ["block-ap", s.world["fp"], "--calib", s.calib_bytes(lambda b: _random(500)),
                                              "-o", s.out], "calibration file"),
    Case("block-ap-calib-is-a-model", lambda s: ["block-ap", s.world["fp"], "--calib", s.world["fp"] / "model.safetensors",
                                                 "-o", s.out], "not an eqat calibration file"),
    Case("block-ap-calib-ids-beyond-vocab", lambda s: ["block-ap", s.world["fp"], "--calib", _calib_with_ids(s, 5000),
                                                       "-o", s.out], "beyond the vocabulary"),
    Case("block-ap-calib-and-dataset", lambda s: bap(s, None, "--dataset", "c4"), "exactly one of"),
    # --- data files --------------------------------------------------------------------------
    Case("calibrate-nul-bytes", lambda s: cal(s, None, s.file("nul.txt", "a b c\0" * 100)), "NUL bytes"),
    Case("calibrate-jsonl-bad-line", lambda s: cal(s, None, s.file("d.jsonl", '{"text": "a"}\n{"text": \n')), "d.jsonl:2"),
    Case("calibrate-jsonl-no-text", lambda s: cal(s, None, s.file("d.jsonl", '{"body": "a"}\n')), "no 'text' field"),
    Case("calibrate-jsonl-array-line", lambda s: cal(s, None, s.file("d.jsonl", '[1, 2]\n')), "expected a JSON object"),
    Case("calibrate-parquet-garbage", lambda s: cal(s, None, s.file("d.parquet", _random(300))), "parquet"),
    Case("calibrate-data-missing", lambda s: cal(s, None, s.tmp / "none.txt"), "not found"),
    Case("calibrate-data-suffix", lambda s: cal(s, None, s.file("d.csv", "a,b\n")), "unsupported data file type"),
    Case("calibrate-unknown-set", lambda s: cal(s, None, "nosuchset"), "nosuchset"),
    Case("calibrate-offline-hub-set", lambda s: cal(s, None, "wikitext2"), "--data-dir", env={"HF_HUB_OFFLINE": "1"}),
    Case("calibrate-corpus-too-short", lambda s: cal(s, None, None, "--samples", "100000"), "too short"),
    Case("calibrate-output-dir-is-file", lambda s: cal(s)[:-2] + ["-o", s.file("f", "x") / "sub.safetensors"], "is a file"),
    Case("eval-ppl-binary", lambda s: ["eval", s.world["fp"], "--ppl", s.file("b.raw", _random(2000)), "--limit", "1"],
         "not UTF-8 text", json_out=True),
    Case("e2e-qp-dataset-binary", lambda s: e2e(s)[:2] + ["--dataset", s.file("b.txt", _random(999))] + e2e(s)[4:],
         "not UTF-8 text"),
    Case("e2e-qp-instruct-binary", lambda s: e2e(s)[:2] + ["--dataset", s.file("i.jsonl", _random(999))] + e2e(s)[4:]
         + ["--format", "instruct"], "not UTF-8 text"),
    Case("e2e-qp-instruct-bad-line", lambda s: e2e(s)[:2] + ["--dataset", s.file("i.jsonl", '{"prompt": "a"}\n{oops\n')]
         + e2e(s)[4:] + ["--format", "instruct"], "i.jsonl:2"),
    # --- numeric option ranges -----------------------------------------------------------------
    Case("block-ap-lr-nan", lambda s: bap(s, None, "--quant-lr", "nan"), "--quant-lr must be"),
    Case("block-ap-weight-lr-inf", lambda s: bap(s, None, "--weight-lr", "inf"), "--weight-lr must be"),
    Case("block-ap-epochs-negative", lambda s: bap(s, None, "--epochs", "-1"), "--epochs must be"),
    Case("block-ap-batch-zero", lambda s: bap(s, None, "--batch-size", "0"), "--batch-size must be"),
    Case("block-ap-gptq-damp", lambda s: bap(s, None, "--gptq-damp", "1.5"), "--gptq-damp must be"),
    Case("block-ap-min-lr-factor", lambda s: bap(s, None, "--min-lr-factor", "0.5"), "--min-lr-factor must be"),
    Case("block-ap-bits-5", lambda s: bap(s, None, "--bits", "5"), "--bits must be"),
    Case("block-ap-group-1", lambda s: bap(s, None, "--group", "1"), "--group must be"),
    Case("block-ap-max-grad-norm-zero", lambda s: bap(s, None, "--max-grad-norm", "0"), "--max-grad-norm must be"),
    Case("block-ap-bits-not-a-number", lambda s: bap(s, None, "--bits", "two"), "--bits"),
    Case("block-ap-unknown-option", lambda s: bap(s, None, "--learning-rate", "1"), "No such option"),
    Case("block-ap-unknown-loss", lambda s: bap(s, None, "--loss", "l1"), "loss"),
    Case("calibrate-samples-zero", lambda s: cal(s, None, None, "--samples", "0"), "--samples must be"),
    Case("calibrate-seqlen-one", lambda s: cal(s, None, None, "--seqlen", "1"), "--seqlen must be"),
    Case("calibrate-seed-negative", lambda s: cal(s, None, None, "--seed", "-3"), "--seed must be"),
    Case("e2e-qp-lr-negative", lambda s: e2e(s, None, "--lr", "-1e-5"), "--lr must be"),
    Case("e2e-qp-warmup-ratio", lambda s: e2e(s, None, "--warmup-ratio", "1"), "--warmup-ratio must be"),
    Case("e2e-qp-global-batch-zero", lambda s: e2e(s, None, "--global-batch", "0"), "--global-batch must be"),
    Case("e2e-qp-epochs-zero", lambda s: e2e(s, None, "--epochs", "0"), "--epochs must be"),
    Case("e2e-qp-save-steps-zero", lambda s: e2e(s, None, "--save-steps", "0"), "--save-steps must be"),
    Case("e2e-qp-bad-format", lambda s: e2e(s, None, "--format", "chat"), "--format"),
    Case("e2e-qp-full-precision", lambda s: e2e(s, s.world["fp"]), "not quantized"),
    Case("eval-seqlen-one", lambda s: ev(s, None, "--seqlen", "1"), "--seqlen must be", json_out=True),
    Case("eval-limit-zero", lambda s: ev(s, None, "--limit", "0"), "--limit must be", json_out=True),
    Case("eval-batch-zero", lambda s: ev(s, None, "--batch-size", "0"), "--batch-size must be", json_out=True),
    Case("eval-unknown-ppl-set", lambda s: ["eval", s.world["fp"], "--ppl", "nosuchset"], "nosuchset", json_out=True),
    Case("bench-bits", lambda s: ["bench", "--bits", "6"], "--bits must be", json_out=True),
    Case("bench-group", lambda s: ["bench", "--group", "0"], "--group must be", json_out=True),
    Case("bench-repeats", lambda s: ["bench", "--repeats", "1"], "--repeats must be", json_out=True),
    Case("bench-threads", lambda s: ["bench", "--threads", "0"], "--threads must be", json_out=True),
    Case("bench-shapes-missing", lambda s: ["bench", "--shapes", str(s.tmp / "nope")], "--shapes", json_out=True),
    Case("bench-shapes-config-damaged", lambda s: ["bench", "--shapes", str(s.config("{"))], "not valid JSON", json_out=True),
    Case("generate-empty-prompt", lambda s: ["generate", s.world["fp"], "-p", "  \n "], "the prompt is empty", json_out=True),
    Case("generate-prompt-too-long", lambda s: gen(s)[:2] + ["-p", "the cat sat " * 30, "-n", "8"],
         "context of 256 tokens", json_out=True),
    Case("generate-no-tokenizer", lambda s: gen(s, s.model_with(_no_tokenizer, base="q")), "has no tokenizer", json_out=True),
    Case("generate-chat-no-template", lambda s: gen(s, None, "--chat"), "no chat template", json_out=True),
    Case("generate-temperature-negative", lambda s: gen(s, None, "-t", "-0.5"), "--temperature must be", json_out=True),
    Case("generate-top-p-zero", lambda s: gen(s, None, "--top-p", "0"), "--top-p must be", json_out=True),
    Case("generate-max-new-tokens-zero", lambda s: gen(s, None, "-n", "0"), "--max-new-tokens must be", json_out=True),
    Case("generate-seed-too-big", lambda s: gen(s, None, "--seed", str(2**32)), "--seed must be", json_out=True),
    Case("plugins-bits", lambda s: ["plugins", "--bits", "7"], "--bits must be", json_out=True),
    # --- outputs, formats, hub ids -----------------------------------------------------------------
    Case("pack-unknown-format", lambda s: pk(s, None, "awq"), "unknown format"),
    Case("pack-gguf-needs-file-name", lambda s: pk(s, None, "gguf"), ".gguf"),
    Case("pull-absolute-path", lambda s: ["pull", "/etc/passwd", "--local-dir", s.out], "not a Hub repo id"),
    Case("pull-three-parts", lambda s: ["pull", "a/b/c", "--local-dir", s.out], "not a Hub repo id"),
    Case("pull-dotdot-name", lambda s: ["pull", "owner/..", "--local-dir", s.out], "not a Hub repo id"),
    Case("pull-bad-revision", lambda s: ["pull", "owner/name", "--revision", "../x", "--local-dir", s.out], "--revision"),
    Case("pull-offline", lambda s: ["pull", "owner/name", "--local-dir", s.out], "offline", env={"HF_HUB_OFFLINE": "1"}),
]


def _leftovers(out: Path) -> list[Path]:
    """Anything a run created at or next to the output location."""
    parent = out.parent
    if not parent.exists():
        return []
    return sorted(parent.iterdir())


def run_case(case: Case, world, tmp_path, monkeypatch):
    from eqat_cli.cli.app import build_app

    s = Scratch(world, tmp_path)
    args = [str(a) for a in case.args(s)]
    if case.json_out:
        args += ["--json", str(s.out)]
    s.out.parent.mkdir(parents=True, exist_ok=True)
    monkeypatch.delenv("EQAT_DEBUG", raising=False)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    if "HF_HUB_OFFLINE" in case.env:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", case.env["HF_HUB_OFFLINE"] == "1")
    t0 = time.time()
    res = CliRunner().invoke(build_app(), args, prog_name="eqat")
    return s, args, res, time.time() - t0


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, world, tmp_path, monkeypatch):
    s, args, res, seconds = run_case(case, world, tmp_path, monkeypatch)
    out = res.output
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert res.exit_code == 2, (args, out, res.exception)
    assert isinstance(res.exception, SystemExit), (args, res.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, out)
    assert "Traceback" not in out
    assert case.expect in lines[0], (case.expect, lines[0])
    if os.environ.get("EQAT_SHOW_CASES"):
        print(f"\n{case.id}: {lines[0]}")
    assert _leftovers(s.out) == [], (args, _leftovers(s.out))
    assert seconds < 60, f"{case.id} took {seconds:.0f} s"


def test_at_least_40_cases_over_every_command():
    from eqat_cli.cli.app import COMMANDS

    commands = [name for name, _, _ in COMMANDS]
    covered = {next(cmd for cmd in commands if c.id.startswith(cmd + "-")) for c in CASES}
    assert len(CASES) >= 40 and covered == set(commands)
    assert len({c.id for c in CASES}) == len(CASES)


def test_existing_output_is_untouched(world, tmp_path):
    """A refused run must not replace or remove what is already there."""
    from eqat_cli.cli.app import build_app

    out = tmp_path / "calib.safetensors"
    out.write_text("keep me")
    res = CliRunner().invoke(build_app(), [str(a) for a in cal(Scratch(world, tmp_path))[:-2] + ["-o", out]])
    assert res.exit_code == 2 and "already exists" in res.output
    assert out.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [out]


def test_every_numeric_option_declares_a_range():
    """The generic mechanism: each int/float option carries a ``Range`` (see eqat_cli/cli/common.py),
    checked by ``EqatCommand`` before the command runs: every built-in command is one."""
    import typer

    from eqat_cli.cli.app import COMMANDS, build_app
    from eqat_cli.cli.common import EqatCommand, numeric_options

    group = typer.main.get_command(build_app())
    seen = 0
    for name, fn, _ in COMMANDS:
        assert isinstance(group.commands[name], EqatCommand), f"eqat {name} does not check its Ranges"
        for opt in numeric_options(fn):
            assert opt.declared, f"eqat {name} {opt.flag}: numeric option without a Range(...)"
            seen += 1
    assert seen >= 40


def test_range_checks():
    from eqat_cli.cli.common import GROUP, LEARNING_RATE, Range

    assert Range(gt=0).ok(1e-9) and not Range(gt=0).ok(0.0) and not Range(gt=0).ok(float("nan"))
    assert not LEARNING_RATE.ok(float("inf")) and LEARNING_RATE.ok(0.0) and not LEARNING_RATE.ok(-1e-4)
    assert GROUP.ok(-1) and GROUP.ok(64) and not GROUP.ok(0) and not GROUP.ok(-2)
    assert GROUP.describe() == ">= 2 or -1"


def test_trust_remote_code_flag_passes_the_gate(world, tmp_path, monkeypatch):
    """Refused without the flag (previous table case); with --trust-remote-code the gate opens
    (calibrate only needs the tokenizer, which has no code of its own here)."""
    from eqat_cli import model_files
    from eqat_cli.cli.app import build_app

    s = Scratch(world, tmp_path)
    m = s.config_edit(_remote_code)
    res = CliRunner().invoke(build_app(), [str(a) for a in cal(s, m)] + ["--trust-remote-code"])
    assert res.exit_code == 0, res.output
    assert s.out.is_file()
    assert model_files.trust_remote_code() is False  # the flag does not outlive the command
    monkeypatch.setenv(model_files.TRUST_REMOTE_CODE_ENV, "1")
    assert model_files.trust_remote_code() is True


@pytest.mark.parametrize("case_id", ["eval-config-not-json", "calibrate-binary-text", "pull-path-traversal",
                                     "block-ap-negative-lr", "block-ap-already-quantized"])
def test_real_process_one_line(case_id, world, tmp_path):
    """The issue's cases as real processes: stderr+stdout is exactly one line, exit 2."""
    case = next(c for c in CASES if c.id == case_id)
    s = Scratch(world, tmp_path)
    args = [str(a) for a in case.args(s)] + (["--json", str(s.out)] if case.json_out else [])
    s.out.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "EQAT_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "kernels"), env.get("PYTHONPATH", "")])
    env["TRANSFORMERS_VERBOSITY"] = "error"
    p = subprocess.run([sys.executable, "-m", "eqat_cli", *args], capture_output=True, text=True, env=env, timeout=120)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and case.expect in lines[0], lines
    assert _leftovers(s.out) == []


def test_linear_shapes_checked_against_the_config(tmp_path):
    """Block linears: the first group reads hidden_size, one group reads one width, the last
    layer writes hidden_size; the line names the tensor, its shard and the config."""
    from safetensors.torch import save_file

    from eqat_cli.errors import BadInputError
    from eqat_cli.model_files import check_weight_shapes

    cfg = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1}

    def shard(**shapes):
        base = {"model.embed_tokens.weight": (10, 8), "model.layers.0.self_attn.q_proj.weight": (8, 8),
                "model.layers.0.self_attn.k_proj.weight": (4, 8), "model.layers.0.self_attn.v_proj.weight": (4, 8),
                "model.layers.0.self_attn.o_proj.weight": (8, 8), "model.layers.0.mlp.gate_proj.weight": (12, 8),
                "model.layers.0.mlp.up_proj.weight": (12, 8), "model.layers.0.mlp.down_proj.weight": (8, 12)}
        base.update({k.replace("__", "."): v for k, v in shapes.items()})
        f = tmp_path / "model.safetensors"
        save_file({k: torch.zeros(v) for k, v in base.items()}, str(f))
        return [f]

    check_weight_shapes(cfg, "config.json", shard())  # consistent: passes
    with pytest.raises(BadInputError, match=r"model.safetensors: model.layers.0.self_attn.k_proj.weight reads 6 "
                                            r"features, but config.json says hidden_size 8"):
        check_weight_shapes(cfg, "config.json", shard(**{"model__layers__0__self_attn__k_proj__weight": (4, 6)}))
    with pytest.raises(BadInputError, match=r"mlp.up_proj.weight reads 9 features, the other layers of its group 8"):
        check_weight_shapes(cfg, "config.json", shard(**{"model__layers__0__mlp__up_proj__weight": (12, 9)}))
    with pytest.raises(BadInputError, match=r"down_proj.weight writes 7 features, but config.json says hidden_size 8"):
        check_weight_shapes(cfg, "config.json", shard(**{"model__layers__0__mlp__down_proj__weight": (7, 12)}))
    # An architecture no plugin describes: only the generic embedding check.
    check_weight_shapes({**cfg, "model_type": "nosuch"}, "config.json",
                        shard(**{"model__layers__0__mlp__down_proj__weight": (7, 12)}))


def test_config_sanity_on_the_resolver_path(world, tmp_path):
    """A model that skips the CLI's preflight (library callers, Hub downloads) is checked by
    ``models.resolve`` before transformers builds anything."""
    from eqat_cli.errors import BadInputError
    from eqat_cli.models import resolve

    d = Scratch(world, tmp_path).config_edit(lambda c: c.update(num_hidden_layers=-3, vocab_size=0))
    with pytest.raises(BadInputError, match=r"config.json: vocab_size must be a positive integer, found 0"):
        resolve(str(d), device="cpu", require_arch=False)
    d2 = tmp_path / "two"
    shutil.copytree(world["fp"], d2)
    cfg = json.loads((d2 / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    (d2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInputError, match=r"num_hidden_layers is 5, but the weights have no block 2"):
        resolve(str(d2), device="cpu")


def test_messages_name_the_file_never_dot(world, tmp_path, monkeypatch):
    """Issue #29: a file in the working directory is named by its name, not by its directory
    (``.``): a GGUF header that claims 2^40 tensors, a remote-code config read as ``.``, and an
    empty model spec."""
    import struct

    from eqat_cli import model_files
    from eqat_cli.cli.app import build_app

    monkeypatch.chdir(tmp_path)
    Path("m.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0) + bytes(64))
    Path("c.txt").write_text(TEXT)
    res = CliRunner().invoke(build_app(), ["eval", "m.gguf", "--ppl", "c.txt", "--limit", "1"])
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: m.gguf: "), lines[0]

    d = Scratch(world, tmp_path).config_edit(_remote_code)
    monkeypatch.chdir(d)
    with pytest.raises(model_files.BadInputError) as e:
        model_files.read_model_config(".")
    assert str(e.value).startswith("config.json: model type 'eqat_test_custom' needs"), str(e.value)

    res = CliRunner().invoke(build_app(), ["eval", "", "--ppl", str(tmp_path / "c.txt")])
    assert res.exit_code == 2 and "error: the model spec is empty" in res.output, res.output
