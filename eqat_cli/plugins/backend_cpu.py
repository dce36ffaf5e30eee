"""The cpu backend: the C++ packed kernels of ``quant/cpu_kernel.py`` (built with g++ on first use).

Its priority (10) puts it above the torch kernel on CPUs, so ``auto`` picks it there whenever a
C++ compiler is present; ``available()`` only looks for the compiler (building is left to the
first forward, which falls back to the torch kernel if the build fails). Inference only: its caps
declare no backward, so E2E-QP keeps the torch kernel.
"""

from eqat_cli.hookspecs import hookimpl
from eqat_cli.quant.caps import CPU_KERNEL_CAPS
from eqat_cli.specs import BackendSpec


def _available():
    import os
    import shutil

    if os.environ.get("EQAT_CPU_KERNEL", "").lower() in ("0", "off", "no"):
        return False, "disabled by EQAT_CPU_KERNEL=0"
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return False, "no C++ compiler (g++ or $CXX) on the PATH to build the kernel"
    return True, f"C++ kernel built with {cxx} on first use (torch kernel if the build fails)"


def _kernel():
    from eqat_cli.quant.cpu_kernel import cpu_kernel

    return cpu_kernel()


CPU_BACKEND = BackendSpec(
    name="cpu",
    priority=10,
    caps=CPU_KERNEL_CAPS,
    available=_available,
    kernel=_kernel,
    install_hint="install g++ (apt-get install g++)",
    description="C++ packed kernels: decode GEMV reading the packed words, prefill blocked "
    "dequantize + sgemm; torch kernel as fallback",
)


@hookimpl
def register_backends(register):
    register(CPU_BACKEND)
