"""GPTQ (Frantar et al., 2022) on eqat's quantization grid, used to *initialise* Block-AP.

EfficientQAT starts every block from min-max (round-to-nearest) codes. GPTQ instead quantizes a
layer's weight columns one at a time and spreads each column's rounding error over the columns not
yet quantized, weighted by the inverse Hessian ``H = X^T X`` of the layer's inputs; the result is a
grid point of the same format (per-group asymmetric, integer zero points) with a lower output
error ``||X W^T - X W_q^T||`` on the calibration inputs. Block-AP then trains weights, step sizes and zero points from there.

This is the Cholesky / lazy-batch form of the algorithm. Two deliberate differences from the
reference code:

* each group's step size and zero point are computed from the group's weights *after* the error
  updates of all earlier columns (the reference reads stale columns for groups that start in the
  middle of its 128-column batch); here a group always starts a batch, so this is exact;
* ragged last groups (width 576 with group 128) are supported, as everywhere in eqat.

No activation reordering: the group map stays ``i // group``, which every export format needs.
"""

from __future__ import annotations

import torch

from eqat_cli.quant.primitives import SCALE_MAX, SCALE_MIN, effective_group, minmax_init, qmax
from eqat_cli.scheme import QuantScheme


class HessianAccumulator:
    """Running ``H = (2/N) sum x x^T`` over the rows of every input seen (float32 products,
    float64 sum), kept on ``device`` so that a GPU run never copies a Hessian per batch."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        self.add_gram(x.float().T @ x.float(), x.shape[0])

    def add_gram(self, gram: torch.Tensor, k: int) -> None:
        """Add ``gram = x^T x`` of ``k`` rows (lets linears that share an input share the product)."""
        if k == 0:
            return
        self.h *= self.n / (self.n + k)
        self.n += k
        self.h += (2.0 / self.n) * gram.to(device=self.h.device, dtype=torch.float64)


def _work_dtype(device: torch.device) -> torch.dtype:
    """float64 on CPU (exact enough to test against the textbook recursion); float32 on
    accelerators, as the reference implementation, where float64 is slow or missing."""
    return torch.float64 if device.type == "cpu" else torch.float32


def _prepare(w: torch.Tensor, h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Working copies of ``w`` and the damped ``h`` on ``w``'s device; dead inputs (never active)
    are zeroed out."""
    dt = _work_dtype(w.device)
    w = w.detach().to(dt).clone()
    h = h.detach().to(device=w.device, dtype=dt).clone()
    if h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"Hessian {tuple(h.shape)} does not match weight {tuple(w.shape)}")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp * torch.mean(torch.diag(h))
    return w, h


def _quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (torch.round(w / scale) + zero).clamp(0, qmax(bits))


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ codes for ``weight [out, in]`` given the input Hessian ``[in, in]``.

    Returns ``(codes int32 [out, in], scale float32 [out, n_groups], zero float32 [out, n_groups])``
    on eqat's grid: ``W_q = (codes - zero) * scale``, ``zero`` integer-valued and in range.
    ``damp`` is the fraction of the mean Hessian diagonal added to the diagonal.
    """
    codes, scale, zero, _ = gptq_quantize_with_residue(weight, hessian, scheme, damp)
    return codes, scale, zero


def gptq_quantize_with_residue(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gptq_quantize` plus ``frac [out, in]`` (float32): where each error-compensated weight
    sat inside its grid cell when it was rounded, ``w/s + z - code``, clipped to [-0.49, 0.49].

    ``(codes - zero + frac) * scale`` is a continuous weight that rounds to exactly the GPTQ codes
    and keeps each weight's distance to its rounding boundaries, as a min-max start from the
    full-precision weights does. Training from the grid points themselves instead makes every
    step-size gradient vanish (LSQ's ``round(w/s) - w/s`` is 0 on the grid) and every weight drift
    at Adam's fixed speed towards a boundary, so whole layers change codes in the same few steps.
    """
    bits, group_size = scheme.bits, scheme.group_size
    out_f, in_f = weight.shape
    g = effective_group(group_size, in_f)
    w, h = _prepare(weight, hessian, damp)
    # Upper Cholesky factor of H^-1: row j holds the OBS update of column j onto columns > j.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    frac = torch.zeros_like(w)
    scales, zeros = [], []
    # Lazy batches: one per group, or 128 columns inside a long group (per-channel). A group
    # always starts at a batch start, where every earlier update has been applied to ``w``.
    batch = g if g <= 256 or g % 128 else 128
    for i1 in range(0, in_f, batch):
        i2 = min(i1 + batch, in_f)
        if i1 % g == 0:
            s, z = minmax_init(w[:, i1 : min(i1 + g, in_f)], bits, -1)
            sw, zw = s.to(w.dtype)[:, 0], z.to(w.dtype)[:, 0]
            scales.append(s)
            zeros.append(z)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = _quantize_column(col, sw, zw, bits)
            codes[:, i1 + i] = q
            frac[:, i1 + i] = (col / sw + zw - q).clamp(-0.49, 0.49)
            err = (col - (q - zw) * sw) / h1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    scale = torch.cat(scales, dim=1).clamp(SCALE_MIN, SCALE_MAX)
    zero = torch.cat(zeros, dim=1)
    return codes.to(torch.int32), scale, zero, frac.float()
