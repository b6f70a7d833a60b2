#!/usr/bin/env python3
"""Scale benchmark: the engine and llama.cpp side by side, in one run, on random-weight GGUFs
with the shapes of Llama-3.2-1B and Llama-3.1-8B (Q4_K_M).

For each size it prints load time, peak RSS, prefill and generation tokens/s, steered
generation, one directions pass per prompt and the head sweep of one pair (DLA; at 1B also the
exact interchange of every head), with llama.cpp's load time, peak RSS, prefill and generation
beside ours, and the ratios.

The models are built once and kept in $CACHE/scale (never in git): random f16 weights written
with the `gguf` package (Llama 3's tokenizer from llama.cpp's `ggml-vocab-llama-bpe.gguf`, which
tests/reference/fetch-vocabs.sh fetches), then quantised to Q4_K_M by llama.cpp's
`llama_model_quantize` (llama-cpp-python, built by tests/reference/fetch-quants.sh).

Usage (from the repository root, after `cargo build --release`):
  PYTHONPATH=$CACHE/llama-cpp-python-0.3.36 python3 bench/scale.py [--sizes 1b,8b]
      [--threads 2] [--tokens 32]
Needs numpy, gguf and llama-cpp-python importable, and /usr/bin/time for peak RSS.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("REFUSAL_LENS_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "refusal-lens")
EXE = os.path.join(ROOT, "target", "release", "refusal-lens")
PROMPT = "Write a long story about a dragon who learns to fly."

# Shapes from the models' config.json files.
SIZES = {
    "1b": dict(name="Llama-3.2-1B-shape", d=2048, ff=8192, layers=16, heads=32, kv=8, tied=True),
    "8b": dict(name="Llama-3.1-8B-shape", d=4096, ff=14336, layers=32, heads=32, kv=8, tied=False),
}
VOCAB = 128256
# Llama 3.1's rotary scaling, as llama.cpp's converter stores it (a divisor per rotary pair).
ROPE = dict(theta=500000.0, factor=8.0, low=1.0, high=4.0, original=8192)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")


def rope_factors(head_dim):
    import math
    out = []
    for i in range(head_dim // 2):
        inv = 1.0 / ROPE["theta"] ** (2 * i / head_dim)
        wavelen = 2 * math.pi / inv
        lo, hi = ROPE["original"] / ROPE["low"], ROPE["original"] / ROPE["high"]
        if wavelen < hi:
            out.append(1.0)
        elif wavelen > lo:
            out.append(ROPE["factor"])
        else:
            smooth = (ROPE["original"] / wavelen - ROPE["low"]) / (ROPE["high"] - ROPE["low"])
            out.append(1.0 / ((1 - smooth) / ROPE["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def write_random_f16(path, s):
    """A random-weight Llama GGUF of shape `s`, written tensor by tensor (no 16 GB in memory)."""
    import gguf
    vocab = gguf.GGUFReader(os.path.join(CACHE, "vocab", "ggml-vocab-llama-bpe.gguf"))
    field = lambda k: vocab.fields[k]
    strings = lambda k: [bytes(field(k).parts[i]).decode() for i in field(k).data]
    head_dim = s["d"] // s["heads"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(s["layers"])
    w.add_context_length(131072)
    w.add_embedding_length(s["d"])
    w.add_feed_forward_length(s["ff"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_rope_freq_base(ROPE["theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(VOCAB)
    w.add_file_type(1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(strings("tokenizer.ggml.tokens"))
    w.add_token_types([int(field("tokenizer.ggml.token_type").parts[i][0])
                       for i in field("tokenizer.ggml.token_type").data])
    w.add_token_merges(strings("tokenizer.ggml.merges"))
    w.add_bos_token_id(128000)
    w.add_eos_token_id(128009)
    w.add_chat_template(LLAMA3_TEMPLATE)
    kv = s["kv"] * head_dim
    tensors = [("token_embd.weight", (VOCAB, s["d"]))]
    for l in range(s["layers"]):
        p = f"blk.{l}."
        tensors += [(p + "attn_norm.weight", (s["d"],)), (p + "ffn_norm.weight", (s["d"],)),
                    (p + "attn_q.weight", (s["d"], s["d"])), (p + "attn_k.weight", (kv, s["d"])),
                    (p + "attn_v.weight", (kv, s["d"])), (p + "attn_output.weight", (s["d"], s["d"])),
                    (p + "ffn_gate.weight", (s["ff"], s["d"])), (p + "ffn_up.weight", (s["ff"], s["d"])),
                    (p + "ffn_down.weight", (s["d"], s["ff"]))]
    tensors += [("output_norm.weight", (s["d"],)), ("rope_freqs.weight", (head_dim // 2,))]
    if not s["tied"]:
        tensors.append(("output.weight", (VOCAB, s["d"])))
    f32 = lambda n: n.endswith("norm.weight") or n == "rope_freqs.weight"
    for name, shape in tensors:
        dtype = np.float32 if f32(name) else np.float16
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        w.add_tensor_info(name, shape, np.dtype(dtype), nbytes,
                          gguf.GGMLQuantizationType.F32 if f32(name) else gguf.GGMLQuantizationType.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape in tensors:
        if name == "rope_freqs.weight":
            data = rope_factors(head_dim)
        elif f32(name):
            data = np.ones(shape, dtype=np.float32)
        else:
            # Rows of unit-scale activations in, unit-scale activations out.
            scale = 1.0 if name == "token_embd.weight" else shape[-1] ** -0.5
            data = (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)
        w.write_tensor_data(data)
    w.close()


def model(size):
    s = SIZES[size]
    folder = os.path.join(CACHE, "scale")
    os.makedirs(folder, exist_ok=True)
    q = os.path.join(folder, f"{s['name']}.Q4_K_M.gguf")
    if os.path.exists(q):
        return q
    f16 = os.path.join(folder, f"{s['name']}.F16.gguf")
    if not os.path.exists(f16):
        print(f"[scale] writing {f16} …", file=sys.stderr, flush=True)
        write_random_f16(f16 + ".part", s)
        os.replace(f16 + ".part", f16)
    print(f"[scale] quantising to {q} …", file=sys.stderr, flush=True)
    # In a child process: llama.cpp logs every tensor on stderr.
    with open(q + ".log", "w") as log:
        subprocess.run([sys.executable, "-c", QUANTIZE_SCRIPT, f16, q + ".part"], check=True,
                       stderr=log)
    os.replace(q + ".part", q)
    os.remove(f16)  # the f16 file is only a step: 16 GB for the 8B shape
    return q


def timed(cmd, env=None):
    """Runs `cmd` under /usr/bin/time -v: (stdout, wall seconds, peak RSS in bytes)."""
    t0 = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) * 1024
    return out.stdout, wall, rss


def ours(path, threads, tokens, size, scratch):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    base = [EXE, "--model", path, "--base"]
    _, load, load_rss = timed(base + ["info"], env)
    out, _, rss = timed(base + ["bench", "--max-tokens", str(tokens), "--repeats", "3", "--json",
                                "--prompt", PROMPT], env)
    b = json.loads(out)
    # One directions pass (states at every layer, t_inst and post-instruction) per prompt.
    sets = []
    for label, word in (("harmful", "Explain how to pick the lock"), ("harmless", "Explain how to bake the bread")):
        p = os.path.join(scratch, f"{label}.jsonl")
        with open(p, "w") as f:
            for i in range(4):
                split = ["train", "train", "val", "test"][i]
                f.write(json.dumps({"id": f"{label}-{i}", "pair_id": f"p{i}", "label": label,
                                    "split": split, "prompt": f"{word} number {i} for me."}) + "\n")
        sets.append(p)
    cache_env = dict(env, REFUSAL_LENS_CACHE=os.path.join(scratch, "cache"))
    _, directions, dir_rss = timed(base + ["directions", "--no-select", "--harmful", sets[0],
                                          "--harmless", sets[1], "--json"], cache_env)
    n_train = 4  # the train split: 2 + 2 prompts
    _, dla, dla_rss = timed(base + ["heads", "dla", "--harmful", sets[0], "--harmless", sets[1],
                                    "--split", "test", "--json"], cache_env)
    row = dict(load=load, rss=max(load_rss, rss, dir_rss, dla_rss),
               prefill=b["prefill_tokens_per_second"], generation=b["generation_tokens_per_second"],
               steered=b["steered_generation_tokens_per_second"],
               directions_per_prompt=directions / n_train, dla_pair=dla,
               prompt_tokens=b["prompt_tokens"])
    if size == "1b":
        _, interchange, ic_rss = timed(base + ["heads", "interchange", "--harmful", sets[0],
                                               "--harmless", sets[1], "--split", "test",
                                               "--json"], cache_env)
        row["interchange_pair"] = interchange
        row["rss"] = max(row["rss"], ic_rss)
    return row


QUANTIZE_SCRIPT = r"""
import ctypes, os, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = 15  # Q4_K_M
params.nthread = os.cpu_count() or 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(),
                                        ctypes.byref(params)))
"""

LLAMA_SCRIPT = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, threads, tokens, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
t0 = time.perf_counter()
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)
load = time.perf_counter() - t0
ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
prefill, generation = [], []
for _ in range(3):  # the median of three, as the engine's bench reports
    llm.reset()
    t0 = time.perf_counter(); llm.eval(ids); t1 = time.perf_counter()
    for _ in range(tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    t2 = time.perf_counter()
    prefill.append(len(ids) / (t1 - t0)); generation.append(tokens / (t2 - t1))
print(json.dumps({"load": load, "prefill": sorted(prefill)[1], "generation": sorted(generation)[1],
                  "prompt_tokens": len(ids)}))
"""


def llama_cpp_row(path, threads, tokens):
    text = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + PROMPT +
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    out, _, rss = timed([sys.executable, "-c", LLAMA_SCRIPT, path, str(threads), str(tokens), text])
    row = json.loads(out)
    row["rss"] = rss
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1b,8b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    if not os.path.exists(EXE):
        sys.exit("build first: cargo build --release")
    with open("/proc/cpuinfo") as f:
        cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    print(f"scale benchmark · {cpu} · {a.threads} threads · {a.tokens} generated tokens · Q4_K_M, random weights")
    for size in a.sizes.split(","):
        path = model(size)
        file_gb = os.path.getsize(path) / 1e9
        with tempfile.TemporaryDirectory() as scratch:
            o = ours(path, a.threads, a.tokens, size, scratch)
        l = llama_cpp_row(path, a.threads, a.tokens)
        gb = lambda b: f"{b / 1e9:.2f} GB"
        print(f"\n{SIZES[size]['name']} Q4_K_M ({file_gb:.2f} GB file; RSS target "
              f"{1.5 * file_gb + 1:.2f} GB = 1.5 × file + 1 GB)")
        print(f"{'':34}{'refusal-lens':>14}{'llama.cpp':>12}{'ratio':>8}")
        rows = [("load (s)", o["load"], l["load"], False),
                ("peak RSS", o["rss"], l["rss"], False),
                (f"prefill tok/s ({o['prompt_tokens']} tokens)", o["prefill"], l["prefill"], True),
                ("generation tok/s", o["generation"], l["generation"], True)]
        for label, x, y, higher in rows:
            fmt = gb if label == "peak RSS" else (lambda v: f"{v:.2f}")
            print(f"{label:34}{fmt(x):>14}{fmt(y):>12}{x / y:>7.2f}×")
        print(f"{'steered generation tok/s':34}{o['steered']:>14.2f}")
        print(f"{'directions, s per prompt':34}{o['directions_per_prompt']:>14.2f}")
        print(f"{'head DLA, one pair (s)':34}{o['dla_pair']:>14.2f}")
        if "interchange_pair" in o:
            print(f"{'head interchange, one pair (s)':34}{o['interchange_pair']:>14.2f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
