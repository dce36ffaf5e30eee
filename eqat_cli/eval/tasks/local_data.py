"""Loaders for the ``*_local`` lm-eval tasks: read the copies under the eqat data dir.

lm-eval calls ``custom_dataset(**metadata, **dataset_kwargs)``; eqat passes the data dir as the
TaskManager metadata key ``eqat_data_dir``. File locations come from the registered data sets
(``DatasetSpec.local_files``), so the layout is defined once, in ``plugins/datasets.py``.

Each loader returns a ``datasets.DatasetDict`` in the form lm-eval's standard task expects:

* PIQA: ``goal``, ``sol1``, ``sol2``, ``label`` (the file already has that form);
* ARC-Easy: AI2's original ``{"question": {"stem", "choices": [...]}, "answerKey"}`` mapped to
  the HF ``allenai/ai2_arc`` form ``question``, ``choices = {"text": [...], "label": [...]}``,
  ``answerKey``;
* HellaSwag: llama.cpp's 6-lines-per-item text (context, gold label, 4 endings) mapped to the
  processed form of lm-eval's ``hellaswag`` (``query``, ``choices``, ``label``), with lm-eval's
  text clean-up re-applied (it is idempotent on already cleaned text).
"""

from __future__ import annotations

import bz2
import gzip
import re
from pathlib import Path

from eqat_cli.errors import EqatError
from eqat_cli.readers import read_jsonl, reading
from eqat_cli.registry import get_registry

DATA_DIR_KEY = "eqat_data_dir"


def _open_text(path: Path):
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _jsonl(path: Path) -> list[dict]:
    return [obj for _, obj in read_jsonl(path, "task data file", opener=_open_text)]


def local_file(dataset: str, split: str, data_dir) -> Path:
    if not data_dir:
        raise EqatError(f"the local {dataset} task needs a data dir ({DATA_DIR_KEY} metadata)")
    spec = get_registry().dataset(dataset)
    path = Path(data_dir) / spec.local_files[split]
    if not path.is_file():
        raise EqatError(f"no local copy of {dataset!r} ({split}): expected file {path}")
    return path


# ---------------------------------------------------------------------- parsers (pure)


def read_piqa(path: Path) -> list[dict]:
    rows = []
    with reading(path, "PIQA data file"):
        for d in _jsonl(path):
            rows.append({"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(d["label"])})
    return rows


def arc_to_hf(d: dict) -> dict:
    """One AI2 ARC record -> the HF ``allenai/ai2_arc`` row lm-eval's ``arc_easy`` reads."""
    q = d["question"]
    return {
        "id": d["id"],
        "question": q["stem"],
        "choices": {
            "text": [c["text"] for c in q["choices"]],
            "label": [c["label"] for c in q["choices"]],
        },
        "answerKey": d["answerKey"],
    }


def read_arc(path: Path) -> list[dict]:
    with reading(path, "ARC data file"):
        return [arc_to_hf(d) for d in _jsonl(path)]


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag text clean-up (WikiHow bracket artefacts, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[dict]:
    """llama.cpp form: per item, context line, gold label line, then the 4 ending lines."""
    with reading(path, "HellaSwag data file"), _open_text(path) as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines, not a multiple of 6 (context, label, 4 endings)")
    rows = []
    for i in range(0, len(lines), 6):
        label = lines[i + 1].strip()
        if label not in ("0", "1", "2", "3"):
            raise ValueError(f"{path}:{i + 2}: gold label {label!r} is not 0-3")
        rows.append({
            "query": hellaswag_clean(lines[i]),
            "choices": [hellaswag_clean(e) for e in lines[i + 2 : i + 6]],
            "label": int(label),
        })
    return rows


# ---------------------------------------------------------------------- lm-eval entry points


def _dataset_dict(splits: dict[str, list[dict]]):
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def piqa(**kwargs):
    d = kwargs.get(DATA_DIR_KEY)
    return _dataset_dict({"validation": read_piqa(local_file("piqa", "validation", d))})


def arc_easy(**kwargs):
    d = kwargs.get(DATA_DIR_KEY)
    return _dataset_dict({
        "test": read_arc(local_file("arc_easy", "test", d)),
        "validation": read_arc(local_file("arc_easy", "validation", d)),
    })


def hellaswag(**kwargs):
    d = kwargs.get(DATA_DIR_KEY)
    return _dataset_dict({"validation": read_hellaswag(local_file("hellaswag", "validation", d))})
