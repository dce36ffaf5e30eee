"""``TritonKernel``: runs a packed linear layer (``eqat_cli.quant.linear.PackedLinear``, or any
object with its ``qweight``, ``qzeros``, ``scales``, ``bias``, ``bits``, ``group_size`` and
``in_features``) with the Triton kernels.

``forward`` flattens ``x`` to ``[M, in]`` and picks the decode kernel (split-K GEMV) for at most
:data:`~eqat_kernels.triton_kernels.DECODE_MAX_ROWS` rows, else the prefill kernel (tiled
dequantize-GEMM). Compiled kernels need CUDA tensors; under ``TRITON_INTERPRET=1`` (set before
importing this module) the same kernels run on CPU tensors in Triton's interpreter.

The kernels have no backward (:data:`eqat_kernels.caps.CAPS`). When a gradient is needed (a
caller trains ``layer.scales``), ``forward`` hands the call to ``grad_fallback``, a kernel with
a backward given by whoever builds this one: the ``triton`` backend plugin passes the torch
kernel. This package imports nothing of ``eqat_cli``.
"""

from __future__ import annotations

from typing import Any

import torch

from eqat_kernels import triton_kernels as tk


class TritonKernel:
    name = "triton"

    def __init__(self, grad_fallback: Any = None):
        self.grad_fallback = grad_fallback

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        if layer.bits not in tk.SUPPORTED_BITS:
            raise ValueError(
                f"the triton backend supports {tk.SUPPORTED_BITS}-bit layers, "
                f"this one is {layer.bits}-bit"
            )
        if x.shape[-1] != layer.in_features:
            raise ValueError(
                f"input has {x.shape[-1]} features, the layer expects {layer.in_features}"
            )
        if torch.is_grad_enabled() and (x.requires_grad or layer.scales.requires_grad):
            if self.grad_fallback is None:
                raise RuntimeError(
                    "the Triton kernels have no backward and this TritonKernel was built without "
                    "a grad_fallback kernel; run under torch.no_grad() or pass one"
                )
            return self.grad_fallback.forward(layer, x)
        if x.device.type != "cuda" and not tk.INTERPRETED:
            raise RuntimeError(
                f"the Triton kernels run on CUDA tensors, got a {x.device.type} tensor "
                "(set TRITON_INTERPRET=1 before importing eqat_kernels to run them in "
                "Triton's CPU interpreter)"
            )
        y = tk.matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.bits, layer.group_size)
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y
