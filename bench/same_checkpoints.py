"""Are two source trees' checkpoints byte-identical? RTN and short Block-AP runs on a tiny random
Llama (built in code, like the tests), one subprocess per tree, then every written file compared.

    python bench/same_checkpoints.py BEFORE_TREE AFTER_TREE [--label NAME]

Runs: RTN (paper recipe, 0 epochs, w2g32), the paper recipe 3 steps (w2g32), the default recipe
3 steps (w3g32), the default recipe with a GPTQ start 2 steps (w4g16). ``blockap_summary.json``
is compared without its wall times (``seconds``). Prints one line per file and writes
bench/results/same_checkpoints_<label>.json. A refactor that must not change behaviour gives
``identical: true`` for every file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

RUNS = r'''
import sys
from pathlib import Path
import torch
from conftest import build, save_tiny, tiny_llama_config, tiny_tokenizer
from test_block_ap import calib
from eqat_cli.train.block_ap import BlockAPConfig
from eqat_cli.train.block_ap.driver import run_block_ap
tmp = Path(sys.argv[1])
src = save_tiny(build(tiny_llama_config()), tmp / "fp")
c = calib()
cfgs = {"rtn": BlockAPConfig.paper(bits=2, group_size=32, epochs=0),
        "paper-steps3": BlockAPConfig.paper(bits=2, group_size=32, steps=3),
        "default-steps3": BlockAPConfig.from_recipe("default", bits=3, group_size=32, steps=3),
        "gptq-steps2": BlockAPConfig.from_recipe("default", bits=4, group_size=16, steps=2, init="gptq")}
for name, cfg in cfgs.items():
    torch.manual_seed(0)
    run_block_ap(src, tiny_tokenizer(), c.train, c.val, cfg, tmp / name, torch.device("cpu"))
'''


def _strip_seconds(x):
    if isinstance(x, dict):
        return {k: _strip_seconds(v) for k, v in x.items() if k != "seconds"}
    if isinstance(x, list):
        return [_strip_seconds(v) for v in x]
    return x


def digest(f: Path) -> str:
    data = f.read_bytes()
    if f.name == "blockap_summary.json":
        data = json.dumps(_strip_seconds(json.loads(data)), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def checkpoints(tree: Path, out: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{tree}:{tree / 'kernels'}:{tree / 'tests'}", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", RUNS, str(out)], env=env, cwd=tree, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {str(f.relative_to(out)): digest(f) for f in sorted(out.rglob("*"))
            if f.is_file() and f.relative_to(out).parts[0] != "fp"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--label", default="run")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    # The same output path for both trees: the source path is recorded in the checkpoint.
    sums = {}
    for side, tree in (("before", a.before), ("after", a.after)):
        out = work / "run"
        sums[side] = checkpoints(tree.resolve(), out)
        os.rename(out, work / side)
    files = sorted(set(sums["before"]) | set(sums["after"]))
    rows = [{"file": f, "identical": sums["before"].get(f) == sums["after"].get(f)} for f in files]
    for r in rows:
        print(f"{'same' if r['identical'] else 'DIFFERENT':9} {r['file']}")
    result = {"before": str(a.before), "after": str(a.after), "files": rows,
              "all_identical": all(r["identical"] for r in rows)}
    print("all identical" if result["all_identical"] else "some files differ")
    out = HERE / "results" / f"same_checkpoints_{a.label}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
