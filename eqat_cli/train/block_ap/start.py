"""A block's starting point: min-max (RTN) or GPTQ from the block's own inputs, in the
parametrisation the recipe trains (free weights, or rounding offsets and clipping factors)."""

from __future__ import annotations

import torch

from eqat_cli.quant.gptq import HessianAccumulator, gptq_quantize_with_residue
from eqat_cli.quant.linear import set_submodule
from eqat_cli.quant.primitives import dequantize_codes
from eqat_cli.quant.rounding import RoundQuantLinear
from eqat_cli.quant.scaling import InputStats, apply_scales, search_scales
from eqat_cli.quant.kquant import kquant_block
from eqat_cli.quantize import fake_quantize_block
from eqat_cli.scheme import QuantScheme
from eqat_cli.train.block_ap.blockio import block_kwargs_cached
from eqat_cli.train.block_ap.config import BlockAPConfig

def collect_hessians(block, model, arch, inputs: torch.Tensor, batch: int, device, dtype) -> dict:
    """Input Hessians of every quantizable linear of ``block`` over ``inputs`` (one pass, no grad)."""
    acc, hooks = {}, []
    grams: dict = {}  # per batch: q/k/v (and gate/up) see the same input tensor; multiply once

    def hook(mod, args, out, a):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        # Keyed by identity, and the tensor is kept alive with its product, so no other tensor can
        # take its id (or its memory) while the entry exists.
        if id(args[0]) not in grams:
            grams[id(args[0])] = (args[0], x.float().T @ x.float())
        a.add_gram(grams[id(args[0])][1], x.shape[0])

    for name in arch.linear_names:
        lin = block.get_submodule(name)
        acc[name] = HessianAccumulator(lin.in_features, device=lin.weight.device)
        hooks.append(lin.register_forward_hook(lambda mod, args, out, a=acc[name]: hook(mod, args, out, a)))
    try:
        kw_cache: dict = {}
        with torch.no_grad():
            for s in range(0, len(inputs), batch):
                x = inputs[s : s + batch].to(device=device, dtype=dtype)
                grams.clear()
                block(x, **block_kwargs_cached(kw_cache, arch, model, x, block))
                grams.clear()
    finally:
        for h in hooks:
            h.remove()
    return {name: a.h for name, a in acc.items()}


# Tokens of the block's inputs the scale search measures its error on, and (at least) the tokens
# the mean |x| per channel that sets the candidate scales comes from: whole windows from the
# start, so each window's first position, where massive activations live, keeps its proportion.
SCALE_SEARCH_TOKENS = 2048
SCALE_STATS_TOKENS = 4096


def scale_block_pairs(block, model, arch, inputs: torch.Tensor, batch: int, device, scheme: QuantScheme) -> list[dict]:
    """Fold AWQ-searched per-channel scales into each of the architecture's scale pairs of
    ``block`` (still full precision), from the consumers' inputs over ``inputs`` (the inputs the
    block will train on). The block's function is unchanged. Returns one record per pair."""
    if not arch.scale_pairs:
        return []
    # Consumers of one pair read the same tensor: one hook on the first is enough.
    stats = {consumers[0]: InputStats(SCALE_SEARCH_TOKENS) for _, consumers in arch.scale_pairs}
    hooks = [block.get_submodule(c).register_forward_hook(st) for c, st in stats.items()]
    n_windows = min(len(inputs), -(-SCALE_STATS_TOKENS // inputs.shape[1]))
    try:
        kw_cache: dict = {}
        with torch.no_grad():
            for s in range(0, n_windows, batch):
                x = inputs[s : min(s + batch, n_windows)].to(device=device, dtype=torch.float32)
                block(x, **block_kwargs_cached(kw_cache, arch, model, x, block))
    finally:
        for h in hooks:
            h.remove()
    # Every pair's statistics are taken before any scaling: the scaling keeps each consumer's
    # output, so it changes no other pair's inputs.
    out = []
    for producer, consumers in arch.scale_pairs:
        lins = [block.get_submodule(c) for c in consumers]
        st = stats[consumers[0]]
        weight = torch.cat([lin.weight.detach() for lin in lins])  # consumers side by side: one search
        scales, choice = search_scales(weight, st.sample().to(weight.device), st.mean_abs, scheme)
        apply_scales(block.get_submodule(producer), lins, scales, arch.norm_gain_offset)
        out.append({"pair": f"{producer}->{'+'.join(consumers)}", "alpha": choice.alpha, "error": choice.error,
                    "error_unscaled": choice.error_unscaled})
    return out


def gptq_init_block(quantized: dict, hessians: dict, scheme: QuantScheme | None, damp: float) -> None:
    """Set each :class:`QuantLinear` to its GPTQ solution: GPTQ's step sizes and zero points, and
    weights that fake-quantize to exactly GPTQ's codes, each at the position inside its grid cell
    where GPTQ rounded it (see :func:`gptq_quantize_with_residue`). Block-AP then trains all three
    from this point instead of from min-max."""
    with torch.no_grad():
        for name, q in quantized.items():
            sch = q.scheme if scheme is None else scheme  # None: each layer's own scheme (mixed precision)
            codes, scale, zero, frac = gptq_quantize_with_residue(q.weight, hessians[name], sch, damp)
            w = dequantize_codes(codes.float() + frac, scale, zero, sch.group_size)
            q.weight.copy_(w.to(device=q.weight.device, dtype=q.weight.dtype))
            q.quantizer.scale.copy_(scale.to(q.quantizer.scale.device))
            q.quantizer.zero.copy_(zero.to(q.quantizer.zero.device))


def quantize_block_start(block, model, arch, cfg: BlockAPConfig, inputs: torch.Tensor, batch: int, device,
                         schemes: dict[str, QuantScheme] | None = None) -> dict:
    """Turn ``block`` into its fake-quantized starting point: min-max, or GPTQ with the Hessians of
    ``inputs`` (the inputs the block will train on). Returns the fake-quant modules by name:
    :class:`QuantLinear` (``param="free"``) or :class:`RoundQuantLinear` (``param="round"``), both
    at exactly that starting point. ``schemes`` (mixed precision): a ``QuantScheme`` per linear name
    of the block, instead of the config's scheme."""
    cfg = cfg.resolve(len(inputs))
    if cfg.target_type is not None:  # the GGML grid's own start (quant/kquant.py init_params)
        return kquant_block(block, cfg.target_type, list(arch.linear_names))
    hessians = None
    if cfg.init == "gptq":
        hessians = collect_hessians(block, model, arch, inputs, batch, device, torch.float32)
    quantized = fake_quantize_block(block, arch, cfg.scheme, schemes)
    if hessians is not None:
        gptq_init_block(quantized, hessians, None, cfg.gptq_damp)  # each layer's own scheme
    if cfg.param == "round":
        quantized = {name: RoundQuantLinear.from_quant_linear(q) for name, q in quantized.items()}
        for name, q in quantized.items():
            set_submodule(block, name, q)
    return quantized

