"""Issue #28 lever: does a residual-stream rotation folded into the weights (eqat_cli.rotate) pay?

SmolLM2 (the ``smollm2`` alias), rotated by a randomized Hadamard matrix of order 576 (12 x 12 x 4)
or by a random orthogonal matrix, then quantized exactly as ``bench/peer_compare.py`` does: RTN
(``eqat block-ap --epochs 0 --init minmax --no-channel-scale``) and default Block-AP, on the
64 x 256 C4 calibration file. Every output is evaluated on the C4 hold-out (ctx 512 x 20,
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

MODEL = "smollm2"
LOCK = "/work/bench.lock"
EVALS = {
    "c4": ["--seqlen", "512", "--limit", "20"],  # + --ppl HOLDOUT
    "wt": ["--ppl", "wikitext2", "--seqlen", "512", "--limit", "40"],
}
QUANT = {"rtn": METHODS["rtn"][1], "bap": METHODS["default"][1]}


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
        out = self.runs / f"{method}-{kind}{sfx}-w{bits}g64"
        row = self.data["rows"].get(key)
        if row and out.exists():
            return key
        src = self.rotated(kind)
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
        step = self.run([*self.eqat, "eval", row["output"], *flags, "--json", str(out)], self.runs / (name + ".log"))
        res = json.loads(out.read_text())["perplexity"]
        row["ppl"][which] = next(iter(res.values()))["ppl"]
        row.setdefault("evals", {})[which] = step
        self.save()
        print(f"= {key} {which}: {row['ppl'][which]:.3f}", flush=True)


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
    ap.add_argument("--steps", required=True, help="method:rotation:bits,... (method rtn|bap; rotation none|hadamard|orthogonal)")
    ap.add_argument("--evals", default="c4,wt", help="c4 first for every step, then wt")
    ap.add_argument("--json", default=str(HERE / "results" / "s13" / "rotation_probe.json"))
    a = ap.parse_args()
    p = Probe(a)
    steps = [s.split(":") for s in a.steps.split(",")]
    for which in a.evals.split(","):
        for method, kind, bits in steps:
            key = p.quantize(method, kind, int(bits))
            p.evaluate(key, which)
    for key, row in p.data["rows"].items():
        print(f"{key:28s} " + "  ".join(f"{k} {v:.3f}" for k, v in row["ppl"].items()))


if __name__ == "__main__":
    main()
