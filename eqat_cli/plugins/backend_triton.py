"""The Triton backend: fused dequantize-matmul kernels from ``kernels/`` for CUDA GPUs."""

import importlib.util

from eqat_cli.hookspecs import hookimpl
from eqat_cli.specs import BackendSpec, KernelCaps
from eqat_kernels.caps import CAPS as TRITON_CAPS


def _available():
    if importlib.util.find_spec("triton") is None:
        return False, "the 'triton' package is not installed"
    import torch

    if not torch.cuda.is_available():
        return False, "Triton needs a CUDA GPU and torch sees none (Triton has no CPU backend)"
    return True, f"CUDA device {torch.cuda.get_device_name(0)}"


def _kernel():
    from eqat_cli.quant.torch_kernel import TORCH_KERNEL
    from eqat_kernels.backend import TritonKernel

    # The Triton kernels have no backward: a forward that needs gradients runs the torch kernel.
    return TritonKernel(grad_fallback=TORCH_KERNEL)


TRITON_BACKEND = BackendSpec(
    name="triton",
    priority=100,
    caps=KernelCaps(**TRITON_CAPS),
    available=_available,
    kernel=_kernel,
    install_hint="pip install triton, on a machine with an NVIDIA GPU",
    description="fused dequantize-matmul Triton kernels (decode and prefill)",
)


@hookimpl
def register_backends(register):
    register(TRITON_BACKEND)
