#!/usr/bin/env bash
# Build llama.cpp's CPU tools (llama-bench, llama-perplexity, llama-quantize, llama-imatrix)
# from the llama.cpp source inside the PyPI sdist of llama-cpp-python, in a benchmark-only directory.
# llama.cpp is NOT a dependency of eqat or of CI: it is only a yardstick for bench/ scripts.
#
#   bash bench/llamacpp_build.sh [DIR]     # default /work/bench-rt/llama.cpp (or $LLAMACPP_DIR)
#
# Prints the bin directory on its last line. ~15 min on 2 cores; re-running with the tools present is instant.
set -euo pipefail
DIR=${1:-${LLAMACPP_DIR:-/work/bench-rt/llama.cpp}}
VERSION=${LLAMACPP_PY_VERSION:-0.3.36}
BIN="$DIR/build/bin"
if [ -x "$BIN/llama-bench" ] && [ -x "$BIN/llama-perplexity" ] && [ -x "$BIN/llama-quantize" ]; then
  echo "$BIN"; exit 0
fi
mkdir -p "$DIR"
cd "$DIR"
SDIST=$(ls llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)
if [ -z "$SDIST" ]; then
  python3 -m pip download --quiet --no-deps --no-binary :all: -d . "llama-cpp-python==$VERSION"
  SDIST=llama_cpp_python-"$VERSION".tar.gz
fi
[ -d src ] || { mkdir -p src && tar -xzf "$SDIST" -C src --strip-components=1; }
# The sdist vendors llama.cpp under vendor/llama.cpp.
SRC=src/vendor/llama.cpp
cmake -S "$SRC" -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build build -j "$(nproc)" --target llama-bench llama-perplexity llama-quantize llama-imatrix >/dev/null
echo "$BIN"
