"""Where does a Block-AP block's remaining loss come from? Train ONE block on full-precision inputs.

For each block k and training-set size n, a fresh min-max fake-quantized copy of block k is trained
on the first n calibration windows (full-precision inputs and targets, so no error from earlier
blocks), then its token-rel loss is measured on: 16 of those training windows, 32 unseen
*training-slot* windows (same part of the corpus, not trained on; only when n <= the file's size
minus 32) and the validation windows (the disjoint tail of the corpus). Comparing with the
``loss_after`` of a whole-model Block-AP run, whose block k sees the quantized chain's inputs,
separates the block's own quantization error from error carried in from earlier blocks.

    python bench/blockap_gap_probe.py smollm2 calib-256.safetensors --blocks 5 25 --sizes 32 128 \\
        --json gap.json
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
    ap.add_argument("--blocks", type=int, nargs="+", default=[5, 25])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--quant-lr", type=float, default=3e-4)
    ap.add_argument("--weight-lr", type=float, default=3e-4)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from eqat_cli.models import classify, load_fp, local_path
    from eqat_cli.quantize import fake_quantize_block
    from eqat_cli.registry import get_registry
    from eqat_cli.train.block_ap import BlockAPConfig, eval_block_loss, train_block
    from eqat_cli.train.calib import load_calibration

    torch.manual_seed(0)
    model, _ = load_fp(local_path(classify(args.model)), torch.float32)
    model.eval()
    arch = get_registry().architecture_for(model.config.model_type)
    c = load_calibration(args.calib)
    cpu = torch.device("cpu")
    n_max = max(args.sizes)
    held = 32
    if n_max + held > len(c.train):
        raise SystemExit(f"need {n_max + held} training windows in {args.calib}, it has {len(c.train)}")

    def fp_io(ids):
        """FP inputs and outputs of every probed block for windows ``ids``."""
        out = {}
        with torch.no_grad():
            h = arch.embed(model)(ids)
            for i in range(max(args.blocks) + 1):
                o = arch.layers(model)[i](h, **arch.block_kwargs(model, h))
                if i in args.blocks:
                    out[i] = (h, o)
                h = o
        return out

    ids = c.train[: n_max + held]
    parts = [fp_io(ids[s : s + 8]) for s in range(0, len(ids), 8)]
    val = fp_io(c.val)
    rows = []
    for k in args.blocks:
        x = torch.cat([p[k][0] for p in parts])
        y = torch.cat([p[k][1] for p in parts])
        xh, yh = x[n_max:], y[n_max:]
        xv, yv = val[k]
        for n in args.sizes:
            blk = copy.deepcopy(arch.layers(model)[k])
            fake_quantize_block(blk, arch, args.bits, args.group)

            def loss(a, b):
                return eval_block_loss(blk, model, arch, a, b, 2, cpu, torch.float32, "token-rel")

            before = {"train16": loss(x[:16], y[:16]), "heldout_train_slots": loss(xh, yh), "val": loss(xv, yv)}
            cfg = BlockAPConfig(bits=args.bits, group_size=args.group, epochs=args.epochs,
                                quant_lr=args.quant_lr, weight_lr=args.weight_lr, loss="token-rel")
            t = time.time()
            train_block(blk, model, arch, k, cfg, x[:n], y[:n], xv, yv, cpu, lambda *a: None)
            after = {"train16": loss(x[:16], y[:16]), "heldout_train_slots": loss(xh, yh), "val": loss(xv, yv)}
            row = {"block": k, "train_windows": n, "epochs": args.epochs, "before": before, "after": after,
                   "seconds": round(time.time() - t, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "calib": str(args.calib), "model": args.model,
                                         "bits": args.bits, "group": args.group,
                                         "quant_lr": args.quant_lr, "weight_lr": args.weight_lr}, indent=2) + "\n")


if __name__ == "__main__":
    main()
