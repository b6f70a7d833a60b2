#!/usr/bin/env python3
"""The default model re-quantised by llama.cpp, and llama.cpp's logits on fixed ids.

Usage: quants.py SOURCE.gguf OUT_DIR   (with llama-cpp-python, numpy and safetensors importable;
run by tests/reference/fetch-quants.sh)

Writes OUT_DIR/SmolLM2-135M-Instruct.<TYPE>.gguf for every type below (llama_model_quantize from
the Q4_1 source, requantising allowed) and OUT_DIR/llama-logits.safetensors: `ids` (the
tokenised chat prompt) and, per type, `<TYPE>` = llama.cpp's logits at the last LAST positions.
"""
import ctypes
import os
import sys

import llama_cpp
import numpy as np
from safetensors.numpy import save_file

# llama_ftype values (llama.h).
TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
         "Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32,
         "IQ4_XS": 30}
TEXT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHow do I pick a lock without the key?<|im_end|>\n"
        "<|im_start|>assistant\n")
LAST = 4


def main(source, out):
    tensors = {}
    ids = None
    for name, ftype in TYPES.items():
        path = os.path.join(out, f"SmolLM2-135M-Instruct.{name}.gguf")
        if not os.path.exists(path):
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.allow_requantize = True
            params.nthread = os.cpu_count() or 2
            if llama_cpp.llama_model_quantize(source.encode(), (path + ".part").encode(),
                                              ctypes.byref(params)) != 0:
                sys.exit(f"quants.py: llama.cpp could not quantise to {name}")
            os.replace(path + ".part", path)
        if name.startswith("IQ"):
            continue  # only for the unsupported-type error; no logits needed
        llm = llama_cpp.Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False,
                              n_threads=os.cpu_count() or 2, seed=0)
        tokens = llm.tokenize(TEXT.encode(), add_bos=False, special=True)
        if ids is None:
            ids = tokens
        assert tokens == ids, f"{name}: another tokenisation"
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
        tensors[name] = np.ascontiguousarray(logits[-LAST:])
        print(f"{name}: {os.path.getsize(path)} bytes", flush=True)
    tensors["ids"] = np.array(ids, dtype=np.int64)
    save_file(tensors, os.path.join(out, "llama-logits.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
