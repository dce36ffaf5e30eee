"""``eqat eval`` as one function: validate, load, measure, return a JSON-ready dict.

The CLI builds an :class:`EvalConfig`, calls :func:`validate` (cheap: names, files) before the
model is loaded, then :func:`run_eval` with a progress callback. No Rich, no typer here.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional

from eqat_cli.errors import BadInputError
from eqat_cli.eval.ppl_text import check_ppl_set, perplexity_text
from eqat_cli.eval.zeroshot import plan_tasks, zeroshot
from eqat_cli.fsutil import dir_size
from eqat_cli.models import preflight_model, resolve
from eqat_cli.progress import Progress, count
from eqat_cli.readers import open_safetensors



@dataclass(frozen=True)
class EvalConfig:
    model: str
    ppl: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    seqlen: int = 2048
    limit: Optional[int] = None
    batch_size: int = 1
    device: str = "auto"
    backend: str = "auto"
    data_dir: Optional[Path] = None
    head_bits: Optional[int] = None  # quantize the embedding and lm_head (models.resolve)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["data_dir"] = str(self.data_dir) if self.data_dir else None
        d["ppl"], d["tasks"] = list(self.ppl), list(self.tasks)
        return d


def split_list(value: Optional[str]) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    if not value:
        return ()
    return tuple(x.strip() for x in value.split(",") if x.strip())


def validate(cfg: EvalConfig) -> list:
    """Check everything that can be checked before loading the model; return the task plans."""
    if not cfg.ppl and not cfg.tasks:
        raise BadInputError("nothing to evaluate: pass --ppl (e.g. wikitext2) and/or --tasks (e.g. piqa)")
    if cfg.seqlen < 2:
        raise BadInputError(f"--seqlen must be at least 2, got {cfg.seqlen}")
    if cfg.limit is not None and cfg.limit < 1:
        raise BadInputError(f"--limit must be at least 1, got {cfg.limit}")
    if cfg.batch_size < 1:
        raise BadInputError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.head_bits not in (None, 4, 8):
        raise BadInputError(f"--quantize-head must be 4 or 8, got {cfg.head_bits}")
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        raise BadInputError(f"data dir not found: {cfg.data_dir}")
    dup = sorted({p for p in cfg.ppl if cfg.ppl.count(p) > 1})
    if dup:
        raise BadInputError(f"perplexity set listed twice: {', '.join(dup)}")
    for name in cfg.ppl:
        check_ppl_set(name, cfg.data_dir)
    return plan_tasks(list(cfg.tasks), cfg.data_dir) if cfg.tasks else []


# ---------------------------------------------------------------------- model facts


def model_files(loaded: Any) -> Optional[Path]:
    """The file or directory the model was loaded from (a .gguf file for GGUF)."""
    src = loaded.source
    if src.kind == "gguf" and src.path is not None:
        return Path(src.path) / src.gguf_file
    return Path(loaded.path) if loaded.path is not None else None


_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8}


def _disk_weight_bits(path: Path, names: list[str]) -> Optional[int]:
    """Bit width of these ``*.weight`` tensors in the safetensors files (None if unknown/mixed)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    wanted, found = {f"{n}.weight" for n in names}, set()
    for f in files:
        with open_safetensors(f, "safetensors weight shard") as fh:
            for key in wanted & set(fh.keys()):
                found.add(_DTYPE_BITS.get(fh.get_slice(key).get_dtype()))
    return found.pop() if len(found) == 1 else None


def bits_per_weight(model: Any, arch: Any, path: Optional[Path]) -> dict:
    """Bits per weight of the decoder linear layers.

    Quantized layers: ``effective`` = (codes + fp16 scales + packed zeros) / weights, measured
    from the packed layers; ``formula`` = FORMATS.md ``bits + (16 + bits) / group`` (weighted
    by layer size); ``storage`` = every stored tensor of those layers (int32 words with padding,
    fp16 scales, g_idx) / weights. Full precision: the on-disk dtype width of the same layers.
    """
    from torch import nn

    from eqat_cli.quant.linear import PackedLinear
    from eqat_cli.quant.primitives import effective_group

    params = code = scale = zero = storage = formula = 0.0
    layers = packed_param_numel = 0
    fp_names: list[str] = []
    prefix = arch.layers_path if arch is not None else ""
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            n = m.in_features * m.out_features
            g = effective_group(m.group_size, m.in_features)
            groups, out = m.scales.shape[0], m.out_features
            layers += 1
            params += n
            code += n * m.bits
            scale += groups * out * 16
            zero += groups * out * m.bits
            storage += (m.qweight.numel() + m.qzeros.numel() + m.g_idx.numel()) * 32
            storage += m.scales.numel() * 16 + (m.bias.numel() * 16 if m.bias is not None else 0)
            formula += n * (m.bits + (16 + m.bits) / g)
            packed_param_numel += sum(p.numel() for p in m.parameters(recurse=False))
        elif isinstance(m, nn.Linear) and prefix and name.startswith(prefix + "."):
            fp_names.append(name)
    # parameters() counts each tied tensor once; packed layers count as their dense weights.
    total_params = sum(p.numel() for p in model.parameters()) - packed_param_numel
    if layers:
        return {
            "quantized": True,
            "quantized_layers": layers,
            "quantized_weights": int(params),
            "effective": (code + scale + zero) / params,
            "formula": formula / params,
            "storage": storage / params,
            "model_params": int(total_params + params),
        }
    bits = _disk_weight_bits(path, fp_names) if (path is not None and fp_names) else None
    return {"quantized": False, "effective": bits, "formula": None, "storage": bits,
            "model_params": int(total_params)}


# ---------------------------------------------------------------------- run


def eval_from_spec(cfg: EvalConfig, progress: Optional[Progress] = None) -> dict:
    """``eqat eval``'s library side: check the sets and tasks (:func:`validate`) and the model spec
    before anything is loaded, report ``progress("start", {"model"})``, then :func:`run_eval`."""
    plans = validate(cfg)  # fail fast, before loading the model
    preflight_model(cfg.model)
    if progress is not None:
        progress("start", {"model": cfg.model})
    return run_eval(cfg, plans, progress)


def run_eval(cfg: EvalConfig, plans: Optional[list] = None, progress: Optional[Progress] = None) -> dict:
    """Load ``cfg.model``, measure perplexity and zero-shot accuracy; return the results dict.

    Progress events count with ``label``/``done``/``total``: ``load`` (the model), ``ppl`` (windows
    of one set), ``task`` (lm-eval requests of one task).
    """
    import torch

    import eqat_cli
    from eqat_cli.eval.perplexity import perplexity

    t_start = time.perf_counter()
    if plans is None:
        plans = validate(cfg)
    count(progress, "load", cfg.model, 0, 1)
    loaded = resolve(cfg.model, device=cfg.device, backend=cfg.backend, require_arch=False,
                     head_bits=cfg.head_bits)
    count(progress, "load", cfg.model, 1, 1)
    model, tok = loaded.model, loaded.tokenizer
    t_loaded = time.perf_counter()
    files = model_files(loaded)
    first = next(model.parameters())
    out: dict = {
        "model": cfg.model,
        "path": str(files) if files else None,
        "format": loaded.format,
        "model_type": model.config.model_type,
        "architecture": getattr(loaded.arch, "name", None),
        "device": str(first.device),
        "dtype": str(first.dtype).replace("torch.", ""),
        "size_on_disk_bytes": dir_size(files) if files and files.exists() else None,
        "quant": {k: v for k, v in loaded.quant.items() if k != "backend"},
        "backend": loaded.quant.get("backend") or "none: full-precision model (plain torch layers)",
        "bits_per_weight": bits_per_weight(model, loaded.arch, files),
        "config": cfg.to_dict(),
        "perplexity": {},
        "zeroshot": {},
        "versions": _versions(eqat_cli.__version__),
    }
    t0 = time.perf_counter()
    for name in cfg.ppl:
        corpus = perplexity_text(name, cfg.data_dir)
        res = perplexity(model, tok, corpus, cfg.seqlen, cfg.limit, cfg.batch_size, progress)
        out["perplexity"][name] = res.to_dict()
    t_ppl = time.perf_counter() - t0
    t0 = time.perf_counter()
    if plans:
        with torch.no_grad():
            for r in zeroshot(model, tok, plans, cfg.data_dir, cfg.limit, cfg.batch_size, progress):
                out["zeroshot"][r.key] = r.to_dict()
    t_zs = time.perf_counter() - t0
    out["timing"] = {
        "load_s": t_loaded - t_start,
        "perplexity_s": t_ppl,
        "zeroshot_s": t_zs,
        "total_s": time.perf_counter() - t_start,
    }
    return out


def _versions(eqat_version: str) -> dict:
    v = {"eqat": eqat_version}
    for pkg in ("torch", "transformers", "lm_eval", "datasets"):
        try:
            v[pkg] = version(pkg.replace("_", "-"))
        except PackageNotFoundError:
            v[pkg] = None
    return v
