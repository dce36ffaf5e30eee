"""Checkpoints byte for byte: build the same checkpoints from a fixed-seed tiny model and print the
sha256 of every file, so that two versions of eqat can be compared (issue 25: "behaviour must not
change").

What it builds, in one fixed work directory (paths are recorded in the metadata, so both versions
must build in the same place; ``--keep DIR`` copies the result away afterwards):

- ``fp/``: a tiny random Llama (seed 0) and a byte-level tokenizer;
- ``rtn/``: Block-AP with 0 epochs (RTN), w4g32;
- ``blockap/``: a short Block-AP run (paper recipe, 1 epoch), w2g32;
- ``e2e/``: two E2E-QP steps (next-token loss) from ``rtn/``;
- ``pack-*``: ``eqat pack`` of ``rtn/`` to every format, and of ``blockap/`` to eqat, gptq_v2, fp16.

Usage::

    python bench/checkpoint_identity.py --label before --keep /work/wt/h25f-before
    python bench/checkpoint_identity.py --label after
    python bench/checkpoint_identity.py --compare bench/results/checkpoint_identity_before.json \
        bench/results/checkpoint_identity_after.json --trees /work/wt/h25f-before /tmp/eqat_ckid

``--compare`` lists the files whose bytes differ and, given both trees, whether their tensors are
identical (safetensors / GGUF) and which JSON keys differ. Files that record wall-clock seconds
(``blockap_summary.json``, ``e2e_history.json``) are also hashed with those fields removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"seconds", "elapsed", "time", "wall_seconds", "step_seconds", "tokens_per_second"}


def _strip_timings(obj):
    if isinstance(obj, dict):
        return {k: _strip_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip_timings(v) for v in obj]
    return obj


def file_hashes(root: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(f.relative_to(root))
        data = f.read_bytes()
        row = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        if f.name in ("blockap_summary.json", "e2e_history.json"):
            norm = json.dumps(_strip_timings(json.loads(data)), sort_keys=True).encode()
            row["sha256_without_timings"] = hashlib.sha256(norm).hexdigest()
        out[rel] = row
    return out


def build(work: Path) -> None:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build as build_model, save_tiny, tiny_llama_config, tiny_tokenizer

    from eqat_cli.models import resolve
    from eqat_cli.pack import pack_model
    from eqat_cli.train.block_ap import BlockAPConfig, run_block_ap
    from eqat_cli.train.calib import build_windows
    from eqat_cli.train.e2e_qp import E2EConfig, run_e2e_qp
    from eqat_cli.train.sft_data import from_windows

    torch.set_num_threads(1)
    text = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(60)) for i in range(40)]
    fp = save_tiny(build_model(tiny_llama_config()), work / "fp")
    c = build_windows(text, tiny_tokenizer(), 8, 32, 2, 0, source="synthetic")
    cpu = torch.device("cpu")
    meta = {"calibration": c.meta, "source_model": str(fp)}
    run_block_ap(fp, tiny_tokenizer(), c.train, c.val, BlockAPConfig.paper(bits=4, group_size=32, epochs=0),
                 work / "rtn", cpu, extra_meta=meta)
    run_block_ap(fp, tiny_tokenizer(), c.train, c.val,
                 BlockAPConfig.paper(bits=2, group_size=32, epochs=1, batch_size=2), work / "blockap", cpu,
                 extra_meta=meta)
    lm = resolve(str(work / "rtn"))
    w = build_windows(text, tiny_tokenizer(), 8, 32, 4, 0, source="synthetic")
    run_e2e_qp(lm.model, lm.tokenizer, from_windows(w.train, w.meta), from_windows(w.val, w.meta),
               E2EConfig(loss="ntp", global_batch=4, batch_size=2, eval_steps=1, precision="fp32"),
               work / "e2e", cpu, 4, {"bits": 4, "group_size": 32, "architecture": "llama",
                                      "source_model": str(fp)})
    for fmt in ("eqat", "gptq", "gptq_v2", "fp16", "gguf"):
        out = work / (f"pack-rtn-{fmt}" + (".gguf" if fmt == "gguf" else ""))
        pack_model(str(work / "rtn"), fmt, out)
    for fmt in ("eqat", "gptq_v2", "fp16"):
        pack_model(str(work / "blockap"), fmt, work / f"pack-blockap-{fmt}")


def _tensors(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from gguf import GGUFReader

    return {t.name: t.data.tobytes() for t in GGUFReader(str(path)).tensors}


def _same(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _json_diff(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _json_diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}" if path else k)
    elif a != b:
        yield f"{path}: {json.dumps(a)[:120]} -> {json.dumps(b)[:120]}"


def compare(before: dict, after: dict, trees: list[Path] | None) -> int:
    fa, fb = before["files"], after["files"]
    differ = 0
    for rel in sorted(set(fa) | set(fb)):
        a, b = fa.get(rel), fb.get(rel)
        if a is None or b is None:
            print(f"ONLY IN {'after' if a is None else 'before'}: {rel}")
            differ += 1
            continue
        if a["sha256"] == b["sha256"]:
            continue
        if a.get("sha256_without_timings") and a["sha256_without_timings"] == b.get("sha256_without_timings"):
            print(f"timings only: {rel}")
            continue
        differ += 1
        print(f"DIFFERS: {rel}")
        if not trees:
            continue
        pa, pb = trees[0] / rel, trees[1] / rel
        if pa.suffix in (".safetensors", ".gguf"):
            ta, tb = _tensors(pa), _tensors(pb)
            same = set(ta) == set(tb) and all(_same(ta[k], tb[k]) for k in ta)
            print(f"    tensors {'IDENTICAL' if same else 'DIFFER'} ({len(ta)} tensors)")
        elif pa.suffix == ".json":
            for line in _json_diff(json.loads(pa.read_text()), json.loads(pb.read_text())):
                print(f"    {line}")
    print(f"{len(set(fa) | set(fb))} files, {differ} differ in bytes")
    return differ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/eqat_ckid"))
    ap.add_argument("--label", default="run")
    ap.add_argument("--keep", type=Path, help="copy the built tree here")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE_JSON", "AFTER_JSON"))
    ap.add_argument("--trees", nargs=2, type=Path, metavar=("BEFORE_DIR", "AFTER_DIR"))
    args = ap.parse_args()
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        compare(a, b, args.trees)
        return
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    build(args.work)
    files = file_hashes(args.work)
    for rel, row in files.items():
        print(f"{row['sha256']}  {rel}")
    import subprocess

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {"label": args.label, "commit": commit, "work": str(args.work), "files": files}
    out = REPO / "bench" / "results" / f"checkpoint_identity_{args.label}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    if args.keep:
        if args.keep.exists():
            shutil.rmtree(args.keep)
        shutil.copytree(args.work, args.keep)


if __name__ == "__main__":
    main()
