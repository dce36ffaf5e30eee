"""Peer benchmark of issue #13: eqat (RTN, GPTQ, Block-AP paper/default, + E2E-QP) vs AutoRound, same windows.

Run with eqat's venv python (AutoRound runs in its own venv, see bench/peer_venv.sh):

    EQAT_DATA_DIR=/work/shared/data nice -n 10 python bench/peer_compare.py --bits 2,3,4
    ... --samples 128 --seqlen 512          # second budget: own calibration file, own rows

Every method is a subprocess; its wall time and peak RSS (process + children, polled) are measured.
`default+e2e` = E2E-QP on the `default` output; its time is Block-AP's + E2E-QP's, its RSS the larger one.
Each output (and the FP model once) is evaluated with `eqat eval --ppl wikitext2`. Rows go to the JSON
file as soon as they are done; re-running skips a row whose JSON entry and output both exist (--force
redoes it), so an interrupted benchmark loses at most the row in progress. An unfinished output is
deleted and redone from scratch, so no time is measured on a resumed run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
# method -> (tool, extra flags). Flags may use {samples} and {seqlen} (the calibration budget) and
# {e2e_lr} (E2E_LR at the row's bits) and {e2e_epochs} (E2E_EPOCHS).
# "block-ap" and "e2e-qp" are eqat commands; "autoround" is bench/peer_autoround_run.py in the peer venv.
METHODS: dict[str, tuple[str, list[str]]] = {
    "rtn": ("block-ap", ["--epochs", "0", "--init", "minmax", "--no-channel-scale"]),
    "gptq": ("block-ap", ["--init", "gptq", "--epochs", "0", "--no-channel-scale"]),
    "paper": ("block-ap", ["--recipe", "paper"]),
    "default": ("block-ap", []),
    "default+e2e": (
        "e2e-qp",
        ["--dataset", "c4", "--samples", "{samples}", "--seqlen", "{seqlen}", "--val-samples", "8", "--loss", "kd",
         "--global-batch", "4", "--batch-size", "4", "--epochs", "{e2e_epochs}", "--lr", "{e2e_lr}", "--eval-steps", "8",
         "--no-gradient-checkpointing"],
    ),
    "autoround": ("autoround", ["--iters", "50", "--batch-size", "8"]),
}
E2E_BASE = "default"  # the Block-AP method E2E-QP starts from
# The small-budget E2E-QP recipe (global batch 4 of the calibration budget's windows): learning rate
# per bit width and epochs, chosen on the C4 hold-out (docs/RESULTS.md)
E2E_LR = {2: "2e-3", 3: "4e-4", 4: "2e-4"}
E2E_EPOCHS = 3
EVAL_FLAGS = ["--ppl", "wikitext2", "--seqlen", "512", "--limit", "40"]
MODEL = "smollm2"


def measure(cmd: list[str], log: Path) -> dict:
    """Run cmd, output to log; wall seconds and peak RSS (MiB) of the process tree. Raises on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(cmd)}", flush=True)
    peak = 0
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [ps, *ps.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.5)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {shlex.join(cmd)} (log: {log})")
    return {"cmd": shlex.join(cmd), "wall_s": round(wall, 1), "peak_rss_mib": round(peak / 2**20), "log": str(log)}


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.eqat = [sys.executable, "-m", "eqat_cli"]
        self.budget = f"{args.samples}x{args.seqlen}"
        self.runs = Path(args.runs_dir).resolve()
        self.calib = Path(args.calib or self.runs / f"calib-c4-{self.budget}-val8-s2.safetensors").resolve()
        self.json = Path(args.json)
        self.data = json.loads(self.json.read_text()) if self.json.exists() else {"rows": {}}
        self.failed: list[str] = []
        self.fresh: set[str] = set()  # rows made in this run (--force redoes each row once)

    def save(self) -> None:
        self.data["config"] = {
            "model": MODEL, "methods": METHODS, "eval": EVAL_FLAGS, "e2e_base": E2E_BASE, "e2e_lr": E2E_LR,
            "e2e_epochs": E2E_EPOCHS,
            "env": {k: os.environ.get(k) for k in ("EQAT_DATA_DIR", "PYTHONPATH")},
        }
        self.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.json)

    def done(self, key: str) -> dict | None:
        row = self.data["rows"].get(key)
        if row and (key in self.fresh or not self.a.force) and Path(row["output"]).exists():
            return row
        return None

    def ensure_calib(self) -> None:
        from eqat_cli.train.calib import load_calibration

        if not self.calib.exists():
            cmd = [*self.eqat, "calibrate", MODEL, "--dataset", "c4", "--samples", str(self.a.samples),
                   "--seqlen", str(self.a.seqlen), "--val-samples", "8", "--seed", "2", "-o", str(self.calib)]
            self.data.setdefault("calibration", {})[self.budget] = measure(cmd, self.calib.with_suffix(".log"))
        meta = load_calibration(self.calib).meta  # a given --calib file sets the budget
        self.a.samples, self.a.seqlen = meta["samples"], meta["seqlen"]
        self.budget = f"{self.a.samples}x{self.a.seqlen}"

    def evaluate(self, model: str, out_json: Path) -> tuple[float, dict]:
        step = measure([*self.eqat, "eval", model, *EVAL_FLAGS, "--json", str(out_json)], out_json.with_suffix(".log"))
        return json.loads(out_json.read_text())["perplexity"]["wikitext2"]["ppl"], step

    def fp_ppl(self) -> float:
        if not (row := self.done("fp")):
            ppl, step = self.evaluate(MODEL, self.runs / "eval-fp.json")
            row = self.data["rows"]["fp"] = {"method": "fp", "ppl": ppl, "output": str(self.runs / "eval-fp.json"),
                                             "eval": step}
            self.fresh.add("fp")
            self.save()
        return row["ppl"]

    def quantize(self, method: str, bits: int, out: Path, base: dict | None) -> dict:
        tool, flags = METHODS[method]
        flags = [f.format(samples=self.a.samples, seqlen=self.a.seqlen, e2e_lr=E2E_LR[bits],
                          e2e_epochs=E2E_EPOCHS) for f in flags]
        for stale in (out, out.with_name(out.name + ".partial")):  # eqat's and the runner's work dir
            if stale.exists():  # unfinished (no row): start over, never time a resumed run
                shutil.rmtree(stale)
        log = out.with_name(out.name + ".log")
        if tool == "autoround":
            from eqat_cli.models import classify, local_path

            cmd = [self.a.peer_python, str(HERE / "peer_autoround_run.py"), "--model", str(local_path(classify(MODEL))),
                   "--calib", str(self.calib), "--bits", str(bits), "--group", str(self.a.group), "-o", str(out), *flags]
        elif tool == "e2e-qp":
            cmd = [*self.eqat, "e2e-qp", base["output"], *flags, "-o", str(out)]
        else:
            cmd = [*self.eqat, "block-ap", MODEL, "--bits", str(bits), "--group", str(self.a.group),
                   "--calib", str(self.calib), *flags, "-o", str(out)]
        return measure(cmd, log)

    def row(self, method: str, bits: int) -> dict:
        key = f"{method}/w{bits}g{self.a.group}/{self.budget}"
        if row := self.done(key):
            print(f"= {key}: done (ppl {row['ppl']:.2f}), skipped", flush=True)
            return row
        out = self.runs / f"{method.replace('+', '-')}-w{bits}g{self.a.group}-{self.budget}"
        base = self.row(E2E_BASE, bits) if METHODS[method][0] == "e2e-qp" else None
        steps = [*(base["steps"] if base else []), self.quantize(method, bits, out, base)]
        ppl, ev = self.evaluate(str(out), out.with_name(out.name + ".eval.json"))
        fp = self.fp_ppl()
        row = self.data["rows"][key] = {
            "method": method, "bits": bits, "group": self.a.group, "budget": self.budget, "ppl": ppl,
            "x_fp": ppl / fp, "wall_s": round(sum(s["wall_s"] for s in steps), 1),
            "peak_rss_mib": max(s["peak_rss_mib"] for s in steps), "output": str(out), "steps": steps, "eval": ev,
        }
        self.fresh.add(key)
        self.save()
        return row

    def run(self) -> None:
        self.ensure_calib()
        self.fp_ppl()
        for bits in self.a.bits:
            for method in self.a.methods:
                try:
                    self.row(method, bits)
                except RuntimeError as e:  # one broken method must not stop the others
                    print(f"! {method} w{bits}: {e}", file=sys.stderr, flush=True)
                    self.failed.append(f"{method}/w{bits}")

    def table(self) -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"SmolLM2, WikiText-2 ppl ({' '.join(EVAL_FLAGS[2:])}), calibration c4 {self.budget}")
        for col in ("method", "bits", "ppl", "× FP", "wall s", "peak RSS MiB"):
            t.add_column(col, justify="left" if col == "method" else "right")
        t.add_row("fp", "32", f"{self.data['rows']['fp']['ppl']:.2f}", "1.00", "", "")
        for bits in self.a.bits:
            for m in self.a.methods:
                r = self.data["rows"].get(f"{m}/w{bits}g{self.a.group}/{self.budget}")
                if r:
                    t.add_row(m, f"w{bits}g{self.a.group}", f"{r['ppl']:.2f}", f"{r['x_fp']:.2f}",
                              f"{r['wall_s']:.0f}", str(r["peak_rss_mib"]))
        Console().print(t)


# ------------------------------------------------------------------ llama.cpp (issue #28 item 2)
LLAMA_BIN = Path(os.environ.get("LLAMA_CPP_BIN", "/work/bench-rt/llama.cpp/build/bin"))
LLAMA_CONVERT = Path(os.environ.get("LLAMA_CPP_CONVERT",
                                    "/work/bench-rt/llama.cpp/src/vendor/llama.cpp/convert_hf_to_gguf.py"))
EQAT_READS_GGUF = ("Q4_0", "Q4_1")  # GGML types eqat (transformers) loads: evaluated by eqat's protocol
LINEAR_TENSORS = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.")


def gguf_linear_bits(path: Path) -> float:
    """Bits per weight over the decoder's linear weights, from the GGUF tensor sizes (all metadata of
    the quantized blocks, scales and minimums included)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    nbytes = weights = 0
    for t in r.tensors:
        if t.name.startswith("blk.") and any(k in t.name for k in LINEAR_TENSORS) and t.name.endswith(".weight"):
            nbytes += int(t.n_bytes)
            weights += int(t.n_elements)
    return 8 * nbytes / weights


def llamacpp_rows(runs: Path, calib: Path, types: list[str], eqat: list[str], wikitext: Path) -> dict[str, dict]:
    """llama.cpp's own quantizer on the same FP SmolLM2 and the same calibration windows, as rows.

    1. the FP model as eqat runs it (``eqat pack smollm2 --format fp16``), converted to an F32 GGUF by
       llama.cpp's ``convert_hf_to_gguf.py``;
    2. the calibration windows decoded to text, ``llama-imatrix -c SEQLEN`` over them (one chunk per window);
    3. ``llama-quantize --imatrix`` to each type;
    4. evaluation: ``eqat eval`` (EVAL_FLAGS, the project's protocol) for types eqat reads
       (``EQAT_READS_GGUF``); every type (and the FP GGUF) also by ``llama-perplexity -c 512 --chunks 40``
       on the WikiText-2 test file, whose protocol differs (it scores the second half of each window),
       so compare those rows only with each other (and with their FP row).
    Bits per weight: over the linear weights, from the GGUF tensor sizes."""
    from eqat_cli.train.calib import load_calibration
    from eqat_cli.models import resolve

    runs.mkdir(parents=True, exist_ok=True)
    fp_dir, fp_gguf = runs / "fp16", runs / "fp32.gguf"
    if not fp_dir.exists():
        measure([*eqat, "pack", MODEL, "--format", "fp16", "-o", str(fp_dir)], runs / "pack-fp16.log")
    if not fp_gguf.exists():
        measure([sys.executable, str(LLAMA_CONVERT), str(fp_dir), "--outtype", "f32", "--outfile", str(fp_gguf)],
                runs / "convert.log")
    c = load_calibration(calib)
    seqlen = int(c.train.shape[1])
    text = runs / "calib.txt"
    if not text.exists():
        tok = resolve(MODEL, device="cpu").tokenizer
        text.write_text("".join(tok.decode(w) for w in c.train.tolist()))
    imatrix = runs / "imatrix.gguf"
    if not imatrix.exists():
        measure([str(LLAMA_BIN / "llama-imatrix"), "-m", str(fp_gguf), "-f", str(text), "-c", str(seqlen),
                 "--chunks", str(len(c.train)), "-t", "2", "-o", str(imatrix)], runs / "imatrix.log")

    def llama_ppl(model: Path) -> float:
        log = runs / f"ppl-{model.stem}.log"
        measure([str(LLAMA_BIN / "llama-perplexity"), "-m", str(model), "-f", str(wikitext), "-c", "512",
                 "--chunks", "40", "-t", "2"], log)
        final = [ln for ln in log.read_text().splitlines() if "Final estimate: PPL" in ln]
        return float(final[-1].split("=")[1].split()[0])

    rows = {"llamacpp-fp": {"method": "llama.cpp FP (F32 GGUF)", "llama_perplexity": llama_ppl(fp_gguf),
                            "output": str(fp_gguf)}}
    for qtype in types:
        out = runs / f"smollm2-{qtype.lower()}.gguf"
        step = measure([str(LLAMA_BIN / "llama-quantize"), "--imatrix", str(imatrix), str(fp_gguf), str(out), qtype, "2"],
                       runs / f"quantize-{qtype}.log")
        row = {"method": f"llama.cpp {qtype} + imatrix", "type": qtype, "bits_per_linear_weight": gguf_linear_bits(out),
               "quantize": step, "output": str(out), "llama_perplexity": llama_ppl(out)}
        if qtype.upper() in EQAT_READS_GGUF:
            ev = runs / f"eval-{qtype}.json"
            row["eval"] = measure([*eqat, "eval", str(out), *EVAL_FLAGS, "--json", str(ev)], ev.with_suffix(".log"))
            row["ppl"] = json.loads(ev.read_text())["perplexity"]["wikitext2"]["ppl"]
        rows[f"llamacpp-{qtype}"] = row
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="2,3,4", type=lambda s: [int(b) for b in s.split(",")])
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--methods", default=",".join(METHODS), type=lambda s: s.split(","),
                    help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    ap.add_argument("--calib", help="calibration file (made if missing; default: in --runs-dir, per budget)")
    ap.add_argument("--runs-dir", default="runs/peer", help="outputs, logs and eval JSONs")
    ap.add_argument("--json", default=str(HERE / "results" / "peer_compare.json"), help="results (kept rows)")
    ap.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON", "/work/peer-venv/bin/python"),
                    help="python of the venv made by bench/peer_venv.sh")
    ap.add_argument("--force", action="store_true", help="redo rows that are already done")
    ap.add_argument("--llamacpp", type=lambda s: s.split(","), default=None,
                    help="only the llama.cpp rows: llama-imatrix on the calibration windows, then llama-quantize to "
                         "these types (e.g. Q4_0,IQ4_XS,Q2_K,Q3_K_M), into --json")
    args = ap.parse_args()
    if args.llamacpp:
        data = Path(os.environ.get("EQAT_DATA_DIR", "/work/shared/data"))
        rows = llamacpp_rows(Path(args.runs_dir) / "llamacpp", Path(args.calib), args.llamacpp,
                             [sys.executable, "-m", "eqat_cli"], data / "wikitext-2-raw" / "wiki.test.raw")
        out = Path(args.json)
        doc = json.loads(out.read_text()) if out.exists() else {"rows": {}}
        doc.setdefault("rows", {}).update(rows)
        out.write_text(json.dumps(doc, indent=2))
        for k, r in rows.items():
            print(k, {x: r.get(x) for x in ("bits_per_linear_weight", "ppl", "llama_perplexity")})
        return
    if unknown := set(args.methods) - set(METHODS):
        ap.error(f"unknown method(s) {','.join(sorted(unknown))}; choose from {','.join(METHODS)}")
    bench = Bench(args)
    bench.run()
    bench.table()
    if bench.failed:
        sys.exit(f"failed: {', '.join(bench.failed)}")


if __name__ == "__main__":
    main()
