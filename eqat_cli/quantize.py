"""Model-level quantization helpers shared by Block-AP, tests and benchmarks.

Arch-agnostic: the linear layers come from the registry's :class:`ArchitectureSpec`.
"""

from __future__ import annotations

from torch import nn

from eqat_cli.quant.linear import PackedLinear, QuantLinear, replace_linears
from eqat_cli.quant.rounding import RoundQuantLinear


def fake_quantize_block(block: nn.Module, arch, bits: int, group: int) -> dict[str, QuantLinear]:
    """Swap the block's linear layers for min-max initialised :class:`QuantLinear` (in place)."""
    return replace_linears(
        block, list(arch.linear_names), lambda name, lin: QuantLinear(lin, bits, group)
    )


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
