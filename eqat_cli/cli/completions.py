"""Generate the shell completion scripts kept in ``completions/`` (bash, zsh, fish).

``python -m eqat_cli.cli.completions`` rewrites them; ``tests/test_cli.py`` fails on drift.
Uses Typer's public surface: the ``--show-completion SHELL`` option through
``typer.testing.CliRunner``, nothing from Typer's private modules. One caveat: with shellingham
installed, Typer makes ``--show-completion`` a flag for the detected shell; the environment
variable set below (the switch Typer's own tests use, not documented) makes it take the shell name,
as it does without shellingham.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SHELLS = {"bash": "eqat.bash", "zsh": "_eqat", "fish": "eqat.fish"}
OUT_DIR = Path(__file__).resolve().parents[2] / "completions"


def generate(shell: str) -> str:
    from typer.testing import CliRunner

    from eqat_cli.cli.app import build_app

    # Tell Typer not to auto-detect the running shell, so --show-completion takes a value.
    env = {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        res = CliRunner().invoke(build_app(), ["--show-completion", shell], prog_name="eqat")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if res.exit_code != 0 or not res.output.strip():
        raise RuntimeError(f"completion generation for {shell} failed: {res.output}")
    return res.output


def write_all(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, name in SHELLS.items():
        path = out_dir / name
        path.write_text(generate(shell))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(p)
