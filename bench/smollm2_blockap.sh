#!/usr/bin/env bash
# SmolLM2-135M quantization table: one row = Block-AP (or RTN with EPOCHS=0) + WikiText-2 perplexity.
#
#   bash bench/smollm2_blockap.sh NAME BITS GROUP EPOCHS [extra block-ap flags...]
#   e.g. bash bench/smollm2_blockap.sh bap-w4g64 4 64 2 --weight-lr 1e-4
#
# Needs EQAT_DATA_DIR (local copies of c4 and wikitext2, e.g. ../shared/data). Calibration:
# C4, $SAMPLES (64) windows x 512 tokens + $VAL (8) validation windows, seed 2 (made once per
# size, reused). Evaluation:
# WikiText-2 test, context 2048, first 32 windows. Writes bench/results/NAME.json (Block-AP
# summary incl. peak RSS) and bench/results/eval-NAME.json; run directories go to $RUNS (./runs).
set -euo pipefail
NAME=$1; BITS=$2; GROUP=$3; EPOCHS=$4; shift 4
HERE="$(cd "$(dirname "$0")" && pwd)"
EQAT=${EQAT:-eqat}
RUNS=${RUNS:-runs}
mkdir -p "$RUNS"
SAMPLES=${SAMPLES:-64}; VAL=${VAL:-8}
CALIB="$RUNS/calib-c4-${SAMPLES}x512-val${VAL}.safetensors"
if [ ! -f "$CALIB" ]; then
  "$EQAT" calibrate smollm2 --dataset c4 --samples "$SAMPLES" --seqlen 512 --val-samples "$VAL" --seed 2 \
    -o "$CALIB"
fi
"$EQAT" block-ap smollm2 --bits "$BITS" --group "$GROUP" --epochs "$EPOCHS" --calib "$CALIB" \
  -o "$RUNS/$NAME" --overwrite --json "$HERE/results/$NAME.json" "$@" > "$RUNS/$NAME.log"
"$EQAT" eval "$RUNS/$NAME" --ppl wikitext2 --seqlen 2048 --limit 32 --json "$HERE/results/eval-$NAME.json" \
  > "$RUNS/eval-$NAME.log"
python3 - "$HERE/results/$NAME.json" "$HERE/results/eval-$NAME.json" <<'PY'
import json, sys
b, e = (json.load(open(p)) for p in sys.argv[1:])
print(json.dumps({"name": sys.argv[1].rsplit("/", 1)[-1][:-5], "seconds": round(b["seconds"]),
                  "peak_rss_mb": b.get("peak_rss_mb"), "eval": e.get("perplexity", e)}, default=str)[:400])
PY
