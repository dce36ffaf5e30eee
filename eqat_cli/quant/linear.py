"""The learnable quantizer, the fake-quant linear used in training, and the packed linear.

``QuantLinear`` (training, "fake quant") -> ``QuantLinear.to_packed()`` -> ``PackedLinear``
(inference and E2E-QP). The two give the same outputs: the packed layer stores fp16 step sizes,
so outputs agree to within fp16 rounding of the step sizes (exactly, up to matmul summation order,
when the fake-quant step sizes are fp16-representable; see ``tests/test_quant_linear.py``).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from eqat_cli.quant import fused_quant, packing
from eqat_cli.quant.primitives import (
    SCALE_MAX,
    SCALE_MIN,
    clamp_ste,
    round_ste,
    dequantize_codes,
    effective_group,
    fake_quantize,
    group_index,
    integer_zero,
    minmax_init,
    n_groups,
    qmax,
    quantize_codes,
)
from eqat_cli.scheme import QuantScheme


def _scheme(scheme: QuantScheme) -> QuantScheme:
    if not isinstance(scheme, QuantScheme):
        raise TypeError(f"expected a QuantScheme (bits and group size), got {scheme!r}")
    return scheme


class UniformAffineQuantizer(nn.Module):
    """Per-group asymmetric quantizer with learnable step size ``scale`` and zero point ``zero``,
    for one :class:`~eqat_cli.scheme.QuantScheme` (``bits`` and ``group_size`` are its values)."""

    def __init__(self, weight: torch.Tensor, scheme: QuantScheme):
        super().__init__()
        self.scheme = _scheme(scheme)
        self.bits, self.group_size = self.scheme.bits, self.scheme.group_size
        self.in_features = weight.shape[1]
        effective_group(self.group_size, self.in_features)  # validates
        scale, zero = minmax_init(weight, self.bits, self.group_size)
        self.scale = nn.Parameter(scale)
        self.zero = nn.Parameter(zero)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if fused_quant.applies(w):  # one C++ pass forward and backward (same result)
            return fused_quant.free_fake_weight(w, self.scale, self.zero, self.bits, self.group_size)
        return fake_quantize(w, self.scale, self.zero, self.bits, self.group_size)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}"


class QuantLinear(nn.Module):
    """A linear layer whose weight is fake-quantized in every forward (Block-AP training)."""

    def __init__(self, linear: nn.Linear, scheme: QuantScheme):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = (
            nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        )
        self.quantizer = UniformAffineQuantizer(self.weight, scheme)

    @property
    def scheme(self) -> QuantScheme:
        return self.quantizer.scheme

    @property
    def bits(self) -> int:
        return self.quantizer.bits

    @property
    def group_size(self) -> int:
        return self.quantizer.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantizer(self.weight)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_packed(self) -> "PackedLinear":
        q = self.quantizer
        codes = quantize_codes(self.weight, q.scale, q.zero, q.bits, q.group_size)
        zeros = integer_zero(q.zero, q.bits)
        return PackedLinear.from_codes(
            codes,
            q.scale.detach().float().clamp(SCALE_MIN, SCALE_MAX),
            zeros,
            q.scheme,
            bias=None if self.bias is None else self.bias.detach(),
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )


class Kernel(Protocol):
    """What a backend supplies to run a :class:`PackedLinear`."""

    name: str

    def forward(self, layer: "PackedLinear", x: torch.Tensor) -> torch.Tensor: ...


class _ReferenceKernel:
    """Unpack, dequantize, matmul: the torch reference every backend is tested against.

    The ``reference`` backend; what it runs is declared in
    :data:`eqat_cli.quant.caps.REFERENCE_KERNEL_CAPS` (autograd reaches both the step sizes and
    E2E-QP's float zero points).
    """

    name = "torch-reference"

    def forward(self, layer: "PackedLinear", x: torch.Tensor) -> torch.Tensor:
        w = layer.dequantize(dtype=x.dtype)
        return F.linear(x, w, None if layer.bias is None else layer.bias.to(x.dtype))


REFERENCE_KERNEL = _ReferenceKernel()


class PackedLinear(nn.Module):
    """Inference layer holding int32-packed codes in the EfficientQAT native layout.

    Buffers: ``qweight [ceil(in/pf), out]``, ``qzeros [n_groups, ceil(out/pf)]``,
    ``g_idx [in]``; parameter ``scales [n_groups, out]`` (fp16 on disk; may be trained in fp32 by
    E2E-QP, the codes never change).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        bias: bool = False,
        scales_dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = _scheme(scheme)
        self.bits, self.group_size = self.scheme.bits, self.scheme.group_size
        group_size = self.group_size
        pf = self.scheme.pack_factor
        g = n_groups(in_features, group_size)
        self.register_buffer(
            "qweight", torch.zeros(-(-in_features // pf), out_features, dtype=torch.int32)
        )
        self.register_buffer("qzeros", torch.zeros(g, -(-out_features // pf), dtype=torch.int32))
        self.scales = nn.Parameter(
            torch.ones(g, out_features, dtype=scales_dtype), requires_grad=False
        )
        self.register_buffer("g_idx", group_index(in_features, group_size))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.kernel: Kernel = REFERENCE_KERNEL
        # Float zero points while E2E-QP trains them (``--train-zeros``); None otherwise.
        self.zeros_fp: nn.Parameter | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        scheme: QuantScheme,
        bias: torch.Tensor | None = None,
        scales_dtype: torch.dtype = torch.float16,
    ) -> "PackedLinear":
        """From torch-layout codes ``[out, in]`` and group params ``[out, n_groups]``."""
        scheme = _scheme(scheme)
        bits = scheme.bits
        out_f, in_f = codes.shape
        zero = zero.to(torch.int32)
        if zero.numel() and (int(zero.min()) < 0 or int(zero.max()) > qmax(bits)):
            raise ValueError(
                f"zero points out of range [0, {qmax(bits)}]: "
                f"min {int(zero.min())}, max {int(zero.max())}"
            )
        layer = cls(in_f, out_f, scheme, bias=bias is not None, scales_dtype=scales_dtype)
        layer.qweight.copy_(packing.pack_rows(codes.t().contiguous(), bits))
        layer.qzeros.copy_(packing.pack_cols(zero.t().contiguous(), bits))
        layer.scales.data.copy_(scale.t().to(scales_dtype))
        if bias is not None:
            layer.bias.data.copy_(bias)
        # Check: what we packed is what we meant (never write a corrupt field).
        if not torch.equal(layer.zero_points(), zero.t()) or not torch.equal(
            layer.codes(), codes.t().to(torch.int32)
        ):
            raise AssertionError("pack/unpack mismatch: refusing to build a corrupt layer")
        return layer

    # ------------------------------------------------------------------ views
    def codes(self) -> torch.Tensor:
        """Integer codes in checkpoint layout ``[in, out]``."""
        return packing.unpack_rows(self.qweight, self.bits, self.in_features)

    def zero_points(self) -> torch.Tensor:
        """Integer zero points ``[n_groups, out]``."""
        return packing.unpack_cols(self.qzeros, self.bits, self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense weight in torch layout ``[out, in]``: ``W[o, i] = (q - z[g_idx[i]]) * s[g_idx[i]]``.

        Differentiable w.r.t. ``scales`` (and ``zeros_fp`` while zero points train).
        """
        q = self.codes().t()
        if self.zeros_fp is not None:
            zero = clamp_ste(round_ste(self.zeros_fp), 0, qmax(self.bits))
        else:
            zero = self.zero_points()
        scale = self.scales
        if scale.requires_grad:
            scale = clamp_ste(scale, SCALE_MIN, SCALE_MAX)
        return dequantize_codes(q, scale.t(), zero.t(), self.group_size, dtype=dtype)

    # ------------------------------------------------------------------ E2E-QP
    def start_training(self, train_zeros: bool = False) -> list[nn.Parameter]:
        """Make step sizes (and optionally zero points) trainable fp32 parameters; codes stay frozen."""
        self.scales.data = self.scales.data.float()
        self.scales.requires_grad_(True)
        params = [self.scales]
        if train_zeros:
            self.zeros_fp = nn.Parameter(self.zero_points().float())
            params.append(self.zeros_fp)
        return params

    @torch.no_grad()
    def finish_training(self) -> None:
        """Freeze again: zero points rounded, clamped and re-packed; step sizes stay as trained."""
        if self.zeros_fp is not None:
            zero = integer_zero(self.zeros_fp, self.bits)
            self.qzeros.copy_(packing.pack_cols(zero, self.bits))
            if not torch.equal(self.zero_points(), zero):
                raise AssertionError("zero point re-pack mismatch")
            self.zeros_fp = None
        self.scales.requires_grad_(False)

    def set_kernel(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.forward(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, kernel={self.kernel.name}"
        )


class PackedEmbedding(nn.Module):
    """An embedding table kept as a :class:`PackedLinear`'s codes (``--quantize-head``).

    ``packed`` is the linear ``[vocab, dim]`` view of the table (``in_features`` = dim), so a
    tied lm_head and the embedding share one packed layer (``eqat_cli.quantize.quantize_head``);
    token ``t``'s row is column ``t`` of ``qweight``, dequantized on lookup as ``(q - z) * s``.
    ``embed_scale`` (Gemma's scaled embeddings) multiplies the rows.
    """

    def __init__(self, packed: PackedLinear, padding_idx: int | None = None,
                 embed_scale: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.packed = packed
        self.num_embeddings = packed.out_features
        self.embedding_dim = packed.in_features
        self.padding_idx = padding_idx
        self.dtype = dtype
        if embed_scale is not None:
            self.register_buffer("embed_scale", embed_scale.detach().clone(), persistent=False)
        else:
            self.embed_scale = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        p = self.packed
        flat = ids.reshape(-1)
        pf = packing.pack_factor(p.bits)
        q = packing.unpack_rows(p.qweight.index_select(1, flat), p.bits, p.in_features)  # [dim, T]
        words = p.qzeros.index_select(1, torch.div(flat, pf, rounding_mode="floor"))  # [G, T]
        shifts = (p.bits * (flat % pf)).to(torch.int32)
        z = torch.bitwise_right_shift(words, shifts) & (2**p.bits - 1)
        s = p.scales.detach().index_select(1, flat)
        rows = dequantize_codes(q.t(), s.t(), z.t(), p.group_size, dtype=torch.float32)
        if self.embed_scale is not None:
            rows = rows * self.embed_scale.float()
        return rows.to(self.dtype).reshape(*ids.shape, p.in_features)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.packed.bits}"


# ---------------------------------------------------------------------- module surgery


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent_path), name, module)


def replace_linears(
    root: nn.Module, names: list[str], make: Callable[[str, nn.Linear], nn.Module]
) -> dict[str, nn.Module]:
    """Replace each named ``nn.Linear`` under ``root`` by ``make(name, linear)``."""
    out = {}
    for name in names:
        lin = get_submodule(root, name)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name} is {type(lin).__name__}, expected nn.Linear")
        new = make(name, lin)
        set_submodule(root, name, new)
        out[name] = new
    return out
