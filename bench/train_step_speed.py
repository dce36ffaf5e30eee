"""Block-AP and E2E-QP step time beside a dense fp32 forward+backward of the same block, in one run.

For each block shape (``smollm2``: block 3 of the shipped SmolLM2; ``llama2-7b``: a Llama-2-7B
block, 4096 x 11008, with random weights), on the same random batch, interleaved and repeated
(the median is reported, so a changing load on the shared machine affects all alike):

* ``dense``: the full-precision block, fp32 forward + backward, every weight's gradient;
* ``bap-{round,free}-w{B}-{fused,reference}``: one Block-AP training step, fp32 (forward, the
  token-rel loss, backward, optimizer step, projection): the default parametrisation ``round``
  (SignSGD) and the paper's ``free`` (AdamW), g64, with the fused C++ fake quantization
  (:mod:`eqat_cli.quant.fused_quant`) or the torch reference path it replaces (before/after in
  one run);
* ``e2e``: one E2E-QP step on the same block packed (RTN codes frozen, step sizes trained, AdamW):
  the per-block equivalent of an E2E-QP step.

Each Block-AP step is also split into forward / backward / optimizer, and the fake quantization
alone (all the block's weights, no matmul) is timed forward and forward+backward. Prints a table of
ratios to ``dense`` and writes JSON.

    flock /work/bench.lock python bench/train_step_speed.py --json bench/results/s14/train_step_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch


def smollm2_block():
    from eqat_cli.models import classify, load_fp, local_path
    from eqat_cli.registry import get_registry

    m, _ = load_fp(local_path(classify("smollm2")), torch.float32)
    m.eval()
    arch = get_registry().architecture_for(m.config.model_type)
    return m, arch, arch.layers(m)[3], 3


def llama7b_block():
    from transformers import LlamaConfig, LlamaForCausalLM

    from eqat_cli.registry import get_registry

    cfg = LlamaConfig(vocab_size=256, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).float().eval()
    arch = get_registry().architecture_for("llama")
    return m, arch, arch.layers(m)[0], 0


SHAPES = {"smollm2": smollm2_block, "llama2-7b": llama7b_block}


class Case:
    """One kind of step, built on demand (``build``) and freed after its timing when ``lean``."""

    def __init__(self, name, build):
        self.name, self.build, self.state = name, build, None
        self.times: list[float] = []
        self.parts: dict[str, list[float]] = {}

    def run(self, lean: bool) -> None:
        if self.state is None:
            self.state = self.build()
            self.state["step"]({})  # warm-up (allocations, library build, kwargs cache)
        parts: dict[str, float] = {}
        t = time.perf_counter()
        self.state["step"](parts)
        self.times.append(time.perf_counter() - t)
        for k, v in parts.items():
            self.parts.setdefault(k, []).append(v)
        if lean:
            self.state = None
            gc.collect()


def make_cases(model, arch, block, index, x, y, bits_list, params, impls, group):
    from eqat_cli.quant import fused_quant
    from eqat_cli.quant.rounding import RoundQuantLinear
    from eqat_cli.quantize import fake_quantize_block, pack_block
    from eqat_cli.scheme import QuantScheme
    from eqat_cli.train.block_ap import BlockAPConfig, block_loss, quantize_block_start
    from eqat_cli.train.block_ap.train import make_optimizer, param_groups
    from eqat_cli.train.e2e_qp.student import trainable_layers, training_kernel

    kw = arch.block_kwargs(model, x, index)
    cpu = torch.device("cpu")

    def dense():
        b = copy.deepcopy(block)
        for p in b.parameters():
            p.requires_grad_(True)

        def step(parts):
            for p in b.parameters():
                p.grad = None
            loss = block_loss(b(x, **kw), y, "token-rel")
            loss.backward()
        return {"step": step}

    def blockap(param, bits, impl):
        def build():
            if param == "round":
                cfg = BlockAPConfig(bits=bits, group_size=group, precision="fp32", channel_scale=False)
            else:
                cfg = BlockAPConfig.paper(bits=bits, group_size=group, precision="fp32")
            b = copy.deepcopy(block)
            quantize_block_start(b, model, arch, cfg, x, len(x), cpu)
            groups, projected = param_groups(b, cfg, 32)
            opt = make_optimizer(groups, cfg)
            layers = [m for m in b.modules() if hasattr(m, "fake_weight") or hasattr(m, "quantizer")]
            ctx = fused_quant.disabled if impl == "reference" else contextlib.nullcontext

            def fq_all():
                return [m.fake_weight() if isinstance(m, RoundQuantLinear) else m.quantizer(m.weight)
                        for m in layers]

            def step(parts):
                with ctx():
                    t0 = time.perf_counter()
                    loss = block_loss(b(x, **kw), y, cfg.loss)
                    t1 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    t2 = time.perf_counter()
                    opt.step()
                    for m in projected:
                        m.project()
                    t3 = time.perf_counter()
                    # The fake quantization alone, forward and forward + backward (not in the step time).
                    with torch.no_grad():
                        fq_all()
                    t4 = time.perf_counter()
                    ws = fq_all()
                    sum((w * w).sum() for w in ws).backward()
                    t5 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                parts.update(forward=t1 - t0, backward=t2 - t1, optimizer=t3 - t2, fq_forward=t4 - t3,
                             fq_forward_backward=t5 - t4)
            return {"step": step}
        return build

    def e2e(bits):
        def build():
            b = copy.deepcopy(block)
            fake_quantize_block(b, arch, QuantScheme(bits, group))
            pack_block(b)
            for p in b.parameters():
                p.requires_grad_(False)
            layers = trainable_layers(b)
            kernel = training_kernel(layers, False)
            ps = []
            for m in layers.values():
                m.set_kernel(kernel)
                ps.extend(m.start_training(False))
            opt = torch.optim.AdamW(ps, lr=1e-5, weight_decay=0.0)

            def step(parts):
                opt.zero_grad(set_to_none=True)
                loss = block_loss(b(x, **kw), y, "token-rel")
                loss.backward()
                opt.step()
            return {"step": step}
        return build

    cases = [Case("dense", dense)]
    for param in params:
        for bits in bits_list:
            for impl in impls:
                cases.append(Case(f"bap-{param}-w{bits}-{impl}", blockap(param, bits, impl)))
    cases.append(Case(f"e2e-w{bits_list[0]}", e2e(bits_list[0])))
    return cases


def run_shape(name, a) -> dict:
    model, arch, block, index = SHAPES[name]()
    batch, seqlen = (a.batch, a.seqlen) if name == "smollm2" else (a.llama_batch, a.llama_seqlen)
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seqlen, hidden, generator=g)
    with torch.no_grad():
        y = block(x, **arch.block_kwargs(model, x, index)) + 0.01 * torch.randn(batch, seqlen, hidden, generator=g)
    cases = make_cases(model, arch, block, index, x, y, a.bits, a.params, a.impls, a.group)
    lean = name != "smollm2"  # a 7B block's cases do not all fit in memory at once
    rounds = a.rounds if name == "smollm2" else a.llama_rounds
    for r in range(rounds):
        for c in cases:
            c.run(lean)
            print(f"  {name} round {r + 1} {c.name:28s} {c.times[-1]:7.3f} s", flush=True)
    dense = statistics.median(cases[0].times)
    rows = []
    for c in cases:
        med = statistics.median(c.times)
        rows.append({"case": c.name, "median_s": med, "ratio_to_dense": med / dense, "times_s": c.times,
                     **{f"{k}_s": statistics.median(v) for k, v in c.parts.items()}})
    del cases
    gc.collect()
    return {"shape": name, "batch": batch, "seqlen": seqlen, "hidden": hidden, "rounds": rounds, "rows": rows}


def print_table(res: dict) -> None:
    print(f"\n{res['shape']}: batch {res['batch']} x {res['seqlen']} tokens, median of {res['rounds']}")
    print(f"{'case':30s} {'step s':>8s} {'x dense':>8s} {'fwd':>7s} {'bwd':>7s} {'opt':>7s} {'fq fwd':>7s} {'fq f+b':>7s}")
    for r in res["rows"]:
        extra = " ".join(f"{r.get(k + '_s', float('nan')):7.3f}" for k in
                         ("forward", "backward", "optimizer", "fq_forward", "fq_forward_backward"))
        print(f"{r['case']:30s} {r['median_s']:8.3f} {r['ratio_to_dense']:8.2f} {extra}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["smollm2", "llama2-7b"], choices=sorted(SHAPES))
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--params", nargs="+", default=["round", "free"], choices=["round", "free"])
    ap.add_argument("--impls", nargs="+", default=["fused", "reference"], choices=["fused", "reference"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--llama-batch", type=int, default=1)
    ap.add_argument("--llama-seqlen", type=int, default=256)
    ap.add_argument("--llama-rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    from eqat_cli.benchmark import machine_info
    from eqat_cli.quant import fused_quant

    torch.manual_seed(0)
    out = {"machine": machine_info() | {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
           "threads": torch.get_num_threads(), "fused_library": fused_quant.library_status()[1],
           "args": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(a).items()}, "shapes": []}
    for name in a.shapes:
        res = run_shape(name, a)
        print_table(res)
        out["shapes"].append(res)
    out["load_avg_end"] = os.getloadavg()
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
