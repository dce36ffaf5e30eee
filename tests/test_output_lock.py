"""One writer per output (issue #29): every command writing ``OUT`` or ``OUT.partial/`` holds
``OUT.lock`` for the whole run. Tested with real processes: a holder, and real ``eqat`` commands
beside it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO, build, save_tiny, tiny_llama_config
from eqat_cli.errors import OutputBusyError
from eqat_cli.fsutil import lock_path, output_lock

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")]),
       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
BOUND = 600  # seconds a helper process may take to reach its barrier on a loaded machine

# Takes the lock the way every command does, says so, and holds it until stdin is closed.
HOLDER = """
import sys
from eqat_cli.fsutil import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""

# ``eqat block-ap``'s library entry (the command's one call), pausing after block 0 is finished
# and recorded in OUT.partial/ until stdin is closed (or it is killed there).
BLOCK_AP = """
import sys
from pathlib import Path
from eqat_cli.train.block_ap import BlockAPConfig, block_ap_from_spec
model, calib, out = sys.argv[1:4]
def progress(event, info):
    if event == "block_end" and info["block"] == 0:
        print("block 0 finished", flush=True)
        sys.stdin.read()
block_ap_from_spec(model, Path(out), BlockAPConfig(bits=4, group_size=32, epochs=1), calib=Path(calib),
                   device="cpu", progress=progress)
"""


def _start(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _await_line(proc: subprocess.Popen, want: str) -> None:
    """Block until ``proc`` prints ``want`` on stdout (it is at its barrier)."""
    timer = threading.Timer(BOUND, proc.kill)
    timer.start()
    try:
        line = proc.stdout.readline()
    finally:
        timer.cancel()
    assert want in line, (line, proc.stderr.read() if proc.poll() is not None else "")


def _release(proc: subprocess.Popen) -> int:
    proc.stdin.close()
    return proc.wait(BOUND)


def _eqat(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "eqat_cli", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_second_writer_is_refused_naming_the_holder_then_waits_with_wait(tmp_path):
    out = tmp_path / "out"
    holder = _start(HOLDER, out)
    try:
        _await_line(holder, "locked")
        assert lock_path(out).read_text().split() == [str(holder.pid)]
        with pytest.raises(OutputBusyError, match=rf"output .*out is being written by another eqat process \(PID {holder.pid}\)"):
            with output_lock(out):
                pass
        events = []

        def progress(event, info):  # told that we wait: now let the holder finish
            events.append((event, info))
            holder.stdin.close()

        with output_lock(out, wait=True, progress=progress):
            assert holder.wait(BOUND) == 0  # it let go before we got in
            assert lock_path(out).read_text().split() == [str(os.getpid())]
    finally:
        holder.kill()
    assert events == [("lock_wait", {"output": str(out), "pid": holder.pid, "lock": str(lock_path(out))})]
    assert not lock_path(out).exists()  # a finished holder removes its lock file


def test_a_killed_holder_is_taken_over_and_reported(tmp_path):
    out = tmp_path / "out"
    holder = _start(HOLDER, out)
    _await_line(holder, "locked")
    holder.send_signal(signal.SIGKILL)
    holder.wait(BOUND)
    assert lock_path(out).read_text().split() == [str(holder.pid)]  # left behind
    events = []
    with output_lock(out, progress=lambda e, i: events.append((e, i))):
        pass
    assert events == [("lock_takeover", {"output": str(out), "pid": holder.pid, "alive": False,
                                         "lock": str(lock_path(out))})]


def _calibrate(out):
    from eqat_cli.train.calib import calibrate_to_file

    calibrate_to_file("smollm2", "c4", out)


def _pack(out):
    from eqat_cli.pack import pack_from_spec

    pack_from_spec("smollm2", "gptq", out)


def _e2e(out):
    from eqat_cli.train.e2e_qp import E2EConfig, e2e_qp_from_spec

    e2e_qp_from_spec("smollm2", "c4", out, E2EConfig(global_batch=4))


def _block_ap(out):
    from eqat_cli.train.block_ap import BlockAPConfig, block_ap_from_spec

    block_ap_from_spec("smollm2", out, BlockAPConfig(), dataset="c4")


def _pull(out):
    from eqat_cli.pull import pull_from_spec

    pull_from_spec("someone/some-model", local_dir=out)


@pytest.mark.parametrize("entry", [_calibrate, _pack, _e2e, _block_ap, _pull])
def test_every_writing_command_takes_the_lock_before_reading_anything(entry, tmp_path):
    """Each command's library entry refuses a held output before it loads a model or data."""
    out = tmp_path / ("out.safetensors" if entry is _calibrate else "out")
    holder = _start(HOLDER, out)
    try:
        _await_line(holder, "locked")
        with pytest.raises(OutputBusyError, match=f"PID {holder.pid}"):
            entry(out)
    finally:
        holder.kill()
    assert not out.exists()


def test_lock_is_reentrant_in_one_process(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with output_lock(out):  # a library entry and the trainer it calls
            assert lock_path(out).exists()
        assert lock_path(out).exists()
    assert not lock_path(out).exists()


@pytest.fixture
def model_and_calib(tmp_path):
    from eqat_cli.train.calib import build_windows, save_calibration
    from conftest import tiny_tokenizer

    model = save_tiny(build(tiny_llama_config()), tmp_path / "fp")
    text = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(60)) for i in range(40)]
    c = build_windows(text, tiny_tokenizer(), 6, 32, 2, 0, source="synthetic")
    save_calibration(c, tmp_path / "c.safetensors")
    return model, tmp_path / "c.safetensors"


def test_two_block_ap_runs_on_one_output(model_and_calib, tmp_path):
    """Issue #29's bug: a second `eqat block-ap` on the same -o must not resume the first's
    OUT.partial/ while it is being written. It refuses in one line naming the first's PID; with
    --wait it waits for it (and then finds the output written)."""
    model, calib = model_and_calib
    out = tmp_path / "out"
    args = ["block-ap", model, "--calib", calib, "--bits", "4", "--group", "32", "--epochs", "1", "--device", "cpu",
            "-o", out]
    first = _start(BLOCK_AP, model, calib, out)
    try:
        _await_line(first, "block 0 finished")
        state = (out.with_name("out.partial") / "blockap_state.json").read_bytes()
        second = _eqat(*args)
        _, err = second.communicate(timeout=BOUND)
        assert second.returncode == 2, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"PID {first.pid}" in lines[0] and "--wait" in lines[0], err
        assert (out.with_name("out.partial") / "blockap_state.json").read_bytes() == state  # untouched
        waiting = _eqat(*args, "--wait")
        line = waiting.stderr.readline()  # blocks until it reports that it waits
        assert f"waiting for PID {first.pid} to finish writing {out}" in line, line
        assert _release(first) == 0, first.stderr.read()
        _, err = waiting.communicate(timeout=BOUND)
        assert waiting.returncode == 2 and "already exists" in err, err  # the first one wrote it meanwhile
    finally:
        first.kill()
    assert (out / "config.json").exists() and not out.with_name("out.partial").exists()
    assert not lock_path(out).exists()


def test_block_ap_takes_over_a_killed_runs_lock_and_resumes(model_and_calib, tmp_path):
    """A run killed mid-way leaves OUT.lock with its PID; the next run takes it over, says so, and
    resumes after the finished block."""
    model, calib = model_and_calib
    out = tmp_path / "out"
    first = _start(BLOCK_AP, model, calib, out)
    _await_line(first, "block 0 finished")
    first.send_signal(signal.SIGKILL)
    first.wait(BOUND)
    assert lock_path(out).read_text().split() == [str(first.pid)]
    again = _eqat("block-ap", model, "--calib", calib, "--bits", "4", "--group", "32", "--epochs", "1",
                  "--device", "cpu", "-o", out)
    _, err = again.communicate(timeout=BOUND)
    assert again.returncode == 0, err
    assert f"took over the lock of {out} left by PID {first.pid} (no longer running)" in " ".join(err.split())
    assert "resumed after 1 finished blocks" in err
    assert (out / "config.json").exists() and not lock_path(out).exists()


def test_a_failed_run_leaves_no_directories_behind(tmp_path):
    """The lock file needs its directory; a run that fails before writing anything removes it again."""
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError):
        with output_lock(out):
            assert lock_path(out).exists()
            raise RuntimeError("a check failed")
    assert list(tmp_path.iterdir()) == []
    with output_lock(out):  # a run that writes its output keeps the directories
        out.mkdir()
    assert out.is_dir() and not lock_path(out).exists()
