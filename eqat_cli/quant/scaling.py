"""Equivalent per-channel scaling before quantization (AWQ's scale search, on a block's scale pairs).

A *scale pair* ``(producer, consumers)`` of a decoder block is a module and the linear layers
that alone read its output, where their input is linear in the producer's output channel by
channel. Llama's MLP computes ``down(act(gate(x)) * up(x))``, so dividing row ``c`` of ``up``
(and its bias) by ``s_c`` and multiplying column ``c`` of ``down`` by ``s_c`` leaves the block's
function unchanged; an RMSNorm multiplies its output by a gain, so dividing the gain of channel
``c`` by ``s_c`` and multiplying column ``c`` of q/k/v (or gate/up) by ``s_c`` does too.

Quantization does not stay unchanged, and that is the point. The consumer's groups run along its
input dimension: a column that meets a huge activation (SmolLM2's block 11 feeds ``down_proj``
values of ~3,000 on two channels of the first token, where the median channel is ~0.08) is
rounded with the same absolute error as its 63 neighbours, and that error is multiplied by the
activation. Scaling the column up makes it the end of its group's range, where min-max rounding
is nearly exact, at the cost of a coarser grid for its neighbours; the search below weighs the
two on the layer's real inputs. A linear producer loses nothing: its groups run along rows, so a
row's groups all scale together and min-max quantization is scale-equivariant row by row; a norm's
gain is not quantized. Several consumers (q/k/v) share one scale, searched on their outputs
together.

The search is AWQ's: ``s = mean|x|^alpha`` (normalised so that ``max(s) * min(s) = 1``) for
``alpha`` on a grid over [0, 1], keeping the ``alpha`` whose min-max quantized consumer reproduces
``x W^T`` best in squared error. ``alpha = 0`` (no scaling) is on the grid, so the chosen scales
never do worse than none on that objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eqat_cli.quant.primitives import fake_quantize, minmax_init
from eqat_cli.scheme import QuantScheme

GRID = 10  # alpha in {0, 1/GRID, ..., 1} (AWQ uses 20)
MEAN_FLOOR = 1e-5  # channels that never fire are not scaled towards zero


@dataclass(frozen=True)
class ScaleChoice:
    alpha: float
    error: float  # squared error of the chosen scaling, relative to the output's mean square
    error_unscaled: float  # the same for alpha = 0


def rtn(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Min-max (round-to-nearest) quantize-dequantize, as the quantized layers start."""
    w = weight.detach().float()
    scale, zero = minmax_init(w, scheme.bits, scheme.group_size)
    return fake_quantize(w, scale, zero, scheme.bits, scheme.group_size)


def candidate_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    s = mean_abs.float().clamp_min(MEAN_FLOOR).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scales(weight: torch.Tensor, x: torch.Tensor, mean_abs: torch.Tensor, scheme: QuantScheme,
                  grid: int = GRID) -> tuple[torch.Tensor, ScaleChoice]:
    """The per-input-channel scales of ``weight`` (``[out, in]``) that best survive quantization on
    the inputs ``x`` (``[tokens, in]``); ``mean_abs``: mean ``|x|`` per channel (over more tokens).
    Returns ``(scales [in], choice)``."""
    w = weight.detach().float()
    x = x.float()
    ref = x @ w.T
    norm = ref.pow(2).mean().clamp_min(1e-30)
    best: tuple[float, float, torch.Tensor] | None = None
    base = float("nan")
    for k in range(grid + 1):
        alpha = k / grid
        s = candidate_scales(mean_abs, alpha) if alpha else torch.ones_like(mean_abs, dtype=torch.float32)
        out = (x / s) @ rtn(w * s, scheme).T
        err = float((out - ref).pow(2).mean() / norm)
        if alpha == 0:
            base = err
        if best is None or err < best[1]:
            best = (alpha, err, s)
    assert best is not None
    return best[2], ScaleChoice(best[0], best[1], base)


@torch.no_grad()
def apply_scales(producer: nn.Module, consumers: list[nn.Linear], scales: torch.Tensor,
                 gain_offset: float = 0.0) -> None:
    """Fold ``scales`` into a pair: the consumers' input columns ``* s``, and the producer's output
    ``/ s``: a linear's rows (and bias), or a norm's gain (``gain_offset + weight``)."""
    s = scales.to(consumers[0].weight.device, torch.float32)
    if isinstance(producer, nn.Linear):
        producer.weight.copy_((producer.weight.float() / s[:, None]).to(producer.weight.dtype))
        if producer.bias is not None:
            producer.bias.copy_((producer.bias.float() / s).to(producer.bias.dtype))
    else:
        w = producer.weight
        if w.dim() != 1 or w.numel() != s.numel():
            raise ValueError(f"cannot fold {s.numel()} channel scales into {type(producer).__name__}")
        w.copy_(((gain_offset + w.float()) / s - gain_offset).to(w.dtype))
        if getattr(producer, "bias", None) is not None:
            producer.bias.copy_((producer.bias.float() / s).to(producer.bias.dtype))
    for c in consumers:
        c.weight.copy_((c.weight.float() * s[None, :]).to(c.weight.dtype))


class InputStats:
    """Forward hook on a consumer: mean ``|x|`` per input channel over every token it sees, and the
    first ``keep_tokens`` tokens themselves (whole windows, so each window's first position,
    where massive activations live, is kept in its natural proportion)."""

    def __init__(self, keep_tokens: int):
        self.keep_tokens = keep_tokens
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.kept: list[torch.Tensor] = []
        self.n_kept = 0

    def __call__(self, module, args, output) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        a = x.abs().sum(0)
        self.abs_sum = a if self.abs_sum is None else self.abs_sum + a
        self.count += x.shape[0]
        if self.n_kept < self.keep_tokens:
            self.kept.append(x.cpu())
            self.n_kept += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        assert self.abs_sum is not None, "the consumer saw no input"
        return self.abs_sum / max(self.count, 1)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.kept)[: self.keep_tokens]
