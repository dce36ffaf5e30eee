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

from eqat_cli.scheme import QuantScheme


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

    from _probe_common import fp_block_io, load_model_and_calib
    from eqat_cli.quantize import fake_quantize_block
    from eqat_cli.train.block_ap import BlockAPConfig, eval_block_loss, train_block

    model, arch, c = load_model_and_calib(args.model, args.calib)
    cpu = torch.device("cpu")
    n_max = max(args.sizes)
    held = 32
    if n_max + held > len(c.train):
        raise SystemExit(f"need {n_max + held} training windows in {args.calib}, it has {len(c.train)}")

    train_io = fp_block_io(model, arch, c.train[: n_max + held], args.blocks)
    val = fp_block_io(model, arch, c.val, args.blocks, chunk=len(c.val))
    rows = []
    for k in args.blocks:
        x, y = train_io[k]
        xh, yh = x[n_max:], y[n_max:]
        xv, yv = val[k]
        for n in args.sizes:
            blk = copy.deepcopy(arch.layers(model)[k])
            fake_quantize_block(blk, arch, QuantScheme(args.bits, args.group))

            def loss(a, b):
                return eval_block_loss(blk, model, arch, a, b, 2, cpu, torch.float32, "token-rel")

            before = {"train16": loss(x[:16], y[:16]), "heldout_train_slots": loss(xh, yh), "val": loss(xv, yv)}
            cfg = BlockAPConfig.paper(bits=args.bits, group_size=args.group, epochs=args.epochs,
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
