"""The whole run: :func:`plan` validates and picks the backend, :func:`run` measures everything."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eqat_cli.benchmark.config import BenchConfig, Progress, no_progress
from eqat_cli.benchmark.generation import bench_model
from eqat_cli.benchmark.layer import bench_layer
from eqat_cli.benchmark.shapes import ShapeSet, resolve_shapes
from eqat_cli.memory import release_memory
from eqat_cli.progress import count
from eqat_cli.registry import get_registry


def machine_info() -> dict:
    import torch

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_model": cpu or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import psutil

        info["ram_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


@dataclass
class Plan:
    """A validated run: the backend that will run and why, the shapes, the device."""

    cfg: BenchConfig
    device: Any
    dtype: Any
    backend: dict
    shapes: ShapeSet
    kernel: Any = field(repr=False, default=None)
    compare: dict = field(repr=False, default_factory=dict)  # name -> kernel


def plan(cfg: BenchConfig) -> Plan:
    """Validate, pick the backend (with the registry's explanation) and resolve the shapes."""
    cfg.validate()
    import torch

    from eqat_cli.device import compute_dtype, pick_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = pick_device(cfg.device)
    reg = get_registry()
    spec, why = reg.select_backend(cfg.backend, cfg.bits, dev.type, cfg.group)
    candidates = [
        {"name": s.name, "priority": s.priority, "usable": ok, "reason": reason}
        for s, ok, reason in reg.explain_backends(cfg.bits, dev.type, cfg.group)
    ]
    backend = {"requested": cfg.backend, "name": spec.name, "why": why, "candidates": candidates}
    compare = {}
    for name in cfg.compare:
        other, other_why = reg.select_backend(name, cfg.bits, dev.type, cfg.group)
        if other.name != spec.name:
            compare[other.name] = other.kernel()
    backend["compare"] = list(compare)
    shapes = resolve_shapes(cfg.shapes)
    return Plan(cfg, dev, compute_dtype(dev), backend, shapes, spec.kernel(), compare)


def bench_from_spec(cfg: BenchConfig, progress: Progress = no_progress) -> dict:
    """``eqat bench``'s library side: :func:`plan` (validation first, before torch is imported),
    report ``progress("planned", {"plan": plan})``, then :func:`run` it."""
    p = plan(cfg)
    progress("planned", {"plan": p})
    return run(p, progress)


def run(p: Plan, progress: Progress = no_progress) -> dict:
    """Every measurement of a plan, as one JSON-ready dict."""
    cfg = p.cfg
    t_start = time.perf_counter()
    layers = []
    for i, shape in enumerate(p.shapes.shapes):
        count(progress, "shapes", p.shapes.name, i, len(p.shapes.shapes))
        layers.append(
            bench_layer(
                shape, cfg.scheme, p.kernel, cfg.batches, cfg.layer_repeats,
                cfg.warmup, p.device, p.dtype, seed=cfg.seed + i, progress=progress,
                extra_kernels={name: (k, cfg.layer_repeats) for name, k in p.compare.items()},
            )
        )
        release_memory()
    count(progress, "shapes", p.shapes.name, len(layers), len(layers))
    per_block_dense = sum(e["weight_bytes"]["dense"] * len(e["names"]) for e in layers)
    per_block_packed = sum(e["weight_bytes"]["packed"] * len(e["names"]) for e in layers)
    totals = {
        "num_layers": p.shapes.num_layers,
        "linears_per_block": sum(len(e["names"]) for e in layers),
        "dense_bytes": per_block_dense * p.shapes.num_layers,
        "packed_bytes": per_block_packed * p.shapes.num_layers,
        "memory_ratio": per_block_packed / per_block_dense,
    }
    summary: dict[str, Any] = {}
    for m in cfg.batches:
        ratios = [r["time_ratio"] for e in layers for r in e["batches"] if r["tokens"] == m]
        kind = "decode" if m == 1 else "prefill"
        summary[f"{kind}_time_ratio_max"] = max(ratios)
        summary[f"{kind}_time_ratio_min"] = min(ratios)
        for name in p.compare:
            other = [r[name]["median"] / r["dense"]["median"]
                     for e in layers for r in e["batches"] if r["tokens"] == m]
            summary[f"{kind}_time_ratio_max_{name}"] = max(other)
            summary[f"{kind}_time_ratio_min_{name}"] = min(other)
    summary["memory_ratio_max"] = max(e["memory_ratio"] for e in layers)

    generation = None
    if cfg.generation and p.shapes.source == "model" and p.shapes.path is not None:
        generation = bench_model(cfg, p.shapes.path, p.device, progress, compare=list(p.compare))
        if "ratios" in generation:
            summary["generation_slowdown"] = generation["ratios"]["slowdown_fp_over_quant"]
            summary["generation_weight_ratio"] = generation["ratios"]["weight_bytes_quant_over_fp"]

    config = asdict(cfg)
    config.update(
        repeats_layers=cfg.layer_repeats, repeats_generation=cfg.generation_repeats,
        batches=cfg.batches, device=str(p.device), dtype=str(p.dtype).replace("torch.", ""),
    )
    return {
        "config": config,
        "machine": machine_info(),
        "backend": p.backend,
        "shapes": {
            "name": p.shapes.name,
            "source": p.shapes.source,
            "path": str(p.shapes.path) if p.shapes.path else None,
            "model": p.shapes.model,
        },
        "layers": layers,
        "model_totals": totals,
        "generation": generation,
        "summary": summary,
        "measured": {
            "latency": "wall time per forward (perf_counter); median and spread of the runs "
                       "after warm-up runs",
            "layer_memory": "exact bytes of the tensors a layer keeps: dense weight vs "
                            "qweight+qzeros+scales+g_idx(+bias); kernel caches apart",
            "generation": "greedy generate() of exactly new_tokens tokens on a fixed prompt, "
                          "wall time incl. prompt prefill, after one warm-up run",
            "model_memory": "parameters+buffers (tied once), and process RSS delta over the RSS "
                            "before loading (weights copied out of the checkpoint's memory map): "
                            "after load, peak during load/quantize, peak during generation "
                            "(VmHWM + psutil)",
        },
        "elapsed_s": time.perf_counter() - t_start,
    }
