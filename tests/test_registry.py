"""The pluggy registry: built-ins, third-party plugins, validation, and backend selection."""

import shutil
import inspect

import pluggy
import pytest

from eqat_cli import hookspecs
from eqat_cli.errors import EqatError, UnknownArchitectureError, UnsupportedError
from eqat_cli.hookspecs import hookimpl
from eqat_cli.plugin_manager import build_plugin_manager, get_plugin_manager
from eqat_cli.registry import ArchitectureSpec, BackendSpec, DatasetSpec, Registry, get_registry, reset_registry
from eqat_cli.specs import KernelCaps
from eqat_cli.plugins.llama import LLAMA
from eqat_cli.scheme import QuantScheme

# What ``auto`` picks on a CPU: the C++ kernel's backend wherever a compiler can build it.
CPU_AUTO = "cpu" if shutil.which("g++") else "torch"


def test_builtins_present():
    reg = get_registry()
    assert {"llama", "mistral", "llava", "qwen2", "qwen3", "gemma3"} <= set(reg.architectures)
    assert {"torch", "triton"} <= set(reg.backends)
    assert {"wikitext2", "c4", "redpajama", "piqa", "arc_easy", "hellaswag"} <= set(reg.datasets)


def test_hook_register_architectures(registered):
    class MyArch:
        @hookimpl
        def register_architectures(self, register):
            register(ArchitectureSpec(**{**LLAMA.__dict__, "name": "qwen-test", "model_types": ("qwen_test",)}))

    reg = registered(MyArch(), "my-arch")
    assert reg.architecture_for("qwen_test").name == "qwen-test"
    assert reg.architectures["qwen-test"].plugin == "my-arch"


def test_hook_register_backends(registered):
    class MyBackend:
        @hookimpl
        def register_backends(self, register):
            register(BackendSpec(name="fancy", priority=50, caps=KernelCaps(bits=(4,), devices=("cpu",)),
                                 available=lambda: (False, "fancy hardware missing"), kernel=lambda: None,
                                 install_hint="pip install fancy"))

    reg = registered(MyBackend(), "my-backend")
    spec, why = reg.select_backend("auto", 4, "cpu")
    assert spec.name == CPU_AUTO
    assert "fancy rejected: fancy hardware missing (pip install fancy)" in why
    with pytest.raises(UnsupportedError, match="fancy hardware missing"):
        reg.select_backend("fancy", 4, "cpu")


def test_hook_register_datasets(registered):
    class MyData:
        @hookimpl
        def register_datasets(self, register):
            register(DatasetSpec(name="mycorpus", kind="text", hub_path="me/corpus"))

    assert registered(MyData(), "my-data").dataset("mycorpus").hub_path == "me/corpus"


def test_hook_register_commands(registered):
    from typing import Annotated

    import typer
    from typer.testing import CliRunner

    from eqat_cli.cli.common import EqatCommand, Range

    class MyCmd:
        @hookimpl
        def register_commands(self, app):
            @app.command("hello")
            def hello():
                typer.echo("hello from a plugin")

            @app.command("fails")
            def fails():
                raise UnsupportedError("a plugin's refusal")

            @app.command("checked", cls=EqatCommand)
            def checked(n: Annotated[int, typer.Option("--n", help="How many."), Range(ge=1)] = 1):
                typer.echo(f"n={n}")

    registered(MyCmd(), "my-cmd")
    from eqat_cli.cli.app import build_app

    res = CliRunner().invoke(build_app(), ["hello"])
    assert res.exit_code == 0 and "hello from a plugin" in res.output
    # A plugin command's errors are mapped like a built-in's: one line, exit 2.
    res = CliRunner().invoke(build_app(), ["fails"], env={"EQAT_DEBUG": ""})
    assert res.exit_code == 2 and res.output.strip() == "error: a plugin's refusal"
    # With cls=EqatCommand its options are range-checked (and --help shows the range).
    res = CliRunner().invoke(build_app(), ["checked", "--n", "0"], env={"EQAT_DEBUG": ""})
    assert res.exit_code == 2 and res.output.strip() == "error: --n must be >= 1, got 0"
    res = CliRunner().invoke(build_app(), ["checked", "--n", "3"])
    assert res.exit_code == 0 and res.output.strip() == "n=3"
    assert "(allowed: >= 1)" in CliRunner().invoke(build_app(), ["checked", "--help"]).output


def test_hook_register_formats(registered, tmp_path):
    """A plugin's Format is found under its name and aliases, checked and written by pack_model."""
    from conftest import build, tiny_llama_config, tiny_tokenizer
    from eqat_cli.formats.native import save_native
    from eqat_cli.format_spec import Format
    from eqat_cli.pack import pack_model
    from eqat_cli.quantize import rtn_quantize_model

    calls = []

    def check(model, tokenizer=None):
        calls.append("check")
        if tokenizer is None:
            raise UnsupportedError("needs a tokenizer")

    def write(job):
        calls.append("write")
        n = sum(1 for k in job.model.state_dict() if k.endswith(".qweight"))
        job.target.write_text(f"{n} packed layers from {job.provenance['source_format']}\n")
        return {"layers": n}

    class MyFormat:
        @hookimpl
        def register_formats(self, register):
            register(Format(name="toy", aliases=("toy-fmt",), description="a toy", check=check, write=write,
                            load_hint="cat {out}", output="file", suffix=".toy"))

    reg = registered(MyFormat(), "my-format")
    assert reg.format("TOY-FMT").name == "toy" and reg.formats["toy"].plugin == "my-format"
    assert "toy" in reg.format_names() and reg.format_name("native") == "eqat"
    model = build(tiny_llama_config())
    rtn_quantize_model(model, reg.architecture_for("llama"), QuantScheme(4, 32))
    (tmp_path / "q").mkdir()
    save_native(model, tiny_tokenizer(), tmp_path / "q", {"bits": 4, "group_size": 32, "architecture": "llama"})
    with pytest.raises(EqatError, match="ending in .toy"):
        pack_model(str(tmp_path / "q"), "toy", tmp_path / "out.bin")
    summary = pack_model(str(tmp_path / "q"), "toy_fmt", tmp_path / "out.toy")
    assert calls == ["check", "write"]
    assert (tmp_path / "out.toy").read_text() == "14 packed layers from eqat\n"
    assert summary["format"] == "toy" and summary["layers"] == 14 and summary["load_with"] == f"cat {tmp_path / 'out.toy'}"
    # --format's help names it once the CLI is built.
    from typer.testing import CliRunner

    from eqat_cli.cli.app import build_app

    assert "toy" in CliRunner().invoke(build_app(), ["pack", "--help"], terminal_width=200).output

    class Clash:
        @hookimpl
        def register_formats(self, register):
            register(Format(name="other", aliases=("native",), check=check, write=write, load_hint=""))

    with pytest.raises(EqatError, match="'native' .* already taken by format 'eqat'"):
        registered(Clash(), "clash")


def test_every_hook_has_a_test():
    specs = {n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("register_")}
    tested = {n[len("test_hook_"):] for n in globals() if n.startswith("test_hook_")}
    assert specs == tested, f"hooks without a test: {specs - tested}"


def test_unknown_hook_rejected():
    class Typo:
        @hookimpl
        def register_architecturez(self, register):
            pass

    pm = build_plugin_manager(load_entry_points=False)
    pm.register(Typo(), name="typo")
    with pytest.raises(pluggy.PluginValidationError):
        pm.check_pending()


def test_wrong_spec_type_and_duplicates_rejected(registered):
    class Bad:
        @hookimpl
        def register_architectures(self, register):
            register({"name": "dict-not-spec"})

    with pytest.raises(EqatError, match="expected ArchitectureSpec"):
        registered(Bad(), "bad")


def test_duplicate_name_rejected():
    class Dup:
        @hookimpl
        def register_architectures(self, register):
            register(LLAMA)

    pm = build_plugin_manager(load_entry_points=False)
    pm.register(Dup(), name="dup")
    with pytest.raises(EqatError, match="registered twice"):
        Registry(pm)


def test_block_plugins_env(monkeypatch):
    monkeypatch.setenv("EQAT_BLOCK_PLUGINS", "llava, backend_triton")
    reg = Registry(build_plugin_manager())
    assert "llava" not in reg.architectures and "triton" not in reg.backends
    assert "llama" in reg.architectures


def test_unknown_architecture_lists_known():
    with pytest.raises(UnknownArchitectureError, match=r"'gpt2'.*known: gemma3_text, llama, llava, mistral, qwen2, qwen3"):
        get_registry().architecture_for("gpt2")


def test_triton_unavailable_on_cpu_with_reason():
    reg = get_registry()
    rows = {s.name: (ok, why) for s, ok, why in reg.explain_backends(2, "cuda")}
    assert rows["torch"][0] is True
    import torch

    if not torch.cuda.is_available():
        assert rows["triton"] == (False, rows["triton"][1]) and "CUDA" in rows["triton"][1]
    rows_cpu = {s.name: (ok, why) for s, ok, why in reg.explain_backends(2, "cpu")}
    assert rows_cpu["triton"][0] is False and "cpu" in rows_cpu["triton"][1]
    spec, why = reg.select_backend("auto", 2, "cpu")
    assert spec.name == CPU_AUTO and "triton rejected" in why


# ---------------------------------------------------------------------- the specs module


def _fresh_modules(code: str) -> set[str]:
    """The names in ``sys.modules`` after running ``code`` in a fresh interpreter (this tree
    first on the path)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")]
    )}
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_specs_module_imports_nothing_heavy():
    mods = _fresh_modules("import eqat_cli.specs")
    heavy = {"torch", "transformers", "pluggy", "eqat_cli.registry", "eqat_cli.plugin_manager",
             "eqat_cli.hookspecs"}
    assert not heavy & mods, heavy & mods


def test_hookspecs_and_plugins_do_not_import_registry_or_plugin_manager():
    """The old cycle hookspecs -> registry -> plugin_manager -> hookspecs is gone: hook
    specifications and plugin modules only need the specs."""
    mods = _fresh_modules(
        "import eqat_cli.hookspecs, eqat_cli.plugins.llama, eqat_cli.plugins.qwen2, "
        "eqat_cli.plugins.datasets, eqat_cli.plugins.backend_torch, eqat_cli.plugins.backend_triton"
    )
    assert "eqat_cli.specs" in mods
    assert not {"eqat_cli.registry", "eqat_cli.plugin_manager", "torch"} & mods


def test_registry_reexports_the_specs():
    """Plugins written as ``from eqat_cli.registry import ArchitectureSpec`` keep working."""
    from eqat_cli import registry, specs

    for name in ("ArchitectureSpec", "BackendSpec", "DatasetSpec", "replace"):
        assert getattr(registry, name) is getattr(specs, name)
