"""Rotate a full-precision model's residual stream, folded into its weights (QuaRot / SpinQuant R1).

For an orthogonal Q, a model whose residual stream carries h Q instead of h computes the same
logits when every weight that touches the stream is multiplied by Q on the stream's side, because
an RMSNorm without a gain commutes with Q (||h Q|| = ||h||). The model keeps its architecture and
its sizes, so every export still works; quantization sees weights whose outlier channels (SmolLM2's
massive activation channel, for one) are spread over all channels.

The walk uses only the :class:`~eqat_cli.specs.ArchitectureSpec`'s paths (``embed_path``,
``layers_path``, ``norm_path``, ``lm_head_path``, ``residual_readers``, ``rotation_writers``,
``embedding_writers``). With ``W`` a linear's ``(out, in)`` weight:

1. each norm that feeds readers gives its gain g (``norm_gain_offset + weight``) to them:
   ``W <- W diag(g)``, and its gain becomes 1; the final norm gives its gain to the LM head;
2. token embeddings ``E <- E Q``; readers and the head ``W <- W Q``; writers (and embedding
   writers) ``W <- Q^T W``, ``b <- Q^T b``.

A tied head is the embedding, so it cannot also take the final norm's gain: a tied model whose
final gain is not one value for every channel is refused unless ``untie=True`` (then the head
becomes its own matrix ``E diag(g) Q``, one vocabulary x width matrix more in every export). All
arithmetic is float64, cast back to each weight's dtype once. Families whose structure makes the
rotation inexact (a norm between a writer and the stream: Gemma-3) are refused in one line
(``rotation_blocker``), as are models that are already quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eqat_cli.errors import UnsupportedError
from eqat_cli.quant.rotation import rotation_matrix


@dataclass
class RotationInfo:
    """What :func:`rotate_model` did (recorded beside a rotated checkpoint)."""

    kind: str  # "hadamard" or "orthogonal"
    seed: int
    width: int
    untied: bool  # the head was tied to the embedding and is now its own matrix

    def as_dict(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "width": self.width, "untied": self.untied}


def _get(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as e:
        raise UnsupportedError(f"cannot rotate: the model has no {what} at {path!r}") from e


def _linear(owner: nn.Module, path: str, what: str) -> nn.Linear:
    mod = _get(owner, path, what)
    if not isinstance(mod, nn.Linear):
        raise UnsupportedError(
            f"cannot rotate: {path} is a {type(mod).__name__}, not a full-precision linear layer "
            "(rotate the full-precision model before quantizing it)"
        )
    return mod


def _gain(norm: nn.Module, path: str, offset: float) -> torch.Tensor:
    if isinstance(norm, nn.LayerNorm) or getattr(norm, "bias", None) is not None:
        raise UnsupportedError(f"cannot rotate: {path} is a LayerNorm (it subtracts the mean), not an RMSNorm")
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise UnsupportedError(f"cannot rotate: the norm {path} has no gain vector")
    return offset + weight.detach().double()


def _unit_gain(norm: nn.Module, offset: float) -> None:
    with torch.no_grad():
        norm.weight.fill_(1.0 - offset)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _read(lin: nn.Linear, gain: torch.Tensor | None, q: torch.Tensor) -> None:
    """A linear that reads the stream: W <- W diag(gain) Q."""
    w = lin.weight.detach().double()
    if gain is not None:
        w = w * gain.view(1, -1)
    _set(lin.weight, w @ q)


def _write(lin: nn.Linear, q: torch.Tensor) -> None:
    """A linear that writes the stream: W <- Q^T W, b <- Q^T b."""
    _set(lin.weight, q.T @ lin.weight.detach().double())
    if lin.bias is not None:
        _set(lin.bias, lin.bias.detach().double() @ q)


def check_rotatable(arch) -> None:
    """Raise (one line) when this architecture's rotation cannot be exact or is not declared."""
    if arch.rotation_blocker:
        raise UnsupportedError(f"cannot rotate a {arch.name} model: {arch.rotation_blocker}")
    if not arch.residual_readers:
        raise UnsupportedError(
            f"cannot rotate a {arch.name} model: its plugin declares no residual_readers "
            "(which norms and linears read the residual stream)"
        )


def _block_plan(block: nn.Module, arch, prefix: str = "") -> tuple[list, list]:
    """The norms (with their gains), readers and writers of one block, checked."""
    reads = []
    for norm_name, readers in arch.residual_readers:
        norm = _get(block, norm_name, "norm")
        gain = _gain(norm, prefix + norm_name, float(arch.norm_gain_offset))
        reads.append((norm, gain, [_linear(block, r, "reader") for r in readers]))
    return reads, [_linear(block, w, "writer") for w in arch.rotation_writers]


def _apply_block_plan(plan: tuple[list, list], q: torch.Tensor, offset: float) -> None:
    reads, writes = plan
    for norm, gain, readers in reads:
        for lin in readers:
            _read(lin, gain.to(q.device), q)
        _unit_gain(norm, offset)
    for lin in writes:
        _write(lin, q)


def rotate_block(block: nn.Module, arch, q: torch.Tensor, prefix: str = "") -> None:
    """Rotate one full-precision decoder block by ``q`` (float64, from
    :func:`~eqat_cli.quant.rotation.rotation_matrix`) in place: its norms' gains go into their
    readers, readers ``W <- W Q``, writers ``W <- Q^T W``. For a trainer that loads blocks one at
    a time; :func:`rotate_model` does the same to every block plus the embedding and the head."""
    check_rotatable(arch)
    _apply_block_plan(_block_plan(block, arch, prefix), q.to(next(block.parameters()).device), float(arch.norm_gain_offset))


def rotate_model(model: nn.Module, arch, kind: str = "auto", seed: int = 0, untie: bool = False) -> RotationInfo:
    """Rotate ``model``'s residual stream in place (see the module docstring); the logits stay
    those of the unrotated model up to float rounding. ``kind`` and ``seed`` pick Q
    (:func:`eqat_cli.quant.rotation.rotation_matrix`)."""
    check_rotatable(arch)
    offset = float(arch.norm_gain_offset)
    embed = _get(model, arch.embed_path, "token embedding")
    head = _linear(model, arch.lm_head_path, "LM head")
    final_norm = _get(model, arch.norm_path, "final norm")
    final_gain = _gain(final_norm, arch.norm_path, offset)
    width = embed.weight.shape[1]
    tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    uniform = bool(torch.all(final_gain == final_gain[0]))
    if tied and not uniform and not untie:
        raise UnsupportedError(
            "cannot rotate: the LM head is tied to the embedding and the final norm's gain differs "
            "between channels, so the gain cannot move into the head without untying it",
            hint="untie the head (one more vocabulary x width matrix in every export)",
        )
    # check everything before changing anything: a refusal leaves the model as it was
    plans = [_block_plan(block, arch, arch.layer_prefix(i)) for i, block in enumerate(arch.layers(model))]
    extra = [_linear(model, p, "embedding writer") for p in arch.embedding_writers]

    q, kind = rotation_matrix(width, kind, seed)
    q = q.to(embed.weight.device)
    for plan in plans:
        _apply_block_plan(plan, q, offset)
    for lin in extra:
        _write(lin, q)
    e = embed.weight.detach().double()
    if tied and uniform:  # a uniform gain commutes with Q: it stays in the final norm
        _set(embed.weight, e @ q)
    else:
        head_w = (e if tied else head.weight.detach().double()) * final_gain.to(q.device).view(1, -1)
        if tied:
            head.weight = nn.Parameter((head_w @ q).to(head.weight.dtype), requires_grad=head.weight.requires_grad)
            _untie_config(model)
        else:
            _set(head.weight, head_w @ q)
        _set(embed.weight, e @ q)
        _unit_gain(final_norm, offset)
    return RotationInfo(kind, int(seed), int(width), bool(tied and not uniform))


def _untie_config(model: nn.Module) -> None:
    configs = [model.config]
    text = getattr(model.config, "get_text_config", None)
    if text is not None:
        configs.append(text())
    for config in configs:
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
