"""The torch backend: runs everywhere; the default on CPUs, the fallback on GPUs, E2E-QP's kernel."""

from eqat_cli.hookspecs import hookimpl
from eqat_cli.quant.caps import TORCH_KERNEL_CAPS
from eqat_cli.specs import BackendSpec


def _available():
    return True, "pure torch, runs on every device"


def _kernel():
    from eqat_cli.quant.torch_kernel import TORCH_KERNEL

    return TORCH_KERNEL


TORCH_BACKEND = BackendSpec(
    name="torch",
    priority=0,
    caps=TORCH_KERNEL_CAPS,
    available=_available,
    kernel=_kernel,
    description="codes stay packed; chunked unpack + fp32 matmul, custom backward for step sizes",
)


@hookimpl
def register_backends(register):
    register(TORCH_BACKEND)
