"""``eqat --help`` start-up time of two source trees, side by side (interleaved runs, median of N).

    python bench/help_startup.py BEFORE_TREE AFTER_TREE [--runs 10] [--label NAME]

Each run is a fresh interpreter: ``python -m eqat_cli --help`` with the tree first on PYTHONPATH.
Prints the medians and their ratio and writes bench/results/help_startup_<label>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def one(tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": f"{tree}:{tree / 'kernels'}", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "eqat_cli", "--help"], env=env, cwd=tree, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--label", default="run")
    a = ap.parse_args()
    one(a.before), one(a.after)  # warm the file cache
    times = {"before": [], "after": []}
    for _ in range(a.runs):
        times["before"].append(one(a.before))
        times["after"].append(one(a.after))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"eqat --help, median of {a.runs}: before {med['before'] * 1e3:.0f} ms, after {med['after'] * 1e3:.0f} ms, "
          f"after/before {med['after'] / med['before']:.3f}")
    out = Path(__file__).resolve().parent / "results" / f"help_startup_{a.label}.json"
    out.write_text(json.dumps({"before": str(a.before), "after": str(a.after), "runs": a.runs, "seconds": times,
                               "median_s": med, "ratio": med["after"] / med["before"]}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
