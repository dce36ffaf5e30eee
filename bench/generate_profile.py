"""Where one decode step of `eqat generate` spends its time (issue #26: what the gap to llama.cpp is made of).

Loads a model as `eqat generate` does (packed layers on the registry's backend), prefills a prompt,
then times --steps one-token decode steps two ways:

* module hooks: the exclusive wall time of the quantized/dense linear layers (the matmuls, unpacking
  included), the LM head, attention (the attention module minus its projections: RoPE, KV cache
  update, softmax(QK)V), norms, MLP activation and embedding; the rest of the step (Python and
  transformers' glue between modules: masks, cache bookkeeping, output objects) is the step time
  minus those; sampling (argmax over the vocabulary) is timed on its own;
* torch.profiler: the aten ops by self CPU time.

    flock /work/bench.lock python bench/generate_profile.py ~/.cache/eqat/bench/smollm2-rtn-w4g64 \\
        --json bench/results/generate_profile_w4g64.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _generate_common import git_head, machine, prompt_of, write_json  # noqa: E402


def category(name: str, mod) -> str | None:
    from torch import nn

    from eqat_cli.quant.linear import PackedLinear

    kind = type(mod).__name__
    if name.endswith("lm_head"):
        return "lm_head"
    if isinstance(mod, PackedLinear):
        return "linear_packed"
    if isinstance(mod, nn.Linear):
        return "linear_dense"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    if "Norm" in kind:
        return "norm"
    if kind.endswith("Attention"):
        return "attention"
    if "act_fn" in name.split(".")[-1] or kind in ("SiLU", "SiLUActivation", "GELUActivation"):
        return "activation"
    if "Rotary" in kind:
        return "rotary"
    return None


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from eqat_cli.generate import SamplingConfig, load_generator, pick_token

    gen = load_generator(args.model, device="cpu", backend=args.backend, threads=args.threads)
    model = gen.model
    ids, _ = gen.encode(prompt_of(args.prompt_tokens))
    cfg = SamplingConfig(max_new_tokens=args.steps + 1, ignore_eos=True)
    gen.generate(ids, SamplingConfig(max_new_tokens=4, ignore_eos=True))  # warm-up

    # exclusive module times through hooks (a stack of running modules)
    totals: dict[str, float] = defaultdict(float)
    stack: list[list] = []  # [category, start, child_time]
    handles = []
    for name, mod in model.named_modules():
        cat = category(name, mod)
        if cat is None:
            continue

        def pre(m, a, cat=cat):
            stack.append([cat, time.perf_counter(), 0.0])

        def post(m, a, o):
            c, t0, child = stack.pop()
            dt = time.perf_counter() - t0
            totals[c] += dt - child
            if stack:
                stack[-1][2] += dt

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))

    cache_kw = "cache" if "cache" in __import__("inspect").signature(model.forward).parameters else "past_key_values"
    dev = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=dev), use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or out.past_key_values
        tok = int(torch.argmax(out.logits[0, -1]))
        totals.clear()
        step_s, sample_s = 0.0, 0.0
        for _ in range(args.steps):
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([[tok]], device=dev), use_cache=True, **{cache_kw: cache})
            t1 = time.perf_counter()
            tok = pick_token(out.logits[0, -1].float().cpu(), None, cfg)
            t2 = time.perf_counter()
            step_s += t1 - t0
            sample_s += t2 - t1
            cache = getattr(out, "cache", None) or out.past_key_values
        for h in handles:
            h.remove()

        # torch.profiler over the same kind of steps (hooks removed)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                out = model(input_ids=torch.tensor([[tok]], device=dev), use_cache=True, **{cache_kw: cache})
                tok = pick_token(out.logits[0, -1].float().cpu(), None, cfg)
                cache = getattr(out, "cache", None) or out.past_key_values
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    top = [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / args.steps,
            "calls_per_step": e.count / args.steps} for e in ops[:20]]

    n = args.steps
    per_step = {k: 1e3 * v / n for k, v in totals.items()}
    per_step["python_and_glue"] = 1e3 * step_s / n - sum(per_step.values())
    per_step["sampling"] = 1e3 * sample_s / n
    total_ms = 1e3 * (step_s + sample_s) / n
    print(f"{args.model}: {gen.info['backend']}")
    print(f"decode step {total_ms:.2f} ms ({1e3 / total_ms:.1f} tok/s), {args.threads} threads, {n} steps after "
          f"{len(ids)} prompt tokens")
    print("| part | ms/step | share |\n|---|---:|---:|")
    for k, v in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.2f} | {100 * v / total_ms:.1f} % |")
    print("\ntop aten ops by self CPU time per step:")
    for e in top[:12]:
        print(f"  {e['op']:<40} {e['self_cpu_ms_per_step']:8.2f} ms  x{e['calls_per_step']:.0f}")
    result = {"model": args.model, "info": gen.info, "config": {k: str(v) if isinstance(v, Path) else v
                                                                for k, v in vars(args).items()},
              "machine": machine() | {"load_avg_end": os.getloadavg()}, "git_head": git_head(),
              "step_ms": total_ms, "parts_ms_per_step": per_step, "top_ops": top}
    write_json(args.json, result)


if __name__ == "__main__":
    main()
