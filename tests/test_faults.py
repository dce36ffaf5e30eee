"""Faults (issue #16): disk full during Block-AP, E2E-QP and pack, SIGKILL during pack, no network.

Disk full is a real small file system (a tmpfs mounted for the test, when this process may
mount) and, always, an ``OSError(ENOSPC)`` injected at the write. Either way the run stops with
one ``error: disk full ...`` line and exit code 1, keeps every finished block, and a re-run after
space is freed gives exactly the result of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO, build, save_tiny, tiny_llama_config, tiny_tokenizer

from eqat_cli.scheme import QuantScheme

TEXT = "\n\n".join(
    " ".join(["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn"][i % 3] for _ in range(40))
    for i in range(30)
)
N_LAYERS = 3
PAGE = 4096


def invoke(*args):
    from eqat_cli.cli.app import build_app

    return CliRunner().invoke(build_app(), [str(a) for a in args], prog_name="eqat")


def tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb) and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def error_lines(output: str) -> list[str]:
    assert "Traceback" not in output
    return [ln for ln in output.splitlines() if ln.startswith("error:")]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 3-block full-precision model, its calibration file, a quantized model, and reference
    outputs written on a roomy disk."""
    from eqat_cli.formats.native import save_native
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry
    from eqat_cli.train.calib import build_windows, save_calibration

    root = tmp_path_factory.mktemp("faults")
    fp = save_tiny(build(tiny_llama_config(num_hidden_layers=N_LAYERS)), root / "fp")
    calib = root / "calib.safetensors"
    save_calibration(build_windows(TEXT.split("\n\n"), tiny_tokenizer(), 4, 16, 1, 0, "corpus"), calib)
    q = root / "q4"
    q.mkdir()
    model = rtn_quantize_model(build(tiny_llama_config(), seed=1), get_registry().architecture_for("llama"), QuantScheme(4, 32))
    save_native(model, tiny_tokenizer(), q, {"bits": 4, "group_size": 32, "architecture": "llama"})
    w = {"fp": fp, "calib": calib, "q": q, "root": root}
    res = invoke(*block_ap_args(w, root / "bap-ref"))
    assert res.exit_code == 0, res.output
    res = invoke("pack", q, "--format", "gptq_v2", "-o", root / "pack-ref")
    assert res.exit_code == 0, res.output
    return w


def block_ap_args(w, out: Path) -> list:
    return ["block-ap", w["fp"], "--bits", "2", "--group", "32", "--calib", w["calib"], "--epochs", "1",
            "--batch-size", "2", "-o", out]


# ---------------------------------------------------------------------- a small file system


@contextlib.contextmanager
def tmpfs(path: Path, size: int = 8 << 20):
    """Mount a tmpfs of ``size`` bytes at ``path``; yields None where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    ok = False
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"):
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True).returncode == 0
    try:
        yield path if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def leave_free(fs: Path, free: int) -> Path:
    """Fill ``fs`` so that about ``free`` bytes stay available; returns the filler file."""
    st = os.statvfs(fs)
    avail = st.f_bavail * st.f_frsize
    filler = fs / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, avail - free))
    return filler


def pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


@contextlib.contextmanager
def enospc_at_save(monkeypatch, fail_call: int):
    """Raise ENOSPC from the ``fail_call``-th safetensors write (1-based), as a full disk would."""
    import safetensors.torch as st

    real, calls = st.save_file, {"n": 0}

    def save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == fail_call:
            with open(filename, "wb") as fh:  # half a file, then the disk is full
                fh.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", save_file)
    yield calls
    monkeypatch.setattr(st, "save_file", real)


# ---------------------------------------------------------------------- Block-AP


def _check_block_ap_stopped(res, out: Path) -> list[int]:
    assert res.exit_code == 1, res.output
    errs = error_lines(res.output)
    assert len(errs) == 1 and errs[0].startswith("error: disk full while writing"), res.output
    assert "re-run" in errs[0]
    assert not out.exists()
    work = out.with_name(out.name + ".partial")
    finished = json.loads((work / "blockap_state.json").read_text())["finished"]
    assert 1 <= len(finished) < N_LAYERS
    for i in finished:  # every finished block is a complete, readable file
        from eqat_cli.readers import check_safetensors

        assert check_safetensors(work / f"model-{i + 1:05d}-of-{N_LAYERS + 1:05d}.safetensors")
    assert not [p for p in work.iterdir() if p.name.startswith(".")], "temporary file left behind"
    return finished


def test_block_ap_disk_full_injected_keeps_blocks_and_resumes(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with enospc_at_save(monkeypatch, fail_call=3):  # blocks 0 and 1 are written, block 2 is not
        res = invoke(*block_ap_args(inputs, out))
    assert _check_block_ap_stopped(res, out) == [0, 1]
    res = invoke(*block_ap_args(inputs, out))
    assert res.exit_code == 0, res.output
    assert "resumed after 2 finished blocks" in res.output
    assert_same_tensors(out, inputs["root"] / "bap-ref")


def test_block_ap_on_a_full_tmpfs_keeps_blocks_and_resumes(inputs, tmp_path):
    ref = inputs["root"] / "bap-ref"
    block = [pages((ref / f"model-{i + 1:05d}-of-{N_LAYERS + 1:05d}.safetensors").stat().st_size) for i in range(N_LAYERS)]
    with tmpfs(tmp_path / "fs") as fs:
        if fs is None:
            pytest.skip("cannot mount a tmpfs here (the injected-ENOSPC test covers the same path)")
        out = fs / "out"
        # Room for blocks 0 and 1 and the resume state (written atomically: two copies at once).
        filler = leave_free(fs, block[0] + block[1] + 2 * PAGE + PAGE // 2)
        res = invoke(*block_ap_args(inputs, out))
        _check_block_ap_stopped(res, out)
        filler.unlink()
        res = invoke(*block_ap_args(inputs, out))
        assert res.exit_code == 0, res.output
        assert_same_tensors(out, ref)


# ---------------------------------------------------------------------- E2E-QP


def e2e_args(w, out: Path) -> list:
    corpus = w["root"] / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    return ["e2e-qp", w["q"], "--dataset", corpus, "--seqlen", "16", "--samples", "8", "--val-samples", "2",
            "--loss", "ntp", "--lr", "5e-3", "--global-batch", "1", "--batch-size", "1", "--save-steps", "2",
            "--eval-steps", "40", "--no-gradient-checkpointing", "--device", "cpu", "-o", out]


def test_e2e_qp_disk_full_keeps_saved_steps_and_resumes(inputs, tmp_path, monkeypatch):
    """ENOSPC at the third resume-state write (step 6): one line, exit 1, the step-4 state is kept,
    and the re-run resumes from it to the uninterrupted result."""
    import safetensors.torch as st

    from eqat_cli.train.e2e_qp import STATE_KEY

    ref = tmp_path / "ref"
    res = invoke(*e2e_args(inputs, ref))
    assert res.exit_code == 0, res.output
    out = tmp_path / "run"
    real, calls = st.save_file, {"n": 0}

    def save_file(tensors, filename, metadata=None):
        if "e2e_state" in str(filename):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", save_file)
    res = invoke(*e2e_args(inputs, out))
    monkeypatch.setattr(st, "save_file", real)
    assert res.exit_code == 1, res.output
    errs = error_lines(res.output)
    assert len(errs) == 1 and errs[0].startswith("error: disk full while writing"), res.output
    work = tmp_path / "run.partial"
    assert not out.exists() and not [p for p in work.iterdir() if p.name.startswith(".")]
    from safetensors import safe_open

    with safe_open(str(work / "e2e_state.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[STATE_KEY])["step"] == 4
    res = invoke(*e2e_args(inputs, out), "--json", tmp_path / "again.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "again.json").read_text())["resumed_from_step"] == 4
    assert_same_tensors(out, ref)
    assert_same_tensors(out / "last", ref / "last")


# ---------------------------------------------------------------------- pack


def _check_pack_stopped(res, parent: Path, out: Path) -> None:
    assert res.exit_code == 1, res.output
    errs = error_lines(res.output)
    assert len(errs) == 1 and errs[0].startswith("error: disk full while writing"), res.output
    assert not out.exists()
    assert [p.name for p in parent.iterdir() if p.name != "filler"] == [], "pack left files behind"


def test_pack_disk_full_injected_leaves_nothing_then_succeeds(inputs, tmp_path, monkeypatch):
    out = tmp_path / "dest" / "gptq"
    out.parent.mkdir()
    with enospc_at_save(monkeypatch, fail_call=1):
        res = invoke("pack", inputs["q"], "--format", "gptq_v2", "-o", out)
    _check_pack_stopped(res, out.parent, out)
    res = invoke("pack", inputs["q"], "--format", "gptq_v2", "-o", out)
    assert res.exit_code == 0, res.output
    assert_same_tensors(out, inputs["root"] / "pack-ref")


def test_pack_on_a_full_tmpfs_leaves_nothing_then_succeeds(inputs, tmp_path):
    with tmpfs(tmp_path / "fs") as fs:
        if fs is None:
            pytest.skip("cannot mount a tmpfs here (the injected-ENOSPC test covers the same path)")
        out = fs / "gptq"
        filler = leave_free(fs, 3 * PAGE)
        res = invoke("pack", inputs["q"], "--format", "gptq_v2", "-o", out)
        _check_pack_stopped(res, fs, out)
        filler.unlink()
        res = invoke("pack", inputs["q"], "--format", "gptq_v2", "-o", out)
        assert res.exit_code == 0, res.output
        assert_same_tensors(out, inputs["root"] / "pack-ref")


CHILD = """
import os, sys, time
import safetensors.torch as st

real = st.save_file

def save_file(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    open(os.environ["EQAT_TEST_MARK"], "w").close()  # one file is written: kill me now
    time.sleep(120)

st.save_file = save_file
from eqat_cli.cli.app import main
sys.argv = ["eqat"] + sys.argv[1:]
main()
"""


def test_pack_sigkill_mid_write_leaves_no_output_under_the_final_name(inputs, tmp_path, fmt="gptq_v2"):
    out = tmp_path / "dest" / "packed"
    mark = tmp_path / "mark"
    env = {k: v for k, v in os.environ.items() if k != "EQAT_DEBUG"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels"), env.get("PYTHONPATH", "")]),
               EQAT_TEST_MARK=str(mark), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "pack", str(inputs["q"]), "--format", fmt, "-o", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not mark.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert mark.exists(), "pack never reached its first write"
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists(), "a half-written output is visible under the final name"
    hidden = [p.name for p in out.parent.iterdir() if p.name != "packed.lock"]
    assert all(n.startswith(".packed.tmp-") for n in hidden), hidden
    lock = out.parent / "packed.lock"  # the killed run's output lock, its PID recorded
    assert lock.read_text().split() == [str(proc.pid)]
    res = invoke("pack", inputs["q"], "--format", fmt, "-o", out)  # the next run is not disturbed
    assert res.exit_code == 0, res.output
    assert f"took over the lock of {out} left by PID {proc.pid} (no longer running)" in " ".join(res.output.split())
    assert not lock.exists()
    assert_same_tensors(out, inputs["root"] / "pack-ref")


# ---------------------------------------------------------------------- no network


def test_no_network_fails_at_once_for_a_named_data_set(inputs, tmp_path, monkeypatch):
    """An unreachable Hub (here: a closed local port) costs one probe, not ~30 s of retries."""
    from huggingface_hub import constants

    from eqat_cli import hub as data

    waits = []
    real_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: (waits.append(s), real_sleep(min(s, 0.01))))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(data, "_hub_probe", {})
    monkeypatch.delenv("EQAT_DATA_DIR", raising=False)
    t0 = time.time()
    res = invoke("calibrate", inputs["fp"], "--dataset", "wikitext2", "--samples", "2", "--seqlen", "16",
                 "-o", tmp_path / "c.safetensors")
    took = time.time() - t0
    assert res.exit_code == 2, res.output
    errs = error_lines(res.output)
    assert len(errs) == 1 and "unreachable" in errs[0] and "--data-dir" in errs[0], res.output
    assert not [w for w in waits if w >= 1], f"retried with waits {waits}"
    assert took < 60, f"took {took:.1f} s"
    assert not (tmp_path / "c.safetensors").exists()
