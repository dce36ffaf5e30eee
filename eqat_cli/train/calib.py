"""Calibration windows: random, deterministic, train and validation from disjoint text.

The corpus is shuffled by document (seeded), tokenized into one stream, and cut into
non-overlapping slots of ``seqlen`` tokens. Validation windows come from the tail of the stream,
training windows from the rest, so no token is in both. Windows are drawn at random among the
slots (seeded). A corpus with fewer slots than requested is an error that says how many it has.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eqat_cli.data import read_corpus
from eqat_cli.errors import BadInputError
from eqat_cli.fsutil import atomic_file, check_output, output_lock
from eqat_cli.models import classify, load_tokenizer, local_path, preflight_model
from eqat_cli.readers import open_safetensors, reading

FORMAT = "eqat-calibration"
FORMAT_VERSION = 1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable identity of a tokenizer: hash of its vocabulary and special tokens."""
    vocab = tokenizer.get_vocab()
    payload = json.dumps(
        {
            "vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
        },
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class Calibration:
    train: torch.Tensor  # [n, seqlen] int64 token ids
    val: torch.Tensor  # [m, seqlen]
    meta: dict


def build_windows(
    documents: list[str],
    tokenizer: Any,
    samples: int,
    seqlen: int,
    val_samples: int,
    seed: int,
    source: str,
) -> Calibration:
    if samples < 1 or seqlen < 2 or val_samples < 0:
        raise BadInputError("need --samples >= 1, --seqlen >= 2 and --val-samples >= 0")
    docs = [d for d in documents if d and d.strip()]
    rng = random.Random(seed)
    rng.shuffle(docs)
    needed_tokens = (samples + val_samples) * seqlen
    ids: list[int] = []
    sep = tokenizer.eos_token_id
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if len(ids) >= needed_tokens * 2:  # plenty of room for random placement
            break
    slots = len(ids) // seqlen
    if slots < samples + val_samples:
        raise BadInputError(
            f"corpus {source!r} is too short: {len(ids)} tokens give {slots} windows of "
            f"{seqlen} tokens, but {samples} train + {val_samples} validation were requested"
        )
    stream = torch.tensor(ids[: slots * seqlen], dtype=torch.int64).view(slots, seqlen)
    val_slots = list(range(slots - val_samples, slots))
    train_pool = list(range(slots - val_samples))
    train_slots = sorted(rng.sample(train_pool, samples))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "seed": seed,
        "samples": samples,
        "val_samples": val_samples,
        "seqlen": seqlen,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "corpus_tokens_used": len(ids),
    }
    return Calibration(stream[train_slots].clone(), stream[val_slots].clone(), meta)


def save_calibration(calib: Calibration, path: str | Path) -> None:
    from safetensors.torch import save_file

    meta = {k: str(v) for k, v in calib.meta.items()}
    meta["json"] = json.dumps(calib.meta)
    with atomic_file(path) as tmp:
        save_file(
            {"train": calib.train.to(torch.int32).contiguous(), "val": calib.val.to(torch.int32).contiguous()},
            str(tmp),
            metadata=meta,
        )


def load_calibration(path: str | Path) -> Calibration:
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"calibration file not found: {path}")
    what = "calibration file"
    with open_safetensors(p, what) as f, reading(p, what):
        meta = json.loads((f.metadata() or {}).get("json", "{}"))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "train" not in f.keys():
            raise BadInputError(f"{path} is not an eqat calibration file (made by `eqat calibrate`)")
        train = f.get_tensor("train")
        val = f.get_tensor("val") if "val" in f.keys() else train[:0]
    if train.is_floating_point() or val.is_floating_point():
        raise BadInputError(f"{path}: damaged calibration file: token ids are stored as floats")
    train, val = train.to(torch.int64), val.to(torch.int64)
    if train.dim() != 2 or train.shape[0] < 1 or train.shape[1] < 2 or val.dim() != 2 or val.shape[1] != train.shape[1]:
        raise BadInputError(
            f"{path}: damaged calibration file: windows of shape {tuple(train.shape)} (train) and "
            f"{tuple(val.shape)} (validation) are not [n, seqlen] with one seqlen"
        )
    if int(train.min()) < 0 or (val.numel() and int(val.min()) < 0):
        raise BadInputError(f"{path}: damaged calibration file: negative token ids")
    return Calibration(train, val, meta)


def check_tokenizer(calib: Calibration, tokenizer: Any, path: str) -> None:
    want = calib.meta.get("tokenizer_fingerprint")
    have = tokenizer_fingerprint(tokenizer)
    top = max(int(calib.train.max()), int(calib.val.max()) if calib.val.numel() else 0)
    if want == have and top >= len(tokenizer):
        raise BadInputError(f"calibration file {path} holds token id {top}, beyond the vocabulary ({len(tokenizer)})")
    if want != have:
        raise BadInputError(
            f"calibration file {path} was made with another tokenizer "
            f"({calib.meta.get('tokenizer') or want}); re-run `eqat calibrate` with this model"
        )


def calibrate(
    model: str,
    dataset: str,
    samples: int,
    seqlen: int,
    val_samples: int,
    seed: int,
    data_dir: str | Path | None = None,
) -> tuple[Calibration, Any, Path]:
    """Calibration windows drawn on the fly: ``dataset`` (a named set or a text file) tokenized
    with ``model``'s tokenizer. ``eqat calibrate`` saves the result; ``eqat block-ap --dataset``
    trains on it. Returns (windows, tokenizer, local model directory)."""
    path = local_path(classify(model))
    tok = load_tokenizer(path)
    docs = read_corpus(dataset, "train", data_dir)
    calib = build_windows(docs, tok, samples, seqlen, val_samples, seed, source=dataset)
    calib.meta["model"] = model
    return calib, tok, path


def calibrate_to_file(
    model: str,
    dataset: str,
    output: str | Path,
    samples: int = 4096,
    seqlen: int = 2048,
    val_samples: int = 64,
    seed: int = 2,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    wait: bool = False,
    progress: Any = None,
) -> Calibration:
    """``eqat calibrate``'s library side: check the output file, hold its lock (one writer per
    output; refused, or with ``wait`` waited for), check the model, draw the windows
    (:func:`calibrate`, reported as ``progress("calibration", {"dataset", "done"})``), save them
    atomically. Returns the windows."""
    note = progress or (lambda event, info: None)
    check_output(output, overwrite, kind="file")
    with output_lock(output, wait=wait, progress=progress):
        check_output(output, overwrite, kind="file")  # again: a run we waited for may have written it
        preflight_model(model)
        note("calibration", {"dataset": dataset, "done": False})
        try:
            calib, _, _ = calibrate(model, dataset, samples, seqlen, val_samples, seed, data_dir)
        finally:
            note("calibration", {"dataset": dataset, "done": True})
        save_calibration(calib, output)
    return calib


def calibration_for(
    model: str,
    calib: str | Path | None = None,
    dataset: str | None = None,
    samples: int = 4096,
    seqlen: int = 2048,
    val_samples: int = 64,
    seed: int = 2,
    data_dir: str | Path | None = None,
) -> tuple[Calibration, Any, Path]:
    """Block-AP's windows for ``model``: the file ``calib`` (made by ``eqat calibrate``; refused if
    made with another tokenizer), or, without it, drawn on the fly from ``dataset`` by
    :func:`calibrate`. Returns (windows, tokenizer, local model directory)."""
    if calib is None:
        if dataset is None:
            raise BadInputError("give exactly one of --calib FILE or --dataset NAME")
        return calibrate(model, dataset, samples, seqlen, val_samples, seed, data_dir)

    c = load_calibration(calib)
    path = local_path(classify(model))
    tok = load_tokenizer(path)
    check_tokenizer(c, tok, str(calib))
    return c, tok, path
