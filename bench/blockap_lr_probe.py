"""Learning-rate probe for Block-AP: train ONE block under several settings and compare.

Block-AP spends almost all of its time in training, so tuning it on the whole model is slow. This
probe feeds one block its full-precision inputs (from the calibration file), trains a fresh
fake-quantized copy under each setting, and prints the validation loss before and after, and after relative to min-max (RTN) (always
measured as ``token-rel``, so settings with different training losses compare). A setting is
``quant_lr,weight_lr,epochs,loss[,init]`` of the paper's recipe with init ``minmax`` (default) or
``gptq`` (GPTQ from the block's training inputs, as ``eqat block-ap --init gptq``), or
``RECIPE[:key=value,...]``: a recipe (``default``, ``paper``) with :class:`BlockAPConfig` fields
overridden, e.g. ``default:steps=48,best=val``. ``--block`` takes a comma-separated list.

    python bench/blockap_lr_probe.py smollm2 calib.safetensors --block 5 --bits 4 --group 64 \\
        1e-4,1e-5,2,mse 3e-4,3e-4,2,token-rel 1e-4,1e-4,2,token-rel,gptq --json probe.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from eqat_cli.scheme import QuantScheme


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("calib", type=Path)
    ap.add_argument("settings", nargs="+", help="quant_lr,weight_lr,epochs,loss[,init]")
    ap.add_argument("--block", default="5")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from _probe_common import fp_block_io, load_model_and_calib

    model, arch, c = load_model_and_calib(args.model, args.calib)
    blocks = [int(b) for b in str(args.block).split(",")]
    io = fp_block_io(model, arch, c.train, blocks)
    io_val = fp_block_io(model, arch, c.val, blocks, chunk=len(c.val))
    cpu = torch.device("cpu")
    rows = []
    for k in blocks:
        x, y = io[k]
        xv, yv = io_val[k]
        rows += probe_block(args, model, arch, k, x, y, xv, yv, cpu)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "calib": str(args.calib), "model": args.model}, indent=2) + "\n")


def parse_setting(setting: str, bits: int, group: int):
    """A :class:`BlockAPConfig` from ``RECIPE[:k=v,...]`` or the older ``qlr,wlr,epochs,loss[,init]``."""
    from eqat_cli.train.block_ap import BlockAPConfig, RECIPES

    name, _, rest = setting.partition(":")
    if name in RECIPES:
        fields = {f.name: f.type for f in __import__("dataclasses").fields(BlockAPConfig)}
        kw = {}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            kind = fields[key]
            kw[key] = (value if "str" in kind else float(value) if "float" in kind else
                       value.lower() in ("1", "true") if "bool" in kind else int(value))
        return BlockAPConfig.from_recipe(name, bits=bits, group_size=group, **kw)
    qlr, wlr, epochs, loss, *more = setting.split(",")
    return BlockAPConfig.paper(bits=bits, group_size=group, epochs=int(epochs), quant_lr=float(qlr),
                               weight_lr=float(wlr), loss=loss, init=more[0] if more else "minmax")


def probe_block(args, model, arch, k, x, y, xv, yv, cpu) -> list[dict]:
    import torch

    from eqat_cli.quantize import fake_quantize_block
    from eqat_cli.train.block_ap import eval_block_loss, quantize_block_start, train_block

    rows = []
    rtn = copy.deepcopy(arch.layers(model)[k])
    fake_quantize_block(rtn, arch, QuantScheme(args.bits, args.group))
    rtn_loss = eval_block_loss(rtn, model, arch, xv, yv, 2, cpu, torch.float32, "token-rel")
    del rtn
    for setting in args.settings:
        cfg = parse_setting(setting, args.bits, args.group)
        block = copy.deepcopy(arch.layers(model)[k])
        quantize_block_start(block, model, arch, cfg, x, 2, cpu)
        before = eval_block_loss(block, model, arch, xv, yv, 2, cpu, torch.float32, "token-rel")
        t = time.time()
        if cfg.trains:
            train_block(block, model, arch, k, cfg, x, y, xv, yv, cpu, lambda *a: None)
        after = eval_block_loss(block, model, arch, xv, yv, 2, cpu, torch.float32, "token-rel")
        after_mse = eval_block_loss(block, model, arch, xv, yv, 2, cpu, torch.float32, "mse")
        row = {"setting": setting, "block": k, "bits": args.bits, "group": args.group, "config": cfg.to_json(),
               "val_token_rel_before": before, "val_token_rel_after": after, "val_mse_after": after_mse,
               "ratio": after / before, "after_vs_rtn": after / rtn_loss, "seconds": round(time.time() - t, 1)}
        rows.append(row)
        print(f"block {k:2d} {setting:40s} token-rel {before:.4g} -> {after:.4g} ({after / rtn_loss:.3f} of RTN), "
              f"mse {after_mse:.4g}, {row['seconds']} s", flush=True)
    return rows


if __name__ == "__main__":
    main()
