"""The spec dataclasses plugins register: architectures, kernel backends, data sets.

Specs are frozen dataclasses: an architecture is *data* (paths and layer names), not code. This
module is the bottom of the plugin side of the house: it imports nothing of eqat and nothing
heavy (no torch, no pluggy), so hook specifications, plugins and the registry can all import it
(``tests/test_registry.py`` checks both in a fresh interpreter).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split(".") if path else []:
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where things live in a Hugging Face model of this family.

    ``linear_groups`` lists the quantizable linear layers of one decoder block in forward order;
    layers in one group read the same input (e.g. q/k/v).
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str
    embed_path: str
    norm_path: str
    rotary_path: str
    lm_head_path: str
    linear_groups: tuple[tuple[str, ...], ...]
    full_precision_paths: tuple[str, ...] = ()
    text_config_attr: str | None = None
    description: str = ""
    # (regex, replacement) pairs mapping key names in Hugging Face checkpoints on disk to module
    # paths, where the two differ (transformers renames legacy LLaVA keys on load).
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    def module_key(self, checkpoint_key: str) -> str:
        import re

        for pattern, repl in self.checkpoint_renames:
            new = re.sub(pattern, repl, checkpoint_key)
            if new != checkpoint_key:
                return new
        return checkpoint_key

    def __post_init__(self):
        if not self.model_types:
            raise ValueError(f"architecture {self.name!r} declares no model_types")
        if not self.linear_groups or not all(self.linear_groups):
            raise ValueError(f"architecture {self.name!r} declares no linear layers")

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for group in self.linear_groups for n in group)

    def layers(self, model: Any) -> Any:
        """The ``nn.ModuleList`` of decoder blocks."""
        return _get_path(model, self.layers_path)

    def embed(self, model: Any) -> Any:
        return _get_path(model, self.embed_path)

    def norm(self, model: Any) -> Any:
        return _get_path(model, self.norm_path)

    def rotary(self, model: Any) -> Any:
        return _get_path(model, self.rotary_path)

    def lm_head(self, model: Any) -> Any:
        return _get_path(model, self.lm_head_path)

    def text_config(self, config: Any) -> Any:
        return getattr(config, self.text_config_attr) if self.text_config_attr else config

    def layer_prefix(self, index: int) -> str:
        """State-dict prefix of decoder block ``index`` (e.g. ``model.layers.3.``)."""
        return f"{self.layers_path}.{index}."

    def layer_index(self, model: Any, layer: Any) -> int:
        """The position of decoder block ``layer`` (an index, or the block module itself).

        A module is found in :meth:`layers` by identity; a block that is not (a copy) is asked for
        the ``layer_idx`` transformers gives every decoder layer or its attention.
        """
        if isinstance(layer, int):
            return layer
        for i, block in enumerate(self.layers(model)):
            if block is layer:
                return i
        for owner in (layer, getattr(layer, "self_attn", None)):
            idx = getattr(owner, "layer_idx", None)
            if isinstance(idx, int):
                return idx
        raise ValueError(f"{type(layer).__name__} is not a decoder block of this {self.name} model")

    def layer_type(self, model: Any, layer: Any) -> str:
        """``full_attention``, ``sliding_attention`` (or another type the config names) of one block.

        From the config's ``layer_types`` (Gemma-2/3: sliding and global alternate; Qwen2/3: sliding
        from ``max_window_layers`` on); a config without it has one type for every layer, sliding
        when it sets ``sliding_window`` (Mistral).
        """
        config = self.text_config(model.config)
        types = getattr(config, "layer_types", None)
        if types:
            return types[self.layer_index(model, layer)]
        return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"

    def block_kwargs(self, model: Any, hidden: Any, layer: Any, position_ids: Any = None) -> dict:
        """Keyword arguments decoder block ``layer`` (index or module) needs besides the hidden
        states (causal attention, no padding).

        The block's type (:meth:`layer_type`) picks its mask, built by transformers' own mask
        builders (a sliding window where the block has one), and its rotary embedding, for rotary
        modules that keep one per layer type (Gemma-3). A plugin whose blocks need something else
        subclasses the spec and overrides this method.
        """
        import torch
        from transformers import masking_utils

        seq = hidden.shape[1]
        if position_ids is None:
            position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0)
        kind = self.layer_type(model, layer)
        rotary = self.rotary(model)
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            cos, sin = rotary(hidden, position_ids, layer_type=kind)
        else:
            cos, sin = rotary(hidden, position_ids)
        config = self.text_config(model.config)
        make_mask = (
            masking_utils.create_sliding_window_causal_mask
            if kind == "sliding_attention"
            else masking_utils.create_causal_mask
        )
        # transformers renamed the cache argument (past_key_values -> cache, old name removed in
        # 5.40); use whichever this version's mask builder takes.
        cache_kw = "cache" if "cache" in inspect.signature(make_mask).parameters else "past_key_values"
        mask = make_mask(
            config=config, inputs_embeds=hidden, attention_mask=None, position_ids=position_ids,
            **{cache_kw: None},
        )
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": (cos, sin),
        }


@dataclass(frozen=True)
class BackendSpec:
    """A kernel backend for packed layers.

    ``available()`` returns ``(ok, reason)``; ``kernel()`` builds the object whose
    ``forward(layer, x)`` runs a :class:`~eqat_cli.quant.linear.PackedLinear`.
    """

    name: str
    priority: int
    devices: tuple[str, ...]
    bits: tuple[int, ...]
    available: Callable[[], tuple[bool, str]]
    kernel: Callable[[], Any]
    install_hint: str = ""
    description: str = ""

    def supports(self, bits: int, device: str) -> tuple[bool, str]:
        if device not in self.devices:
            return False, f"runs on {', '.join(self.devices)}, not {device}"
        if bits not in self.bits:
            return False, f"supports bits {', '.join(map(str, self.bits))}, not {bits}"
        ok, reason = self.available()
        if not ok:
            hint = f" ({self.install_hint})" if self.install_hint else ""
            return False, reason + hint
        return True, reason


@dataclass(frozen=True)
class DatasetSpec:
    """A named data set: where it lives on the Hub and under a local data dir.

    ``kind`` is ``text`` (calibration / perplexity corpora) or ``task`` (zero-shot tasks).
    ``local_files`` maps a split to a path relative to the data dir.
    """

    name: str
    kind: str
    hub_path: str | None
    hub_name: str | None = None
    hub_splits: dict[str, str] = field(default_factory=dict)
    local_files: dict[str, str] = field(default_factory=dict)
    text_field: str = "text"
    description: str = ""


def replace(spec, **changes):
    """``dataclasses.replace`` for specs (a Mistral spec is Llama's with another name)."""
    return dataclasses.replace(spec, **changes)
