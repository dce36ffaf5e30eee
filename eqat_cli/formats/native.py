"""The EfficientQAT native checkpoint layout (``ChenMnZ/*-EfficientQAT-w{b}g{g}``), read and write.

Every quantized linear ``X`` is stored as ``X.qweight``, ``X.qzeros`` (raw zeros), ``X.scales``
(fp16) and ``X.g_idx``; everything else (embeddings, norms, head) is stored in fp16. eqat adds an
``eqat`` section to ``config.json`` (:class:`~eqat_cli.formats.meta.CheckpointMeta`) recording
bits, group size, architecture and how the checkpoint was made; loading reads bits and group size
from it, and detects them from tensor shapes only for releases without that section.

:class:`NativeWriter` is the one writer of the layout, shard by shard: :func:`save_native` (a
model in memory) and Block-AP (one decoder block at a time, resumable) both use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eqat_cli.errors import BadInputError, UnsupportedError
from eqat_cli.formats.checkpoint import Checkpoint, read_safetensors_header
from eqat_cli.formats.detect import layer_quant, quantized_layer_names
from eqat_cli.formats.meta import FORMAT_VERSION, CheckpointMeta  # noqa: F401 - FORMAT_VERSION re-exported
from eqat_cli.formats.shards import write_index
from eqat_cli.fsutil import atomic_file
from eqat_cli.model_files import hf_load
from eqat_cli.quant import packing
from eqat_cli.quant.kquant import install_kquant_layers
from eqat_cli.quant.linear import PackedLinear, set_submodule
from eqat_cli.readers import reading
from eqat_cli.scheme import QuantScheme

FORMAT_NAME = "eqat"
SHARD_BYTES = 4 * 1024**3
SHARD_METADATA = {"format": "pt"}


# ---------------------------------------------------------------------- helpers


def model_class_for(config: Any):
    """The transformers class a config's ``architectures`` names (fallback: causal LM)."""
    import transformers
    from transformers.models.auto import modeling_auto as ma

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    for mapping in (ma.MODEL_FOR_CAUSAL_LM_MAPPING, ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING):
        if type(config) in mapping:
            return mapping[type(config)]
    raise BadInputError(f"no transformers model class for model_type {config.model_type!r}")


def eqat_section(path: str | os.PathLike) -> dict | None:
    """The raw ``eqat`` section of ``path``'s ``config.json`` (prefer ``Checkpoint.open(path).meta``)."""
    meta = Checkpoint.open(path).meta
    return meta.to_dict() if meta is not None else None


# ---------------------------------------------------------------------- write


def packed_state_dict(model: nn.Module, storage_dtype: torch.dtype = torch.float16) -> dict:
    """State dict in the native layout: packed layers as-is (fp16 scales), the rest in fp16."""
    sd: dict[str, torch.Tensor] = {}
    packed_prefixes = []
    for name, mod in model.named_modules():
        if isinstance(mod, PackedLinear):
            packed_prefixes.append(name + ".")
            sd[f"{name}.qweight"] = mod.qweight.detach().contiguous()
            sd[f"{name}.qzeros"] = mod.qzeros.detach().contiguous()
            sd[f"{name}.scales"] = mod.scales.detach().to(torch.float16).contiguous()
            sd[f"{name}.g_idx"] = mod.g_idx.detach().contiguous()
            if mod.bias is not None:
                sd[f"{name}.bias"] = mod.bias.detach().to(torch.float16).contiguous()
    seen_ptrs = {}
    for key, t in model.state_dict().items():
        if any(key.startswith(p) for p in packed_prefixes):
            continue
        # Tied weights (e.g. lm_head = embed_tokens) are stored once.
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ptr in seen_ptrs:
            continue
        seen_ptrs[ptr] = key
        t = t.detach()
        if t.is_floating_point():
            t = t.to(storage_dtype)
        sd[key] = t.contiguous()
    return sd


def shard_name(i: int, n: int) -> str:
    """``model-0000i-of-0000n.safetensors`` (``i`` counted from 0)."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors shard, atomically (a resumed run never sees half a file)."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=SHARD_METADATA)


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class NativeWriter:
    """Writes a checkpoint in the native layout into ``directory`` (a temporary or work directory
    that the caller moves into place), streaming: shards one at a time, then the index, then
    ``config.json`` with its ``eqat`` section and the sidecars.

    ``add`` writes a shard and records its tensors; ``adopt`` records a shard already on disk
    (Block-AP's finished blocks, possibly from an earlier, interrupted run) from its header.
    ``finish`` writes the index (when there is more than one shard) and the rest."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0  # tensor data bytes (the index's ``total_size``, as transformers counts)
        self.shards: list[str] = []

    def add(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        write_shard(self.dir / name, tensors)
        self._record(name, {k: tensor_bytes({k: v}) for k, v in tensors.items()})

    def adopt(self, name: str) -> None:
        header = read_safetensors_header(self.dir / name)
        self._record(name, {k: t.nbytes for k, t in header.items()})

    def _record(self, name: str, sizes: dict[str, int]) -> None:
        self.shards.append(name)
        self.weight_map.update({k: name for k in sizes})
        self.total_bytes += sum(sizes.values())

    def add_sharded(self, sd: dict[str, torch.Tensor], max_shard_bytes: int = SHARD_BYTES) -> None:
        """A whole state dict: one ``model.safetensors`` when it fits ``max_shard_bytes``, else
        consecutive shards of at most that size (a tensor larger than it gets a shard of its own)."""
        if tensor_bytes(sd) <= max_shard_bytes:
            self.add("model.safetensors", sd)
            return
        shards, cur, cur_bytes = [], {}, 0
        for k, v in sd.items():
            nb = v.numel() * v.element_size()
            if cur and cur_bytes + nb > max_shard_bytes:
                shards.append(cur)
                cur, cur_bytes = {}, 0
            cur[k] = v
            cur_bytes += nb
        shards.append(cur)
        for i, shard in enumerate(shards):
            self.add(shard_name(i, len(shards)), shard)

    def finish(self, config: dict, tokenizer: Any = None, generation: Any = None,
               extra_files: dict[str, str] | None = None) -> None:
        """The index (several shards), ``config.json``, the generation config (a
        ``GenerationConfig``, or the path of a ``generation_config.json`` to copy), the tokenizer
        and ``extra_files`` (name -> text)."""
        if len(self.shards) > 1:
            write_index(self.dir, self.weight_map, self.total_bytes)
        (self.dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if isinstance(generation, (str, os.PathLike)):
            if Path(generation).exists():
                import shutil

                shutil.copy(generation, self.dir / "generation_config.json")
        elif generation is not None:
            generation.save_pretrained(str(self.dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.dir))
        for name, text in (extra_files or {}).items():
            (self.dir / name).write_text(text)


def save_state_dict_sharded(sd: dict, out_dir: Path, max_shard_bytes: int = SHARD_BYTES) -> NativeWriter:
    """Write ``sd`` as ``model.safetensors`` or shards plus the index; returns the writer (its
    ``finish`` writes the sidecars)."""
    w = NativeWriter(out_dir)
    w.add_sharded(sd, max_shard_bytes)
    if len(w.shards) > 1:
        write_index(w.dir, w.weight_map, w.total_bytes)
    return w


def config_dict_for_save(config: Any, eqat_meta: CheckpointMeta | dict | None) -> dict:
    """``config.json`` of a written checkpoint: the model's config in fp16, no
    ``quantization_config``, and the ``eqat`` section when given."""
    d = config.to_dict()
    d.pop("quantization_config", None)
    d["dtype"] = "float16"
    if eqat_meta is not None:
        if not isinstance(eqat_meta, CheckpointMeta):
            eqat_meta = CheckpointMeta().updated(eqat_meta)
        d[FORMAT_NAME] = eqat_meta.to_dict()
    return d


def save_native(
    model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, eqat_meta: CheckpointMeta | dict
) -> None:
    """Write a packed model into ``out_dir`` (an existing, empty, temporary directory).

    ``eqat_meta`` is the ``eqat`` section (a dict is read as one, as :meth:`CheckpointMeta.updated`
    reads it)."""
    w = NativeWriter(out_dir)
    w.add_sharded(packed_state_dict(model))
    w.finish(config_dict_for_save(model.config, eqat_meta), tokenizer, getattr(model, "generation_config", None))


def write_sidecars(model: nn.Module, tokenizer: Any, out: Path, config: dict) -> None:
    """``config.json``, generation config and tokenizer beside the weights (formats whose weights
    were written with :func:`save_state_dict_sharded`)."""
    w = NativeWriter(out)
    w.finish(config, tokenizer, getattr(model, "generation_config", None))


# ---------------------------------------------------------------------- read


def load_state(path: Path | Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's shards (the headers were validated when it was opened)."""
    from safetensors.torch import load_file

    ckpt = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
    sd = {}
    for f in ckpt.weight_files():
        with reading(f, "safetensors weight shard"):
            sd.update(load_file(str(f)))
    return sd


def build_skeleton(config: Any) -> nn.Module:
    """The model with parameters on the meta device and real buffers (rotary tables)."""
    from accelerate import init_empty_weights

    cls = model_class_for(config)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config)
    return model


def install_packed_layers(
    model: nn.Module, sd: dict[str, torch.Tensor], zero_offset: int = 0, gptq3: bool = False,
    declared: QuantScheme | None = None, modules: dict[str, QuantScheme] | None = None,
    gptq_layout: bool = False,
) -> dict[str, QuantScheme]:
    """Replace every ``nn.Linear`` that has a ``qweight`` in ``sd`` by a loaded PackedLinear.

    ``zero_offset`` is added to stored zeros (GPTQ v1 stores ``z - 1``); ``gptq3`` reads GPTQ's
    3-bit packing; ``declared`` is the scheme the checkpoint records (checked against each layer's
    shapes; without it they are inferred); ``modules`` the per-layer schemes of a mixed-precision
    checkpoint (they override ``declared``; with ``gptq_layout`` a layer's 3-bit packing follows its
    own width). Consumes the quantized tensors from ``sd``. Returns ``{name: its QuantScheme}``.
    """
    found = {}
    for name in quantized_layer_names(sd.keys()):
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise BadInputError(f"{name} holds packed weights but is not a linear layer")
        qweight, qzeros, scales = sd.pop(f"{name}.qweight"), sd.pop(f"{name}.qzeros"), sd.pop(f"{name}.scales")
        g_idx = sd.pop(f"{name}.g_idx", None)
        bias = sd.pop(f"{name}.bias", None)
        hint = int((g_idx == 0).sum()) if g_idx is not None and g_idx.numel() == lin.in_features else None
        own = (modules or {}).get(name)
        layer_gptq3 = (own.bits == 3) if (own is not None and gptq_layout) else gptq3
        lq = layer_quant(name, qweight.shape, qzeros.shape, scales.shape, lin.in_features, lin.out_features,
                         group_hint=hint, gptq3=layer_gptq3, declared=own or declared)
        bits, group = lq.bits, lq.group_size
        if layer_gptq3:
            codes = packing.unpack_rows_gptq3(qweight, lin.in_features)
            zeros = packing.unpack_cols_gptq3(qzeros, lin.out_features)
        else:
            codes = packing.unpack_rows(qweight, bits, lin.in_features)
            zeros = packing.unpack_cols(qzeros, bits, lin.out_features)
        if g_idx is not None:
            expected = torch.arange(lin.in_features, dtype=torch.int32) // (
                lin.in_features if group == -1 else group
            )
            if not torch.equal(g_idx.to(torch.int32), expected):
                raise UnsupportedError(
                    f"{name}: act-order (non-sequential g_idx) checkpoints are not supported"
                )
        zeros = zeros + zero_offset
        if int(zeros.min()) < 0 or int(zeros.max()) > 2**bits - 1:
            raise BadInputError(f"{name}: zero points out of range after offset {zero_offset}")
        layer = PackedLinear.from_codes(
            codes.t(), scales.t().float(), zeros.t(), lq.scheme, bias=bias, scales_dtype=torch.float16
        )
        set_submodule(model, name, layer)
        found[name] = lq.scheme
    return found


def load_packed_model(
    path: str | os.PathLike | Checkpoint,
    dtype: torch.dtype = torch.float32,
    zero_offset: int | None = None,
    gptq3: bool | None = None,
) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
    """Load a packed checkpoint (native or GPTQ-style tensors) into a transformers model.

    ``path`` may be an open :class:`Checkpoint` (nothing is read twice); ``zero_offset`` and
    ``gptq3`` default to what its layout says. Bits and group size come from the ``eqat`` section
    when eqat wrote one, else from the tensor shapes."""
    from transformers import AutoConfig

    ckpt = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
    path = ckpt.path
    layout = ckpt.layout
    zero_offset = layout.zero_offset if zero_offset is None else zero_offset
    gptq3 = layout.gptq3 if gptq3 is None else gptq3
    config = hf_load(AutoConfig.from_pretrained, path, "model config")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = build_skeleton(config)
    sd = load_state(ckpt)
    layers = install_packed_layers(model, sd, zero_offset=zero_offset, gptq3=gptq3, declared=ckpt.declared_scheme,
                                   modules=ckpt.declared_modules, gptq_layout=layout.format in ("gptq", "gptq_v2"))
    model.eqat_kquant = install_kquant_layers(model, sd)  # layers trained on a GGML grid (--target)
    if not layers and not model.eqat_kquant:
        raise BadInputError(f"{path} holds no packed (qweight) layers")
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.unexpected_keys:
        raise BadInputError(f"{path}: unexpected tensors {result.unexpected_keys[:5]}")
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise BadInputError(f"{path}: missing tensors {still_meta[:5]}")
    model.eval()
    return model, layers
