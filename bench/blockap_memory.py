"""Peak RSS of Block-AP on synthetic Llama-shaped models stored on disk (several GB).

Builds random full-precision Llama checkpoints of the same width with different depths, written
shard by shard (never whole in memory), runs ``eqat block-ap`` on each in a fresh process, and
reports the peak resident set size. Each run calls the library entry of ``eqat block-ap``
(:func:`eqat_cli.train.block_ap.block_ap_from_spec`), as the command does. Peak RSS should follow the block size and the calibration set,
not the number of layers.

    python bench/blockap_memory.py --hidden 2048 --layers 8 32 --json bench/results/blockap_memory.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def build_checkpoint(path: Path, hidden: int, layers: int, inter: int, vocab: int) -> int:
    """Random fp16 Llama weights in one shard per block; returns bytes on disk."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                      max_position_embeddings=4096, tie_word_embeddings=False, dtype="float16",
                      architectures=["LlamaForCausalLM"])
    path.mkdir(parents=True)
    cfg.save_pretrained(str(path))
    g = torch.Generator().manual_seed(0)
    kv = cfg.num_key_value_heads * (hidden // cfg.num_attention_heads)
    shapes = {
        "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    weight_map = {}
    n_files = layers + 1
    for i in range(layers):
        sd = {f"model.layers.{i}.{k}": (torch.randn(s, generator=g) * s[1] ** -0.5).half() for k, s in shapes.items()}
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
        sd[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
        name = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(sd, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in sd})
    rest = {"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).half(),
            "model.norm.weight": torch.ones(hidden, dtype=torch.float16),
            "lm_head.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).half()}
    name = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
    save_file(rest, str(path / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in rest})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    word_tokenizer(vocab).save_pretrained(str(path))
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def word_tokenizer(vocab: int):
    """A tokenizer of ``vocab`` made-up words (``t0``, ``t1``, ...), built in memory: the synthetic
    models have no text, but ``eqat block-ap`` checks the calibration file's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - 2)}
    words.update({"<s>": vocab - 2, "</s>": vocab - 1})
    tk = Tokenizer(models.WordLevel(vocab=words, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="t0")


def make_calibration(path: Path, samples: int, seqlen: int, vocab: int) -> None:
    """A calibration file of random token windows, for :func:`word_tokenizer`."""
    import torch

    from eqat_cli.train.calib import FORMAT, FORMAT_VERSION, Calibration, save_calibration, tokenizer_fingerprint

    g = torch.Generator().manual_seed(0)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": "random tokens", "seed": 0,
            "samples": samples, "val_samples": 2, "seqlen": seqlen, "tokenizer": "random words",
            "tokenizer_fingerprint": tokenizer_fingerprint(word_tokenizer(vocab))}
    save_calibration(Calibration(torch.randint(0, vocab, (samples, seqlen), generator=g),
                                 torch.randint(0, vocab, (2, seqlen), generator=g), meta), path)


RUNNER = """
import sys, torch, json, time
from pathlib import Path
from eqat_cli.memory import peak_rss_bytes, rss_bytes
from eqat_cli.train.block_ap import BlockAPConfig, block_ap_from_spec
model, calib, out, epochs, offload = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
trace = []
def progress(event, info):
    if event == "block_end":  # RSS once the finished block is freed, and the peak so far
        trace.append((round(rss_bytes() / 2**20), round(peak_rss_bytes() / 2**20)))
t = time.time()
res = block_ap_from_spec(model, Path(out), BlockAPConfig.paper(bits=2, group_size=64, epochs=epochs,
                         offload_to_disk=offload), calib=Path(calib), device="cpu", progress=progress)
print(json.dumps({"seconds": time.time() - t, "peak_rss_mb": peak_rss_bytes() / 2**20,
                  "rss_after_block_mb": [r for r, _ in trace], "peak_after_block_mb": [p for _, p in trace]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--offload-to-disk", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="eqat-bench-"))
    rows = []
    calib = work / "calib.safetensors"
    make_calibration(calib, args.samples, args.seqlen, args.vocab)
    for n in args.layers:
        model = work / f"llama-{args.hidden}x{n}"
        if model.exists():
            shutil.rmtree(model)
        disk = build_checkpoint(model, args.hidden, n, args.inter, args.vocab)
        out = work / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(model), str(calib), str(out), str(args.epochs),
                               "1" if args.offload_to_disk else "0"], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        row = {"layers": n, "hidden": args.hidden, "checkpoint_gb": round(disk / 1e9, 2),
               "fp32_model_gb": round(disk * 2 / 1e9, 2), "peak_rss_mb": round(r["peak_rss_mb"]),
               "seconds": round(r["seconds"], 1),
               "rss_after_block_mb": r["rss_after_block_mb"], "peak_after_block_mb": r["peak_after_block_mb"],
               "samples": args.samples, "seqlen": args.seqlen,
               "epochs": args.epochs, "offload_to_disk": args.offload_to_disk}
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(model)
        shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "command": " ".join(sys.argv)}, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
