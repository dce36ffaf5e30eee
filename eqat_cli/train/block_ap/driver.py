"""The Block-AP driver: block by block through the model, resumable, writing a packed checkpoint.

:func:`run_block_ap` is a sequence of named steps: check the inputs, open the source model (a
meta-device skeleton and a shard reader), resume or start the work directory, embed the
calibration windows, quantize the blocks one by one, write the rest of the checkpoint, and move
the work directory into place, all under the output's lock. The skeleton of the run (lock, output
check, work directory, run key, atomic state writes) is :mod:`eqat_cli.train.runs`, shared with
E2E-QP. The state the steps share lives in three small objects: :class:`_Source` (the model being
read), :class:`_WorkDir` (the resumable work directory) and :class:`_Activations` (the six
activation stores of the full-precision and quantized chains).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eqat_cli.errors import BadInputError
from eqat_cli.formats.meta import CheckpointMeta
from eqat_cli.formats.native import (
    NativeWriter, build_skeleton, config_dict_for_save, install_packed_layers, packed_state_dict, shard_name,
    write_shard,
)
from eqat_cli.formats.shards import ShardReader
from eqat_cli.fsutil import replace_dir
from eqat_cli.memory import peak_rss_bytes, release_memory
from eqat_cli.model_files import load_config
from eqat_cli.quantize import pack_block
from eqat_cli.quant.kquant import install_kquant_layers
from eqat_cli.readers import load_safetensors
from eqat_cli.registry import get_registry
from eqat_cli.scheme import QuantScheme
from eqat_cli.train.block_ap.blockio import ActivationStore, eval_block_loss, forward_all, load_into
from eqat_cli.train.block_ap.config import BlockAPConfig, Progress, legacy_defaults, no_progress
from eqat_cli.train.block_ap.start import quantize_block_start, scale_block_pairs
from eqat_cli.train.block_ap.train import check_keep_best, train_block
from eqat_cli.train.block_ap.mixed import Allocation, block_schemes, plan_mixed
from eqat_cli.train.runs import WORK_SUFFIX, WorkDir, check_new_output, read_json_state, run_lock, work_dir_for  # noqa: F401 (WORK_SUFFIX re-exported)

STATE_FILE = "blockap_state.json"


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
    config: BlockAPConfig | None = None  # the recipe as it ran (param="auto" resolved)


def _block_file(i: int, n: int) -> str:
    return shard_name(i, n + 1)


def _save_block(block: nn.Module, prefix: str, path: Path) -> None:
    """A finished block's shard, in the native layout, written atomically (resume relies on it)."""
    write_shard(path, {prefix + k: v for k, v in packed_state_dict(block).items()})


def _round_like_saved(block: nn.Module) -> None:
    """Round the block's dense parameters to fp16 as the checkpoint stores them, so the quantized
    chain (and a resumed run, which reloads the file) sees exactly what inference will see."""
    with torch.no_grad():
        for p in block.parameters():
            if p.is_floating_point():
                p.copy_(p.half())


def _packed_block_from_file(block: nn.Module, prefix: str, path: Path, dtype) -> nn.Module:
    """Rebuild a finished block (packed layers + fp params) from its saved shard."""
    sd = {k[len(prefix):]: v for k, v in load_safetensors(path, "finished block file").items()}
    install_packed_layers(block, sd)
    install_kquant_layers(block, sd)
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
    """Quantize the full-precision model at ``model_path`` and write a packed checkpoint.

    Holds the output's lock for the run (a no-op inside :func:`block_ap_from_spec`, which took it);
    another process writing the same output is refused (:class:`~eqat_cli.errors.OutputBusyError`).
    """
    output = Path(output)
    with run_lock(output, progress=progress):
        _check_inputs(cfg, calib_val, output, overwrite)
        cfg = cfg.resolve(calib_train.shape[0])  # param="auto" -> round/free by the steps per block
        t0 = time.time()
        src = _open_source(model_path, cfg, device)
        work = _resume_or_start(work_dir_for(output), _run_key(cfg, model_path, calib_train, calib_val), resume)
        acts = _embed_windows(src, calib_train, calib_val, work.activations_dir(cfg))
        src.schemes = _mixed_schemes(src, acts, work, progress)
        _quantize_blocks(src, acts, work, progress)
        _write_checkpoint(src, work, tokenizer, extra_meta)
        _move_into_place(work, acts, output)
    return BlockAPResult(output, work.state["blocks"], time.time() - t0, work.resumed_from,
                         round(peak_rss_bytes() / 2**20, 1), cfg)


# ---------------------------------------------------------------------- the steps


def _check_inputs(cfg: BlockAPConfig, calib_val: torch.Tensor, output: Path, overwrite: bool) -> None:
    """Fail on a bad recipe or an existing output before anything is read or written (bits and
    group size were validated with the config, through ``QuantScheme``)."""
    check_keep_best(cfg, calib_val.shape[0])
    check_new_output(output, overwrite)


@dataclass
class _Source:
    """The full-precision model being quantized: its config, a meta-device skeleton (one block is
    real at a time), the reader of its shards, and how blocks run on the device."""

    path: Path
    config: Any
    arch: Any
    model: nn.Module
    layers: Any  # the skeleton's decoder blocks
    reader: ShardReader
    cfg: BlockAPConfig
    device: torch.device
    schemes: dict | None = None  # mixed precision (--avg-bits): module path -> QuantScheme

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def act_dtype(self) -> torch.dtype:
        return torch.float32 if self.device.type == "cpu" else torch.bfloat16

    @property
    def fwd_batch(self) -> int:
        return max(self.cfg.batch_size, 1)

    def forward(self, block: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        forward_all(block, self.model, self.arch, inputs, outputs, self.fwd_batch, self.device, torch.float32)


def _open_source(model_path: Path, cfg: BlockAPConfig, device: torch.device) -> _Source:
    """Read the config (refusing a quantized model), find the architecture, build the skeleton."""
    config = load_config(model_path)
    if getattr(config, "quantization_config", None) is not None:
        raise BadInputError(f"{model_path} is already quantized; Block-AP needs a full-precision model")
    arch = get_registry().architecture_for(config.model_type)
    model = build_skeleton(config)
    return _Source(model_path, config, arch, model, arch.layers(model), ShardReader(model_path, arch), cfg, device)


def _run_key(cfg: BlockAPConfig, model_path: Path, calib_train: torch.Tensor, calib_val: torch.Tensor) -> dict:
    """What a work directory must match to be resumed: the recipe, the model and the windows."""
    config = {k: v for k, v in cfg.to_json().items() if k != "param_auto"}  # how it was chosen: same run
    return {"config": config, "model": str(model_path), "calib_shape": list(calib_train.shape),
            "calib_sum": int(calib_train.sum()), "val_shape": list(calib_val.shape)}


@dataclass
class _WorkDir(WorkDir):
    """The work directory beside the output: finished block files and the resume state."""

    state: dict = field(default_factory=dict)  # run_key, finished (block indices), blocks (summaries)
    resumed_from: int = 0  # blocks finished by an earlier run

    def activations_dir(self, cfg: BlockAPConfig) -> Path | None:
        return self.path / "activations" if cfg.offload_to_disk else None

    def record(self, i: int, info: dict) -> None:
        """Block ``i`` is finished (its file written): save the resume state atomically."""
        self.state["blocks"] = self.state["blocks"][:i] + [info]
        self.state["finished"] = list(range(i + 1))
        self.save_json(self.state)


def _resume_or_start(work: Path, run_key: dict, resume: bool) -> _WorkDir:
    """Resume bookkeeping: the work dir records the config; a different config starts over."""
    wd = _WorkDir(work, STATE_FILE)
    state = wd.previous(resume, lambda p: read_json_state(p, "Block-AP resume state"),
                        lambda old: _same_run(old.get("run_key"), run_key))
    if state is None:
        wd.clear()
        state = {"finished": [], "blocks": []}
    wd.create()
    state["run_key"] = run_key
    wd.state, wd.resumed_from = state, len(state["finished"])
    return wd


@dataclass
class _Activations:
    """Inputs and targets of the current block, for the training and the validation windows:
    the full-precision chain (``fp_in`` -> ``fp_out``) and the quantized chain (``q_in``)."""

    fp_in: ActivationStore
    q_in: ActivationStore
    fp_out: ActivationStore
    fp_in_v: ActivationStore
    q_in_v: ActivationStore
    fp_out_v: ActivationStore
    disk: Path | None  # where they are memory-mapped (offload_to_disk), else None

    def next_block(self) -> None:
        """This block's full-precision outputs are the next block's inputs."""
        self.fp_in, self.fp_out = self.fp_out, self.fp_in
        self.fp_in_v, self.fp_out_v = self.fp_out_v, self.fp_in_v


def _embed_windows(src: _Source, calib_train: torch.Tensor, calib_val: torch.Tensor, disk: Path | None) -> _Activations:
    """Embed the calibration tokens: the first inputs of both chains; then drop the embeddings."""
    arch, model, act_dtype = src.arch, src.model, src.act_dtype
    embed = arch.embed(model)
    load_into(embed, src.reader.read(arch.embed_path + ".", torch.float32), "embeddings")
    hidden = arch.text_config(src.config).hidden_size
    n, seqlen = calib_train.shape
    m = calib_val.shape[0]
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
    return _Activations(fp_in, q_in, fp_out, fp_in_v, q_in_v, fp_out_v, disk)


MIXED_KEY = "mixed"  # the allocation in the resume state (measured once per run)


def _mixed_schemes(src: _Source, acts: _Activations, work: _WorkDir, progress: Progress) -> dict | None:
    """With ``--avg-bits``: the width of every linear, from the resume state or measured now on the
    full-precision chain (:func:`eqat_cli.train.block_ap.mixed.plan_mixed`) and saved in it."""
    cfg = src.cfg
    if cfg.avg_bits is None:
        return None
    saved = work.state.get(MIXED_KEY)
    if saved is None:
        alloc = plan_mixed(src.model, src.arch, src.layers, src.reader, acts.fp_in.data, cfg.avg_bits,
                           cfg.group_size, src.device, src.fwd_batch, cfg.loss, progress=progress)
        work.state[MIXED_KEY] = saved = alloc.to_json()
        work.save_json(work.state)
    alloc = Allocation.from_json(saved)
    progress("mixed", {"avg_bits": cfg.avg_bits, "code_bits": alloc.code_bits, "histogram": alloc.histogram()})
    return alloc.schemes


def _quantize_blocks(src: _Source, acts: _Activations, work: _WorkDir, progress: Progress) -> None:
    """Every decoder block in order, each freed (and its memory returned) before the next."""
    src.arch.rotary(src.model).to(src.device)
    for i in range(src.n_layers):
        progress("block_start", {"block": i, "blocks": src.n_layers, "resumed": i < work.resumed_from})
        info = _quantize_block(i, src, acts, work, progress)
        release_memory()
        progress("block_end", info)


def _quantize_block(i: int, src: _Source, acts: _Activations, work: _WorkDir, progress: Progress) -> dict:
    """One block: full-precision targets, then the packed block (from its file when resumed, else
    started, trained and saved), then the quantized chain moves on. Returns the block's summary."""
    prefix = src.arch.layer_prefix(i)
    block_path = work.path / _block_file(i, src.n_layers)
    block = src.layers[i]
    tb = time.time()
    # Full-precision weights of this block only.
    load_into(block, src.reader.read(prefix, torch.float32), f"block {i}")
    block.to(src.device)
    # FP targets from FP inputs (fp_out); FP chain continues with them.
    src.forward(block, acts.fp_in.data, acts.fp_out.data)
    src.forward(block, acts.fp_in_v.data, acts.fp_out_v.data)
    if i < work.resumed_from and block_path.exists():
        block = _packed_block_from_file(block, prefix, block_path, torch.float32).to(src.device)
        info = work.state["blocks"][i]
    else:
        info = _train_and_save_block(i, block, src, acts, prefix, block_path, progress, tb)
        work.record(i, info)
    # Quantized chain: outputs of the packed block become the next inputs.
    src.forward(block, acts.q_in.data, acts.q_in.data)
    src.forward(block, acts.q_in_v.data, acts.q_in_v.data)
    acts.next_block()
    # Free the block: back to meta, nothing of it stays in memory.
    src.layers[i] = block.to("meta")
    return info


def _train_and_save_block(i: int, block: nn.Module, src: _Source, acts: _Activations, prefix: str,
                          block_path: Path, progress: Progress, tb: float) -> dict:
    """Start (RTN/GPTQ), train if the recipe trains, pack, and write the block's file."""
    model, arch, cfg, device, fwd_batch = src.model, src.arch, src.cfg, src.device, src.fwd_batch
    q_in, fp_out, q_in_v, fp_out_v = acts.q_in, acts.fp_out, acts.q_in_v, acts.fp_out_v
    # Channel scales, and GPTQ Hessians, from the quantized chain's inputs, as the block will see them.
    schemes = block_schemes(src.schemes, prefix)
    if schemes:  # mixed precision: scale pairs searched at their consumers' narrowest width
        pair_bits = min((schemes[c].bits for _, cons in arch.scale_pairs for c in cons), default=cfg.bits)
        pair_scheme, do_scale = QuantScheme(pair_bits, cfg.group_size), cfg.channel_scale_at(pair_bits)
    else:
        pair_scheme, do_scale = cfg.scheme, cfg.resolved_channel_scale
    scaled = scale_block_pairs(block, model, arch, q_in.data, fwd_batch, device, pair_scheme) \
        if do_scale else []
    quantize_block_start(block, model, arch, cfg, q_in.data, fwd_batch, device, schemes)
    block.to(device)
    # Validation windows; without them, a slice of the training windows stands in (for the
    # losses reported before and after, and for the default recipe's best-state choice).
    k = fwd_batch * 4
    val_in, val_out = (q_in_v.data, fp_out_v.data) if len(q_in_v) else (q_in.data[:k], fp_out.data[:k])

    def current_loss(blk) -> float:
        return eval_block_loss(blk, model, arch, val_in, val_out, fwd_batch, device, torch.float32, cfg.loss)

    before = current_loss(block)
    history = {"train_loss": [], "val_loss": []}
    if cfg.trains:
        history = train_block(block, model, arch, i, cfg, q_in.data, fp_out.data,
                              val_in, val_out, device, progress, start_val=before)
    pack_block(block)
    _round_like_saved(block)
    block.to(device)
    after = current_loss(block)
    _save_block(block.cpu(), prefix, block_path)
    block.to(device)
    return {"block": i, "loss_before": before, "loss_after": after, "history": history,
            **({"bits": {n: s.bits for n, s in schemes.items()}} if schemes else {}),
            **({"channel_scale": scaled} if scaled else {}), "seconds": round(time.time() - tb, 2)}


def _write_checkpoint(src: _Source, work: _WorkDir, tokenizer: Any, extra_meta: dict | None) -> None:
    """Beside the block files, through the native writer: everything outside the decoder blocks,
    the shard index, config (with the ``eqat`` section), tokenizer, generation config and the
    per-block summary."""
    arch, cfg, n_layers, model_path = src.arch, src.cfg, src.n_layers, src.path
    writer = NativeWriter(work.path)
    for i in range(n_layers):
        writer.adopt(_block_file(i, n_layers))
    # Everything outside the decoder blocks (embeddings, final norm, head, vision tower) in fp16.
    writer.add(_block_file(n_layers, n_layers), src.reader.read("", torch.float16, exclude=arch.layers_path + "."))
    meta = CheckpointMeta(
        scheme=None if (cfg.target or src.schemes) else cfg.scheme, modules=src.schemes,
        architecture=arch.name, target=cfg.target,
        method="block-ap" if cfg.trains else ("gptq" if cfg.init == "gptq" else "rtn"),
        block_ap=cfg.to_json(), source_model=str(model_path),
    ).updated(extra_meta)
    writer.finish(config_dict_for_save(src.config, meta), tokenizer, model_path / "generation_config.json",
                  extra_files={"blockap_summary.json": json.dumps(work.state["blocks"], indent=2)})


def _move_into_place(work: _WorkDir, acts: _Activations, output: Path) -> None:
    """Drop the resume state and offloaded activations; the work directory becomes the output
    (an existing output, with --overwrite, is replaced as ``fsutil`` replaces directories)."""
    work.state_path.unlink()
    if acts.disk is not None:
        shutil.rmtree(acts.disk, ignore_errors=True)
    replace_dir(work.path, output)
