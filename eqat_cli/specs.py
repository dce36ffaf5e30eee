"""The spec dataclasses plugins register: architectures, kernel backends, data sets.

Specs are frozen dataclasses: an architecture is *data* (paths and layer names), not code. This
module is the bottom of the plugin side of the house: it imports nothing of eqat and nothing
heavy (no torch, no pluggy), so hook specifications, plugins and the registry can all import it
(``tests/test_registry.py`` checks both in a fresh interpreter).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


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
    # (producer, consumers) of one block where the consumers' input is the producer's output times
    # something channel-wise linear in it, and nothing else reads it: a linear (a gated MLP's
    # up_proj -> down_proj, what the built-in architectures declare), or a norm whose gain
    # multiplies its output (an RMSNorm -> q/k/v). A per-channel scale can then move from the producer into the consumers' input
    # columns without changing the block (eqat_cli.quant.scaling).
    scale_pairs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    norm_gain_offset: float = 0.0  # a norm's gain is offset + weight (Gemma: 1 + weight)
    # The residual stream, for rotations folded into the weights (eqat_cli.rotate): each
    # (norm, readers) pair names an RMSNorm of one block that reads the residual stream and the
    # linears that read its output (q/k/v; gate/up); ``residual_writers`` the linears whose output
    # is added to the residual stream as it is (o_proj, down_proj; default: every linear of
    # ``linear_groups`` that reads no norm); ``embedding_writers`` model-level linears whose output
    # enters the stream in place of token embeddings (LLaVA's projector). ``rotation_blocker``
    # says in one line why a rotation cannot be exact for this family (None: it can).
    residual_readers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    residual_writers: tuple[str, ...] = ()
    embedding_writers: tuple[str, ...] = ()
    rotation_blocker: str | None = None

    def module_key(self, checkpoint_key: str) -> str:
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
        for pair in self.scale_pairs:
            if len(pair) != 2 or not pair[1] or isinstance(pair[1], str) or not set(pair[1]) <= set(self.linear_names):
                raise ValueError(f"architecture {self.name!r}: scale pair {pair!r} is not (producer, (its linear consumers))")
        for pair in self.residual_readers:
            if len(pair) != 2 or not pair[1] or isinstance(pair[1], str) or not set(pair[1]) <= set(self.linear_names):
                raise ValueError(f"architecture {self.name!r}: residual reader {pair!r} is not (norm, (its linear readers))")
        if not set(self.residual_writers) <= set(self.linear_names):
            raise ValueError(f"architecture {self.name!r}: residual writers {self.residual_writers!r} are not its linears")

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for group in self.linear_groups for n in group)

    @property
    def rotation_writers(self) -> tuple[str, ...]:
        """The linears that write the residual stream: declared, or every linear no norm feeds."""
        if self.residual_writers:
            return self.residual_writers
        readers = {r for _, group in self.residual_readers for r in group}
        return tuple(n for n in self.linear_names if n not in readers)

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


# What a kernel's backward can give gradients for: a packed layer's step sizes (E2E-QP) and its
# float zero points (E2E-QP with ``--train-zeros``). The integer codes never train.
TRAINABLE = ("scales", "zeros")


def _ints(value: int | Iterable[int]) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


def _join(values: Iterable[Any]) -> str:
    return ", ".join(map(str, values))


def bits_label(bits: int | Iterable[int]) -> str:
    """``2`` or ``2/4`` (for messages about layers of one or several bit widths)."""
    return "/".join(map(str, _ints(bits)))


@dataclass(frozen=True)
class KernelCaps:
    """What one kernel can run, declared once beside the kernel; its backend spec carries it and
    the registry reads it.

    * ``bits``: the bit widths of the packed layers it runs;
    * ``devices``: torch device types (``cpu``, ``cuda``, ``mps``);
    * ``group_sizes``: the group lengths it runs (``-1`` is per-channel), or ``None`` for every
      one the packed format allows (per-channel, or any length of at least 2 with a shorter
      last group);
    * ``backward``: the tensors of a packed layer its backward gives gradients for (a subset of
      :data:`TRAINABLE`): ``("scales",)`` is what E2E-QP needs, ``("scales", "zeros")`` what it
      needs with ``--train-zeros``; ``()`` for an inference-only kernel.
    """

    bits: tuple[int, ...]
    devices: tuple[str, ...]
    group_sizes: tuple[int, ...] | None = None
    backward: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("bits", "devices", "group_sizes", "backward"):
            value = getattr(self, name)
            if not isinstance(value, tuple) and not (name == "group_sizes" and value is None):
                raise TypeError(f"KernelCaps.{name} must be a tuple, got {value!r}")
        if not self.bits or not self.devices:
            raise ValueError("KernelCaps declares no bits or no devices")
        unknown = [t for t in self.backward if t not in TRAINABLE]
        if unknown:
            raise ValueError(
                f"KernelCaps.backward names {_join(unknown)}; trainable tensors are {_join(TRAINABLE)}"
            )

    def rejects(
        self,
        bits: int | Iterable[int],
        device: str,
        group_size: int | Iterable[int] | None = None,
        trains: Iterable[str] = (),
    ) -> str | None:
        """Why this kernel cannot run (``trains`` empty) or train layers of these bit widths and
        group sizes on ``device``; ``None`` when it can. ``group_size=None`` leaves groups out of
        the question. Plain ints (one or a model's set): this module imports nothing of eqat, so
        it does not know :class:`eqat_cli.scheme.QuantScheme`."""
        if device not in self.devices:
            return f"runs on {_join(self.devices)}, not {device}"
        for b in _ints(bits):
            if b not in self.bits:
                return f"supports bits {_join(self.bits)}, not {b}"
        if group_size is not None and self.group_sizes is not None:
            for g in _ints(group_size):
                if g not in self.group_sizes:
                    return f"supports group sizes {_join(self.group_sizes)}, not {g}"
        missing = [t for t in trains if t not in self.backward]
        if missing:
            if not self.backward:
                return "has no backward (inference only)"
            return f"its backward gives gradients for {_join(self.backward)}, not {_join(missing)}"
        return None


@dataclass(frozen=True)
class BackendSpec:
    """A kernel backend for packed layers.

    ``caps`` is the kernel's own :class:`KernelCaps` declaration (bits, group sizes, devices,
    backward), not a copy of it. ``available()`` returns ``(ok, reason)`` (is the optional
    package installed, is there a GPU); ``kernel()`` builds the object whose ``forward(layer, x)``
    runs a :class:`~eqat_cli.quant.linear.PackedLinear`. Both import heavy packages only when
    called.
    """

    name: str
    priority: int
    caps: KernelCaps
    available: Callable[[], tuple[bool, str]]
    kernel: Callable[[], Any]
    install_hint: str = ""
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.caps, KernelCaps):
            raise TypeError(
                f"backend {self.name!r}: caps must be a KernelCaps, got {type(self.caps).__name__}"
            )

    @property
    def devices(self) -> tuple[str, ...]:
        return self.caps.devices

    @property
    def bits(self) -> tuple[int, ...]:
        return self.caps.bits

    def supports(
        self,
        bits: int | Iterable[int],
        device: str,
        group_size: int | Iterable[int] | None = None,
        trains: Iterable[str] = (),
    ) -> tuple[bool, str]:
        """Whether this backend can run (or, with ``trains``, train) such layers here, and why."""
        reason = self.caps.rejects(bits, device, group_size, trains)
        if reason is not None:
            return False, reason
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
