"""``eqat pull`` against a fake Hub on 127.0.0.1 (tests/hubserver.py): download, resume, inspect,
and one-line errors (exit 2) for a missing repo, a missing revision, offline mode and an
unreachable endpoint. No network."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, build, tiny_llama_config
from hubserver import FakeHub, Repo, unused_port_url

from eqat_cli.scheme import QuantScheme

REPO_ID = "ChenMnZ/tiny-llama-EfficientQAT-w2g32"
runner = CliRunner()


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    """A tiny model in the EfficientQAT release layout: packed tensors, no eqat section."""
    from eqat_cli.formats.native import save_native
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    model = build(tiny_llama_config(num_hidden_layers=1))
    rtn_quantize_model(model, get_registry().architecture_for("llama"), QuantScheme(2, 32))
    out = tmp_path_factory.mktemp("release") / "w2g32"
    out.mkdir()
    save_native(model, None, out, None)
    cfg = json.loads((out / "config.json").read_text())
    assert "eqat" not in cfg and "quantization_config" not in cfg
    return out


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """Point huggingface_hub (already imported) at a URL; fresh cache; small read chunks."""
    import huggingface_hub.constants as C

    def point(url: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(C, "ENDPOINT", url)
        monkeypatch.setattr(C, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(C, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    # Chunks small enough that an interrupted body has been written (and can be resumed).
    monkeypatch.setattr(C, "DOWNLOAD_CHUNK_SIZE", 4096)
    monkeypatch.delenv("EQAT_DEBUG", raising=False)
    return point


def invoke(*args):
    from eqat_cli.cli.app import build_app

    return runner.invoke(build_app(), list(args), prog_name="eqat")


def test_pull_detects_efficientqat_release_from_shapes(release_dir, hub_env, tmp_path):
    with FakeHub({REPO_ID: Repo.from_dir(release_dir)}) as hub:
        hub_env(hub.url)
        res = invoke("pull", REPO_ID, "--json", str(tmp_path / "info.json"))
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["format"] == "eqat"
    assert info["architecture"] == "llama"
    assert (info["bits"], info["group_size"]) == (2, 32)
    assert info["quantized_layers"] == 7
    assert any("detected from tensor shapes" in n for n in info["notes"])
    path = Path(info["path"])
    assert sha256(path / "model.safetensors") == sha256(release_dir / "model.safetensors")
    assert info["size_bytes"] == sum(f.stat().st_size for f in release_dir.iterdir())
    # Human output: format, bits, group, size and the next command.
    for text in ("eqat native", "bits", "2", "group size", "32", "size on disk", "next:", "eqat eval"):
        assert text in res.output
    # 2 bits + (16 + 2) / 32 = 2.56 bits per weight for w2g32 (FORMATS.md formula)
    assert info["bits_per_weight"] == pytest.approx(2 + 18 / 32, rel=0.02)


def test_pull_library_entry_reports_the_download_as_counting_events(release_dir, hub_env, tmp_path):
    """``eqat pull``'s library entry: the files and bytes bars arrive as ``download`` events that end
    at their totals; the result describes the download; nothing is printed."""
    from eqat_cli.pull import pull_from_spec

    events = []
    with FakeHub({REPO_ID: Repo.from_dir(release_dir)}) as hub:
        hub_env(hub.url)
        info = pull_from_spec(REPO_ID, local_dir=tmp_path / "dl", progress=lambda e, i: events.append((e, dict(i))))
    assert (info.format, info.bits, info.group_size) == ("eqat", 2, 32)
    assert {e for e, _ in events} == {"download"}
    last = {i["bar"]: i for _, i in events}
    labels = {i["label"] for i in last.values()}
    assert "files" in labels
    for i in last.values():
        assert i["total"] is None or i["done"] == i["total"]
    files = [i for i in last.values() if i["label"] == "files"]
    assert files[-1]["done"] == len(list(release_dir.iterdir()))


def test_pull_resumes_an_interrupted_download(release_dir, hub_env, tmp_path):
    repo = Repo.from_dir(release_dir)
    size = len(repo.files["model.safetensors"])
    with FakeHub({REPO_ID: repo}) as hub:
        hub.drop_after["model.safetensors"] = size // 2  # first GET hangs up half-way
        hub_env(hub.url)
        res = invoke("pull", REPO_ID, "--local-dir", str(tmp_path / "dl"))
        gets = hub.requests("GET", "/resolve/")
    assert res.exit_code == 0, res.output
    st_gets = [g for g in gets if g[1].endswith("model.safetensors")]
    assert len(st_gets) == 2
    assert st_gets[0][2] is None
    start = int(st_gets[1][2].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= size // 2  # resumed with a Range request, not from scratch
    assert sha256(tmp_path / "dl" / "model.safetensors") == sha256(release_dir / "model.safetensors")
    assert not list((tmp_path / "dl").rglob("*.incomplete"))


def test_pull_is_not_fooled_by_a_stale_incomplete_file(release_dir, hub_env, tmp_path):
    """huggingface_hub 2.4 downloads into a process-unique temp file, so a partial file left at the
    old ``<etag>.incomplete`` name (pre-seeded here with half the bytes, then garbage) is never
    appended to: the download starts from byte 0 and the result is intact."""
    from huggingface_hub._local_folder import get_local_download_paths

    repo = Repo.from_dir(release_dir)
    data = repo.files["model.safetensors"]
    local = tmp_path / "dl"
    stale = get_local_download_paths(local, "model.safetensors").incomplete_path(repo.etag("model.safetensors"))
    stale.write_bytes(data[: len(data) // 2] + b"garbage")
    with FakeHub({REPO_ID: repo}) as hub:
        hub_env(hub.url)
        res = invoke("pull", REPO_ID, "--local-dir", str(local))
        gets = [g for g in hub.requests("GET", "/resolve/") if g[1].endswith("model.safetensors")]
    assert res.exit_code == 0, res.output
    assert [g[2] for g in gets] == [None]
    assert sha256(local / "model.safetensors") == sha256(release_dir / "model.safetensors")


def test_pull_failed_call_leaves_no_partial_file_and_rerun_completes(release_dir, hub_env, tmp_path):
    with FakeHub({REPO_ID: Repo.from_dir(release_dir)}) as hub:
        hub.fail_next["model.safetensors"] = [500]
        hub_env(hub.url)
        res = invoke("pull", REPO_ID)
        assert res.exit_code == 2, res.output
        assert "error:" in res.output and "Traceback" not in res.output
        cache = Path(tmp_path / "hf-cache")
        assert not list(cache.rglob("*.incomplete"))
        n_config_gets = len(hub.requests("GET", "config.json"))
        res = invoke("pull", REPO_ID, "--json", str(tmp_path / "info.json"))
        assert res.exit_code == 0, res.output
        # Files finished by the failed call are not fetched again.
        assert len(hub.requests("GET", "config.json")) == n_config_gets
    info = json.loads((tmp_path / "info.json").read_text())
    assert sha256(Path(info["path"]) / "model.safetensors") == sha256(release_dir / "model.safetensors")


def test_pull_missing_repo_is_one_line_exit_2(hub_env):
    with FakeHub({}) as hub:
        hub_env(hub.url)
        res = invoke("pull", "nobody/no-such-model")
    assert res.exit_code == 2
    assert "not found" in res.output and "Traceback" not in res.output
    assert res.output.count("error:") == 1


def test_pull_missing_revision_is_exit_2(release_dir, hub_env):
    with FakeHub({REPO_ID: Repo.from_dir(release_dir)}) as hub:
        hub_env(hub.url)
        res = invoke("pull", REPO_ID, "--revision", "v9")
    assert res.exit_code == 2
    assert "revision 'v9' does not exist" in res.output


def test_pull_offline_mode_is_exit_2(hub_env, monkeypatch):
    import huggingface_hub.constants as C

    with FakeHub({}) as hub:
        hub_env(hub.url)
        monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
        res = invoke("pull", REPO_ID)
        assert not hub.requests()  # nothing was even attempted
    assert res.exit_code == 2
    assert "offline mode" in res.output and "HF_HUB_OFFLINE" in res.output


def test_pull_unreachable_endpoint_is_exit_2(hub_env):
    hub_env(unused_port_url())
    res = invoke("pull", REPO_ID)
    assert res.exit_code == 2
    assert "unreachable" in res.output and "Traceback" not in res.output


def test_pull_in_a_subprocess_honours_HF_ENDPOINT_and_skips_torch(release_dir, tmp_path):
    """The real entry point, configured only through environment variables."""
    code = (
        "import sys\n"
        "from eqat_cli.cli.app import build_app\n"
        "try:\n"
        f"    build_app()(['pull', {REPO_ID!r}, '--json', '-'], prog_name='eqat')\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print('TORCH_LOADED' if 'torch' in sys.modules else 'TORCH_NOT_LOADED', file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    with FakeHub({REPO_ID: Repo.from_dir(release_dir)}) as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(tmp_path / "hf-home"),
            "PYTHONPATH": str(REPO),
        }
        env.pop("EQAT_DEBUG", None)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert (info["format"], info["bits"], info["group_size"]) == ("eqat", 2, 32)
    assert info["next_command"].startswith("eqat eval ")
    assert Path(info["path"]).is_relative_to(tmp_path / "hf-home")
    assert "TORCH_NOT_LOADED" in out.stderr


# ---------------------------------------------------------------------- integrity (issue #29)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


@pytest.mark.parametrize("name,kind", [("model.safetensors", "sha256"), ("config.json", "git blob id")])
def test_pull_refuses_a_file_that_does_not_match_the_hubs_hash(release_dir, hub_env, tmp_path, name, kind):
    """A mirror serving other bytes than the Hub records (same size): one line naming the file and
    the hash kind, the damaged file removed, and a re-run against a sound mirror completes."""
    repo = Repo.from_dir(release_dir)
    good = repo.files[name]
    repo.recorded[name] = good
    repo.files[name] = _flip(good, len(good) // 2)
    dl = tmp_path / "dl"
    with FakeHub({REPO_ID: repo}) as hub:
        hub_env(hub.url)
        res = invoke("pull", REPO_ID, "--local-dir", str(dl))
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and f"{name}: checksum mismatch: the Hub records {kind}" in lines[0], res.output
        assert not (dl / name).exists()
        repo.files[name] = good  # the mirror is repaired
        res = invoke("pull", REPO_ID, "--local-dir", str(dl))
    assert res.exit_code == 0, res.output
    assert (dl / name).read_bytes() == good


def test_pull_verifies_into_the_cache_too(release_dir, hub_env, tmp_path):
    """Without --local-dir the snapshot's links into the repo's blobs are fine; a damaged blob is
    refused and removed from the cache."""
    repo = Repo.from_dir(release_dir)
    good = repo.files["model.safetensors"]
    with FakeHub({REPO_ID: repo}) as hub:
        hub_env(hub.url)
        assert invoke("pull", REPO_ID).exit_code == 0
    other = "owner/damaged"
    bad = Repo.from_dir(release_dir, sha="1" * 40)
    bad.recorded["model.safetensors"] = good
    bad.files["model.safetensors"] = _flip(good, 100)
    with FakeHub({other: bad}) as hub:
        hub_env(hub.url)
        res = invoke("pull", other)
    assert res.exit_code == 2 and "checksum mismatch" in res.output, res.output
    blobs = list((tmp_path / "hf-cache").glob("models--owner--damaged/blobs/*"))
    assert all(b.read_bytes() != bad.files["model.safetensors"] for b in blobs)


@pytest.mark.parametrize("evil", ["../outside.json", "/etc/evil.json", "sub/../../x.json", "a\\..\\b.json"])
def test_pull_refuses_a_file_list_that_leaves_the_download(release_dir, hub_env, tmp_path, evil):
    repo = Repo.from_dir(release_dir)
    repo.files[evil] = b"{}"
    with FakeHub({REPO_ID: repo}) as hub:
        hub_env(hub.url)
        res = invoke("pull", REPO_ID, "--local-dir", str(tmp_path / "dl"))
        downloads = hub.requests("GET", "/resolve/")
    assert res.exit_code == 2, res.output
    assert "refused: its file list holds" in res.output and "leave the download folder" in res.output
    assert downloads == []  # refused before any file was fetched
    assert not (tmp_path / "outside.json").exists()


def test_pull_refuses_a_symlink_out_of_the_download(release_dir, hub_env, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "notes.txt").symlink_to(secret)
    with FakeHub({REPO_ID: Repo.from_dir(release_dir)}) as hub:
        hub_env(hub.url)
        res = invoke("pull", REPO_ID, "--local-dir", str(dl))
    assert res.exit_code == 2, res.output
    assert "notes.txt: refused: a symlink pointing outside the download" in res.output


def test_pull_refuses_a_pickle_only_repo_with_a_hint(hub_env, tmp_path):
    repo = Repo({"config.json": b'{"model_type": "llama"}', "pytorch_model.bin": b"\x80\x04pickle"})
    with FakeHub({"owner/pickled": repo}) as hub:
        hub_env(hub.url)
        res = invoke("pull", "owner/pickled", "--local-dir", str(tmp_path / "dl"))
        downloads = hub.requests("GET", "/resolve/")
    assert res.exit_code == 2, res.output
    assert "holds only pickle weights (pytorch_model.bin)" in res.output
    assert "--revision refs/pr/N" in res.output  # the hint
    assert downloads == []


def test_pull_skips_pickles_beside_safetensors(release_dir, hub_env, tmp_path):
    repo = Repo.from_dir(release_dir)
    repo.files["pytorch_model.bin"] = b"\x80\x04pickle"
    repo.files["training_args.bin"] = b"\x80\x04pickle"
    with FakeHub({REPO_ID: repo}) as hub:
        hub_env(hub.url)
        res = invoke("pull", REPO_ID, "--local-dir", str(tmp_path / "dl"))
        gets = hub.requests("GET", "/resolve/")
    assert res.exit_code == 0, res.output
    assert not any(g[1].endswith(".bin") for g in gets)
    assert not list((tmp_path / "dl").glob("*.bin"))
    assert (tmp_path / "dl" / "model.safetensors").is_file()
