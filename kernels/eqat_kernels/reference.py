"""Pure-torch references for the Triton kernels, on the same raw tensors the kernels take.

They reuse the project's packing and dequantization code (``eqat_cli.quant``) so that the
kernels are checked against the very definition the rest of the toolkit uses:
``W[n, k] = (q[k, n] - z[k // group, n]) * s[k // group, n]`` and ``y = x @ W^T``.
"""

from __future__ import annotations

import torch

from eqat_cli.quant import packing
from eqat_cli.quant.primitives import dequantize_codes


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Integer codes ``[in, out]`` (int32) from ``qweight [ceil(in / pf), out]``."""
    return packing.unpack_rows(qweight, bits, in_features)


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Integer zero points ``[n_groups, out]`` (int32) from ``qzeros [n_groups, ceil(out/pf)]``."""
    return packing.unpack_cols(qzeros, bits, out_features)


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense weight ``[out, in]`` computed in ``dtype`` (default: the dtype of ``scales``)."""
    dtype = dtype or scales.dtype
    n = qweight.shape[1]
    q = unpack_codes(qweight, bits, in_features).t()
    z = unpack_zeros(qzeros, bits, n).t()
    return dequantize_codes(q, scales.t(), z, group_size, dtype=dtype)


def matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., in] @ W^T (+ bias)``, computed in fp32 and returned in ``x.dtype``."""
    w = dequantize(qweight, qzeros, scales, bits, group_size, x.shape[-1], torch.float32)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
