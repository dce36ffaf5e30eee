"""Check eqat's GGUF exports inside llama.cpp (issue #27): llama-perplexity against eqat.

    flock /work/bench.lock python bench/gguf_check.py --models /work/runs-h27/rtn-w2g64 /work/runs-h27/rtn-w3g64 \
        [--bin /work/bench-rt/llama.cpp/build/bin] [--ctx 512 --chunks 40] -o bench/results/gguf_check.json

For every quantized model directory (and the full-precision SmolLM2, whose shipped GGUF is llama.cpp's
own file), three perplexities on WikiText-2 test (``$EQAT_DATA_DIR/wikitext-2-raw/wiki.test.raw``):

* ``llama_cpp``: ``llama-perplexity -m X.gguf -f wiki.test.raw -c CTX --chunks N`` on eqat's export
  (``eqat pack --format gguf``). llama.cpp's protocol: non-overlapping CTX-token chunks of the whole
  file, BOS replacing each chunk's first token when the vocabulary adds one, and only the second half
  of each chunk scored (CTX/2 - 1 predictions per chunk).
* ``eqat_same_protocol``: eqat's own model (PyTorch, fp32) scored with exactly that protocol on the
  Hugging Face tokenization of the same file: the like-for-like number (differences left: llama.cpp's
  own tokenizer, its fp16 KV cache and Q8_0-quantized activations in the quantized dot products).
* ``eqat_eval``: ``eqat eval DIR --ppl wikitext2 --seqlen CTX --limit N`` (eqat's GPTQ protocol: every
  token of each window scored), for reference.

Then tiny random models of each architecture llama.cpp runs (Llama, Llama-3 rope scaling, Qwen2,
Qwen3, Gemma-3), RTN
w2g32, exported and run through llama-perplexity on a synthetic text, against the same-protocol
perplexity of eqat's model: it proves the file loads and computes what eqat computes (Gemma-3's
sliding window, its norms and embedding scale, Qwen3's q/k norms, Qwen2's biases, Llama-3's
rope_freqs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from eqat_cli.scheme import QuantScheme

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'kernels'}", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def eqat(*args: str) -> str:
    r = subprocess.run([PY, "-m", "eqat_cli", *args], capture_output=True, text=True, env=ENV)
    if r.returncode:
        raise RuntimeError(f"eqat {' '.join(args)} failed: {r.stdout[-2000:]} {r.stderr[-2000:]}")
    return r.stdout


def llama_perplexity(binary: Path, gguf: Path, text: Path, ctx: int, chunks: int, threads: int,
                     attempts: int = 10) -> dict:
    """llama-perplexity's final estimate. Its asynchronous logger sometimes loses the last lines at
    exit (seen here about one run in four, exit code 0), so a run without them is repeated."""
    for attempt in range(1, attempts + 1):
        res = _llama_perplexity_once(binary, gguf, text, ctx, chunks, threads)
        if res["ok"] or res["returncode"]:
            res["attempts"] = attempt
            return res
    return res


def _llama_perplexity_once(binary: Path, gguf: Path, text: Path, ctx: int, chunks: int, threads: int) -> dict:
    t0 = time.time()
    r = subprocess.run([str(binary / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(ctx),
                        "--chunks", str(chunks), "-t", str(threads), "-b", str(ctx)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = r.stdout
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    if r.returncode or not m:
        return {"ok": False, "returncode": r.returncode, "log_tail": out[-1500:]}
    n = re.search(r"calculating perplexity over (\d+) chunks", out)
    return {"ok": True, "returncode": 0, "ppl": float(m.group(1)), "stderr": float(m.group(2)),
            "chunks": int(n.group(1)) if n else None, "seconds": round(time.time() - t0, 1)}


def same_protocol_ppl(model, token_ids: list[int], ctx: int, chunks: int, bos: int | None) -> float:
    """llama-perplexity's protocol in PyTorch: chunk i = tokens[i*ctx:(i+1)*ctx], first token -> BOS
    if the vocabulary adds one, score logits at positions ctx/2 .. ctx-2 against the next token."""
    import torch

    first = ctx // 2
    nll, count = 0.0, 0
    n = min(chunks, len(token_ids) // ctx)
    with torch.no_grad():
        for i in range(n):
            chunk = list(token_ids[i * ctx:(i + 1) * ctx])
            if bos is not None:
                chunk[0] = bos
            ids = torch.tensor([chunk])
            logits = model(input_ids=ids).logits[0].float()
            lp = torch.log_softmax(logits[first:ctx - 1], dim=-1)
            tgt = ids[0, first + 1:ctx]
            nll -= float(lp.gather(1, tgt[:, None]).sum())
            count += ctx - 1 - first
    return math.exp(nll / count)


def bos_if_added(gguf_path: Path) -> int | None:
    from eqat_cli.formats.gguf_export import read_gguf_metadata

    meta = read_gguf_metadata(gguf_path)
    return meta.get("tokenizer.ggml.bos_token_id") if meta.get("tokenizer.ggml.add_bos_token") else None


def check_real(args, work: Path) -> list[dict]:
    import torch
    from transformers import AutoTokenizer

    from eqat_cli.models import resolve, smollm2_gguf_path

    torch.set_num_threads(args.threads)
    text = Path(args.data_dir) / "wikitext-2-raw" / "wiki.test.raw"
    rows = []
    specs = [("fp", "smollm2", smollm2_gguf_path())] + [(Path(m).name, m, None) for m in args.models]
    token_ids = None
    for label, spec, gguf in specs:
        row: dict = {"model": label, "source": str(spec)}
        if gguf is None:
            gguf = work / f"{label}.gguf"
            t0 = time.time()
            eqat("pack", str(spec), "--format", "gguf", "-o", str(gguf), "--overwrite")
            row["pack_seconds"] = round(time.time() - t0, 1)
        row["gguf"] = str(gguf)
        row["gguf_bytes"] = gguf.stat().st_size
        from eqat_cli.formats.describe import inspect_path

        row["tensor_types"] = inspect_path(gguf).details.get("tensor_types")
        row["llama_cpp"] = llama_perplexity(Path(args.bin), gguf, text, args.ctx, args.chunks, args.threads)
        lm = resolve(str(spec), device="cpu", dtype="fp32")
        if token_ids is None:
            tok = lm.tokenizer or AutoTokenizer.from_pretrained(str(spec))
            token_ids = tok(text.read_text(), add_special_tokens=False)["input_ids"]
        t0 = time.time()
        row["eqat_same_protocol"] = {"ppl": same_protocol_ppl(lm.model, token_ids, args.ctx, args.chunks,
                                                              bos_if_added(gguf)),
                                     "seconds": round(time.time() - t0, 1)}
        del lm
        jf = work / f"{label}-eval.json"
        eqat("eval", str(spec), "--ppl", "wikitext2", "--seqlen", str(args.ctx), "--limit", str(args.chunks),
             "--json", str(jf), "--data-dir", str(args.data_dir))
        row["eqat_eval"] = json.loads(jf.read_text())
        print(json.dumps({k: row[k] for k in ("model", "llama_cpp", "eqat_same_protocol")}), flush=True)
        rows.append(row)
    return rows


TINY_TEXT = " ".join(
    ["the quick brown fox jumps over the lazy dog", "pack it as GGUF and run it in llama.cpp",
     "sliding windows, q and k norms, biases: every architecture", "2, 3 and 4 bits, exactly"][i % 4]
    for i in range(200)
)


def _controls():
    """Deliberately wrong exports: if llama.cpp's perplexity moves clearly away from eqat's for these
    but not for the real export, the comparison can see the detail each one breaks."""
    import numpy as np

    import eqat_cli.formats.gguf_export as ge

    return {
        "llama": ("q/k rows not permuted", {"permute_rows": lambda t, *a, **k: t}),
        "llama3": ("rope_freqs all 1 (Llama-3 rope scaling dropped)",
                   {"llama3_rope_factors": lambda c: np.ones((getattr(c, "head_dim", None)
                                                             or c.hidden_size // c.num_attention_heads) // 2,
                                                            np.float32)}),
        "gemma3": ("no sliding window written (every layer global)", {"_layer_types": lambda c: None}),
    }, ge


def check_tiny(args, work: Path) -> list[dict]:
    import torch

    from conftest import TINY_CONFIGS, build
    from eqat_cli.formats.native import save_native
    from eqat_cli.models import resolve
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry
    from test_pack import byte_level_tokenizer

    tok = byte_level_tokenizer()
    text = work / "tiny.txt"
    text.write_text(TINY_TEXT)
    ids = tok(TINY_TEXT)["input_ids"]
    controls, ge = _controls()
    torch.set_num_threads(args.threads)
    rows = []
    for key in args.tiny_archs:
        for bits in (2, 4):
            # initializer_range 0.1 (not 0.02): a random model with small weights predicts nearly
            # uniformly (ppl ~ vocab size), which hides architecture mistakes; larger weights do not
            kw = {"vocab_size": 320, "initializer_range": args.tiny_init}
            if key in ("qwen2", "qwen3"):
                kw["use_sliding_window"] = False  # llama.cpp's qwen2/qwen3 have no sliding window
            config = TINY_CONFIGS[key](**kw)
            model = rtn_quantize_model(build(config, seed=3), get_registry().architecture_for(config.model_type),
                                       QuantScheme(bits, 32))
            src = work / f"tiny-{key}-w{bits}"
            import shutil

            shutil.rmtree(src, ignore_errors=True)
            src.mkdir()
            save_native(model, tok, src, {"bits": bits, "group_size": 32, "architecture": key})
            gguf = work / f"tiny-{key}-w{bits}.gguf"
            eqat("pack", str(src), "--format", "gguf", "-o", str(gguf), "--overwrite")
            ctx, chunks = 64, 8
            lc = llama_perplexity(Path(args.bin), gguf, text, ctx, chunks, args.threads)
            # the same-protocol number on eqat's *reloaded* model, as `eqat pack` saw it
            lm = resolve(str(src), device="cpu", dtype="fp32")
            ref = same_protocol_ppl(lm.model, ids, ctx, chunks, bos_if_added(gguf))
            row = {"arch": key, "bits": bits, "llama_cpp": lc, "eqat_same_protocol": ref}
            if lc.get("ok"):
                row["rel_diff"] = lc["ppl"] / ref - 1
            if key in controls:
                what, patch = controls[key]
                saved = {k: getattr(ge, k) for k in patch}
                try:
                    for k, v in patch.items():
                        setattr(ge, k, v)
                    bad = work / f"tiny-{key}-w{bits}-control.gguf"
                    ge.save_gguf(lm.model, lm.tokenizer, bad)
                finally:
                    for k, v in saved.items():
                        setattr(ge, k, v)
                cl = llama_perplexity(Path(args.bin), bad, text, ctx, chunks, args.threads)
                row["control"] = {"what": what, "llama_cpp": cl,
                                  "rel_diff": cl["ppl"] / ref - 1 if cl.get("ok") else None}
            print(json.dumps({k: row[k] for k in row if k not in ("llama_cpp",)}), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=[])
    ap.add_argument("--bin", default="/work/bench-rt/llama.cpp/build/bin")
    ap.add_argument("--data-dir", default=os.environ.get("EQAT_DATA_DIR", "/work/shared/data"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/eqat-gguf-check")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--tiny-archs", nargs="*", default=["llama", "llama3", "qwen2", "qwen3", "gemma3"])
    ap.add_argument("--tiny-init", type=float, default=0.1)
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {
        "what": "eqat GGUF exports in llama.cpp's llama-perplexity vs eqat on the same model",
        "protocol": {"ctx": args.ctx, "chunks": args.chunks, "text": "wikitext-2-raw/wiki.test.raw",
                     "llama_cpp": "second half of each chunk scored, BOS replaces first token if added",
                     "eqat_eval": "GPTQ protocol: every token of each window scored"},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "contended": "other agents' jobs may run beside it (heavy jobs serialized by flock)"},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if not args.skip_tiny:
        result["tiny"] = check_tiny(args, work)
    if not args.skip_real:
        result["real"] = check_real(args, work)
        fp = next(r for r in result["real"] if r["model"] == "fp")
        for r in result["real"]:
            r["vs_fp"] = {
                "llama_cpp": r["llama_cpp"].get("ppl", float("nan")) / fp["llama_cpp"].get("ppl", float("nan")) - 1,
                "eqat_same_protocol": r["eqat_same_protocol"]["ppl"] / fp["eqat_same_protocol"]["ppl"] - 1,
            }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
