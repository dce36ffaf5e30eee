"""SmolLM2 `eqat generate` speed: fp32 vs packed w2g64 and w4g64 (RTN), in one run.

Each figure is one `eqat generate` process (greedy, --ignore-eos, exactly --new-tokens tokens after a
prompt of about --prompt-tokens tokens, 2 threads): its prefill and decode tokens/s and peak RSS as
the command reports them. Variants are interleaved (fp32, w2, w4, fp32, w2, w4, ...) so that a load
change on a shared machine hits all alike; the median of --repeats runs is reported, with the
ratio packed/fp32 (the issue's target: >= 1.5x at decode). Packed layers run the backend
`registry.select_backend` picks (what `eqat generate` attaches). Run under the machine lock:

    flock /work/bench.lock python bench/generate_speed.py --json bench/results/generate_speed.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _generate_common import git_head, machine, prompt_of, rtn_checkpoint, run_generate, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--schemes", default="w2g64,w4g64")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    load_start = os.getloadavg()

    variants = {"fp32": args.model}
    for s in args.schemes.split(","):
        bits, group = s[1:].split("g")
        variants[s] = str(rtn_checkpoint(int(bits), int(group), args.model))
    prompt = prompt_of(args.prompt_tokens, args.model)
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    t0 = time.time()
    for r in range(args.repeats):
        for name, model in variants.items():
            extra = ("--backend", args.backend) if name != "fp32" else ()
            d = run_generate(model, prompt, args.new_tokens, args.threads, *extra)
            runs[name].append(d)
            print(f"run {r + 1}/{args.repeats} {name}: prefill {d['prefill_tokens_per_s']:.1f} tok/s, "
                  f"decode {d['decode_tokens_per_s']:.2f} tok/s, peak RSS {d['peak_rss_bytes'] / 2**20:.0f} MiB",
                  file=sys.stderr, flush=True)

    def med(name, key):
        return statistics.median(d[key] for d in runs[name])

    table = {}
    for name in variants:
        first = runs[name][0]
        table[name] = {
            "model": variants[name], "format": first["format"], "quant": first["quant"], "backend": first["backend"],
            "prompt_tokens": first["prompt_tokens"], "new_tokens": first["new_tokens"],
            "prefill_tokens_per_s": med(name, "prefill_tokens_per_s"),
            "decode_tokens_per_s": med(name, "decode_tokens_per_s"),
            "decode_tokens_per_s_runs": [d["decode_tokens_per_s"] for d in runs[name]],
            "prefill_tokens_per_s_runs": [d["prefill_tokens_per_s"] for d in runs[name]],
            "peak_rss_bytes": med(name, "peak_rss_bytes"),
            "same_text_as_first_run": all(d["token_ids"] == first["token_ids"] for d in runs[name]),
        }
    fp = table["fp32"]
    for name, row in table.items():
        row["decode_ratio_vs_fp32"] = row["decode_tokens_per_s"] / fp["decode_tokens_per_s"]
        row["prefill_ratio_vs_fp32"] = row["prefill_tokens_per_s"] / fp["prefill_tokens_per_s"]
    result = {
        "what": "eqat generate speed, fp32 vs packed RTN checkpoints (greedy, --ignore-eos)",
        "config": vars(args) | {"json": str(args.json) if args.json else None},
        "machine": machine() | {"load_avg_start": load_start, "load_avg_end": os.getloadavg()},
        "git_head": git_head(),
        "seconds": time.time() - t0,
        "variants": table,
        "target": "packed decode >= 1.5x fp32 decode",
    }
    print(f"\n| model | backend | prefill tok/s | decode tok/s | decode x fp32 | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for name, row in table.items():
        backend = row["backend"].split(":")[0] if row["quant"] else "fp32 torch"
        print(f"| SmolLM2 {name} | {backend} | {row['prefill_tokens_per_s']:.1f} | {row['decode_tokens_per_s']:.2f} | "
              f"{row['decode_ratio_vs_fp32']:.2f} | {row['peak_rss_bytes'] / 2**20:.0f} |")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
