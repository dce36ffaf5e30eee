"""The decode paths of `eqat generate` side by side in one process, interleaved (issue #26, item 3).

One model is loaded once; each repeat runs the same greedy generation (a prompt of about
--prompt-tokens tokens, --steps new tokens, EOS ignored) through each path in turn:

* ``hf``: transformers' forward with its dynamic KV cache (the reference path);
* ``fp32``: eqat's compact decode step (eqat_cli/decode.py, static KV cache) on the backend's
  exact fp32 kernels;
* ``int8``: the compact step with packed layers multiplying int8-rounded activations
  (eqat_cli/quant/cpu_q8.py), as llama.cpp's Q8 activations.

Prints the median decode and prefill tok/s per path, the ratios to ``hf``, and where the greedy
tokens first differ from ``hf``'s. Interleaving makes the ratios meaningful on a shared machine;
the absolute figures are only as good as the machine was quiet (the load average is recorded).

    flock /work/bench.lock python bench/decode_paths.py ~/.cache/eqat/bench/smollm2-rtn-w4g64 \\
        --json bench/results/s14/decode_paths_w4g64.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _generate_common import git_head, machine, prompt_of, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize-head", type=int, choices=(4, 8))
    ap.add_argument("--paths", default="hf,fp32,int8")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from eqat_cli.decode import build_decoder
    from eqat_cli.generate import SamplingConfig, load_generator
    from eqat_cli.memory import peak_rss_bytes

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    gen = load_generator(args.model, device="cpu", threads=args.threads, head_bits=args.quantize_head,
                         decoder="hf")
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_bytes()
    paths = args.paths.split(",")
    decoders, build_s = {}, {}
    for p in paths:
        t0 = time.perf_counter()
        decoders[p] = None if p == "hf" else build_decoder(gen.model, p)
        build_s[p] = time.perf_counter() - t0
        if p != "hf" and decoders[p] is None:
            sys.exit(f"the compact decode step does not describe {args.model}")
    ids, _ = gen.encode(prompt_of(args.prompt_tokens))
    cfg = SamplingConfig(max_new_tokens=args.steps, ignore_eos=True)
    runs: dict[str, list] = {p: [] for p in paths}
    for p in paths:  # warm-up
        gen.decoder = decoders[p]
        gen.generate(ids, SamplingConfig(max_new_tokens=4, ignore_eos=True))
    for r in range(args.repeats):
        for p in paths:
            gen.decoder = decoders[p]
            g = gen.generate(ids, cfg)
            runs[p].append(g)
            print(f"repeat {r + 1}/{args.repeats} {p}: decode {g.decode_tokens_per_s:.1f} tok/s, "
                  f"prefill {g.prefill_tokens_per_s:.1f} tok/s", file=sys.stderr, flush=True)
    ref = runs[paths[0]][0].token_ids
    rows = {}
    for p in paths:
        rs = runs[p]
        toks = rs[0].token_ids
        diff = next((i for i, (a, b) in enumerate(zip(ref, toks)) if a != b), None)
        rows[p] = {"decode_tokens_per_s": statistics.median(g.decode_tokens_per_s for g in rs),
                   "decode_runs": [g.decode_tokens_per_s for g in rs],
                   "prefill_tokens_per_s": statistics.median(g.prefill_tokens_per_s for g in rs),
                   "build_s": build_s[p], "first_token_differing_from_" + paths[0]: diff,
                   "text": rs[0].text}
    base = rows[paths[0]]["decode_tokens_per_s"]
    print(f"\n{args.model} ({gen.info['backend'].split(':')[0]}), {len(ids)} prompt tokens, {args.steps} steps, "
          f"{args.threads} threads, load avg {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"| path | decode tok/s | x {paths[0]} | prefill tok/s | first token != {paths[0]} |\n|---|---:|---:|---:|---:|")
    for p, r in rows.items():
        r["decode_ratio_vs_" + paths[0]] = r["decode_tokens_per_s"] / base
        d = r["first_token_differing_from_" + paths[0]]
        print(f"| {p} | {r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / base:.2f} | "
              f"{r['prefill_tokens_per_s']:.1f} | {'none' if d is None else d} |")
    write_json(args.json, {"model": args.model, "info": gen.info, "config": {k: str(v) if isinstance(v, Path) else v
                                                                            for k, v in vars(args).items()},
                           "machine": machine() | {"load_avg_start": load0, "load_avg_end": os.getloadavg()},
                           "git_head": git_head(), "load_s": load_s, "peak_rss_after_load": rss_loaded,
                           "peak_rss_end": peak_rss_bytes(), "rows": rows})


if __name__ == "__main__":
    main()
