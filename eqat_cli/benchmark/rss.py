"""Process memory: peak RSS of a phase, and weights copied out of the checkpoint's memory map."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from eqat_cli.memory import release_memory, rss_bytes


def _read_hwm() -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakRSS:
    """Peak process RSS inside a ``with`` block: psutil sampled in a thread, and on Linux the
    kernel's exact high-water mark (VmHWM, reset on entry)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self.method = "psutil sampling"
        self._stop = threading.Event()
        self._hwm = False

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "PeakRSS":
        self._hwm = _reset_hwm()
        if self._hwm:
            self.method = "VmHWM (reset per phase) and psutil sampling"
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        if self._hwm:
            self.peak = max(self.peak, _read_hwm() or 0)


def own_weights(model) -> None:
    """Copy parameters and buffers into process memory (out of the checkpoint's memory map).

    transformers maps safetensors files and pages weights in on first touch; the map lives as
    long as any tensor of the file does. Copying makes RSS count every weight right after
    loading, and makes memory freed later (RTN replacing the dense weights) really go back.
    """
    import torch

    with torch.no_grad():
        for param in model.parameters():  # tied parameters are one object: they stay tied
            param.data = param.data.clone()
        copies: dict[int, Any] = {}
        for mod in model.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None:
                    mod._buffers[name] = copies.setdefault(id(buf), buf.clone())
    release_memory()
