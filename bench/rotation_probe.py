"""Issue #28 lever: does a residual-stream rotation folded into the weights (eqat_cli.rotate) pay?

SmolLM2 (the ``smollm2`` alias), rotated by a randomized Hadamard matrix of order 576 (12 x 12 x 4)
or by a random orthogonal matrix, then quantized as ``bench/peer_compare.py`` does: RTN (min-max
codes, made in this process by ``eqat_cli.quantize.rtn_quantize_model``, checked code for code
against ``eqat block-ap --epochs 0 --init minmax --no-channel-scale``, which spends its time on
block forwards RTN does not need) and default Block-AP (``eqat block-ap``), on the 64 x 256 C4
calibration file. Every output is evaluated on the C4 hold-out (ctx 512 x 20,
``bench/make_c4_holdout.py --seed 2 --docs 400``: the one to choose on) and WikiText-2 (ctx 512 x 40,
peer_compare's protocol). The rotated FP model is saved as a full-precision checkpoint directory
and quantized like any other model; the rotation's own exactness (logits of one C4 window) is
recorded beside it.

    EQAT_DATA_DIR=/work/shared/data python bench/rotation_probe.py --runs-dir /work/runs-h28r \\
        --calib /work/runs-h28r/calib-c4-64x256-val8-s2.safetensors --holdout /work/runs-h28r/c4-holdout.txt \\
        --steps rtn:none:4,rtn:hadamard:4,rtn:none:2,rtn:hadamard:2,rtn:orthogonal:4,rtn:orthogonal:2,bap:none:4,bap:hadamard:4

Each heavy subprocess runs under ``flock /work/bench.lock``; C4 hold-out evaluations of every step
come before any WikiText-2 evaluation (``--evals c4`` then ``--evals wt``). Rows are kept in the JSON
(default bench/results/s13/rotation_probe.json) and skipped when done.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peer_compare import METHODS, measure  # noqa: E402

from eqat_cli.scheme import QuantScheme

MODEL = "smollm2"
LOCK = "/work/bench.lock"
EVALS = {
    "c4": ["--seqlen", "512", "--limit", "20"],  # + --ppl HOLDOUT
    "wt": ["--ppl", "wikitext2", "--seqlen", "512", "--limit", "40"],
}
# rtn: eqat_cli.quantize.rtn_quantize_model in this process (min-max codes, what
# `eqat block-ap --epochs 0 --init minmax --no-channel-scale` writes, without its block forwards:
# checked code for code against that command's output, see --check-rtn); rtnbap: that command.
QUANT = {"rtnbap": METHODS["rtn"][1], "bap": METHODS["default"][1]}


class Probe:
    def __init__(self, a):
        self.a = a
        self.runs = Path(a.runs_dir).resolve()
        self.json = Path(a.json)
        self.data = json.loads(self.json.read_text()) if self.json.exists() else {"rotations": {}, "rows": {}}
        self.eqat = [sys.executable, "-m", "eqat_cli"]

    def save(self):
        self.data["config"] = {"model": MODEL, "calib": self.a.calib, "holdout": self.a.holdout, "evals": EVALS,
                               "quant": QUANT, "seed": self.a.seed}
        self.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.json)

    def run(self, cmd, log):
        return measure(["flock", LOCK, *cmd], log)

    def rotated(self, kind: str) -> str:
        """The model to quantize: the alias, or a rotated FP checkpoint directory (made once)."""
        if kind == "none":
            return MODEL
        out = self.runs / f"fp-rot-{kind}-s{self.a.seed}"
        rkey = f"{kind}-s{self.a.seed}" if self.a.seed else kind
        if rkey in self.data["rotations"] and out.exists():
            return str(out)
        t0 = time.perf_counter()
        self.data["rotations"][rkey] = rotate_and_save(out, kind, self.a.seed, self.a.calib)
        self.data["rotations"][rkey]["wall_s"] = round(time.perf_counter() - t0, 1)
        self.save()
        return str(out)

    def quantize(self, method: str, kind: str, bits: int) -> str:
        sfx = f"-s{self.a.seed}" if self.a.seed and kind != "none" else ""  # seed 0: no suffix
        key = f"{method}/{kind}{sfx}/w{bits}g64"
        out = self.runs / f"{'rtnq' if method == 'rtn' else method}-{kind}{sfx}-w{bits}g64"
        row = self.data["rows"].get(key)
        if row and out.exists():
            return key
        src = self.rotated(kind)
        if method == "rtn":  # min-max RTN needs no forward pass: in this process, seconds
            t0 = time.perf_counter()
            rtn_and_save(src, out, bits)
            step = {"in_process": "rtn_and_save", "wall_s": round(time.perf_counter() - t0, 1)}
        else:
            cmd = [*self.eqat, "block-ap", src, "--bits", str(bits), "--group", "64", "--calib", self.a.calib,
                   *QUANT[method], "-o", str(out)]
            step = self.run(cmd, out.with_name(out.name + ".log"))
        summary = HERE / "results" / "s13" / f"rot-{method}-{kind}{sfx}-w{bits}g64.json"
        sfile = out / "blockap_summary.json"
        if sfile.exists():
            summary.write_text(sfile.read_text())
        self.data["rows"][key] = {"method": method, "rotation": kind + sfx, "bits": bits, "group": 64,
                                  "output": str(out), "quantize": step, "ppl": {}}
        self.save()
        return key

    def evaluate(self, key: str, which: str) -> None:
        row = self.data["rows"][key]
        if which in row["ppl"]:
            return
        name = f"rot-{row['method']}-{row['rotation']}-w{row['bits']}g64.{which}.json"
        out = HERE / "results" / "s13" / name
        flags = ["--ppl", self.a.holdout, *EVALS["c4"]] if which == "c4" else EVALS["wt"]
        cmd = [*self.eqat, "eval", row["output"], *flags, "--json", str(out)]
        # an evaluation is ~15-35 s of CPU (under RULES.md's ~60 s): --no-lock-evals runs it niced, unlocked
        step = measure(["nice", "-n", "10", *cmd], self.runs / (name + ".log")) if self.a.no_lock_evals else \
            self.run(cmd, self.runs / (name + ".log"))
        res = json.loads(out.read_text())["perplexity"]
        row["ppl"][which] = next(iter(res.values()))["ppl"]
        row.setdefault("evals", {})[which] = step
        self.save()
        print(f"= {key} {which}: {row['ppl'][which]:.3f}", flush=True)


def rtn_and_save(src: str, out: Path, bits: int) -> None:
    """Min-max RTN w{bits}g64 of a full-precision model, saved natively like Block-AP's output
    (everything outside the decoder blocks rounded to fp16, as Block-AP stores it)."""
    import torch

    from eqat_cli.formats.native import save_native
    from eqat_cli.fsutil import atomic_dir
    from eqat_cli.models import classify, load_fp, local_path
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    model, tok = load_fp(local_path(classify(src)), torch.float32)
    arch = get_registry().architecture_for(model.config.model_type)
    blocks = {id(p) for p in arch.layers(model).parameters()}
    with torch.no_grad():
        for prm in model.parameters():
            if id(prm) not in blocks:
                prm.copy_(prm.half().float())
    rtn_quantize_model(model, arch, QuantScheme(bits, 64))
    with atomic_dir(out, overwrite=True) as tmp:
        save_native(model, tok, tmp, {"bits": bits, "group_size": 64, "architecture": arch.name, "method": "rtn",
                                      "source_model": src})


def check_rtn(a: Path, b: Path) -> dict:
    """Compare two native checkpoints tensor by tensor (the in-process RTN against block-ap's)."""
    from eqat_cli.formats.native import load_state

    sa, sb = load_state(a), load_state(b)
    diff = [k for k in sa if k not in sb or not (sa[k].shape == sb[k].shape and bool((sa[k] == sb[k]).all()))]
    return {"a": str(a), "b": str(b), "tensors": len(sa), "missing_in_b": sorted(set(sa) - set(sb)),
            "different": diff[:20], "n_different": len(diff)}


def rotate_and_save(out: Path, kind: str, seed: int, calib: str) -> dict:
    """Rotate the FP model, check its logits on one calibration window, save it (atomic)."""
    import torch

    from eqat_cli.fsutil import atomic_dir
    from eqat_cli.models import classify, load_fp, local_path
    from eqat_cli.registry import get_registry
    from eqat_cli.rotate import rotate_model
    from eqat_cli.train.calib import load_calibration

    path = local_path(classify(MODEL))
    model, tok = load_fp(path, torch.float32)
    model.eval()
    arch = get_registry().architecture_for(model.config.model_type)
    ids = load_calibration(Path(calib)).val[:1]
    with torch.no_grad():
        before = model(input_ids=ids).logits.double()
    gains = arch.norm(model).weight.detach().clone()  # before rotate_model sets it to one
    info = rotate_model(model, arch, kind=kind, seed=seed, untie=True)
    with torch.no_grad():
        after = model(input_ids=ids).logits.double()
    rel = ((after - before).norm() / before.norm()).item()
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "eqat_rotation.json").write_text(json.dumps({**info.as_dict(), "source": MODEL}) + "\n")
    reloaded, _ = load_fp(out, torch.float32)  # the saved directory, as block-ap will read it
    with torch.no_grad():
        rel_saved = ((reloaded.eval()(input_ids=ids).logits.double() - before).norm() / before.norm()).item()
    return {**info.as_dict(), "logits_rel_diff_fp32": rel, "saved_logits_rel_diff_fp32": rel_saved, "final_gain_min": gains.min().item(),
            "final_gain_max": gains.max().item(), "dir": str(out)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--holdout", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", required=True, help="method:rotation:bits,... (method rtn|rtnbap|bap; rotation none|hadamard|orthogonal)")
    ap.add_argument("--evals", default="c4,wt", help="c4 first for every step, then wt")
    ap.add_argument("--json", default=str(HERE / "results" / "s13" / "rotation_probe.json"))
    ap.add_argument("--no-lock-evals", action="store_true", help="evaluations niced, without the machine lock")
    ap.add_argument("--check-rtn", nargs=2, metavar=("IN_PROCESS", "BLOCK_AP"), help="compare two RTN outputs and exit")
    a = ap.parse_args()
    p = Probe(a)
    if a.check_rtn:
        p.data["rtn_check"] = check_rtn(Path(a.check_rtn[0]), Path(a.check_rtn[1]))
        p.save()
        print(json.dumps(p.data["rtn_check"], indent=1))
        return
    steps = [s.split(":") for s in a.steps.split(",")]
    for which in a.evals.split(","):
        for method, kind, bits in steps:
            key = p.quantize(method, kind, int(bits))
            p.evaluate(key, which)
    for key, row in p.data["rows"].items():
        print(f"{key:28s} " + "  ".join(f"{k} {v:.3f}" for k, v in row["ppl"].items()))


if __name__ == "__main__":
    main()
