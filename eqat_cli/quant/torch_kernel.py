"""The torch kernel for :class:`~eqat_cli.quant.linear.PackedLinear`: the "torch" backend on every
device (fast on the CPU, the portable fallback on GPUs) and E2E-QP's gradient path for step sizes.

The reference kernel unpacks the whole weight into int32 codes, dequantizes it and runs one
matmul: for a 4096x4096 layer that is 200 MB of temporaries and ~10x the time of the dense
layer. This kernel keeps the codes packed and streams over the input dimension in *chunks* of
rows small enough to stay in the CPU cache; nothing of the size of the dense weight is ever
allocated and every pass over unpacked codes hits the cache.

**Unpacking in two passes.** With ``pf = 32 // bits`` codes per int32 word, code ``j`` of a word
is ``q_j = (w >> bits*j) & mask``. Instead of a shift and a mask, one broadcast AND with the
*shifted* masks ``mask << bits*j`` gives ``q_j * 2^(bits*j)``, which converts to float32
exactly (at most 8 significant bits), in place in the same scratch memory. The power of two is
folded into the input instead: ``x_i * q_i = (x_i * 2^-(bits*j)) * (q_i * 2^(bits*j))``, both
factors exact. When the codes fill the word (2, 4 and 8 bits) the top field holds the sign
bit, so the AND yields it as a signed number; flipping bit 31 first (one XOR over the packed
words) makes that signed value exactly ``q_top - 2^(bits-1)`` times its power of two, and the
constant ``2^(bits-1)`` joins the zero-point correction below. So a chunk costs an XOR over the
packed words, one AND pass and one in-place int->float conversion, plus the matmul.

**Zero points and step sizes outside the big passes.** With ``X_g`` the sum of ``x`` over group
``g`` and ``T_g`` its sum over the group's top-field rows::

    y[o] = sum_g s[g, o] * (sum_{i in g} x~_i v_i  -  z[g, o] X_g  +  2^(bits-1) T_g)

where ``v`` are the unpacked (scaled, offset) codes and ``x~ = x * 2^-(bits*j)``.

* **decode** (few rows of ``x``): the per-group dot products ``sum_{i in g} x~_i v_i`` are one
  batched matmul over the chunk's groups; zero points and step sizes are then applied to the
  small ``[groups, rows, out]`` result. No dequantization pass at all.
* **prefill** (many rows): multiply the chunk by its groups' step sizes in place (one pass),
  accumulate ``y += x~[:, chunk] @ (v * s)``; the matmul dominates, and the zero-point terms are
  one small ``[rows, 2 groups] @ [2 groups, out]`` product.

Memory: only the packed buffers stay resident (2-bit: 1/16 of fp32 plus the step sizes), plus a
per-layer cache of the unpacked zero points as uint8 (2 bytes per group and output) and
per-thread scratch buffers shared by all layers (about 4 MB). Nothing derived from
``layer.scales`` is cached, so E2E-QP may train the step sizes in place: every forward reads
their current values. When ``scales`` (or ``x``) requires a gradient the forward runs inside a
custom autograd function whose backward streams over the chunks again (never materializing the
weight) and returns the gradients for ``x`` and ``scales``.

Precision: the arithmetic is fp32 whatever the dtype of ``x`` (the scaled codes reach 2^31 and
the scaled inputs 2^-30 times ``x``: only fp32 holds both exactly; half-precision matmuls are
slow on CPUs anyway); the output is cast back to ``x.dtype``. On a GPU this kernel is the
portable fallback (Triton is the fast path there). Summation order and the separate zero-point
term make the result differ from the reference kernel's by fp32 rounding only, relative to
``|x| @ ((q + z) * s)``; ``tests/test_torch_kernel.py`` states the bound it checks.

Training under autocast: when the step sizes require a gradient inside an autocast region (E2E-QP
on a CPU with bf16 units, or on a GPU), the layer is dequantized (in fp32, differentiably in the
step sizes) and multiplied with ``F.linear``, which autocast runs in bf16: the dense training step
of the same shapes (SmolLM2 w2g64 E2E-QP on an AVX512-BF16 CPU: 219 training tokens/s vs 100 on
the fp32 streaming path, ``docs/RESULTS.md``). It holds one dense weight per layer until the backward (gradient
checkpointing keeps that to one block). Everything else, inference included, takes the fp32 paths
above.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import torch

from eqat_cli.quant import packing
from eqat_cli.quant.primitives import effective_group

# Elements of the weight (rows x out_features) unpacked per chunk: a 4 MB scratch buffer, which
# stays in the L3 cache. Measured on a 2-core AVX2 machine (1 MB L2, 32 MB L3), 2^20 and 2^21
# were best, 2^18 up to 2.5x slower for 4096x4096 decode: smaller chunks pay more per-op
# overhead (a few microseconds per torch call), larger ones fall out of cache.
CHUNK_ELEMENTS = 1 << 20

# Use the decode formulation while the number of rows of x is at most this fraction of the
# group size: its extra work is ``groups * rows * out`` against ``in * out`` for the prefill
# formulation's step-size pass, so it wins while ``rows < group_size``; the margin covers the
# batched matmul's small blocks.
DECODE_ROWS_PER_GROUP = 0.25

_INT32_SIGN = -(2**31)


@dataclass(frozen=True)
class _Geometry:
    """Static description of a packed layer's shape on one device (cached per shape)."""

    bits: int
    pf: int  # codes per int32 word
    in_features: int
    out_features: int
    group: int  # effective group length (in_features for per-channel)
    n_groups: int
    chunk: int  # rows per chunk: a multiple of ``group`` (of ``pf`` with a single group)
    sign_field: bool  # the top code holds bit 31 (bits * pf == 32)
    # Group sums can be taken on x reshaped to [rows, n_groups, padded_group / pf, pf]:
    # every group starts on a word boundary (or there is only one group).
    word_aligned_groups: bool
    padded_group: int  # the group length rounded up to whole words
    field_masks: torch.Tensor  # [1, pf, 1] int32: mask << bits*j
    row_scale: torch.Tensor  # [in] fp32: 2^-(bits * (i % pf))
    shifts: torch.Tensor  # [1, pf, 1] int32: bits*j (exact unpacking, for the backward)
    # [pf, 2]: per-word-position sums -> (X, -2^(bits-1) T) for the zero-point terms
    field_weights: torch.Tensor

    def chunks(self):
        """Row ranges ``(start, stop)`` covering ``[0, in_features)``."""
        for a in range(0, self.in_features, self.chunk):
            yield a, min(a + self.chunk, self.in_features)

    def segments(self, a: int, b: int):
        """Split rows ``[a, b)`` into runs of whole groups and group fragments.

        Yields ``(g0, n_full, lo, hi)``: rows ``[lo, hi)`` either hold ``n_full`` whole groups
        starting at group ``g0`` (``n_full > 0``), or are a fragment of group ``g0``
        (``n_full == 0``): a ragged last group, or part of a group longer than the chunk.
        """
        g = self.group
        first_full = -(-a // g) * g
        if first_full > a:  # head fragment: a group that started in an earlier chunk
            yield a // g, 0, a, min(first_full, b)
        lo = first_full
        n_full = max(0, (b - lo) // g)
        if n_full:
            yield lo // g, n_full, lo, lo + n_full * g
            lo += n_full * g
        if lo < b:
            yield lo // g, 0, lo, b


_GEOMETRIES: dict[tuple, _Geometry] = {}
_LOCK = threading.Lock()


def geometry(layer, device: torch.device) -> _Geometry:
    key = (layer.bits, layer.in_features, layer.out_features, layer.group_size, device)
    geo = _GEOMETRIES.get(key)
    if geo is not None:
        return geo
    bits, k, n = layer.bits, layer.in_features, layer.out_features
    pf = packing.pack_factor(bits)
    group = effective_group(layer.group_size, k)
    n_groups = math.ceil(k / group)
    # Chunks start on group boundaries so that whole groups can be broadcast at once; with a
    # single group (per-channel) they only need to start on word boundaries.
    unit = group if n_groups > 1 else pf
    chunk = max(unit, (CHUNK_ELEMENTS // max(n, 1)) // unit * unit)
    chunk = min(chunk, -(-k // unit) * unit)
    j = torch.arange(pf, dtype=torch.int64)
    masks = ((2**bits - 1) << (bits * j)).view(1, pf, 1)
    masks = torch.where(masks >= 2**31, masks - 2**32, masks).to(torch.int32)  # same bits
    row_scale = torch.exp2(-(bits * (torch.arange(k) % pf)).to(torch.float32))
    field_weights = torch.zeros(pf, 2)
    field_weights[:, 0] = 1.0
    if bits * pf == 32:
        field_weights[pf - 1, 1] = -(2.0 ** (bits - 1))
    geo = _Geometry(
        bits=bits, pf=pf, in_features=k, out_features=n, group=group, n_groups=n_groups,
        chunk=chunk, sign_field=bits * pf == 32,
        word_aligned_groups=group % pf == 0 or n_groups == 1,
        padded_group=-(-group // pf) * pf,
        field_masks=masks.to(device), row_scale=row_scale.to(device),
        shifts=(j.to(torch.int32) * bits).view(1, pf, 1).to(device),
        field_weights=field_weights.to(device),
    )
    with _LOCK:
        _GEOMETRIES[key] = geo
    return geo


class _Scratch(threading.local):
    """Per-thread scratch buffers, grown on demand and shared by every layer."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (slot, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            # A normal tensor even under inference_mode, so later no_grad/grad runs can reuse it.
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=dtype, device=device)
            self.buffers[key] = buf
        return buf if buf.numel() == numel else buf[:numel]


_SCRATCH = _Scratch()

# layer -> (weak reference to the qzeros tensor, its version counter, uint8 [G, 2, out])
_ZEROS: "weakref.WeakKeyDictionary[object, tuple]" = weakref.WeakKeyDictionary()


def zero_rows(layer, dtype: torch.dtype) -> torch.Tensor:
    """``[G, 2, out]``: the layer's zero points and a row of ones, in ``dtype``.

    The second row multiplies the top-field offset term (see the module docstring). Cached per
    layer as uint8 and recomputed when ``layer.qzeros`` is another tensor (``.to()``,
    ``load_state_dict(assign=True)``) or was modified in place (its version counter moved).
    """
    qz = layer.qzeros
    hit = _ZEROS.get(layer)
    if hit is None or hit[0]() is not qz or hit[1] != qz._version:
        with torch.inference_mode(False):  # cached across modes: never an inference tensor
            z = packing.unpack_cols(qz.clone(), layer.bits, layer.out_features).to(torch.uint8)
            hit = (weakref.ref(qz), qz._version, torch.stack([z, torch.ones_like(z)], dim=1))
        _ZEROS[layer] = hit
    return hit[2].to(dtype)


def _to_float_in_place(fields: torch.Tensor) -> torch.Tensor:
    """Convert an int32 scratch tensor to float32 in its own memory and return the float view.

    An element-wise copy between two views of the same memory reads every element before
    writing it at the same place, so this is exact (the tests check it); it spares a second
    buffer and the cache traffic it costs (~30% of the unpacking time).
    """
    return fields.view(torch.float32).copy_(fields)


def _unpack_scaled(qweight, geo: _Geometry, a: int, b: int) -> torch.Tensor:
    """Rows ``[a, b)`` as ``v_i = q_i * 2^(bits*j)``, minus ``2^(bits-1)`` in the top field when
    it holds the sign bit (see the module docstring); ``[b - a, out]``, in scratch memory."""
    pf, n = geo.pf, geo.out_features
    w0, w1 = a // pf, -(-b // pf)
    words = qweight if (w0 == 0 and w1 == qweight.shape[0]) else qweight[w0:w1]
    if geo.sign_field:
        flipped = _SCRATCH.get("flipped", (w1 - w0) * n, torch.int32, qweight.device)
        words = torch.bitwise_xor(words, _INT32_SIGN, out=flipped.view(w1 - w0, n))
    fields = _SCRATCH.get("fields", (w1 - w0) * pf * n, torch.int32, qweight.device)
    torch.bitwise_and(words.unsqueeze(1), geo.field_masks, out=fields.view(w1 - w0, pf, n))
    values = _to_float_in_place(fields).view(-1, n)
    off = a - w0 * pf  # non-zero only when groups do not start on word boundaries (3-bit)
    return values if (off == 0 and b - a == values.shape[0]) else values[off : off + b - a]


def _unpack_exact(qweight, geo: _Geometry, a: int, b: int) -> torch.Tensor:
    """Rows ``[a, b)`` as the plain codes ``q_i``: ``[b - a, out]`` in scratch (backward)."""
    pf, n = geo.pf, geo.out_features
    w0, w1 = a // pf, -(-b // pf)
    fields = _SCRATCH.get("fields", (w1 - w0) * pf * n, torch.int32, qweight.device)
    fields3 = fields.view(w1 - w0, pf, n)
    torch.bitwise_right_shift(qweight[w0:w1].unsqueeze(1), geo.shifts, out=fields3)
    fields3.bitwise_and_(2**geo.bits - 1)
    off = a - w0 * pf
    return _to_float_in_place(fields).view(-1, n)[off : off + b - a]


def _group_terms(x: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """``[rows, G, 2]``: ``X_g`` (sum of x over group g) and ``-2^(bits-1) T_g`` (sum over the
    group's top-field rows; zero when the top field is unsigned)."""
    m, k, g, pf, ng = x.shape[0], geo.in_features, geo.group, geo.pf, geo.n_groups
    if geo.word_aligned_groups:
        # Pad the last group to whole words and sum per (group, position in word).
        width = ng * geo.padded_group
        xp = x if width == k else torch.nn.functional.pad(x, (0, width - k))
        per_field = xp.view(m, ng, geo.padded_group // pf, pf).sum(2)  # [m, G, pf]
        return per_field @ geo.field_weights
    # Groups that do not start on word boundaries (e.g. 3-bit with group 128).
    xp = x if ng * g == k else torch.nn.functional.pad(x, (0, ng * g - k))
    xs = xp.view(m, ng, g).sum(-1)
    ts = torch.zeros_like(xs)
    if geo.sign_field:
        g_of_top = torch.arange(pf - 1, k, pf, device=x.device) // g
        ts.index_add_(1, g_of_top, x[:, pf - 1 :: pf], alpha=-(2.0 ** (geo.bits - 1)))
    return torch.stack([xs, ts], dim=-1)


def _rows(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``t[lo:hi]`` without the cost of indexing when it is all of ``t`` (the common case)."""
    return t if lo == 0 and hi == t.shape[0] else t[lo:hi]


def _matmul_decode(x, qweight, zo, s, geo: _Geometry) -> torch.Tensor:
    """``y = sum_g s_g * (x~_g @ v_g - X_g z_g + T_g)``: no dequantization pass."""
    m, k, n, g = x.shape[0], geo.in_features, geo.out_features, geo.group
    xt = x * geo.row_scale
    partial = torch.empty(geo.n_groups, m, n, dtype=x.dtype, device=x.device)
    for a, b in geo.chunks():
        v = _unpack_scaled(qweight, geo, a, b)
        for g0, n_full, lo, hi in geo.segments(a, b):
            xs = xt if lo == 0 and hi == k else xt[:, lo:hi]
            rows = _rows(v, lo - a, hi - a)
            if n_full:
                xg = xs.reshape(m, n_full, g).transpose(0, 1)  # [groups, m, g]
                out = _rows(partial, g0, g0 + n_full)
                torch.bmm(xg, rows.view(n_full, g, n), out=out)
            elif lo == g0 * g:  # first piece of a group
                torch.mm(xs, rows, out=partial[g0])
            else:
                partial[g0].addmm_(xs, rows)
    terms = _group_terms(x, geo).transpose(0, 1)  # [G, m, 2]
    partial.baddbmm_(terms, zo, alpha=-1)
    return partial.mul_(s.unsqueeze(1)).sum(0)


def _matmul_prefill(x, qweight, zo, s, geo: _Geometry) -> torch.Tensor:
    """``y = x~ @ (v * s) - sum_g (X_g z_g - T_g) s_g``, chunk after chunk."""
    n, ng = geo.out_features, geo.n_groups
    xt = x * geo.row_scale
    terms = _group_terms(x, geo).reshape(x.shape[0], 2 * ng)
    zs = (zo * s.unsqueeze(1)).view(2 * ng, n)  # rows (g, 0): z_g * s_g, (g, 1): s_g
    y = torch.mm(terms, zs).neg_()
    for a, b in geo.chunks():
        w = _unpack_scaled(qweight, geo, a, b)
        for g0, n_full, lo, hi in geo.segments(a, b):
            rows = _rows(w, lo - a, hi - a)
            if n_full:
                rows.view(n_full, geo.group, n).mul_(_rows(s, g0, g0 + n_full).unsqueeze(1))
            else:
                rows.mul_(s[g0])
        y.addmm_(xt if a == 0 and b == geo.in_features else xt[:, a:b], w)
    return y


def _forward(x, qweight, zo, s, geo: _Geometry) -> torch.Tensor:
    if x.shape[0] <= DECODE_ROWS_PER_GROUP * geo.group:
        return _matmul_decode(x, qweight, zo, s, geo)
    return _matmul_prefill(x, qweight, zo, s, geo)


def _backward(gy, x, qweight, z, s, geo: _Geometry, need_x: bool, need_s: bool):
    """Gradients of ``y = x @ W^T`` for ``x`` and the step sizes, streamed over chunks.

    ``dL/dx[:, chunk] = gy @ W_chunk^T`` and
    ``dL/ds[g, o] = sum_{i in g} (q[i, o] - z[g, o]) * (x^T gy)[i, o]``.
    """
    n = geo.out_features
    gx = torch.empty_like(x) if need_x else None
    gs = torch.zeros_like(s) if need_s else None
    for a, b in geo.chunks():
        w = _unpack_exact(qweight, geo, a, b)
        segs = list(geo.segments(a, b))
        for g0, n_full, lo, hi in segs:  # w <- q - z
            rows = w[lo - a : hi - a]
            if n_full:
                rows.view(n_full, geo.group, n).sub_(z[g0 : g0 + n_full].unsqueeze(1))
            else:
                rows.sub_(z[g0])
        if need_s:
            xtg = torch.mm(x[:, a:b].t(), gy).mul_(w)  # [rows, out]
            for g0, n_full, lo, hi in segs:
                part = xtg[lo - a : hi - a]
                if n_full:
                    gs[g0 : g0 + n_full] += part.view(n_full, geo.group, n).sum(1)
                else:
                    gs[g0] += part.sum(0)
        if need_x:
            for g0, n_full, lo, hi in segs:  # w <- (q - z) * s
                rows = w[lo - a : hi - a]
                if n_full:
                    rows.view(n_full, geo.group, n).mul_(s[g0 : g0 + n_full].unsqueeze(1))
                else:
                    rows.mul_(s[g0])
            gx[:, a:b] = gy @ w.t()
    return gx, gs


class _PackedMatmul(torch.autograd.Function):
    """``y = x @ W(scales)^T`` with gradients for ``x`` and ``scales`` (codes are constants)."""

    @staticmethod
    def forward(ctx, x, scales, qweight, zo, geo):
        ctx.save_for_backward(x, scales, qweight, zo)
        ctx.geo = geo
        return _forward(x, qweight, zo, scales.float(), geo)

    @staticmethod
    def backward(ctx, gy):
        x, scales, qweight, zo = ctx.saved_tensors
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gy = gy.float().contiguous()
        gx, gs = _backward(gy, x, qweight, zo[:, 0], scales.float(), ctx.geo, need_x, need_s)
        return gx, None if gs is None else gs.to(scales.dtype), None, None, None


class TorchKernel:
    """Chunked unpack + matmul in plain torch, fast on the CPU (see the module docstring).

    The ``torch`` backend; what it runs is declared in
    :data:`eqat_cli.quant.caps.TORCH_KERNEL_CAPS`.
    """

    name = "torch"

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != layer.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {layer.in_features}")
        if layer.scales.requires_grad and torch.is_grad_enabled() and torch.is_autocast_enabled(x.device.type):
            # training under autocast: dequantize (fp32) and let autocast run the matmul (docstring)
            w = layer.dequantize(torch.float32)
            return torch.nn.functional.linear(x, w, None if layer.bias is None else layer.bias.float())
        with torch.autocast(x.device.type, enabled=False):  # fp32 arithmetic, also inside autocast regions
            return self._forward_fp32(layer, x)

    def _forward_fp32(self, layer, x: torch.Tensor) -> torch.Tensor:
        k, n = layer.in_features, layer.out_features
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k).float()  # fp32 arithmetic: see "Precision" in the module docstring
        if x2.shape[0] == 0 or k == 0:
            y = x2.new_zeros(x2.shape[0], n)
        else:
            geo = geometry(layer, x.device)
            zo = zero_rows(layer, torch.float32)
            scales = layer.scales
            if not torch.is_grad_enabled():
                y = _forward(x2, layer.qweight, zo, scales.float(), geo)
            elif x2.requires_grad or scales.requires_grad:
                y = _PackedMatmul.apply(x2, scales, layer.qweight, zo, geo)
            else:
                with torch.no_grad():
                    y = _forward(x2, layer.qweight, zo, scales.float(), geo)
        if layer.bias is not None:
            y = y + layer.bias.float()
        return y.to(x.dtype).reshape(*lead, n)


TORCH_KERNEL = TorchKernel()
