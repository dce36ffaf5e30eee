"""A constrained parametrisation for Block-AP: learned rounding plus range clipping.

EfficientQAT's own form (:class:`~eqat_cli.quant.linear.QuantLinear`) trains the weights, step
sizes and zero points freely. :class:`RoundQuantLinear` keeps the starting weight ``w0`` fixed
and learns, as SignRound/AutoRound do,

* an offset ``v`` per weight in ``[-0.5, 0.5]`` (in step units) added before rounding, so every
  code can only move to a neighbouring grid point of where ``w0`` would round;
* two clipping factors per group, ``clip_max`` and ``clip_min`` in ``[CLIP_LO, 1]``, that shrink the
  top and the bottom of the starting grid's range ``[-z0 * s0, (qmax - z0) * s0]``.

With ``f = (clip_max * (qmax - z0) + clip_min * z0) / qmax`` the grid is ``s = s0 * f``,
``z = round(clip_min * z0 / f)``; ``q = clamp(round(w0 / s + v) + z, 0, qmax)`` and the weight is
``(q - z) * s``. At ``v = 0, clip = 1``, ``f`` is exactly 1 (small integers are exact in float), so
the layer starts *exactly* at its starting grid: min-max (RTN), or GPTQ when ``w0`` is GPTQ's
error-compensated weight (see ``gptq_init_block``). Training can never leave the grid or move a
weight by more than one step, which is what keeps tens of steps per block from doing harm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eqat_cli.quant import fused_quant
from eqat_cli.quant.linear import PackedLinear, QuantLinear
from eqat_cli.quant.primitives import SCALE_MAX, SCALE_MIN, clamp_ste, expand_groups, qmax, round_ste
from eqat_cli.scheme import QuantScheme

OFFSET_MAX = 0.5
CLIP_LO = 0.5


class _GroupedRoundQuant(torch.autograd.Function):
    """``w = (clamp(round(w0 / s + v) + z, 0, qmax) - z) * s`` on ``[out, groups, group]`` views,
    with the straight-through gradients of that expression written out: the same gradients as
    autograd through ``round_ste``/``clamp`` gives, from a handful of fused elementwise passes
    instead of a graph of ~20 (this fake quantization, not the matmuls, dominated a training step).

    Gradients (``inr``: the rounded code is inside ``[0, qmax]``, bounds included, as ``clamp``):
    ``dv = g s inr``; ``ds = sum(g (q - z)) - sum(g inr w0 / s)``; ``dz = -sum(g s (1 - inr))``.
    """

    @staticmethod
    def forward(ctx, w0, v, s, z, m: int):
        s3, z3 = s.unsqueeze(-1), z.unsqueeze(-1)
        x = w0 / s3 + v
        code = x.round_() + z3
        inr = (code >= 0) & (code <= m)
        q = code.clamp_(0, m)
        ctx.save_for_backward(w0, s, z, q, inr)
        return (q - z3) * s3

    @staticmethod
    def backward(ctx, g):
        w0, s, z, q, inr = ctx.saved_tensors
        s3, z3 = s.unsqueeze(-1), z.unsqueeze(-1)
        gs = g * s3
        dv = gs * inr
        ds = (g * (q - z3)).sum(-1) - (dv * w0).sum(-1) / (s * s)
        dz = (dv - gs).sum(-1)
        return None, dv, ds, dz, None


class RoundQuantLinear(nn.Module):
    """Fake-quant linear with a fixed weight and learned rounding offsets / clipping factors."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.scheme = scheme
        self.bits, self.group_size = scheme.bits, scheme.group_size
        bits = self.bits
        self.register_buffer("w0", weight.detach().float().clone())
        self.register_buffer("s0", scale.detach().float().clone())
        self.register_buffer("z0", zero.detach().float().round().clamp(0, qmax(bits)))
        self.offset = nn.Parameter(torch.zeros_like(self.w0))
        self.clip_max = nn.Parameter(torch.ones_like(self.s0))
        self.clip_min = nn.Parameter(torch.ones_like(self.s0))
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_quant_linear(cls, q: nn.Module) -> "RoundQuantLinear":
        """Start from a :class:`QuantLinear`'s current weight, step sizes and zero points."""
        return cls(q.weight, q.quantizer.scale, q.quantizer.zero, q.scheme, q.bias)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Step sizes and (integer-valued, straight-through) zero points, ``[out, n_groups]``."""
        m = qmax(self.bits)
        f = (self.clip_max * (m - self.z0) + self.clip_min * self.z0) / m
        s = clamp_ste(self.s0 * f, SCALE_MIN, SCALE_MAX)
        z = clamp_ste(round_ste(self.clip_min * self.z0 / f), 0, m)
        return s, z

    def _grouped(self) -> bool:
        g = self.group_size if self.group_size != -1 else self.in_features
        return self.in_features % g == 0

    def _codes_and_grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, z = self.grid()
        se = expand_groups(s, self.group_size, self.in_features)
        ze = expand_groups(z, self.group_size, self.in_features)
        q = (round_ste(self.w0 / se + self.offset) + ze).clamp(0, qmax(self.bits))
        return q, se, ze

    def fake_weight(self) -> torch.Tensor:
        if fused_quant.applies(self.w0):  # one C++ pass forward and backward, any group size
            s, z = self.grid()
            return fused_quant.round_fake_weight(self.w0, self.offset, s, z, qmax(self.bits), self.group_size)
        if self._grouped():  # the fast path: whole groups as a [out, groups, group] view
            s, z = self.grid()
            shape = (self.out_features, s.shape[1], -1)
            w = _GroupedRoundQuant.apply(self.w0.view(shape), self.offset.view(shape), s, z, qmax(self.bits))
            return w.view(self.out_features, self.in_features)
        q, se, ze = self._codes_and_grid()
        return (q - ze) * se

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def project(self) -> None:
        """Keep the learned parameters in their ranges (called after every optimizer step)."""
        self.offset.clamp_(-OFFSET_MAX, OFFSET_MAX)
        self.clip_max.clamp_(CLIP_LO, 1.0)
        self.clip_min.clamp_(CLIP_LO, 1.0)

    @torch.no_grad()
    def to_packed(self):
        q, _, _ = self._codes_and_grid()
        s, z = self.grid()
        return PackedLinear.from_codes(
            q.to(torch.int32), s.float(), z.to(torch.int32), self.scheme,
            bias=None if self.bias is None else self.bias.detach(),
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}")


# How far inside its rounding cell :func:`round_to_free` places a weight (in steps from the cell's
# centre): just short of the boundary, so float error in ``w / s`` cannot flip its code.
FREE_FRAC_MAX = 0.49


@torch.no_grad()
def round_to_free(m: RoundQuantLinear) -> QuantLinear:
    """The :class:`QuantLinear` (free weights, step sizes, zero points) that equals ``m`` now:
    ``m``'s grid (clipped step sizes, integer zero points) and weights that fake-quantize to
    exactly ``m``'s codes, each where ``w0 / s + v`` put it inside its cell (clipped to
    ``FREE_FRAC_MAX`` of the centre), so free training continues from the rounded result with the
    distances to the rounding boundaries it learned (the hybrid recipe of issue #28)."""
    s, z = m.grid()
    se = expand_groups(s, m.group_size, m.in_features)
    x = m.w0 / se + m.offset
    r = x.round()
    w = (r + (x - r).clamp(-FREE_FRAC_MAX, FREE_FRAC_MAX)) * se
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.w0.device)
    lin.weight.copy_(w)
    if m.bias is not None:
        lin.bias.copy_(m.bias)
    q = QuantLinear(lin, m.scheme)
    q.quantizer.scale.copy_(s)
    q.quantizer.zero.copy_(z)
    return q
