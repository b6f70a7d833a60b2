//! Abliteration: directional ablation (docs/methods.md) baked into the weights. Projecting
//! `r̂` out of every write into the residual stream equals orthogonalising the matrices that
//! write: the embedding's rows, and the output side of every attention (`o_proj`) and MLP
//! (`down_proj`) matrix, `W ← W − r̂ (r̂ᵀ W)`. A tied unembedding is untied first (the ablation
//! does not touch the unembedding). The result can be written as a GGUF llama.cpp loads and as
//! an HF folder transformers loads.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::model::config::{Family, RopeStyle};
use crate::model::{Embedding, Linear, Model};
use crate::{Error, LoadedModel, Result};

/// `w − (w r̂) r̂ᵀ` for rows `w` `[n, d]` (the embedding).
fn project_rows(w: &Tensor, unit: &Tensor) -> Result<Tensor> {
    let along = w.matmul(&unit.unsqueeze(1)?)?; // [n, 1]
    Ok((w - along.matmul(&unit.unsqueeze(0)?)?)?)
}

/// `W − r̂ (r̂ᵀ W)` for a matrix `W` `[d, k]` that writes into the stream.
fn project_output(w: &Tensor, unit: &Tensor) -> Result<Tensor> {
    let along = unit.unsqueeze(0)?.matmul(w)?; // [1, k]
    Ok((w - unit.unsqueeze(1)?.matmul(&along)?)?)
}

/// The model with `direction` ablated from its weights (exact weights f32; the fast path, if
/// the model had one, rebuilt from them).
pub fn orthogonalized(lm: &LoadedModel, direction: &[f32]) -> Result<LoadedModel> {
    let cfg = &lm.model.config;
    if cfg.post_norms {
        return Err(Error::InvalidInput(format!(
            "{} writes into the stream through a norm after each block (sandwich norms): the ablation does not fold into its weights",
            cfg.family.name()
        )));
    }
    if direction.len() != cfg.d_model {
        return Err(Error::InvalidInput(format!(
            "the direction has {} dimensions, the model's width is {}",
            direction.len(),
            cfg.d_model
        )));
    }
    let norm = direction.iter().map(|x| x * x).sum::<f32>().sqrt();
    if !norm.is_finite() || norm == 0.0 {
        return Err(Error::InvalidInput("cannot ablate a zero direction".into()));
    }
    let unit = Tensor::from_vec(
        direction.iter().map(|x| x / norm).collect::<Vec<_>>(),
        cfg.d_model,
        &Device::Cpu,
    )?;
    let mut dense = lm.model.dense.clone();
    let embed = dense.embed.dense()?;
    let mut config = cfg.clone();
    if config.tied_embeddings {
        dense.lm_head = Linear::dense(&embed, None)?;
        config.tied_embeddings = false;
    }
    dense.embed = Embedding::Dense(project_rows(&embed, &unit)?);
    for block in &mut dense.blocks {
        for lin in [&mut block.o, &mut block.down] {
            let bias = lin
                .bias()
                .map(|b| {
                    project_rows(&b.unsqueeze(0)?, &unit)?
                        .squeeze(0)
                        .map_err(Error::from)
                })
                .transpose()?;
            *lin = Linear::dense(&project_output(&lin.dense_weight()?, &unit)?, bias)?;
        }
    }
    let mut model = Model::new(config, dense, lm.model.fast.clone())?;
    model.rebuild_fast()?;
    let mut card = lm.card.clone();
    card.name = format!("{} (abliterated)", card.name);
    Ok(LoadedModel {
        model,
        tokenizer: lm.tokenizer.clone(),
        template: lm.template.clone(),
        stop_ids: lm.stop_ids.clone(),
        card,
        // Replies after `[respond]` would bypass the ablation: the abliterated model writes
        // every reply itself.
        respond_blocks: None,
    })
}

/// Writes `lm` (an abliterated model) as an f32 GGUF with the metadata of `source`, the GGUF it
/// was loaded from: tokenizer, chat template and hyperparameters as they were, every weight
/// as the model holds it now (Llama's Q/K rows stay in llama.cpp's interleaved layout), and
/// tokens an adapter added (`[refuse]`, `[respond]`) appended to the vocabulary as control
/// tokens. The llama, mistral, qwen2 and qwen3 architectures.
pub fn write_gguf(lm: &LoadedModel, source: &Path, out: &Path) -> Result<()> {
    let cfg = &lm.model.config;
    let supported = matches!(cfg.family, Family::Llama | Family::Qwen2 | Family::Qwen3)
        && (cfg.family != Family::Llama || cfg.rope_style == RopeStyle::Interleaved);
    if !supported {
        return Err(Error::InvalidInput(format!(
            "writing a GGUF is supported for llama, qwen2 and qwen3 models loaded from GGUF, not {}",
            cfg.family.name()
        )));
    }
    let mut file = std::fs::File::open(source).map_err(|e| Error::io(source, e))?;
    let content = Content::read(&mut file).map_err(|e| {
        Error::InvalidInput(format!(
            "{} is not the GGUF this model came from: {e}",
            source.display()
        ))
    })?;
    let mut metadata: std::collections::HashMap<String, gguf_file::Value> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.file_type")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.insert("general.file_type".into(), gguf_file::Value::U32(0)); // all f32
    append_added_tokens(lm, &mut metadata, source)?;
    let f32 = |t: &Tensor| QTensor::quantize(&t.contiguous()?, GgmlDType::F32);
    let w = &lm.model.dense;
    let mut tensors: Vec<(String, QTensor)> =
        vec![("token_embd.weight".into(), f32(&w.embed.dense()?)?)];
    for (l, b) in w.blocks.iter().enumerate() {
        let n = |part: &str| format!("blk.{l}.{part}");
        for (name, lin) in [
            ("attn_q", &b.q),
            ("attn_k", &b.k),
            ("attn_v", &b.v),
            ("attn_output", &b.o),
            ("ffn_gate", &b.gate),
            ("ffn_up", &b.up),
            ("ffn_down", &b.down),
        ] {
            tensors.push((n(&format!("{name}.weight")), f32(&lin.dense_weight()?)?));
            if let Some(bias) = lin.bias() {
                tensors.push((n(&format!("{name}.bias")), f32(bias)?));
            }
        }
        tensors.push((n("attn_norm.weight"), f32(&b.attn_norm)?));
        tensors.push((n("ffn_norm.weight"), f32(&b.mlp_norm)?));
        for (name, norm) in [("attn_q_norm", &b.q_norm), ("attn_k_norm", &b.k_norm)] {
            if let Some(t) = norm {
                tensors.push((n(&format!("{name}.weight")), f32(t)?));
            }
        }
    }
    tensors.push(("output_norm.weight".into(), f32(&w.final_norm)?));
    if !cfg.tied_embeddings {
        tensors.push(("output.weight".into(), f32(&w.lm_head.dense_weight()?)?));
    }
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        let freqs = content
            .tensor(&mut file, "rope_freqs.weight", &Device::Cpu)
            .map_err(|e| Error::InvalidInput(format!("rope_freqs: {e}")))?;
        tensors.push(("rope_freqs.weight".into(), freqs));
    }
    let mut metadata: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    metadata.sort_by_key(|(k, _)| *k);
    let mut writer = std::fs::File::create(out).map_err(|e| Error::io(out, e))?;
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut writer, &metadata, &refs)?;
    Ok(())
}

/// Appends the tokens `lm` has beyond the source GGUF's vocabulary (an adapter's, added after
/// it with consecutive ids) to the metadata's token list as control tokens.
fn append_added_tokens(
    lm: &LoadedModel,
    metadata: &mut std::collections::HashMap<String, gguf_file::Value>,
    source: &Path,
) -> Result<()> {
    use gguf_file::Value;
    let Some(Value::Array(tokens)) = metadata.get("tokenizer.ggml.tokens") else {
        return Err(Error::InvalidInput(format!(
            "{} has no token list (tokenizer.ggml.tokens)",
            source.display()
        )));
    };
    let first = tokens.len();
    let vocab = lm.model.config.vocab_size;
    if first > vocab {
        return Err(Error::InvalidInput(format!(
            "{} lists {first} tokens, more than the model's {vocab}: it is not this model's source",
            source.display()
        )));
    }
    let added = (first..vocab)
        .map(|id| {
            lm.tokenizer
                .id_to_token(id as u32)
                .ok_or_else(|| Error::InvalidInput(format!("token {id} of the model has no text")))
        })
        .collect::<Result<Vec<_>>>()?;
    if added.is_empty() {
        return Ok(());
    }
    let mut extend = |key: &str, with: &dyn Fn(&str) -> Value| {
        if let Some(Value::Array(values)) = metadata.get_mut(key) {
            values.extend(added.iter().map(|t| with(t)));
        }
    };
    extend("tokenizer.ggml.tokens", &|t| Value::String(t.to_string()));
    const CONTROL: i32 = 3; // llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
    extend("tokenizer.ggml.token_type", &|_| Value::I32(CONTROL));
    extend("tokenizer.ggml.scores", &|_| Value::F32(0.0));
    Ok(())
}

/// Writes `lm` as an HF transformers folder: `model.safetensors` (f32), `config.json`,
/// `generation_config.json`, `tokenizer.json` and `tokenizer_config.json` (with the chat
/// template). Llama Q/K rows loaded from a GGUF are permuted back from llama.cpp's interleaved
/// rotary layout to transformers' half-split one. Llama, Mistral, Qwen2 and Qwen3.
pub fn write_hf_folder(lm: &LoadedModel, out: &Path) -> Result<()> {
    let cfg = &lm.model.config;
    let (model_type, architecture) = match (cfg.family, cfg.sliding_window) {
        (Family::Llama, None) => ("llama", "LlamaForCausalLM"),
        (Family::Llama, Some(_)) => ("mistral", "MistralForCausalLM"),
        (Family::Qwen2, _) => ("qwen2", "Qwen2ForCausalLM"),
        (Family::Qwen3, _) => ("qwen3", "Qwen3ForCausalLM"),
        (other, _) => {
            return Err(Error::InvalidInput(format!(
            "writing an HF folder is supported for llama, mistral, qwen2 and qwen3 models, not {}",
            other.name()
        )))
        }
    };
    let rope_scaling = match &cfg.rope_scaling {
        None => serde_json::Value::Null,
        Some(scaling) => scaling.hf_config().ok_or_else(|| {
            Error::InvalidInput(
                "the model's rotary scaling is a GGUF factor table (rope_freqs), which an HF config cannot state".into(),
            )
        })?,
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // transformers' rotary layout: pairs (i, i + d/2) within each head.
    let half_split = |t: &Tensor, heads: usize| -> Result<Tensor> {
        if cfg.rope_style == RopeStyle::HalfSplit {
            return Ok(t.clone());
        }
        let dims = t.dims().to_vec();
        let rest: usize = dims[1..].iter().product();
        Ok(t.reshape((heads, cfg.head_dim / 2, 2, rest))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape(dims)?)
    };
    let w = &lm.model.dense;
    let mut tensors: std::collections::HashMap<String, Tensor> = Default::default();
    tensors.insert("model.embed_tokens.weight".into(), w.embed.dense()?);
    for (l, b) in w.blocks.iter().enumerate() {
        let n = |part: &str| format!("model.layers.{l}.{part}");
        for (name, lin, heads) in [
            ("self_attn.q_proj", &b.q, Some(cfg.n_heads)),
            ("self_attn.k_proj", &b.k, Some(cfg.n_kv_heads)),
            ("self_attn.v_proj", &b.v, None),
            ("self_attn.o_proj", &b.o, None),
            ("mlp.gate_proj", &b.gate, None),
            ("mlp.up_proj", &b.up, None),
            ("mlp.down_proj", &b.down, None),
        ] {
            let permuted = |t: &Tensor| match heads {
                Some(h) => half_split(t, h),
                None => Ok(t.clone()),
            };
            tensors.insert(
                n(&format!("{name}.weight")),
                permuted(&lin.dense_weight()?)?,
            );
            if let Some(bias) = lin.bias() {
                tensors.insert(n(&format!("{name}.bias")), permuted(bias)?);
            }
        }
        tensors.insert(n("input_layernorm.weight"), b.attn_norm.clone());
        tensors.insert(n("post_attention_layernorm.weight"), b.mlp_norm.clone());
        for (name, norm) in [
            ("self_attn.q_norm", &b.q_norm),
            ("self_attn.k_norm", &b.k_norm),
        ] {
            if let Some(t) = norm {
                tensors.insert(n(&format!("{name}.weight")), t.clone());
            }
        }
    }
    tensors.insert("model.norm.weight".into(), w.final_norm.clone());
    if !cfg.tied_embeddings {
        tensors.insert("lm_head.weight".into(), w.lm_head.dense_weight()?);
    }
    for t in tensors.values_mut() {
        *t = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
    }
    let weights_path = out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights_path)?;

    let template = &lm.template;
    let token_id = |t: &str| lm.tokenizer.token_to_id(t);
    let eos_ids: Vec<u32> = lm.stop_ids.clone();
    let config = serde_json::json!({
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": cfg.context_length,
        "sliding_window": cfg.sliding_window,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tied_embeddings,
        "attention_bias": cfg.qkv_bias,
        "mlp_bias": false,
        "bos_token_id": token_id(&template.bos_token),
        "eos_token_id": eos_ids,
        "torch_dtype": "float32",
    });
    let generation = serde_json::json!({
        "bos_token_id": token_id(&template.bos_token),
        "eos_token_id": eos_ids,
    });
    let tokenizer_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": template.bos_token,
        "eos_token": template.eos_token,
        "chat_template": template.template,
        "model_max_length": cfg.context_length,
        "clean_up_tokenization_spaces": false,
    });
    for (name, value) in [
        ("config.json", &config),
        ("generation_config.json", &generation),
        ("tokenizer_config.json", &tokenizer_config),
    ] {
        let path = out.join(name);
        let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    let tokenizer_path = out.join("tokenizer.json");
    lm.tokenizer
        .save(&tokenizer_path, true)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
    Ok(())
}
