"""The reference backend: unpack, dequantize, one matmul (``quant/linear.py``).

The definition the other kernels are tested against, and the one kernel whose backward reaches
float zero points (E2E-QP with ``--train-zeros``). It materialises the dense weight, so ``auto``
picks it only when no other backend can run: its priority is the lowest.
"""

from eqat_cli.hookspecs import hookimpl
from eqat_cli.quant.caps import REFERENCE_KERNEL_CAPS
from eqat_cli.specs import BackendSpec


def _available():
    return True, "pure torch, runs on every device"


def _kernel():
    from eqat_cli.quant.linear import REFERENCE_KERNEL

    return REFERENCE_KERNEL


REFERENCE_BACKEND = BackendSpec(
    name="reference",
    priority=-100,
    caps=REFERENCE_KERNEL_CAPS,
    available=_available,
    kernel=_kernel,
    description="dense dequantize + matmul with autograd (step sizes and zero points); slow",
)


@hookimpl
def register_backends(register):
    register(REFERENCE_BACKEND)
