//! Loading checkpoints: a GGUF file (llama / mistral / qwen2) or an HF safetensors folder.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::model::chat::{ChatTemplate, TemplateSource, CHATML_TEMPLATE};
use crate::model::config::{Family, ModelConfig, RopeStyle};
use crate::model::tokenizer::{self, GgufVocab};
use crate::model::{BlockWeights, FastPrecision, KernelTier, Linear, Model, Weights};
use crate::{Error, Result};

/// What the model card shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    pub name: String,
    pub path: PathBuf,
    pub format: String,
    pub architecture: String,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub parameters: usize,
    pub tied_embeddings: bool,
    /// Tensor count per stored type, e.g. {"Q4_1": 210, "F32": 61}.
    pub quantization: BTreeMap<String, usize>,
    /// What generation runs on.
    pub generation_weights: String,
    pub chat_template: String,
    /// The refusal threshold τ calibrated for this model's refusal tokens (from its adapter);
    /// None: no calibration, τ = `refusal::DEFAULT_TAU`.
    #[serde(default)]
    pub refusal_tau: Option<f32>,
    /// The rule that chose `refusal_tau`.
    #[serde(default)]
    pub refusal_tau_goal: Option<crate::refusal::GateGoal>,
}

impl ModelCard {
    /// The refusal gate's threshold: the calibrated one, else `refusal::DEFAULT_TAU`.
    pub fn gate_tau(&self) -> f32 {
        self.refusal_tau.unwrap_or(crate::refusal::DEFAULT_TAU)
    }
}

/// Everything read from a checkpoint before the model is assembled.
pub struct Checkpoint {
    pub config: ModelConfig,
    pub dense: Weights,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub eos_ids: Vec<u32>,
    pub card: ModelCard,
    originals: HashMap<String, Arc<QTensor>>,
    quantized: bool,
}

impl Checkpoint {
    pub fn load(path: &Path) -> Result<Checkpoint> {
        if path.is_dir() {
            load_hf_folder(path)
        } else if !path.exists() {
            Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ))
        } else {
            load_gguf(path)
        }
    }

    pub fn into_model(
        self,
        precision: FastPrecision,
    ) -> Result<(Model, Tokenizer, ChatTemplate, Vec<u32>, ModelCard)> {
        let originals = &self.originals;
        let fast = Weights::fast_from(
            &self.dense,
            &|n| originals.get(n).cloned(),
            precision,
            self.quantized,
        )?;
        let mut card = self.card;
        // Generation's prompt pass (the first reply token) always runs on f32 (generate.rs).
        let kernels = KernelTier::detect().describe();
        card.generation_weights = match &fast {
            None => "f32".into(),
            Some(_) if self.quantized => {
                format!("f32 prompt pass, then Q8_0 · {kernels} (Q4/Q5 re-encoded at load)")
            }
            Some(_) => format!("f32 prompt pass, then Q8_0 · {kernels} (quantised at load)"),
        };
        let model = Model::new(self.config, self.dense, fast)?;
        Ok((model, self.tokenizer, self.template, self.eos_ids, card))
    }
}

fn corrupt(path: &Path, reason: impl std::fmt::Display) -> Error {
    let reason = reason.to_string();
    let reason = reason.lines().next().unwrap_or_default().to_string(); // drop candle's backtrace
    Error::CorruptModel {
        path: path.to_path_buf(),
        reason,
    }
}

struct Gguf<'a> {
    path: &'a Path,
    content: Content,
    file: BufReader<File>,
    /// Quantised tensors as stored, by name without `.weight`, for the fast path.
    originals: HashMap<String, Arc<QTensor>>,
    /// Tensor count per stored type.
    quantization: BTreeMap<String, usize>,
    quantized: bool,
}

impl Gguf<'_> {
    fn meta(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| Error::Metadata(format!("GGUF key `{key}` is missing")))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.meta(key)?;
        let n = match v {
            Value::U64(n) => *n,
            Value::I64(n) => *n as u64,
            other => other
                .to_u32()
                .map(u64::from)
                .map_err(|_| Error::Metadata(format!("GGUF key `{key}` is not an integer")))?,
        };
        Ok(n as usize)
    }

    fn f64(&self, key: &str) -> Result<f64> {
        match self.meta(key)? {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            _ => Err(Error::Metadata(format!("GGUF key `{key}` is not a float"))),
        }
    }

    fn string(&self, key: &str) -> Option<&str> {
        self.content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let items = self
            .meta(key)?
            .to_vec()
            .map_err(|_| Error::Metadata(format!("GGUF key `{key}` is not an array")))?;
        items
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| Error::Metadata(format!("`{key}` holds a non-string")))
            })
            .collect()
    }

    fn tensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(corrupt(self.path, format!("tensor `{name}` is missing")));
        }
        self.content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| corrupt(self.path, e))
    }

    /// Reads `{name}.weight` as f32, remembering the stored tensor.
    fn dense(&mut self, name: &str) -> Result<Tensor> {
        let q = self.tensor(&format!("{name}.weight"))?;
        *self
            .quantization
            .entry(format!("{:?}", q.dtype()))
            .or_insert(0) += 1;
        self.quantized |= q.dtype().block_size() > 1;
        let t = q.dequantize(&Device::Cpu)?;
        self.originals.insert(name.to_string(), Arc::new(q));
        Ok(t)
    }
}

fn load_gguf(path: &Path) -> Result<Checkpoint> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut file = BufReader::new(file);
    let content = Content::read(&mut file).map_err(|e| corrupt(path, e))?;
    let mut g = Gguf {
        path,
        content,
        file,
        originals: HashMap::new(),
        quantization: BTreeMap::new(),
        quantized: false,
    };

    let arch = g
        .string("general.architecture")
        .ok_or_else(|| corrupt(path, "no general.architecture"))?
        .to_string();
    let (family, rope_style) = match arch.as_str() {
        // llama.cpp's converter permutes Llama/Mistral Q and K rows for interleaved RoPE.
        "llama" | "mistral" => (Family::Llama, RopeStyle::Interleaved),
        // Qwen2 is stored unpermuted and uses NeoX (half-split) RoPE.
        "qwen2" => (Family::Qwen2, RopeStyle::HalfSplit),
        other => return Err(Error::UnsupportedArchitecture(other.to_string())),
    };
    let k = |s: &str| format!("{arch}.{s}");
    let n_heads = g.usize(&k("attention.head_count"))?;
    let d_model = g.usize(&k("embedding_length"))?;
    let head_dim = g
        .usize(&k("attention.key_length"))
        .unwrap_or(d_model / n_heads.max(1));
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let has_output = g.content.tensor_infos.contains_key("output.weight");
    let config = ModelConfig {
        family,
        n_layers: g.usize(&k("block_count"))?,
        n_heads,
        n_kv_heads: g.usize(&k("attention.head_count_kv")).unwrap_or(n_heads),
        d_model,
        d_ff: g.usize(&k("feed_forward_length"))?,
        head_dim,
        vocab_size: tokens.len(),
        context_length: g.usize(&k("context_length")).unwrap_or(4096),
        rope_theta: g.f64(&k("rope.freq_base")).unwrap_or(10_000.0),
        rms_eps: g
            .f64(&k("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5),
        rope_style,
        tied_embeddings: !has_output,
        qkv_bias: family == Family::Qwen2,
    };
    config.validate()?;

    let token_types = match g.content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| corrupt(path, e))?
            .iter()
            .map(|t| t.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let vocab = GgufVocab {
        model: g.string("tokenizer.ggml.model").unwrap_or("gpt2"),
        pre: g.string("tokenizer.ggml.pre"),
        merges: g.strings("tokenizer.ggml.merges").unwrap_or_default(),
        tokens: tokens.clone(),
        token_types,
    };
    let tokenizer = tokenizer::from_gguf_vocab(&vocab)?;
    let token_text = |key: &str| {
        g.usize(key)
            .ok()
            .and_then(|id| tokens.get(id).cloned())
            .unwrap_or_default()
    };
    let eos_token = token_text("tokenizer.ggml.eos_token_id");
    let bos_token = token_text("tokenizer.ggml.bos_token_id");
    let template = match g.string("tokenizer.chat_template") {
        Some(t) => ChatTemplate {
            source: TemplateSource::Gguf,
            template: t.to_string(),
            bos_token,
            eos_token,
        },
        None => ChatTemplate {
            source: TemplateSource::FallbackChatMl,
            template: CHATML_TEMPLATE.into(),
            bos_token,
            eos_token,
        },
    };
    let mut eos_ids: Vec<u32> = g
        .usize("tokenizer.ggml.eos_token_id")
        .ok()
        .map(|i| i as u32)
        .into_iter()
        .collect();
    eos_ids.extend(chat_stop_ids(&tokenizer));

    let embed = g.dense("token_embd")?;
    let mut blocks = Vec::with_capacity(config.n_layers);
    for l in 0..config.n_layers {
        let mut lin = |part: &str| -> Result<Linear> {
            let name = format!("blk.{l}.{part}");
            let weight = g.dense(&name)?;
            let bias = if config.qkv_bias && matches!(part, "attn_q" | "attn_k" | "attn_v") {
                Some(
                    g.tensor(&format!("{name}.bias"))?
                        .dequantize(&Device::Cpu)?,
                )
            } else {
                None
            };
            Linear::dense(&weight, bias)
        };
        let (q, k, v, o) = (
            lin("attn_q")?,
            lin("attn_k")?,
            lin("attn_v")?,
            lin("attn_output")?,
        );
        let (gate, up, down) = (lin("ffn_gate")?, lin("ffn_up")?, lin("ffn_down")?);
        blocks.push(BlockWeights {
            attn_norm: g.dense(&format!("blk.{l}.attn_norm"))?,
            mlp_norm: g.dense(&format!("blk.{l}.ffn_norm"))?,
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
        });
    }
    let final_norm = g.dense("output_norm")?;
    let lm_head = if has_output {
        Linear::dense(&g.dense("output")?, None)?
    } else {
        if let Some(q) = g.originals.get("token_embd").cloned() {
            g.originals.insert("output".into(), q);
        }
        Linear::dense_shared(&embed)?
    };
    check_shapes(&config, &embed, &blocks).map_err(|e| corrupt(path, e))?;
    let weights = Weights {
        embed,
        blocks,
        final_norm,
        lm_head,
    };
    let card = card(path, "GGUF", &arch, &config, g.quantization, &template);
    Ok(Checkpoint {
        config,
        dense: weights,
        tokenizer,
        template,
        eos_ids,
        card,
        originals: g.originals,
        quantized: g.quantized,
    })
}

/// The end-of-turn tokens of common chat formats, where the vocabulary has them.
fn chat_stop_ids(tok: &Tokenizer) -> Vec<u32> {
    [
        "<|im_end|>",
        "<|endoftext|>",
        "<|eot_id|>",
        "<end_of_turn>",
        "</s>",
    ]
    .iter()
    .filter_map(|t| tok.token_to_id(t))
    .collect()
}

fn check_shapes(
    cfg: &ModelConfig,
    embed: &Tensor,
    blocks: &[BlockWeights],
) -> std::result::Result<(), String> {
    let want = |got: (usize, usize), shape: (usize, usize), what: &str| {
        if got == shape {
            Ok(())
        } else {
            Err(format!("{what} has shape {got:?}, expected {shape:?}"))
        }
    };
    let embed = embed.dims2().map_err(|e| e.to_string())?;
    want(embed, (cfg.vocab_size, cfg.d_model), "token embedding")?;
    let (q, kv, d) = (
        cfg.n_heads * cfg.head_dim,
        cfg.n_kv_heads * cfg.head_dim,
        cfg.d_model,
    );
    for (l, b) in blocks.iter().enumerate() {
        for (lin, shape, name) in [
            (&b.q, (q, d), "q"),
            (&b.k, (kv, d), "k"),
            (&b.v, (kv, d), "v"),
            (&b.o, (d, q), "o"),
            (&b.gate, (cfg.d_ff, d), "gate"),
            (&b.up, (cfg.d_ff, d), "up"),
            (&b.down, (d, cfg.d_ff), "down"),
        ] {
            want(
                lin.dims().map_err(|e| e.to_string())?,
                shape,
                &format!("layer {l} {name}"),
            )?;
        }
    }
    Ok(())
}

fn card(
    path: &Path,
    format: &str,
    arch: &str,
    cfg: &ModelConfig,
    quantization: BTreeMap<String, usize>,
    template: &ChatTemplate,
) -> ModelCard {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    ModelCard {
        name: name.trim_end_matches(".gguf").to_string(),
        path: path.to_path_buf(),
        format: format.into(),
        architecture: arch.into(),
        n_layers: cfg.n_layers,
        n_heads: cfg.n_heads,
        n_kv_heads: cfg.n_kv_heads,
        d_model: cfg.d_model,
        d_ff: cfg.d_ff,
        vocab_size: cfg.vocab_size,
        context_length: cfg.context_length,
        parameters: cfg.parameter_count(),
        tied_embeddings: cfg.tied_embeddings,
        quantization,
        generation_weights: String::new(),
        chat_template: template.source.to_string(),
        refusal_tau: None,
        refusal_tau_goal: None,
    }
}

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
    max_position_embeddings: Option<usize>,
    vocab_size: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Metadata(format!("{}: {e}", path.display())))
}

fn load_hf_folder(dir: &Path) -> Result<Checkpoint> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(Error::MissingFile {
            path: dir.to_path_buf(),
            what: "config.json".into(),
        });
    }
    let hf: HfConfig = read_json(&config_path)?;
    let arch = hf.model_type.clone().unwrap_or_default();
    let family = match arch.as_str() {
        "llama" | "mistral" => Family::Llama,
        "qwen2" => Family::Qwen2,
        other => return Err(Error::UnsupportedArchitecture(other.to_string())),
    };
    let config = ModelConfig {
        family,
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
        rope_theta: hf.rope_theta.unwrap_or(10_000.0),
        rms_eps: hf.rms_norm_eps.unwrap_or(1e-6),
        rope_style: RopeStyle::HalfSplit,
        tied_embeddings: hf.tie_word_embeddings,
        qkv_bias: family == Family::Qwen2,
    };
    config.validate()?;
    let tokenizer = tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let template = hf_template(dir)?;

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
    let mut tensors = HashMap::new();
    let mut quantization = BTreeMap::new();
    for f in &files {
        let loaded = candle_core::safetensors::load(f, &Device::Cpu).map_err(|e| corrupt(f, e))?;
        for (name, t) in loaded {
            *quantization
                .entry(format!("{:?}", t.dtype()).to_uppercase())
                .or_insert(0) += 1;
            tensors.insert(name, t);
        }
    }
    let mut take = |name: &str| -> Result<Tensor> {
        let t = tensors
            .remove(name)
            .ok_or_else(|| corrupt(dir, format!("tensor `{name}` is missing")))?;
        Ok(t.to_dtype(DType::F32)?)
    };
    let embed = take("model.embed_tokens.weight")?;
    let mut blocks = Vec::with_capacity(config.n_layers);
    for l in 0..config.n_layers {
        let p = format!("model.layers.{l}");
        let mut lin = |name: &str, bias: bool| -> Result<Linear> {
            let weight = take(&format!("{p}.{name}.weight"))?;
            let bias = if bias {
                Some(take(&format!("{p}.{name}.bias"))?)
            } else {
                None
            };
            Linear::dense(&weight, bias)
        };
        let qb = config.qkv_bias;
        let (q, k, v, o) = (
            lin("self_attn.q_proj", qb)?,
            lin("self_attn.k_proj", qb)?,
            lin("self_attn.v_proj", qb)?,
            lin("self_attn.o_proj", false)?,
        );
        let (gate, up, down) = (
            lin("mlp.gate_proj", false)?,
            lin("mlp.up_proj", false)?,
            lin("mlp.down_proj", false)?,
        );
        blocks.push(BlockWeights {
            attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
            mlp_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
        });
    }
    let final_norm = take("model.norm.weight")?;
    let lm_head = if config.tied_embeddings {
        Linear::dense_shared(&embed)?
    } else {
        Linear::dense(&take("lm_head.weight")?, None)?
    };
    check_shapes(&config, &embed, &blocks).map_err(|e| corrupt(dir, e))?;

    let mut eos_ids: Vec<u32> = match &hf.eos_token_id {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|n| n.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    };
    eos_ids.extend(tokenizer.token_to_id(&template.eos_token));
    eos_ids.extend(chat_stop_ids(&tokenizer));
    let weights = Weights {
        embed,
        blocks,
        final_norm,
        lm_head,
    };
    let card = card(
        dir,
        "HF safetensors",
        &arch,
        &config,
        quantization,
        &template,
    );
    Ok(Checkpoint {
        config,
        dense: weights,
        tokenizer,
        template,
        eos_ids,
        card,
        originals: HashMap::new(),
        quantized: false,
    })
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
    })
}

impl Checkpoint {
    /// Assembles a checkpoint from parts built in memory (tests, fine-tuned models).
    pub fn from_parts(
        config: ModelConfig,
        dense: Weights,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        eos_ids: Vec<u32>,
        name: &str,
    ) -> Checkpoint {
        let mut card = card(
            Path::new(name),
            "in memory",
            config.family.name(),
            &config,
            BTreeMap::new(),
            &template,
        );
        card.name = name.to_string();
        Checkpoint {
            config,
            dense,
            tokenizer,
            template,
            eos_ids,
            card,
            originals: HashMap::new(),
            quantized: false,
        }
    }
}
