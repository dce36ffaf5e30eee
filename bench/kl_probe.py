"""Where a quantized model's distance to full precision comes from.

Loads the full-precision model and a packed eqat model, and measures the mean KL(FP || mixed) per
token on the first N windows of a text file, where *mixed* is the full-precision model with only a
subset of its linear layers replaced by the quantized model's dequantized weights: every layer
(the quantized model itself), one layer type in every block, five blocks at a time, and one
block (or only its ``down_proj``) at a time for ``--blocks``. Also prints the KL by position.

Only meaningful for a quantized model whose blocks compute the full-precision function up to
quantization: a model made with channel scaling has rescaled ``up_proj``/``down_proj`` pairs, so
mixing one of the pair with full precision is not the model's function (the subsets that keep
both layers of the pair together, blocks and the whole model, still are).

    python bench/kl_probe.py smollm2 /work/runs/bap-w4g64 --text /work/runs/c4-holdout.txt \\
        --windows 6 --seqlen 512 --blocks 8-15 --json bench/results/kl_probe_w4g64.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def block_of(name: str) -> int:
    return int(name.split("layers.")[1].split(".")[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fp")
    ap.add_argument("quantized")
    ap.add_argument("--text", required=True, help="plain text file (e.g. the C4 hold-out)")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--blocks", default="", help="range A-B of blocks to probe one at a time")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    from eqat_cli.models import resolve
    from eqat_cli.quant.linear import PackedLinear

    torch.set_num_threads(max(1, torch.get_num_threads()))
    lm = resolve(a.fp, device="cpu", dtype="fp32")
    fp, tok = lm.model, lm.tokenizer
    q = resolve(a.quantized, device="cpu", dtype="fp32").model
    deq = {n: m.dequantize(torch.float32) for n, m in q.named_modules() if isinstance(m, PackedLinear)}
    del q
    ids = tok(Path(a.text).read_text(), return_tensors="pt").input_ids[0]
    n, L = a.windows, a.seqlen
    if ids.numel() < n * L:
        raise SystemExit(f"{a.text}: {ids.numel()} tokens, fewer than {n} x {L}")
    x = ids[: n * L].view(n, L)
    with torch.no_grad():
        ref = [F.log_softmax(fp(x[i : i + 1]).logits.float(), -1) for i in range(n)]
    orig = {name: fp.get_submodule(name).weight.data for name in deq}

    def kl(subset: set[str]) -> tuple[float, torch.Tensor]:
        for name in deq:
            fp.get_submodule(name).weight.data = deq[name] if name in subset else orig[name]
        pos = torch.zeros(L)
        with torch.no_grad():
            for i in range(n):
                lp = F.log_softmax(fp(x[i : i + 1]).logits.float(), -1)
                pos += (ref[i].exp() * (ref[i] - lp)).sum(-1)[0]
        pos /= n
        return float(pos.mean()), pos

    names = list(deq)
    out: dict = {"fp": a.fp, "quantized": a.quantized, "text": a.text, "windows": n, "seqlen": L}
    full, pos = kl(set(names))
    out["all"] = full
    out["by_position"] = {"0": float(pos[0]), "1-15": float(pos[1:16].mean()), "16-127": float(pos[16:128].mean()),
                          "128+": float(pos[128:].mean())}
    print(f"all layers quantized: KL {full:.4f}  by position: " +
          ", ".join(f"{k} {v:.4f}" for k, v in out["by_position"].items()))
    out["only_kind"] = {}
    for kind in KINDS:
        out["only_kind"][kind] = kl({nm for nm in names if nm.endswith(kind)})[0]
        print(f"only {kind:10s} quantized: {out['only_kind'][kind]:.4f}")
    n_blocks = max(block_of(nm) for nm in names) + 1
    out["only_blocks"] = {}
    for b0 in range(0, n_blocks, 5):
        key = f"{b0}-{min(b0 + 4, n_blocks - 1)}"
        out["only_blocks"][key] = kl({nm for nm in names if b0 <= block_of(nm) < b0 + 5})[0]
        print(f"only blocks {key:6s} quantized: {out['only_blocks'][key]:.4f}")
    if a.blocks:
        lo, hi = (int(v) for v in a.blocks.split("-"))
        out["block"] = {}
        for b in range(lo, hi + 1):
            blk = {nm for nm in names if block_of(nm) == b}
            row = {"only_block": kl(blk)[0], "only_down_proj": kl({nm for nm in blk if nm.endswith("down_proj")})[0],
                   "all_but_block": kl(set(names) - blk)[0]}
            out["block"][str(b)] = row
            print(f"block {b}: only it {row['only_block']:.4f}, only its down_proj {row['only_down_proj']:.4f}, "
                  f"all but it {row['all_but_block']:.4f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
