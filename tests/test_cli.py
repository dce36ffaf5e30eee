"""The eqat command: help, version, plugins, error mapping, and shell completions."""

import shutil
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from eqat_cli import __version__
from eqat_cli.cli.app import COMMANDS as TABLE, build_app
from eqat_cli.cli.completions import OUT_DIR, SHELLS, generate

runner = CliRunner()
COMMANDS = ["calibrate", "block-ap", "e2e-qp", "pack", "eval", "generate", "pull", "bench", "plugins"]


def invoke(*args, env=None):
    return runner.invoke(build_app(), list(args), prog_name="eqat", env=env)


def test_help_lists_every_command():
    res = invoke("--help")
    assert res.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in res.output
    assert [name for name, _, _ in TABLE] == COMMANDS


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_command_has_help_with_example(cmd):
    res = invoke(cmd, "--help")
    assert res.exit_code == 0, res.output
    assert "Example" in res.output


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0 and res.output.strip() == f"eqat {__version__}"


def test_help_does_not_import_torch():
    code = (
        "import sys; from eqat_cli.cli.app import build_app\n"
        "try:\n    build_app()(['--help'], prog_name='eqat')\nexcept SystemExit:\n    pass\n"
        "print('TORCH_LOADED' if 'torch' in sys.modules else 'TORCH_NOT_LOADED')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "TORCH_NOT_LOADED" in out.stdout, out.stdout + out.stderr


def test_plugins_shows_three_architectures_and_two_backends(tmp_path):
    out = tmp_path / "plugins.json"
    res = invoke("plugins", "--device", "cpu", "--json", str(out))
    assert res.exit_code == 0, res.output
    import json

    data = json.loads(out.read_text())
    assert {a["name"] for a in data["architectures"]} >= {"llama", "mistral", "llava"}
    backends = {b["name"]: b for b in data["backends"]}
    assert backends["torch"]["usable"] is True
    assert backends["triton"]["usable"] is False and backends["triton"]["reason"]
    assert data["auto"]["backend"] == ("cpu" if shutil.which("g++") else "torch")
    assert "triton rejected" in data["auto"]["why"]
    assert all(a["source"] for a in data["architectures"])
    # Each backend's group sizes and backward, from its KernelCaps (None: every group size).
    from eqat_cli.registry import get_registry

    for name, b in backends.items():
        caps = get_registry().backends[name].spec.caps
        assert b["group_sizes"] == (None if caps.group_sizes is None else list(caps.group_sizes))
        assert b["backward"] == list(caps.backward)
    assert backends["reference"]["backward"] == ["scales", "zeros"] and backends["triton"]["backward"] == []


def _backend_help(app, command: str) -> str:
    import typer.main

    cmd = typer.main.get_command(app).commands[command]
    return next(p.help for p in cmd.params if p.name == "backend")


def test_backend_option_and_plugins_come_from_the_registry(registered):
    """`--backend`'s help names every registered backend, best first, a plugin's included; `eqat
    plugins` shows a plugin backend's group sizes and backward from its KernelCaps."""
    from eqat_cli.hookspecs import hookimpl
    from eqat_cli.plugin_manager import get_plugin_manager
    from eqat_cli.registry import reset_registry
    from eqat_cli.specs import BackendSpec, KernelCaps

    builtins = "auto (the highest-priority one that runs here), triton, cpu, torch, reference;"
    for command in ("bench", "eval"):
        assert builtins in _backend_help(build_app(), command)

    class Fancy:
        @hookimpl
        def register_backends(self, register):
            register(BackendSpec(name="fancy", priority=50,
                                 caps=KernelCaps(bits=(4,), devices=("cpu",), group_sizes=(64, 128)),
                                 available=lambda: (False, "fancy hardware missing"), kernel=lambda: None))

    plugin = Fancy()
    registered(plugin, "fancy-backend")
    app = build_app()
    assert "triton, fancy, cpu, torch, reference;" in _backend_help(app, "bench")
    res = runner.invoke(app, ["plugins", "--device", "cpu", "--bits", "4", "--json", "-"], prog_name="eqat")
    assert res.exit_code == 0, res.output
    import json

    fancy = next(b for b in json.loads(res.stdout)["backends"] if b["name"] == "fancy")
    assert (fancy["group_sizes"], fancy["backward"], fancy["usable"]) == ([64, 128], [], False)
    assert "64,128" in res.stderr
    get_plugin_manager().unregister(plugin)
    reset_registry()
    assert "fancy" not in _backend_help(build_app(), "bench")  # the help names the built-ins again


def _app_with(fn):
    """The eqat app plus one command added the way a plugin adds it (plain ``@app.command``)."""
    app = build_app()
    app.command("boom")(fn)
    return app


def test_known_error_is_one_line_exit_2_and_debug_shows_traceback(tmp_path, monkeypatch):
    """Errors are mapped in the group's main(), once for every command, plugin commands included."""
    from eqat_cli.errors import BadInputError

    def boom():
        raise BadInputError(f"model not found: {tmp_path / 'nope'}", hint="check the path")

    monkeypatch.delenv("EQAT_DEBUG", raising=False)
    res = runner.invoke(_app_with(boom), ["boom"], prog_name="eqat")
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines == [f"error: model not found: {tmp_path / 'nope'} (hint: check the path)"]
    monkeypatch.setenv("EQAT_DEBUG", "1")
    res = runner.invoke(_app_with(boom), ["boom"], prog_name="eqat")
    assert isinstance(res.exception, BadInputError) and "error:" not in res.output


@pytest.mark.parametrize("exc, code, line", [
    (OSError(28, "No space left on device", "/x/model.safetensors"), 1,
     "error: disk full while writing /x/model.safetensors"),
    (OSError(5, "Input/output error", "/x/a"), 1, "error: Input/output error (/x/a)"),
    (ModuleNotFoundError("no module", name="gptqmodel"), 2,
     "error: missing optional dependency: gptqmodel (hint: pip install gptqmodel)"),
    (KeyboardInterrupt(), 130, "interrupted: finished work is kept; re-run to resume"),
])
def test_failures_map_to_one_line_and_exit_code(exc, code, line, monkeypatch):
    def boom():
        raise exc

    monkeypatch.delenv("EQAT_DEBUG", raising=False)
    res = runner.invoke(_app_with(boom), ["boom"], prog_name="eqat")
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == code and len(lines) == 1 and lines[0].startswith(line), res.output
    assert "Traceback" not in res.output


def test_unknown_exception_is_not_hidden(monkeypatch):
    """A bug is not an `error:` line: it propagates with its traceback."""
    def boom():
        raise ZeroDivisionError("bug")

    monkeypatch.delenv("EQAT_DEBUG", raising=False)
    res = runner.invoke(_app_with(boom), ["boom"], prog_name="eqat")
    assert isinstance(res.exception, ZeroDivisionError) and "error:" not in res.output


def test_bad_path_via_cli_is_one_line_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EQAT_DEBUG"}
    out = subprocess.run(
        [sys.executable, "-m", "eqat_cli", "pack", str(tmp_path / "missing"), "--format", "gptq", "-o", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode == 2
    err_lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1
    assert "Traceback" not in out.stderr


def test_unsupported_bits_error():
    from eqat_cli.errors import UnsupportedError
    from eqat_cli.quant.primitives import check_bits

    with pytest.raises(UnsupportedError, match="choose one of 2, 3, 4, 8"):
        check_bits(5)


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_completions_have_not_drifted(shell):
    path = OUT_DIR / SHELLS[shell]
    assert path.exists(), f"run: python -m eqat_cli.cli.completions"
    assert path.read_text() == generate(shell), "completions drifted: python -m eqat_cli.cli.completions"


def test_bash_completion_completes_subcommands():
    env = dict(os.environ, _EQAT_COMPLETE="complete_bash", COMP_WORDS="eqat bl", COMP_CWORD="1")
    out = subprocess.run([sys.executable, "-m", "eqat_cli"], capture_output=True, text=True, env=env, timeout=60)
    assert "block-ap" in out.stdout.split()


def test_one_progress_display_draws_library_counting_events():
    """Library progress is one callback form, ``progress(event, info)``; the CLI draws counting
    events on its one Rich display, one bar per key."""
    from eqat_cli.cli.common import counting_bars, progress_bars
    from eqat_cli.progress import count

    bars = progress_bars(transient=True, disable=True)
    cb = counting_bars(bars, key=lambda e, i: (e, i["label"]), describe=lambda e, i: f"{i['label']} ({e})")
    count(cb, "ppl", "wikitext2", 0, 4)
    count(cb, "ppl", "wikitext2", 3, 4)
    count(cb, "task", "piqa", 1, 2)
    tasks = {t.description: (t.completed, t.total) for t in bars.tasks}
    assert tasks == {"wikitext2 (ppl)": (3, 4), "piqa (task)": (1, 2)}
    count(None, "ppl", "x", 1, 1)  # no callback: nothing happens
