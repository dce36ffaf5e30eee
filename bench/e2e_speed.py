"""E2E-QP training speed beside a dense fp32 training step of the same model, in one run.

Times, on the same random token batch and the same machine, one after the other:

* ``dense``: full-precision fp32 training step, every weight trained (AdamW), next-token loss;
* ``e2e_ntp``: E2E-QP step on the packed model (RTN codes; step sizes train), next-token loss;
* ``e2e_kd``: the same with ``--loss kd`` (the full-precision teacher alongside);
* ``e2e_ntp_bf16``, ``e2e_kd_bf16``: the same two under bf16 autocast, what ``--precision auto``
  runs on CPUs with bf16 units (timed only there, or with ``--bf16``);
* ``teacher_forward``: the teacher's forward alone (what KD adds per step, and what a cache of
  top-k teacher logits would cost once per example);
* ``topk_cache``: bytes per token of a cached top-k teacher distribution, and the time to read
  every block's weights from the checkpoint (what a block-streamed teacher pays per micro-batch).

Steps of all kinds are interleaved and the median is reported, so that a changing load on a
shared machine affects all alike. Prints a table and writes JSON (``--json``). Speeds are training
tokens per second.

    python bench/e2e_speed.py smollm2 --bits 4 --group 64 --seqlen 512 --json bench/results/e2e_speed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from eqat_cli.scheme import QuantScheme


def _interleaved(fns: dict, steps: int) -> tuple[dict, dict]:
    """Median wall and CPU seconds per call of each function, calls interleaved (A B C A B C ...)
    after one warm-up call each, so that a load change on a shared machine hits every kind alike.
    CPU time (``time.process_time``) counts only the time this process ran: with one thread it is
    the compute time whatever else shares the cores (with more threads it adds up the threads)."""
    for fn in fns.values():
        fn()
    wall: dict = {k: [] for k in fns}
    cpu: dict = {k: [] for k in fns}
    for r in range(steps):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
            print(f"  (round {r + 1}: {k} {wall[k][-1]:.3f} s wall, {cpu[k][-1]:.3f} s CPU)", file=sys.stderr, flush=True)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def _read_all_weights(path: Path) -> float:
    """Seconds to read every tensor of the checkpoint (page cache warm): a block-streamed teacher's I/O."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    t = time.perf_counter()
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                fh.get_tensor(k)
    return time.perf_counter() - t


def run(spec: str, bits: int, group: int, seqlen: int, batch: int, steps: int, checkpointing: bool,
        topk: int = 64, bf16: bool | None = None) -> dict:
    from eqat_cli.device import cpu_has_bf16
    from eqat_cli.models import resolve
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.train.e2e_qp import (_enable_checkpointing, loss_sums, prepare_student)

    lm = resolve(spec, device="cpu")
    fp = lm.model.float()
    vocab = fp.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seqlen), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    tokens = batch * seqlen

    packed = rtn_quantize_model(copy.deepcopy(fp), lm.arch, QuantScheme(bits, group))
    params = prepare_student(packed, train_zeros=False, checkpointing=checkpointing)
    opt = torch.optim.AdamW(params, lr=1e-5)
    packed.train()

    def e2e_step(teacher=None, autocast=False):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            obj, _, n = loss_sums(packed, ids, labels, mask, teacher)
        (obj / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()

    out: dict = {"model": spec, "bits": bits, "group": group, "seqlen": seqlen, "batch": batch, "steps": steps,
                 "gradient_checkpointing": checkpointing, "threads": torch.get_num_threads(),
                 "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                 "parameters": sum(p.numel() for p in fp.parameters()),
                 "trainable_step_sizes": sum(p.numel() for p in params)}
    teacher = copy.deepcopy(fp).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def teacher_forward():
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=mask)

    dense = fp
    for p in dense.parameters():
        p.requires_grad_(True)
    if checkpointing:
        _enable_checkpointing(dense)
    dense.train()
    dense_opt = torch.optim.AdamW([p for p in dense.parameters()], lr=1e-5)

    def dense_step():
        dense_opt.zero_grad(set_to_none=True)
        obj, _, n = loss_sums(dense, ids, labels, mask)
        (obj / n).backward()
        torch.nn.utils.clip_grad_norm_(list(dense.parameters()), 0.3)
        dense_opt.step()

    kinds = {"dense": dense_step, "e2e_ntp": e2e_step, "e2e_kd": lambda: e2e_step(teacher),
             "teacher_forward": teacher_forward}
    if cpu_has_bf16() if bf16 is None else bf16:
        kinds |= {"e2e_ntp_bf16": lambda: e2e_step(None, True), "e2e_kd_bf16": lambda: e2e_step(teacher, True)}
    res, cpu = _interleaved(kinds, steps)
    out["seconds_per_step"] = res
    out["cpu_seconds_per_step"] = cpu
    out["tokens_per_second"] = {k: tokens / v for k, v in res.items()}
    out["tokens_per_cpu_second"] = {k: tokens / v for k, v in cpu.items()}
    out["e2e_ntp_vs_dense"] = res["dense"] / res["e2e_ntp"]
    out["e2e_ntp_vs_dense_cpu"] = cpu["dense"] / cpu["e2e_ntp"]
    out["teacher"] = {
        "alongside_extra_bytes": sum(p.numel() * p.element_size() for p in teacher.parameters()),
        "alongside_extra_cpu_seconds_per_step": cpu["e2e_kd"] - cpu["e2e_ntp"],
        f"top{topk}_cache_bytes_per_token": topk * (4 + 4),  # fp32 log-prob + int32 index
        "block_streamed_read_seconds_per_micro_batch": _read_all_weights(lm.path) if lm.path else None,
    }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="full-precision model spec (quantized here with RTN: speed does not depend on values)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="also time the bf16-autocast E2E-QP steps (default: where the CPU has bf16 units)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    out = run(a.model, a.bits, a.group, a.seqlen, a.batch, a.steps, a.checkpointing, bf16=a.bf16)
    print(f"{a.model} w{a.bits}g{a.group}, {a.batch} x {a.seqlen} tokens, {out['threads']} threads, "
          f"checkpointing {'on' if a.checkpointing else 'off'}")
    print(f"  {'':16s} {'wall s/step':>12s} {'tok/s':>8s} {'CPU s/step':>11s} {'tok/CPU-s':>10s}")
    for k, v in out["seconds_per_step"].items():
        c = out["cpu_seconds_per_step"][k]
        print(f"  {k:16s} {v:12.3f} {out['tokens_per_second'][k]:8.1f} {c:11.3f} {out['tokens_per_cpu_second'][k]:10.1f}")
    print(f"  E2E-QP (ntp) speed / dense: {out['e2e_ntp_vs_dense']:.2f}x wall, {out['e2e_ntp_vs_dense_cpu']:.2f}x CPU")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
