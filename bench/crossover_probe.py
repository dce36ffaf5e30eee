"""Where free weights overtake learned rounding: single SmolLM2 blocks at 32 ... 4096 steps.

Issue #28, item 1. Three parametrisations of one Block-AP block, each trained for B optimizer steps
(batch 2) on the block's full-precision inputs, and scored on held-out validation windows (the
calibration file's validation split, never trained on):

* ``round``: eqat's default (rounding offsets within +-1/2 step and two clipping factors per group,
  signed descent at lr 1/B, linear schedule);
* ``free``: the paper's parametrisation (weights, step sizes, zero points with AdamW, lr 1e-4 for
  s/z and 2e-5 (2-bit) / 1e-5 for the weights, cosine to lr/20);
* ``hybrid``: ``round`` for the first half of the steps, then ``free`` for the second half,
  starting exactly at the rounded result (weights ``w0 + v * s`` on the clipped grid, so every
  code and the grid are those ``round`` ended with: :func:`eqat_cli.quant.rounding.round_to_free`).

Every method uses the default recipe's loss (``token-rel``), min-max start, the default's channel
scaling (on at 2-3 bits) and keeps its last parameters. At budget B the block trains on
``max(64, min(B, N))`` windows (two epochs at batch 2 up to N, more epochs beyond).

Two sub-commands, so the expensive full-precision pass runs once:

    python bench/crossover_probe.py io smollm2 calib.safetensors --blocks 2,15 --out /work/runs-h30x/io
    python bench/crossover_probe.py io smollm2 calib.safetensors --blocks 27 --resume-from 15 --out ...
    python bench/crossover_probe.py run smollm2 calib.safetensors --io /work/runs-h30x/io --block 15 \\
        --bits 2 --budgets 32,128,512,2048 --methods round,free,hybrid --json bench/results/s14/crossover.json

``run`` appends one row per (block, bits, method, budget) to the JSON as it finishes and skips rows
already there, so a chunk cut short loses nothing finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from _probe_common import load_model_and_calib

from eqat_cli.quant.linear import set_submodule
from eqat_cli.quant.rounding import RoundQuantLinear, round_to_free
from eqat_cli.train.block_ap import BlockAPConfig, eval_block_loss, quantize_block_start, train_block
from eqat_cli.scheme import QuantScheme
from eqat_cli.train.block_ap.start import scale_block_pairs

CPU = torch.device("cpu")
BATCH = 2
MIN_WINDOWS = 64
TRAIN_VAL = 8  # validation windows train_block scores at epoch ends (unused with best="last")


def io_main(a) -> None:
    model, arch, c = load_model_and_calib(a.model, a.calib)
    a.out.mkdir(parents=True, exist_ok=True)
    blocks = sorted(int(b) for b in a.blocks.split(","))
    layers = arch.layers(model)
    for split, ids in (("train", c.train[: a.windows]), ("val", c.val)):
        if a.resume_from is not None:
            h_all = torch.load(a.out / f"b{a.resume_from}-{split}.pt")["y"]
            first = a.resume_from + 1
        else:
            h_all, first = None, 0
        keep = {k: ([], []) for k in blocks}
        with torch.no_grad():
            for s in range(0, len(ids), 8):
                h = arch.embed(model)(ids[s : s + 8]) if h_all is None else h_all[s : s + 8]
                for i in range(first, max(blocks) + 1):
                    o = layers[i](h, **arch.block_kwargs(model, h, i))
                    if i in keep:
                        keep[i][0].append(h)
                        keep[i][1].append(o)
                    h = o
        for k, (xs, ys) in keep.items():
            torch.save({"x": torch.cat(xs), "y": torch.cat(ys)}, a.out / f"b{k}-{split}.pt")
            print(f"block {k} {split}: {sum(len(x) for x in xs)} windows", flush=True)


def to_free(block) -> None:
    """Swap every :class:`RoundQuantLinear` of ``block`` for the :class:`QuantLinear` it equals."""
    for name, m in list(block.named_modules()):
        if isinstance(m, RoundQuantLinear):
            set_submodule(block, name, round_to_free(m))


def cfg_for(method: str, bits: int, group: int, steps: int) -> BlockAPConfig:
    common = dict(bits=bits, group_size=group, steps=steps, batch_size=BATCH, best="last", loss="token-rel",
                  init="minmax")
    if method == "round":
        return BlockAPConfig(param="round", optimizer="sign", schedule="linear", **common)
    return BlockAPConfig(param="free", optimizer="adamw", schedule="cosine", quant_lr=1e-4, weight_lr=None, **common)


def run_one(model, arch, k, method, budget, bits, group, x, y, xv, yv) -> dict:
    n = min(len(x), max(MIN_WINDOWS, budget))
    xs, ys = x[:n], y[:n]
    block = copy.deepcopy(arch.layers(model)[k])
    t = time.time()
    if bits <= 3:
        scale_block_pairs(block, model, arch, xs, 8, CPU, QuantScheme(bits, group))
    phases = {"round": [("round", budget)], "free": [("free", budget)],
              "hybrid": [("round", budget // 2), ("free", budget - budget // 2)]}[method]
    quantize_block_start(block, model, arch, cfg_for(phases[0][0], bits, group, 1), xs, 8, CPU)
    start = eval_block_loss(block, model, arch, xv, yv, 8, CPU, torch.float32, "token-rel")
    for param, steps in phases:
        if param == "free" and any(isinstance(m, RoundQuantLinear) for m in block.modules()):
            to_free(block)
        if steps:
            train_block(block, model, arch, k, cfg_for(param, bits, group, steps), xs, ys, xv[:TRAIN_VAL],
                        yv[:TRAIN_VAL], CPU, lambda *_: None)
    secs = time.time() - t
    rel = eval_block_loss(block, model, arch, xv, yv, 8, CPU, torch.float32, "token-rel")
    mse = eval_block_loss(block, model, arch, xv, yv, 8, CPU, torch.float32, "mse")
    return {"block": k, "bits": bits, "group": group, "method": method, "budget": budget, "windows": n,
            "batch": BATCH, "val_windows": len(xv), "val_token_rel_start": start, "val_token_rel": rel,
            "val_mse": mse, "seconds": round(secs, 1), "loadavg": os.getloadavg()[0]}


def run_main(a) -> None:
    torch.set_num_threads(a.threads)
    model, arch, _ = load_model_and_calib(a.model, a.calib)
    tr = torch.load(a.io / f"b{a.block}-train.pt")
    va = torch.load(a.io / f"b{a.block}-val.pt")
    rows = json.loads(a.json.read_text())["rows"] if a.json.exists() else []
    done = {(r["block"], r["bits"], r["method"], r["budget"]) for r in rows}
    for budget in (int(b) for b in a.budgets.split(",")):
        for method in a.methods.split(","):
            if (a.block, a.bits, method, budget) in done:
                continue
            r = run_one(model, arch, a.block, method, budget, a.bits, a.group, tr["x"], tr["y"], va["x"], va["y"])
            rows.append(r)
            print(f"block {a.block:2d} w{a.bits}g{a.group} {method:6s} {budget:5d} steps on {r['windows']:4d} windows: "
                  f"held-out token-rel {r['val_token_rel_start']:.4g} -> {r['val_token_rel']:.4g}, mse "
                  f"{r['val_mse']:.4g}, {r['seconds']} s (load {r['loadavg']:.1f})", flush=True)
            a.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = a.json.with_suffix(".tmp")
            tmp.write_text(json.dumps({"rows": rows, "calib": str(a.calib), "model": a.model}, indent=1) + "\n")
            tmp.replace(a.json)


def table_main(a) -> None:
    """A markdown table of held-out token-rel loss per (block, bits, budget): one column per method."""
    rows = json.loads(a.json.read_text())["rows"]
    methods = [m for m in ("round", "free", "hybrid") if any(r["method"] == m for r in rows)]
    keys = sorted({(r["block"], r["bits"], r["budget"]) for r in rows})
    print("| block | bits | steps | start (RTN) | " + " | ".join(methods) + " | best |")
    print("|---|---|---|---|" + "---|" * len(methods) + "---|")
    for k in keys:
        got = {r["method"]: r for r in rows if (r["block"], r["bits"], r["budget"]) == k}
        start = next(iter(got.values()))["val_token_rel_start"]
        cells = [f"{got[m]['val_token_rel']:.4f}" if m in got else "" for m in methods]
        best = min(got, key=lambda m: got[m]["val_token_rel"])
        print(f"| {k[0]} | {k[1]} | {k[2]} | {start:.4f} | " + " | ".join(cells) + f" | {best} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    io = sub.add_parser("io")
    io.add_argument("model")
    io.add_argument("calib", type=Path)
    io.add_argument("--blocks", required=True)
    io.add_argument("--windows", type=int, default=2048)
    io.add_argument("--resume-from", type=int, default=None)
    io.add_argument("--out", type=Path, required=True)
    run = sub.add_parser("run")
    run.add_argument("model")
    run.add_argument("calib", type=Path)
    run.add_argument("--io", type=Path, required=True)
    run.add_argument("--block", type=int, required=True)
    run.add_argument("--bits", type=int, default=2)
    run.add_argument("--group", type=int, default=64)
    run.add_argument("--budgets", default="32,128,512,2048")
    run.add_argument("--methods", default="round,free,hybrid")
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--json", type=Path, required=True)
    tab = sub.add_parser("table")
    tab.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    {"io": io_main, "run": run_main, "table": table_main}[a.cmd](a)


if __name__ == "__main__":
    main()
