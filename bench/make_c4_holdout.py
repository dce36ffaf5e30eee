"""Write C4 text that no calibration file of a given seed uses: a selection set for recipes.

``eqat calibrate --dataset c4 --seed S`` shuffles the C4 documents with ``random.Random(S)`` and
tokenizes them in that order until it has twice the tokens it needs (see
``eqat_cli/train/calib.py``), so the *last* documents of that order are never read. This script
writes the last ``--docs`` of them, joined by blank lines, to a text file that ``eqat eval --ppl
FILE`` reads. Recipes and defaults are chosen on this file (and on Block-AP's validation loss),
never on WikiText-2 or the zero-shot tasks.

    python bench/make_c4_holdout.py --seed 2 --docs 400 -o /work/runs/c4-holdout.txt
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

from eqat_cli.data import read_corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--data-dir", default=os.environ.get("EQAT_DATA_DIR"))
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    docs = [d for d in read_corpus("c4", "train", a.data_dir and Path(a.data_dir)) if d and d.strip()]
    random.Random(a.seed).shuffle(docs)  # the order build_windows reads them in
    held = docs[-a.docs:]
    Path(a.output).write_text("\n\n".join(held), encoding="utf-8")
    print(f"wrote {len(held)} of {len(docs)} C4 documents ({sum(map(len, held)):,} characters) to {a.output}")


if __name__ == "__main__":
    main()
