"""Mixed precision for the training loops: autocast dtype by device, loss scaling for fp16 only.

* CUDA with bf16: bf16 autocast, no scaler (bf16 has fp32's exponent range).
* CUDA without bf16 (pre-Ampere): fp16 autocast *and* a ``GradScaler``: fp16 gradients below
  ~6e-8 flush to zero and above 65504 overflow, so the loss is scaled up before ``backward``, the
  gradients are unscaled before clipping, and a step whose gradients overflowed is skipped while
  the scale backs off.
* CPU with bf16 units (AVX512-BF16, AMX): bf16 autocast, no scaler; other CPUs: fp32 (bf16 there
  is emulated and many times slower). The choice is :func:`eqat_cli.device.train_autocast_dtype`.

Use (the order matters: unscale before clipping, ``step`` instead of ``opt.step()``)::

    amp = Amp.for_device(device)
    with amp.autocast():
        loss = ...
    amp.backward(loss)
    amp.unscale_(opt)          # before clip_grad_norm_ (and after any all_reduce of gradients)
    clip_grad_norm_(params, max_norm)
    amp.step(opt)              # opt.step() + scaler.update(); False when the step was skipped

``state_dict()`` is plain JSON (the scale and its growth counter), for resume files.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from eqat_cli.device import train_autocast_dtype


@dataclass
class Amp:
    device_type: str
    dtype: torch.dtype | None  # None: fp32, autocast off
    scaler: "torch.amp.GradScaler | None" = None

    @classmethod
    def for_device(cls, device: torch.device | str, bf16_supported: bool | None = None,
                   precision: str = "auto") -> "Amp":
        """``precision`` ``auto``: bf16 where the device computes it natively (CUDA with bf16,
        CPUs with bf16 units), fp16 with a loss scaler on CUDA without bf16, else fp32; or
        ``fp32``/``bf16``/``fp16`` as given. ``bf16_supported`` overrides the CUDA check (tests)."""
        device = torch.device(device)
        if device.type == "cuda" and precision == "auto" and bf16_supported is not None:
            return cls("cuda", torch.bfloat16) if bf16_supported else cls.fp16(device)
        dtype = train_autocast_dtype(device, precision)
        if dtype == torch.float16:
            return cls.fp16(device)
        return cls(device.type, dtype)

    @classmethod
    def fp16(cls, device: torch.device | str) -> "Amp":
        """fp16 autocast with a GradScaler (also on the CPU, where tests exercise it)."""
        device = torch.device(device)
        return cls(device.type, torch.float16, torch.amp.GradScaler(device.type))

    @property
    def name(self) -> str:
        if self.dtype is None:
            return "fp32"
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype] + (" + loss scaling" if self.scaler else "")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, opt: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> bool:
        """``opt.step()``; with a scaler, skipped when the gradients hold inf/NaN. True if stepped."""
        if self.scaler is None:
            opt.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(opt)
        self.scaler.update()
        return self.scaler.get_scale() >= scale  # the scale backs off exactly when a step is skipped

    def state_dict(self) -> dict:
        if self.scaler is None:
            return {}
        st = self.scaler.state_dict()
        return {k: (float(v) if isinstance(v, float) else int(v) if isinstance(v, int) else v) for k, v in st.items()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
