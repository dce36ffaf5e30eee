"""Pure math of uniform asymmetric per-group quantization.

Conventions (shared by every room):

* A linear weight ``w`` has shape ``[out_features, in_features]`` (torch layout).
* Groups run along the *input* dimension: column ``i`` belongs to group ``i // group_size``.
  ``group_size == -1`` means one group per output channel (per-channel).
* The last group may be shorter than ``group_size`` ("ragged"), e.g. SmolLM2's width 576 with
  group 128 gives groups of 128, 128, 128, 128 and 64.
* Step sizes ``scale`` and zero points ``zero`` have shape ``[out_features, n_groups]``.
* ``W ~= (clamp(round(W / s) + round(z), 0, 2^b - 1) - round(z)) * s``.

These are the numeric kernels under the layers: they take plain ``bits`` / ``group_size`` ints
(the two numbers the arithmetic uses, on hot paths such as every fake-quant forward), not a
:class:`~eqat_cli.scheme.QuantScheme`. Everything above them (layers, configs, Block-AP's start,
GPTQ, channel scaling, the benchmark) takes a ``QuantScheme`` and passes its numbers down here.
"""

from __future__ import annotations

import math

import torch

from eqat_cli.scheme import SUPPORTED_BITS, check_bits  # noqa: F401  (one home: eqat_cli.scheme)
from eqat_cli.scheme import check_group

SCALE_MIN = 1e-5
SCALE_MAX = 1e4


def effective_group(group_size: int, in_features: int) -> int:
    """The group length actually used: per-channel (-1) becomes the whole input width."""
    return in_features if check_group(group_size) == -1 else group_size


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / effective_group(group_size, in_features))


def qmax(bits: int) -> int:
    return 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clamp in the forward pass, identity gradient in the backward pass."""
    return (x.clamp(lo, hi) - x).detach() + x


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """``[out, n_groups]`` -> ``[out, in_features]`` (ragged last group supported)."""
    g = effective_group(group_size, in_features)
    return t.repeat_interleave(g, dim=1)[:, :in_features]


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """``g_idx[i] = i // group`` as int32, the GPTQ-compatible group map."""
    g = effective_group(group_size, in_features)
    return (torch.arange(in_features, dtype=torch.int32) // g).to(torch.int32)


def _group_reduce(w: torch.Tensor, group_size: int, fn) -> torch.Tensor:
    out, inf = w.shape
    g = effective_group(group_size, inf)
    full = inf // g
    parts = []
    if full:
        parts.append(fn(w[:, : full * g].reshape(out, full, g), -1))
    if inf % g:
        parts.append(fn(w[:, full * g :], -1).unsqueeze(1))
    return torch.cat(parts, dim=1)


def minmax_init(
    w: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max (RTN) step size and zero point per group, as EfficientQAT initialises them.

    Returns float ``scale`` and *integer-valued* float ``zero`` (already rounded, in range),
    both ``[out, n_groups]`` in float32.
    """
    check_bits(bits)
    w = w.detach().float()
    wmin = _group_reduce(w, group_size, lambda x, d: x.amin(d))
    wmax = _group_reduce(w, group_size, lambda x, d: x.amax(d))
    # The grid must contain zero exactly so that zero weights stay zero.
    wmin = wmin.clamp(max=0.0)
    wmax = wmax.clamp(min=0.0)
    scale = ((wmax - wmin) / qmax(bits)).clamp(SCALE_MIN, SCALE_MAX)
    zero = (-wmin / scale).round().clamp(0, qmax(bits))
    return scale, zero


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Differentiable quantize-dequantize with straight-through rounding.

    Gradients flow to ``w`` (inside the clamp range), ``scale`` (LSQ-style) and ``zero``.
    """
    inf = w.shape[1]
    s = expand_groups(clamp_ste(scale, SCALE_MIN, SCALE_MAX), group_size, inf)
    z = expand_groups(clamp_ste(round_ste(zero), 0, qmax(bits)), group_size, inf)
    q = (round_ste(w / s) + z).clamp(0, qmax(bits))
    return ((q - z) * s).to(w.dtype)


def integer_zero(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round and clamp learned zero points into the representable range (int32)."""
    return zero.detach().round().clamp(0, qmax(bits)).to(torch.int32)


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Integer codes ``[out, in]`` (int32, in ``[0, 2^b-1]``) for the given parameters."""
    inf = w.shape[1]
    s = expand_groups(scale.detach().float().clamp(SCALE_MIN, SCALE_MAX), group_size, inf)
    z = expand_groups(integer_zero(zero, bits).float(), group_size, inf)
    q = (w.detach().float() / s).round() + z
    return q.clamp(0, qmax(bits)).to(torch.int32)


def dequantize_codes(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - z) * s`` for codes ``[out, in]`` and group parameters ``[out, n_groups]``."""
    inf = q.shape[1]
    s = expand_groups(scale.to(dtype), group_size, inf)
    z = expand_groups(zero.to(dtype), group_size, inf)
    return (q.to(dtype) - z) * s
