#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs the software renderer the GUI
# snapshot tests draw with (Mesa lavapipe), fetches the default model (the real-model test
# group needs it), llama.cpp's reference vocabularies (tokenizer tests) and the default model
# re-quantised by llama.cpp with its logits (quantisation tests; builds llama-cpp-python once,
# about ten minutes), then runs every test of the workspace in the release profile.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ldconfig -p 2>/dev/null | grep -q libvulkan_lvp || ! ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "tests/run.sh: installing Mesa's software Vulkan driver for headless GUI tests" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
assets/fetch-model.sh
tests/reference/fetch-vocabs.sh
tests/reference/fetch-quants.sh
# The tests of one binary run side by side, one per core: each gets one kernel thread (2-thread
# candle kernels collapse 10x when they compete for the cores). A binary with a single test
# takes every core (refusal_lens_tests::use_all_cores_when_alone).
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}"
export REFUSAL_LENS_SOLO_THREADS="${REFUSAL_LENS_SOLO_THREADS:-$(nproc)}"
cargo test --release --workspace --no-fail-fast "$@"
