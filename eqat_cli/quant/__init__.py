"""Pure quantization math: no CLI, Rich or registry imports here.

Importing the package imports no torch: :mod:`eqat_cli.quant.caps` (what the torch kernels run)
is read by the backend plugins at import; the names below load their modules on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "PackedLinear": "eqat_cli.quant.linear",
    "QuantLinear": "eqat_cli.quant.linear",
    "UniformAffineQuantizer": "eqat_cli.quant.linear",
    "SUPPORTED_BITS": "eqat_cli.quant.primitives",
}

__all__ = ["PackedLinear", "QuantLinear", "UniformAffineQuantizer", "SUPPORTED_BITS"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
