"""Mixed precision at a target size: a bit width per linear layer, chosen by measured sensitivity.

``eqat block-ap --avg-bits 2.5`` gives every quantized linear layer of the decoder blocks a width
from :data:`CHOICES` (2, 3, 4, 8 bits) so that the parameter-weighted mean *code* width is at most
the target (step sizes and zero points are not counted in the target: at group ``g`` they add
``(16 + b) / g`` bits per weight on top, which :func:`Allocation.effective_bits` reports).

How the widths are chosen (:func:`plan_mixed`):

1. **Sensitivity, measured.** The full-precision model runs block by block over a few calibration
   windows (:data:`SENSITIVITY_TOKENS` tokens, the first windows of the training set). For every
   linear layer ``m`` of block ``i`` and every width ``b``, ``m`` alone is min-max (RTN) quantized at
   ``b`` bits (the block's other layers stay full precision) and the block's output is compared with
   its full-precision output by the recipe's reconstruction loss (``token-rel``: each token's
   squared error relative to its size). That loss is ``err[m][b]``: what quantizing ``m`` to ``b``
   bits costs at the block's output, in units that are comparable across blocks (the next block
   RMS-normalizes each token, so a relative error is what it sees). The inputs are the
   full-precision chain's, one forward per (layer, width) plus one per block.
2. **Allocation.** The total error is modelled as the sum of the layers' errors (errors of layers
   quantized together add up to first order), and the budget is ``avg_bits * sum(params)``.
   :func:`allocate` starts every layer at the smallest width and upgrades greedily along each
   layer's lower convex hull of (bits, error), best error reduction per added bit first (the
   classic greedy solution of this knapsack; exact when the hulls' slopes are what decides), while
   the budget holds. A layer whose error does not fall with more bits is never upgraded.

The allocation is a ``{module path: QuantScheme}`` mapping; Block-AP quantizes each layer with its
scheme, records the mapping in the checkpoint (:class:`~eqat_cli.formats.meta.CheckpointMeta`
``modules``) and the formats that can hold mixed widths write it (native, GPTQ's ``dynamic``,
GGUF per tensor).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from eqat_cli.errors import BadInputError
from eqat_cli.progress import Progress, no_progress
from eqat_cli.quant.primitives import fake_quantize, minmax_init
from eqat_cli.scheme import SUPPORTED_BITS, QuantScheme
from eqat_cli.train.block_ap.blockio import block_kwargs_cached, block_loss, load_into

CHOICES: tuple[int, ...] = SUPPORTED_BITS  # 2, 3, 4, 8
SENSITIVITY_TOKENS = 1024  # tokens of the calibration windows the sensitivities are measured on


def check_avg_bits(avg_bits: float, choices: tuple[int, ...] = CHOICES) -> float:
    """``avg_bits`` if it lies within the widths (one line otherwise)."""
    lo, hi = min(choices), max(choices)
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or not lo <= avg_bits <= hi:
        raise BadInputError(f"--avg-bits must be between {lo} and {hi} (the widths {', '.join(map(str, choices))}), "
                            f"got {avg_bits!r}")
    return float(avg_bits)


# ---------------------------------------------------------------------- allocation


def _hull(errors: dict[int, float]) -> list[int]:
    """The widths on the lower convex hull of (bits, error) that an upgrade from the smallest can
    take, in order: each next point has the steepest error drop per added bit (and a positive one)."""
    widths = sorted(errors)
    path = [widths[0]]
    while True:
        cur = path[-1]
        best, best_slope = None, 0.0
        for b in widths:
            if b <= cur:
                continue
            slope = (errors[cur] - errors[b]) / (b - cur)
            if slope > best_slope:
                best, best_slope = b, slope
        if best is None:
            return path
        path.append(best)


def allocate(params: dict[str, int], errors: dict[str, dict[int, float]], avg_bits: float,
             choices: tuple[int, ...] = CHOICES) -> dict[str, int]:
    """A width per layer so that ``sum(params[m] * bits[m]) <= avg_bits * sum(params)``, minimising
    ``sum(errors[m][bits[m]])`` greedily (see the module docstring). Deterministic: ties go to
    the layer named first."""
    check_avg_bits(avg_bits, choices)
    if set(params) != set(errors):
        raise BadInputError("mixed precision: sensitivities and layer sizes name different layers")
    choices = tuple(sorted(choices))
    for name, e in errors.items():
        if sorted(e) != list(choices):
            raise BadInputError(f"mixed precision: {name} has errors for {sorted(e)}, expected {list(choices)}")
        if not all(math.isfinite(v) for v in e.values()):
            raise BadInputError(f"mixed precision: {name} has a non-finite sensitivity {e}")
    total = sum(params.values())
    budget = avg_bits * total
    bits = {name: choices[0] for name in params}
    used = choices[0] * total
    hulls = {name: _hull(errors[name]) for name in params}
    step = {name: 0 for name in params}  # position on the hull
    order = {name: i for i, name in enumerate(sorted(params))}
    heap: list[tuple[float, int, str]] = []

    def push(name: str) -> None:
        h, k = hulls[name], step[name]
        if k + 1 < len(h):
            b0, b1 = h[k], h[k + 1]
            gain = (errors[name][b0] - errors[name][b1]) / ((b1 - b0) * params[name])
            heapq.heappush(heap, (-gain, order[name], name))

    for name in params:
        push(name)
    while heap:
        _, _, name = heapq.heappop(heap)
        h, k = hulls[name], step[name]
        cost = (h[k + 1] - h[k]) * params[name]
        if used + cost > budget + 1e-9 * total:
            continue  # does not fit; a smaller upgrade of another layer still may
        used += cost
        step[name] = k + 1
        bits[name] = h[k + 1]
        push(name)
    return bits


# ---------------------------------------------------------------------- sensitivity


def _set_rtn(lin: nn.Linear, w: torch.Tensor, bits: int, group: int) -> None:
    scale, zero = minmax_init(w, bits, group)
    lin.weight.data = fake_quantize(w, scale, zero, bits, group)


def measure_sensitivity(
    model: nn.Module, arch: Any, layers: Any, reader: Any, inputs: torch.Tensor, group: int,
    device: torch.device, batch: int, loss: str = "token-rel", choices: tuple[int, ...] = CHOICES,
    progress: Progress = no_progress,
) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
    """``errors[path][bits]`` and ``params[path]`` for every linear of every decoder block (see the
    module docstring), running the full-precision chain from ``inputs`` (embedded windows
    ``[n, seq, hidden]``). Each block is read from ``reader`` and sent back to the meta device."""
    errors: dict[str, dict[int, float]] = {}
    params: dict[str, int] = {}
    x = inputs.to(torch.float32).clone()
    n = len(layers)
    arch.rotary(model).to(device)
    for i in range(n):
        prefix = arch.layer_prefix(i)
        block = layers[i]
        load_into(block, reader.read(prefix, torch.float32), f"block {i}")
        block.to(device)
        kw_cache: dict = {}

        def run() -> torch.Tensor:
            outs = []
            for s in range(0, len(x), batch):
                xb = x[s : s + batch].to(device)
                outs.append(block(xb, **block_kwargs_cached(kw_cache, arch, model, xb, block)).float().cpu())
            return torch.cat(outs)

        with torch.no_grad():
            target = run()
            for name in arch.linear_names:
                lin = block.get_submodule(name)
                w = lin.weight.data
                path = prefix + name
                params[path] = w.numel()
                errors[path] = {}
                for b in choices:
                    _set_rtn(lin, w, b, group)
                    errors[path][b] = float(block_loss(run(), target, loss))
                lin.weight.data = w
        x = target
        layers[i] = block.to("meta")
        progress("sensitivity", {"block": i, "blocks": n})
    return errors, params


@dataclass
class Allocation:
    """The chosen schemes and what they cost."""

    avg_bits: float
    schemes: dict[str, QuantScheme]
    params: dict[str, int]
    errors: dict[str, dict[int, float]] = field(default_factory=dict)

    @property
    def code_bits(self) -> float:
        """Parameter-weighted mean code width (what ``--avg-bits`` bounds)."""
        total = sum(self.params.values())
        return sum(self.params[n] * s.bits for n, s in self.schemes.items()) / total

    def effective_bits(self, in_features: dict[str, int]) -> float:
        """Mean bits per weight with the fp16 step size and packed zero point of every group."""
        total = sum(self.params.values())
        return sum(self.params[n] * s.bits_per_weight(in_features[n]) for n, s in self.schemes.items()) / total

    def histogram(self) -> dict[int, float]:
        """Share of the parameters at each width."""
        total = sum(self.params.values())
        out: dict[int, float] = {}
        for n, s in self.schemes.items():
            out[s.bits] = out.get(s.bits, 0.0) + self.params[n] / total
        return dict(sorted(out.items()))

    def to_json(self) -> dict:
        return {"avg_bits": self.avg_bits, "code_bits": self.code_bits, "histogram": self.histogram(),
                "modules": {n: s.tag for n, s in self.schemes.items()},
                "params": self.params,
                "errors": {n: {str(b): v for b, v in e.items()} for n, e in self.errors.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Allocation":
        return cls(float(d["avg_bits"]), {n: QuantScheme.parse(t) for n, t in d["modules"].items()},
                   {n: int(v) for n, v in d["params"].items()},
                   {n: {int(b): float(v) for b, v in e.items()} for n, e in d.get("errors", {}).items()})


def plan_mixed(model: nn.Module, arch: Any, layers: Any, reader: Any, windows: torch.Tensor, avg_bits: float,
               group: int, device: torch.device, batch: int, loss: str = "token-rel",
               choices: tuple[int, ...] = CHOICES, progress: Progress = no_progress) -> Allocation:
    """Measure the sensitivities on the first windows of ``windows`` (embedded, full precision) that
    hold :data:`SENSITIVITY_TOKENS` tokens and allocate the widths for ``avg_bits``."""
    check_avg_bits(avg_bits, choices)
    n = min(len(windows), max(1, -(-SENSITIVITY_TOKENS // windows.shape[1])))
    errors, params = measure_sensitivity(model, arch, layers, reader, windows[:n], group, device, batch, loss,
                                         choices, progress)
    bits = allocate(params, errors, avg_bits, choices)
    return Allocation(avg_bits, {p: QuantScheme(b, group) for p, b in bits.items()}, params, errors)


def block_schemes(schemes: dict[str, QuantScheme] | None, prefix: str) -> dict[str, QuantScheme] | None:
    """The schemes of one block's linears, by their name inside the block (``None``: uniform)."""
    if not schemes:
        return None
    return {k[len(prefix):]: s for k, s in schemes.items() if k.startswith(prefix)}
