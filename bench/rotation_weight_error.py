"""Why a rotation can hurt weight-only RTN: relative weight error of min-max RTN per linear,
before and after the residual-stream rotation, split into readers (q/k/v, gate/up) and writers
(o_proj, down_proj), plus how concentrated the writers' rows are (max / median row norm).

    python bench/rotation_weight_error.py --rotated /work/runs-h28r/fp-rot-hadamard-s1 --bits 4 \\
        --json bench/results/s13/rotation_weight_error.json

Weights only, no forward pass (seconds of CPU). Readers are compared with the norm gains folded
in on both sides (W diag(g) against W diag(g) Q), so only the rotation differs.
"""

from __future__ import annotations

import argparse
import json

import torch

from eqat_cli.scheme import QuantScheme


def rel_err(w: torch.Tensor, bits: int, group: int = 64) -> float:
    from eqat_cli.quant.linear import QuantLinear

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.float().clone()
    with torch.no_grad():
        deq = QuantLinear(lin, QuantScheme(bits, group)).to_packed().dequantize()
    return ((deq.float() - w.float()).norm() / w.float().norm()).item()


def main():
    from eqat_cli.models import classify, load_fp, local_path
    from eqat_cli.registry import get_registry

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rotated", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    base, _ = load_fp(local_path(classify("smollm2")), torch.float32)
    rot, _ = load_fp(local_path(classify(a.rotated)), torch.float32)
    arch = get_registry().architecture_for("llama")
    rows = []
    for i, (b, r) in enumerate(zip(arch.layers(base), arch.layers(rot))):
        for norm_name, readers in arch.residual_readers:
            g = b.get_submodule(norm_name).weight.detach()
            for n in readers:
                wb = b.get_submodule(n).weight.detach() * g.view(1, -1)
                rows.append({"layer": i, "linear": n, "role": "reader", "base": rel_err(wb, a.bits),
                             "rotated": rel_err(r.get_submodule(n).weight.detach(), a.bits)})
        for n in arch.rotation_writers:
            wb, wr = b.get_submodule(n).weight.detach(), r.get_submodule(n).weight.detach()
            rn = wb.norm(dim=1)
            rows.append({"layer": i, "linear": n, "role": "writer", "base": rel_err(wb, a.bits),
                         "rotated": rel_err(wr, a.bits), "row_norm_max_over_median": (rn.max() / rn.median()).item()})
    summary = {}
    for role in ("reader", "writer"):
        sel = [x for x in rows if x["role"] == role]
        summary[role] = {"base_mean": sum(x["base"] for x in sel) / len(sel),
                         "rotated_mean": sum(x["rotated"] for x in sel) / len(sel),
                         "rotated_worse": sum(x["rotated"] > x["base"] for x in sel), "n": len(sel)}
    out = {"bits": a.bits, "group": 64, "rotated": a.rotated, "summary": summary, "rows": rows}
    open(a.json, "w").write(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    worst = sorted((x for x in rows if x["role"] == "writer"), key=lambda x: -x["rotated"] / x["base"])[:5]
    for x in worst:
        print(x)


if __name__ == "__main__":
    main()
