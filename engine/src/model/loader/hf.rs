//! HF safetensors folders (config.json, tokenizer.json, tokenizer_config.json and the
//! weights), as transformers saves them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{
    assemble, card, chat_stop_ids, corrupt, read_block, stored_name, Checkpoint, MemoryPlan,
    RoleNames,
};

/// Where transformers stores each role of layer `l` (`model.layers.{l}.{name}.weight`).
const ROLES: &RoleNames = &[
    ("attn_norm", "input_layernorm"),
    ("q_norm", "self_attn.q_norm"),
    ("k_norm", "self_attn.k_norm"),
    ("q", "self_attn.q_proj"),
    ("k", "self_attn.k_proj"),
    ("v", "self_attn.v_proj"),
    ("o", "self_attn.o_proj"),
    ("mlp_norm", "post_attention_layernorm"),
    ("gate", "mlp.gate_proj"),
    ("up", "mlp.up_proj"),
    ("down", "mlp.down_proj"),
];

/// Gemma's sandwich norms: `post_attention_layernorm` is the attention output's own norm,
/// and the MLP reads `pre_feedforward_layernorm`.
const GEMMA_ROLES: &RoleNames = &[
    ("attn_post_norm", "post_attention_layernorm"),
    ("mlp_norm", "pre_feedforward_layernorm"),
    ("mlp_post_norm", "post_feedforward_layernorm"),
];
use crate::model::chat::{ChatTemplate, TemplateSource, CHATML_TEMPLATE};
use crate::model::config::{Activation, Family, ModelConfig, RopeScaling};
use crate::model::tokenizer;
use crate::model::{Embedding, ExactWeights, Linear, Weights};
use crate::{Error, Result};

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    /// Older configs' rope scaling (`type` or `rope_type`, and its parameters).
    rope_scaling: Option<serde_json::Value>,
    /// Newer configs: `rope_theta` and the scaling together.
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    /// Mistral's window; Qwen2 configs carry one too but apply it only with
    /// `use_sliding_window`.
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: bool,
    partial_rotary_factor: Option<f64>,
    /// Gemma: `sliding_attention` / `full_attention` per layer (newer configs) …
    layer_types: Option<Vec<String>>,
    /// … or every n-th layer global (Gemma 3's older configs; Gemma 2 alternates).
    sliding_window_pattern: Option<usize>,
    /// Gemma 3's older configs: the local layers' rotary base.
    rope_local_base_freq: Option<f64>,
    hidden_activation: Option<String>,
    hidden_act: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    vocab_size: usize,
    /// Absent in many configs (transformers' default then depends on the family): decided by
    /// whether the folder has an `lm_head.weight`.
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Metadata(format!("{}: {e}", path.display())))
}

pub(super) fn load(dir: &Path, exact: ExactWeights) -> Result<Checkpoint> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(Error::MissingFile {
            path: dir.to_path_buf(),
            what: "config.json".into(),
        });
    }
    let hf: HfConfig = read_json(&config_path)?;
    let arch = hf.model_type.clone().unwrap_or_default();
    let mut config = model_config(&hf, &arch)?;
    let tokenizer = tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let template = hf_template(dir)?;
    let source = Source::open(dir)?;
    if hf.tie_word_embeddings.is_none() {
        config.tied_embeddings = !source.has("lm_head.weight");
    }
    let inventory = source.inventory()?;
    let mut quantization = BTreeMap::new();
    for (_, dtype, _) in &inventory {
        *quantization.entry(format!("{dtype:?}")).or_insert(0) += 1;
    }
    let plan = MemoryPlan::of(
        inventory.iter().map(|(n, t, e)| (n.as_str(), *t, *e)),
        exact,
    );
    plan.check_fits(dir)?;
    let weights = weights(&source, &config, plan.keep_stored)?;
    // Stop tokens: config.json's and generation_config.json's (instruct models often list
    // their end-of-turn token only in the latter), the template's EOS, known chat stops.
    let mut eos_ids = token_ids(hf.eos_token_id.as_ref());
    let generation = dir.join("generation_config.json");
    if generation.exists() {
        let g: serde_json::Value = read_json(&generation)?;
        eos_ids.extend(token_ids(g.get("eos_token_id")));
    }
    eos_ids.extend(tokenizer.token_to_id(&template.eos_token));
    eos_ids.extend(chat_stop_ids(&tokenizer));
    let card = card(
        dir,
        "HF safetensors",
        &arch,
        &config,
        quantization,
        &template,
    );
    Ok(Checkpoint::unquantized(
        config, weights, tokenizer, template, eos_ids, card,
    ))
}

/// A token id or a list of them, as HF configs write `eos_token_id`.
fn token_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|n| n.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn model_config(hf: &HfConfig, arch: &str) -> Result<ModelConfig> {
    let family = match arch {
        "llama" | "mistral" => Family::Llama,
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        "phi3" => Family::Phi3,
        "gemma2" => Family::Gemma2,
        "gemma3_text" => Family::Gemma3,
        other => return Err(Error::UnsupportedArchitecture(other.to_string())),
    };
    let rope = RopeParameters::of(hf);
    let partial_rotary = rope
        .global
        .and_then(|p| p["partial_rotary_factor"].as_f64())
        .or(hf.partial_rotary_factor)
        .unwrap_or(1.0);
    if partial_rotary != 1.0 {
        return Err(Error::Metadata(format!(
            "partial rotary embeddings (factor {partial_rotary}) are not supported"
        )));
    }
    let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
    let mut config = ModelConfig {
        n_layers: hf.num_hidden_layers,
        n_heads: hf.num_attention_heads,
        n_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        d_model: hf.hidden_size,
        d_ff: hf.intermediate_size,
        head_dim: hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
        vocab_size: hf.vocab_size,
        context_length: hf.max_position_embeddings.unwrap_or(4096),
        rope_theta: hf
            .rope_theta
            .or_else(|| rope.global?["rope_theta"].as_f64())
            .unwrap_or(10_000.0),
        rope_scaling: rope_scaling(rope.global)?,
        rms_eps: hf.rms_norm_eps.unwrap_or(1e-6),
        tied_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        sliding_window: match arch {
            "mistral" | "phi3" | "gemma2" | "gemma3_text" => hf.sliding_window,
            "qwen2" | "qwen3" if hf.use_sliding_window => {
                return Err(Error::Metadata(
                    "Qwen sliding-window layers (use_sliding_window) are not supported".into(),
                ))
            }
            _ => None,
        },
        ..ModelConfig::llama_like(family)
    };
    config.check_bounds()?;
    if gemma {
        gemma_config(hf, &rope, &mut config)?;
    }
    config.validate()?;
    Ok(config)
}

/// What Gemma 2 and 3 set beyond the Llama shape: the activation, score scale and caps, and
/// which layers are local (windowed) with what rotary base.
fn gemma_config(hf: &HfConfig, rope: &RopeParameters, config: &mut ModelConfig) -> Result<()> {
    let activation = hf
        .hidden_activation
        .as_deref()
        .or(hf.hidden_act.as_deref())
        .unwrap_or("gelu_pytorch_tanh");
    config.activation = match activation {
        "gelu_pytorch_tanh" => Activation::GeluTanh,
        other => {
            return Err(Error::Metadata(format!(
                "Gemma activation `{other}` is not supported (supported: gelu_pytorch_tanh)"
            )))
        }
    };
    config.query_pre_attn_scalar = hf.query_pre_attn_scalar;
    config.attn_softcap = hf.attn_logit_softcapping;
    config.final_softcap = hf.final_logit_softcapping;
    let gemma3 = config.family == Family::Gemma3;
    let n = config.n_layers;
    // transformers' defaults: Gemma 2 alternates local and global from a local layer 0;
    // Gemma 3 makes every `sliding_window_pattern`-th layer global.
    let pattern = hf
        .sliding_window_pattern
        .unwrap_or(if gemma3 { 6 } else { 2 });
    config.sliding_layers = Some(match &hf.layer_types {
        Some(types) => types.iter().map(|t| t == "sliding_attention").collect(),
        None => (0..n).map(|l| (l + 1) % pattern.max(1) != 0).collect(),
    });
    if gemma3 {
        if let Some(local) = rope.local {
            if rope_scaling(Some(local))?.is_some() {
                return Err(Error::Metadata(
                    "rotary scaling on Gemma 3's local layers is not supported".into(),
                ));
            }
        }
        config.local_rope_theta = Some(
            rope.local
                .and_then(|p| p["rope_theta"].as_f64())
                .or(hf.rope_local_base_freq)
                .unwrap_or(10_000.0),
        );
    }
    Ok(())
}

/// The rotary settings of a config: one object for every layer (`rope_scaling`, or
/// `rope_parameters` holding `rope_theta` too), or Gemma 3's newer per-layer-kind form
/// (`rope_parameters: {full_attention: …, sliding_attention: …}`).
struct RopeParameters<'a> {
    global: Option<&'a serde_json::Value>,
    local: Option<&'a serde_json::Value>,
}

impl<'a> RopeParameters<'a> {
    fn of(hf: &'a HfConfig) -> Self {
        match &hf.rope_parameters {
            Some(p) if p.get("full_attention").is_some() => RopeParameters {
                global: p.get("full_attention"),
                local: p.get("sliding_attention"),
            },
            _ => RopeParameters {
                global: hf.rope_scaling.as_ref().or(hf.rope_parameters.as_ref()),
                local: None,
            },
        }
    }
}

/// The rotary scaling of one parameter object; a kind the forward pass does not implement is
/// an error rather than silently wrong logits.
fn rope_scaling(p: Option<&serde_json::Value>) -> Result<Option<RopeScaling>> {
    let Some(p) = p.filter(|p| !p.is_null()) else {
        return Ok(None);
    };
    let kind = p["rope_type"]
        .as_str()
        .or(p["type"].as_str())
        .unwrap_or("default");
    let number = |key: &str| {
        p[key]
            .as_f64()
            .ok_or_else(|| Error::Metadata(format!("rope scaling `{kind}` lacks `{key}`")))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: number("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_context: number("original_max_position_embeddings")?,
        })),
        other => Err(Error::Metadata(format!(
            "rope scaling `{other}` is not supported (supported: linear, llama3)"
        ))),
    }
}

/// The folder's `*.safetensors` files (one, or the shards an index names), memory-mapped:
/// tensors are read one at a time as the model is assembled, never the whole file at once.
struct Source {
    files: MmapedSafetensors,
    dir: PathBuf,
}

impl Source {
    fn open(dir: &Path) -> Result<Source> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                what: "*.safetensors weights".into(),
            });
        }
        // SAFETY: the files are mapped read-only for the load and only read through
        // `safetensors`' bounds-checked views; as with every mmap reader (transformers,
        // llama.cpp), a file truncated by another process while mapped would fault.
        let files = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| corrupt(dir, e))?;
        Ok(Source {
            files,
            dir: dir.to_path_buf(),
        })
    }

    /// `(name, stored type, element count)` of every tensor; an unsupported dtype is an error.
    fn inventory(&self) -> Result<Vec<(String, GgmlDType, usize)>> {
        self.files
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let dtype = match view.dtype() {
                    safetensors::Dtype::F32 => GgmlDType::F32,
                    safetensors::Dtype::F16 => GgmlDType::F16,
                    safetensors::Dtype::BF16 => GgmlDType::BF16,
                    other => {
                        return Err(corrupt(
                            &self.dir,
                            format!("tensor `{name}` is {other:?}; f32, f16 or bf16 expected"),
                        ))
                    }
                };
                Ok((name, dtype, view.shape().iter().product()))
            })
            .collect()
    }

    fn has(&self, name: &str) -> bool {
        self.files.get(name).is_ok()
    }

    /// A tensor in its stored dtype.
    fn read(&self, name: &str) -> Result<Tensor> {
        if !self.has(name) {
            return Err(corrupt(&self.dir, format!("tensor `{name}` is missing")));
        }
        self.files
            .load(name, &Device::Cpu)
            .map_err(|e| corrupt(&self.dir, e))
    }
}

/// Phi-3 stores q, k and v as one `qkv_proj` and gate and up as one `gate_up_proj` (gate
/// first): the rows of the separate matrix `name` within its fused one, if it is fused.
fn fused_rows(name: &str, config: &ModelConfig) -> Option<(String, usize, usize)> {
    let (q, kv, ff) = (
        config.n_heads * config.head_dim,
        config.n_kv_heads * config.head_dim,
        config.d_ff,
    );
    let (prefix, part) = name.rsplit_once('.')?.0.rsplit_once('.')?;
    let (fused, start, rows) = match part {
        "q_proj" => ("qkv_proj", 0, q),
        "k_proj" => ("qkv_proj", q, kv),
        "v_proj" => ("qkv_proj", q + kv, kv),
        "gate_proj" => ("gate_up_proj", 0, ff),
        "up_proj" => ("gate_up_proj", ff, ff),
        _ => return None,
    };
    Some((format!("{prefix}.{fused}.weight"), start, rows))
}

/// The model's weights by transformers' names: norms as f32; matrices as f32, or as stored
/// (f16/bf16) when `keep_stored`.
fn weights(source: &Source, config: &ModelConfig, keep_stored: bool) -> Result<Weights> {
    let dir = &source.dir;
    let read = |name: &str| -> Result<Tensor> {
        if !source.has(name) {
            if let Some((fused, start, rows)) = fused_rows(name, config) {
                if source.has(&fused) {
                    return Ok(source.read(&fused)?.narrow(0, start, rows)?);
                }
            }
        }
        source.read(name)
    };
    let f32 = |name: &str| -> Result<Tensor> { Ok(read(name)?.to_dtype(DType::F32)?) };
    // A float matrix kept in its own dtype: f16 and bf16 convert to f32 and back exactly.
    let stored = |t: &Tensor| -> Result<Option<Arc<QTensor>>> {
        let dtype = match t.dtype() {
            DType::F16 if keep_stored => GgmlDType::F16,
            DType::BF16 if keep_stored => GgmlDType::BF16,
            _ => return Ok(None),
        };
        let q = QTensor::quantize(&t.to_dtype(DType::F32)?.contiguous()?, dtype)?;
        Ok(Some(Arc::new(q)))
    };
    let matrix = |name: &str, bias: Option<Tensor>| -> Result<Linear> {
        let t = read(name)?;
        match stored(&t)? {
            Some(weight) => Ok(Linear::Stored { weight, bias }),
            None => Linear::dense(&t.to_dtype(DType::F32)?, bias),
        }
    };
    let embed = {
        let t = read("model.embed_tokens.weight")?;
        match stored(&t)? {
            Some(q) => Embedding::Stored(q),
            None => Embedding::Dense(t.to_dtype(DType::F32)?),
        }
    };
    let gemma = matches!(config.family, Family::Gemma2 | Family::Gemma3);
    let roles: &[&RoleNames] = if gemma {
        &[GEMMA_ROLES, ROLES]
    } else {
        &[ROLES]
    };
    // Gemma's norms multiply by `1 + w`: fold the 1 in, as llama.cpp's converter does, so
    // every family's norm is `x / rms(x) · w`.
    let gemma_norm = |w: Tensor| -> Result<Tensor> { Ok(if gemma { (w + 1.0)? } else { w }) };
    let mut blocks = Vec::with_capacity(config.n_layers);
    for l in 0..config.n_layers {
        let p = format!("model.layers.{l}");
        let linear = |role: &str| -> Result<Linear> {
            let name = format!("{p}.{}", stored_name(roles, role));
            let bias = if config.qkv_bias && matches!(role, "q" | "k" | "v") {
                Some(f32(&format!("{name}.bias"))?)
            } else {
                None
            };
            matrix(&format!("{name}.weight"), bias)
        };
        let norm = |role: &str| -> Result<Tensor> {
            gemma_norm(f32(&format!("{p}.{}.weight", stored_name(roles, role)))?)
        };
        blocks.push(read_block(config, linear, norm)?);
    }
    let final_norm = gemma_norm(f32("model.norm.weight")?)?;
    let lm_head = if config.tied_embeddings {
        embed.tied_unembedding()?
    } else {
        matrix("lm_head.weight", None)?
    };
    assemble(dir, config, embed, blocks, final_norm, lm_head)
}

fn hf_template(dir: &Path) -> Result<ChatTemplate> {
    let path = dir.join("tokenizer_config.json");
    let cfg: serde_json::Value = if path.exists() {
        read_json(&path)?
    } else {
        serde_json::Value::Null
    };
    let token = |key: &str| match &cfg[key] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    };
    let template = match &cfg["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        // A list of named templates: take "default".
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .or_else(|| list.first())
            .and_then(|t| t["template"].as_str())
            .map(String::from),
        _ => None,
    };
    let (source, template) = match template {
        Some(t) => (TemplateSource::TokenizerConfig, t),
        None => (TemplateSource::FallbackChatMl, CHATML_TEMPLATE.to_string()),
    };
    Ok(ChatTemplate {
        source,
        template,
        bos_token: token("bos_token"),
        eos_token: token("eos_token"),
        enable_thinking: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> HfConfig {
        let mut v = serde_json::json!({
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 259
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn rope_scaling_reads_both_config_forms_and_refuses_unknown_kinds() {
        let want = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 8192.0,
        });
        let params = serde_json::json!({"factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut old = params.clone();
        old["type"] = "llama3".into();
        let hf = config(serde_json::json!({"rope_theta": 500000.0, "rope_scaling": old}));
        assert_eq!(model_config(&hf, "llama").unwrap().rope_scaling, want);
        let mut new = params.clone();
        new["rope_type"] = "llama3".into();
        new["rope_theta"] = 500000.0.into();
        let hf = config(serde_json::json!({ "rope_parameters": new }));
        assert_eq!(model_config(&hf, "llama").unwrap().rope_scaling, want);
        assert_eq!(model_config(&hf, "llama").unwrap().rope_theta, 500000.0);
        let hf = config(serde_json::json!({"rope_parameters": {"rope_type": "default"}}));
        assert_eq!(model_config(&hf, "llama").unwrap().rope_scaling, None);
        let hf = config(serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}));
        let err = model_config(&hf, "llama").unwrap_err().to_string();
        assert!(err.contains("yarn"), "{err}");
    }

    #[test]
    fn gemma3_reads_both_rope_forms_and_its_layer_pattern() {
        let newer = config(serde_json::json!({
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            "sliding_window": 512, "query_pre_attn_scalar": 256,
            "layer_types": ["sliding_attention", "full_attention"]}));
        let older = config(serde_json::json!({
            "rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "rope_local_base_freq": 1e4, "sliding_window": 512, "query_pre_attn_scalar": 256,
            "sliding_window_pattern": 2}));
        for hf in [newer, older] {
            let c = model_config(&hf, "gemma3_text").unwrap();
            assert_eq!(c.rope_theta, 1e6);
            assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
            assert_eq!(c.local_rope_theta, Some(1e4));
            assert_eq!(c.sliding_layers, Some(vec![true, false]));
            assert!(c.is_local(0) && !c.is_local(1));
            assert_eq!(c.score_divisor(), 16.0);
            assert!(c.qk_norm && c.post_norms && c.scale_embeddings);
        }
        let gelu = config(serde_json::json!({"hidden_activation": "gelu"}));
        assert!(model_config(&gelu, "gemma2").is_err());
    }
}
