"""Training examples for E2E-QP.

* ``pt``: pre-training text windows (calibration-style, every token is a target).
* ``instruct``: JSONL with Alpaca-style ``instruction``/``input``/``output`` or chat ``messages``;
  prompt tokens are masked from the loss (label -100), only the response is learned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eqat_cli.errors import BadInputError

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
    input_ids: torch.Tensor  # [n, seqlen]
    labels: torch.Tensor  # [n, seqlen], IGNORE where not learned
    attention_mask: torch.Tensor  # [n, seqlen]
    meta: dict


def from_windows(windows: torch.Tensor, meta: dict) -> Examples:
    return Examples(windows, windows.clone(), torch.ones_like(windows), meta)


def _prompt_and_full(rec: dict, tokenizer: Any, line: int, path: str) -> tuple[list[int], list[int]]:
    if "messages" in rec:
        msgs = rec["messages"]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise BadInputError(f"{path}:{line}: 'messages' must end with an assistant turn")
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(msgs, tokenize=True)
            if hasattr(prompt, "keys"):
                prompt, full = prompt["input_ids"], full["input_ids"]
            return list(prompt), list(full)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs[:-1]) + "assistant: "
        answer = msgs[-1]["content"]
    elif "instruction" in rec and "output" in rec:
        tpl = ALPACA_WITH_INPUT if rec.get("input") else ALPACA_NO_INPUT
        text = tpl.format(instruction=rec["instruction"], input=rec.get("input", ""))
        answer = rec["output"]
    else:
        raise BadInputError(
            f"{path}:{line}: expected 'instruction'/'output' (Alpaca) or 'messages' (chat) fields"
        )
    prompt = tokenizer(text, add_special_tokens=True)["input_ids"]
    full = prompt + tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        full.append(tokenizer.eos_token_id)
    return prompt, full


def load_instruct(path: str | Path, tokenizer: Any, seqlen: int, limit: int | None = None) -> Examples:
    p = Path(path)
    if not p.is_file() or p.suffix not in (".jsonl", ".json"):
        raise BadInputError(f"instruction data must be a .jsonl file, got {path}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids, labels, masks = [], [], []
    with open(p, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInputError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            prompt, full = _prompt_and_full(rec, tokenizer, line_no, str(path))
            if len(prompt) >= seqlen:
                continue  # nothing of the response would be learned
            full = full[:seqlen]
            lab = [IGNORE] * len(prompt) + full[len(prompt):]
            n = len(full)
            ids.append(full + [pad] * (seqlen - n))
            labels.append(lab + [IGNORE] * (seqlen - n))
            masks.append([1] * n + [0] * (seqlen - n))
            if limit and len(ids) >= limit:
                break
    if not ids:
        raise BadInputError(f"{path}: no usable examples (prompts longer than --seqlen {seqlen}?)")
    return Examples(torch.tensor(ids), torch.tensor(labels), torch.tensor(masks),
                    {"source": str(path), "format": "instruct", "examples": len(ids), "seqlen": seqlen})
