#!/usr/bin/env bash
# The whole GPU check in one run, for a machine with an NVIDIA GPU (time on one is short):
# builds with CUDA (bench/cuda-build.sh; the machine's own nvcc when it has one), runs the
# GPU-vs-CPU parity tests, then prints the GPU table (bench/compare.py --device).
#
#   bench/gpu-check.sh [cuda:N]         (default cuda:0; the default model must be fetched)
#
# Further models for the table: REFUSAL_LENS_GPU_MODELS="path1.gguf path2.gguf" (e.g. the
# 1B- and 8B-shaped Q4_K_M GGUFs bench/scale.py builds into $CACHE/scale).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-cuda:0}"
if [ -z "${REFUSAL_LENS_NVCC:-}" ] && command -v nvcc >/dev/null; then
    export REFUSAL_LENS_NVCC="$(command -v nvcc)"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
assets/fetch-model.sh
bench/cuda-build.sh build --release --features cuda
CACHE="${REFUSAL_LENS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/refusal-lens}"
if [ -z "${REFUSAL_LENS_NVCC:-}" ]; then
    export LD_LIBRARY_PATH="$CACHE/cuda-13.0/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
target/release/refusal-lens info --base --device "$DEVICE" | grep -E "model|device|memory"
REFUSAL_LENS_TEST_DEVICE="$DEVICE" bench/cuda-build.sh test --release --features cuda \
    -p refusal-lens-tests --test device -- --nocapture --test-threads 1
MODELS=(--model "$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf")
for m in ${REFUSAL_LENS_GPU_MODELS:-}; do MODELS+=(--model "$m"); done
python3 bench/compare.py --device "$DEVICE" "${MODELS[@]}" --tokens 64
