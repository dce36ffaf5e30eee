"""Fuzz every eqat reader of untrusted bytes with 10,000 mutated inputs each (issue #29).

    PYTHONPATH=.:kernels python bench/fuzz_readers.py [--n 10000] [--targets a,b] [--out FILE]

The targets and mutations are ``tests/fuzz_targets.py``'s (the CI test runs a bounded number of
them through hypothesis). Input ``i`` of a target is made from ``random.Random(i)``, so every
finding is reproducible by its seed. Each target runs in a worker process that reports after every
input; the parent watches it: an input that takes more than ``--hang`` seconds (10) is a hang and
one that drives the worker's RSS over ``--rss-limit`` MB (2048) is a memory failure; in both cases
the worker is killed and restarted at the next seed. Reported per target: inputs, read, refused in
one line, tracebacks (any exception other than an EqatError, or a multi-line message), hangs,
memory failures, the peak RSS of the worker (max of its ru_maxrss and the parent's samples,
imports included) and the largest input. JSON: bench/results/fuzz_readers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def worker(name: str, start: int, end: int) -> None:
    import fuzz_targets as ft

    target = ft.TARGETS[name]
    out = sys.stdout
    with tempfile.TemporaryDirectory(prefix="eqat-fuzz-") as d:
        # Warm up (imports: transformers takes seconds) before the watchdog starts timing inputs.
        ft.classify_one(target, Path(d), ft.RandomSource(-1))
        for seed in range(start, end):
            out.write(f"start {seed}\n")
            out.flush()
            status, detail, size = ft.classify_one(target, Path(d), ft.RandomSource(seed))
            rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out.write(json.dumps({"seed": seed, "status": status, "detail": detail, "size": size,
                                  "rss_kb": rss_kb}) + "\n")
            out.flush()


def run_target(name: str, n: int, hang_s: float, rss_limit_mb: float) -> dict:
    import psutil

    res = {"inputs": 0, "ok": 0, "refused": 0, "tracebacks": 0, "hangs": 0, "rss_failures": 0,
           "peak_rss_mb": 0.0, "max_input_bytes": 0, "examples": [], "seconds": 0.0}
    t0 = time.time()
    seed = 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")]))
    while seed < n:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", name, str(seed), str(n)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, bufsize=1)
        ps = psutil.Process(proc.pid)
        current, started = None, time.time()
        failure = None
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            try:
                rss = ps.memory_info().rss / 2**20
            except psutil.Error:
                rss = 0.0
            res["peak_rss_mb"] = max(res["peak_rss_mb"], rss)
            if rss > rss_limit_mb:
                failure = "rss_failures"
            elif current is not None and time.time() - started > hang_s:
                failure = "hangs"
            if failure:
                proc.kill()
                proc.wait()
                res[failure] += 1
                res["inputs"] += 1
                res["examples"].append({"seed": current, "status": failure[:-1]})
                seed = (current if current is not None else seed) + 1
                break
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:  # the worker exited
                proc.wait()
                if current is not None:  # died inside an input (a segfault, an abort)
                    res["tracebacks"] += 1
                    res["inputs"] += 1
                    res["examples"].append({"seed": current, "status": "crash",
                                            "detail": f"worker died with exit code {proc.returncode}"})
                    seed = current + 1
                else:
                    seed = n
                break
            if line.startswith("start "):
                current, started = int(line.split()[1]), time.time()
                continue
            rec = json.loads(line)
            current = None
            seed = rec["seed"] + 1
            res["inputs"] += 1
            res["max_input_bytes"] = max(res["max_input_bytes"], rec["size"])
            res["peak_rss_mb"] = max(res["peak_rss_mb"], rec["rss_kb"] / 1024)
            if rec["status"] == "crash":
                res["tracebacks"] += 1
                if len(res["examples"]) < 10:
                    res["examples"].append({k: rec[k] for k in ("seed", "status", "detail")})
            else:
                res[rec["status"]] += 1
    res["seconds"] = round(time.time() - t0, 1)
    res["peak_rss_mb"] = round(res["peak_rss_mb"], 1)
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    import fuzz_targets as ft

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="inputs per target")
    ap.add_argument("--targets", default=",".join(ft.TARGETS), help="comma-separated target names")
    ap.add_argument("--hang", type=float, default=10.0, help="seconds after which one input is a hang")
    ap.add_argument("--rss-limit", type=float, default=2048.0, help="MB of worker RSS that count as a failure")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "fuzz_readers.json"))
    args = ap.parse_args()
    results = {}
    for name in args.targets.split(","):
        r = run_target(name, args.n, args.hang, args.rss_limit)
        results[name] = r
        print(f"{name:22s} inputs {r['inputs']:6d}  read {r['ok']:6d}  refused {r['refused']:6d}  "
              f"tracebacks {r['tracebacks']:3d}  hangs {r['hangs']:2d}  rss>limit {r['rss_failures']:2d}  "
              f"peak RSS {r['peak_rss_mb']:7.1f} MB  max input {r['max_input_bytes']:7d} B  {r['seconds']:7.1f} s",
              flush=True)
        for ex in r["examples"][:3]:
            print(f"    seed {ex['seed']}: {ex['status']} {ex.get('detail', '')}", flush=True)
    total = {k: sum(r[k] for r in results.values()) for k in ("inputs", "tracebacks", "hangs", "rss_failures")}
    total["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results.values())
    print("total", json.dumps(total))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "what": "bench/fuzz_readers.py: mutated inputs per reader of untrusted bytes (tests/fuzz_targets.py)",
        "inputs_per_target": args.n, "hang_seconds": args.hang, "rss_limit_mb": args.rss_limit,
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "total": total, "targets": results,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
