"""Learning-rate probe for Block-AP: train ONE block under several settings and compare.

Block-AP spends almost all of its time in training, so tuning it on the whole model is slow. This
probe feeds one block its full-precision inputs (from the calibration file), trains a fresh
fake-quantized copy under each setting, and prints the validation loss before and after, and after relative to min-max (RTN) (always
measured as ``token-rel``, so settings with different training losses compare). A setting is
``quant_lr,weight_lr,epochs,loss[,init]`` with init ``minmax`` (default) or ``gptq`` (GPTQ from the
block's training inputs, as ``eqat block-ap --init gptq``).

    python bench/blockap_lr_probe.py smollm2 calib.safetensors --block 5 --bits 4 --group 64 \\
        1e-4,1e-5,2,mse 3e-4,3e-4,2,token-rel 1e-4,1e-4,2,token-rel,gptq --json probe.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("calib", type=Path)
    ap.add_argument("settings", nargs="+", help="quant_lr,weight_lr,epochs,loss[,init]")
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from _probe_common import fp_block_io, load_model_and_calib
    from eqat_cli.quantize import fake_quantize_block
    from eqat_cli.train.block_ap import BlockAPConfig, eval_block_loss, quantize_block_start, train_block

    model, arch, c = load_model_and_calib(args.model, args.calib)
    k = args.block
    x, y = fp_block_io(model, arch, c.train, [k])[k]
    xv, yv = fp_block_io(model, arch, c.val, [k], chunk=len(c.val))[k]
    cpu = torch.device("cpu")
    rows = []
    rtn = copy.deepcopy(arch.layers(model)[k])
    fake_quantize_block(rtn, arch, args.bits, args.group)
    rtn_loss = eval_block_loss(rtn, model, arch, xv, yv, 2, cpu, torch.float32, "token-rel")
    del rtn
    for setting in args.settings:
        qlr, wlr, epochs, loss, *rest = setting.split(",")
        init = rest[0] if rest else "minmax"
        cfg = BlockAPConfig.paper(bits=args.bits, group_size=args.group, epochs=int(epochs), quant_lr=float(qlr),
                            weight_lr=float(wlr), loss=loss, init=init)
        block = copy.deepcopy(arch.layers(model)[k])
        quantize_block_start(block, model, arch, cfg, x, 2, cpu)
        before = eval_block_loss(block, model, arch, xv, yv, 2, cpu, torch.float32, "token-rel")
        t = time.time()
        if cfg.epochs:
            train_block(block, model, arch, k, cfg, x, y, xv, yv, cpu, lambda *a: None)
        after = eval_block_loss(block, model, arch, xv, yv, 2, cpu, torch.float32, "token-rel")
        row = {"block": k, "bits": args.bits, "group": args.group, "quant_lr": float(qlr), "weight_lr": float(wlr),
               "epochs": int(epochs), "loss": loss, "init": init, "val_token_rel_before": before, "val_token_rel_after": after,
               "ratio": after / before, "after_vs_rtn": after / rtn_loss, "seconds": round(time.time() - t, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "calib": str(args.calib), "model": args.model}, indent=2) + "\n")


if __name__ == "__main__":
    main()
