"""A compact forward for Llama-family decoders with a preallocated (static) KV cache: what
``eqat generate`` runs instead of transformers' forward where the model allows it.

Why: at one token per forward a 135M-parameter model's step is a few milliseconds of arithmetic
and, through transformers, as much again of Python and torch dispatch (masks, cache objects, a
``torch.cat`` per layer per step to grow the cache, output objects, module hooks). :class:`Decoder`
keeps only the operations the math needs: per layer one RMSNorm, one call for q/k/v, RoPE on q and
k together, a write into the static cache, SDPA over the filled part, o_proj, one call for
gate/up, SiLU, down_proj.

Packed layers run in one of two ways (``activations``):

* ``"int8"``: :class:`eqat_cli.quant.cpu_q8.Q8Weights` for one-token steps (q/k/v and gate/up
  each concatenated into one product; a packed lm_head too), activations rounded to int8 per
  group as llama.cpp does; prompts (more than one token) run the layers' own kernels, exact.
* ``"fp32"``: every product through the layers' own kernels (exactly the reference arithmetic of
  the attached backend).

Full-precision ``nn.Linear`` layers run ``F.linear`` either way. :func:`build_decoder` returns
None (the caller keeps transformers' forward) for a model this does not describe: not
Llama/Mistral/Qwen2 without sliding windows, q/k norms, an activation other than SiLU, or an
unusual RoPE.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from eqat_cli.quant import cpu_kernel, cpu_q8
from eqat_cli.quant.linear import PackedLinear

MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = (None, "default", "llama3", "linear")
ACTIVATIONS = ("int8", "fp32")


class _Linears:
    """Linear layers that read one input (q/k/v, gate/up, or one layer): ``[T, K] -> [T, N_i]``."""

    def __init__(self, mods: list[nn.Module], int8: bool):
        self.mods = mods
        self.q8: Optional[cpu_q8.Q8Weights] = None
        if int8 and all(isinstance(m, PackedLinear) for m in mods) and len(
                {(m.in_features, m.bits, m.group_size) for m in mods}) == 1 and mods[0].qweight.device.type == "cpu":
            self.q8 = cpu_q8.Q8Weights(mods)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.q8 is not None and x.shape[0] == 1:
            return [y.unsqueeze(0) for y in self.q8.matvec(x[0] if x.is_contiguous() else x[0].contiguous())]
        return [_linear(m, x) for m in self.mods]


def _linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(m) is nn.Linear:
        return F.linear(x, m.weight, m.bias)
    return m(x)


def _rope_type(config: Any) -> Any:
    for name in ("rope_parameters", "rope_scaling"):
        p = getattr(config, name, None)
        if isinstance(p, dict):
            return p.get("rope_type", p.get("type"))
    return None


def supported(model: Any) -> Optional[str]:
    """None when :class:`Decoder` describes ``model``, else why not (one line)."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in MODEL_TYPES:
        return f"model type {mt!r} is not one of {', '.join(MODEL_TYPES)}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if _rope_type(cfg) not in ROPE_TYPES:
        return f"RoPE type {_rope_type(cfg)!r}"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "embed_tokens"):
        return "no model.layers / rotary_emb / embed_tokens"
    for blk in layers:
        att, mlp = getattr(blk, "self_attn", None), getattr(blk, "mlp", None)
        if att is None or mlp is None or hasattr(att, "q_norm"):
            return "a block without self_attn/mlp, or with q/k norms"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(att, name):
                return f"attention without {name}"
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not hasattr(mlp, name):
                return f"MLP without {name}"
        for norm in (blk.input_layernorm, blk.post_attention_layernorm):
            if not hasattr(norm, "weight") or not hasattr(norm, "variance_epsilon"):
                return "a norm that is not RMSNorm"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    dev = next(model.parameters()).device
    if dev.type != "cpu":
        return f"device {dev} (the compact step is for the CPU)"
    return None


class Decoder:
    """The compact forward of one model (module docstring). :meth:`reset` sizes the static
    cache; :meth:`forward` runs tokens at the next positions and returns the last one's logits."""

    def __init__(self, model: Any, activations: str = "int8"):
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
        why = supported(model)
        if why is not None:
            raise ValueError(f"the compact decode step does not describe this model: {why}")
        self.model, self.activations = model, activations
        cfg = model.config
        inner = model.model
        int8 = activations == "int8" and cpu_kernel._load() is not None
        self.int8 = int8
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.lm_head = _Linears([model.lm_head], int8)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.blocks = []
        for blk in inner.layers:
            att, mlp = blk.self_attn, blk.mlp
            self.blocks.append((
                blk.input_layernorm.weight, blk.input_layernorm.variance_epsilon,
                _Linears([att.q_proj, att.k_proj, att.v_proj], int8), _Linears([att.o_proj], int8),
                blk.post_attention_layernorm.weight, blk.post_attention_layernorm.variance_epsilon,
                _Linears([mlp.gate_proj, mlp.up_proj], int8), _Linears([mlp.down_proj], int8),
            ))
        self.dtype = inner.norm.weight.dtype  # (a packed head's fp16 step sizes are parameters too)
        self.k_cache: Optional[torch.Tensor] = None
        self.v_cache: Optional[torch.Tensor] = None
        self.cos: Optional[torch.Tensor] = None
        self.sin: Optional[torch.Tensor] = None
        self.pos = 0

    @property
    def capacity(self) -> int:
        return 0 if self.k_cache is None else self.k_cache.shape[3]

    def reset(self, length: int) -> None:
        """Empty the cache and make room for ``length`` positions (reallocated only to grow)."""
        if length > self.capacity:
            shape = (len(self.blocks), 1, self.n_kv, length, self.head_dim)
            self.k_cache = torch.zeros(shape, dtype=self.dtype)
            self.v_cache = torch.zeros(shape, dtype=self.dtype)
            with torch.inference_mode():
                pos = torch.arange(length).unsqueeze(0)
                cos, sin = self.rotary(torch.zeros(1, dtype=self.dtype), pos)
            self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # [length, D]
        self.pos = 0

    def _rms(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        # as transformers' RMSNorm: fp32 statistics, weight times the normalized input
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def forward(self, ids: list[int]) -> torch.Tensor:
        """Run ``ids`` at positions ``pos .. pos+T-1``; returns the last position's logits [V]."""
        t = len(ids)
        p0, p1 = self.pos, self.pos + t
        if p1 > self.capacity:
            raise ValueError(f"the static KV cache holds {self.capacity} positions, {p1} needed")
        h = self.embed(torch.tensor(ids, dtype=torch.long)).to(self.dtype)  # [T, hidden]
        cos, sin = self.cos[p0:p1], self.sin[p0:p1]  # [T, D]
        hq, hk, d = self.n_heads, self.n_kv, self.head_dim
        half = d // 2
        mask = None
        if t > 1 and p0 > 0:
            mask = torch.arange(p1).unsqueeze(0) <= (torch.arange(t) + p0).unsqueeze(1)
        for li, (w1, e1, qkv, o, w2, e2, gu, down) in enumerate(self.blocks):
            x = self._rms(h, w1, e1)
            q, k, v = qkv(x)
            qk = torch.cat((q, k), dim=1).view(t, hq + hk, d).transpose(0, 1)  # [H+KV, T, D]
            rot = torch.cat((qk[..., half:].neg(), qk[..., :half]), dim=-1)
            qk = qk * cos + rot * sin
            kc, vc = self.k_cache[li, 0], self.v_cache[li, 0]  # [KV, cap, D]
            kc[:, p0:p1] = qk[hq:]
            vc[:, p0:p1] = v.view(t, hk, d).transpose(0, 1)
            if t == 1:  # batched matmuls: SDPA's threaded kernel costs more than the math at one query
                qg = qk[:hq].view(hk, hq // hk, d)  # [KV, group, D]
                sc = torch.bmm(qg, kc[:, :p1].transpose(1, 2)).mul_(d ** -0.5).softmax(-1)
                a = torch.bmm(sc, vc[:, :p1]).reshape(1, hq * d)
            else:
                a = F.scaled_dot_product_attention(
                    qk[:hq].unsqueeze(0), kc[:, :p1].unsqueeze(0), vc[:, :p1].unsqueeze(0),
                    attn_mask=mask, is_causal=mask is None, enable_gqa=hq != hk)
                a = a[0].transpose(0, 1).reshape(t, hq * d)
            h = h + o(a)[0]
            x = self._rms(h, w2, e2)
            g, u = gu(x)
            h = h + down(F.silu(g) * u)[0]
        self.pos = p1
        x = self._rms(h[-1:], self.norm.weight, self.norm.variance_epsilon)
        return self.lm_head(x)[0][0]


def build_decoder(model: Any, activations: str = "int8") -> Optional[Decoder]:
    """A :class:`Decoder` for ``model``, or None when it does not describe the model."""
    if supported(model) is not None:
        return None
    with torch.inference_mode(False), torch.no_grad():
        return Decoder(model, activations)
