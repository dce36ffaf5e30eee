"""Per-layer latency and weight memory of the CPU kernels (a quick script, not a test).

A thin wrapper over :mod:`eqat_cli.benchmark` (the library behind ``eqat bench``). Compares, for
layer shapes given as IN x OUT (default: Llama-2-7B's 4096x4096, 4096x11008, 11008x4096):

* ``dense``: ``torch.nn.functional.linear`` with the fp32 weight;
* ``torch``: :class:`eqat_cli.quant.torch_kernel.TorchKernel` on the same weight, min-max
  quantized and packed;
* ``reference``: the reference kernel (unpack the whole weight, dequantize, matmul);

at batch 1 (decode) and a 512-token prefill, printing the median latency of several runs with
its spread (min-max), and the weight bytes each keeps resident. ``--model-decode`` also times
greedy generation of a model shaped like SmolLM2-135M (random weights, nothing is downloaded)
in fp32 and RTN-quantized with every decoder linear layer run by ``TorchKernel``.

    python bench/bench_kernels.py --json out.json
    python bench/bench_kernels.py --shapes 4096x4096 --tokens 1 --repeats 20 --model-decode

For named model shapes, end-to-end generation of a real model and the full JSON report, use
``eqat bench`` instead.
"""

from __future__ import annotations

import argparse
import json

import torch

from eqat_cli import benchmark as B
from eqat_cli.quant.torch_kernel import TORCH_KERNEL
from eqat_cli.quant.linear import REFERENCE_KERNEL, PackedLinear
from eqat_cli.scheme import QuantScheme

LLAMA2_7B = ["4096x4096", "4096x11008", "11008x4096"]


def parse_shape(text: str) -> B.LayerShape:
    k, n = (int(v) for v in text.lower().split("x"))
    return B.LayerShape(k, n, (text,))


def cell(row: dict, name: str) -> str:
    if name not in row:
        return f"{'-':>26}"
    s = row[name]
    return f"{s['median']:9.2f} [{s['min']:7.2f}-{s['max']:7.2f}]"


def format_rows(e: dict) -> list[str]:
    wb = e["weight_bytes"]
    resident = (wb["packed"] + wb["kernel_cache"]) / wb["dense"]
    return [
        f"{e['in_features']:>6}x{e['out_features']:<6} M={r['tokens']:<4} | "
        f"dense {cell(r, 'dense')} | reference {cell(r, 'reference')} | "
        f"torch {cell(r, 'quant')} | torch/dense {r['time_ratio']:.2f}x time, "
        f"{resident:.3f}x bytes (packed + zero-point cache)"
        for r in e["batches"]
    ]


def smollm2_like():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def bench_model_decode(bits: int, group: int, new_tokens: int, repeats: int) -> dict:
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    model = smollm2_like()
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    dense = B.measure_generation(model, ids, new_tokens, repeats)
    print(f"SmolLM2-135M-shaped generation, fp32 dense: {dense['ms_per_token']['median']:.1f} "
          f"ms/token [{dense['ms_per_token']['min']:.1f}-{dense['ms_per_token']['max']:.1f}]",
          flush=True)
    arch = get_registry().architecture_for("llama")
    with torch.no_grad():
        rtn_quantize_model(model, arch, QuantScheme(bits, group))
    for mod in model.modules():
        if isinstance(mod, PackedLinear):
            mod.set_kernel(TORCH_KERNEL)
    quant = B.measure_generation(model, ids, new_tokens, repeats)
    ratio = quant["ms_per_token"]["median"] / dense["ms_per_token"]["median"]
    print(f"SmolLM2-135M-shaped generation, {bits}-bit g{group} torch kernel: "
          f"{quant['ms_per_token']['median']:.1f} ms/token "
          f"[{quant['ms_per_token']['min']:.1f}-{quant['ms_per_token']['max']:.1f}] "
          f"= {ratio:.2f}x fp32", flush=True)
    return {"bits": bits, "group": group, "dense": dense, "torch": quant, "torch_over_dense": ratio}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=LLAMA2_7B, help="IN x OUT, e.g. 4096x11008")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--reference-repeats", type=int, default=3)
    p.add_argument("--skip-reference", action="store_true", help="the reference is slow")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--model-decode", action="store_true",
                   help="also time generation of a SmolLM2-135M-shaped model")
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--model-repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args(argv)
    B.BenchConfig(bits=args.bits, group=args.group, repeats=args.repeats).validate()
    if args.threads:
        torch.set_num_threads(args.threads)

    machine = B.machine_info()
    print(f"torch {machine['torch']}, {machine['threads']} threads, {machine['cpu_model']}")
    print("median ms [min-max] per call")
    extra = {} if args.skip_reference else {"reference": (REFERENCE_KERNEL, args.reference_repeats)}
    results = {"machine": machine, "layers": []}
    for i, text in enumerate(args.shapes):
        entry = B.bench_layer(
            parse_shape(text), QuantScheme(args.bits, args.group), TORCH_KERNEL, sorted(set(args.tokens)),
            args.repeats, seed=i, extra_kernels=extra,
        )
        for line in format_rows(entry):
            print(line, flush=True)
        results["layers"].append(entry)
    if args.model_decode:
        results["model_decode"] = bench_model_decode(
            args.bits, args.group, args.new_tokens, args.model_repeats
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
