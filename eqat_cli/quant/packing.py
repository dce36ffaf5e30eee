"""Bit packing of integer codes into int32 words.

Native EfficientQAT / GPTQ layout (2, 3, 4, 8 bits), see ``docs/FORMATS.md``:

* ``pf = 32 // bits`` codes per int32 word; code ``j`` of a word sits at bit ``bits * j``,
  least significant first. 3-bit packs 10 codes per word and leaves the top 2 bits unused.
* ``qweight`` packs along the input dimension: ``[ceil(in / pf), out]``.
* ``qzeros`` packs along the output dimension: ``[n_groups, ceil(out / pf)]``.
* A dimension that is not a multiple of ``pf`` is padded with zero codes in the last word;
  readers pass the true length to ``unpack_*`` to drop the padding.

GPTQ 3-bit layout (``gptq3``): 32 codes in 3 consecutive words (96 bits), codes straddling
word boundaries, as GPTQ/AutoGPTQ/GPTQModel write it. Lengths must be multiples of 32.

A numeric kernel: the functions take the code width ``bits`` as an int (packing knows nothing of
groups, so a :class:`~eqat_cli.scheme.QuantScheme` would carry a value it never reads).
"""

from __future__ import annotations

import math

import torch

_U32 = 1 << 32


def pack_factor(bits: int) -> int:
    return 32 // bits


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 tensor holding unsigned 32-bit values -> int32 with the same bit pattern."""
    words = torch.where(words >= (1 << 31), words - _U32, words)
    return words.to(torch.int32)


def _to_uint(words: torch.Tensor) -> torch.Tensor:
    """int32 -> int64 holding the unsigned 32-bit value."""
    w = words.to(torch.int64)
    return torch.where(w < 0, w + _U32, w)


def _check_codes(codes: torch.Tensor, bits: int, what: str) -> None:
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2**bits - 1):
        raise ValueError(
            f"{what} out of range for {bits}-bit packing: min {int(codes.min())}, "
            f"max {int(codes.max())}, allowed [0, {2**bits - 1}]"
        )


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[n, m]`` codes along dim 0 -> ``[ceil(n / pf), m]`` int32."""
    _check_codes(codes, bits, "codes")
    pf = pack_factor(bits)
    n, m = codes.shape
    rows = math.ceil(n / pf)
    c = torch.zeros(rows * pf, m, dtype=torch.int64, device=codes.device)
    c[:n] = codes.to(torch.int64)
    c = c.reshape(rows, pf, m)
    shifts = (torch.arange(pf, device=codes.device, dtype=torch.int64) * bits).view(1, pf, 1)
    return _to_int32((c << shifts).sum(dim=1))


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: ``[rows, m]`` int32 -> ``[n, m]`` int32 codes."""
    pf = pack_factor(bits)
    rows, m = packed.shape
    if rows * pf < n:
        raise ValueError(f"packed tensor holds {rows * pf} codes per column, {n} requested")
    shifts = (torch.arange(pf, device=packed.device, dtype=torch.int32) * bits).view(1, pf, 1)
    # Arithmetic shift then mask gives the right field whatever the sign bit.
    codes = (packed.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(rows * pf, m)[:n].to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[m, n]`` codes along dim 1 -> ``[m, ceil(n / pf)]`` int32."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack_rows(packed.t(), bits, n).t().contiguous()


# ---------------------------------------------------------------- GPTQ 3-bit (32 codes / 3 words)


def pack_rows_gptq3(codes: torch.Tensor) -> torch.Tensor:
    """GPTQ's 3-bit packing along dim 0: ``[n, m]`` -> ``[3 * n / 32, m]`` int32."""
    _check_codes(codes, 3, "codes")
    n, m = codes.shape
    if n % 32:
        raise ValueError(f"GPTQ 3-bit packing needs a multiple of 32 rows, got {n}")
    c = codes.to(torch.int64).reshape(n // 32, 32, m)
    # Lay the 32 codes out as one 96-bit integer, code k at bits [3k, 3k+3).
    out = torch.zeros(n // 32, 3, m, dtype=torch.int64, device=codes.device)
    for k in range(32):
        bit = 3 * k
        word, off = divmod(bit, 32)
        out[:, word] |= (c[:, k] << off) & (_U32 - 1)
        if off + 3 > 32:  # straddles into the next word
            out[:, word + 1] |= c[:, k] >> (32 - off)
    return _to_int32(out.reshape(3 * n // 32, m))


def unpack_rows_gptq3(packed: torch.Tensor, n: int) -> torch.Tensor:
    rows, m = packed.shape
    if rows % 3 or rows // 3 * 32 < n:
        raise ValueError(f"bad GPTQ 3-bit packed shape {tuple(packed.shape)} for {n} rows")
    w = _to_uint(packed).reshape(rows // 3, 3, m)
    out = torch.empty(rows // 3, 32, m, dtype=torch.int64, device=packed.device)
    for k in range(32):
        bit = 3 * k
        word, off = divmod(bit, 32)
        v = w[:, word] >> off
        if off + 3 > 32:
            v = v | (w[:, word + 1] << (32 - off))
        out[:, k] = v & 7
    return out.reshape(-1, m)[:n].to(torch.int32)


def pack_cols_gptq3(codes: torch.Tensor) -> torch.Tensor:
    return pack_rows_gptq3(codes.t()).t().contiguous()


def unpack_cols_gptq3(packed: torch.Tensor, n: int) -> torch.Tensor:
    return unpack_rows_gptq3(packed.t(), n).t().contiguous()
