"""Shared by the generation benchmarks (generate_speed.py, llamacpp_compare.py, generate_profile.py):
RTN-quantized SmolLM2 checkpoints made once, a prompt of a given token count, and `eqat generate`
run as its own process (so each figure, peak RSS included, is what the command measures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from eqat_cli.scheme import QuantScheme

REPO = Path(__file__).resolve().parents[1]
TEXT = (
    "The history of computing is a story of making machines that follow instructions faster and with "
    "less energy. Early mechanical calculators added and multiplied with gears; relays and vacuum tubes "
    "replaced the gears, and transistors replaced the tubes. Each step made the same arithmetic cheaper, "
    "and each time people found new problems worth solving with it. Language models are the latest "
    "example: they predict the next word of a text from the words before it, and running one means "
    "multiplying large matrices of weights by small vectors of activations, once per generated word. "
    "On a laptop the time this takes is set mostly by how many bytes of weights must be read from memory "
    "for every word, which is why storing each weight in two or four bits instead of thirty-two can make "
    "a model both smaller and faster, as long as the arithmetic that unpacks the bits keeps up. "
) * 4


def work_dir() -> Path:
    """Where benchmark checkpoints live (``EQAT_BENCH_DIR``, default ``~/.cache/eqat/bench``)."""
    d = Path(os.environ.get("EQAT_BENCH_DIR", Path.home() / ".cache" / "eqat" / "bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def rtn_checkpoint(bits: int, group: int, model: str = "smollm2") -> Path:
    """A native eqat checkpoint of ``model`` min-max (RTN) quantized at w{bits}g{group}, made once."""
    out = work_dir() / f"{model}-rtn-w{bits}g{group}"
    if (out / "config.json").exists():
        return out
    import torch

    from eqat_cli.formats.native import save_native
    from eqat_cli.fsutil import atomic_dir
    from eqat_cli.models import resolve
    from eqat_cli.quantize import rtn_quantize_model

    lm = resolve(model, device="cpu", dtype="fp32")
    with torch.no_grad():
        rtn_quantize_model(lm.model, lm.arch, QuantScheme(bits, group))
    with atomic_dir(out, overwrite=True) as tmp:
        save_native(lm.model, lm.tokenizer, tmp, {"bits": bits, "group_size": group, "architecture": lm.arch.name,
                                                   "trained_with": "rtn", "source_model": model})
    return out


def gguf_export(native: Path) -> Path:
    """``eqat pack --format gguf`` of a native checkpoint (Q4_1), made once."""
    out = native.with_suffix(".gguf") if native.suffix else Path(str(native) + ".gguf")
    if out.exists():
        return out
    from eqat_cli.pack import pack_model

    pack_model(str(native), "gguf", out)
    return out


def prompt_of(tokens: int, model: str = "smollm2") -> str:
    """A text that SmolLM2's tokenizer encodes to about ``tokens`` tokens (BOS not counted)."""
    from eqat_cli.models import load_tokenizer, local_path, classify

    tok = load_tokenizer(local_path(classify(model)))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:tokens]
    return tok.decode(ids)


def run_generate(model: str | Path, prompt: str, new_tokens: int, threads: int = 2, *extra: str) -> dict:
    """``eqat generate MODEL -p PROMPT -n N --ignore-eos --threads T --json F`` in its own process."""
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "g.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"),
                                                               os.environ.get("PYTHONPATH", "")]),
               "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
        cmd = [sys.executable, "-m", "eqat_cli", "generate", str(model), "-p", prompt, "-n", str(new_tokens),
               "--ignore-eos", "--threads", str(threads), "--device", "cpu", "--json", str(out), *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"eqat generate failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        return json.loads(out.read_text())


def machine() -> dict:
    """The library's machine description (``eqat bench`` writes the same), plus the load average."""
    from eqat_cli.benchmark import machine_info

    return machine_info() | {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}


def git_head() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_json(path: Path | None, result: dict) -> None:
    """Write ``result`` to ``path`` atomically (a temporary sibling renamed into place)."""
    if not path:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}", file=sys.stderr)
