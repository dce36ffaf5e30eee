"""Wall-clock timing: several runs after warm-up, summarized as a median and its spread."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def summarize(values: list[float], unit: str) -> dict:
    """Median and spread of several runs (quartiles by the inclusive method)."""
    if not values:
        raise ValueError("no runs to summarize")
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {
        "unit": unit,
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "runs": len(values),
        "values": list(values),
    }


def time_runs(fn: Callable[[], Any], repeats: int, warmup: int = 2, sync=None) -> dict:
    """Milliseconds per call of ``fn``: ``warmup`` untimed calls, then ``repeats`` timed ones."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times, "ms")


def device_sync(device) -> Callable[[], None] | None:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return None
