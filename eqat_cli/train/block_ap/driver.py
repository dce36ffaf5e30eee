"""The Block-AP driver: block by block through the model, resumable, writing a packed checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eqat_cli.errors import BadInputError
from eqat_cli.memory import peak_rss_bytes, release_memory
from eqat_cli.quant.primitives import check_bits
from eqat_cli.quantize import pack_block
from eqat_cli.formats.shards import ShardReader, write_index
from eqat_cli.train.block_ap.blockio import ActivationStore, eval_block_loss, forward_all, load_into
from eqat_cli.train.block_ap.config import BlockAPConfig, Progress, legacy_defaults, no_progress
from eqat_cli.train.block_ap.start import quantize_block_start
from eqat_cli.train.block_ap.train import check_keep_best, train_block

STATE_FILE = "blockap_state.json"
WORK_SUFFIX = ".partial"


def _same_run(old: dict | None, new: dict) -> bool:
    """Whether a work directory's run key describes this run. Options added in a later eqat
    version are missing from an older key; they count as the behaviour they had before they
    existed (:func:`legacy_defaults`), so upgrading eqat in the middle of a run does not throw
    finished blocks away."""
    if not old or not isinstance(old.get("config"), dict):
        return False
    defaults = legacy_defaults()
    return {**old, "config": {**defaults, **old["config"]}} == new


# ---------------------------------------------------------------------- driver


@dataclass
class BlockAPResult:
    output: Path
    blocks: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    peak_rss_mb: float = 0.0


def _block_file(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors"


def _save_block(block: nn.Module, prefix: str, path: Path) -> None:
    from safetensors.torch import save_file

    from eqat_cli.formats.native import packed_state_dict
    from eqat_cli.fsutil import atomic_file

    sd = {prefix + k: v for k, v in packed_state_dict(block).items()}
    with atomic_file(path) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})


def _round_like_saved(block: nn.Module) -> None:
    """Round the block's dense parameters to fp16 as the checkpoint stores them, so the quantized
    chain (and a resumed run, which reloads the file) sees exactly what inference will see."""
    with torch.no_grad():
        for p in block.parameters():
            if p.is_floating_point():
                p.copy_(p.half())


def _packed_block_from_file(block: nn.Module, prefix: str, path: Path, dtype) -> nn.Module:
    """Rebuild a finished block (packed layers + fp params) from its saved shard."""
    from eqat_cli.formats.native import install_packed_layers
    from eqat_cli.readers import load_safetensors

    sd = {k[len(prefix):]: v for k, v in load_safetensors(path, "finished block file").items()}
    install_packed_layers(block, sd)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    load_into(block, sd, f"finished block file {path.name}")
    return block


def run_block_ap(
    model_path: Path,
    tokenizer: Any,
    calib_train: torch.Tensor,
    calib_val: torch.Tensor,
    cfg: BlockAPConfig,
    output: Path,
    device: torch.device,
    extra_meta: dict | None = None,
    progress: Progress = no_progress,
    resume: bool = True,
    overwrite: bool = False,
) -> BlockAPResult:
    """Quantize the full-precision model at ``model_path`` and write a packed checkpoint."""
    from eqat_cli.formats.native import build_skeleton, config_dict_for_save
    from eqat_cli.readers import load_config, read_json
    from eqat_cli.registry import get_registry

    check_bits(cfg.bits)
    check_keep_best(cfg, calib_val.shape[0])
    t0 = time.time()
    output = Path(output)
    if output.exists():
        if not overwrite:
            raise BadInputError(f"output {output} already exists (pass --overwrite to replace it)")
    work = output.with_name(output.name + WORK_SUFFIX)
    config = load_config(model_path)
    if getattr(config, "quantization_config", None) is not None:
        raise BadInputError(f"{model_path} is already quantized; Block-AP needs a full-precision model")
    arch = get_registry().architecture_for(config.model_type)
    model = build_skeleton(config)
    layers = arch.layers(model)
    n_layers = len(layers)
    reader = ShardReader(model_path, arch)
    act_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16

    # Resume bookkeeping: the work dir records the config; a different config starts over.
    run_key = {"config": cfg.to_json(), "model": str(model_path), "calib_shape": list(calib_train.shape),
               "calib_sum": int(calib_train.sum()), "val_shape": list(calib_val.shape)}
    state_path = work / STATE_FILE
    state = {"finished": [], "blocks": []}
    if work.exists() and resume and state_path.exists():
        old = read_json(state_path, "Block-AP resume state")
        if _same_run(old.get("run_key"), run_key):
            state = old
        else:
            shutil.rmtree(work)
    elif work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    state["run_key"] = run_key
    resumed_from = len(state["finished"])

    # Embed the calibration tokens.
    embed = arch.embed(model)
    load_into(embed, reader.read(arch.embed_path + ".", torch.float32), "embeddings")
    hidden = arch.text_config(config).hidden_size
    n, seqlen = calib_train.shape
    m = calib_val.shape[0]
    disk = work / "activations" if cfg.offload_to_disk else None
    def store(name, rows):
        return ActivationStore((rows, seqlen, hidden), act_dtype, None if disk is None else disk / f"{name}.bin")
    fp_in, q_in, fp_out = store("fp_in", n), store("q_in", n), store("fp_out", n)
    fp_in_v, q_in_v, fp_out_v = store("fp_in_val", m), store("q_in_val", m), store("fp_out_val", m)
    with torch.no_grad():
        for s in range(0, n, 8):
            fp_in.data[s : s + 8] = embed(calib_train[s : s + 8]).to(act_dtype)
        for s in range(0, m, 8):
            fp_in_v.data[s : s + 8] = embed(calib_val[s : s + 8]).to(act_dtype)
    q_in.data.copy_(fp_in.data)
    q_in_v.data.copy_(fp_in_v.data)
    embed.to_empty(device="meta")

    rotary = arch.rotary(model)
    rotary.to(device)
    fwd_batch = max(cfg.batch_size, 1)
    for i in range(n_layers):
        prefix = arch.layer_prefix(i)
        block_path = work / _block_file(i, n_layers)
        block = layers[i]
        progress("block_start", {"block": i, "blocks": n_layers, "resumed": i < resumed_from})
        tb = time.time()
        # Full-precision weights of this block only.
        load_into(block, reader.read(prefix, torch.float32), f"block {i}")
        block.to(device)
        # FP targets from FP inputs (fp_out); FP chain continues with them.
        forward_all(block, model, arch, fp_in.data, fp_out.data, fwd_batch, device, torch.float32)
        forward_all(block, model, arch, fp_in_v.data, fp_out_v.data, fwd_batch, device, torch.float32)
        if i < resumed_from and block_path.exists():
            block = _packed_block_from_file(block, prefix, block_path, torch.float32).to(device)
            info = state["blocks"][i]
        else:
            # GPTQ Hessians from the quantized chain's inputs, as the block will see them.
            quantize_block_start(block, model, arch, cfg, q_in.data, fwd_batch, device)
            block.to(device)
            def current_loss(blk) -> float:
                """Validation loss of ``blk``; without validation windows, a train slice."""
                if len(q_in_v):
                    return eval_block_loss(blk, model, arch, q_in_v.data, fp_out_v.data, fwd_batch,
                                           device, torch.float32, cfg.loss)
                k = fwd_batch * 4
                return eval_block_loss(blk, model, arch, q_in.data[:k], fp_out.data[:k], fwd_batch,
                                       device, torch.float32, cfg.loss)

            before = current_loss(block)
            history = {"train_loss": [], "val_loss": []}
            if cfg.trains:
                history = train_block(block, model, arch, i, cfg, q_in.data, fp_out.data,
                                      q_in_v.data, fp_out_v.data, device, progress,
                                      start_val=before if len(q_in_v) else None)
            pack_block(block)
            _round_like_saved(block)
            block.to(device)
            after = current_loss(block)
            _save_block(block.cpu(), prefix, block_path)
            block.to(device)
            info = {"block": i, "loss_before": before, "loss_after": after,
                    "history": history, "seconds": round(time.time() - tb, 2)}
            state["blocks"] = state["blocks"][:i] + [info]
            state["finished"] = list(range(i + 1))
            from eqat_cli.fsutil import write_json_atomic

            write_json_atomic(state_path, state)
        # Quantized chain: outputs of the packed block become the next inputs.
        forward_all(block, model, arch, q_in.data, q_in.data, fwd_batch, device, torch.float32)
        forward_all(block, model, arch, q_in_v.data, q_in_v.data, fwd_batch, device, torch.float32)
        fp_in, fp_out = fp_out, fp_in
        fp_in_v, fp_out_v = fp_out_v, fp_in_v
        # Free the block: back to meta, nothing of it stays in memory.
        layers[i] = block.to("meta")
        del block
        release_memory()
        progress("block_end", info)

    # Everything outside the decoder blocks (embeddings, final norm, head, vision tower) in fp16.
    from safetensors.torch import save_file

    from eqat_cli.fsutil import atomic_file

    rest = reader.read("", torch.float16, exclude=arch.layers_path + ".")
    rest_file = _block_file(n_layers, n_layers)
    with atomic_file(work / rest_file) as tmp:
        save_file(rest, str(tmp), metadata={"format": "pt"})
    weight_map = {k: rest_file for k in rest}
    from eqat_cli.readers import open_safetensors

    for i in range(n_layers):
        with open_safetensors(work / _block_file(i, n_layers), "finished block file") as fh:
            for k in fh.keys():
                weight_map[k] = _block_file(i, n_layers)
    total = sum(f.stat().st_size for f in work.glob("model-*.safetensors"))
    write_index(work, weight_map, total)
    meta = {"bits": cfg.bits, "group_size": cfg.group_size, "architecture": arch.name,
            "method": "block-ap" if cfg.trains else ("gptq" if cfg.init == "gptq" else "rtn"), "block_ap": cfg.to_json(),
            "source_model": str(model_path), **(extra_meta or {})}
    (work / "config.json").write_text(json.dumps(config_dict_for_save(config, meta), indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(work))
    gen_cfg = model_path / "generation_config.json"
    if gen_cfg.exists():
        shutil.copy(gen_cfg, work / "generation_config.json")
    (work / "blockap_summary.json").write_text(json.dumps(state["blocks"], indent=2))
    state_path.unlink()
    if disk is not None:
        shutil.rmtree(disk, ignore_errors=True)
    if output.exists():
        shutil.rmtree(output)
    os.replace(work, output)
    return BlockAPResult(output, state["blocks"], time.time() - t0, resumed_from,
                         round(peak_rss_bytes() / 2**20, 1))
