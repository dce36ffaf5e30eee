"""One quantized layer shape vs the dense layer: latency, kernel error and weight bytes."""

from __future__ import annotations

from typing import Any, Optional

from eqat_cli.benchmark.config import Progress, no_progress
from eqat_cli.benchmark.shapes import LayerShape
from eqat_cli.benchmark.sizes import kernel_cache_bytes, packed_bytes, tensor_bytes
from eqat_cli.benchmark.timing import device_sync, time_runs
from eqat_cli.progress import count
from eqat_cli.scheme import QuantScheme


def quantized_random_layer(k: int, n: int, scheme: QuantScheme, seed: int = 0):
    """``(dense_weight [n, k] fp32, PackedLinear)``: random weights, min-max quantized, packed."""
    import torch
    from torch import nn

    from eqat_cli.quant.linear import QuantLinear

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * 0.02
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
        packed = QuantLinear(lin, scheme).to_packed()
    return weight, packed


def bench_layer(
    shape: LayerShape,
    scheme: QuantScheme,
    kernel: Any,
    batches: list[int],
    repeats: int,
    warmup: int = 2,
    device: Any = "cpu",
    dtype: Any = None,
    seed: int = 0,
    extra_kernels: Optional[dict[str, tuple[Any, int]]] = None,
    progress: Progress = no_progress,
) -> dict:
    """Latency and weight bytes of one quantized layer shape vs the dense layer.

    ``extra_kernels`` maps a name to ``(kernel, repeats)`` to time more kernels on the same packed
    layer (the reference kernel is slow: give it fewer runs).
    """
    import torch
    import torch.nn.functional as F

    dtype = dtype or torch.float32
    k, n = shape.in_features, shape.out_features
    weight, layer = quantized_random_layer(k, n, scheme, seed)
    layer = layer.to(device)
    layer.set_kernel(kernel)
    dense_w = weight.to(device=device, dtype=dtype)
    del weight
    sync = device_sync(device)
    gen = torch.Generator().manual_seed(seed + 1)
    entry: dict[str, Any] = {
        "names": list(shape.names),
        "label": shape.label,
        "in_features": k,
        "out_features": n,
        "bits": scheme.bits,
        "group": scheme.group_size,
        "dtype": str(dtype).replace("torch.", ""),
        "kernel": getattr(kernel, "name", type(kernel).__name__),
        "batches": [],
    }
    # no_grad, not inference_mode: the torch kernel keeps per-thread scratch buffers, and one
    # allocated under inference_mode cannot be written later outside it.
    with torch.no_grad():
        for i, m in enumerate(batches):
            count(progress, "layer", f"{shape.label} {k}x{n} tokens={m}", i, len(batches))
            x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
            row: dict[str, Any] = {"tokens": m}
            row["dense"] = time_runs(lambda: F.linear(x, dense_w), repeats, warmup, sync)
            row["quant"] = time_runs(lambda: layer(x), repeats, warmup, sync)
            for name, (kern, reps) in (extra_kernels or {}).items():
                row[name] = time_runs(lambda: kern.forward(layer, x), reps, min(warmup, 1), sync)
            row["time_ratio"] = row["quant"]["median"] / row["dense"]["median"]
            entry["batches"].append(row)
        # The kernel computes what the packed codes say: compare with dequantize-then-matmul.
        x = torch.randn(1, k, generator=gen).to(device=device, dtype=dtype)
        y = layer(x).float()
        y_ref = F.linear(x.float(), layer.dequantize(torch.float32))
        entry["kernel_rel_error"] = float((y - y_ref).norm() / y_ref.norm().clamp_min(1e-30))
        # Quantization error of the layer (random weights, RTN): dense vs quantized output.
        y_dense = F.linear(x, dense_w).float()
        entry["quantization_rel_error"] = float(
            (y - y_dense).norm() / y_dense.norm().clamp_min(1e-30)
        )
    pb = packed_bytes(layer)
    dense_bytes = tensor_bytes(dense_w)
    cache = kernel_cache_bytes(layer, kernel)
    entry["weight_bytes"] = {
        "dense": dense_bytes,
        "packed": pb["total"],
        "packed_parts": {key: v for key, v in pb.items() if key != "total"},
        "kernel_cache": cache,
    }
    entry["memory_ratio"] = pb["total"] / dense_bytes
    entry["memory_ratio_with_cache"] = (pb["total"] + cache) / dense_bytes
    entry["compression"] = dense_bytes / pb["total"]
    entry["bits_per_weight"] = 8 * pb["total"] / (k * n)
    count(progress, "layer", f"{shape.label} {k}x{n}", len(batches), len(batches))
    return entry
