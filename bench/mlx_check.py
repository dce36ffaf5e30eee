"""Check eqat's MLX exports inside mlx-lm (issue #27): perplexity and greedy generation.

    flock /work/bench.lock python bench/mlx_check.py --models /work/runs-h27/rtn-w2g64 ... \
        [--mlx-python /work/bench-rt/mlx-venv/bin/python] -o bench/results/mlx_check.json

mlx is a benchmark-only tool here (``bench-rt/mlx-venv``: ``pip install "mlx[cpu]" mlx-lm``, Linux
CPU wheels), never an eqat dependency. For every quantized model directory:

1. ``eqat pack DIR --format mlx`` (fp16 biases, as mlx-lm stores them) and the exact variant
   (``formats.mlx.write(..., exact=True)``: fp32 biases);
2. the same WikiText-2 windows eqat eval uses (``eqat_cli.eval.perplexity``: the tokenized test text cut
   into non-overlapping SEQLEN windows, every next token scored, ppl = exp(mean window loss)) are
   scored by eqat (PyTorch, fp32) and by ``mlx_lm.load(export)`` (mlx CPU);
3. greedy generation of 32 tokens from a fixed prompt, eqat (``model.generate``, do_sample False)
   against mlx-lm (argmax of mlx-lm's logits, one token at a time, whole prefix each step).

This file is also the mlx side (``--mlx-side``), run with the mlx venv's Python.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


def mlx_side(args) -> None:
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    windows = np.load(args.windows_file)
    prompt_ids = json.loads(args.prompt_ids)
    out = {}
    for export in args.exports:
        t0 = time.time()
        model, _ = load(export)
        losses = []
        for w in windows:
            logits = model(mx.array(w[None, :-1])).astype(mx.float32)
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            tgt = mx.array(w[None, 1:])
            nll = -mx.take_along_axis(lp, tgt[..., None], axis=-1)
            losses.append(float(nll.mean()))
        ids = list(prompt_ids)
        for _ in range(args.new_tokens):
            logits = model(mx.array([ids]))[0, -1]
            ids.append(int(mx.argmax(logits)))
        out[export] = {"window_losses": losses, "ppl": float(np.exp(np.mean(losses))),
                       "greedy": ids[len(prompt_ids):], "seconds": round(time.time() - t0, 1)}
    Path(args.result).write_text(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=[])
    ap.add_argument("--mlx-python", default="/work/bench-rt/mlx-venv/bin/python")
    ap.add_argument("--data-dir", default=os.environ.get("EQAT_DATA_DIR", "/work/shared/data"))
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/eqat-mlx-check")
    ap.add_argument("-o", "--output")
    # mlx side
    ap.add_argument("--mlx-side", action="store_true")
    ap.add_argument("--exports", nargs="*")
    ap.add_argument("--windows-file")
    ap.add_argument("--prompt-ids")
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.mlx_side:
        mlx_side(args)
        return

    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch

    from eqat_cli.eval.ppl_text import perplexity_text
    from eqat_cli.eval.perplexity import tokenize, window_losses
    from eqat_cli.formats import mlx as mlx_format
    from eqat_cli.models import resolve

    torch.set_num_threads(args.threads)
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'kernels'}", "HF_HUB_OFFLINE": "1"}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    version = subprocess.run([args.mlx_python, "-c", "import mlx.core as mx, mlx_lm; print(mx.__version__, mlx_lm.__version__)"],
                             capture_output=True, text=True)
    result = {
        "what": "eqat MLX exports loaded by mlx-lm vs eqat on the same windows",
        "mlx_versions": version.stdout.strip() or version.stderr[-500:],
        "protocol": {"text": "wikitext2 test", "seqlen": args.seqlen, "windows": args.windows,
                     "ppl": "exp(mean over windows of the mean next-token loss), like eqat eval",
                     "greedy": f"{args.new_tokens} tokens after {PROMPT!r}"},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "contended": "other agents' jobs may run beside it (heavy jobs serialized by flock)"},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "models": [],
    }
    corpus = perplexity_text("wikitext2", Path(args.data_dir))
    for spec in args.models:
        label = Path(spec).name
        lm = resolve(str(spec), device="cpu", dtype="fp32")
        ids = tokenize(lm.tokenizer, corpus.text, args.windows * args.seqlen)
        n = min(args.windows, ids.numel() // args.seqlen)
        windows = ids[: n * args.seqlen].view(n, args.seqlen).numpy().astype(np.int32)
        np.save(work / "windows.npy", windows)
        t0 = time.time()
        losses = window_losses(lm.model, ids, args.seqlen, n)
        eqat_ppl = float(np.exp(np.mean(losses)))
        eqat_seconds = round(time.time() - t0, 1)
        prompt_ids = lm.tokenizer(PROMPT)["input_ids"]
        with torch.no_grad():
            gen = lm.model.generate(torch.tensor([prompt_ids]), max_new_tokens=args.new_tokens, do_sample=False,
                                    min_new_tokens=args.new_tokens)
        eqat_greedy = gen[0, len(prompt_ids):].tolist()
        exports = {}
        for exact in (False, True):
            out = work / f"{label}-mlx{'-exact' if exact else ''}"
            if exact:
                import shutil

                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                mlx_format.write(lm.model, lm.tokenizer, out, provenance={"source": str(spec)}, exact=True)
            else:
                r = subprocess.run([sys.executable, "-m", "eqat_cli", "pack", str(spec), "--format", "mlx", "-o",
                                    str(out), "--overwrite"], capture_output=True, text=True, env=env)
                if r.returncode:
                    raise RuntimeError(r.stdout + r.stderr)
            exports["exact" if exact else "fp16_biases"] = out
        del lm
        res_file = work / "mlx-result.json"
        r = subprocess.run([args.mlx_python, __file__, "--mlx-side", "--windows-file", str(work / "windows.npy"), "--exports",
                            *map(str, exports.values()), "--prompt-ids", json.dumps(prompt_ids), "--result",
                            str(res_file), "--new-tokens", str(args.new_tokens)],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        row = {"model": label, "source": str(spec), "windows": n,
               "eqat": {"ppl": eqat_ppl, "seconds": eqat_seconds, "greedy": eqat_greedy}}
        if r.returncode:
            row["mlx_error"] = (r.stdout + r.stderr)[-2000:]
        else:
            mres = json.loads(res_file.read_text())
            for kind, path in exports.items():
                m = mres[str(path)]
                row[f"mlx_{kind}"] = {
                    "ppl": m["ppl"], "seconds": m["seconds"], "rel_diff": m["ppl"] / eqat_ppl - 1,
                    "greedy_equal": m["greedy"] == eqat_greedy,
                    "greedy_first_difference": next((i for i, (a, b) in enumerate(zip(m["greedy"], eqat_greedy))
                                                     if a != b), None),
                    "greedy": m["greedy"],
                    "size_bytes": sum(f.stat().st_size for f in path.iterdir()),
                }
        print(json.dumps({k: (v if k != "eqat" else {"ppl": v["ppl"]}) for k, v in row.items()
                          if k in ("model", "eqat", "mlx_error")} |
                         {k: {kk: row[k][kk] for kk in ("ppl", "rel_diff", "greedy_equal")}
                          for k in row if k.startswith("mlx_") and k != "mlx_error"}), flush=True)
        result["models"].append(row)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
