"""Where an E2E-QP step's time goes, beside a dense step: torch.profiler, calls interleaved.

One forward + backward of the next-token loss (no optimizer, no checkpointing) on random tokens,
alternating the packed model (RTN codes, step sizes trainable) and the dense fp32 model, ROUNDS
times; prints wall time, the time inside matrix products and the call counts per round, then the
top operators of the last packed round.

    OMP_NUM_THREADS=1 python bench/e2e_profile.py smollm2 --seqlen 128
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile

from eqat_cli.scheme import QuantScheme

MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")


def main(argv=None) -> int:
    from eqat_cli.models import resolve
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.train.e2e_qp import loss_sums, prepare_student

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    lm = resolve(a.model, device="cpu")
    fp = lm.model.float()
    packed = rtn_quantize_model(copy.deepcopy(fp), lm.arch, QuantScheme(a.bits, a.group))
    prepare_student(packed, train_zeros=False, checkpointing=False)
    packed.train()
    fp.train()
    vocab = fp.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, a.seqlen), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def step(m):
        obj, _, n = loss_sums(m, ids, ids, mask)
        (obj / n).backward()

    step(packed)
    step(fp)
    last = None
    for r in range(a.rounds):
        for name, m in (("packed", packed), ("dense", fp)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                step(m)
                wall = time.perf_counter() - t
            ka = {e.key: e for e in prof.key_averages()}
            mm = sum(ka[k].self_cpu_time_total for k in MATMULS if k in ka) / 1e6
            calls = {k: ka[k].count for k in MATMULS if k in ka}
            print(f"round {r + 1} {name:6s} {wall:7.2f} s wall, {mm:7.2f} s in matmuls {calls}", flush=True)
            if name == "packed":
                last = prof
    print(last.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
