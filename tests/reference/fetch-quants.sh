#!/usr/bin/env bash
# The default model re-quantised by llama.cpp to every GGUF tensor type the engine reads, with
# llama.cpp's own next-token logits on fixed token ids, for the quantisation tests
# (tests/tests/quants.rs). Cached under $CACHE/quants; built once per machine:
#   1. llama-cpp-python (pinned) is built from PyPI's sources into $CACHE/llama-cpp-python
#      (about ten minutes on two cores; needs a C++ compiler);
#   2. tests/reference/quants.py quantises with `llama_model_quantize` and writes
#      `SmolLM2-135M-Instruct.<TYPE>.gguf` and `llama-logits.safetensors`.
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION="0.3.36"
CACHE="${REFUSAL_LENS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/refusal-lens}"
LCP="$CACHE/llama-cpp-python-$VERSION"
OUT="$CACHE/quants"
[ -f "$OUT/llama-logits.safetensors" ] && exit 0

PYTHON="$(command -v python3 || command -v python || true)"
if [ -z "$PYTHON" ]; then
    echo "fetch-quants: python3 with pip is needed" >&2
    exit 1
fi
if [ ! -f "$LCP/llama_cpp/__init__.py" ]; then
    if ! command -v c++ >/dev/null; then
        SUDO=""
        [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++ >/dev/null
    fi
    echo "fetch-quants: building llama-cpp-python $VERSION (about ten minutes)…" >&2
    # The AVX2 kernels, not -march=native: a native build can use instructions a virtual
    # machine advertises but traps (an Intel VM here died of SIGILL in the Q4_0 kernels).
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
        "$PYTHON" -m pip install --quiet --target "$LCP.part" \
        "llama-cpp-python==$VERSION" safetensors
    rm -rf "$LCP" && mv "$LCP.part" "$LCP"
fi
# llama-cpp-python's own dependencies and safetensors for the logits file, in the same folder.
if ! PYTHONPATH="$LCP" "$PYTHON" -c "import llama_cpp, safetensors" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --target "$LCP" numpy diskcache jinja2 safetensors
fi
assets/fetch-model.sh
mkdir -p "$OUT"
PYTHONPATH="$LCP" "$PYTHON" tests/reference/quants.py \
    "$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf" "$OUT" 2>"$OUT/llama.log"
echo "fetch-quants: $OUT" >&2
