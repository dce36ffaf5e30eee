#!/usr/bin/env bash
# E2E-QP next-token loss vs distillation on SmolLM2-135M, from the same default Block-AP checkpoints,
# at an equal step budget; WikiText-2 perplexity (ctx 512, first $PPL_LIMIT windows) and zero-shot
# PIQA / ARC-Easy / HellaSwag (first $TASK_LIMIT examples), full-precision model in the same table.
#
#   RUNS=/work/runs bash bench/e2e_kd_vs_ntp.sh       # BITS="4 2": default Block-AP bases, then
#                                                     # E2E-QP with the small-budget recipe (below)
#   CALIB=cal.safetensors ...                         # another calibration file for the bases
#   BASE_EPOCHS=0 SAMPLES=16 GLOBAL_BATCH=1 BATCH=1 EPOCHS=1 EVAL_STEPS=0 LR=2e-4 PPL_LIMIT=10 STAGES="train ppl" \
#       bash bench/e2e_kd_vs_ntp.sh                   # RTN bases, the contended-session run
#
# E2E-QP recipe (chosen on the C4 hold-out, docs/RESULTS.md): 64 C4 examples x 256 tokens, 8 held
# out, 2 epochs, micro-batch 4 = global batch 4 (32 steps), lr LR_<bits> (LR overrides it).
# Every stage is skipped when its JSON exists, so the script can be re-run to continue. JSON goes
# to bench/results/e2e-kd/, checkpoints to $RUNS. Needs EQAT_DATA_DIR (c4, wikitext-2, piqa,
# arc_easy, hellaswag). EQAT may be a command line, e.g. "nice -n 10 python -m eqat_cli".
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
EQAT=${EQAT:-eqat}
RUNS=${RUNS:-runs}
OUT=${OUT:-"$HERE/results/e2e-kd"}
BITS=${BITS:-"4 2"}
BASE_EPOCHS=${BASE_EPOCHS:-}    # empty: the default recipe; 0: RTN bases (min-max, no calibration)
CALIB=${CALIB:-"$RUNS/cal64x256.safetensors"}
SAMPLES=${SAMPLES:-64}          # E2E-QP examples of $E2E_SEQLEN tokens; steps = EPOCHS * SAMPLES / GLOBAL_BATCH
E2E_SEQLEN=${E2E_SEQLEN:-256}
GLOBAL_BATCH=${GLOBAL_BATCH:-4}
BATCH=${BATCH:-4}               # micro-batch (accumulation = GLOBAL_BATCH / BATCH)
EPOCHS=${EPOCHS:-2}
EVAL_STEPS=${EVAL_STEPS:-8}     # held-out loss every N steps (0: per epoch); the best state is kept
LR_2=${LR_2:-2e-3}
LR_3=${LR_3:-4e-4}
LR_4=${LR_4:-2e-4}
PPL_LIMIT=${PPL_LIMIT:-40}
TASK_LIMIT=${TASK_LIMIT:-500}
TASKS=${TASKS:-piqa,arc_easy,hellaswag}
STAGES=${STAGES:-"train ppl tasks"}
mkdir -p "$RUNS" "$OUT"
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
    base_flags=(--epochs 0 --dataset c4 --samples 2 --seqlen 64 --val-samples 0)
  else
    [ -f "$CALIB" ] || $EQAT calibrate smollm2 --dataset c4 --samples 64 --seqlen 256 --val-samples 8 --seed 2 -o "$CALIB"
    base_flags=(--calib "$CALIB")
  fi
  for B in $BITS; do
    base="$RUNS/e2e-base-w${B}g64$SUFFIX"
    lr_var="LR_$B"; lr=${LR:-${!lr_var:-1e-3}}
    run "$OUT/bap-w${B}g64$SUFFIX.json" $EQAT block-ap smollm2 --bits "$B" --group 64 "${base_flags[@]}" -o "$base"
    for L in kd ntp; do
      # --teacher: the ntp run also reports the held-out KL to the FP model (evaluation only)
      run "$OUT/e2e-w${B}g64$SUFFIX-$L.json" $EQAT e2e-qp "$base" --loss "$L" --teacher smollm2 --dataset c4 \
        --seqlen "$E2E_SEQLEN" --samples "$SAMPLES" --val-samples 8 --epochs "$EPOCHS" --global-batch "$GLOBAL_BATCH" \
        --batch-size "$BATCH" --lr "$lr" --eval-steps "$EVAL_STEPS" --no-gradient-checkpointing -o "$RUNS/e2e-w${B}g64$SUFFIX-$L"
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
