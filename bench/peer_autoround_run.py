"""AutoRound 0.16.1 on eqat's calibration windows, exported as GPTQ (run with the peer venv's python).

    /work/peer-venv/bin/python bench/peer_autoround_run.py --model HF_DIR --calib CAL.safetensors \
        --bits 4 --group 64 -o OUT_DIR [--iters 50 --batch-size 8 --nsamples 64 --json SUMMARY]

Data: AutoRound is given the calibration file's training windows as token ids, not text: a list of
``{"input_ids": [1, seqlen], "attention_mask": ones}`` dicts (AutoRound 0.16.1 accepts a list as
``dataset`` and feeds each element to the model as is, ``calibration/llm.py: LLMCalibrator.calib``). So it
sees exactly the windows Block-AP sees, with no re-tokenization. The explicit all-ones mask keeps the FP
forward identical to eqat's: without it AutoRound would build ``input_ids != pad_token_id`` as the attention
mask, and SmolLM2's pad token is its EOS, which eqat's windows use as the document separator. AutoRound's
own loss mask still drops the last position and pad(=EOS) positions (``_compute_valid_token_mask``).

Everything else is AutoRound's default (SignRound, best-iteration selection, bf16 autocast on a CPU with
AVX512-BF16 unless --no-amp, fp16 scales, lm_head and embeddings not quantized). The model is the HF
directory eqat made from the shipped GGUF (fp32), so both tools start from identical weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def load_windows(path: str) -> tuple[torch.Tensor, dict]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("json", "{}"))
        train = f.get_tensor("train").to(torch.int64)
    if meta.get("format") != "eqat-calibration":
        raise SystemExit(f"{path} is not an eqat calibration file")
    return train, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF directory (fp32) of the FP model")
    ap.add_argument("--calib", required=True, help="file from `eqat calibrate`")
    ap.add_argument("-o", "--output", required=True, help="GPTQ output directory")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--sym", action="store_true", help="symmetric (default: asymmetric, like eqat)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=None, help="default: all training windows")
    ap.add_argument("--lr", type=float, default=None, help="default: AutoRound's (1/iters)")
    ap.add_argument("--no-amp", action="store_true", help="tune in fp32 instead of AutoRound's bf16 autocast")
    ap.add_argument("--seed", type=int, default=42, help="AutoRound's default seed")
    ap.add_argument("--json", help="write a small summary here")
    args = ap.parse_args()

    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    train, meta = load_windows(args.calib)
    nsamples = args.nsamples or train.shape[0]
    if nsamples > train.shape[0]:
        raise SystemExit(f"--nsamples {nsamples} > {train.shape[0]} windows in {args.calib}")
    seqlen = train.shape[1]
    windows = [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in train[:nsamples]]

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    kwargs = {"lr": args.lr} if args.lr is not None else {}
    if args.no_amp:
        kwargs["amp"] = False
    t0 = time.perf_counter()
    ar = AutoRound(
        model,
        tokenizer=tok,
        bits=args.bits,
        group_size=args.group,
        sym=args.sym,
        iters=args.iters,
        batch_size=args.batch_size,
        seqlen=seqlen,
        nsamples=nsamples,
        dataset=windows,
        seed=args.seed,
        **kwargs,
    )
    # AutoRound saves into a subdirectory it names (<model>-w4g64); build it beside the output and move it
    # there when complete, so the output directory exists only for a finished run.
    out, partial = Path(args.output), Path(args.output + ".partial")
    if out.exists():
        raise SystemExit(f"{out} exists")
    shutil.rmtree(partial, ignore_errors=True)
    ar.quantize_and_save(str(partial), format="auto_gptq")
    next(partial.rglob("config.json")).parent.rename(out)
    shutil.rmtree(partial)
    seconds = time.perf_counter() - t0
    summary = {
        "tool": "auto-round",
        "version": __import__("auto_round").__version__,
        "bits": args.bits,
        "group_size": args.group,
        "sym": args.sym,
        "iters": args.iters,
        "batch_size": args.batch_size,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "calib": str(Path(args.calib).resolve()),
        "calib_meta": meta,
        "data": "token ids of the calibration file's training windows, all-ones attention mask",
        "seconds_in_process": round(seconds, 1),
        "output": str(out.resolve()),
    }
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
