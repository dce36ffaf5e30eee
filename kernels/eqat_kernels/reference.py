"""Pure-torch references for the Triton kernels, on the same raw tensors the kernels take.

They spell out the layout of :mod:`eqat_kernels.triton_kernels` (``pf = 32 // bits`` codes per
int32 word, least significant first) and the definition
``W[n, k] = (q[k, n] - z[k // group, n]) * s[k // group, n]``, ``y = x @ W^T``, in plain torch.
This package imports nothing of ``eqat_cli``; ``tests/test_triton_kernels.py`` checks that these
functions agree bit for bit with eqat's own unpacking and ``PackedLinear.dequantize``.
"""

from __future__ import annotations

import torch


def _unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """``[rows, m]`` int32 words -> the first ``n`` rows of ``[rows * pf, m]`` int32 codes."""
    pf = 32 // bits
    rows, m = packed.shape
    if rows * pf < n:
        raise ValueError(f"packed tensor holds {rows * pf} codes per column, {n} requested")
    shifts = (torch.arange(pf, device=packed.device, dtype=torch.int32) * bits).view(1, pf, 1)
    # Arithmetic shift then mask gives the right field whatever the sign bit.
    codes = (packed.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(rows * pf, m)[:n].to(torch.int32)


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Integer codes ``[in, out]`` (int32) from ``qweight [ceil(in / pf), out]``."""
    return _unpack_rows(qweight, bits, in_features)


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Integer zero points ``[n_groups, out]`` (int32) from ``qzeros [n_groups, ceil(out/pf)]``."""
    return _unpack_rows(qzeros.t(), bits, out_features).t().contiguous()


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
    group = in_features if group_size == -1 else group_size
    q = unpack_codes(qweight, bits, in_features).t()  # [out, in]
    z = unpack_zeros(qzeros, bits, n).t()  # [out, groups]
    s = scales.t().to(dtype).repeat_interleave(group, dim=1)[:, :in_features]
    z = z.to(dtype).repeat_interleave(group, dim=1)[:, :in_features]
    return (q.to(dtype) - z) * s


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
