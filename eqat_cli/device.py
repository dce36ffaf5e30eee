"""Device and precision choices: precision follows the device.

bf16 on a CPU without bf16 hardware is ~18x slower than fp32, so CPUs compute in fp32; CUDA
computes in bf16 where supported, else fp16. Training forwards (Block-AP and E2E-QP) run under bf16
autocast on CPUs that do have bf16 units (AVX512-BF16 or AMX), where it is faster than fp32
(:func:`train_autocast_dtype`).
"""

from __future__ import annotations

import torch

from eqat_cli.errors import BadInputError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"device {name!r} requested but torch sees no CUDA GPU")
    return dev


def compute_dtype(device: torch.device | str) -> torch.dtype:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles)."""
    checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(c()) for c in checks if c is not None)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # the trainers' --precision values


def train_autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of training forwards, ``None`` for plain fp32. ``auto``: bf16 (or fp16
    on GPUs without bf16) on CUDA, bf16 on CPUs with bf16 units, else fp32."""
    dev = torch.device(device)
    if precision == "fp32":
        return None
    if precision in ("bf16", "fp16"):
        return DTYPES[precision]
    if dev.type == "cuda":
        return compute_dtype(dev)
    return torch.bfloat16 if dev.type == "cpu" and cpu_has_bf16() else None


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | None, device: torch.device | str) -> torch.dtype:
    if name in (None, "auto"):
        return compute_dtype(device)
    if name not in DTYPES:
        raise BadInputError(f"unknown dtype {name!r}; choose auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[name]
