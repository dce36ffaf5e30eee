"""Model-level quantization helpers shared by Block-AP, tests and benchmarks.

Arch-agnostic: the linear layers come from the registry's :class:`ArchitectureSpec`.
"""

from __future__ import annotations

from torch import nn

from eqat_cli.quant.linear import PackedLinear, QuantLinear, replace_linears
from eqat_cli.quant.rounding import RoundQuantLinear


def fake_quantize_block(block: nn.Module, arch, bits: int, group: int, schemes: dict | None = None) -> dict[str, QuantLinear]:
    """Swap the block's linear layers for min-max initialised :class:`QuantLinear` (in place).
    ``schemes`` (mixed precision): a ``QuantScheme`` per linear name, overriding ``bits``/``group``."""
    def make(name, lin):
        s = (schemes or {}).get(name)
        return QuantLinear(lin, bits, group) if s is None else QuantLinear(lin, s.bits, s.group_size)

    return replace_linears(block, list(arch.linear_names), make)


def pack_block(block: nn.Module) -> dict[str, PackedLinear]:
    """Freeze every :class:`QuantLinear` / :class:`RoundQuantLinear` in ``block`` to a :class:`PackedLinear` (in place)."""
    names = [n for n, m in block.named_modules() if isinstance(m, (QuantLinear, RoundQuantLinear))]
    out = {}
    for name in names:
        parent, _, attr = name.rpartition(".")
        q = block.get_submodule(name)
        packed = q.to_packed()
        setattr(block.get_submodule(parent) if parent else block, attr, packed)
        out[name] = packed
    return out


def rtn_quantize_model(model: nn.Module, arch, bits: int, group: int) -> nn.Module:
    """Min-max (round-to-nearest) quantization of every decoder block, packed, in place."""
    for block in arch.layers(model):
        fake_quantize_block(block, arch, bits, group)
        pack_block(block)
    return model


HEAD_GROUP = 64  # group size of a quantized embedding / lm_head (--quantize-head)


def quantize_head(model: nn.Module, arch, bits: int, group: int = HEAD_GROUP) -> dict:
    """Min-max quantize the token embedding and the lm_head to ``bits`` (8 or 4), in place.

    The lm_head becomes a :class:`PackedLinear` (run by whatever kernel the backend attaches);
    the embedding a :class:`~eqat_cli.quant.linear.PackedEmbedding`. A tied pair (SmolLM2) stays
    tied: both use one packed layer, so the table is stored once. Returns what was quantized.
    """
    import torch

    from eqat_cli.quant.linear import PackedEmbedding, set_submodule

    if bits not in (4, 8):
        raise ValueError(f"the embedding and lm_head quantize to 8 or 4 bits, not {bits}")
    embed, head = arch.embed(model), arch.lm_head(model)
    tied = (
        isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding)
        and head.weight.data_ptr() == embed.weight.data_ptr()
    )
    done = {"bits": bits, "group": group, "tied": tied, "lm_head": False, "embedding": False}
    packed_head = None
    with torch.no_grad():
        if isinstance(head, nn.Linear):
            packed_head = QuantLinear(head.float(), bits, group).to_packed()
            if head.bias is None:
                packed_head.bias = None
            set_submodule(model, arch.lm_head_path, packed_head)
            done["lm_head"] = True
        if isinstance(embed, nn.Embedding):
            dtype = embed.weight.dtype
            if tied:
                packed = packed_head
            else:
                lin = nn.Linear(embed.embedding_dim, embed.num_embeddings, bias=False)
                lin.weight.data = embed.weight.detach().float()
                packed = QuantLinear(lin, bits, group).to_packed()
            scale = getattr(embed, "embed_scale", None)
            if scale is not None and not torch.is_tensor(scale):
                scale = torch.tensor(float(scale))
            set_submodule(model, arch.embed_path, PackedEmbedding(packed, embed.padding_idx, scale, dtype=dtype))
            done["embedding"] = True
    return done
