#!/usr/bin/env bash
# E2E-QP next-token loss vs distillation on SmolLM2-135M, from the same base checkpoints, at an equal
# step budget; WikiText-2 perplexity (ctx 512, first $PPL_LIMIT windows) and zero-shot PIQA /
# ARC-Easy / HellaSwag (first $TASK_LIMIT examples), full-precision model in the same table.
#
#   RUNS=/work/runs bash bench/e2e_kd_vs_ntp.sh     # BITS="4 2", Block-AP bases, the full protocol
#   BASE_EPOCHS=0 SAMPLES=16 GLOBAL_BATCH=1 PPL_LIMIT=10 STAGES="train ppl" bash bench/e2e_kd_vs_ntp.sh
#                                                   # RTN bases, small budget (what a contended CPU allows)
#
# Every stage is skipped when its JSON exists, so the script can be re-run to continue. JSON goes
# to bench/results/e2e-kd/, checkpoints to $RUNS. Needs EQAT_DATA_DIR (c4, wikitext-2, piqa,
# arc_easy, hellaswag). EQAT may be a command line, e.g. "nice -n 10 python -m eqat_cli".
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
EQAT=${EQAT:-eqat}
RUNS=${RUNS:-runs}
OUT=${OUT:-"$HERE/results/e2e-kd"}
BITS=${BITS:-"4 2"}
BASE_EPOCHS=${BASE_EPOCHS:-2}   # 0: RTN bases (min-max; calibration data does not matter)
SAMPLES=${SAMPLES:-128}         # E2E-QP examples of $E2E_SEQLEN tokens; steps = SAMPLES / GLOBAL_BATCH
E2E_SEQLEN=${E2E_SEQLEN:-256}
GLOBAL_BATCH=${GLOBAL_BATCH:-4}
LR=${LR:-1e-4}
PPL_LIMIT=${PPL_LIMIT:-40}
TASK_LIMIT=${TASK_LIMIT:-500}
TASKS=${TASKS:-piqa,arc_easy,hellaswag}
STAGES=${STAGES:-"train ppl tasks"}
mkdir -p "$RUNS" "$OUT"
CALIB="$RUNS/cal64x256.safetensors"
SUFFIX=$([ "$BASE_EPOCHS" = 0 ] && echo "-rtn" || echo "")

run() {  # run JSON command...: skipped when JSON exists
  local json=$1; shift
  [ -f "$json" ] && return 0
  echo "+ $(date +%T) $*" >&2
  /usr/bin/time -f "%e s wall, %M KB peak RSS" "$@" --json "$json.tmp" && mv "$json.tmp" "$json"
}

models=(smollm2)
for B in $BITS; do
  models+=("$RUNS/e2e-base-w${B}g64$SUFFIX")
  for L in kd ntp; do models+=("$RUNS/e2e-w${B}g64$SUFFIX-$L"); done
done

if [[ " $STAGES " == *" train "* ]]; then
  if [ "$BASE_EPOCHS" = 0 ]; then
    calib=(--dataset c4 --samples 2 --seqlen 64 --val-samples 0)
  else
    [ -f "$CALIB" ] || $EQAT calibrate smollm2 --dataset c4 --samples 64 --seqlen 256 --val-samples 8 --seed 2 -o "$CALIB"
    calib=(--calib "$CALIB")
  fi
  for B in $BITS; do
    base="$RUNS/e2e-base-w${B}g64$SUFFIX"
    run "$OUT/bap-w${B}g64$SUFFIX.json" $EQAT block-ap smollm2 --bits "$B" --group 64 --epochs "$BASE_EPOCHS" \
      "${calib[@]}" -o "$base" --quant-lr 3e-4 --weight-lr 3e-4 --loss token-rel
    for L in kd ntp; do
      # --teacher: the ntp run also reports the held-out KL to the FP model (evaluation only)
      run "$OUT/e2e-w${B}g64$SUFFIX-$L.json" $EQAT e2e-qp "$base" --loss "$L" --teacher smollm2 --dataset c4 --seqlen "$E2E_SEQLEN" \
        --samples "$SAMPLES" --val-samples 8 --global-batch "$GLOBAL_BATCH" --batch-size "$GLOBAL_BATCH" --lr "$LR" \
        --eval-steps 0 --no-gradient-checkpointing -o "$RUNS/e2e-w${B}g64$SUFFIX-$L"
    done
  done
fi
if [[ " $STAGES " == *" ppl "* ]]; then
  for m in "${models[@]}"; do
    run "$OUT/ppl$PPL_LIMIT-$(basename "$m").json" $EQAT eval "$m" --ppl wikitext2 --seqlen 512 --limit "$PPL_LIMIT"
  done
fi
if [[ " $STAGES " == *" tasks "* ]]; then  # FP and E2E-QP models first, the bases last
  for m in ${TASK_MODELS:-$(printf '%s\n' "${models[@]}" | grep -v e2e-base) $(printf '%s\n' "${models[@]}" | grep e2e-base)}; do
    run "$OUT/tasks$TASK_LIMIT-${TASKS//,/-}-$(basename "$m").json" $EQAT eval "$m" --tasks "$TASKS" \
      --limit "$TASK_LIMIT" --batch-size 16
  done
fi
