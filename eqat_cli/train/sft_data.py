"""Training examples for E2E-QP.

* ``pt``: pre-training text windows (calibration-style, every token is a target).
* ``instruct``: JSONL with Alpaca-style ``instruction``/``input``/``output`` or chat ``messages``.
  Only response tokens are learned (label -100 elsewhere). A chat conversation learns **every**
  assistant turn; system, user and tool turns and the template's role headers are masked. With a
  tokenizer chat template, each assistant turn's span is found by rendering the conversation up to
  that turn, and the rendered prefix must be a prefix of the rendered full conversation (a
  template that rewrites earlier turns is refused, naming the line).

Examples keep their own length; :meth:`Examples.collate` pads a batch to its longest member.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eqat_cli.data import read_corpus
from eqat_cli.errors import BadInputError
from eqat_cli.readers import read_jsonl
from eqat_cli.train.calib import build_windows

IGNORE = -100

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class Examples:
    input_ids: list[torch.Tensor]  # 1-D int64 each, own length
    labels: list[torch.Tensor]  # same lengths; IGNORE where not learned
    meta: dict
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, sl: slice) -> "Examples":
        return Examples(self.input_ids[sl], self.labels[sl], self.meta, self.pad_id)

    def collate(self, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, labels, attention_mask)`` for examples ``idx``, right-padded to the longest."""
        idx = [int(i) for i in idx]
        width = max(len(self.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(self.input_ids[i])
            ids[r, :n], labels[r, :n], mask[r, :n] = self.input_ids[i], self.labels[i], 1
        return ids, labels, mask

    def n_targets(self, idx) -> int:
        """Learned next-token positions (labels after the first token that are not IGNORE)."""
        return sum(int((self.labels[int(i)][1:] != IGNORE).sum()) for i in idx)

    def n_tokens(self, idx) -> int:
        return sum(len(self.input_ids[int(i)]) for i in idx)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a, b in zip(self.input_ids, self.labels):
            h.update(a.numpy().tobytes())
            h.update(b.numpy().tobytes())
        return h.hexdigest()[:16]


def from_windows(windows: torch.Tensor, meta: dict) -> Examples:
    return Examples(list(windows), [w.clone() for w in windows], meta)


def _render(tokenizer: Any, msgs: list, generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _chat_with_template(msgs: list, tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    full = _render(tokenizer, msgs, False)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, msgs[:i], True)
        upto = _render(tokenizer, msgs[: i + 1], False)
        for name, part in (("the prompt before", prefix), ("the conversation through", upto)):
            if full[: len(part)] != part:
                raise BadInputError(
                    f"{where}: the chat template renders {name} assistant turn {i + 1} differently from "
                    f"the same tokens in the whole conversation (it rewrites earlier turns), so the "
                    f"turn's tokens cannot be located; use plain 'instruction'/'output' records"
                )
        if len(upto) <= len(prefix):
            raise BadInputError(f"{where}: assistant turn {i + 1} renders to no tokens")
        labels[len(prefix) : len(upto)] = full[len(prefix) : len(upto)]
    return full, labels


def _chat_plain(msgs: list, tokenizer: Any) -> tuple[list[int], list[int]]:
    """No chat template: ``role: content`` lines; assistant contents end with EOS and are learned."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    labels = [IGNORE] * len(ids)

    def add(text: str, learn: bool):
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(t)
        labels.extend(t if learn else [IGNORE] * len(t))

    for m in msgs:
        if m["role"] == "assistant":
            add("assistant: ", False)
            add(m["content"], True)
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
                labels.append(tokenizer.eos_token_id)
            add("\n", False)
        else:
            add(f"{m['role']}: {m['content']}\n", False)
    return ids, labels


def tokenize_record(rec: dict, tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one JSONL record; ``where`` names it in errors (``file:line``)."""
    if "messages" in rec:
        msgs = rec["messages"]
        if (not isinstance(msgs, list) or not msgs
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in msgs)):
            raise BadInputError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        if not any(m["role"] == "assistant" for m in msgs):
            raise BadInputError(f"{where}: 'messages' has no assistant turn to learn")
        if msgs[0]["role"] == "assistant":
            raise BadInputError(f"{where}: 'messages' starts with an assistant turn (no prompt)")
        if getattr(tokenizer, "chat_template", None):
            return _chat_with_template(msgs, tokenizer, where)
        return _chat_plain(msgs, tokenizer)
    if "instruction" in rec and "output" in rec:
        for key in ("instruction", "input", "output"):
            if key in rec and not isinstance(rec[key], str) and not (key == "input" and rec[key] is None):
                raise BadInputError(f"{where}: {key!r} must be a string, found {type(rec[key]).__name__}")
        tpl = ALPACA_WITH_INPUT if rec.get("input") else ALPACA_NO_INPUT
        prompt = tokenizer(tpl.format(instruction=rec["instruction"], input=rec.get("input", "")),
                           add_special_tokens=True)["input_ids"]
        answer = tokenizer(rec["output"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            answer.append(tokenizer.eos_token_id)
        return prompt + answer, [IGNORE] * len(prompt) + answer
    raise BadInputError(f"{where}: expected 'instruction'/'output' (Alpaca) or 'messages' (chat) fields")


def load_instruct(path: str | Path, tokenizer: Any, seqlen: int, limit: int | None = None) -> Examples:
    """Examples truncated to ``seqlen`` tokens; those with nothing left to learn are skipped."""
    p = Path(path)
    if not p.is_file() or p.suffix not in (".jsonl", ".json"):
        raise BadInputError(f"instruction data must be a .jsonl file, got {path}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids, labels = [], []
    # One reader for every JSON-lines file: a damaged line is one error naming the file and line.
    for line_no, rec in read_jsonl(p, "instruction data file"):
        full, lab = tokenize_record(rec, tokenizer, f"{path}:{line_no}")
        full, lab = full[:seqlen], lab[:seqlen]
        if all(x == IGNORE for x in lab[1:]):
            continue  # nothing of the response would be learned
        ids.append(torch.tensor(full, dtype=torch.long))
        labels.append(torch.tensor(lab, dtype=torch.long))
        if limit and len(ids) >= limit:
            break
    if not ids:
        raise BadInputError(f"{path}: no usable examples (prompts longer than --seqlen {seqlen}?)")
    return Examples(ids, labels, {"source": str(path), "format": "instruct", "examples": len(ids),
                                  "seqlen": seqlen, "tokens": sum(len(x) for x in ids)}, pad)


def training_examples(
    dataset: str,
    tokenizer: Any,
    data_format: str = "pt",
    samples: int = 4096,
    seqlen: int = 4096,
    val_samples: int = 64,
    seed: int = 2,
    data_dir: str | Path | None = None,
) -> tuple[Examples, Examples]:
    """E2E-QP's (train, validation) examples. ``pt``: calibration windows drawn on the fly from
    the corpus ``dataset`` (train and validation from disjoint text); ``instruct``: the first
    ``samples + val_samples`` usable examples of the instruction file ``dataset``, the last
    ``val_samples`` of them (at most half) held out."""
    if data_format == "pt":
        docs = read_corpus(dataset, "train", data_dir)
        w = build_windows(docs, tokenizer, samples, seqlen, val_samples, seed, source=dataset)
        return from_windows(w.train, w.meta), from_windows(w.val, w.meta)
    if data_format != "instruct":
        raise BadInputError(f"--format must be pt or instruct, got {data_format!r}")
    ex = load_instruct(dataset, tokenizer, seqlen, limit=samples + val_samples)
    k = len(ex) - min(val_samples, len(ex) // 2)
    return ex.subset(slice(None, k)), ex.subset(slice(k, None))
