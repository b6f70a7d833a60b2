//! GGUF checkpoints (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3), as llama.cpp's
//! converter writes them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;

use super::{
    assemble, card, chat_stop_ids, corrupt, read_block, split_rows, stored_name, Checkpoint,
    MemoryPlan, RoleNames,
};

/// Where llama.cpp stores each role of block `l` (`blk.{l}.{name}`).
const ROLES: &RoleNames = &[
    ("attn_norm", "attn_norm"),
    ("q_norm", "attn_q_norm"),
    ("k_norm", "attn_k_norm"),
    ("q", "attn_q"),
    ("k", "attn_k"),
    ("v", "attn_v"),
    ("o", "attn_output"),
    ("mlp_norm", "ffn_norm"),
    ("gate", "ffn_gate"),
    ("up", "ffn_up"),
    ("down", "ffn_down"),
    ("attn_post_norm", "post_attention_norm"),
    ("mlp_post_norm", "post_ffw_norm"),
];
use crate::model::chat::{ChatTemplate, TemplateSource, CHATML_TEMPLATE};
use crate::model::config::{Family, ModelConfig, RopeScaling, RopeStyle};
use crate::model::tokenizer::{self, GgufVocab};
use crate::model::{Embedding, ExactWeights, Linear, Weights};
use crate::{Error, Result};

struct Gguf<'a> {
    path: &'a Path,
    content: Content,
    file: BufReader<File>,
    /// Quantised tensors as stored, by name without `.weight`, for the fast path.
    originals: HashMap<String, Arc<QTensor>>,
    /// Tensor count per stored type.
    quantization: BTreeMap<String, usize>,
    quantized: bool,
    /// Matrices stay as stored (the exact path dequantises them on use).
    keep_stored: bool,
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

    /// Reads `{name}.weight` as stored, counting its type.
    fn stored(&mut self, name: &str) -> Result<Arc<QTensor>> {
        let q = self.tensor(&format!("{name}.weight"))?;
        *self
            .quantization
            .entry(format!("{:?}", q.dtype()))
            .or_insert(0) += 1;
        self.quantized |= q.dtype().block_size() > 1;
        Ok(Arc::new(q))
    }

    /// Reads `{name}.weight` as f32, remembering the stored tensor for the fast path.
    fn dense(&mut self, name: &str) -> Result<Tensor> {
        let q = self.stored(name)?;
        let t = q.dequantize(&Device::Cpu)?;
        self.originals.insert(name.to_string(), q);
        Ok(t)
    }

    /// A weight matrix: as stored, or as f32.
    fn matrix(&mut self, name: &str, bias: Option<Tensor>) -> Result<Linear> {
        if self.keep_stored {
            Ok(Linear::Stored {
                weight: self.stored(name)?,
                bias,
            })
        } else {
            Linear::dense(&self.dense(name)?, bias)
        }
    }

    fn embedding(&mut self) -> Result<Embedding> {
        if self.keep_stored {
            let q = self.stored("token_embd")?;
            self.originals.insert("token_embd".into(), q.clone());
            Ok(Embedding::Stored(q))
        } else {
            Ok(Embedding::Dense(self.dense("token_embd")?))
        }
    }

    /// What the model will hold, from the tensors' stored sizes, before any is read.
    fn plan(&self, exact: ExactWeights) -> MemoryPlan {
        MemoryPlan::of(
            self.content
                .tensor_infos
                .iter()
                .map(|(name, info)| (name.as_str(), info.ggml_dtype, info.shape.elem_count())),
            exact,
        )
    }
}

impl Gguf<'_> {
    /// The architecture's name and the model's shape.
    fn config(&mut self) -> Result<(String, ModelConfig)> {
        let arch = self
            .string("general.architecture")
            .ok_or_else(|| corrupt(self.path, "no general.architecture"))?
            .to_string();
        let (family, rope_style) = match arch.as_str() {
            // llama.cpp's converter permutes Llama/Mistral Q and K rows for interleaved RoPE.
            "llama" | "mistral" => (Family::Llama, RopeStyle::Interleaved),
            // The others are stored unpermuted and use NeoX (half-split) RoPE.
            "qwen2" => (Family::Qwen2, RopeStyle::HalfSplit),
            "qwen3" => (Family::Qwen3, RopeStyle::HalfSplit),
            "phi3" => (Family::Phi3, RopeStyle::HalfSplit),
            "gemma2" => (Family::Gemma2, RopeStyle::HalfSplit),
            "gemma3" => (Family::Gemma3, RopeStyle::HalfSplit),
            other => return Err(Error::UnsupportedArchitecture(other.to_string())),
        };
        if self
            .content
            .tensor_infos
            .contains_key("rope_factors_long.weight")
        {
            return Err(Error::Metadata(
                "Phi-3 long-context rotary factors (longrope) are not supported".into(),
            ));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let n_heads = self.usize(&k("attention.head_count"))?;
        let d_model = self.usize(&k("embedding_length"))?;
        let mut config = ModelConfig {
            n_layers: self.usize(&k("block_count"))?,
            n_heads,
            n_kv_heads: self.usize(&k("attention.head_count_kv")).unwrap_or(n_heads),
            d_model,
            d_ff: self.usize(&k("feed_forward_length"))?,
            head_dim: self
                .usize(&k("attention.key_length"))
                .unwrap_or(d_model / n_heads.max(1)),
            vocab_size: self.strings("tokenizer.ggml.tokens")?.len(),
            context_length: self.usize(&k("context_length")).unwrap_or(4096),
            rope_theta: self.f64(&k("rope.freq_base")).unwrap_or(10_000.0),
            rope_scaling: self.rope_scaling(&arch)?,
            rms_eps: self
                .f64(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_style,
            tied_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            // llama.cpp applies a window only to these families.
            sliding_window: match family {
                Family::Phi3 | Family::Gemma2 | Family::Gemma3 => {
                    self.usize(&k("attention.sliding_window")).ok()
                }
                _ => None,
            },
            ..ModelConfig::llama_like(family)
        };
        config.check_bounds()?;
        if matches!(family, Family::Gemma2 | Family::Gemma3) {
            self.gemma_config(&arch, &mut config)?;
        }
        config.validate()?;
        Ok((arch, config))
    }

    /// Gemma's settings as llama.cpp reads them: the caps from metadata; the local-layer
    /// pattern (every other layer for Gemma 2, five of six for Gemma 3), the local rotary
    /// base (10 000) and the score scale (√d_h, or √(d/h) for the 27B models) fixed by
    /// llama.cpp, as here.
    fn gemma_config(&self, arch: &str, config: &mut ModelConfig) -> Result<()> {
        let k = |s: &str| format!("{arch}.{s}");
        let gemma3 = config.family == Family::Gemma3;
        config.attn_softcap = self.f64(&k("attn_logit_softcapping")).ok();
        config.final_softcap = self.f64(&k("final_logit_softcapping")).ok();
        // `attention.sliding_window_pattern`: one flag per layer (true: windowed) or a
        // period whose last layer is global; llama.cpp's defaults when absent.
        let key = k("attention.sliding_window_pattern");
        let flags = match self.content.metadata.get(&key) {
            Some(Value::Array(flags)) => Some(
                flags
                    .iter()
                    .map(|f| f.to_bool().or_else(|_| f.to_u8().map(|b| b != 0)))
                    .collect::<std::result::Result<Vec<bool>, _>>()
                    .map_err(|_| Error::Metadata(format!("GGUF key `{key}` holds a non-flag")))?,
            ),
            _ => None,
        };
        let period = self
            .usize(&key)
            .unwrap_or(if gemma3 { 6 } else { 2 })
            .max(1);
        config.sliding_layers = Some(flags.unwrap_or_else(|| {
            (0..config.n_layers)
                .map(|l| (l + 1) % period != 0)
                .collect()
        }));
        if gemma3 {
            config.local_rope_theta = Some(10_000.0);
        }
        let is_27b = config.n_layers == if gemma3 { 62 } else { 46 };
        config.query_pre_attn_scalar = Some(if is_27b {
            (config.d_model / config.n_heads) as f64
        } else {
            config.head_dim as f64
        });
        Ok(())
    }

    /// The rotary scaling: Llama 3.1's per-pair divisors (`rope_freqs`), or a linear factor.
    fn rope_scaling(&mut self, arch: &str) -> Result<Option<RopeScaling>> {
        if let Some(factors) = self.rope_freqs()? {
            return Ok(Some(factors));
        }
        match self.string(&format!("{arch}.rope.scaling.type")) {
            None | Some("none") => Ok(None),
            Some("linear") => Ok(Some(RopeScaling::Linear {
                factor: self.f64(&format!("{arch}.rope.scaling.factor"))?,
            })),
            Some(other) => Err(Error::Metadata(format!(
                "rope scaling `{other}` is not supported (supported: linear, Llama 3 rope_freqs)"
            ))),
        }
    }

    /// Llama 3.1's rotary scaling, which llama.cpp's converter stores as one divisor per
    /// rotary pair in a `rope_freqs` tensor.
    fn rope_freqs(&mut self) -> Result<Option<RopeScaling>> {
        if !self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Ok(None);
        }
        let factors = self
            .tensor("rope_freqs.weight")?
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Some(RopeScaling::Factors(factors)))
    }

    /// The tokenizer built from the vocabulary, the chat template, and the stop tokens.
    fn tokenizer(&self) -> Result<(Tokenizer, ChatTemplate, Vec<u32>)> {
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let token_types = match self.content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| corrupt(self.path, e))?
                .iter()
                .map(|t| t.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let vocab = GgufVocab {
            model: self.string("tokenizer.ggml.model").unwrap_or("gpt2"),
            pre: self.string("tokenizer.ggml.pre"),
            merges: self.strings("tokenizer.ggml.merges").unwrap_or_default(),
            tokens: tokens.clone(),
            token_types,
            scores: match self.content.metadata.get("tokenizer.ggml.scores") {
                Some(Value::Array(scores)) => {
                    scores.iter().map(|s| s.to_f32().unwrap_or(0.0)).collect()
                }
                _ => Vec::new(),
            },
            add_space_prefix: self
                .content
                .metadata
                .get("tokenizer.ggml.add_space_prefix")
                .and_then(|v| v.to_bool().ok()),
            architecture: self.string("general.architecture").unwrap_or(""),
        };
        let tokenizer = tokenizer::from_gguf_vocab(&vocab)?;
        let token_text = |key: &str| {
            self.usize(key)
                .ok()
                .and_then(|id| tokens.get(id).cloned())
                .unwrap_or_default()
        };
        let (source, template) = match self.string("tokenizer.chat_template") {
            Some(t) => (TemplateSource::Gguf, t.to_string()),
            None => (TemplateSource::FallbackChatMl, CHATML_TEMPLATE.into()),
        };
        let template = ChatTemplate {
            source,
            template,
            bos_token: token_text("tokenizer.ggml.bos_token_id"),
            eos_token: token_text("tokenizer.ggml.eos_token_id"),
            enable_thinking: false,
        };
        let mut eos_ids: Vec<u32> = self
            .usize("tokenizer.ggml.eos_token_id")
            .ok()
            .map(|i| i as u32)
            .into_iter()
            .collect();
        eos_ids.extend(chat_stop_ids(&tokenizer));
        Ok((tokenizer, template, eos_ids))
    }

    /// Phi-3's fused projections of block `l`, split by role: `attn_qkv` into q, k, v and
    /// `ffn_up` into gate then up (llama.cpp keeps transformers' fused layout).
    fn fused_phi3(
        &mut self,
        l: usize,
        config: &ModelConfig,
    ) -> Result<HashMap<&'static str, Linear>> {
        let (q, kv, ff) = (
            config.n_heads * config.head_dim,
            config.n_kv_heads * config.head_dim,
            config.d_ff,
        );
        let qkv = self.stored(&format!("blk.{l}.attn_qkv"))?;
        let gate_up = self.stored(&format!("blk.{l}.ffn_up"))?;
        let keep_stored = self.keep_stored;
        let part = |fused: &QTensor, start: usize, rows: usize| -> Result<Linear> {
            let rows = split_rows(fused, start, rows)?;
            if keep_stored {
                Ok(Linear::Stored {
                    weight: Arc::new(rows),
                    bias: None,
                })
            } else {
                Linear::dense(&rows.dequantize(&Device::Cpu)?, None)
            }
        };
        Ok(HashMap::from([
            ("q", part(&qkv, 0, q)?),
            ("k", part(&qkv, q, kv)?),
            ("v", part(&qkv, q + kv, kv)?),
            ("gate", part(&gate_up, 0, ff)?),
            ("up", part(&gate_up, ff, ff)?),
        ]))
    }

    /// Every weight, matrices as f32 or as stored (the stored tensors kept for the fast path).
    fn weights(&mut self, config: &ModelConfig) -> Result<Weights> {
        let embed = self.embedding()?;
        let mut blocks = Vec::with_capacity(config.n_layers);
        for l in 0..config.n_layers {
            let fused = match config.family {
                Family::Phi3 => Some(self.fused_phi3(l, config)?),
                _ => None,
            };
            let this = std::cell::RefCell::new(&mut *self);
            let linear = |role: &str| -> Result<Linear> {
                if let Some(part) = fused.as_ref().and_then(|f| f.get(role)) {
                    return Ok(part.clone());
                }
                let mut g = this.borrow_mut();
                let name = format!("blk.{l}.{}", stored_name(&[ROLES], role));
                let bias = if config.qkv_bias && matches!(role, "q" | "k" | "v") {
                    Some(
                        g.tensor(&format!("{name}.bias"))?
                            .dequantize(&Device::Cpu)?,
                    )
                } else {
                    None
                };
                g.matrix(&name, bias)
            };
            let norm = |role: &str| -> Result<Tensor> {
                let name = format!("blk.{l}.{}", stored_name(&[ROLES], role));
                this.borrow_mut().dense(&name)
            };
            blocks.push(read_block(config, linear, norm)?);
        }
        let final_norm = self.dense("output_norm")?;
        let lm_head = if config.tied_embeddings {
            if let Some(q) = self.originals.get("token_embd").cloned() {
                self.originals.insert("output".into(), q);
            }
            embed.tied_unembedding()?
        } else {
            self.matrix("output", None)?
        };
        assemble(self.path, config, embed, blocks, final_norm, lm_head)
    }
}

impl<'a> Gguf<'a> {
    /// Reads the file's metadata and tensor index (no tensor data yet).
    fn open(path: &'a Path) -> Result<Gguf<'a>> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut file = BufReader::new(file);
        let content = Content::read(&mut file).map_err(|e| unreadable(path, e))?;
        let file_size = file
            .get_ref()
            .metadata()
            .map_err(|e| Error::io(path, e))?
            .len();
        check_tensor_extents(path, &content, file_size)?;
        Ok(Gguf {
            path,
            content,
            file,
            originals: HashMap::new(),
            quantization: BTreeMap::new(),
            quantized: false,
            keep_stored: false,
        })
    }
}

pub(super) fn load(path: &Path, exact: ExactWeights) -> Result<Checkpoint> {
    let mut g = Gguf::open(path)?;
    let (arch, config) = g.config()?;
    let plan = g.plan(exact);
    plan.check_fits(path)?;
    g.keep_stored = plan.keep_stored;
    let (tokenizer, template, eos_ids) = g.tokenizer()?;
    let weights = g.weights(&config)?;
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

/// Only the tokenizer of a GGUF file (vocabulary-only files included).
pub(super) fn read_tokenizer(path: &Path) -> Result<Tokenizer> {
    Ok(Gguf::open(path)?.tokenizer()?.0)
}

/// Every tensor's size, computed without overflow, fits in the file after its offset:
/// a header that claims 2⁶² elements or an offset past the end is refused with one line
/// before anything is allocated for it.
fn check_tensor_extents(path: &Path, content: &Content, file_size: u64) -> Result<()> {
    for (name, info) in &content.tensor_infos {
        let elems = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64));
        let (block, type_size) = (
            info.ggml_dtype.block_size() as u64,
            info.ggml_dtype.type_size() as u64,
        );
        let bytes = elems.and_then(|n| (n / block).checked_mul(type_size));
        let end = bytes.and_then(|b| {
            content
                .tensor_data_offset
                .checked_add(info.offset)?
                .checked_add(b)
        });
        match (elems, end) {
            (Some(n), Some(end)) if n % block == 0 && end <= file_size => {}
            (Some(n), _) if n % block != 0 => {
                return Err(corrupt(
                    path,
                    format!("tensor `{name}` has {n} elements, not a multiple of its block of {block}"),
                ))
            }
            _ => {
                return Err(corrupt(
                    path,
                    format!(
                        "tensor `{name}` ({:?}, shape {:?}) runs past the end of the file ({file_size} bytes): truncated or corrupt",
                        info.ggml_dtype,
                        info.shape.dims()
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// A GGUF file candle cannot parse. Tensor types it has no kernels for (the IQ family,
/// ternary and MXFP4 types) get a name and a way out instead of a type number.
fn unreadable(path: &Path, e: candle_core::Error) -> Error {
    let message = crate::error::candle_message(&e);
    let type_id = message
        .strip_prefix("unknown dtype for tensor ")
        .and_then(|n| n.trim().parse::<u32>().ok());
    match type_id {
        Some(id) => Error::UnsupportedTensorType {
            path: path.to_path_buf(),
            type_name: ggml_type_name(id),
        },
        None => corrupt(path, message),
    }
}

/// ggml's name of tensor type `id` (ggml.h), for the types candle does not read.
fn ggml_type_name(id: u32) -> String {
    let name = match id {
        4 => "Q4_2",
        5 => "Q4_3",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        31..=33 => "Q4_0 repacked",
        34 => "TQ1_0",
        35 => "TQ2_0",
        36..=38 => "IQ4_NL repacked",
        39 => "MXFP4",
        _ => return format!("ggml type {id}"),
    };
    name.to_string()
}
