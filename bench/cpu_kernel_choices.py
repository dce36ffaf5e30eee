"""Which engine should run eqat's packed layers on the CPU? The candidates of issue 26, side by
side on the same packed layer, as ratios to the dense fp32 layer in one run (a script, not a test).

* ``dense``: ``F.linear`` with the fp32 weight (the bar);
* ``cpu``: eqat's C++ kernels (:mod:`eqat_cli.quant.cpu_kernel`: decode GEMV reading the packed
  words, prefill dequantized panels + sgemm);
* ``torch``: eqat's torch kernel (:mod:`eqat_cli.quant.torch_kernel`, chunked unpack + matmuls);
* ``int4pack``: torch's own weight-only kernel ``aten._weight_int4pack_mm_for_cpu`` on the same
  codes (4-bit storage; eqat's ``s*(q-z)`` is ``s*(q-8) + s*(8-z)``, so its scale/zero tensor is
  ``[s, s*(8-z)]``): with fp32 activations and with bf16 activations (its fast path);
* ``int8pack``: ``aten._weight_int8pack_mm`` (8-bit only: per-channel scales, symmetric codes);
* ``inductor``: ``torch.compile`` (inductor's C++ code generation) of the unpack + matmul written
  in torch (``--no-inductor`` skips its minutes of compilation).

Every figure is the median wall time of ``--repeats`` runs after warm-up; the JSON holds all runs'
medians and spreads plus each candidate's error against the reference kernel.

    python bench/cpu_kernel_choices.py --bits 4 --json bench/results/cpu_kernel_choices_w4.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from eqat_cli.benchmark.layer import quantized_random_layer
from eqat_cli.quant import cpu_kernel as ck
from eqat_cli.quant.linear import REFERENCE_KERNEL
from eqat_cli.quant.primitives import effective_group
from eqat_cli.scheme import QuantScheme
from eqat_cli.quant.torch_kernel import TORCH_KERNEL


def timed(fn, repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(1e3 * (time.perf_counter() - t0))
    runs.sort()
    return {"median": runs[len(runs) // 2], "min": runs[0], "max": runs[-1], "unit": "ms"}


def int4pack_candidate(layer, act_dtype):
    """``aten._weight_int4pack_mm_for_cpu`` on the layer's codes (None when torch refuses it)."""
    k, n = layer.in_features, layer.out_features
    g = effective_group(layer.group_size, k)
    if layer.bits > 4 or k % g:
        return None, "needs codes of at most 4 bits and whole groups"
    codes = layer.codes().t().contiguous()  # [out, in]
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    except RuntimeError as e:
        return None, str(e).splitlines()[0]
    s = layer.scales.float()  # [G, out]
    z = layer.zero_points().float()
    sz = torch.stack([s, s * (8 - z)], dim=-1).to(act_dtype).contiguous()  # [G, out, 2]

    def run(x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(act_dtype), packed, g, sz).float()

    try:
        run(torch.zeros(1, k))
    except RuntimeError as e:
        return None, str(e).splitlines()[0]
    return run, "ok"


def int8pack_candidate(layer):
    if layer.bits != 8:
        return None, "8-bit layers only"
    w = layer.dequantize()  # [out, in]; symmetric per-channel re-quantization of the same weight
    scale = w.abs().amax(1).clamp_min(1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)

    def run(x):
        return torch.ops.aten._weight_int8pack_mm(x, q, scale)

    return run, "re-quantized symmetric per channel (not the same codes)"


def inductor_candidate(layer):
    """The unpack + matmul written in torch, compiled by inductor (C++ code generation)."""
    bits, k, n = layer.bits, layer.in_features, layer.out_features
    pf, g = 32 // bits, effective_group(layer.group_size, k)
    shifts = (torch.arange(pf, dtype=torch.int32) * bits).view(1, pf, 1)
    qz = layer.zero_points().float()
    s = layer.scales.float()
    gidx = torch.arange(k) // g

    def unpack_matmul(x, qweight, shifts, s, qz, gidx):
        q = ((qweight.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1, n)[:k].float()
        w = (q - qz[gidx]) * s[gidx]
        return x @ w

    try:
        fn = torch.compile(unpack_matmul, dynamic=False)
        fn(torch.zeros(1, k), layer.qweight, shifts, s, qz, gidx)
    except Exception as e:  # no compiler, unsupported op: the candidate is out
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return (lambda x: fn(x, layer.qweight, shifts, s, qz, gidx)), "ok"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--decode-shape", default="4096x11008")
    ap.add_argument("--prefill-shape", default="4096x4096")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()

    ok, why = ck.library_status()
    results = {"config": vars(args), "cpu_library": why, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
               "cases": []}
    cases = [("decode", args.decode_shape, 1), ("prefill", args.prefill_shape, args.prefill_tokens)]
    for kind, shape, m in cases:
        k, n = (int(v) for v in shape.split("x"))
        weight, layer = quantized_random_layer(k, n, QuantScheme(args.bits, args.group))
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = REFERENCE_KERNEL.forward(layer, x)
            cands = {"dense": (lambda x: F.linear(x, weight), "fp32 weight")}
            cands["cpu"] = ((lambda x: ck.cpu_kernel().forward(layer, x)) if ok else None, why)
            cands["torch"] = (lambda x: TORCH_KERNEL.forward(layer, x), "ok")
            cands["int4pack-fp32"] = int4pack_candidate(layer, torch.float32)
            cands["int4pack-bf16"] = int4pack_candidate(layer, torch.bfloat16)
            cands["int8pack"] = int8pack_candidate(layer)
            if not args.no_inductor:
                cands["inductor"] = inductor_candidate(layer)
            rows = {}
            for name, (fn, note) in cands.items():
                if fn is None:
                    rows[name] = {"skipped": note}
                    continue
                if name.startswith("int4pack") and m > 1:
                    if name == "int4pack-fp32":  # ~78 s per call at 4096x11008 x 512 in a probe
                        rows[name] = {"skipped": "fp32 activations take minutes per prefill call"}
                        continue
                    t = timed(lambda: fn(x), 1, warmup=0)  # seconds per call: one run
                else:
                    t = timed(lambda: fn(x), args.repeats)
                y = fn(x).float()
                err = float((y - ref).norm() / ref.norm()) if name != "dense" else None
                rows[name] = {"time": t, "rel_error_vs_reference": err, "note": note}
            for row in rows.values():
                if "time" in row:
                    row["ratio_to_dense"] = row["time"]["median"] / rows["dense"]["time"]["median"]
        results["cases"].append({"kind": kind, "shape": shape, "tokens": m, "bits": args.bits,
                                 "group": args.group, "candidates": rows})
        print(f"\n{kind}: {shape}, {m} token(s), w{args.bits}g{args.group}")
        print(f"  {'candidate':<15} {'ms (median [min-max])':>28} {'x dense':>8} {'rel err':>9}")
        for name, row in rows.items():
            if "skipped" in row:
                print(f"  {name:<15} skipped: {row['skipped']}")
                continue
            t = row["time"]
            err = "-" if row["rel_error_vs_reference"] is None else f"{row['rel_error_vs_reference']:.1e}"
            print(f"  {name:<15} {t['median']:10.2f} [{t['min']:7.2f}-{t['max']:8.2f}] "
                  f"{row['ratio_to_dense']:8.2f} {err:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
