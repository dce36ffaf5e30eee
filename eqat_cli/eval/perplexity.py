"""Perplexity exactly as GPTQ / EfficientQAT compute it.

The text (see :func:`eqat_cli.eval.ppl_text.perplexity_text`) is tokenized once with the model's tokenizer
(default special tokens, as ``tokenizer(text)`` in the reference code), optionally truncated to
``max_windows * seqlen`` tokens (C4), and cut into ``n = len(tokens) // seqlen`` non-overlapping
windows; the tail shorter than a window is dropped. Each window is scored on its own (no context
carried over): ``loss_i`` is the mean next-token cross entropy over its ``seqlen - 1`` predictions.
The reference code sums ``loss_i * seqlen`` and divides by ``n * seqlen``, so

    nll = mean_i(loss_i),    ppl = exp(nll).

No Rich, no typer: progress is reported through :class:`eqat_cli.progress.Progress` as
``("ppl", {"label": set name, "done": windows scored, "total": windows})``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from eqat_cli.errors import BadInputError
from eqat_cli.progress import Progress, count


@dataclass
class PerplexityResult:
    name: str
    ppl: float
    nll: float
    seqlen: int
    windows: int  # windows evaluated
    windows_available: int  # windows the protocol defines (before --limit)
    tokens: int  # tokens in the (truncated) stream
    seconds: float
    source: str = ""
    protocol: str = ""
    comparable: bool = True
    note: str | None = None
    window_nlls: list[float] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("window_nlls")
        return d


def tokenize(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-D token ids of ``text`` (one call, default special tokens, like the GPTQ code)."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")


def max_positions(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "max_position_embeddings", None)


@torch.no_grad()
def window_losses(
    model: torch.nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    limit: int | None = None,
    batch_size: int = 1,
    progress: Optional[Progress] = None,
    label: str = "",
) -> list[float]:
    """Mean next-token loss of each non-overlapping ``seqlen`` window of ``ids`` (1-D)."""
    if seqlen < 2:
        raise BadInputError(f"--seqlen must be at least 2, got {seqlen}")
    if batch_size < 1:
        raise BadInputError(f"--batch-size must be at least 1, got {batch_size}")
    n = ids.numel() // seqlen
    if n == 0:
        raise BadInputError(
            f"the text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}"
        )
    if limit is not None:
        if limit < 1:
            raise BadInputError(f"--limit must be at least 1, got {limit}")
        n = min(n, limit)
    device = _model_device(model)
    windows = ids[: n * seqlen].view(n, seqlen)
    losses: list[float] = []
    count(progress, "ppl", label, 0, n)
    for start in range(0, n, batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        shift = logits[:, :-1, :].float()
        labels = batch[:, 1:]
        loss = F.cross_entropy(
            shift.reshape(-1, shift.shape[-1]), labels.reshape(-1), reduction="none"
        ).view(batch.shape[0], seqlen - 1)
        losses.extend(loss.mean(dim=1).tolist())
        del logits, shift
        count(progress, "ppl", label, len(losses), n)
    return losses


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    corpus: Any,
    seqlen: int = 2048,
    limit: int | None = None,
    batch_size: int = 1,
    progress: Optional[Progress] = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on a :class:`eqat_cli.eval.ppl_text.PplCorpus`."""
    t0 = time.perf_counter()
    maxpos = max_positions(model)
    if maxpos is not None and seqlen > maxpos:
        raise BadInputError(
            f"--seqlen {seqlen} exceeds the model's max_position_embeddings ({maxpos})"
        )
    max_tokens = corpus.max_windows * seqlen if corpus.max_windows else None
    ids = tokenize(tokenizer, corpus.text, max_tokens)
    losses = window_losses(model, ids, seqlen, limit, batch_size, progress, corpus.name)
    # GPTQ: sum(loss_i * seqlen) / (n * seqlen)
    nll = sum(l * seqlen for l in losses) / (len(losses) * seqlen)
    return PerplexityResult(
        name=corpus.name,
        ppl=math.exp(nll),
        nll=nll,
        seqlen=seqlen,
        windows=len(losses),
        windows_available=ids.numel() // seqlen,
        tokens=int(ids.numel()),
        seconds=time.perf_counter() - t0,
        source=corpus.source,
        protocol=corpus.protocol,
        comparable=corpus.comparable,
        note=corpus.note,
        window_nlls=losses,
    )
