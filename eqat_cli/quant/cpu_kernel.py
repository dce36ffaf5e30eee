"""The ``cpu`` kernel: packed 2/3/4/8-bit layers on the CPU through a small C++ library
(``csrc/packed_cpu.cpp``) built with the system's ``g++`` on first use, with the torch kernel
(:mod:`eqat_cli.quant.torch_kernel`) as its fallback.

Why a C++ library: at decode (one token) a dense fp32 layer is memory-bound, and a packed layer
reads 7x (4-bit) to 14x (2-bit) fewer bytes; the torch kernel cannot turn that into speed because
every torch operation streams its whole operand through memory (unpack, convert, multiply are
separate passes over scratch buffers). The C++ loop reads each packed word once, unpacks it in
registers and multiplies it into the accumulators; ``bench/cpu_kernel_choices.py`` measures it
against torch's own CPU weight-only kernels (``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``,
which in torch 2.13's CPU build are several times slower than the dense layer) and the torch kernel.

* **decode** (at most :data:`DECODE_ROWS` rows of ``x``): ``eqat_gemv``, one pass over the packed
  words per 4 rows, chunks of 32-output tiles spread over threads (AVX-512 intrinsics where the compiler
  targets it, plain loops the compiler vectorizes elsewhere); per group ``s * (sum q x - z * sum x)``; no
  dequantized weight at all.
* **prefill** (more rows): ``eqat_dequant_panel`` dequantizes the transposed weight of
  :data:`PANEL` outputs at a time into a per-thread scratch panel (``K x PANEL`` fp32, 8 MB
  for K = 4096: wider panels keep the sgemm efficient) and ``torch.mm`` multiplies it into the output's columns: a blocked dequantize +
  sgemm, nothing of the size of the dense weight.

The library is plain C (``ctypes``, raw pointers; no torch headers, so it builds in about two
seconds and needs no ninja) and is cached under torch's extensions directory
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) in a directory named after a
hash of its source, the flags, the compiler and the CPU's flags, so tests and CI build it once.
Threads: the library keeps a small pool of its own in which the calling thread starts on the
work at once and helper threads claim chunks as they wake; a call waits only for chunks a helper
has claimed, never for a helper that has not woken (an OpenMP barrier waits for the slowest
thread's whole time slice when several jobs share the cores, which made medians 10x worse
here). It uses ``torch.get_num_threads()`` threads (one for a GEMV over fewer than
:data:`SINGLE_THREAD_WEIGHTS` weights). When ``g++`` is missing or the build fails, or the
layer needs gradients (E2E-QP) or is not on the CPU, the torch kernel runs instead; the reason the
library is unavailable is :func:`library_status`.

Arithmetic is fp32 whatever the dtype of ``x`` (the output is cast back), as in the torch kernel.
Results equal the reference kernel up to fp32 summation order (``tests/test_cpu_kernel.py``).
Memory per layer: a cache of the unpacked zero points as uint8 ``[G, N]`` (1/group byte per
weight), recomputed when ``qzeros`` changes. The step sizes are read in place (fp16 or fp32).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path

import torch

from eqat_cli.quant import packing
from eqat_cli.quant.linear import PackedLinear
from eqat_cli.quant.primitives import effective_group
from eqat_cli.quant.torch_kernel import TORCH_KERNEL

GEMV_ROWS = 4  # rows of x per pass of the GEMV over the packed weights
DECODE_ROWS = 32  # up to this many rows: GEMV passes of 4 rows; more: dequantized panels + sgemm
PANEL = 512  # outputs per dequantized panel on the prefill path
# GEMVs over fewer weights than this run on one thread: their work (tens of microseconds) is
# of the order of a fork/join, which costs far more when the cores are shared.
SINGLE_THREAD_WEIGHTS = 1 << 20


def _threads(weights: int) -> int:
    return 1 if weights < SINGLE_THREAD_WEIGHTS else torch.get_num_threads()
SOURCE = Path(__file__).with_name("csrc") / "packed_cpu.cpp"
ABI_VERSION = 4
_FLAG_SETS = (
    ["-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=c++17"],
    ["-O3", "-pthread", "-shared", "-fPIC", "-std=c++17"],
)

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_STATUS: str | None = None  # None: not tried yet; "" loaded; else why not


def compiler() -> str | None:
    """The C++ compiler the library is built with (``$CXX`` or ``g++``), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass

    return platform.machine()


def build_dir() -> Path:
    """Where the built library is cached (torch's extensions directory)."""
    from torch.utils.cpp_extension import get_default_build_root

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
        target = build_dir() / f"eqat_packed_cpu_{key}" / "libeqat_packed_cpu.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run(
                [cxx, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300
            )
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
        if os.environ.get("EQAT_CPU_KERNEL", "").lower() in ("0", "off", "no"):
            _STATUS = "disabled by EQAT_CPU_KERNEL=0"
            return None
        cxx = compiler()
        if cxx is None:
            _STATUS = "no C++ compiler (g++ or $CXX) on the PATH"
            return None
        try:
            lib = ctypes.CDLL(str(_build(cxx)))
            if lib.eqat_abi_version() != ABI_VERSION:
                raise RuntimeError("stale library (ABI version mismatch)")
        except (OSError, RuntimeError, AttributeError) as e:
            _STATUS = f"building the C++ kernel failed: {e}"
            return None
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.eqat_gemv.argtypes = [p, p, p, i, p, p, i, i, i, i, i, i]
        lib.eqat_gemv.restype = i
        lib.eqat_gemv_multi.argtypes = [i, p, p, p, i, p, p, p, i, i, i, i, i]
        lib.eqat_gemv_multi.restype = i
        lib.eqat_dequant_panel.argtypes = [p, p, p, i, p, i, i, i, i, i, i, i]
        lib.eqat_dequant_panel.restype = i
        lib.eqat_q8_gemv.argtypes = [p, p, i, p, i, i, i, i, p, p, i, i]  # cpu_q8.py
        lib.eqat_q8_gemv.restype = i
        lib.eqat_q8_impl.argtypes = [i, i]
        lib.eqat_q8_impl.restype = i
        _LIB, _STATUS = lib, ""
        return lib


def library_status() -> tuple[bool, str]:
    """``(loaded, reason)``; builds the library on the first call."""
    lib = _load()
    return lib is not None, "C++ kernel built and loaded" if lib is not None else _STATUS


def _reset_for_tests() -> None:
    global _LIB, _STATUS
    with _LOCK:
        _LIB, _STATUS = None, None


# layer -> (weak reference to the qzeros tensor, its version counter, uint8 [G, N])
_ZEROS: "weakref.WeakKeyDictionary[object, tuple]" = weakref.WeakKeyDictionary()


def zero_points_u8(layer) -> torch.Tensor:
    qz = layer.qzeros
    hit = _ZEROS.get(layer)
    if hit is None or hit[0]() is not qz or hit[1] != qz._version:
        with torch.inference_mode(False):
            z = packing.unpack_cols(qz.clone(), layer.bits, layer.out_features)
            hit = (weakref.ref(qz), qz._version, z.to(torch.uint8).contiguous())
        _ZEROS[layer] = hit
    return hit[2]


class _Scratch(threading.local):
    def __init__(self):
        self.panel: torch.Tensor | None = None

    def get(self, numel: int) -> torch.Tensor:
        if self.panel is None or self.panel.numel() < numel:
            with torch.inference_mode(False):
                self.panel = torch.empty(numel, dtype=torch.float32)
        return self.panel[:numel]


_SCRATCH = _Scratch()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} rejected its arguments (code {rc})")


class _Plan:
    """What a layer's C calls need, prepared once: the packed tensors (step sizes as fp16 or
    fp32, contiguous), the uint8 zero points and the ctypes arguments. Rebuilt when one of the
    layer's tensors is replaced or modified in place (identity and version counters)."""

    __slots__ = ("key", "qweight", "zeros", "scales", "half", "k", "n", "bits", "group",
                 "threads", "ptrs")

    def __init__(self, layer, key):
        self.key = key
        self.qweight = layer.qweight.contiguous()
        self.zeros = zero_points_u8(layer)
        self.scales = _scales(layer)
        self.half = 1 if self.scales.dtype == torch.float16 else 0
        self.k, self.n, self.bits = layer.in_features, layer.out_features, layer.bits
        self.group = effective_group(layer.group_size, self.k)
        self.threads = _threads(self.k * self.n)
        vp = ctypes.c_void_p
        self.ptrs = (vp(self.qweight.data_ptr()), vp(self.zeros.data_ptr()),
                     vp(self.scales.data_ptr()))


def _plan_key(layer) -> tuple:
    qw, s, qz = layer.qweight, layer.scales, layer.qzeros
    return (id(qw), id(s), id(qz), qw._version, s._version, qz._version, s.dtype,
            torch.get_num_threads())


def plan_for(layer) -> _Plan:
    key = _plan_key(layer)
    plan = layer.__dict__.get("_eqat_cpu_plan")
    if plan is None or plan.key != key:
        with torch.inference_mode(False):
            plan = _Plan(layer, key)
        layer.__dict__["_eqat_cpu_plan"] = plan
    return plan


def packed_matmul(lib, layer, x2: torch.Tensor) -> torch.Tensor:
    """``x2 [M, K] fp32 contiguous -> [M, N] fp32`` (no bias)."""
    pl = plan_for(layer)
    m, k, n = x2.shape[0], pl.k, pl.n
    qw, zs, sc = pl.ptrs
    y = torch.empty(m, n, dtype=torch.float32)
    if m <= DECODE_ROWS:
        for r0 in range(0, m, GEMV_ROWS):
            rows = min(GEMV_ROWS, m - r0)
            _check(lib.eqat_gemv(qw, zs, sc, pl.half, x2.data_ptr() + 4 * r0 * k,
                                 y.data_ptr() + 4 * r0 * n, rows, k, n, pl.bits, pl.group,
                                 pl.threads), "eqat_gemv")
        return y
    threads = torch.get_num_threads()
    with torch.autocast("cpu", enabled=False):  # the sgemm in fp32, also inside autocast regions
        for n0 in range(0, n, PANEL):
            n1 = min(n, n0 + PANEL)
            panel = _SCRATCH.get(k * (n1 - n0)).view(k, n1 - n0)
            _check(lib.eqat_dequant_panel(qw, zs, sc, pl.half, panel.data_ptr(), k, n, pl.bits,
                                          pl.group, n0, n1, threads), "eqat_dequant_panel")
            if n0 == 0 and n1 == n:
                torch.mm(x2, panel, out=y)
            else:
                y[:, n0:n1] = torch.mm(x2, panel)
    return y


class CpuKernel:
    """The ``cpu`` backend's kernel (module docstring); its caps are
    :data:`eqat_cli.quant.caps.CPU_KERNEL_CAPS`. ``fallback`` runs whatever the library cannot:
    no compiler, a failed build, gradients, another device."""

    name = "cpu"

    def __init__(self, fallback=None):
        if fallback is None:
            fallback = TORCH_KERNEL
        self.fallback = fallback

    @staticmethod
    def _runs_here(layer, x: torch.Tensor) -> bool:
        return (
            not (torch.is_grad_enabled() and (x.requires_grad or layer.scales.requires_grad))
            and x.device.type == "cpu"
            and layer.qweight.device.type == "cpu"
        )

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != layer.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {layer.in_features}")
        lib = (_LIB if _STATUS == "" else _load()) if self._runs_here(layer, x) else None
        if lib is None:
            return self.fallback.forward(layer, x)
        k, n = layer.in_features, layer.out_features
        x2 = _rows_fp32(x, k)
        if x2.shape[0] == 0 or k == 0:
            y = x2.new_zeros(x2.shape[0], n)
        else:
            y = packed_matmul(lib, layer, x2)
        return _finish(layer, y, x)

    def forward_group(self, layers, x: torch.Tensor) -> list[torch.Tensor] | None:
        """The outputs of ``layers`` (one group reading ``x``) from one GEMV call, or None when
        this input is not a decode input the fused call runs (then each layer runs alone)."""
        first = layers[0]
        if x.shape[-1] != first.in_features or not all(self._runs_here(l, x) for l in layers):
            return None
        x2 = _rows_fp32(x, first.in_features)
        if not 0 < x2.shape[0] <= GEMV_ROWS:
            return None
        lib = _load()
        if lib is None:
            return None
        plans = [plan_for(l) for l in layers]
        if len({p.half for p in plans}) != 1:
            return None
        k, m, count = first.in_features, x2.shape[0], len(layers)
        ys = [torch.empty(m, p.n, dtype=torch.float32) for p in plans]
        arr = ctypes.c_void_p * count
        _check(lib.eqat_gemv_multi(count, arr(*[p.ptrs[0] for p in plans]),
                                   arr(*[p.ptrs[1] for p in plans]), arr(*[p.ptrs[2] for p in plans]),
                                   plans[0].half, x2.data_ptr(), arr(*[y.data_ptr() for y in ys]),
                                   (ctypes.c_int * count)(*[p.n for p in plans]), m, k, first.bits,
                                   plans[0].group, _threads(k * sum(p.n for p in plans))),
               "eqat_gemv_multi")
        return [_finish(l, y, x) for l, y in zip(layers, ys)]

    def fuse_groups(self, model, arch) -> int:
        """Give the packed layers of each of ``arch``'s groups that read one input (q/k/v,
        gate/up) a shared :class:`FusedMemberKernel`; returns the number of groups fused.
        Layers of one group must agree in input width, bits and group size."""
        fused = 0
        for block in arch.layers(model):
            for names in arch.linear_groups:
                if len(names) < 2:
                    continue
                try:
                    layers = [block.get_submodule(nm) for nm in names]
                except AttributeError:
                    continue
                if not all(isinstance(l, PackedLinear) for l in layers):
                    continue
                key = {(l.in_features, l.bits, l.group_size) for l in layers}
                if len(key) != 1:
                    continue
                group = _Group(layers)
                for i, l in enumerate(layers):
                    l.set_kernel(FusedMemberKernel(self, group, i))
                fused += 1
        return fused


def _rows_fp32(x: torch.Tensor, k: int) -> torch.Tensor:
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    return x2


def _scales(layer) -> torch.Tensor:
    scales = layer.scales.detach()
    if scales.dtype not in (torch.float16, torch.float32):
        scales = scales.float()
    return scales.contiguous()


def _finish(layer, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if layer.bias is not None:
        y += layer.bias.detach().float()
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def _version(x: torch.Tensor) -> int:
    try:
        return x._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot change in place
        return -1  # outside inference mode)


class _Group:
    """Packed layers that read the same input, and the outputs computed for the members that
    have not asked for theirs yet: ``(input, its version counter, outputs)``."""

    def __init__(self, layers):
        self.layers = layers
        self.pending: tuple | None = None


class FusedMemberKernel:
    """The kernel of one layer of a fused group (q/k/v, gate/up), without changing the model's
    classes: the first member called with an input runs the whole group in one GEMV call and
    keeps the other members' outputs; a member called with that same tensor object (and
    unchanged since: its version counter) takes its output. Any other call (a prefill, a
    different input, gradients) runs the layer alone through the ``cpu`` kernel."""

    def __init__(self, base: CpuKernel, group: _Group, index: int):
        self.base, self.group, self.index = base, group, index
        self.name = f"{base.name}-fused"

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        p = g.pending
        if p is not None and p[0] is x and p[1] == _version(x) and p[2][self.index] is not None:
            y, p[2][self.index] = p[2][self.index], None
            if all(o is None for o in p[2]):
                g.pending = None
            return y
        g.pending = None
        outs = self.base.forward_group(g.layers, x)
        if outs is None:
            return self.base.forward(layer, x)
        mine, outs[self.index] = outs[self.index], None
        g.pending = (x, _version(x), outs)
        return mine


_KERNEL: CpuKernel | None = None


def cpu_kernel() -> CpuKernel:
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = CpuKernel()
    return _KERNEL
