"""The student: its packed layers, the step sizes (and zero points) that train, their kernel, and
gradient checkpointing."""

from __future__ import annotations

import torch

from eqat_cli.quant.linear import PackedLinear
from eqat_cli.registry import get_registry


def trainable_layers(model: torch.nn.Module) -> dict[str, PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def _trainable_state(layers: dict[str, PackedLinear]) -> dict[str, torch.Tensor]:
    out = {}
    for n, m in layers.items():
        out[f"{n}.scales"] = m.scales.detach().clone().cpu()
        if m.zeros_fp is not None:
            out[f"{n}.zeros_fp"] = m.zeros_fp.detach().clone().cpu()
    return out


def _load_trainable(layers: dict[str, PackedLinear], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, m in layers.items():
            m.scales.copy_(state[f"{n}.scales"])
            if m.zeros_fp is not None:
                m.zeros_fp.copy_(state[f"{n}.zeros_fp"])


def _enable_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _disable_checkpointing(model) -> None:
    off = getattr(model, "activation_checkpointing_disable", None) or getattr(model, "gradient_checkpointing_disable", None)
    if off is not None:
        off()


def training_kernel(layers: dict[str, PackedLinear], train_zeros: bool, device: str | None = None):
    """The kernel E2E-QP trains these layers with, from the registry: the highest-priority
    backend available on ``device`` (default: where the layers are) for their bit widths and
    group sizes whose kernel has a backward for the step sizes (and the zero points with
    ``train_zeros``). Raises :class:`~eqat_cli.errors.UnsupportedError` when none has."""
    if device is None:
        device = next(iter(layers.values())).qweight.device.type
    trains = ("scales", "zeros") if train_zeros else ("scales",)
    bits = sorted({m.bits for m in layers.values()})
    groups = sorted({m.group_size for m in layers.values()})
    spec, _why = get_registry().training_backend(bits, device, groups, trains)
    return spec.kernel()


def prepare_student(
    model: torch.nn.Module, train_zeros: bool, checkpointing: bool, device: str | None = None
) -> list[torch.nn.Parameter]:
    """Freeze everything but the packed layers' step sizes (and zero points); return those.

    The packed layers get the kernel :func:`training_kernel` picks for ``device`` (a device type;
    default: where the layers are now).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    layers = trainable_layers(model)
    kernel = training_kernel(layers, train_zeros, device) if layers else None
    params = []
    for m in layers.values():
        m.set_kernel(kernel)
        params.extend(m.start_training(train_zeros))
    if checkpointing:
        _enable_checkpointing(model)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return params
