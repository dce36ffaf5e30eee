"""The quantization scheme: bits and group size, as one validated, torch-free value.

Every room that speaks of "how a weight is quantized" (configs, layers, detection, kernel
capabilities, the CLI, the benchmark) uses :class:`QuantScheme` and the one
:data:`SUPPORTED_BITS`. Conventions (see :mod:`eqat_cli.quant.primitives`):

* groups run along the input dimension; ``group_size == -1`` is one group per output channel;
* the last group may be shorter than ``group_size`` ("ragged");
* packed codes live in 32-bit words, ``32 // bits`` codes a word (3 bits: 10 a word, 2 bits spare).

This module imports nothing heavy (no torch) and nothing of eqat but :mod:`eqat_cli.errors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from eqat_cli.errors import BadInputError, UnsupportedError

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)
"""Every bit width eqat quantizes, packs and loads."""

PER_CHANNEL = -1


def check_bits(bits: int) -> int:
    """``bits`` if eqat supports it, else an :class:`UnsupportedError` naming the choices."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise UnsupportedError(
            f"unsupported bit width {bits}; choose one of {', '.join(map(str, SUPPORTED_BITS))}"
        )
    return int(bits)


def check_group(group_size: int) -> int:
    """``group_size`` if it is -1 (per-channel) or at least 2, else a :class:`BadInputError`."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (
        group_size != PER_CHANNEL and group_size < 2
    ):
        raise BadInputError(f"group size must be -1 (per-channel) or at least 2, got {group_size}")
    return int(group_size)


@dataclass(frozen=True, order=True)
class QuantScheme:
    """Uniform asymmetric per-group integer quantization: ``bits`` and ``group_size``.

    Constructing one validates it, so a ``QuantScheme`` in hand is always a scheme eqat runs.
    """

    bits: int
    group_size: int = 64

    def __post_init__(self):
        check_bits(self.bits)
        check_group(self.group_size)

    # -- derived quantities ----------------------------------------------------------------
    @property
    def qmax(self) -> int:
        """The largest integer code, ``2^bits - 1``."""
        return 2**self.bits - 1

    @property
    def pack_factor(self) -> int:
        """Codes in one 32-bit word (3 bits: 10, with 2 bits spare)."""
        return 32 // self.bits

    @property
    def per_channel(self) -> bool:
        return self.group_size == PER_CHANNEL

    def effective_group(self, in_features: int) -> int:
        """The group length actually used: per-channel becomes the whole input width."""
        return in_features if self.per_channel else self.group_size

    def n_groups(self, in_features: int) -> int:
        """Groups along an input of ``in_features`` (a ragged last group counts)."""
        return math.ceil(in_features / self.effective_group(in_features))

    def packed_rows(self, n: int) -> int:
        """32-bit words holding ``n`` codes."""
        return math.ceil(n / self.pack_factor)

    def bits_per_weight(self, in_features: int, scale_bits: int = 16, zero_bits: int | None = None) -> float:
        """Storage per weight of one row: the code, plus a step size and a zero point per group
        (``zero_bits`` defaults to ``bits``: the packed integer zero)."""
        zb = self.bits if zero_bits is None else zero_bits
        return self.bits + self.n_groups(in_features) * (scale_bits + zb) / in_features

    # -- names -----------------------------------------------------------------------------
    @property
    def tag(self) -> str:
        """``w2g64`` (per-channel: ``w4g-1``), the name used in directories and tables."""
        return f"w{self.bits}g{self.group_size}"

    def __str__(self) -> str:
        return self.tag

    @classmethod
    def parse(cls, text: str) -> "QuantScheme":
        """``w2g64`` / ``w4g-1`` / ``w3`` (group 64) back into a scheme; one-line error otherwise."""
        t = text.strip().lower()
        try:
            if not t.startswith("w"):
                raise ValueError
            body = t[1:]
            if "g" in body:
                b, g = body.split("g", 1)
                return cls(int(b), int(g))
            return cls(int(body))
        except ValueError:
            raise BadInputError(f"not a quantization scheme: {text!r} (expected e.g. w2g64)") from None
