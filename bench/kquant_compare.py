"""eqat's k-quant-trained GGUF against llama.cpp's own k-quants with an importance matrix (issue #27, item 2).

On SmolLM2-135M-Instruct (``smollm2``; the shipped Q4_1 GGUF dequantized to fp32 is the "FP" model
eqat and every peer start from), one row per file:

* ``eqat``: ``eqat block-ap smollm2 --target gguf:T`` on the calibration windows
  (/work/runs-h28r/calib-c4-64x256-val8-s2.safetensors), packed with ``eqat pack --format gguf``;
* ``llama.cpp``: ``llama-imatrix`` on the same windows (their token ids decoded to text, one window
  per line, ``-c 256``), then ``llama-quantize --allow-requantize --imatrix`` of the same FP model to
  the type (``--allow-requantize``: the shipped file is Q4_1; llama-quantize dequantizes it to the
  same fp32 weights eqat starts from). ``Q2_K`` and ``Q3_K_S`` are llama.cpp's closest mixes to
  "every linear at the type"; ``Q3_K_M`` (what ``Q3_K`` means to llama-quantize) is listed too.

Every file: its size, bits per linear weight (bytes of the ``blk.*`` matrices over their weights),
its tensor types, ``llama-perplexity`` (WikiText-2 test, ctx 512, 40 chunks) and ``eqat eval`` of the
GGUF itself (WikiText-2, seqlen 512, 40 windows).

Stages, each short enough for one ``flock /work/bench.lock`` (llama.cpp and eqat use 2 threads):

    python bench/kquant_compare.py baseline --type Q2_K      # imatrix once, quantize, evaluate
    python bench/kquant_compare.py eqat --target q2_k --checkpoint /work/runs-h30k/bap-q2_k
    python bench/kquant_compare.py table                      # bench/results/s14/kquant_compare.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_check import llama_perplexity  # noqa: E402

HERE = Path(__file__).resolve().parent
LLAMA_BIN = Path(os.environ.get("LLAMA_CPP_BIN", "/work/bench-rt/llama.cpp/build/bin"))
CALIB = Path("/work/runs-h28r/calib-c4-64x256-val8-s2.safetensors")
DATA = Path(os.environ.get("EQAT_TEST_DATA_DIR", "/work/shared/data"))
WORK = Path(os.environ.get("KQ_WORK", "/work/runs-h30k/kq"))
OUT = HERE / "results" / "s14"
LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def eqat(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}:{HERE.parent / 'kernels'}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "eqat_cli", *args], check=True, env=env)


def fp_gguf() -> Path:
    from eqat_cli.models import smollm2_gguf_path

    return Path(smollm2_gguf_path())


def describe(path: Path) -> dict:
    """Size, bits per linear weight and tensor types, from the GGUF's tensor table."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    lin_bytes = lin_n = 0
    types: dict[str, int] = {}
    lin_types: dict[str, int] = {}
    other: dict[str, str] = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if t.name.startswith("blk.") and t.name.endswith(".weight") and t.name.split(".")[2] in LINEAR:
            lin_bytes += int(t.n_bytes)
            lin_n += int(t.n_elements)
            key = f"{t.name.split('.')[2]}:{t.tensor_type.name}"
            lin_types[key] = lin_types.get(key, 0) + 1
        elif not t.name.startswith("blk."):
            other[t.name] = t.tensor_type.name
    return {"file": str(path), "bytes": path.stat().st_size, "bits_per_linear_weight": round(8 * lin_bytes / lin_n, 4),
            "linear_bytes": lin_bytes, "tensor_types": types, "linear_types": lin_types, "other_tensors": other}


def evaluate(path: Path, threads: int, ctx: int, chunks: int) -> dict:
    row = describe(path)
    row["llama_perplexity"] = llama_perplexity(LLAMA_BIN, path, DATA / "wikitext-2-raw" / "wiki.test.raw",
                                               ctx, chunks, threads)
    jf = path.with_suffix(".eval.json")
    t0 = time.time()
    eqat("eval", str(path), "--ppl", "wikitext2", "--seqlen", str(ctx), "--limit", str(chunks),
         "--json", str(jf), "--data-dir", str(DATA))
    (p,) = json.loads(jf.read_text())["perplexity"].values()
    row["eqat_eval"] = {"ppl": p["ppl"], "seconds": round(time.time() - t0, 1)}
    return row


def calib_text() -> Path:
    """The calibration windows' training token ids, decoded, one window per line."""
    out = WORK / "calib-c4-64x256.txt"
    if not out.exists():
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        from eqat_cli.models import resolve

        ids = load_file(str(CALIB))["train"]
        tok = resolve("smollm2", device="cpu", dtype="fp32").tokenizer or AutoTokenizer.from_pretrained("smollm2")
        out.write_text("\n".join(tok.decode(row.tolist()) for row in ids) + "\n")
    return out


def imatrix(threads: int) -> Path:
    out = WORK / "imatrix-c4-64x256.dat"
    if not out.exists():
        t0 = time.time()
        subprocess.run([str(LLAMA_BIN / "llama-imatrix"), "-m", str(fp_gguf()), "-f", str(calib_text()),
                        "-o", str(out), "-c", "256", "-b", "256", "-t", str(threads)], check=True,
                       capture_output=True)
        (WORK / "imatrix.seconds").write_text(str(round(time.time() - t0, 1)))
    return out


def save_row(name: str, row: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (WORK / f"row-{name}.json").write_text(json.dumps(row, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("baseline", "eqat", "fp", "table"))
    ap.add_argument("--type", help="llama-quantize type for the baseline (Q2_K, Q3_K_S, Q3_K_M, Q4_K_S)")
    ap.add_argument("--target", help="eqat's target (q2_k, q3_k, q4_k)")
    ap.add_argument("--checkpoint", type=Path, help="eqat's Block-AP --target checkpoint")
    ap.add_argument("--label", help="row name (default: from the stage)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    if args.stage == "baseline":
        imat = imatrix(args.threads)
        out = WORK / f"llamacpp-imatrix-{args.type}.gguf"
        subprocess.run([str(LLAMA_BIN / "llama-quantize"), "--allow-requantize", "--imatrix", str(imat),
                        str(fp_gguf()), str(out), args.type, str(args.threads)], check=True, capture_output=True)
        row = {"method": "llama.cpp llama-quantize + llama-imatrix (same windows)", "type": args.type,
               **evaluate(out, args.threads, args.ctx, args.chunks)}
        name = args.label or f"llamacpp-{args.type}"
    elif args.stage == "eqat":
        out = WORK / f"eqat-{args.target}.gguf"
        eqat("pack", str(args.checkpoint), "--format", "gguf", "-o", str(out), "--overwrite")
        summary = {}
        bj = Path(str(args.checkpoint) + ".json")
        if bj.exists():
            b = json.loads(bj.read_text())
            summary = {"block_ap_seconds": b.get("seconds"), "peak_rss_mb": b.get("peak_rss_mb")}
        row = {"method": f"eqat block-ap --target gguf:{args.target}", "type": args.target.upper(),
               "checkpoint": str(args.checkpoint), **summary, **evaluate(out, args.threads, args.ctx, args.chunks)}
        name = args.label or f"eqat-{args.target}"
    elif args.stage == "fp":
        row = {"method": "FP (shipped SmolLM2 GGUF)", "type": "FP", **evaluate(fp_gguf(), args.threads, args.ctx,
                                                                              args.chunks)}
        name = "fp"
    else:
        table()
        return
    row["load_before"] = [round(x, 2) for x in load]
    row["load_after"] = [round(x, 2) for x in os.getloadavg()]
    save_row(name, row)
    print(json.dumps({k: row[k] for k in ("type", "bytes", "bits_per_linear_weight", "llama_perplexity", "eqat_eval")}))


def table() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(WORK.glob("row-*.json"))]
    order = {"FP": 0, "Q2_K": 1, "Q3_K": 2, "Q3_K_S": 2, "Q3_K_M": 2, "Q4_K": 3, "Q4_K_S": 3}
    rows.sort(key=lambda r: (order.get(r["type"], 9), r["method"]))
    lines = ["| method | type | file MiB | bits / linear weight | llama-perplexity | eqat eval |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lp = r["llama_perplexity"].get("ppl") if isinstance(r["llama_perplexity"], dict) else r["llama_perplexity"]
        lines.append(f"| {r['method']} | {r['type']} | {r['bytes'] / 2**20:.2f} | {r['bits_per_linear_weight']:.3f} | "
                     f"{lp:.3f} | {r['eqat_eval']['ppl']:.3f} |")
    OUT.mkdir(parents=True, exist_ok=True)
    md = "\n".join(lines)
    (OUT / "kquant_compare.md").write_text(md + "\n")
    (OUT / "kquant_compare.json").write_text(json.dumps({"protocol": "WikiText-2 test, ctx 512, 40 chunks "
                                                         "(llama-perplexity) / 40 windows of 512 (eqat eval)",
                                                         "rows": rows}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
