"""Block-AP: block-wise training of all parameters of a quantized block (EfficientQAT, phase 1).

For block i (in order):

* targets ``fp_out = FP_block_i(fp_in)``: the full-precision block on full-precision inputs;
* inputs ``q_in``: outputs of the already-quantized blocks before it;
* train weights (lr ``weight_lr``) and step sizes / zero points (lr ``quant_lr``) of the
  fake-quantized block with AdamW on ``MSE(q_block(q_in), fp_out)`` (or the ``token-rel`` loss,
  see :func:`block_loss`), cosine to lr/min_lr_factor;
* freeze to integers (:class:`PackedLinear`), then ``q_in = packed_block(q_in)``, ``fp_in = fp_out``.

Memory: the model is a meta-device skeleton; each block's weights are read from the safetensors
shards only when it is its turn, and only that block is on the accelerator; once a block is done
its memory is handed back to the OS, so peak RSS does not grow with depth. Activations live in
RAM or in memory-mapped files (``offload_to_disk``).

Resume: every finished block is written atomically to the work directory; on restart the inputs of
the next block are recomputed by replaying the finished blocks (deterministic), so a resumed run
equals an uninterrupted one. No printing here: progress goes through a callback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from eqat_cli.errors import BadInputError, EqatError
from eqat_cli.memory import peak_rss_bytes, release_memory
from eqat_cli.quant.linear import PackedLinear
from eqat_cli.quant.primitives import check_bits
from eqat_cli.quantize import fake_quantize_block, pack_block

STATE_FILE = "blockap_state.json"
WORK_SUFFIX = ".partial"


LOSSES = ("mse", "token-rel")
INITS = ("minmax", "gptq")


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Reconstruction loss of a block's output against its full-precision target.

    ``mse``: the paper's mean squared error over all elements. ``token-rel``: each token's squared
    error relative to its target's mean square, averaged over tokens. Models with massive
    activations (one token whose hidden state is 10^3-10^4x the others, as SmolLM2 from block 12 on)
    make plain MSE spend nearly all of its weight on that token; the next block RMS-normalizes every
    token, so what it sees is each token's *relative* error, which ``token-rel`` weighs equally.
    """
    out, target = out.float(), target.float()
    if kind == "mse":
        return torch.nn.functional.mse_loss(out, target)
    err = (out - target).pow(2).mean(-1)
    scale = target.pow(2).mean(-1).clamp_min(1e-12)
    return (err / scale).mean()


@dataclass(frozen=True)
class BlockAPConfig:
    bits: int = 2
    group_size: int = 64
    epochs: int = 2
    batch_size: int = 2
    quant_lr: float = 1e-4
    weight_lr: float | None = None  # paper: 2e-5 at 2 bits, 1e-5 at 3/4 bits
    min_lr_factor: float = 20.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    early_stop: int = 0
    seed: int = 2
    offload_to_disk: bool = False
    loss: str = "mse"  # "mse" (paper) or "token-rel" (see block_loss)
    init: str = "minmax"  # "minmax" (paper) or "gptq" (see gptq_init_block)
    gptq_damp: float = 0.01
    keep_best: bool = False  # end each block at its best validation loss, its starting point included

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise BadInputError(f"unknown Block-AP loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.init not in INITS:
            raise BadInputError(f"unknown Block-AP init {self.init!r}; choose one of {', '.join(INITS)}")
        if not 0 < self.gptq_damp < 1:
            raise BadInputError(f"--gptq-damp must be in (0, 1), got {self.gptq_damp:g}")

    def resolved_weight_lr(self) -> float:
        if self.weight_lr is not None:
            return self.weight_lr
        return 2e-5 if self.bits == 2 else 1e-5

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["weight_lr"] = self.resolved_weight_lr()
        return d


class NonFiniteLossError(EqatError):
    pass


Progress = Callable[[str, dict], None]


def _no_progress(event: str, info: dict) -> None:
    pass


# ---------------------------------------------------------------------- activation storage


class ActivationStore:
    """``[n, seqlen, hidden]`` activations in RAM or in a memory-mapped file."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, path: Path | None = None):
        self.path = path
        if path is None:
            self.data = torch.empty(shape, dtype=dtype)
        else:
            numel = math.prod(shape)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.data = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)

    def __len__(self) -> int:
        return self.data.shape[0]


# ---------------------------------------------------------------------- weights, block by block


class ShardReader:
    """Reads tensors by name prefix from a model's safetensors shards (never the whole model)."""

    def __init__(self, path: Path, arch: Any = None):
        from eqat_cli.readers import check_model_weights, open_safetensors as safe_open, read_json

        index = path / "model.safetensors.index.json"
        check_model_weights(path)
        if index.exists():
            weight_map = read_json(index, "safetensors index")["weight_map"]
        else:
            files = [path / "model.safetensors"] if (path / "model.safetensors").exists() else sorted(path.glob("*.safetensors"))
            if not files:
                raise BadInputError(f"{path} holds no .safetensors weights")
            weight_map = {}
            for f in files:
                with safe_open(f, "safetensors weight shard") as fh:
                    weight_map.update({k: f.name for k in fh.keys()})
        self.path = path
        # module path -> (file, key on disk)
        rename = arch.module_key if arch is not None else (lambda k: k)
        self.weight_map = {rename(k): (f, k) for k, f in weight_map.items()}

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.weight_map if k.startswith(prefix)]

    def read(self, prefix: str, dtype: torch.dtype, exclude: str | None = None) -> dict[str, torch.Tensor]:
        """Tensors whose module path starts with ``prefix`` (minus ``exclude``), prefix stripped.

        Only the requested tensors are read from disk.
        """
        from eqat_cli.readers import open_safetensors as safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for k in self.keys(prefix):
            if exclude is None or not k.startswith(exclude):
                by_file.setdefault(self.weight_map[k][0], []).append(k)
        for fname, keys in by_file.items():
            with safe_open(self.path / fname, "safetensors weight shard") as fh:
                for k in keys:
                    t = fh.get_tensor(self.weight_map[k][1])
                    out[k[len(prefix):]] = t.to(dtype) if t.is_floating_point() else t
        return out


def _load_into(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Load ``sd`` into ``module`` (assigning tensors); every non-packed tensor must be there."""
    res = module.load_state_dict(sd, strict=False, assign=True)
    packed = tuple(n + "." for n, m in module.named_modules() if isinstance(m, PackedLinear))
    missing = [k for k in res.missing_keys if not k.endswith("inv_freq") and not k.startswith(packed)]
    if missing or res.unexpected_keys:
        raise BadInputError(f"{what}: missing {missing[:3]}, unexpected {res.unexpected_keys[:3]}")


# ---------------------------------------------------------------------- training


def _cosine_factor(step: int, total: int, min_factor: float) -> float:
    floor = 1.0 / min_factor
    if total <= 1:
        return 1.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * step / (total - 1)))


def _forward_all(block, model, arch, inputs: torch.Tensor, outputs: torch.Tensor, batch: int, device, dtype) -> None:
    """``outputs[j] = block(inputs[j])`` in batches, no grad."""
    kw_cache: dict = {}
    with torch.no_grad():
        for s in range(0, len(inputs), batch):
            x = inputs[s : s + batch].to(device=device, dtype=dtype)
            kw = _block_kwargs(kw_cache, arch, model, x)
            outputs[s : s + batch] = block(x, **kw).to(outputs.dtype).cpu()


def _block_kwargs(cache: dict, arch, model, x: torch.Tensor) -> dict:
    key = (tuple(x.shape), x.device, x.dtype)
    if key not in cache:
        cache[key] = arch.block_kwargs(model, x)
    return cache[key]


def eval_block_loss(block, model, arch, inputs, targets, batch, device, dtype, kind: str = "mse") -> float:
    if len(inputs) == 0:
        return float("nan")
    total, kw_cache = 0.0, {}
    with torch.no_grad():
        for s in range(0, len(inputs), batch):
            x = inputs[s : s + batch].to(device=device, dtype=dtype)
            y = targets[s : s + batch].to(device=device, dtype=torch.float32)
            out = block(x, **_block_kwargs(kw_cache, arch, model, x)).float()
            total += float(block_loss(out, y, kind)) * len(x)
    return total / len(inputs)


def collect_hessians(block, model, arch, inputs: torch.Tensor, batch: int, device, dtype) -> dict:
    """Input Hessians of every quantizable linear of ``block`` over ``inputs`` (one pass, no grad)."""
    from eqat_cli.quant.gptq import HessianAccumulator

    acc, hooks = {}, []
    grams: dict = {}  # per batch: q/k/v (and gate/up) see the same input tensor; multiply once

    def hook(mod, args, out, a):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        # Keyed by identity, and the tensor is kept alive with its product, so no other tensor can
        # take its id (or its memory) while the entry exists.
        if id(args[0]) not in grams:
            grams[id(args[0])] = (args[0], x.float().T @ x.float())
        a.add_gram(grams[id(args[0])][1], x.shape[0])

    for name in arch.linear_names:
        lin = block.get_submodule(name)
        acc[name] = HessianAccumulator(lin.in_features, device=lin.weight.device)
        hooks.append(lin.register_forward_hook(lambda mod, args, out, a=acc[name]: hook(mod, args, out, a)))
    try:
        kw_cache: dict = {}
        with torch.no_grad():
            for s in range(0, len(inputs), batch):
                x = inputs[s : s + batch].to(device=device, dtype=dtype)
                grams.clear()
                block(x, **_block_kwargs(kw_cache, arch, model, x))
                grams.clear()
    finally:
        for h in hooks:
            h.remove()
    return {name: a.h for name, a in acc.items()}


def gptq_init_block(quantized: dict, hessians: dict, bits: int, group: int, damp: float) -> None:
    """Set each :class:`QuantLinear` to its GPTQ solution: GPTQ's step sizes and zero points, and
    weights that fake-quantize to exactly GPTQ's codes, each at the position inside its grid cell
    where GPTQ rounded it (see :func:`gptq_quantize_with_residue`). Block-AP then trains all three
    from this point instead of from min-max."""
    from eqat_cli.quant.gptq import gptq_quantize_with_residue
    from eqat_cli.quant.primitives import dequantize_codes

    with torch.no_grad():
        for name, q in quantized.items():
            codes, scale, zero, frac = gptq_quantize_with_residue(q.weight, hessians[name], bits, group, damp)
            w = dequantize_codes(codes.float() + frac, scale, zero, group)
            q.weight.copy_(w.to(device=q.weight.device, dtype=q.weight.dtype))
            q.quantizer.scale.copy_(scale.to(q.quantizer.scale.device))
            q.quantizer.zero.copy_(zero.to(q.quantizer.zero.device))


def quantize_block_start(block, model, arch, cfg: BlockAPConfig, inputs: torch.Tensor, batch: int, device) -> dict:
    """Turn ``block`` into its fake-quantized starting point: min-max, or GPTQ with the Hessians of
    ``inputs`` (the inputs the block will train on). Returns the :class:`QuantLinear` modules by name."""
    hessians = None
    if cfg.init == "gptq":
        hessians = collect_hessians(block, model, arch, inputs, batch, device, torch.float32)
    quantized = fake_quantize_block(block, arch, cfg.bits, cfg.group_size)
    if hessians is not None:
        gptq_init_block(quantized, hessians, cfg.bits, cfg.group_size, cfg.gptq_damp)
    return quantized


def train_block(
    block: nn.Module,
    model: nn.Module,
    arch: Any,
    index: int,
    cfg: BlockAPConfig,
    q_in: torch.Tensor,
    fp_out: torch.Tensor,
    q_in_val: torch.Tensor,
    fp_out_val: torch.Tensor,
    device: torch.device,
    progress: Progress,
    start_val: float | None = None,
) -> dict:
    """Train one fake-quantized block in place. Returns its loss history.

    ``start_val``: the block's validation loss before training, if the caller has measured it
    (``keep_best`` needs it; otherwise it is measured here)."""
    quant_params = [p for n, p in block.named_parameters() if n.endswith(("quantizer.scale", "quantizer.zero"))]
    quant_ids = {id(p) for p in quant_params}
    weight_params = [p for p in block.parameters() if id(p) not in quant_ids]
    for p in block.parameters():
        p.requires_grad_(True)
    groups = []
    if cfg.quant_lr > 0:
        groups.append({"params": quant_params, "lr": cfg.quant_lr})
    else:
        for p in quant_params:
            p.requires_grad_(False)
    wlr = cfg.resolved_weight_lr()
    if wlr > 0:
        groups.append({"params": weight_params, "lr": wlr})
    else:
        for p in weight_params:
            p.requires_grad_(False)
    history: dict = {"train_loss": [], "val_loss": []}
    if not groups:
        return history
    best_state, best_epoch, best_keep = None, 0, float("inf")
    if cfg.keep_best:
        _check_keep_best(cfg, len(q_in_val))
        best_keep = start_val if start_val is not None else eval_block_loss(
            block, model, arch, q_in_val, fp_out_val, cfg.batch_size, device, torch.float32, cfg.loss)
        best_state = _snapshot(block)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    n = len(q_in)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _cosine_factor(s, total, cfg.min_lr_factor)
    )
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + index)
    best_val, since_best, step = float("inf"), 0, 0
    kw_cache: dict = {}
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        epoch_loss = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            x = q_in[idx].to(device=device, dtype=torch.float32)
            y = fp_out[idx].to(device=device, dtype=torch.float32)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                out = block(x, **_block_kwargs(kw_cache, arch, model, x))
                loss = block_loss(out, y, cfg.loss)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"block {index}: loss became {loss_value} at epoch {epoch + 1}, step {step + 1}; "
                    f"finished blocks are kept (try a lower --quant-lr/--weight-lr or --max-grad-norm)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in groups for p in g["params"]], cfg.max_grad_norm
                )
            opt.step()
            sched.step()
            step += 1
            epoch_loss += loss_value
            progress("step", {"block": index, "epoch": epoch + 1, "epochs": cfg.epochs,
                              "step": b + 1, "steps": steps_per_epoch, "loss": loss_value})
        val = eval_block_loss(block, model, arch, q_in_val, fp_out_val, cfg.batch_size, device, torch.float32, cfg.loss)
        history["train_loss"].append(epoch_loss / steps_per_epoch)
        history["val_loss"].append(val)
        progress("epoch", {"block": index, "epoch": epoch + 1, "train_loss": epoch_loss / steps_per_epoch, "val_loss": val})
        if cfg.keep_best and val < best_keep:
            best_keep, best_epoch = val, epoch + 1
            best_state = _snapshot(block) if epoch + 1 < cfg.epochs else None  # last epoch: it is the block
        if cfg.early_stop and not math.isnan(val):
            if val < best_val:
                best_val, since_best = val, 0
            else:
                since_best += 1
                if since_best >= cfg.early_stop:
                    progress("early_stop", {"block": index, "epoch": epoch + 1})
                    break
    if cfg.keep_best:
        history["best_epoch"] = best_epoch  # 0: training never beat the starting point
        if best_epoch != len(history["val_loss"]):
            _restore(block, best_state)
            progress("restored", {"block": index, "epoch": best_epoch, "val_loss": best_keep})
    for p in block.parameters():
        p.requires_grad_(False)
    return history


def _same_run(old: dict | None, new: dict) -> bool:
    """Whether a work directory's run key describes this run. Options added in a later eqat
    version are missing from an older key; they count as their defaults, so upgrading eqat in the
    middle of a run does not throw finished blocks away."""
    if not old or not isinstance(old.get("config"), dict):
        return False
    defaults = dataclasses.asdict(BlockAPConfig())
    return {**old, "config": {**defaults, **old["config"]}} == new


def _check_keep_best(cfg: BlockAPConfig, n_val: int) -> None:
    if cfg.keep_best and cfg.epochs > 0 and n_val == 0:
        raise BadInputError("--keep-best needs validation windows (--val-samples > 0)")


def _snapshot(block: nn.Module) -> dict[str, torch.Tensor]:
    """A host-memory copy of the block's parameters (keeps the accelerator free)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in block.named_parameters()}


def _restore(block: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in block.named_parameters():
            p.copy_(state[n].to(p.device))


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
    from eqat_cli.readers import load_safetensors as load_file

    sd = {k[len(prefix):]: v for k, v in load_file(path, "finished block file").items()}
    install_packed_layers(block, sd)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    _load_into(block, sd, f"finished block file {path.name}")
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
    progress: Progress = _no_progress,
    resume: bool = True,
    overwrite: bool = False,
) -> BlockAPResult:
    """Quantize the full-precision model at ``model_path`` and write a packed checkpoint."""
    from eqat_cli.formats.native import build_skeleton, config_dict_for_save
    from eqat_cli.readers import load_config, read_json
    from eqat_cli.registry import get_registry

    check_bits(cfg.bits)
    _check_keep_best(cfg, calib_val.shape[0])
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
    _load_into(embed, reader.read(arch.embed_path + ".", torch.float32), "embeddings")
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
        _load_into(block, reader.read(prefix, torch.float32), f"block {i}")
        block.to(device)
        # FP targets from FP inputs (fp_out); FP chain continues with them.
        _forward_all(block, model, arch, fp_in.data, fp_out.data, fwd_batch, device, torch.float32)
        _forward_all(block, model, arch, fp_in_v.data, fp_out_v.data, fwd_batch, device, torch.float32)
        if i < resumed_from and block_path.exists():
            block = _packed_block_from_file(block, prefix, block_path, torch.float32).to(device)
            info = state["blocks"][i]
        else:
            # GPTQ Hessians from the quantized chain's inputs, as the block will see them.
            quantize_block_start(block, model, arch, cfg, q_in.data, fwd_batch, device)
            block.to(device)
            def current_loss() -> float:
                """Validation loss of the current block; without validation windows, a train slice."""
                if len(q_in_v):
                    return eval_block_loss(block, model, arch, q_in_v.data, fp_out_v.data, fwd_batch,
                                           device, torch.float32, cfg.loss)
                k = fwd_batch * 4
                return eval_block_loss(block, model, arch, q_in.data[:k], fp_out.data[:k], fwd_batch,
                                       device, torch.float32, cfg.loss)

            before = current_loss()
            history = {"train_loss": [], "val_loss": []}
            if cfg.epochs > 0:
                history = train_block(block, model, arch, i, cfg, q_in.data, fp_out.data,
                                      q_in_v.data, fp_out_v.data, device, progress,
                                      start_val=before if len(q_in_v) else None)
            pack_block(block)
            _round_like_saved(block)
            block.to(device)
            after = current_loss()
            _save_block(block.cpu(), prefix, block_path)
            block.to(device)
            info = {"block": i, "loss_before": before, "loss_after": after,
                    "history": history, "seconds": round(time.time() - tb, 2)}
            state["blocks"] = state["blocks"][:i] + [info]
            state["finished"] = list(range(i + 1))
            from eqat_cli.fsutil import write_json_atomic

            write_json_atomic(state_path, state)
        # Quantized chain: outputs of the packed block become the next inputs.
        _forward_all(block, model, arch, q_in.data, q_in.data, fwd_batch, device, torch.float32)
        _forward_all(block, model, arch, q_in_v.data, q_in_v.data, fwd_batch, device, torch.float32)
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
    from eqat_cli.readers import open_safetensors as safe_open

    for i in range(n_layers):
        with safe_open(work / _block_file(i, n_layers), "finished block file") as fh:
            for k in fh.keys():
                weight_map[k] = _block_file(i, n_layers)
    total = sum(f.stat().st_size for f in work.glob("model-*.safetensors"))
    (work / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
    )
    meta = {"bits": cfg.bits, "group_size": cfg.group_size, "architecture": arch.name,
            "method": "block-ap" if cfg.epochs > 0 else ("gptq" if cfg.init == "gptq" else "rtn"), "block_ap": cfg.to_json(),
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
