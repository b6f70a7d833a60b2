#!/usr/bin/env python3
"""Runs one prompt through Refusal Lens, llama.cpp and HF transformers in one run, on the same
GGUF and the same number of threads, and prints tokens/s and the ratios the issues target:

  generation          ours / llama.cpp   (target >= 0.8)
  steered generation  ours / llama.cpp   (target >= 0.7)
  forward with all residual captures   ours / transformers (output_hidden_states)   (target >= 3)

Needs: a release build (cargo build --release), and in the Python running this script
`pip install llama-cpp-python torch transformers accelerate gguf` (`--no-transformers` skips
the last column and needs only llama-cpp-python and numpy).
Usage: python3 bench/compare.py [--threads 2] [--tokens 64] [--model PATH] [--avx2 DIR]
                              [--llama-cpp DIR] [--no-transformers]
       python3 bench/compare.py --device cuda[:N]|metal [--model PATH ...] [--tokens 64]

`--device`: the GPU table instead (a build with `--features cuda` or `metal`, e.g. by
bench/cuda-build.sh): for each model (the default one, and each further --model, e.g. the
1B- and 8B-shaped GGUFs bench/scale.py builds), prefill, generation, steered generation and the
captured forward from `refusal-lens bench`, the head sweep of one pair (DLA, and the exact
interchange of every head) and directions from all 600 sample prompts (no cache, no layer
selection), on the device, and for the first model also on the CPU, with the speed-up.

CPU classes. candle and llama.cpp both pick their kernels by CPU: with VNNI (AVX-512 or AVX)
or with AVX2 only. `--avx2 DIR` measures the AVX2 row on a VNNI machine: ours runs with
MISTRALRS_FORCE_AVX2=1 (candle's tier switch, which the engine's padding follows), llama.cpp
is imported from DIR, an AVX2-only build of llama-cpp-python:
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF" pip install --no-cache-dir --target DIR llama-cpp-python
(the plain `pip install llama-cpp-python` builds for the native CPU; where the CPU reports AMX
that the system does not enable, as in some VMs, that build dies with SIGILL in
ggml_backend_amx_mul_mat: build the VNNI row the same way with -DGGML_AVX512=ON
-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF and pass it with --llama-cpp DIR).
Our f32 path (the prompt pass, the captured forward) keeps gemm's AVX-512 kernels, which have
no run-time switch.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(
    os.environ.get("REFUSAL_LENS_CACHE")
    or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "refusal-lens"),
    "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPT = "Write a long story about a dragon who learns to fly."
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(prompt):
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n")


def ours(model, threads, tokens, avx2):
    exe = os.path.join(ROOT, "target", "release", "refusal-lens")
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    env.pop("MISTRALRS_FORCE_AVX2", None)
    if avx2:
        env["MISTRALRS_FORCE_AVX2"] = "1"
    out = subprocess.run([exe, "bench", "--base", "--model", model, "--prompt", PROMPT, "--max-tokens", str(tokens),
                          "--json"], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def llama_cpp(model, threads, tokens):
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                logits_all=True, verbose=False)
    ids = llm.tokenize(chatml(PROMPT).encode(), add_bos=False, special=True)
    best = None
    for _ in range(3):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        n = 0
        for _ in range(tokens):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])
            n += 1
        t2 = time.perf_counter()
        run = {"prefill": len(ids) / (t1 - t0), "generation": n / (t2 - t1), "prompt_tokens": len(ids)}
        best = run if best is None or run["generation"] > best["generation"] else best
    return best


def transformers_(model, threads, tokens):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(threads)
    folder, name = os.path.split(model)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    x = torch.tensor([tok(chatml(PROMPT), add_special_tokens=False)["input_ids"]])
    fwd, gen = [], []
    with torch.no_grad():
        m(x, output_hidden_states=True)  # warm-up
        for _ in range(3):
            t0 = time.perf_counter()
            m(x, output_hidden_states=True)
            t1 = time.perf_counter()
            fwd.append(x.shape[1] / (t1 - t0))
        t0 = time.perf_counter()
        m(x)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = m.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        total = time.perf_counter() - t0
        n = out.shape[1] - x.shape[1]
        gen.append((n - 1) / max(total - prefill, 1e-9))
    return {"forward_all_hidden_states": sorted(fwd)[1], "generation": gen[0]}


def timed(args, env=None):
    """Wall seconds of one `refusal-lens` command (its output is not needed)."""
    exe = os.path.join(ROOT, "target", "release", "refusal-lens")
    t0 = time.perf_counter()
    subprocess.run([exe] + args, env=env, check=True, capture_output=True, text=True, cwd=ROOT)
    return time.perf_counter() - t0


def on_device(model, device, tokens):
    """The GPU table's measurements of one model on `device` (`cpu` for the reference)."""
    exe = os.path.join(ROOT, "target", "release", "refusal-lens")
    common = ["--base", "--model", model, "--device", device]
    out = subprocess.run([exe, "bench"] + common + ["--prompt", PROMPT, "--max-tokens", str(tokens), "--json"],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    row = json.loads(out.stdout)
    row["heads_dla_seconds"] = timed(["heads", "dla"] + common)
    row["heads_interchange_seconds"] = timed(["heads", "interchange"] + common)
    row["directions_600_seconds"] = timed(["directions", "--no-select", "--no-cache"] + common)
    return row


def device_table(models, device, tokens):
    rows = []
    for i, model in enumerate(models):
        # The CPU reference for the first model only: a 1B or 8B model's head sweep and 600
        # prompts take hours on a CPU.
        gpu = on_device(model, device, tokens)
        cpu = on_device(model, "cpu", tokens) if i == 0 else None
        rows.append({"model": os.path.basename(model), device: gpu, "cpu": cpu})
    keys = [("prefill tok/s", "prefill_tokens_per_second", True),
            ("generation tok/s", "generation_tokens_per_second", True),
            ("steered generation tok/s", "steered_generation_tokens_per_second", True),
            ("forward + all resid captures tok/s", "forward_all_resid_captures_tokens_per_second", True),
            ("head sweep, DLA, one pair (s)", "heads_dla_seconds", False),
            ("head sweep, interchange, one pair (s)", "heads_interchange_seconds", False),
            ("directions, 600 prompts (s)", "directions_600_seconds", False)]
    for r in rows:
        print(f"\n{r['model']}")
        print(f"{'':40}{device:>12}{'cpu':>12}{'speed-up':>10}")
        for label, key, higher_is_better in keys:
            g = r[device][key]
            if r["cpu"] is None:
                print(f"{label:40}{g:>12.1f}{'-':>12}{'-':>10}")
                continue
            c = r["cpu"][key]
            ratio = g / c if higher_is_better else c / g
            print(f"{label:40}{g:>12.1f}{c:>12.1f}{ratio:>9.1f}x")
    print(json.dumps(rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", help="cuda, cuda:N or metal: the GPU table")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--model", action="append", help="a GGUF or HF folder (repeatable with --device)")
    ap.add_argument("--avx2", metavar="DIR", help="AVX2 row: an AVX2-only llama-cpp-python in DIR")
    ap.add_argument("--llama-cpp", metavar="DIR", help="import llama-cpp-python from DIR")
    ap.add_argument("--no-transformers", action="store_true")
    a = ap.parse_args()
    models = a.model or [DEFAULT_MODEL]
    for m in models:
        if not os.path.exists(m):
            sys.exit(f"model not found at {m}; run assets/fetch-model.sh")
    if a.device != "cpu":
        return device_table(models, a.device, a.tokens)
    a.model = models[0]
    for d in (a.llama_cpp, a.avx2):
        if d:
            sys.path.insert(0, d)
    o = ours(a.model, a.threads, a.tokens, bool(a.avx2))
    l = llama_cpp(a.model, a.threads, a.tokens)
    nan = float("nan")
    h = ({"generation": nan, "forward_all_hidden_states": nan} if a.no_transformers
         else transformers_(a.model, a.threads, a.tokens))
    with open("/proc/cpuinfo") as f:
        flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    tier = "AVX2 (forced)" if a.avx2 else ("AVX-512 VNNI" if "avx512_vnni" in flags else
                                           "AVX-VNNI" if "avx_vnni" in flags else "AVX2")
    print(f"kernels: {tier}")
    print(f"{a.threads} threads, prompt of {o['prompt_tokens']} tokens, {a.tokens} new tokens (greedy)\n")
    print(f"{'':38}{'refusal-lens':>14}{'llama.cpp':>12}{'transformers':>14}")
    print(f"{'prefill tok/s':38}{o['prefill_tokens_per_second']:>14.0f}{l['prefill']:>12.0f}{'':>14}")
    print(f"{'generation tok/s':38}{o['generation_tokens_per_second']:>14.1f}{l['generation']:>12.1f}{h['generation']:>14.1f}")
    print(f"{'steered generation tok/s':38}{o['steered_generation_tokens_per_second']:>14.1f}{'':>12}{'':>14}")
    print(f"{'forward + all resid captures tok/s':38}{o['forward_all_resid_captures_tokens_per_second']:>14.0f}{'':>12}{h['forward_all_hidden_states']:>14.0f}")
    print()
    r1 = o['generation_tokens_per_second'] / l['generation']
    r2 = o['steered_generation_tokens_per_second'] / l['generation']
    r3 = o['forward_all_resid_captures_tokens_per_second'] / h['forward_all_hidden_states']
    print(f"generation          ours / llama.cpp     = {r1:.2f}  (target >= 0.8)")
    print(f"steered generation  ours / llama.cpp     = {r2:.2f}  (target >= 0.7)")
    print(f"captured forward    ours / transformers  = {r3:.2f}  (target >= 3)")
    print(json.dumps({"kernels": tier, "ours": o, "llama_cpp": l, "transformers": h,
                      "ratios": {"generation": r1, "steered": r2, "captures": r3}}))


if __name__ == "__main__":
    main()
