"""Benchmarks of packed layers and quantized models: latency, weight memory, generation speed.

The library side of ``eqat bench`` and ``bench/bench_kernels.py``. Nothing here prints or imports
Rich; long steps report through the library's one callback, :class:`eqat_cli.progress.Progress`:
counting events ``progress(event, {"label", "done", "total"})`` with ``event`` one of ``"shapes"``,
``"layer"``, ``"load"``, ``"generate"``.

What is measured (and what is not):

* **Layer latency**: wall time (``time.perf_counter``; the device is synchronized on CUDA) of one
  forward of a layer at batch 1 (decode) and at a prefill batch, after ``warmup`` untimed runs;
  every figure is the median of ``repeats`` runs with its spread (min, max, quartiles; the raw
  runs are kept). The quantized layer holds random Gaussian weights, min-max (round-to-nearest)
  quantized and packed exactly like a real checkpoint, and runs the selected backend's kernel;
  the dense layer is ``F.linear`` with the same, unquantized weight in the device's usual dtype
  (fp32 on CPU).
* **Layer weight memory**: exact bytes of the tensors each layer keeps: the dense weight, vs the
  packed ``qweight + qzeros + scales + g_idx`` (+ bias). A kernel's own per-layer cache (the
  torch kernel's unpacked zero points) is reported separately as ``kernel_cache``.
* **Generation**: tokens/s of greedy ``generate()`` on a fixed prompt, exactly ``new_tokens`` new
  tokens per run (end-of-sequence suppressed), wall time including the prompt's prefill.
* **Model memory**: ``weight_bytes`` = parameters + buffers (tied tensors once), and the process
  RSS (psutil, plus the kernel's VmHWM high-water mark on Linux, reset before each phase) as a
  delta over the RSS before the model was loaded: after loading, and the peak while loading /
  quantizing and while generating. Weights are copied out of the checkpoint's memory map after
  loading (:func:`own_weights`), so RSS counts them all, touched or not, and memory freed by
  quantization is really returned. RSS includes activations, the KV cache, scratch buffers and
  allocator slack, so it is an upper bound on what the model needs.

The rooms: :mod:`.config` (:class:`BenchConfig` and its validation), :mod:`.shapes` (presets and
the layer shapes of any model), :mod:`.timing` (timed runs and their summary), :mod:`.sizes`
(exact tensor bytes), :mod:`.rss` (peak process RSS, weights out of the memory map),
:mod:`.layer` (one layer shape), :mod:`.generation` (end-to-end generation and memory),
:mod:`.runner` (:func:`plan` and :func:`run`, the whole measurement as one JSON-ready dict).
"""

from eqat_cli.benchmark.config import (
    DEFAULT_PROMPT, GENERATION_REPEATS, LAYER_REPEATS, SUPPORTED_BITS, BenchConfig, Progress,
    no_progress,
)
from eqat_cli.benchmark.generation import bench_model, measure_generation
from eqat_cli.benchmark.layer import bench_layer, quantized_random_layer
from eqat_cli.benchmark.rss import PeakRSS, own_weights
from eqat_cli.benchmark.runner import Plan, bench_from_spec, machine_info, plan, run
from eqat_cli.benchmark.shapes import (
    DEBUG_PRESETS, PRESETS, LayerShape, ShapeSet, resolve_shapes, shapes_from_config,
)
from eqat_cli.benchmark.sizes import (
    kernel_cache_bytes, model_weight_bytes, packed_bytes, tensor_bytes,
)
from eqat_cli.benchmark.timing import device_sync, summarize, time_runs

__all__ = [
    "bench_from_spec",
    "DEFAULT_PROMPT", "GENERATION_REPEATS", "LAYER_REPEATS", "SUPPORTED_BITS", "BenchConfig",
    "Progress", "no_progress", "bench_model", "measure_generation", "bench_layer",
    "quantized_random_layer", "PeakRSS", "own_weights", "Plan", "machine_info", "plan", "run",
    "DEBUG_PRESETS", "PRESETS", "LayerShape", "ShapeSet", "resolve_shapes", "shapes_from_config",
    "kernel_cache_bytes", "model_weight_bytes", "packed_bytes", "tensor_bytes", "device_sync",
    "summarize", "time_runs",
]
