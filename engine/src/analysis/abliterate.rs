//! Abliteration: directional ablation (docs/methods.md) baked into the weights. Projecting
//! `r̂` out of every write into the residual stream equals orthogonalising the matrices that
//! write: the embedding's rows, and the output side of every attention (`o_proj`) and MLP
//! (`down_proj`) matrix, `W ← W − r̂ (r̂ᵀ W)`. A tied unembedding is untied first (the ablation
//! does not touch the unembedding). The result can be written as a GGUF llama.cpp loads.

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
    })
}

/// Writes `lm` (an abliterated model) as an f32 GGUF with the metadata of `source`, the GGUF it
/// was loaded from: tokenizer, chat template and hyperparameters as they were, every weight
/// as the model holds it now (Llama's Q/K rows stay in llama.cpp's interleaved layout). The
/// llama, mistral, qwen2 and qwen3 architectures.
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
    let source_vocab = content
        .metadata
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map_or(0, |t| t.len());
    if source_vocab != cfg.vocab_size {
        return Err(Error::InvalidInput(format!(
            "the model has {} tokens but {} lists {source_vocab}: an adapter's added tokens cannot be written into the source's vocabulary (export the base model, --base)",
            cfg.vocab_size,
            source.display()
        )));
    }
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
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.file_type")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let file_type = gguf_file::Value::U32(0); // all f32
    metadata.push(("general.file_type", &file_type));
    let mut writer = std::fs::File::create(out).map_err(|e| Error::io(out, e))?;
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut writer, &metadata, &refs)?;
    Ok(())
}
