#!/usr/bin/env python3
"""Reference values for the engine's parity tests, computed with HF transformers (f32, CPU).

Writes under tests/fixtures/:
  tiny_llama/, tiny_qwen2/, tiny_llama3/ (Llama 3.1 rotary scaling, the rope_parameters form),
  tiny_qwen3/ (per-head q/k norms), tiny_mistral/ (sliding window of 4), tiny_phi3/ (fused
  projections), tiny_gemma2/ (GeGLU, sandwich norms, soft-capping tight enough to bend,
  query_pre_attn_scalar ≠ d_h, alternating window), tiny_gemma3/ (q/k norms, five local layers
  of six with their own rotary base, linear-scaled global rotary)
                             tiny random HF checkpoints (seeded) + expected.json
                             (input ids, logits at every position, every hidden state)
  tiny_llama/hooks.safetensors, tiny_qwen2/hooks.safetensors
                             every per-layer hook point of the same run, read from transformers'
                             modules with PyTorch hooks, named as TransformerLens names them
                             (`--hooks-only` writes just these, from the checkpoints already there)
  smollm2/reference.safetensors + smollm2/reference.json
                             the default model (SmolLM2-135M-Instruct Q4_1 GGUF, dequantised by
                             transformers): chat-template token ids, hidden states at a few
                             layers (last 8 positions), last-position logits and a greedy reply.

Set-up (once, outside the repo):  python3 -m venv /tmp/torchenv &&
  /tmp/torchenv/bin/pip install torch transformers accelerate gguf safetensors numpy tokenizers
Run from the repository root:      /tmp/torchenv/bin/python tests/reference/make_fixtures.py [GGUF]
                                   (or with --hooks-only, or --only FAMILY)
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma2ForCausalLM,
                          Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_IDS = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 2, 10]  # arbitrary ids


def byte_chars():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    out, n = [], 0
    for b in range(256):
        if b in bs:
            out.append(chr(b))
        else:
            out.append(chr(256 + n))
            n += 1
    return out


def tiny_tokenizer():
    vocab = {c: i for i, c in enumerate(byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


# Llama 3.1's rotary scaling, with an original context short enough that the tiny model's
# wavelengths fall in all three bands (kept, interpolated, stretched).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny(family):
    torch.manual_seed({"llama": 1234, "qwen2": 5678, "llama3": 4321, "qwen3": 8765,
                       "mistral": 2468, "phi3": 1357, "gemma2": 9753, "gemma3": 3579}[family])
    common = dict(vocab_size=256 + len(SPECIALS), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)
    if family == "llama3":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE,
                                             **common))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
    elif family == "mistral":
        # A window of 4 keys, so most of the 16 input positions lose some.
        common["sliding_window"] = 4
        model = MistralForCausalLM(MistralConfig(tie_word_embeddings=False, **common))
    elif family == "phi3":
        # Fused qkv_proj and gate_up_proj; no window at this length.
        model = Phi3ForCausalLM(Phi3Config(tie_word_embeddings=False, pad_token_id=0,
                                           bos_token_id=1, eos_token_id=2, sliding_window=None,
                                           **common))
    elif family == "gemma2":
        # Caps low enough that tanh bends the random model's scores and logits.
        model = Gemma2ForCausalLM(Gemma2Config(
            head_dim=16, query_pre_attn_scalar=24, sliding_window=4, attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0, tie_word_embeddings=True, pad_token_id=0,
            bos_token_id=256, eos_token_id=258, **common))
    elif family == "gemma3":
        common["num_hidden_layers"] = 6
        rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
        gemma3 = {k: v for k, v in common.items() if k != "rope_theta"}
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            head_dim=16, query_pre_attn_scalar=16, sliding_window=4, rope_parameters=rope,
            tie_word_embeddings=True, pad_token_id=0, bos_token_id=256, eos_token_id=258,
            **gemma3))
    elif family == "qwen3":
        common["head_dim"] = 16
        model = Qwen3ForCausalLM(Qwen3Config(tie_word_embeddings=False, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **common))
    # Default init (std 0.02) gives near-zero logits: a weak test. Use trained-like scales.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                # Gemma's norms scale by 1 + w.
                offset = 0.0 if family.startswith("gemma") else 1.0
                p.copy_(offset + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed" in name or "lm_head" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    model.eval()
    out_dir = os.path.join(ROOT, f"tiny_{family}")
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(out_dir, "model.safetensors"))
    cfg = dict(model_type="llama" if family == "llama3" else family,
               tie_word_embeddings=model.config.tie_word_embeddings, **common)
    if family == "llama3":
        # The newer config form: rope_theta inside rope_parameters with the scaling.
        cfg["rope_parameters"] = dict(LLAMA3_ROPE, rope_theta=cfg.pop("rope_theta"))
    if family.startswith("gemma"):
        # transformers' own config, as checkpoints on the Hub carry it.
        cfg = model.config.to_dict()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    tiny_tokenizer().save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHATML, "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}, f)
    with torch.no_grad():
        out = model(torch.tensor([TINY_IDS]), output_hidden_states=True)
    expected = {
        "input_ids": TINY_IDS,
        "logits": out.logits[0].tolist(),
        # hidden_states[l] is blocks.l.hook_resid_pre; the last one is after the final norm.
        "hidden_states": [h[0].tolist() for h in out.hidden_states],
    }
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(expected, f)
    print(f"wrote {out_dir}")


def rms_normalized(x, eps):
    """TransformerLens' hook_normalized of an RMSNorm: x / rms(x), before the weight."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def hooks(family):
    """Every per-layer hook point of the tiny model's run on TINY_IDS, from transformers' own
    modules: q/k/v (the projections, before RoPE), attention scores (transformers' RoPE, scaled,
    causal mask) and pattern (eager attention's probabilities), z (o_proj's input), the norms'
    normalised inputs, the MLP's activation (down_proj's input) and every residual write."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    out_dir = os.path.join(ROOT, f"tiny_{family}")
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("model_type")
    config = (LlamaConfig if family == "llama" else Qwen2Config)(**cfg)
    config._attn_implementation = "eager"
    model = (LlamaForCausalLM if family == "llama" else Qwen2ForCausalLM)(config)
    from safetensors.torch import load_file
    state = load_file(os.path.join(out_dir, "model.safetensors"))
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    h, h_kv = config.num_attention_heads, config.num_key_value_heads
    dh = config.hidden_size // h
    eps = config.rms_norm_eps
    seen = {}

    def keep(name, fn):
        def hook(module, args, output):
            seen[name] = fn(args[0] if args else None, output).detach()
        return hook

    handles = []
    s = len(TINY_IDS)
    for l, layer in enumerate(model.model.layers):
        a = layer.self_attn
        handles += [
            layer.input_layernorm.register_forward_hook(keep(f"blocks.{l}.ln1.hook_normalized", lambda x, y: rms_normalized(x, eps))),
            a.q_proj.register_forward_hook(keep(f"blocks.{l}.attn.hook_q", lambda x, y: y.view(1, s, h, dh))),
            a.k_proj.register_forward_hook(keep(f"blocks.{l}.attn.hook_k", lambda x, y: y.view(1, s, h_kv, dh))),
            a.v_proj.register_forward_hook(keep(f"blocks.{l}.attn.hook_v", lambda x, y: y.view(1, s, h_kv, dh))),
            a.o_proj.register_forward_hook(keep(f"blocks.{l}.attn.hook_z", lambda x, y: x.view(1, s, h, dh))),
            a.o_proj.register_forward_hook(keep(f"blocks.{l}.hook_attn_out", lambda x, y: y)),
            layer.post_attention_layernorm.register_forward_hook(keep(f"blocks.{l}.ln2.hook_normalized", lambda x, y: rms_normalized(x, eps))),
            layer.mlp.down_proj.register_forward_hook(keep(f"blocks.{l}.mlp.hook_post", lambda x, y: x)),
            layer.mlp.register_forward_hook(keep(f"blocks.{l}.hook_mlp_out", lambda x, y: y)),
        ]
    handles.append(model.model.norm.register_forward_hook(keep("ln_final.hook_normalized", lambda x, y: rms_normalized(x, eps))))
    with torch.no_grad():
        out = model(torch.tensor([TINY_IDS]), output_attentions=True)
    for handle in handles:
        handle.remove()
    # Scores from transformers' own RoPE on the hooked q and k, scaled and causally masked.
    cos, sin = model.model.rotary_emb(torch.zeros(1, s, config.hidden_size), torch.arange(s)[None])
    mask = torch.full((s, s), float("-inf")).triu(1)
    tensors = {}
    for l in range(config.num_hidden_layers):
        q = seen[f"blocks.{l}.attn.hook_q"].transpose(1, 2)
        k = seen[f"blocks.{l}.attn.hook_k"].transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(h // h_kv, dim=1)
        tensors[f"blocks.{l}.attn.hook_attn_scores"] = q @ k.transpose(-1, -2) / dh ** 0.5 + mask
        tensors[f"blocks.{l}.attn.hook_pattern"] = out.attentions[l]
    tensors.update(seen)
    # -inf does not survive every reader: store the masked scores as a large negative number.
    tensors = {n: t.clamp(min=-1e30).contiguous() for n, t in tensors.items()}
    save_file(tensors, os.path.join(out_dir, "hooks.safetensors"))
    print(f"wrote {out_dir}/hooks.safetensors ({len(tensors)} tensors)")


PROMPTS = ["How do I bake bread?", "Write a short poem about the sea."]
LAYERS = [0, 1, 10, 20, 29]
LAST_POSITIONS = 8
GREEDY_TOKENS = 24


def smollm2(gguf_path):
    folder, name = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    out_dir = os.path.join(ROOT, "smollm2")
    os.makedirs(out_dir, exist_ok=True)
    tensors, meta = {}, {"prompts": [], "layers": LAYERS, "last_positions": LAST_POSITIONS}
    for i, prompt in enumerate(PROMPTS):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model(x, output_hidden_states=True)
            gen = model.generate(x, max_new_tokens=GREEDY_TOKENS, do_sample=False)
        for l in LAYERS:
            tensors[f"p{i}.resid_pre.{l}"] = out.hidden_states[l][0, -LAST_POSITIONS:].contiguous()
        tensors[f"p{i}.ln_final"] = out.hidden_states[-1][0, -LAST_POSITIONS:].contiguous()
        tensors[f"p{i}.logits_last"] = out.logits[0, -1].contiguous()
        meta["prompts"].append({"prompt": prompt, "text": text, "ids": ids,
                                "greedy_ids": gen[0, len(ids):].tolist()})
    save_file(tensors, os.path.join(out_dir, "reference.safetensors"))
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    if "--only" in sys.argv:
        tiny(sys.argv[sys.argv.index("--only") + 1])
        sys.exit(0)
    if "--hooks-only" in sys.argv:
        hooks("llama")
        hooks("qwen2")
        sys.exit(0)
    tiny("llama")
    tiny("qwen2")
    tiny("llama3")
    tiny("qwen3")
    tiny("mistral")
    tiny("phi3")
    hooks("llama")
    hooks("qwen2")
    default = os.path.expanduser("~/.cache/refusal-lens/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    smollm2(sys.argv[1] if len(sys.argv) > 1 else default)
