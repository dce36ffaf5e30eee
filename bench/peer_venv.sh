#!/usr/bin/env bash
# Separate venv for the peer benchmark (bench/peer_compare.py): AutoRound 0.16.1 on the same CPU torch as eqat.
# AutoRound is NOT a dependency of eqat or of CI; it lives only here.
#
#   bash bench/peer_venv.sh [VENV_DIR]        # default /work/peer-venv (or $PEER_VENV)
#
# torch==2.13.0 resolves to the pinned CPU wheel from the local package index pip is configured with.
# Re-running is cheap: pip skips what is already installed.
set -euo pipefail
VENV=${1:-${PEER_VENV:-/work/peer-venv}}
PY=${PYTHON:-python3.11}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# auto-round's runtime deps come with it (transformers, accelerate, datasets, ...); safetensors/psutil are
# what the runner itself reads/uses. No GPTQ kernels are needed: AutoRound packs the GPTQ format in pure torch.
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0" "auto-round==0.16.1" safetensors psutil
"$VENV/bin/python" - <<'PY'
import auto_round, torch, transformers
print(f"peer venv ok: auto-round {auto_round.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
PY
