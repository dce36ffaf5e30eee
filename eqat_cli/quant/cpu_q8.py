"""Int8-activation decode kernel for packed layers (the ``cpu`` backend's one-token path).

llama.cpp's CPU decode multiplies its 4-bit weights with activations quantized to 8 bits per
block (Q4_1 x Q8_1) in integer dot products; this module does the same for eqat's packed layers:

* :class:`Q8Weights` re-lays one packed layer, or several that read the same input (q/k/v,
  gate/up) concatenated along the outputs, once at load, into a decode-friendly layout (the
  layout comment of ``csrc/packed_cpu.cpp``): 64-output super-tiles, 16-output tiles of 4-byte
  lanes so one vector instruction multiplies 16 outputs x 4 (or 8, 16) inputs, 2- and 4-bit codes
  two and four to a byte (3-bit codes stored as 4-bit), 8-bit codes one to a byte; step sizes and
  zero points per (group, output) next to them. Memory: the codes' bytes (as packed, or 4/3 of
  them at 3 bits) plus 3 bytes per group and output.
* :meth:`Q8Weights.matvec` quantizes the activation row per weight group to int8
  (``dx = max|x| / 127``, round half to even) and runs ``eqat_q8_gemv``: per group the
  integer dot product of codes and int8 activations minus ``zero * sum(xq)`` in exact int32
  arithmetic, times ``scale * dx`` in fp32. AVX-512 VNNI (``vpdpbusd``) where the build targets
  it, AVX-512BW / AVX2 (``vpmaddubsw``) for codes below 16, a portable loop otherwise
  (:func:`implementation`). Threads: the C library's pool, over super-tiles.

The result differs from the fp32 reference by the activation rounding only (about 0.4 % of a
group's largest activation per element, as llama.cpp's Q8_1); :func:`reference_matvec` is the same
arithmetic in torch (float64), which ``tests/test_cpu_q8.py`` checks the C kernel against.
"""

from __future__ import annotations

import ctypes

import torch

from eqat_cli.quant import cpu_kernel, packing
from eqat_cli.quant.primitives import effective_group

TILE = 64  # outputs per super-tile
PAD_K = 16  # each group's inputs are padded to a multiple of this
IMPL_NAMES = {0: "portable", 1: "avx2", 2: "avx512bw", 3: "avx512-vnni"}


def storage_bits(bits: int) -> int:
    """Bits a code occupies in the layout: 2 -> 2, 3 and 4 -> 4, 8 -> 8."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"no int8-activation layout for {bits}-bit codes")
    return 2 if bits == 2 else (4 if bits <= 4 else 8)


def group_bounds(k: int, group: int) -> list[tuple[int, int]]:
    g = effective_group(group, k)
    return [(lo, min(k, lo + g)) for lo in range(0, k, g)]


def implementation(bits: int, portable: bool = False) -> str | None:
    """Which inner loop runs ``bits``-bit codes (None: the C library is unavailable)."""
    lib = cpu_kernel._load()
    if lib is None:
        return None
    return IMPL_NAMES[lib.eqat_q8_impl(storage_bits(bits), 1 if portable else 0)]


class Q8Weights:
    """One packed layer, or layers reading one input concatenated along N, in the q8 layout.

    ``layers``: :class:`~eqat_cli.quant.linear.PackedLinear` objects with equal in_features,
    bits and group size. ``splits`` are their output widths (``matvec`` returns views of one
    buffer); biases are added after the product.
    """

    def __init__(self, layers, chunk: int = 4096):
        first = layers[0]
        key = {(l.in_features, l.bits, l.group_size) for l in layers}
        if len(key) != 1:
            raise ValueError("layers of one q8 group must agree in in_features, bits and group size")
        self.k, self.bits, self.group = first.in_features, first.bits, first.group_size
        self.sb = storage_bits(self.bits)
        self.splits = [l.out_features for l in layers]
        self.n = sum(self.splits)
        self.np_ = -(-self.n // TILE) * TILE
        bounds = group_bounds(self.k, self.group)
        self.g = len(bounds)
        kp = [-(-(hi - lo) // PAD_K) * PAD_K for lo, hi in bounds]
        self.kp = sum(kp)
        half = all(l.scales.dtype == torch.float16 for l in layers)
        self.half = 1 if half else 0
        sdt = torch.float16 if half else torch.float32
        f = 8 // self.sb
        ck = 4 * f
        ns = self.np_ // TILE
        # padded k position -> real k (padding left out)
        src = torch.cat([torch.arange(lo, hi) for lo, hi in bounds])
        dst = torch.cat([torch.arange(hi - lo) + o for (lo, hi), o in zip(bounds, _offsets(kp))])
        with torch.no_grad():
            qall = torch.zeros(self.np_, self.kp, dtype=torch.uint8)  # codes [NP, KP]
            sall = torch.zeros(self.g, self.np_, dtype=sdt)
            zall = torch.zeros(self.g, self.np_, dtype=torch.uint8)
            for layer, o0 in zip(layers, _offsets(self.splits)):
                for c0 in range(0, layer.out_features, chunk):  # bounded scratch (a 49152-wide head)
                    c1 = min(layer.out_features, c0 + chunk)
                    q = packing.unpack_rows(layer.qweight[:, c0:c1], layer.bits, self.k)  # [K, n]
                    qall[o0 + c0:o0 + c1, dst] = q.t()[:, src].to(torch.uint8)
                sall[:, o0:o0 + layer.out_features] = layer.scales.detach().to(sdt)
                zall[:, o0:o0 + layer.out_features] = packing.unpack_cols(
                    layer.qzeros, layer.bits, layer.out_features).to(torch.uint8)
            codes = torch.empty(ns, self.kp // ck, 4, 64, dtype=torch.uint8)
            shifts = (torch.arange(f, dtype=torch.int32) * self.sb).view(1, 1, 1, 1, f, 1)
            step = max(1, chunk // TILE)
            for s0 in range(0, ns, step):  # [s, t, lane, chunk, f, b] -> [s, chunk, t, lane*4 + b]
                s1 = min(ns, s0 + step)
                blk = qall[s0 * TILE:s1 * TILE].view(s1 - s0, 4, 16, self.kp // ck, f, 4).to(torch.int32)
                blk = (blk << shifts).sum(dim=4)  # fields of one byte combined: [s, t, lane, chunk, b]
                codes[s0:s1] = blk.permute(0, 3, 1, 2, 4).reshape(s1 - s0, self.kp // ck, 4, 64).to(torch.uint8)
            del qall
            scales = sall.view(self.g, ns, TILE).permute(1, 0, 2).contiguous()
            zeros = zall.view(self.g, ns, TILE).permute(1, 0, 2).contiguous()
        self.codes, self.scales, self.zeros = codes, scales, zeros
        self.biases = [None if l.bias is None else l.bias.detach().float().clone() for l in layers]
        vp = ctypes.c_void_p
        self._ptrs = (vp(codes.data_ptr()), vp(scales.data_ptr()), vp(zeros.data_ptr()))

    def matvec(self, x: torch.Tensor, threads: int | None = None, portable: bool = False) -> list[torch.Tensor]:
        """``x [K]`` fp32 contiguous -> one ``[N_i]`` fp32 tensor per layer (views of one buffer)."""
        lib = cpu_kernel._load()
        if lib is None:
            raise RuntimeError(cpu_kernel.library_status()[1])
        y = torch.empty(self.np_, dtype=torch.float32)
        nt = threads if threads is not None else cpu_kernel._threads(self.k * self.n)
        c, s, z = self._ptrs
        rc = lib.eqat_q8_gemv(c, s, self.half, z, self.k, effective_group(self.group, self.k), self.np_,
                              self.sb, ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()),
                              nt, 1 if portable else 0)
        if rc != 0:
            raise RuntimeError(f"eqat_q8_gemv rejected its arguments (code {rc})")
        outs = list(torch.split(y[: self.n], self.splits))
        for i, b in enumerate(self.biases):
            if b is not None:
                outs[i] = outs[i] + b
        return outs

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))


def _offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def quantize_activation(x: torch.Tensor, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation rounding in torch: ``(xq [K] float64 integers, dx [G] float64)``."""
    xq = torch.zeros(k, dtype=torch.float64)
    dxs = []
    for lo, hi in group_bounds(k, group):
        seg = x[lo:hi].float()
        amax = seg.abs().max()
        if float(amax) > 0:
            inv = torch.tensor(127.0, dtype=torch.float32) / amax
            xq[lo:hi] = torch.round(seg * inv).clamp(-127, 127).double()
            dxs.append(float(amax / torch.tensor(127.0, dtype=torch.float32)))
        else:
            dxs.append(0.0)
    return xq, torch.tensor(dxs, dtype=torch.float64)


def reference_matvec(layer, x: torch.Tensor) -> torch.Tensor:
    """What ``eqat_q8_gemv`` computes for ``layer`` (without bias), in float64 torch."""
    k = layer.in_features
    xq, dx = quantize_activation(x, k, layer.group_size)
    q = layer.codes().double()  # [K, N]
    z = layer.zero_points().double()  # [G, N]
    s = layer.scales.detach().double()  # [G, N]
    y = torch.zeros(layer.out_features, dtype=torch.float64)
    for gi, (lo, hi) in enumerate(group_bounds(k, layer.group_size)):
        dot = xq[lo:hi] @ q[lo:hi]
        y += s[gi] * dx[gi] * (dot - z[gi] * xq[lo:hi].sum())
    return y
