"""Per-layer latency and weight memory of the CPU kernels (a quick script, not a test).

Compares, for Llama-2-7B layer shapes (in x out: 4096x4096, 4096x11008, 11008x4096):

* ``dense``: ``torch.nn.functional.linear`` with an fp32 weight;
* ``reference``: the reference kernel (unpack the whole weight, dequantize, matmul);
* ``torch``: :class:`eqat_cli.quant.cpu_kernel.TorchKernel`;

at batch 1 (decode) and a 512-token prefill, printing the median latency of several runs with
its spread (min-max), and the weight bytes each keeps resident. ``--model-decode`` also times
token-by-token generation of a model shaped like SmolLM2-135M (random weights, nothing is
downloaded) in fp32 and with every linear layer but the head packed and run by ``TorchKernel``.

    python bench/bench_kernels.py --json out.json
    python bench/bench_kernels.py --shapes 4096x4096 --tokens 1 --repeats 20 --model-decode

Random codes are fine for timing: the kernels do the same work whatever the values.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from eqat_cli.quant.cpu_kernel import TORCH_KERNEL, zero_rows
from eqat_cli.quant.linear import REFERENCE_KERNEL, PackedLinear
from eqat_cli.quant.primitives import n_groups

LLAMA2_7B = ["4096x4096", "4096x11008", "11008x4096"]


def random_packed(k: int, n: int, bits: int, group: int, seed: int = 0) -> PackedLinear:
    """A packed layer filled with random (valid) words, without packing a dense weight."""
    g = torch.Generator().manual_seed(seed)
    layer = PackedLinear(k, n, bits, group)
    words = torch.randint(-(2**31), 2**31, layer.qweight.shape, generator=g, dtype=torch.int64)
    if bits == 3:  # 10 codes per word: the top two bits stay zero
        words &= (1 << 30) - 1
    layer.qweight.copy_(words.to(torch.int32))
    zw = torch.randint(-(2**31), 2**31, layer.qzeros.shape, generator=g, dtype=torch.int64)
    layer.qzeros.copy_((zw & ((1 << 30) - 1) if bits == 3 else zw).to(torch.int32))
    layer.scales.data.copy_(torch.rand(n_groups(k, group), n, generator=g) * 0.01 + 1e-3)
    return layer


def timed(fn, repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "runs": repeats,
    }


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def bench_layer(k, n, bits, group, tokens, repeats, ref_repeats, skip_reference):
    layer = random_packed(k, n, bits, group)
    dense_w = torch.randn(n, k) * 0.02
    packed = tensor_bytes(layer.qweight, layer.qzeros, layer.scales, layer.g_idx)
    cached = tensor_bytes(zero_rows(layer, torch.uint8))  # TorchKernel's per-layer cache
    rows = []
    for m in tokens:
        x = torch.randn(m, k)
        with torch.inference_mode():
            entry = {"in": k, "out": n, "bits": bits, "group": group, "tokens": m}
            entry["dense"] = timed(lambda: F.linear(x, dense_w), repeats)
            entry["dense"]["weight_bytes"] = dense_w.numel() * 4
            entry["torch"] = timed(lambda: TORCH_KERNEL.forward(layer, x), repeats)
            entry["torch"]["weight_bytes"] = packed + cached
            if not skip_reference:
                entry["reference"] = timed(
                    lambda: REFERENCE_KERNEL.forward(layer, x), ref_repeats, warmup=1
                )
                entry["reference"]["weight_bytes"] = packed
        entry["torch_over_dense"] = entry["torch"]["median_ms"] / entry["dense"]["median_ms"]
        entry["torch_bytes_over_dense"] = (
            entry["torch"]["weight_bytes"] / entry["dense"]["weight_bytes"]
        )
        rows.append(entry)
        print(format_row(entry), flush=True)
    return rows


def format_row(e: dict) -> str:
    def cell(name):
        if name not in e:
            return f"{'-':>26}"
        r = e[name]
        return f"{r['median_ms']:9.2f} [{r['min_ms']:7.2f}-{r['max_ms']:7.2f}]"

    return (
        f"{e['in']:>6}x{e['out']:<6} M={e['tokens']:<4} | dense {cell('dense')} | "
        f"reference {cell('reference')} | torch {cell('torch')} | "
        f"torch/dense {e['torch_over_dense']:.2f}x time, {e['torch_bytes_over_dense']:.3f}x bytes"
    )


def smollm2_like():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def decode_ms_per_token(model, prompt: int, new_tokens: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    times = []
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times.append((time.perf_counter() - t0) * 1e3)
    times = times[2:]  # warm-up tokens
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "runs": len(times)}


def bench_model_decode(bits: int, group: int, new_tokens: int) -> dict:
    from eqat_cli.quant.linear import replace_linears

    model = smollm2_like()
    dense = decode_ms_per_token(model, 16, new_tokens)
    print(f"SmolLM2-135M-shaped decode, fp32 dense: {dense['median_ms']:.1f} ms/token "
          f"[{dense['min_ms']:.1f}-{dense['max_ms']:.1f}]", flush=True)
    names = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]

    def pack(name, lin):
        layer = random_packed(lin.in_features, lin.out_features, bits, group, seed=len(name))
        layer.set_kernel(TORCH_KERNEL)
        return layer

    replace_linears(model, names, pack)
    quant = decode_ms_per_token(model, 16, new_tokens)
    ratio = quant["median_ms"] / dense["median_ms"]
    print(f"SmolLM2-135M-shaped decode, {bits}-bit g{group} torch kernel: "
          f"{quant['median_ms']:.1f} ms/token [{quant['min_ms']:.1f}-{quant['max_ms']:.1f}] "
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
                   help="also time decoding of a SmolLM2-135M-shaped model")
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}")
    print("median ms [min-max] per call")
    results = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "layers": [],
    }
    for shape in args.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        results["layers"] += bench_layer(
            k, n, args.bits, args.group, args.tokens, args.repeats, args.reference_repeats,
            args.skip_reference,
        )
    if args.model_decode:
        results["model_decode"] = bench_model_decode(args.bits, args.group, args.new_tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
