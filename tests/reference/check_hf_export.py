#!/usr/bin/env python3
"""Checks that an HF folder written by `refusal-lens export-ablated --hf-out` loads in HF
transformers and computes what the engine computes.

Usage: check_hf_export.py FOLDER ENGINE.safetensors PROMPT
  ENGINE.safetensors: `refusal-lens activations --model FOLDER --prompt PROMPT --logits --hooks
  ln_final --out ENGINE.safetensors` (the engine's `input_ids` and `logits` at every position).

Tokenises PROMPT with the folder's chat template through transformers (AutoTokenizer), checks
the ids equal the engine's, runs AutoModelForCausalLM (f32, CPU) and prints the largest
next-token KL between transformers' and the engine's distributions, the largest relative logit
difference and whether the greedy next tokens agree. Exits non-zero if the ids differ or the
KL exceeds 1e-3. Needs torch, transformers and safetensors (see make_fixtures.py's set-up).
"""
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(folder, engine_file, prompt):
    engine = load_file(engine_file)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    engine_ids = engine["input_ids"].tolist()
    ids_match = list(ids) == engine_ids
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([engine_ids])).logits[0].float()
    ours = engine["logits"].float().reshape(logits.shape)
    lp, lq = torch.log_softmax(logits, -1), torch.log_softmax(ours, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    rel = ((logits - ours).abs().max() / logits.abs().max()).item()
    report = {
        "architecture": model.config.architectures,
        "tokens": len(engine_ids),
        "ids_match": ids_match,
        "max_kl": kl.max().item(),
        "max_relative_logit_difference": rel,
        "greedy_agree": int((logits.argmax(-1) == ours.argmax(-1)).sum()),
    }
    print(json.dumps(report))
    if not ids_match:
        sys.exit(f"transformers tokenises differently: {list(ids)} vs {engine_ids}")
    if report["max_kl"] > 1e-3:
        sys.exit("transformers computes another distribution")


if __name__ == "__main__":
    main(*sys.argv[1:4])
