"""Golden runs: tiny fixed-seed model -> calibrate, Block-AP (default + paper recipe, RTN), E2E-QP (ntp + kd).
Usage: golden.py OUTDIR   (model dir /tmp/h25t/model is created once and reused)."""
import hashlib, os, subprocess, sys
from pathlib import Path
sys.path.insert(0, "/work/wt/h25t/tests")
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
model = Path("/tmp/h25t/model")
if not model.exists():
    from conftest import build, tiny_llama_config, save_tiny
    save_tiny(build(tiny_llama_config(), seed=0), model)
    text = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(60)) for i in range(40)]
    Path("/tmp/h25t/corpus.txt").write_text("\n\n".join(text))
corpus = "/tmp/h25t/corpus.txt"
env = dict(os.environ)
def eqat(*a):
    r = subprocess.run([sys.executable, "-m", "eqat_cli", *map(str, a)], env=env, capture_output=True, text=True)
    if r.returncode: print(r.stdout, r.stderr); sys.exit(1)
eqat("calibrate", model, "--dataset", corpus, "--samples", "8", "--seqlen", "32", "--val-samples", "2", "-o", out / "c.safetensors")
eqat("block-ap", model, "--bits", "2", "--group", "32", "--calib", out / "c.safetensors", "-o", out / "bap", "--device", "cpu")
eqat("block-ap", model, "--bits", "4", "--group", "32", "--calib", out / "c.safetensors", "-o", out / "bap_paper", "--recipe", "paper", "--epochs", "1", "--device", "cpu")
eqat("block-ap", model, "--bits", "3", "--group", "32", "--epochs", "0", "--calib", out / "c.safetensors", "-o", out / "rtn", "--device", "cpu")
eqat("e2e-qp", out / "bap", "--dataset", corpus, "--seqlen", "32", "--samples", "8", "--val-samples", "2", "--global-batch", "4", "--batch-size", "2", "--loss", "ntp", "--save-steps", "1", "--eval-steps", "1", "-o", out / "e2e_ntp", "--device", "cpu")
eqat("e2e-qp", out / "bap", "--dataset", corpus, "--seqlen", "32", "--samples", "8", "--val-samples", "2", "--global-batch", "4", "--batch-size", "2", "--loss", "kd", "--teacher", model, "-o", out / "e2e_kd", "--device", "cpu")
for f in sorted(p for p in out.rglob("*") if p.is_file()):
    print(hashlib.sha256(f.read_bytes()).hexdigest(), f.relative_to(out))
