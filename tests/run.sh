#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs the software renderer the GUI
# snapshot tests draw with (Mesa lavapipe), fetches the default model (the real-model test
# group needs it), then runs every test of the workspace in the release profile.
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
# 2-thread candle kernels collapse when test binaries compete for 2 cores (findings.md).
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}"
cargo test --release --workspace --no-fail-fast "$@"
