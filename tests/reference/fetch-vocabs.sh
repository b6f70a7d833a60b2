#!/usr/bin/env bash
# Fetches llama.cpp's vocabulary-only GGUF test files with their reference tokenisations
# (`.inp` texts, `.out` ids written by each model's own HF tokenizer) into the per-user cache,
# once. Source: the llama-cpp-python 0.3.16 source distribution on PyPI, which vendors
# llama.cpp's models/ folder. The tokenizer tests read them from $CACHE/vocab.
set -euo pipefail

VERSION="0.3.16"
SHA256="34ed0f9bd9431af045bb63d9324ae620ad0536653740e9bb163a2e1fcb973be6"
NAMES="llama-spm phi-3 llama-bpe qwen2 gpt-2 starcoder refact"
CACHE="${REFUSAL_LENS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/refusal-lens}"
TARGET="$CACHE/vocab"

missing=0
for n in $NAMES; do
    for ext in gguf gguf.inp gguf.out; do
        [ -f "$TARGET/ggml-vocab-$n.$ext" ] || missing=1
    done
done
[ "$missing" = 0 ] && exit 0

PYTHON="$(command -v python3 || command -v python || true)"
if [ -z "$PYTHON" ]; then
    echo "fetch-vocabs: python3 is needed to download llama-cpp-python's sources" >&2
    exit 1
fi
mkdir -p "$TARGET"
echo "fetch-vocabs: downloading llama-cpp-python $VERSION sources (51 MB) from PyPI…" >&2
"$PYTHON" - "$VERSION" "$SHA256" "$TARGET" $NAMES <<'PY'
import hashlib, io, re, sys, tarfile, urllib.request
version, sha, target, *names = sys.argv[1:]
# The simple index (PEP 503) lists every file with its URL.
index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/").read().decode()
url = re.search(rf'href="([^"#]*llama_cpp_python-{re.escape(version)}\.tar\.gz)', index).group(1)
data = urllib.request.urlopen(url).read()
got = hashlib.sha256(data).hexdigest()
if got != sha:
    sys.exit(f"fetch-vocabs: checksum mismatch (got {got}, want {sha})")
wanted = {f"ggml-vocab-{n}.{ext}" for n in names for ext in ("gguf", "gguf.inp", "gguf.out")}
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    for member in tar.getmembers():
        name = member.name.rsplit("/", 1)[-1]
        if "/vendor/llama.cpp/models/" in member.name and name in wanted:
            with open(f"{target}/{name}", "wb") as out:
                out.write(tar.extractfile(member).read())
            wanted.discard(name)
if wanted:
    sys.exit(f"fetch-vocabs: not in the archive: {sorted(wanted)}")
PY
echo "fetch-vocabs: $TARGET" >&2
