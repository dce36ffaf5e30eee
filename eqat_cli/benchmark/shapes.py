"""Which layer shapes to benchmark: presets (configs of published models) or any model spec."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from eqat_cli.errors import BadInputError
from eqat_cli.model_files import load_config
from eqat_cli.models import ALIASES, classify, local_path
from eqat_cli.registry import get_registry

# Layer shapes come from model configs: a preset is the config of a published model.
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
        num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000,
    ),
    "llama-3-8b": dict(  # GQA: 8 key/value heads of 128 -> k/v project 4096 -> 1024
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256,
    ),
}
# Small shapes for tests and debugging (not advertised in the help).
DEBUG_PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=128, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=256,
    ),
}

@dataclass(frozen=True)
class LayerShape:
    """One distinct linear-layer shape of a decoder block and the layers that have it."""

    in_features: int
    out_features: int
    names: tuple[str, ...]

    @property
    def label(self) -> str:
        return ",".join(n.rpartition(".")[2] for n in self.names)


@dataclass
class ShapeSet:
    name: str
    source: str  # "preset" or "model"
    shapes: list[LayerShape]
    num_layers: int
    model: dict  # model_type, architecture, hidden/intermediate sizes, heads
    path: Optional[Path] = None  # local directory of a model spec


def _preset_config(kwargs: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**kwargs)


def shapes_from_config(config: Any, name: str, source: str, path: Path | None = None) -> ShapeSet:
    """Distinct linear shapes of one decoder block, from the config alone (no weights).

    Builds a one-block copy of the model on the meta device and reads the in/out features of
    the linear layers the registry's architecture spec lists, so any registered architecture
    works and nothing model-specific is hard-coded here.
    """
    import torch

    from eqat_cli.formats.native import model_class_for

    arch = get_registry().architecture_for(config.model_type)
    text = arch.text_config(config)
    num_layers = int(text.num_hidden_layers)
    small = copy.deepcopy(config)
    if hasattr(small, "quantization_config"):
        del small.quantization_config
    small_text = arch.text_config(small)
    small_text.num_hidden_layers = 1
    if isinstance(getattr(small_text, "layer_types", None), list):
        small_text.layer_types = small_text.layer_types[:1]
    with torch.device("meta"):
        model = model_class_for(small)._from_config(small)
    block = arch.layers(model)[0]
    by_shape: dict[tuple[int, int], list[str]] = {}
    for lname in arch.linear_names:
        mod = block.get_submodule(lname)
        by_shape.setdefault((mod.in_features, mod.out_features), []).append(lname)
    shapes = [LayerShape(k, n, tuple(names)) for (k, n), names in by_shape.items()]
    heads = getattr(text, "num_attention_heads", None)
    info = {
        "model_type": config.model_type,
        "architecture": arch.name,
        "hidden_size": getattr(text, "hidden_size", None),
        "intermediate_size": getattr(text, "intermediate_size", None),
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", heads),
        "head_dim": getattr(text, "head_dim", None),
        "num_hidden_layers": num_layers,
    }
    return ShapeSet(name, source, shapes, num_layers, info, path)


def resolve_shapes(spec: str) -> ShapeSet:
    """A preset name (``llama-2-7b``, ``llama-3-8b``) or any model spec the resolver accepts."""
    key = spec.lower()
    if key in PRESETS or key in DEBUG_PRESETS:
        cfg = _preset_config(PRESETS.get(key) or DEBUG_PRESETS[key])
        return shapes_from_config(cfg, key, "preset")
    try:
        source = classify(spec)
    except BadInputError:
        raise BadInputError(
            f"--shapes {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a model "
            f"(local directory, .gguf file, Hub repo id owner/name, or alias "
            f"{', '.join(sorted(ALIASES))})"
        ) from None
    path = local_path(source)

    config = load_config(path)
    return shapes_from_config(config, spec, "model", path)
