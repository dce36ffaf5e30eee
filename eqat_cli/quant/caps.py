"""What the two torch kernels run, declared once; their backend plugins read these at import.

* :data:`TORCH_KERNEL_CAPS`: :mod:`eqat_cli.quant.torch_kernel` (the ``torch`` backend). Every
  bit width the packed format has, every group size, any torch device; its custom backward
  gives gradients for the step sizes (E2E-QP) but reads the integer zero points.
* :data:`REFERENCE_KERNEL_CAPS`: the reference kernel in :mod:`eqat_cli.quant.linear` (the
  ``reference`` backend): dequantize with autograd, then one matmul, so it differentiates both
  the step sizes and the float zero points of ``--train-zeros``.

* :data:`CPU_KERNEL_CAPS`: :mod:`eqat_cli.quant.cpu_kernel` (the ``cpu`` backend), declared
  at the end of this module.

This module imports no torch (``eqat --help`` imports the plugins that read it).
"""

from eqat_cli.scheme import SUPPORTED_BITS as _ALL_BITS
from eqat_cli.specs import KernelCaps

_ANY_DEVICE = ("cpu", "cuda", "mps")

TORCH_KERNEL_CAPS = KernelCaps(
    bits=_ALL_BITS, devices=_ANY_DEVICE, group_sizes=None, backward=("scales",)
)

REFERENCE_KERNEL_CAPS = KernelCaps(
    bits=_ALL_BITS, devices=_ANY_DEVICE, group_sizes=None, backward=("scales", "zeros")
)

CPU_KERNEL_CAPS = KernelCaps(bits=_ALL_BITS, devices=("cpu",), group_sizes=None, backward=())
"""The ``cpu`` backend (:mod:`eqat_cli.quant.cpu_kernel`): the C++ decode GEMV and blocked
dequantize + sgemm prefill, every bit width and group size, CPU only, inference only (a forward
that needs gradients runs the torch kernel it falls back to)."""
