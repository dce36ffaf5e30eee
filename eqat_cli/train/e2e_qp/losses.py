"""E2E-QP's objectives: next-token cross-entropy (``ntp``) and distillation from the
full-precision teacher (``kd``), as sums over the learned tokens, logits formed a chunk at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from eqat_cli.train.amp import Amp
from eqat_cli.train.sft_data import IGNORE

# Learned positions whose logits are formed at once (chunks beyond the first are recomputed in
# the backward instead of keeping [tokens, vocab] logits alive).
LOGIT_CHUNK = 2048


def _hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[batch, seq, hidden]`` (the body of the model, no LM head)."""
    out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _chunk_terms(head, h, targets, t_logp):
    """Per-chunk sums: (objective, next-token NLL). ``t_logp``: teacher log-probs or None (ntp)."""
    logp = F.log_softmax(head(h).float(), dim=-1)
    nll = -logp.gather(1, targets[:, None]).sum()
    if t_logp is None:
        return nll, nll.detach()
    return F.kl_div(logp, t_logp, log_target=True, reduction="sum"), nll.detach()


def loss_sums(model, ids, labels, mask, teacher=None, amp: Amp | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(objective sum, NLL sum, learned tokens)`` over one micro-batch.

    Objective: NLL without a teacher, else ``sum KL(teacher || student)`` over the positions whose
    next token is learned (label not IGNORE), i.e. masked like the LM loss.
    """
    amp = amp or Amp("cpu", None)
    sel = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][sel]
    n = int(targets.numel())
    with amp.autocast():
        h = _hidden(model, ids, mask)[:, :-1][sel]
        t_h = None
        if teacher is not None:
            with torch.no_grad():
                t_h = _hidden(teacher, ids, mask)[:, :-1][sel]
    head = model.get_output_embeddings()
    t_head = teacher.get_output_embeddings() if teacher is not None else None
    obj = h.new_zeros((), dtype=torch.float32)
    nll = torch.zeros((), dtype=torch.float32)
    for a in range(0, n, LOGIT_CHUNK):
        hc, tc = h[a : a + LOGIT_CHUNK], targets[a : a + LOGIT_CHUNK]
        t_logp = None
        if teacher is not None:
            with torch.no_grad(), amp.autocast():
                t_logp = F.log_softmax(t_head(t_h[a : a + LOGIT_CHUNK]).float(), dim=-1)

        def terms(hc=hc, tc=tc, t_logp=t_logp):
            with amp.autocast():
                return _chunk_terms(head, hc, tc, t_logp)

        o, l = checkpoint(terms, use_reentrant=False) if n > LOGIT_CHUNK and hc.requires_grad else terms()
        obj, nll = obj + o, nll + l.cpu()
    return obj, nll, n
