//! Tiny random models for fast, exact tests (here and in the other crates): built in memory,
//! and written out as an HF safetensors folder or a GGUF file so the loaders can be checked.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenizers::Tokenizer;

use crate::model::chat::{ChatTemplate, TemplateSource, CHATML_TEMPLATE};
use crate::model::config::{Family, ModelConfig, RopeStyle};
use crate::model::loader::Checkpoint;
use crate::model::tokenizer::{self, GgufVocab};
use crate::model::{BlockWeights, Embedding, FastPrecision, Linear, Weights};
use crate::{LoadedModel, Result};

/// Control tokens of the tiny vocabulary, after the 256 byte tokens.
pub const TINY_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A 2-layer model with GQA (4 query heads, 2 kv heads): small enough for exact tests,
/// big enough to exercise every code path. Qwen2 gets q/k/v biases and untied embeddings;
/// Gemma a local layer (window of 3) then a global one and tight soft-caps (Gemma 2), or its
/// own local rotary base and linearly scaled global rotary (Gemma 3).
pub fn tiny_config(family: Family) -> ModelConfig {
    use crate::model::config::RopeScaling;
    let base = ModelConfig::llama_like(family);
    let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
    let gemma3 = family == Family::Gemma3;
    ModelConfig {
        tied_embeddings: family == Family::Llama || gemma,
        sliding_window: gemma.then_some(3),
        sliding_layers: gemma.then(|| vec![true, false]),
        query_pre_attn_scalar: gemma.then_some(16.0),
        attn_softcap: (family == Family::Gemma2).then_some(5.0),
        final_softcap: (family == Family::Gemma2).then_some(3.0),
        rope_theta: if gemma3 { 1e6 } else { 10_000.0 },
        rope_scaling: gemma3.then_some(RopeScaling::Linear { factor: 8.0 }),
        local_rope_theta: gemma3.then_some(10_000.0),
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        d_model: 64,
        d_ff: 128,
        head_dim: 16,
        vocab_size: 256 + TINY_SPECIALS.len(),
        context_length: 256,
        rope_style: RopeStyle::HalfSplit,
        ..base
    }
}

/// GPT-2's byte → printable character map, so byte `b` is token `b`.
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('?')
            }
        })
        .collect()
}

/// Byte-level vocabulary: 256 byte tokens (no merges) + the chat control tokens.
pub fn tiny_vocab() -> (Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    let mut types = vec![1; tokens.len()];
    for s in TINY_SPECIALS {
        tokens.push(s.to_string());
        types.push(3);
    }
    (tokens, types)
}

pub fn tiny_tokenizer() -> Result<Tokenizer> {
    let (tokens, token_types) = tiny_vocab();
    tokenizer::from_gguf_vocab(&GgufVocab {
        model: "gpt2",
        pre: None,
        tokens,
        merges: vec![],
        token_types,
        scores: vec![],
        add_space_prefix: None,
        architecture: "llama",
    })
}

pub fn tiny_template() -> ChatTemplate {
    ChatTemplate {
        source: TemplateSource::FallbackChatMl,
        template: CHATML_TEMPLATE.into(),
        bos_token: "<|endoftext|>".into(),
        eos_token: "<|im_end|>".into(),
        enable_thinking: false,
    }
}

/// Random f32 weights from a seed (uniform, scaled like a trained model's ~1/√d).
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Result<Weights> {
    let mut rng = StdRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut mat = |rows: usize, cols: usize, scale: f32| -> Result<Tensor> {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        Ok(Tensor::from_vec(v, (rows, cols), &dev)?)
    };
    let s = 1.7 / (cfg.d_model as f32).sqrt();
    let (q, kv) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
    let embed = mat(cfg.vocab_size, cfg.d_model, 1.0)?;
    let mut blocks = Vec::new();
    for _ in 0..cfg.n_layers {
        let mut lin = |rows, cols, bias: bool| -> Result<Linear> {
            let weight = mat(rows, cols, s)?;
            let bias = if bias {
                Some(mat(1, rows, 0.1)?.flatten_all()?)
            } else {
                None
            };
            Linear::dense(&weight, bias)
        };
        let b = cfg.qkv_bias;
        let (wq, wk, wv, wo) = (
            lin(q, cfg.d_model, b)?,
            lin(kv, cfg.d_model, b)?,
            lin(kv, cfg.d_model, b)?,
            lin(cfg.d_model, q, false)?,
        );
        let (gate, up, down) = (
            lin(cfg.d_ff, cfg.d_model, false)?,
            lin(cfg.d_ff, cfg.d_model, false)?,
            lin(cfg.d_model, cfg.d_ff, false)?,
        );
        let attn_norm = (mat(1, cfg.d_model, 0.2)?.flatten_all()? + 1.0)?;
        let mlp_norm = (mat(1, cfg.d_model, 0.2)?.flatten_all()? + 1.0)?;
        let (q_norm, k_norm) = if cfg.qk_norm {
            let q_norm = (mat(1, cfg.head_dim, 0.2)?.flatten_all()? + 1.0)?;
            let k_norm = (mat(1, cfg.head_dim, 0.2)?.flatten_all()? + 1.0)?;
            (Some(q_norm), Some(k_norm))
        } else {
            (None, None)
        };
        let (attn_post_norm, mlp_post_norm) = if cfg.post_norms {
            let attn = (mat(1, cfg.d_model, 0.2)?.flatten_all()? + 1.0)?;
            let mlp = (mat(1, cfg.d_model, 0.2)?.flatten_all()? + 1.0)?;
            (Some(attn), Some(mlp))
        } else {
            (None, None)
        };
        blocks.push(BlockWeights {
            attn_norm,
            q_norm,
            k_norm,
            q: wq,
            k: wk,
            v: wv,
            o: wo,
            attn_post_norm,
            mlp_norm,
            mlp_post_norm,
            gate,
            up,
            down,
        });
    }
    let final_norm = (mat(1, cfg.d_model, 0.2)?.flatten_all()? + 1.0)?;
    let lm_head = if cfg.tied_embeddings {
        Linear::dense_shared(&embed)?
    } else {
        Linear::dense(&mat(cfg.vocab_size, cfg.d_model, 1.0)?, None)?
    };
    Ok(Weights {
        embed: Embedding::Dense(embed),
        blocks,
        final_norm,
        lm_head,
    })
}

/// A tiny random model with the byte-level tokenizer and ChatML, loaded in memory.
pub fn tiny_model(family: Family, seed: u64) -> Result<LoadedModel> {
    tiny_model_with(tiny_config(family), seed)
}

/// [`tiny_model`] with a config of the caller's (a sliding window, a rotary scaling, …).
pub fn tiny_model_with(cfg: ModelConfig, seed: u64) -> Result<LoadedModel> {
    let weights = random_weights(&cfg, seed)?;
    let tokenizer = tiny_tokenizer()?;
    let stop = tokenizer.token_to_id("<|im_end|>").into_iter().collect();
    let ck = Checkpoint::from_parts(
        cfg,
        weights,
        tokenizer,
        tiny_template(),
        stop,
        "tiny-random",
    );
    LoadedModel::from_checkpoint(ck, FastPrecision::F32)
}

fn w(lin: &Linear) -> Result<Tensor> {
    lin.dense_weight()
}

/// Writes an HF folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
pub fn write_hf_folder(dir: &Path, cfg: &ModelConfig, weights: &Weights) -> Result<()> {
    let io = |e: std::io::Error| crate::Error::io(dir, e);
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), weights.embed.dense()?);
    for (l, b) in weights.blocks.iter().enumerate() {
        let p = format!("model.layers.{l}");
        for (name, lin) in [
            ("self_attn.q_proj", &b.q),
            ("self_attn.k_proj", &b.k),
            ("self_attn.v_proj", &b.v),
            ("self_attn.o_proj", &b.o),
            ("mlp.gate_proj", &b.gate),
            ("mlp.up_proj", &b.up),
            ("mlp.down_proj", &b.down),
        ] {
            t.insert(format!("{p}.{name}.weight"), w(lin)?);
            if let Some(bias) = lin.bias() {
                t.insert(format!("{p}.{name}.bias"), bias.clone());
            }
        }
        t.insert(format!("{p}.input_layernorm.weight"), b.attn_norm.clone());
        for (name, norm) in [("q_norm", &b.q_norm), ("k_norm", &b.k_norm)] {
            if let Some(w) = norm {
                t.insert(format!("{p}.self_attn.{name}.weight"), w.clone());
            }
        }
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            b.mlp_norm.clone(),
        );
    }
    t.insert("model.norm.weight".into(), weights.final_norm.clone());
    if !cfg.tied_embeddings {
        t.insert("lm_head.weight".into(), w(&weights.lm_head)?);
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "model_type": cfg.family.name(),
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg
            .rope_scaling
            .as_ref()
            .and_then(|s| s.hf_config())
            .unwrap_or(serde_json::Value::Null),
        "max_position_embeddings": cfg.context_length,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tied_embeddings,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(io)?;
    tiny_tokenizer()?
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| crate::Error::Tokenizer(e.to_string()))?;
    let tc = serde_json::json!({ "chat_template": CHATML_TEMPLATE, "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>" });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).map_err(io)?;
    Ok(())
}

/// llama.cpp's converter permutation of Q/K rows (HF half-split → interleaved RoPE layout).
fn permute_for_interleaved(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_heads;
    Ok(w.reshape((n_heads, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// Writes the model as GGUF the way llama.cpp's converter does (Q/K permuted for llama),
/// with the projections stored as `dtype` (F32 for exact, or a quantised type).
pub fn write_gguf(
    path: &Path,
    cfg: &ModelConfig,
    weights: &Weights,
    dtype: GgmlDType,
) -> Result<()> {
    let arch = cfg.family.name();
    let permute = cfg.family == Family::Llama;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let f32 = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32);
    tensors.push(("token_embd.weight".into(), f32(&weights.embed.dense()?)?));
    for (l, b) in weights.blocks.iter().enumerate() {
        let n = |p: &str| format!("blk.{l}.{p}");
        let parts = [
            ("attn_q", &b.q, Some(cfg.n_heads)),
            ("attn_k", &b.k, Some(cfg.n_kv_heads)),
            ("attn_v", &b.v, None),
            ("attn_output", &b.o, None),
            ("ffn_gate", &b.gate, None),
            ("ffn_up", &b.up, None),
            ("ffn_down", &b.down, None),
        ];
        let fused = cfg.family == Family::Phi3;
        if fused {
            // llama.cpp's Phi-3 layout: q, k, v in one `attn_qkv`; gate then up in `ffn_up`.
            let qkv = Tensor::cat(&[w(&b.q)?, w(&b.k)?, w(&b.v)?], 0)?;
            let gate_up = Tensor::cat(&[w(&b.gate)?, w(&b.up)?], 0)?;
            tensors.push((n("attn_qkv.weight"), QTensor::quantize(&qkv, dtype)?));
            tensors.push((n("ffn_up.weight"), QTensor::quantize(&gate_up, dtype)?));
        }
        for (name, lin, heads) in parts {
            if fused && matches!(name, "attn_q" | "attn_k" | "attn_v" | "ffn_gate" | "ffn_up") {
                continue;
            }
            let mut weight = w(lin)?;
            if let (true, Some(h)) = (permute, heads) {
                weight = permute_for_interleaved(&weight, h)?;
            }
            tensors.push((
                n(&format!("{name}.weight")),
                QTensor::quantize(&weight, dtype)?,
            ));
            if let Some(bias) = lin.bias() {
                tensors.push((n(&format!("{name}.bias")), f32(bias)?));
            }
        }
        tensors.push((n("attn_norm.weight"), f32(&b.attn_norm)?));
        for (name, norm) in [("attn_q_norm", &b.q_norm), ("attn_k_norm", &b.k_norm)] {
            if let Some(w) = norm {
                tensors.push((n(&format!("{name}.weight")), f32(w)?));
            }
        }
        tensors.push((n("ffn_norm.weight"), f32(&b.mlp_norm)?));
        // Gemma's sandwich norms, `1 + w` already folded in as llama.cpp's converter does.
        for (name, norm) in [
            ("post_attention_norm", &b.attn_post_norm),
            ("post_ffw_norm", &b.mlp_post_norm),
        ] {
            if let Some(w) = norm {
                tensors.push((n(&format!("{name}.weight")), f32(w)?));
            }
        }
    }
    tensors.push(("output_norm.weight".into(), f32(&weights.final_norm)?));
    if let Some(scaling @ crate::model::config::RopeScaling::Llama3 { .. }) = &cfg.rope_scaling {
        // As llama.cpp's converter writes Llama 3.1's scaling: a divisor per rotary pair.
        let half = cfg.head_dim / 2;
        let factors: Vec<f32> = (0..half)
            .map(|i| {
                let f = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64) as f32;
                (f as f64 / scaling.apply(i, f as f64)) as f32
            })
            .collect();
        let factors = Tensor::from_vec(factors, half, &Device::Cpu)?;
        tensors.push(("rope_freqs.weight".into(), f32(&factors)?));
    }
    if !cfg.tied_embeddings {
        tensors.push(("output.weight".into(), f32(&w(&weights.lm_head)?)?));
    }
    let (tokens, types) = tiny_vocab();
    let u32v = |x: usize| Value::U32(x as u32);
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), u32v(cfg.n_layers)),
        (format!("{arch}.attention.head_count"), u32v(cfg.n_heads)),
        (
            format!("{arch}.attention.head_count_kv"),
            u32v(cfg.n_kv_heads),
        ),
        (format!("{arch}.embedding_length"), u32v(cfg.d_model)),
        (format!("{arch}.feed_forward_length"), u32v(cfg.d_ff)),
        (format!("{arch}.context_length"), u32v(cfg.context_length)),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_eps as f32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".into(), u32v(256)),
        ("tokenizer.ggml.eos_token_id".into(), u32v(258)),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHATML_TEMPLATE.into()),
        ),
    ];
    let mut meta = meta;
    let f32v = |x: f64| Value::F32(x as f32);
    if let Some(w) = cfg.sliding_window {
        meta.push((format!("{arch}.attention.sliding_window"), u32v(w)));
    }
    if let Some(flags) = &cfg.sliding_layers {
        let flags = flags.iter().map(|&f| Value::Bool(f)).collect();
        meta.push((
            format!("{arch}.attention.sliding_window_pattern"),
            Value::Array(flags),
        ));
    }
    if let Some(cap) = cfg.attn_softcap {
        meta.push((format!("{arch}.attn_logit_softcapping"), f32v(cap)));
    }
    if let Some(cap) = cfg.final_softcap {
        meta.push((format!("{arch}.final_logit_softcapping"), f32v(cap)));
    }
    if let Some(crate::model::config::RopeScaling::Linear { factor }) = cfg.rope_scaling {
        meta.push((
            format!("{arch}.rope.scaling.type"),
            Value::String("linear".into()),
        ));
        meta.push((format!("{arch}.rope.scaling.factor"), f32v(factor)));
    }
    if cfg.head_dim * cfg.n_heads != cfg.d_model {
        meta.push((format!("{arch}.attention.key_length"), u32v(cfg.head_dim)));
        meta.push((format!("{arch}.attention.value_length"), u32v(cfg.head_dim)));
    }
    let mut file = std::fs::File::create(path).map_err(|e| crate::Error::io(path, e))?;
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs)?;
    Ok(())
}

/// Logits `[1, s, vocab]` of the exact (dense) path for `ids`, no hooks. Panics on error:
/// a test helper.
pub fn dense_logits(m: &LoadedModel, ids: &[u32]) -> Tensor {
    dense_run(m, ids, &crate::hooks::HookSpec::default(), &[])
        .0
        .unsqueeze(0)
        .expect("batch axis")
}

/// max |a − b| over all elements. Panics on error: a test helper.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("same shapes")
}

/// One uncached forward pass of `ids` on the dense weights under `hooks`, also capturing
/// `points`: logits `[s, vocab]` at every position and each capture without its batch axis.
/// Panics on error: a test helper.
pub fn dense_run(
    m: &LoadedModel,
    ids: &[u32],
    hooks: &crate::hooks::HookSpec,
    points: &[crate::hooks::HookPoint],
) -> (Tensor, Vec<Tensor>) {
    use candle_core::IndexOp;
    let mut spec = hooks.clone();
    spec.capture.extend(points.iter().copied());
    let t = Tensor::new(ids, m.model.device())
        .and_then(|t| t.unsqueeze(0))
        .expect("token tensor");
    let out = m
        .model
        .forward(
            &m.model.dense,
            &t,
            None,
            &spec,
            crate::model::LogitsAt::All,
            crate::model::ForwardOptions::default(),
        )
        .expect("forward pass");
    let captures = points
        .iter()
        .map(|p| {
            out.captures
                .get(*p)
                .expect("capture")
                .expect("captured")
                .i(0)
                .expect("batch row")
        })
        .collect();
    (
        out.logits.expect("logits").i(0).expect("batch row"),
        captures,
    )
}
