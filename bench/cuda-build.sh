#!/usr/bin/env bash
# Builds Refusal Lens with CUDA (`cargo build --release --features cuda`) on a machine with no
# GPU and no CUDA install: nvcc, the CUDA headers and the libraries the link needs come from
# PyPI, and CUDA_COMPUTE_CAP fixes the target so that no driver is asked at build time.
#
#   bench/cuda-build.sh                       cargo build --release --features cuda
#   bench/cuda-build.sh CARGO-ARGS…           cargo CARGO-ARGS… in the same environment, e.g.
#       bench/cuda-build.sh test --release --features cuda -p refusal-lens-tests --test device
#
# Environment:
#   CUDA_COMPUTE_CAP   GPU generation to compile candle's kernels for (default 90: Hopper, H100/H200)
#   CUDA_PREFIX        where the PyPI toolchain is installed (default $CACHE/cuda-13.0)
#   REFUSAL_LENS_NVCC  use this nvcc (a machine's own CUDA toolkit) instead of PyPI's
#
# Why CUDA 13: PyPI's nvidia-cuda-nvcc-cu12 wheels hold ptxas but not nvcc itself (12.1 to 12.9
# alike); nvidia-cuda-nvcc 13.x has the whole compiler driver. PTX built by CUDA 13 needs a
# driver of the 580 series or newer at run time; on a machine with an older driver, point
# REFUSAL_LENS_NVCC at that machine's own nvcc.
#
# The link: candle links cudarc with `dynamic-linking`, so the binary needs libcuda, cuBLAS(Lt),
# cuRAND and NVRTC at link time. PyPI ships the last four (versioned names only: we add the
# unversioned links); libcuda belongs to the driver, so we build a stub with the driver entry
# points cudarc declares, as the CUDA toolkit's own lib64/stubs/libcuda.so does. At run time the
# real driver's libcuda.so.1 is loaded instead; LD_LIBRARY_PATH must reach the PyPI libraries
# (the script prints the line).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${REFUSAL_LENS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/refusal-lens}"
PREFIX="${CUDA_PREFIX:-$CACHE/cuda-13.0}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
CU="$PREFIX/nvidia/cu13"

if [ -n "${REFUSAL_LENS_NVCC:-}" ]; then
    NVCC_BIN="$(dirname "$REFUSAL_LENS_NVCC")"
else
    if [ ! -x "$CU/bin/nvcc" ] || [ ! -e "$CU/lib/libcublas.so.13" ] || [ ! -e "$CU/include/nv/target" ]; then
        echo "cuda-build: installing nvcc 13.0 and the CUDA libraries from PyPI into $PREFIX (~700 MB)…" >&2
        python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target "$PREFIX" \
            nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
            nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
            nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
    fi
    NVCC_BIN="$CU/bin"
fi
export PATH="$NVCC_BIN:$PATH"

# One folder that looks like a CUDA install to the build scripts: bin/, include/, lib64/.
ROOT_DIR="$PREFIX/root"
mkdir -p "$ROOT_DIR/lib64"
ln -sfn "$NVCC_BIN" "$ROOT_DIR/bin"
if [ -d "$CU/include" ]; then ln -sfn "$CU/include" "$ROOT_DIR/include"; fi
if [ -d "$CU/nvvm" ]; then ln -sfn "$CU/nvvm" "$ROOT_DIR/nvvm"; fi
for lib in "$CU"/lib/lib*.so.*; do
    [ -e "$lib" ] || continue
    base="$(basename "$lib")"
    ln -sfn "$lib" "$ROOT_DIR/lib64/$base"
    ln -sfn "$lib" "$ROOT_DIR/lib64/${base%%.so.*}.so"
done

# The driver stub: every cu* entry point cudarc's driver bindings declare, as empty functions.
if [ ! -e "$ROOT_DIR/lib64/libcuda.so" ]; then
    cargo fetch --quiet
    CUDARC_SRC="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 1 -mindepth 1 -type d \
        -exec sh -c 'ls -d "$0"/cudarc-* 2>/dev/null' {} \; | sort -V | tail -1)"
    [ -d "$CUDARC_SRC" ] || { echo "cuda-build: cudarc's sources not found" >&2; exit 1; }
    grep -rhoE '\bpub (unsafe )?fn (cu[A-Z][A-Za-z0-9_]*)\(' "$CUDARC_SRC/src/driver/sys" \
        | sed -E 's/.*fn (cu[A-Za-z0-9_]*)\(/\1/' | sort -u \
        | awk '{ print "void " $1 "(void) {}" }' > "$ROOT_DIR/libcuda-stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT_DIR/lib64/libcuda.so" "$ROOT_DIR/libcuda-stub.c"
    echo "cuda-build: libcuda stub with $(wc -l < "$ROOT_DIR/libcuda-stub.c") driver entry points" >&2
fi

export CUDA_ROOT="$ROOT_DIR" CUDA_PATH="$ROOT_DIR" CUDA_TOOLKIT_ROOT_DIR="$ROOT_DIR"
export LIBRARY_PATH="$ROOT_DIR/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}"
echo "cuda-build: $(nvcc --version | tail -2 | head -1), compute capability $CUDA_COMPUTE_CAP" >&2
if [ $# -eq 0 ]; then
    set -- build --release --features cuda
fi
# The CUDA build shares target/ with the CPU one (only candle and our crates differ), so the
# binary at target/release/refusal-lens is whichever was built last.
cargo "$@"
echo "cuda-build: done (cargo $*). To run CUDA binaries on a GPU machine:" >&2
echo "  export LD_LIBRARY_PATH=$CU/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" >&2
