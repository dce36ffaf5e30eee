"""llama.cpp's k-quant grids (Q2_K, Q3_K, Q4_K) and their fallbacks (IQ4_NL, Q5_0) as trainable
fake quantizers whose weights a GGUF file holds *exactly*.

Layouts (ggml ``ggml-common.h`` / ``ggml-quants.c``, gguf-py ``quants.py``), rows split into blocks:

=========  =====  ==========  ====================================================  =====
type       block  sub-block   weight                                                bytes
=========  =====  ==========  ====================================================  =====
Q2_K       256    16          ``d*sc*q - dmin*m``, q 0..3, sc/m 4-bit, d/dmin fp16     84
Q3_K       256    16          ``d*sc*(q - 4)``, q 0..7, sc signed 6-bit (-32..31)      110
Q4_K       256    32          ``d*sc*q - dmin*m``, q 0..15, sc/m 6-bit                 144
Q5_0       32     32          ``d*(q - 16)``, q 0..31, d fp16                           22
IQ4_NL     32     32          ``d*K[q]``, 16-value codebook K, d fp16                   18
=========  =====  ==========  ====================================================  =====

Every product above is exact in fp32 (an fp16 value times integers of at most 10 bits), so the
only rounding llama.cpp and gguf-py do is the one subtraction of ``Q2_K``/``Q4_K``, which
:func:`grid_weight` does in the same fp32 order: the fake-quantized weight equals the GGUF reader's
dequantization bit for bit.

A layer is parametrised (:class:`KQuantLinear`) like eqat's ``round`` Block-AP layer: the starting
weight ``w0`` stays fixed, a rounding offset ``v`` in [-0.5, 0.5] per weight and a factor per
sub-block scale (and minimum) are learned. The continuous sub-block scales are projected onto the
type's grid in every forward (the super-block ``d``/``dmin`` as fp16 of the largest sub-scale over
the level count, the sub-scales rounded to their 4/6-bit levels), straight-through, so training
only ever sees weights the file can hold.

A row whose width is not a multiple of 256 gets the fallback llama.cpp's ``llama-quantize`` picks
(``src/llama-quant.cpp``: Q2_K/Q3_K -> IQ4_NL, Q4_K -> Q5_0); :func:`tensor_type`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
import torch.nn.functional as F
from torch import nn

from eqat_cli.errors import BadInputError, UnsupportedError
from eqat_cli.quant.primitives import clamp_ste, round_ste
from eqat_cli.quant.targets import FALLBACK, QK_K, TARGETS, parse_target  # noqa: F401 (re-exported)

IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
OFFSET_MAX = 0.5
FACTOR_LO, FACTOR_HI = 0.5, 1.5


@dataclass(frozen=True)
class GridType:
    """One GGML type's grid: block and sub-block length, the kind of code, its levels."""

    name: str
    block: int  # weights per block (256 for k-quants, 32 otherwise)
    sub: int  # weights sharing one (sub-)scale
    kind: str  # "asym" (d*sc*q - dmin*m), "sym" (signed sub-scales, q - zero), "scale" (fp16 d per sub), "codebook"
    qmax: int  # largest code
    zero: int = 0  # the code offset of symmetric types (Q3_K 4, Q5_0 16)
    sc_levels: int = 0  # largest sub-scale (and sub-min) level of the 256-blocks
    block_bytes: int = 0

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / self.block


TYPES = {
    "Q2_K": GridType("Q2_K", QK_K, 16, "asym", 3, sc_levels=15, block_bytes=84),
    "Q3_K": GridType("Q3_K", QK_K, 16, "sym", 7, zero=4, sc_levels=32, block_bytes=110),
    "Q4_K": GridType("Q4_K", QK_K, 32, "asym", 15, sc_levels=63, block_bytes=144),
    "Q5_0": GridType("Q5_0", 32, 32, "scale", 31, zero=16, block_bytes=22),
    "IQ4_NL": GridType("IQ4_NL", 32, 32, "codebook", 15, block_bytes=18),
}
def tensor_type(target: str, in_features: int, name: str = "layer") -> str:
    """The GGML type a linear of input width ``in_features`` gets under ``target`` (its fallback when
    the width is not a multiple of 256, as llama-quantize does); refuses widths no block fits."""
    if in_features % QK_K == 0:
        return target
    fb = FALLBACK[target]
    if in_features % TYPES[fb].block:
        raise UnsupportedError(
            f"{name}: input width {in_features} is a multiple of neither {QK_K} ({target}) nor "
            f"{TYPES[fb].block} (its fallback {fb}); llama.cpp would keep it F16"
        )
    return fb


# ---------------------------------------------------------------------- the grid


def _fp16_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.half().float() - x).detach() + x


def _safe(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.ones_like(d), d)


def project(gt: GridType, scale: torch.Tensor, mn: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Continuous sub-block scales ``[out, n_sub]`` (and minimums, ``w = S*q - M`` with ``M >= 0``,
    for the asymmetric types) -> their nearest grid values, straight-through.

    Returns ``S`` (and ``M``) ``[out, n_sub]``, fp32 values exactly as llama.cpp computes them, plus
    the stored fields: ``d`` (and ``dmin``) per block, integer ``sc`` (and ``m``) per sub-block."""
    out, n_sub = scale.shape
    if gt.kind in ("scale", "codebook"):
        d = _fp16_ste(scale)
        return {"S": d, "d": d}
    per = gt.block // gt.sub
    s3 = scale.reshape(out, n_sub // per, per)
    if gt.kind == "asym":
        d = _fp16_ste(s3.amax(-1, keepdim=True).clamp(min=0) / gt.sc_levels)
        sc = clamp_ste(round_ste(s3 / _safe(d)), 0, gt.sc_levels)
        m3 = mn.reshape(out, n_sub // per, per)
        dmin = _fp16_ste(m3.amax(-1, keepdim=True).clamp(min=0) / gt.sc_levels)
        m = clamp_ste(round_ste(m3 / _safe(dmin)), 0, gt.sc_levels)
        return {"S": (d * sc).reshape(out, n_sub), "M": (dmin * m).reshape(out, n_sub),
                "d": d.squeeze(-1), "dmin": dmin.squeeze(-1), "sc": sc.reshape(out, n_sub),
                "m": m.reshape(out, n_sub)}
    # sym (Q3_K): the sub-scale of largest magnitude maps to level -32 (llama.cpp's make_q3_quants)
    idx = s3.abs().argmax(-1, keepdim=True)
    d = _fp16_ste(-s3.gather(-1, idx) / gt.sc_levels)
    sc = clamp_ste(round_ste(s3 / _safe(d)), -gt.sc_levels, gt.sc_levels - 1)
    return {"S": (d * sc).reshape(out, n_sub), "d": d.squeeze(-1), "sc": sc.reshape(out, n_sub)}


def _codebook() -> torch.Tensor:
    return torch.tensor(IQ4NL_VALUES, dtype=torch.float32)


_SEG_LUT: dict = {}


def _segments(x: torch.Tensor) -> torch.Tensor:
    """Codebook segment ``i`` (0..14) with ``K[i] <= x < K[i+1]`` (ends clamped): the codebook values
    are integers, so ``floor(x)`` decides it, through a 240-entry table (much faster than bucketize)."""
    lut = _SEG_LUT.get(x.device)
    if lut is None:
        kv = torch.tensor(IQ4NL_VALUES)
        ints = torch.arange(kv[0], kv[-1])
        lut = _SEG_LUT[x.device] = (torch.bucketize(ints, kv[1:-1], right=True)).to(x.device)
    return lut[(x.floor().clamp(IQ4NL_VALUES[0], IQ4NL_VALUES[-1] - 1) - IQ4NL_VALUES[0]).long()]


def _codebook_position(x: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear position of ``x`` on the IQ4_NL codebook (integer i at value K[i]): rounding
    it picks the nearest value; clamped to [0, 15]."""
    kv = _codebook().to(x.device)
    i = _segments(x.detach())
    lo, hi = kv[i], kv[i + 1]
    return (i + (x - lo) / (hi - lo)).clamp(0, 15)


class _CodebookRound(torch.autograd.Function):
    """``K[clamp(round(pos(x) + v), 0, 15)]`` with the straight-through gradient of the piecewise-
    linear codebook: ``d/dv = K'(idx)``, ``d/dx = K'(idx) / K'(segment of x)`` (1 inside a segment
    of the same length); returns the value and the index."""

    @staticmethod
    def forward(ctx, x, v):
        kv = _codebook().to(x.device)
        seg = _segments(x)
        lo, hi = kv[seg], kv[seg + 1]
        pos = (seg + (x - lo) / (hi - lo)).clamp_(0, 15)
        idx = (pos + v).round_().clamp_(0, 15)
        il = idx.long()
        slope_idx = kv[il.clamp(max=14) + 1] - kv[il.clamp(max=14)]
        inr = ((x >= kv[0]) & (x <= kv[-1])).float()
        ctx.save_for_backward(slope_idx, (hi - lo), inr)
        ctx.mark_non_differentiable(idx)
        return kv[il], idx

    @staticmethod
    def backward(ctx, g, _gidx):
        slope_idx, seglen, inr = ctx.saved_tensors
        gv = g * slope_idx
        return gv * inr / seglen, gv


def expand(t: torch.Tensor, sub: int) -> torch.Tensor:
    return t.repeat_interleave(sub, dim=1)


def grid_weight(gt: GridType, w0: torch.Tensor, g: dict[str, torch.Tensor],
                offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w0 [out, in]`` on the projected grid ``g`` (:func:`project`), with an optional
    rounding offset per weight: ``(weight, codes)``, the weight exactly what GGUF readers decode.
    Codes are the stored integers (Q3_K 0..7, Q5_0 0..31, IQ4_NL codebook indices)."""
    S = expand(g["S"], gt.sub)
    v = 0.0 if offset is None else offset
    if gt.kind == "asym":
        M = expand(g["M"], gt.sub)
        q = clamp_ste(round_ste((w0 + M) / _safe(S) + v), 0, gt.qmax)
        return S * q - M, q
    if gt.kind == "codebook":
        val, idx = _CodebookRound.apply(w0 / _safe(S), v if torch.is_tensor(v) else torch.zeros_like(w0))
        return S * val, idx
    q = clamp_ste(round_ste(w0 / _safe(S) + v), -gt.zero, gt.qmax - gt.zero)
    return S * q, q + gt.zero


# ---------------------------------------------------------------------- start (RTN with a search)


def _sub_view(w: torch.Tensor, sub: int) -> torch.Tensor:
    out, inf = w.shape
    return w.reshape(out, inf // sub, sub)


def init_params(gt: GridType, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Starting sub-block scales (and minimums) for ``w``: per sub-block, a few candidate ranges
    (as llama.cpp's make_qkx2/make_q3 searches), each refitted by least squares on its codes; the
    one with the smallest squared error wins."""
    x = _sub_view(w.detach().float(), gt.sub)  # [out, n_sub, sub]
    best_err = torch.full(x.shape[:2], float("inf"))
    best_s = torch.zeros(x.shape[:2])
    best_m = torch.zeros(x.shape[:2]) if gt.kind == "asym" else None
    if gt.kind == "asym":
        lo = x.amin(-1).clamp(max=0)
        hi = x.amax(-1)
        for t in torch.linspace(-0.5, 1.5, 21):  # candidate level counts around qmax
            s = ((hi - lo) / (gt.qmax + t * 0.5)).clamp(min=1e-12)
            q = ((x - lo.unsqueeze(-1)) / s.unsqueeze(-1)).round().clamp(0, gt.qmax)
            # least squares of x ~ s*q - m over the sub-block
            n = x.shape[-1]
            sq, sqq, sx, sqx = q.sum(-1), (q * q).sum(-1), x.sum(-1), (q * x).sum(-1)
            det = n * sqq - sq * sq
            s_ls = torch.where(det > 0, (n * sqx - sq * sx) / torch.where(det > 0, det, 1), s)
            m_ls = torch.where(det > 0, (s_ls * sq - sx) / n, -lo)
            bad = (m_ls < 0) | (s_ls <= 0)
            s_ls, m_ls = torch.where(bad, s, s_ls), torch.where(bad, -lo, m_ls)
            err = ((s_ls.unsqueeze(-1) * q - m_ls.unsqueeze(-1) - x) ** 2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_m = torch.where(better, s_ls, best_s), torch.where(better, m_ls, best_m)
        return best_s.clamp(min=0), best_m.clamp(min=0)
    idx = x.abs().argmax(-1, keepdim=True)
    amax = x.gather(-1, idx).squeeze(-1)  # signed value of largest magnitude
    if gt.kind == "codebook":
        kv = _codebook()
        for t in torch.linspace(0.8, 1.2, 9):
            d = -amax / 127 * t
            pos = _codebook_position(x / _safe(d).unsqueeze(-1)).round().long()
            k = kv[pos]
            d_ls = torch.where((k * k).sum(-1) > 0, (k * x).sum(-1) / (k * k).sum(-1).clamp(min=1e-12), d)
            k = kv[_codebook_position(x / _safe(d_ls).unsqueeze(-1)).round().long()]
            err = ((d_ls.unsqueeze(-1) * k - x) ** 2).sum(-1)
            better = err < best_err
            best_err, best_s = torch.where(better, err, best_err), torch.where(better, d_ls, best_s)
        return best_s, None
    lo_code, hi_code = -gt.zero, gt.qmax - gt.zero
    for t in torch.linspace(0.8, 1.2, 17):
        s = amax / lo_code * t  # the largest magnitude maps to the negative end (as llama.cpp)
        q = (x / _safe(s).unsqueeze(-1)).round().clamp(lo_code, hi_code)
        s_ls = torch.where((q * q).sum(-1) > 0, (q * x).sum(-1) / (q * q).sum(-1).clamp(min=1e-12), s)
        q = (x / _safe(s_ls).unsqueeze(-1)).round().clamp(lo_code, hi_code)
        err = ((s_ls.unsqueeze(-1) * q - x) ** 2).sum(-1)
        better = err < best_err
        best_err, best_s = torch.where(better, err, best_err), torch.where(better, s_ls, best_s)
    return best_s, None


# ---------------------------------------------------------------------- bytes


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float16).numpy().view(np.uint8)


def encode(gt: GridType, g: dict[str, torch.Tensor], codes: torch.Tensor) -> np.ndarray:
    """The GGUF bytes ``[out, in / block * block_bytes]`` of a projected grid and its codes."""
    out, inf = codes.shape
    nb = inf // gt.block
    q = codes.detach().round().to(torch.int64).numpy().astype(np.uint8).reshape(out, nb, gt.block)
    if gt.name in ("Q2_K", "Q3_K"):
        q4 = q.reshape(out, nb, 2, 4, 32)  # [half, j, l]: byte half*32 + l, shift 2j
        low = (q4 & 3) << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1)
        qs = np.bitwise_or.reduce(low, axis=3).reshape(out, nb, 64)
        d = _f16_bytes(g["d"]).reshape(out, nb, 2)
        sc = g["sc"].detach().round().to(torch.int64).numpy().reshape(out, nb, 16)
        if gt.name == "Q2_K":
            m = g["m"].detach().round().to(torch.int64).numpy().reshape(out, nb, 16)
            scales = (sc | (m << 4)).astype(np.uint8)
            dmin = _f16_bytes(g["dmin"]).reshape(out, nb, 2)
            blocks = np.concatenate([scales, qs, d, dmin], axis=2)
        else:
            high = (q4 >> 2) << (np.arange(8, dtype=np.uint8).reshape(1, 1, 2, 4, 1))
            hmask = np.bitwise_or.reduce(high.reshape(out, nb, 8, 32), axis=2).astype(np.uint8)
            s6 = (sc + 32).astype(np.uint8)
            lo = (s6[:, :, :8] & 0xF) | ((s6[:, :, 8:] & 0xF) << 4)
            hi = np.zeros((out, nb, 4), dtype=np.uint8)
            for t in range(4):
                hi |= ((s6[:, :, 4 * t:4 * t + 4] >> 4) & 3) << (2 * t)
            blocks = np.concatenate([hmask, qs, lo, hi, d], axis=2)
    elif gt.name == "Q4_K":
        q4 = q.reshape(out, nb, 4, 2, 32)
        qs = (q4[:, :, :, 0] | (q4[:, :, :, 1] << 4)).reshape(out, nb, 128)
        sc = g["sc"].detach().round().to(torch.int64).numpy().reshape(out, nb, 8).astype(np.uint8)
        m = g["m"].detach().round().to(torch.int64).numpy().reshape(out, nb, 8).astype(np.uint8)
        scales = np.concatenate([
            (sc[:, :, :4] & 63) | ((sc[:, :, 4:] >> 4) << 6),
            (m[:, :, :4] & 63) | ((m[:, :, 4:] >> 4) << 6),
            (sc[:, :, 4:] & 0xF) | ((m[:, :, 4:] & 0xF) << 4),
        ], axis=2)
        blocks = np.concatenate([_f16_bytes(g["d"]).reshape(out, nb, 2), _f16_bytes(g["dmin"]).reshape(out, nb, 2),
                                 scales, qs], axis=2)
    elif gt.name == "Q5_0":
        qs = (q[:, :, :16] & 0xF) | ((q[:, :, 16:] & 0xF) << 4)
        hbits = (q >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)
        qh = np.bitwise_or.reduce(hbits, axis=2).astype("<u4").reshape(out, nb, 1).view(np.uint8)
        blocks = np.concatenate([_f16_bytes(g["d"]).reshape(out, nb, 2), qh, qs], axis=2)
    elif gt.name == "IQ4_NL":
        qs = q[:, :, :16] | (q[:, :, 16:] << 4)
        blocks = np.concatenate([_f16_bytes(g["d"]).reshape(out, nb, 2), qs], axis=2)
    else:  # pragma: no cover
        raise UnsupportedError(f"no encoder for {gt.name}")
    return np.ascontiguousarray(blocks.astype(np.uint8).reshape(out, nb * gt.block_bytes))


def decode(type_name: str, blocks: np.ndarray, in_features: int) -> np.ndarray:
    """GGUF bytes ``[out, row_bytes]`` -> float32 ``[out, in_features]`` (gguf-py's dequantizer, the
    same one llama.cpp's arithmetic matches)."""
    w = dequantize(np.ascontiguousarray(blocks), getattr(GGMLQuantizationType, type_name))
    return np.asarray(w, dtype=np.float32).reshape(blocks.shape[0], in_features)


# ---------------------------------------------------------------------- layers


class KQuantLinear(nn.Module):
    """Fake-quant linear on a GGML grid: fixed ``w0``, learned rounding ``offset`` per weight and
    scale (``fs``) and minimum (``fm``) factors per sub-block, projected onto the grid in every
    forward. ``to_packed()`` gives the :class:`KQuantPacked` layer holding the GGUF bytes."""

    def __init__(self, weight: torch.Tensor, type_name: str, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.type_name = type_name
        gt = TYPES[type_name]
        if self.in_features % gt.block:
            raise UnsupportedError(f"{type_name} needs rows that are a multiple of {gt.block}, got {self.in_features}")
        self.register_buffer("w0", weight.detach().float().clone())
        s0, m0 = init_params(gt, self.w0)
        self.register_buffer("s0", s0)
        self.register_buffer("m0", m0 if m0 is not None else torch.zeros(0))
        self.offset = nn.Parameter(torch.zeros_like(self.w0))
        self.fs = nn.Parameter(torch.ones_like(s0))
        self.fm = nn.Parameter(torch.ones_like(s0)) if m0 is not None else None
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @property
    def grid_type(self) -> GridType:
        return TYPES[self.type_name]

    def grid(self) -> dict[str, torch.Tensor]:
        gt = self.grid_type
        mn = self.m0 * self.fm if self.fm is not None else None
        return project(gt, self.s0 * self.fs, mn)

    def fake_weight(self) -> torch.Tensor:
        return grid_weight(self.grid_type, self.w0, self.grid(), self.offset)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def factors(self) -> list[nn.Parameter]:
        return [p for p in (self.fs, self.fm) if p is not None]

    @torch.no_grad()
    def project(self) -> None:
        self.offset.clamp_(-OFFSET_MAX, OFFSET_MAX)
        for p in self.factors():
            p.clamp_(FACTOR_LO, FACTOR_HI)

    @torch.no_grad()
    def to_blocks(self) -> np.ndarray:
        g = {k: v.detach().cpu() for k, v in self.grid().items()}
        _, codes = grid_weight(self.grid_type, self.w0.cpu(), g, self.offset.detach().cpu())
        return encode(self.grid_type, g, codes)

    @torch.no_grad()
    def to_packed(self) -> "KQuantPacked":
        return KQuantPacked(torch.from_numpy(self.to_blocks()), self.type_name, self.in_features,
                            None if self.bias is None else self.bias.detach().cpu())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.type_name}"


def type_code(type_name: str) -> int:
    return int(getattr(GGMLQuantizationType, type_name))


def type_from_code(code: int) -> str:
    name = GGMLQuantizationType(int(code)).name
    if name not in TYPES:
        raise BadInputError(f"GGML type {name} is not a grid eqat trains (one of {', '.join(TYPES)})")
    return name


class KQuantPacked(nn.Module):
    """Inference layer holding a weight as GGUF bytes (``kq_blocks`` uint8 ``[out, row_bytes]`` and
    ``kq_type``, the GGML type id): the checkpoint stores what the GGUF file will, and the weight
    is their dequantization (computed once, kept as a non-persistent buffer)."""

    def __init__(self, blocks: torch.Tensor, type_name: str, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        gt = TYPES[type_name]
        out = blocks.shape[0]
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or in_features % gt.block or \
                blocks.shape[1] != in_features // gt.block * gt.block_bytes:
            raise BadInputError(f"{type_name} blocks of shape {tuple(blocks.shape)} do not hold rows of {in_features}")
        self.in_features, self.out_features, self.type_name = in_features, out, type_name
        self.register_buffer("kq_blocks", blocks.contiguous())
        self.register_buffer("kq_type", torch.tensor([type_code(type_name)], dtype=torch.int32))
        w = torch.from_numpy(decode(type_name, blocks.numpy(), in_features))
        self.register_buffer("weight", w, persistent=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.type_name}"


def kquant_layer_names(keys) -> list[str]:
    return sorted(k[: -len(".kq_blocks")] for k in keys if k.endswith(".kq_blocks"))


def install_kquant_layers(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """Replace every ``nn.Linear`` with ``kq_blocks`` in ``sd`` by a :class:`KQuantPacked` (consuming
    its tensors from ``sd``); ``{name: type}``."""
    found = {}
    for name in kquant_layer_names(sd.keys()):
        parent, _, attr = name.rpartition(".")
        lin = model.get_submodule(name)
        in_f = getattr(lin, "in_features", None)
        if in_f is None:
            raise BadInputError(f"{name} holds GGUF blocks but is not a linear layer")
        blocks, code = sd.pop(f"{name}.kq_blocks"), sd.pop(f"{name}.kq_type", None)
        if code is None:
            raise BadInputError(f"{name}: kq_blocks without kq_type")
        bias = sd.pop(f"{name}.bias", None)
        layer = KQuantPacked(blocks, type_from_code(int(code.reshape(-1)[0])), in_f,
                             None if bias is None else bias.float())
        if layer.out_features != lin.out_features:
            raise BadInputError(f"{name}: GGUF blocks hold {layer.out_features} rows, the layer has {lin.out_features}")
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
        found[name] = layer.type_name
    return found


def kquant_block(block: nn.Module, target: str, names: list[str]) -> dict[str, KQuantLinear]:
    """Replace the linears ``names`` of ``block`` by :class:`KQuantLinear` on ``target``'s grid (or
    their width's fallback), in place."""
    out = {}
    for name in names:
        lin = block.get_submodule(name)
        w = lin.weight if hasattr(lin, "weight") else lin.w0
        layer = KQuantLinear(w, tensor_type(target, lin.in_features, name), getattr(lin, "bias", None))
        parent, _, attr = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, attr, layer.to(w.device))
        out[name] = layer
    return out
