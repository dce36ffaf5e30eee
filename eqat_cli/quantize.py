"""Model-level quantization helpers shared by Block-AP, tests and benchmarks.

Arch-agnostic: the linear layers come from the registry's :class:`ArchitectureSpec`.
"""

from __future__ import annotations

import torch
from torch import nn

from eqat_cli.quant.linear import PackedEmbedding, PackedLinear, QuantLinear, replace_linears, set_submodule
from eqat_cli.quant.kquant import KQuantLinear, kquant_block
from eqat_cli.quant.rounding import RoundQuantLinear
from eqat_cli.scheme import QuantScheme


def fake_quantize_block(block: nn.Module, arch, scheme: QuantScheme,
                        schemes: dict[str, QuantScheme] | None = None) -> dict[str, QuantLinear]:
    """Swap the block's linear layers for min-max initialised :class:`QuantLinear` (in place).
    ``schemes`` (mixed precision): a ``QuantScheme`` per linear name, overriding ``scheme``."""
    return replace_linears(
        block, list(arch.linear_names), lambda name, lin: QuantLinear(lin, (schemes or {}).get(name, scheme))
    )


def pack_block(block: nn.Module) -> dict[str, PackedLinear]:
    """Freeze every :class:`QuantLinear` / :class:`RoundQuantLinear` in ``block`` to a :class:`PackedLinear` (in place)."""
    names = [n for n, m in block.named_modules() if isinstance(m, (QuantLinear, RoundQuantLinear, KQuantLinear))]
    out = {}
    for name in names:
        parent, _, attr = name.rpartition(".")
        q = block.get_submodule(name)
        packed = q.to_packed()
        setattr(block.get_submodule(parent) if parent else block, attr, packed)
        out[name] = packed
    return out


def rtn_quantize_model(model: nn.Module, arch, scheme: QuantScheme) -> nn.Module:
    """Min-max (round-to-nearest) quantization of every decoder block, packed, in place."""
    for block in arch.layers(model):
        fake_quantize_block(block, arch, scheme)
        pack_block(block)
    return model


def _pack_rows_chunked(weight, scheme: QuantScheme, chunk: int = 4096) -> PackedLinear:
    """Min-max quantize and pack ``weight [out, in]`` a block of output rows at a time: the
    scratch of :class:`QuantLinear` (a clone of the weight, its codes) stays the size of one block
    instead of several copies of a whole vocabulary-sized table (peak RSS)."""
    out_f, in_f = weight.shape
    packed = PackedLinear(in_f, out_f, scheme)
    pf = scheme.pack_factor
    chunk = max(pf, chunk // pf * pf)  # blocks start on a qzeros word
    for r0 in range(0, out_f, chunk):
        r1 = min(out_f, r0 + chunk)
        lin = nn.Linear(in_f, r1 - r0, bias=False)
        lin.weight.data = weight[r0:r1].float()
        part = QuantLinear(lin, scheme).to_packed()
        packed.qweight[:, r0:r1] = part.qweight
        packed.scales.data[:, r0:r1] = part.scales.data
        packed.qzeros[:, r0 // pf:r0 // pf + part.qzeros.shape[1]] = part.qzeros
    return packed


def rtn_kquant_model(model: nn.Module, arch, target: str) -> nn.Module:
    """Every decoder block's linears on ``target``'s GGML grid (``Q2_K``/``Q3_K``/``Q4_K``, or the
    width's fallback), started by the search of :func:`eqat_cli.quant.kquant.init_params`, packed as
    GGUF blocks (:class:`~eqat_cli.quant.kquant.KQuantPacked`), in place."""
    for block in arch.layers(model):
        kquant_block(block, target, list(arch.linear_names))
        pack_block(block)
    return model


HEAD_GROUP = 64  # group size of a quantized embedding / lm_head (--quantize-head)


def head_scheme(bits: int) -> QuantScheme:
    """The scheme of ``--quantize-head BITS``: 8 or 4 bits, groups of :data:`HEAD_GROUP`."""
    if bits not in (4, 8):
        raise ValueError(f"the embedding and lm_head quantize to 8 or 4 bits, not {bits}")
    return QuantScheme(bits, HEAD_GROUP)


def quantize_head(model: nn.Module, arch, scheme: QuantScheme) -> dict:
    """Min-max quantize the token embedding and the lm_head to ``scheme`` (8 or 4 bits, see
    :func:`head_scheme`), in place.

    The lm_head becomes a :class:`PackedLinear` (run by whatever kernel the backend attaches);
    the embedding a :class:`~eqat_cli.quant.linear.PackedEmbedding`. A tied pair (SmolLM2) stays
    tied: both use one packed layer, so the table is stored once. Returns what was quantized.
    """
    if scheme.bits not in (4, 8):
        raise ValueError(f"the embedding and lm_head quantize to 8 or 4 bits, not {scheme.bits}")
    embed, head = arch.embed(model), arch.lm_head(model)
    tied = (
        isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding)
        and head.weight.data_ptr() == embed.weight.data_ptr()
    )
    done = {"bits": scheme.bits, "group": scheme.group_size, "tied": tied, "lm_head": False, "embedding": False}
    packed_head = None
    with torch.no_grad():
        if isinstance(head, nn.Linear):
            packed_head = _pack_rows_chunked(head.weight.detach(), scheme)
            if head.bias is not None:
                packed_head.bias = nn.Parameter(head.bias.detach().float().clone(), requires_grad=False)
            set_submodule(model, arch.lm_head_path, packed_head)
            done["lm_head"] = True
        if isinstance(embed, nn.Embedding):
            dtype = embed.weight.dtype
            if tied:
                packed = packed_head
            else:
                lin = nn.Linear(embed.embedding_dim, embed.num_embeddings, bias=False)
                lin.weight.data = embed.weight.detach().float()
                packed = QuantLinear(lin, scheme).to_packed()
            scale = getattr(embed, "embed_scale", None)
            if scale is not None and not torch.is_tensor(scale):
                scale = torch.tensor(float(scale))
            set_submodule(model, arch.embed_path, PackedEmbedding(packed, embed.padding_idx, scale, dtype=dtype))
            done["embedding"] = True
    return done
