"""Exact bytes of the tensors a layer or a model keeps (no process memory: see :mod:`.rss`)."""

from __future__ import annotations


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def packed_bytes(layer) -> dict:
    """Bytes of each tensor a :class:`PackedLinear` stores, and their total."""
    parts = {
        name: tensor_bytes(getattr(layer, name))
        for name in ("qweight", "qzeros", "scales", "g_idx", "bias")
        if getattr(layer, name, None) is not None
    }
    parts["total"] = sum(parts.values())
    return parts


def kernel_cache_bytes(layer, kernel) -> int:
    """Bytes a kernel keeps per layer beside the packed tensors (after a forward)."""
    if getattr(kernel, "name", None) == "torch":
        import torch

        from eqat_cli.quant.torch_kernel import zero_rows

        return tensor_bytes(zero_rows(layer, torch.uint8))  # the cached uint8 zero points
    if getattr(kernel, "name", None) in ("cpu", "cpu-fused"):
        from eqat_cli.quant.cpu_kernel import zero_points_u8

        return tensor_bytes(zero_points_u8(layer))  # the cached uint8 zero points [G, N]
    return 0


def model_weight_bytes(model) -> dict:
    """Parameters + buffers (tied tensors once), and how much of it is packed layers."""
    from eqat_cli.quant.linear import PackedLinear

    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(t)
    packed = sum(packed_bytes(m)["total"] for m in model.modules() if isinstance(m, PackedLinear))
    return {"total": total, "packed_layers": packed}
