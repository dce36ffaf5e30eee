"""Pure quantization math: no CLI, Rich or registry imports here."""

from eqat_cli.quant.linear import PackedLinear, QuantLinear, UniformAffineQuantizer
from eqat_cli.quant.primitives import SUPPORTED_BITS

__all__ = ["PackedLinear", "QuantLinear", "UniformAffineQuantizer", "SUPPORTED_BITS"]
