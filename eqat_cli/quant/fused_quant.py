"""Fused fake quantization for Block-AP training on the CPU: one C++ pass forward, one backward.

Both Block-AP parametrisations fake-quantize every weight in every step,
``out = (clamp(round(w / s (+ v)) + z, 0, qmax) - z) * s``, and in torch that is a dozen
elementwise passes forward and as many backward, each allocating a tensor of the weight's size
(on a 2-core CPU that cost more than the block's matmuls). :func:`round_fake_weight` (``round``:
fixed ``w0``, learned offsets ``v``) and :func:`free_fake_weight` (``free``: learned weights) do it
in ``csrc/fakequant_cpu.cpp``: the forward writes the fake-quantized weight and keeps nothing else,
the backward recomputes the codes from its inputs and writes the element gradients and the
per-group sums for ``s`` and ``z`` in one pass. Any group size works, ragged last groups included.

Same result: the forward is bit-identical to the torch reference (the same IEEE operations in the
same order); the element gradients (offsets, weights) are too; the per-group sums (step sizes,
zero points) agree to float rounding (another summation order). ``tests/test_fused_quant.py``.

The library is plain C++ through ``ctypes`` (no torch headers), built with ``g++`` on first use
and cached like the packed CPU kernel's (:mod:`eqat_cli.quant.cpu_kernel`). It runs only for fp32
CPU tensors; elsewhere (GPU, other dtypes, no compiler, ``EQAT_FUSED_QUANT=0``, or inside
:func:`disabled`) the callers keep their torch path, so :func:`applies` decides.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from eqat_cli.quant.primitives import SCALE_MAX, SCALE_MIN, clamp_ste, effective_group, qmax, round_ste

SOURCE = Path(__file__).with_name("csrc") / "fakequant_cpu.cpp"
ABI_VERSION = 1
# No -ffast-math and no FP contraction: the kernel must follow IEEE order exactly (bit-identical
# forward to the torch reference).
_FLAG_SETS = (
    ["-O3", "-march=native", "-ffp-contract=off", "-pthread", "-shared", "-fPIC", "-std=c++17"],
    ["-O3", "-ffp-contract=off", "-pthread", "-shared", "-fPIC", "-std=c++17"],
)
ROUND, FREE = 0, 1
# Weights per call below which the kernel runs on the calling thread only: a SmolLM2 layer is
# about a millisecond of work, of the order of waking a helper, which costs far more when the
# cores are shared (measured: 7 ms on two threads against 0.7 ms on one, under load).
SINGLE_THREAD_WEIGHTS = 1 << 22

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_STATUS: str | None = None  # None: not tried yet; "" loaded; else why not
_ENABLED = threading.local()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.machine()


def _build_dir() -> Path:
    """Torch's extensions directory (``TORCH_EXTENSIONS_DIR``), as the packed CPU kernel's."""
    from torch.utils.cpp_extension import get_default_build_root  # heavy; only when building

    return Path(get_default_build_root())


def _build(cxx: str) -> Path:
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cxx} --version failed: {e}") from e
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(
            source + " ".join(flags).encode() + version.encode() + _cpu_flags().encode()
        ).hexdigest()[:16]
        target = _build_dir() / f"eqat_fakequant_cpu_{key}" / "libeqat_fakequant_cpu.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cxx, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                  timeout=300)
            if proc.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders all end with a whole file
                return target
            errors.append(f"{' '.join(flags)}: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{' '.join(flags)}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors))


def _load() -> ctypes.CDLL | None:
    global _LIB, _STATUS
    with _LOCK:
        if _STATUS is not None:
            return _LIB
        if os.environ.get("EQAT_FUSED_QUANT", "").lower() in ("0", "off", "no"):
            _STATUS = "disabled by EQAT_FUSED_QUANT=0"
            return None
        cxx = shutil.which(os.environ.get("CXX", "g++"))
        if cxx is None:
            _STATUS = "no C++ compiler (g++ or $CXX) on the PATH"
            return None
        try:
            lib = ctypes.CDLL(str(_build(cxx)))
            if lib.eqat_fq_abi_version() != ABI_VERSION:
                raise RuntimeError("stale library (ABI version mismatch)")
        except (OSError, RuntimeError, AttributeError) as e:
            _STATUS = f"building the fused fake-quant kernel failed: {e}"
            return None
        p, i, l, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
        lib.eqat_fq_forward.argtypes = [p, p, p, p, p, l, l, l, f, i]
        lib.eqat_fq_forward.restype = i
        lib.eqat_fq_backward.argtypes = [p, p, p, p, p, p, p, p, l, l, l, f, i, i]
        lib.eqat_fq_backward.restype = i
        _LIB, _STATUS = lib, ""
        return lib


def library_status() -> tuple[bool, str]:
    """``(loaded, reason)``; builds the library on the first call."""
    lib = _load()
    return lib is not None, "fused fake-quant kernel built and loaded" if lib is not None else _STATUS


@contextlib.contextmanager
def disabled():
    """Run the torch reference path inside this block (this thread): tests and benchmarks."""
    before = getattr(_ENABLED, "on", True)
    _ENABLED.on = False
    try:
        yield
    finally:
        _ENABLED.on = before


def applies(w: torch.Tensor) -> bool:
    """Whether the fused kernel runs for weight ``w`` (fp32 on the CPU, library available)."""
    return (getattr(_ENABLED, "on", True) and w.device.type == "cpu" and w.dtype == torch.float32
            and w.dim() == 2 and _load() is not None)


def _threads(weights: int) -> int:
    return 1 if weights < SINGLE_THREAD_WEIGHTS else torch.get_num_threads()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


class _FusedFakeQuant(torch.autograd.Function):
    """``(clamp(round(w / s + v) + z, 0, m) - z) * s`` (``v`` None: ``free``), see the module."""

    @staticmethod
    def forward(ctx, w, v, s, z, m: int, group: int, mode: int):
        w, s, z = w.contiguous(), s.contiguous(), z.contiguous()
        v = None if v is None else v.contiguous()
        out = torch.empty_like(w)
        rows, cols = w.shape
        rc = _LIB.eqat_fq_forward(_ptr(w), _ptr(v), _ptr(s), _ptr(z), _ptr(out), rows, cols, group, float(m),
                                  _threads(w.numel()))
        if rc:
            raise RuntimeError(f"eqat_fq_forward failed ({rc})")
        ctx.save_for_backward(w, v, s, z)
        ctx.m, ctx.group, ctx.mode = m, group, mode
        return out

    @staticmethod
    def backward(ctx, g):
        w, v, s, z = ctx.saved_tensors
        g = g.contiguous()
        if g.dtype != torch.float32:
            g = g.float()
        d = torch.empty_like(w)
        ds, dz = torch.empty_like(s), torch.empty_like(z)
        rows, cols = w.shape
        rc = _LIB.eqat_fq_backward(_ptr(g), _ptr(w), _ptr(v), _ptr(s), _ptr(z), _ptr(d), _ptr(ds), _ptr(dz),
                                   rows, cols, ctx.group, float(ctx.m), ctx.mode, _threads(w.numel()))
        if rc:
            raise RuntimeError(f"eqat_fq_backward failed ({rc})")
        need = ctx.needs_input_grad
        if ctx.mode == ROUND:
            return None, d if need[1] else None, ds if need[2] else None, dz if need[3] else None, None, None, None
        return d if need[0] else None, None, ds if need[2] else None, dz if need[3] else None, None, None, None


def round_fake_weight(w0: torch.Tensor, v: torch.Tensor, s: torch.Tensor, z: torch.Tensor, m: int,
                      group_size: int) -> torch.Tensor:
    """``RoundQuantLinear``'s fake weight from ``w0`` (fixed), offsets ``v`` and the grid ``s, z``
    (``[out, n_groups]``, ``z`` integer-valued); gradients to ``v``, ``s`` and ``z``."""
    return _FusedFakeQuant.apply(w0, v, s.float(), z.float(), m, effective_group(group_size, w0.shape[1]), ROUND)


def free_fake_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                     group_size: int) -> torch.Tensor:
    """:func:`~eqat_cli.quant.primitives.fake_quantize` (the same clamped step sizes and rounded
    zero points, straight-through); gradients to ``w``, ``scale`` and ``zero``."""
    m = qmax(bits)
    s = clamp_ste(scale, SCALE_MIN, SCALE_MAX).float()
    z = clamp_ste(round_ste(zero), 0, m).float()
    return _FusedFakeQuant.apply(w, None, s, z, m, effective_group(group_size, w.shape[1]), FREE)
