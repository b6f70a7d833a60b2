#!/usr/bin/env python3
"""llama.cpp's tokenisation of a text and its logits at every position, for tests that check a
GGUF the engine wrote (e.g. an abliterated export) loads and runs in llama.cpp.

Usage: llama_logits.py MODEL.gguf TEXT OUT.safetensors   (llama-cpp-python importable, as
tests/reference/fetch-quants.sh installs it into the cache)

Writes `ids` (TEXT tokenised with special tokens parsed, no BOS added) and `logits` [n, vocab].
"""
import os
import sys

import llama_cpp
import numpy as np
from safetensors.numpy import save_file


def main(model, text, out):
    llm = llama_cpp.Llama(model_path=model, n_ctx=512, logits_all=True, verbose=False,
                          n_threads=os.cpu_count() or 2, seed=0)
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    save_file({"ids": np.array(ids, dtype=np.int64), "logits": np.ascontiguousarray(logits)}, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
