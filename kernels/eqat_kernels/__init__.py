"""Fused dequantize-matmul kernels for EfficientQAT's packed 2/3/4-bit weights.

* :mod:`eqat_kernels.caps`: what the kernels run (bits, devices, group sizes, backward), as
  plain data the ``triton`` backend plugin turns into its ``KernelCaps``;
* :mod:`eqat_kernels.triton_kernels`: the Triton kernels (dequantize, decode GEMV, prefill GEMM)
  and their launchers; needs the ``triton`` package, and a CUDA GPU unless
  ``TRITON_INTERPRET=1`` was set before the import (Triton's CPU interpreter, used by the tests);
* :mod:`eqat_kernels.backend`: :class:`~eqat_kernels.backend.TritonKernel`, the object the
  "triton" backend plugs into ``PackedLinear``;
* :mod:`eqat_kernels.reference`: pure-torch references the kernels are tested against.

Importing this package (or :mod:`eqat_kernels.caps`) imports neither torch nor Triton; the other
submodules do. Nothing here imports ``eqat_cli``: what the backend needs from it (the kernel to
fall back to for gradients) is passed in by the plugin.
"""

__all__ = ["backend", "caps", "reference", "triton_kernels"]
