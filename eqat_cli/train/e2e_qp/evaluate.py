"""Held-out evaluation: mean next-token NLL, and KL to the teacher when there is one."""

from __future__ import annotations

import torch
import torch.distributed as dist

from eqat_cli.train.amp import Amp
from eqat_cli.train.e2e_qp.dist import world
from eqat_cli.train.e2e_qp.losses import loss_sums
from eqat_cli.train.sft_data import Examples


def evaluate(model, data: Examples, batch: int, device, teacher=None, amp: Amp | None = None) -> dict:
    """Held-out mean next-token NLL (and KL to the teacher when given) over all learned tokens."""
    if len(data) == 0:
        return {"nll": float("nan"), **({"kl": float("nan")} if teacher is not None else {})}
    rank, ws = world()
    total = torch.zeros(3, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for s in range(rank * batch, len(data), batch * ws):
            ids, labels, mask = data.collate(range(s, min(s + batch, len(data))))
            obj, nll, n = loss_sums(model, ids.to(device), labels.to(device), mask.to(device), teacher, amp)
            total += torch.tensor([float(nll), float(obj), n], dtype=torch.float64)
    if ws > 1:
        dist.all_reduce(total)
    count = max(float(total[2]), 1.0)
    out = {"nll": float(total[0]) / count}
    if teacher is not None:
        out["kl"] = float(total[1]) / count
    return out


def evaluate_loss(model, data: Examples, batch: int, device) -> float:
    """Held-out next-token loss (the tests' and benchmarks' yardstick)."""
    return evaluate(model, data, batch, device)["nll"]
