"""End-to-end generation: tokens/s and memory of the full-precision model vs the quantized one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from eqat_cli.benchmark.config import BenchConfig, Progress, no_progress
from eqat_cli.benchmark.rss import PeakRSS, own_weights
from eqat_cli.benchmark.sizes import model_weight_bytes
from eqat_cli.benchmark.timing import device_sync, summarize
from eqat_cli.errors import BadInputError, EqatError
from eqat_cli.formats.checkpoint import Checkpoint, detect_format
from eqat_cli.memory import release_memory, rss_bytes
from eqat_cli.models import attach_backend, resolve
from eqat_cli.progress import count


def measure_generation(
    model,
    input_ids,
    new_tokens: int,
    repeats: int,
    warmup: int = 1,
    eos_token_id: Any = None,
    pad_token_id: Any = None,
    sync=None,
    progress: Progress = no_progress,
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
        count(progress, "generate", f"{label} (warm-up)", i, warmup)
        run()
    sync()
    secs = []
    for i in range(repeats):
        count(progress, "generate", label, i, repeats)
        t0 = time.perf_counter()
        run()
        sync()
        secs.append(time.perf_counter() - t0)
    count(progress, "generate", label, repeats, repeats)
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
    try:
        meta = Checkpoint.open(path).meta
    except (OSError, ValueError, BadInputError):
        return None
    return (meta.source_model or meta.extra.get("source")) if meta is not None else None


def bench_model(
    cfg: BenchConfig, path: Path, device, progress: Progress = no_progress,
    compare: list[str] | tuple[str, ...] = (),
) -> dict:
    """End-to-end generation speed and memory: the full-precision model vs the quantized one.

    A full-precision directory is RTN-quantized in process at ``cfg.bits``/``cfg.group`` after its
    own run. An already-quantized directory is loaded as is; its full-precision counterpart is
    the source its ``eqat`` config section names (skipped, with a note, when there is none).
    Each backend named in ``compare`` runs the same quantized model again (variant
    ``quant-<name>``). ``cfg.head_bits`` quantizes the embedding and lm_head of the quantized
    variant too (:func:`eqat_cli.quantize.quantize_head`).
    """
    import torch

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
        count(progress, "load", "full precision", 0, 1)
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            lm = resolve(str(path), device=str(device))
            own_weights(lm.model)
        dtype = str(lm.model.dtype).replace("torch.", "")
        run_variant("fp", lm, peak.peak, time.perf_counter() - t0,
                    {"format": "fp", "dtype": dtype, "description": f"full precision, {dtype}"})
        count(progress, "load", "quantize (RTN)", 0, 1)
        from eqat_cli.quantize import rtn_quantize_model

        t0 = time.perf_counter()
        with PeakRSS() as peak:
            with torch.no_grad():
                rtn_quantize_model(lm.model.cpu(), lm.arch, cfg.scheme)
                if cfg.head_bits:
                    from eqat_cli.quantize import head_scheme, quantize_head

                    quantize_head(lm.model, lm.arch, head_scheme(cfg.head_bits))
            lm.model.to(device)
            why = attach_backend(lm.model, cfg.backend, cfg.bits, torch.device(device).type,
                                 cfg.group, arch=lm.arch)
            release_memory()
        head = (f", embedding and lm_head {cfg.head_bits}-bit" if cfg.head_bits else "")
        run_variant("quant", lm, peak.peak, time.perf_counter() - t0,
                    {"format": "rtn", "bits": cfg.bits, "group": cfg.group, "backend": why,
                     "head_bits": cfg.head_bits,
                     "description": f"w{cfg.bits}g{cfg.group} min-max (RTN) quantized in "
                                    f"process, decoder linear layers packed{head}; {why}"})
        for name in compare:
            why = attach_backend(lm.model, name, cfg.bits, torch.device(device).type, cfg.group,
                                 arch=lm.arch)
            run_variant(f"quant-{name}", lm, peak.peak, time.perf_counter() - t0,
                        {"format": "rtn", "bits": cfg.bits, "group": cfg.group, "backend": why,
                         "head_bits": cfg.head_bits,
                         "description": f"the same quantized model{head}; {why}"})
        del lm
    else:
        count(progress, "load", "quantized", 0, 1)
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            lm = resolve(str(path), device=str(device), backend=cfg.backend,
                         head_bits=cfg.head_bits)
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
        for name in compare:
            why = attach_backend(lm.model, name, q.get("bits"), torch.device(device).type,
                                 q.get("group_size"), arch=lm.arch)
            run_variant(f"quant-{name}", lm, peak.peak, time.perf_counter() - t0,
                        {"format": fmt, "bits": q.get("bits"), "group": q.get("group_size"),
                         "backend": why, "description": f"the same checkpoint; {why}"})
        del lm
        release_memory()
        source = _eqat_source(path)
        if source is None:
            notes.append(
                "no full-precision comparison: the checkpoint's eqat config section names no "
                "source model"
            )
        else:
            count(progress, "load", "full precision", 0, 1)
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
        for name in compare:
            other = variants.get(f"quant-{name}")
            if other is not None:
                result["ratios"][f"speed_quant_{name}_over_fp"] = (
                    other["tokens_per_s"]["median"] / fp_tps
                )
    return result
