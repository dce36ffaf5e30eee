"""Process memory: current RSS, peak RSS, and handing freed heap back to the OS."""

from __future__ import annotations

import functools
import gc
import sys


def rss_bytes() -> int:
    """Current resident set size of this process."""
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None elsewhere (looked up once: ``find_library`` runs a
    subprocess)."""
    try:
        import ctypes
        import ctypes.util

        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc ``malloc_trim``).

    Large tensors freed in a long loop (one decoder block after another) otherwise leave
    fragmented heap behind, and RSS creeps up block after block.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
