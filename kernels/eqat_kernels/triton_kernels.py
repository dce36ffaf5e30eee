"""Triton kernels for 2-, 3- and 4-bit asymmetric group-wise weights (EfficientQAT layout).

Layout (the GPTQ / EfficientQAT native one, ``docs/FORMATS.md``), with ``pf = 32 // bits``:

* ``qweight`` int32 ``[ceil(K / pf), N]``: the code of input row ``k`` and output column ``n``
  sits in word ``qweight[k // pf, n]`` at bit ``bits * (k % pf)``, least significant first
  (3-bit packs 10 codes per word and leaves the top two bits unused);
* ``qzeros`` int32 ``[G, ceil(N / pf)]``: the raw zero point of group ``g`` and column ``n`` in
  word ``qzeros[g, n // pf]`` at bit ``bits * (n % pf)``;
* ``scales`` fp16 / bf16 / fp32 ``[G, N]``;
* row ``k`` belongs to group ``k // group`` (``group = K`` for per-channel); the last group may
  be shorter (ragged): ``G = ceil(K / group)``.

``W[n, k] = (q[k, n] - z[k // group, n]) * s[k // group, n]`` and ``y = x @ W^T``.

Three kernels:

* :func:`dequantize` writes the dense weight; it is bit-exact against the torch reference
  (the product ``(q - z) * s`` is exact in fp32 and rounded once to the output dtype, which is
  what torch computes in that dtype);
* :func:`decode_matmul`, for a few rows of ``x`` (token-by-token generation): a split-K GEMV.
  Each program owns ``BLOCK_N`` output columns and one slice of the input dimension, unpacks its
  weights in registers and writes fp32 partial sums that are reduced afterwards. When a
  ``BLOCK_K`` tile lies inside one group the step size and zero point are applied once per tile
  and column: ``s * (sum_k x_k q_k - z * sum_k x_k)``;
* :func:`prefill_matmul`, for many rows (prompt processing): a tiled GEMM whose inner loop loads
  a ``BLOCK_K x BLOCK_N`` tile of packed words, dequantizes it in registers to the dtype of
  ``x`` and feeds ``tl.dot``.

Block sizes are fixed per call by :func:`pick_blocks` (a small heuristic, one configuration):
Triton's interpreter (``TRITON_INTERPRET=1``, which the tests use on the CPU) supports neither
multi-configuration autotuning nor ``triton.testing.do_bench``.

``TRITON_INTERPRET`` is read when this module is imported (``triton.jit`` decides then between
the compiler and the interpreter): set it before importing ``eqat_kernels.triton_kernels``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from eqat_kernels.caps import SUPPORTED_BITS

# Rows of x up to which :func:`matmul` takes the decode kernel.
DECODE_MAX_ROWS = 16


# ----------------------------------------------------------------------------- the kernels


@triton.jit
def _unpack_codes(words, offs_k, BITS: tl.constexpr):
    """Codes of rows ``offs_k`` from their packed words (``[BLOCK_K, BLOCK_N]`` int32)."""
    PF: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    # Arithmetic shift then mask: the right field whatever the word's sign bit.
    return (words >> ((offs_k % PF) * BITS)[:, None]) & MASK


@triton.jit
def _round_to_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32.

    Done on the bits so that it is exact everywhere: Triton's CPU interpreter truncates on a
    plain ``.to(tl.bfloat16)``, the GPU rounds to nearest even.
    """
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _dequantize_kernel(
    qw_ptr, qz_ptr, s_ptr, out_ptr,
    K, N, group,
    stride_qw, stride_qz, stride_s, stride_ok, stride_on,
    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, OUT_BF16: tl.constexpr,
):
    PF: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]

    qw_ptrs = qw_ptr + (offs_k // PF)[:, None] * stride_qw + offs_n[None, :]
    words = tl.load(qw_ptrs, mask=mask, other=0)
    q = _unpack_codes(words, offs_k, BITS)
    g = offs_k // group
    zw = tl.load(qz_ptr + g[:, None] * stride_qz + (offs_n // PF)[None, :], mask=mask, other=0)
    z = (zw >> ((offs_n % PF) * BITS)[None, :]) & MASK
    # Round the step size to the output dtype first, as the torch reference does; the product
    # of a <= 8-bit integer and a <= 11-bit mantissa is exact in fp32, so the one rounding to
    # the output dtype below gives the reference's value bit for bit.
    s = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=mask, other=0.0)
    if OUT_BF16:
        s = _round_to_bf16(s.to(tl.float32))
        w = _round_to_bf16((q - z).to(tl.float32) * s)
    else:
        s = s.to(out_ptr.dtype.element_ty).to(tl.float32)
        w = (q - z).to(tl.float32) * s
    out = out_ptr + offs_k[:, None] * stride_ok + offs_n[None, :] * stride_on
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, part_ptr,
    M, K, N, group, k_per_split,
    stride_xm, stride_qw, stride_qz, stride_s, stride_ps, stride_pm,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    TILE_IN_ONE_GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Split-K GEMV: program ``(n, split, m)`` sums ``x[m-block, slice] @ W[slice, n-block]``.

    ``BLOCK_M == 1`` reduces with broadcast-multiply-sum (one row: no tensor-core padding);
    ``BLOCK_M >= 16`` uses ``tl.dot`` on the padded rows.
    """
    PF: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    z_shift = (offs_n % PF) * BITS

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_s * k_per_split  # k_per_split is a multiple of BLOCK_K
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=m_mask[:, None] & k_mask[None, :], other=0.0,
        ).to(tl.float32)
        wmask = k_mask[:, None] & n_mask[None, :]
        qw_ptrs = qw_ptr + (offs_k // PF)[:, None] * stride_qw + offs_n[None, :]
        words = tl.load(qw_ptrs, mask=wmask, other=0)
        q = _unpack_codes(words, offs_k, BITS).to(tl.float32)
        if TILE_IN_ONE_GROUP:
            # One group for the whole tile: apply z and s to the [BLOCK_M, BLOCK_N] sums.
            g = k0 // group
            zw = tl.load(qz_ptr + g * stride_qz + offs_n // PF, mask=n_mask, other=0)
            z = ((zw >> z_shift) & MASK).to(tl.float32)
            s = tl.load(s_ptr + g * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if BLOCK_M == 1:
                xq = tl.sum(tl.reshape(x, [BLOCK_K])[:, None] * q, axis=0)[None, :]
            else:
                xq = tl.dot(x, q, input_precision=DOT_PRECISION)
            xsum = tl.sum(x, axis=1)
            acc += s[None, :] * (xq - xsum[:, None] * z[None, :])
        else:
            # The tile straddles groups: dequantize each row with its own group's parameters.
            g = offs_k // group
            qz_ptrs = qz_ptr + g[:, None] * stride_qz + (offs_n // PF)[None, :]
            zw = tl.load(qz_ptrs, mask=wmask, other=0)
            z = ((zw >> z_shift[None, :]) & MASK).to(tl.float32)
            s = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=wmask, other=0.0)
            w = (q - z) * s.to(tl.float32)
            if BLOCK_M == 1:
                acc += tl.sum(tl.reshape(x, [BLOCK_K])[:, None] * w, axis=0)[None, :]
            else:
                acc += tl.dot(x, w, input_precision=DOT_PRECISION)
    part = part_ptr + pid_s * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :]
    tl.store(part, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _prefill_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr,
    M, K, N, group,
    stride_xm, stride_qw, stride_qz, stride_s, stride_ym,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    TILE_IN_ONE_GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Tiled GEMM ``y = x @ W``: each K-tile of packed words is dequantized in registers."""
    PF: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    z_shift = (offs_n % PF) * BITS
    w_dtype = x_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=m_mask[:, None] & k_mask[None, :], other=0.0,
        )
        wmask = k_mask[:, None] & n_mask[None, :]
        qw_ptrs = qw_ptr + (offs_k // PF)[:, None] * stride_qw + offs_n[None, :]
        words = tl.load(qw_ptrs, mask=wmask, other=0)
        q = _unpack_codes(words, offs_k, BITS)
        if TILE_IN_ONE_GROUP:
            g = k0 // group
            zw = tl.load(qz_ptr + g * stride_qz + offs_n // PF, mask=n_mask, other=0)
            z = (zw >> z_shift) & MASK
            s = tl.load(s_ptr + g * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            w = (q - z[None, :]).to(tl.float32) * s[None, :]
        else:
            g = offs_k // group
            qz_ptrs = qz_ptr + g[:, None] * stride_qz + (offs_n // PF)[None, :]
            zw = tl.load(qz_ptrs, mask=wmask, other=0)
            z = (zw >> z_shift[None, :]) & MASK
            s = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=wmask, other=0.0)
            w = (q - z).to(tl.float32) * s.to(tl.float32)
        acc = tl.dot(x, w.to(w_dtype), acc, input_precision=DOT_PRECISION)
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# Whether ``triton.jit`` gave us interpreted kernels (TRITON_INTERPRET=1 at import): they run on
# CPU tensors; compiled ones need a GPU.
INTERPRETED = type(_dequantize_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class Blocks:
    """One launch configuration: tile sizes, and for decode the split of the K dimension
    (``split_k`` programs along K, each covering ``k_per_split`` rows, a multiple of
    ``block_k``)."""

    block_m: int
    block_k: int
    block_n: int
    split_k: int = 1
    k_per_split: int = 0
    num_warps: int = 4
    # Two stages of software pipelining keep a 64x64x64 fp32 prefill tile under ~70 KB of
    # shared memory, which every CUDA GPU Triton supports has.
    num_stages: int = 2


def _block_k_for_group(group: int, n_groups: int, default: int) -> int:
    """A K-tile that never straddles a group when the group allows one of at least 16 rows."""
    if n_groups == 1:
        return default
    pow2 = group & -group  # largest power of two dividing the group length
    return min(default, pow2) if pow2 >= 16 else default


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """How many decode programs to launch: two waves of the GPU's multiprocessors."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: few programs, but still more than one K split


def pick_blocks(kind: str, m: int, k: int, n: int, group: int, device: torch.device) -> Blocks:
    """The single configuration used for a call (see the module docstring)."""
    n_groups = math.ceil(k / group)
    if kind == "dequantize":
        return Blocks(1, 64, 64)
    if kind == "decode":
        block_m = 1 if m == 1 else 16
        block_n = 64 if block_m == 1 else 32
        block_k = _block_k_for_group(group, n_groups, 128 if block_m == 1 else 64)
        n_blocks = triton.cdiv(n, block_n)
        k_tiles = triton.cdiv(k, block_k)
        per_split = n_blocks * triton.cdiv(m, block_m)  # programs for one K split
        split = max(1, min(k_tiles, _target_programs(device) // per_split))
        k_per_split = triton.cdiv(k_tiles, split) * block_k
        return Blocks(block_m, block_k, block_n, triton.cdiv(k, k_per_split), k_per_split)
    if kind == "prefill":
        block_m = 64 if m >= 64 else 32 if m > 16 else 16
        block_k = _block_k_for_group(group, n_groups, 64)
        return Blocks(block_m, block_k, 64, num_warps=4)
    raise ValueError(f"unknown kernel kind {kind!r}")


def _check(qweight, qzeros, scales, bits: int, group_size: int, in_features: int) -> int:
    """Validate the packed tensors; return the effective group length."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"the Triton kernels support {SUPPORTED_BITS} bits, got {bits}")
    pf = 32 // bits
    n = qweight.shape[1]
    group = in_features if group_size == -1 else group_size
    if group < 1:
        raise ValueError(f"bad group size {group_size}")
    g = math.ceil(in_features / group)
    expected = {
        "qweight": ((math.ceil(in_features / pf), n), qweight),
        "qzeros": ((g, math.ceil(n / pf)), qzeros),
        "scales": ((g, n), scales),
    }
    for name, (shape, t) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError("qweight and qzeros must be int32")
    return group


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    """Unit stride along the last dimension (what the kernels index with)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products ("ieee"), not tf32; ignored for half-precision inputs.
    return "ieee" if dtype == torch.float32 else "tf32"


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype | None = None,
    layout: str = "out_in",
) -> torch.Tensor:
    """The dense weight: ``[out, in]`` (torch layout, the default) or ``[in, out]``
    (``layout="in_out"``)."""
    group = _check(qweight, qzeros, scales, bits, group_size, in_features)
    dtype = dtype or scales.dtype
    k, n = in_features, qweight.shape[1]
    if layout == "out_in":
        out = torch.empty(n, k, dtype=dtype, device=qweight.device)
        stride_ok, stride_on = out.stride(1), out.stride(0)
    elif layout == "in_out":
        out = torch.empty(k, n, dtype=dtype, device=qweight.device)
        stride_ok, stride_on = out.stride(0), out.stride(1)
    else:
        raise ValueError(f"layout must be 'out_in' or 'in_out', got {layout!r}")
    if out.numel() == 0:
        return out
    qweight, qzeros, scales = _rowmajor(qweight), _rowmajor(qzeros), _rowmajor(scales)
    b = pick_blocks("dequantize", 0, k, n, group, qweight.device)
    grid = (triton.cdiv(k, b.block_k), triton.cdiv(n, b.block_n))
    _dequantize_kernel[grid](
        qweight, qzeros, scales, out,
        k, n, group,
        qweight.stride(0), qzeros.stride(0), scales.stride(0), stride_ok, stride_on,
        BITS=bits, BLOCK_K=b.block_k, BLOCK_N=b.block_n, OUT_BF16=dtype == torch.bfloat16,
        num_warps=b.num_warps, num_stages=b.num_stages,
    )
    return out


def decode_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W^T -> [M, N]`` with the split-K GEMV kernel (meant for small ``M``)."""
    m, k = x.shape
    group = _check(qweight, qzeros, scales, bits, group_size, k)
    n = qweight.shape[1]
    x, qweight, qzeros, scales = (_rowmajor(t) for t in (x, qweight, qzeros, scales))
    b = blocks or pick_blocks("decode", m, k, n, group, x.device)
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, n, dtype=x.dtype, device=x.device)
    partial = torch.empty(b.split_k, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, b.block_n), b.split_k, triton.cdiv(m, b.block_m))
    _decode_kernel[grid](
        x, qweight, qzeros, scales, partial,
        m, k, n, group, b.k_per_split,
        x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0),
        partial.stride(0), partial.stride(1),
        BITS=bits, BLOCK_M=b.block_m, BLOCK_K=b.block_k, BLOCK_N=b.block_n,
        TILE_IN_ONE_GROUP=_tile_in_one_group(group, k, b.block_k),
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=b.num_warps, num_stages=b.num_stages,
    )
    y = partial[0] if b.split_k == 1 else partial.sum(0)
    return y.to(x.dtype)


def prefill_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W^T -> [M, N]`` with the tiled dequantize-GEMM kernel (for large ``M``)."""
    m, k = x.shape
    group = _check(qweight, qzeros, scales, bits, group_size, k)
    n = qweight.shape[1]
    x, qweight, qzeros, scales = (_rowmajor(t) for t in (x, qweight, qzeros, scales))
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    b = blocks or pick_blocks("prefill", m, k, n, group, x.device)
    grid = (triton.cdiv(m, b.block_m), triton.cdiv(n, b.block_n))
    _prefill_kernel[grid](
        x, qweight, qzeros, scales, y,
        m, k, n, group,
        x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), y.stride(0),
        BITS=bits, BLOCK_M=b.block_m, BLOCK_K=b.block_k, BLOCK_N=b.block_n,
        TILE_IN_ONE_GROUP=_tile_in_one_group(group, k, b.block_k),
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=b.num_warps, num_stages=b.num_stages,
    )
    return y


def _tile_in_one_group(group: int, k: int, block_k: int) -> bool:
    """Whether every K-tile (they start at multiples of ``block_k``) lies in a single group."""
    return group >= k or group % block_k == 0


def matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``x [..., K] @ W^T``: the decode kernel for at most :data:`DECODE_MAX_ROWS` rows, else
    the prefill kernel."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    fn = decode_matmul if x2.shape[0] <= DECODE_MAX_ROWS else prefill_matmul
    return fn(x2, qweight, qzeros, scales, bits, group_size).reshape(*lead, qweight.shape[1])
