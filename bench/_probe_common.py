"""Shared by the single-block probes: the FP model, its calibration file, and FP block inputs/outputs."""

from __future__ import annotations

from pathlib import Path


def load_model_and_calib(model: str, calib: Path):
    """``(fp32 model in eval mode, its registry architecture, calibration)``; seeds torch with 0."""
    import torch

    from eqat_cli.models import classify, load_fp, local_path
    from eqat_cli.registry import get_registry
    from eqat_cli.train.calib import load_calibration

    torch.manual_seed(0)
    m, _ = load_fp(local_path(classify(model)), torch.float32)
    m.eval()
    return m, get_registry().architecture_for(m.config.model_type), load_calibration(calib)


def fp_block_io(model, arch, ids, blocks, chunk: int = 8) -> dict:
    """``{k: (inputs, outputs)}`` of full-precision block ``k`` on windows ``ids``, for each k in
    ``blocks``, in one pass over the model (``chunk`` windows at a time)."""
    import torch

    parts = []
    with torch.no_grad():
        for s in range(0, len(ids), chunk):
            h = arch.embed(model)(ids[s : s + chunk])
            out = {}
            for i in range(max(blocks) + 1):
                o = arch.layers(model)[i](h, **arch.block_kwargs(model, h, i))
                if i in blocks:
                    out[i] = (h, o)
                h = o
            parts.append(out)
    return {k: (torch.cat([p[k][0] for p in parts]), torch.cat([p[k][1] for p in parts])) for k in blocks}
