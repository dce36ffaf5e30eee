"""Benchmarks of packed layers and quantized models: latency, weight memory, generation speed.

The library side of ``eqat bench`` and ``bench/bench_kernels.py``. Nothing here prints or imports
Rich; long steps report through ``progress(stage, label, done, total)``.

What is measured (and what is not):

* **Layer latency**: wall time (``time.perf_counter``; the device is synchronized on CUDA) of one
  forward of a layer at batch 1 (decode) and at a prefill batch, after ``warmup`` untimed runs;
  every figure is the median of ``repeats`` runs with its spread (min, max, quartiles; the raw
  runs are kept). The quantized layer holds random Gaussian weights, min-max (round-to-nearest)
  quantized and packed exactly like a real checkpoint, and runs the selected backend's kernel;
  the dense layer is ``F.linear`` with the same, unquantized weight in the device's usual dtype
  (fp32 on CPU).
* **Layer weight memory**: exact bytes of the tensors each layer keeps: the dense weight, vs the
  packed ``qweight + qzeros + scales + g_idx`` (+ bias). A kernel's own per-layer cache (the
  torch kernel's unpacked zero points) is reported separately as ``kernel_cache``.
* **Generation**: tokens/s of greedy ``generate()`` on a fixed prompt, exactly ``new_tokens`` new
  tokens per run (end-of-sequence suppressed), wall time including the prompt's prefill.
* **Model memory**: ``weight_bytes`` = parameters + buffers (tied tensors once), and the process
  RSS (psutil, plus the kernel's VmHWM high-water mark on Linux, reset before each phase) as a
  delta over the RSS before the model was loaded: after loading, and the peak while loading /
  quantizing and while generating. Weights are copied out of the checkpoint's memory map after
  loading (:func:`own_weights`), so RSS counts them all, touched or not, and memory freed by
  quantization is really returned. RSS includes activations, the KV cache, scratch buffers and
  allocator slack, so it is an upper bound on what the model needs.
"""

from __future__ import annotations

import copy
import os
import platform
import re
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from eqat_cli.errors import BadInputError, UnsupportedError
from eqat_cli.memory import release_memory, rss_bytes

Progress = Callable[[str, str, int, int], None]

# Layer shapes come from model configs: a preset is the config of a published model.
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
        num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000,
    ),
    "llama-3-8b": dict(  # GQA: 8 key/value heads of 128 -> k/v project 4096 -> 1024
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256,
    ),
}
# Small shapes for tests and debugging (not advertised in the help).
DEBUG_PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=128, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=256,
    ),
}
SUPPORTED_BITS = (2, 3, 4, 8)  # eqat_cli.quant.primitives.SUPPORTED_BITS (kept torch-free here)
DEFAULT_PROMPT = "The three most important ideas in the history of computing are"
LAYER_REPEATS = 10
GENERATION_REPEATS = 3


def _noop(stage: str, label: str, done: int, total: int) -> None:
    pass


# ---------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class BenchConfig:
    bits: int = 2
    group: int = 64
    shapes: str = "llama-2-7b"  # a preset name or a model spec (path, alias, Hub id, .gguf)
    backend: str = "auto"
    device: str = "auto"
    prefill_tokens: int = 512
    repeats: Optional[int] = None  # None: LAYER_REPEATS for layers, GENERATION_REPEATS for models
    warmup: int = 2  # untimed layer runs (generation: one untimed run)
    new_tokens: int = 32
    threads: Optional[int] = None
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    generation: bool = True  # with a model spec, also time generation

    @property
    def layer_repeats(self) -> int:
        return self.repeats or LAYER_REPEATS

    @property
    def generation_repeats(self) -> int:
        return self.repeats or GENERATION_REPEATS

    @property
    def batches(self) -> list[int]:
        return sorted({1, self.prefill_tokens})

    def validate(self) -> None:
        """Fail fast on bad numbers, before anything heavy is loaded."""
        if self.bits not in SUPPORTED_BITS:
            raise UnsupportedError(
                f"unsupported bit width {self.bits}; choose one of "
                f"{', '.join(map(str, SUPPORTED_BITS))}"
            )
        if self.group != -1 and self.group < 2:
            raise BadInputError(
                f"group size must be -1 (per-channel) or at least 2, got {self.group}"
            )
        if self.repeats is not None and self.repeats < 2:
            raise BadInputError(
                f"--repeats must be at least 2 (a median needs a spread), got {self.repeats}"
            )
        for name, value, low in (
            ("--prefill-tokens", self.prefill_tokens, 1),
            ("--new-tokens", self.new_tokens, 1),
            ("--warmup", self.warmup, 0),
        ):
            if value < low:
                raise BadInputError(f"{name} must be at least {low}, got {value}")
        if self.threads is not None and self.threads < 1:
            raise BadInputError(f"--threads must be at least 1, got {self.threads}")


# ---------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class LayerShape:
    """One distinct linear-layer shape of a decoder block and the layers that have it."""

    in_features: int
    out_features: int
    names: tuple[str, ...]

    @property
    def label(self) -> str:
        return ",".join(n.rpartition(".")[2] for n in self.names)


@dataclass
class ShapeSet:
    name: str
    source: str  # "preset" or "model"
    shapes: list[LayerShape]
    num_layers: int
    model: dict  # model_type, architecture, hidden/intermediate sizes, heads
    path: Optional[Path] = None  # local directory of a model spec


def _preset_config(kwargs: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**kwargs)


def shapes_from_config(config: Any, name: str, source: str, path: Path | None = None) -> ShapeSet:
    """Distinct linear shapes of one decoder block, from the config alone (no weights).

    Builds a one-block copy of the model on the meta device and reads the in/out features of
    the linear layers the registry's architecture spec lists, so any registered architecture
    works and nothing model-specific is hard-coded here.
    """
    import torch

    from eqat_cli.formats.native import model_class_for
    from eqat_cli.registry import get_registry

    arch = get_registry().architecture_for(config.model_type)
    text = arch.text_config(config)
    num_layers = int(text.num_hidden_layers)
    small = copy.deepcopy(config)
    if hasattr(small, "quantization_config"):
        del small.quantization_config
    small_text = arch.text_config(small)
    small_text.num_hidden_layers = 1
    if isinstance(getattr(small_text, "layer_types", None), list):
        small_text.layer_types = small_text.layer_types[:1]
    with torch.device("meta"):
        model = model_class_for(small)._from_config(small)
    block = arch.layers(model)[0]
    by_shape: dict[tuple[int, int], list[str]] = {}
    for lname in arch.linear_names:
        mod = block.get_submodule(lname)
        by_shape.setdefault((mod.in_features, mod.out_features), []).append(lname)
    shapes = [LayerShape(k, n, tuple(names)) for (k, n), names in by_shape.items()]
    heads = getattr(text, "num_attention_heads", None)
    info = {
        "model_type": config.model_type,
        "architecture": arch.name,
        "hidden_size": getattr(text, "hidden_size", None),
        "intermediate_size": getattr(text, "intermediate_size", None),
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", heads),
        "head_dim": getattr(text, "head_dim", None),
        "num_hidden_layers": num_layers,
    }
    return ShapeSet(name, source, shapes, num_layers, info, path)


def resolve_shapes(spec: str) -> ShapeSet:
    """A preset name (``llama-2-7b``, ``llama-3-8b``) or any model spec the resolver accepts."""
    key = spec.lower()
    if key in PRESETS or key in DEBUG_PRESETS:
        cfg = _preset_config(PRESETS.get(key) or DEBUG_PRESETS[key])
        return shapes_from_config(cfg, key, "preset")
    from eqat_cli.models import ALIASES, classify, local_path

    try:
        source = classify(spec)
    except BadInputError:
        raise BadInputError(
            f"--shapes {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a model "
            f"(local directory, .gguf file, Hub repo id owner/name, or alias "
            f"{', '.join(sorted(ALIASES))})"
        ) from None
    path = local_path(source)
    from eqat_cli.readers import load_config

    config = load_config(path)
    return shapes_from_config(config, spec, "model", path)


# ---------------------------------------------------------------------- measuring


def summarize(values: list[float], unit: str) -> dict:
    """Median and spread of several runs (quartiles by the inclusive method)."""
    if not values:
        raise ValueError("no runs to summarize")
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {
        "unit": unit,
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "runs": len(values),
        "values": list(values),
    }


def time_runs(fn: Callable[[], Any], repeats: int, warmup: int = 2, sync=None) -> dict:
    """Milliseconds per call of ``fn``: ``warmup`` untimed calls, then ``repeats`` timed ones."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times, "ms")


def device_sync(device) -> Callable[[], None] | None:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return None


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def packed_bytes(layer) -> dict:
    """Bytes of each tensor a :class:`PackedLinear` stores, and their total."""
    parts = {
        name: tensor_bytes(getattr(layer, name))
        for name in ("qweight", "qzeros", "scales", "g_idx", "bias")
        if getattr(layer, name, None) is not None
    }
    parts["total"] = sum(parts.values())
    return parts


def kernel_cache_bytes(layer, kernel) -> int:
    """Bytes a kernel keeps per layer beside the packed tensors (after a forward)."""
    if getattr(kernel, "name", None) == "torch":
        import torch

        from eqat_cli.quant.torch_kernel import zero_rows

        return tensor_bytes(zero_rows(layer, torch.uint8))  # the cached uint8 zero points
    return 0


def quantized_random_layer(k: int, n: int, bits: int, group: int, seed: int = 0):
    """``(dense_weight [n, k] fp32, PackedLinear)``: random weights, min-max quantized, packed."""
    import torch
    from torch import nn

    from eqat_cli.quant.linear import QuantLinear

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * 0.02
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
        packed = QuantLinear(lin, bits, group).to_packed()
    return weight, packed


def bench_layer(
    shape: LayerShape,
    bits: int,
    group: int,
    kernel: Any,
    batches: list[int],
    repeats: int,
    warmup: int = 2,
    device: Any = "cpu",
    dtype: Any = None,
    seed: int = 0,
    extra_kernels: Optional[dict[str, tuple[Any, int]]] = None,
    progress: Progress = _noop,
) -> dict:
    """Latency and weight bytes of one quantized layer shape vs the dense layer.

    ``extra_kernels`` maps a name to ``(kernel, repeats)`` to time more kernels on the same packed
    layer (the reference kernel is slow: give it fewer runs).
    """
    import torch
    import torch.nn.functional as F

    dtype = dtype or torch.float32
    k, n = shape.in_features, shape.out_features
    weight, layer = quantized_random_layer(k, n, bits, group, seed)
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
        "bits": bits,
        "group": group,
        "dtype": str(dtype).replace("torch.", ""),
        "kernel": getattr(kernel, "name", type(kernel).__name__),
        "batches": [],
    }
    # no_grad, not inference_mode: the torch kernel keeps per-thread scratch buffers, and one
    # allocated under inference_mode cannot be written later outside it.
    with torch.no_grad():
        for i, m in enumerate(batches):
            progress("layer", f"{shape.label} {k}x{n} tokens={m}", i, len(batches))
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
    progress("layer", f"{shape.label} {k}x{n}", len(batches), len(batches))
    return entry


# ---------------------------------------------------------------------- process memory


def _read_hwm() -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakRSS:
    """Peak process RSS inside a ``with`` block: psutil sampled in a thread, and on Linux the
    kernel's exact high-water mark (VmHWM, reset on entry)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self.method = "psutil sampling"
        self._stop = threading.Event()
        self._hwm = False

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "PeakRSS":
        self._hwm = _reset_hwm()
        if self._hwm:
            self.method = "VmHWM (reset per phase) and psutil sampling"
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        if self._hwm:
            self.peak = max(self.peak, _read_hwm() or 0)


def own_weights(model) -> None:
    """Copy parameters and buffers into process memory (out of the checkpoint's memory map).

    transformers maps safetensors files and pages weights in on first touch; the map lives as
    long as any tensor of the file does. Copying makes RSS count every weight right after
    loading, and makes memory freed later (RTN replacing the dense weights) really go back.
    """
    import torch

    with torch.no_grad():
        for param in model.parameters():  # tied parameters are one object: they stay tied
            param.data = param.data.clone()
        copies: dict[int, Any] = {}
        for mod in model.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None:
                    mod._buffers[name] = copies.setdefault(id(buf), buf.clone())
    release_memory()


def model_weight_bytes(model) -> dict:
    """Parameters + buffers (tied tensors once), and how much of it is packed layers."""
    from eqat_cli.quant.linear import PackedLinear

    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(t)
    packed = sum(packed_bytes(m)["total"] for m in model.modules() if isinstance(m, PackedLinear))
    return {"total": total, "packed_layers": packed}


# ---------------------------------------------------------------------- generation


def measure_generation(
    model,
    input_ids,
    new_tokens: int,
    repeats: int,
    warmup: int = 1,
    eos_token_id: Any = None,
    pad_token_id: Any = None,
    sync=None,
    progress: Progress = _noop,
    label: str = "",
) -> dict:
    """Greedy ``generate()`` of exactly ``new_tokens`` tokens, ``repeats`` timed runs."""
    import torch
    from transformers import GenerationConfig

    gc_ = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id if pad_token_id is not None else eos_token_id,
    )
    mask = torch.ones_like(input_ids)
    sync = sync or (lambda: None)
    out = None

    def run():
        nonlocal out
        out = model.generate(input_ids, attention_mask=mask, generation_config=gc_)

    for i in range(warmup):
        progress("generate", f"{label} (warm-up)", i, warmup)
        run()
    sync()
    secs = []
    for i in range(repeats):
        progress("generate", label, i, repeats)
        t0 = time.perf_counter()
        run()
        sync()
        secs.append(time.perf_counter() - t0)
    progress("generate", label, repeats, repeats)
    produced = out.shape[1] - input_ids.shape[1]
    if produced != new_tokens:
        raise RuntimeError(f"generate() produced {produced} tokens, expected {new_tokens}")
    return {
        "prompt_tokens": int(input_ids.shape[1]),
        "new_tokens": new_tokens,
        "tokens_per_s": summarize([new_tokens / s for s in secs], "tokens/s"),
        "ms_per_token": summarize([1e3 * s / new_tokens for s in secs], "ms"),
        "output_ids": out[0, input_ids.shape[1]:].tolist(),
    }


def _eqat_source(path: Path) -> str | None:
    from eqat_cli.formats.native import eqat_section

    try:
        section = eqat_section(path) or {}
    except (OSError, ValueError, BadInputError):
        return None
    return section.get("source_model") or section.get("source")


def bench_model(cfg: BenchConfig, path: Path, device, progress: Progress = _noop) -> dict:
    """End-to-end generation speed and memory: the full-precision model vs the quantized one.

    A full-precision directory is RTN-quantized in process at ``cfg.bits``/``cfg.group`` after its
    own run. An already-quantized directory is loaded as is; its full-precision counterpart is
    the source its ``eqat`` config section names (skipped, with a note, when there is none).
    """
    import torch

    from eqat_cli.formats.detect import detect_format
    from eqat_cli.models import attach_backend, resolve

    notes: list[str] = []
    variants: dict[str, dict] = {}
    sync = device_sync(device)
    release_memory()
    baseline = rss_bytes()

    def encode(tok):
        ids = tok(cfg.prompt, return_tensors="pt").input_ids.to(device)
        if ids.shape[1] == 0:
            raise BadInputError("the prompt encodes to no tokens")
        return ids

    def run_variant(name: str, lm, load_peak: int, load_s: float, extra: dict) -> None:
        release_memory()
        after_load = rss_bytes()
        ids = encode(lm.tokenizer)
        with PeakRSS() as peak:
            gen = measure_generation(
                lm.model, ids, cfg.new_tokens, cfg.generation_repeats, 1,
                eos_token_id=lm.tokenizer.eos_token_id, pad_token_id=lm.tokenizer.pad_token_id,
                sync=sync, progress=progress, label=name,
            )
        text = lm.tokenizer.decode(gen.pop("output_ids"), skip_special_tokens=True)
        variants[name] = {
            **extra,
            "load_s": load_s,
            "weight_bytes": model_weight_bytes(lm.model),
            "rss": {
                "baseline": baseline,
                "after_load_delta": after_load - baseline,
                "load_peak_delta": load_peak - baseline,
                "generate_peak_delta": peak.peak - baseline,
                "method": peak.method,
            },
            **gen,
            "sample_text": text[:200],
        }

    fmt = detect_format(path)
    if fmt == "fp":
        progress("load", "full precision", 0, 1)
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            lm = resolve(str(path), device=str(device))
            own_weights(lm.model)
        dtype = str(lm.model.dtype).replace("torch.", "")
        run_variant("fp", lm, peak.peak, time.perf_counter() - t0,
                    {"format": "fp", "dtype": dtype, "description": f"full precision, {dtype}"})
        progress("load", "quantize (RTN)", 0, 1)
        from eqat_cli.quantize import rtn_quantize_model

        t0 = time.perf_counter()
        with PeakRSS() as peak:
            with torch.no_grad():
                rtn_quantize_model(lm.model.cpu(), lm.arch, cfg.bits, cfg.group)
            lm.model.to(device)
            why = attach_backend(lm.model, cfg.backend, cfg.bits, torch.device(device).type,
                                 cfg.group)
            release_memory()
        run_variant("quant", lm, peak.peak, time.perf_counter() - t0,
                    {"format": "rtn", "bits": cfg.bits, "group": cfg.group, "backend": why,
                     "description": f"w{cfg.bits}g{cfg.group} min-max (RTN) quantized in "
                                    f"process, decoder linear layers packed; {why}"})
        del lm
    else:
        progress("load", "quantized", 0, 1)
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            lm = resolve(str(path), device=str(device), backend=cfg.backend)
            own_weights(lm.model)
        q = lm.quant
        if (q.get("bits"), q.get("group_size")) != (cfg.bits, cfg.group):
            notes.append(
                f"the model is stored as w{q.get('bits')}g{q.get('group_size')}; its generation "
                f"figures are for that, not for --bits {cfg.bits} --group {cfg.group}"
            )
        run_variant("quant", lm, peak.peak, time.perf_counter() - t0,
                    {"format": fmt, "bits": q.get("bits"), "group": q.get("group_size"),
                     "backend": q.get("backend"),
                     "description": f"{fmt} checkpoint w{q.get('bits')}g{q.get('group_size')} "
                                    f"loaded as is; {q.get('backend')}"})
        del lm
        release_memory()
        source = _eqat_source(path)
        if source is None:
            notes.append(
                "no full-precision comparison: the checkpoint's eqat config section names no "
                "source model"
            )
        else:
            from eqat_cli.errors import EqatError

            progress("load", "full precision", 0, 1)
            baseline = rss_bytes()
            t0 = time.perf_counter()
            try:
                with PeakRSS() as peak:
                    lm = resolve(source, device=str(device))
                    own_weights(lm.model)
            except EqatError as e:
                notes.append(f"no full-precision comparison: source {source!r}: {e}")
                lm = None
            if lm is not None and lm.format != "fp":
                notes.append(f"no full-precision comparison: source {source!r} is {lm.format}")
                lm = None
            if lm is not None:
                dtype = str(lm.model.dtype).replace("torch.", "")
                run_variant("fp", lm, peak.peak, time.perf_counter() - t0,
                            {"format": "fp", "source": source, "dtype": dtype,
                             "description": f"full precision source {source}, {dtype}"})
                del lm
    release_memory()
    result: dict[str, Any] = {"variants": variants, "notes": notes}
    if "fp" in variants and "quant" in variants:
        fp, qv = variants["fp"], variants["quant"]
        fp_tps, q_tps = fp["tokens_per_s"]["median"], qv["tokens_per_s"]["median"]
        result["ratios"] = {
            "speed_quant_over_fp": q_tps / fp_tps,
            "slowdown_fp_over_quant": fp_tps / q_tps,
            "weight_bytes_quant_over_fp": qv["weight_bytes"]["total"] / fp["weight_bytes"]["total"],
            "rss_generate_peak_quant_over_fp": (
                qv["rss"]["generate_peak_delta"] / fp["rss"]["generate_peak_delta"]
                if fp["rss"]["generate_peak_delta"] > 0 else None
            ),
        }
        result["same_text"] = fp["sample_text"] == qv["sample_text"]
    return result


# ---------------------------------------------------------------------- the whole run


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


def plan(cfg: BenchConfig) -> Plan:
    """Validate, pick the backend (with the registry's explanation) and resolve the shapes."""
    cfg.validate()
    import torch

    from eqat_cli.device import compute_dtype, pick_device
    from eqat_cli.registry import get_registry

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
    shapes = resolve_shapes(cfg.shapes)
    return Plan(cfg, dev, compute_dtype(dev), backend, shapes, spec.kernel())


def run(p: Plan, progress: Progress = _noop) -> dict:
    """Every measurement of a plan, as one JSON-ready dict."""
    cfg = p.cfg
    t_start = time.perf_counter()
    layers = []
    for i, shape in enumerate(p.shapes.shapes):
        progress("shapes", p.shapes.name, i, len(p.shapes.shapes))
        layers.append(
            bench_layer(
                shape, cfg.bits, cfg.group, p.kernel, cfg.batches, cfg.layer_repeats,
                cfg.warmup, p.device, p.dtype, seed=cfg.seed + i, progress=progress,
            )
        )
        release_memory()
    progress("shapes", p.shapes.name, len(layers), len(layers))
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
    summary["memory_ratio_max"] = max(e["memory_ratio"] for e in layers)

    generation = None
    if cfg.generation and p.shapes.source == "model" and p.shapes.path is not None:
        generation = bench_model(cfg, p.shapes.path, p.device, progress)
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
