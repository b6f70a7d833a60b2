//! The shape of a decoder-only transformer: Llama and the families that differ from it by
//! configuration (Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3).

use serde::{Deserialize, Serialize};

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1). llama.cpp's converter permutes Llama Q/K rows into this layout, so
    /// GGUF Llama weights need it.
    Interleaved,
    /// Pairs (i, i + d/2), the HF transformers layout (`rotate_half`).
    HalfSplit,
}

/// The architecture family; one forward pass serves all of them, the family only selects
/// biases and naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    Llama,
    Qwen2,
    /// Qwen2 without the q/k/v biases and with an RMSNorm on every head's query and key.
    Qwen3,
    /// Llama with fused `qkv_proj` and `gate_up_proj`, split at load.
    Phi3,
    /// GeGLU, `(1 + w)` norms (folded at load), sandwich norms, embeddings × √d, soft-capped
    /// attention and final logits, alternating sliding-window layers.
    Gemma2,
    /// Gemma 2 with per-head q/k norms, no soft-capping, and local layers with their own
    /// rotary base.
    Gemma3,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Phi3 => "phi3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
        }
    }
}

/// The MLP's gate nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Activation {
    /// `silu(gate) ⊙ up` (SwiGLU: Llama, Qwen, Mistral, Phi-3).
    #[default]
    Silu,
    /// `gelu_tanh(gate) ⊙ up` (GeGLU with the tanh approximation: Gemma).
    GeluTanh,
}

/// How the rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// A divisor per rotary pair, as llama.cpp stores Llama 3.1's scaling (`rope_freqs`).
    Factors(Vec<f32>),
    /// Every frequency divided by `factor` (`rope_type: linear`, Gemma 3's global layers).
    Linear { factor: f64 },
    /// Llama 3.1+ (`rope_type: llama3`): wavelengths longer than
    /// `original_context / low_freq_factor` are stretched by `factor`, shorter than
    /// `original_context / high_freq_factor` kept, and those between interpolated smoothly.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_context: f64,
    },
}

impl RopeScaling {
    /// The scaling as an HF config's `rope_scaling`; None for a GGUF factor table, which no HF
    /// config can state.
    pub fn hf_config(&self) -> Option<serde_json::Value> {
        match *self {
            RopeScaling::Linear { factor } => {
                Some(serde_json::json!({"rope_type": "linear", "factor": factor}))
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => Some(serde_json::json!({"rope_type": "llama3", "factor": factor,
                "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_context})),
            RopeScaling::Factors(_) => None,
        }
    }

    /// The scaled inverse frequency of rotary pair `pair`.
    pub fn apply(&self, pair: usize, inv_freq: f64) -> f64 {
        match *self {
            RopeScaling::Factors(ref factors) => inv_freq / factors[pair] as f64,
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => {
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                if wavelen < original_context / high_freq_factor {
                    inv_freq
                } else if wavelen > original_context / low_freq_factor {
                    inv_freq / factor
                } else {
                    let smooth = (original_context / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub family: Family,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f64,
    /// Rescaled rotary frequencies (Llama 3.1+), if any.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    pub rms_eps: f64,
    pub rope_style: RopeStyle,
    pub tied_embeddings: bool,
    /// Q, K and V projections carry biases (Qwen2).
    pub qkv_bias: bool,
    /// Each head's query and key pass through an RMSNorm of size `head_dim` before RoPE
    /// (Qwen3).
    #[serde(default)]
    pub qk_norm: bool,
    /// Each query attends to at most this many keys, itself included (Mistral, Gemma's
    /// local layers).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Which layers the window applies to (Gemma alternates local and global layers);
    /// None: every layer.
    #[serde(default)]
    pub sliding_layers: Option<Vec<bool>>,
    /// The rotary base of the windowed layers, unscaled (Gemma 3); None: `rope_theta` and
    /// `rope_scaling` as on every other layer.
    #[serde(default)]
    pub local_rope_theta: Option<f64>,
    #[serde(default)]
    pub activation: Activation,
    /// Token embeddings are multiplied by √d_model before the first block (Gemma).
    #[serde(default)]
    pub scale_embeddings: bool,
    /// A second norm on the attention and MLP outputs before each adds to the stream (Gemma's
    /// sandwich norms).
    #[serde(default)]
    pub post_norms: bool,
    /// Attention scores are divided by √(this) instead of √d_h (Gemma's
    /// `query_pre_attn_scalar`).
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Attention scores become `cap · tanh(score / cap)` before the mask (Gemma 2).
    #[serde(default)]
    pub attn_softcap: Option<f64>,
    /// Logits become `cap · tanh(logit / cap)` (Gemma 2).
    #[serde(default)]
    pub final_softcap: Option<f64>,
}

impl ModelConfig {
    /// Refuses sizes no real model has, before anything is allocated by them: a hostile
    /// or broken file cannot make the loader reserve memory for a billion layers. The limits
    /// are far above every supported family (the largest: 128 layers, 262 144 tokens,
    /// 16 384 wide, 10 M context).
    pub fn check_bounds(&self) -> crate::Result<()> {
        let limits: [(&str, usize, usize); 7] = [
            ("layers", self.n_layers, 1 << 10),
            ("attention heads", self.n_heads, 1 << 10),
            ("key/value heads", self.n_kv_heads, 1 << 10),
            ("width", self.d_model, 1 << 16),
            ("feed-forward width", self.d_ff, 1 << 20),
            ("head size", self.head_dim, 1 << 12),
            ("vocabulary", self.vocab_size, 1 << 22),
        ];
        for (what, value, max) in limits {
            if value > max {
                return Err(crate::Error::Metadata(format!(
                    "the model claims {value} {what}; more than {max} is not a model this app can load"
                )));
            }
        }
        if self.context_length > 1 << 26 {
            return Err(crate::Error::Metadata(format!(
                "the model claims a context of {} tokens; more than {} is not supported",
                self.context_length,
                1usize << 26
            )));
        }
        Ok(())
    }

    pub fn validate(&self) -> crate::Result<()> {
        self.check_bounds()?;
        let bad = |m: String| Err(crate::Error::Metadata(m));
        if self.n_layers == 0 || self.n_heads == 0 || self.n_kv_heads == 0 || self.d_model == 0 {
            return bad(format!("empty model dimensions: {self:?}"));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} query heads are not a multiple of {} key/value heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if let Some(RopeScaling::Factors(f)) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 || f.iter().any(|x| x.is_nan() || *x <= 0.0) {
                return bad(format!(
                    "rope_freqs has {} positive factors; the heads need {}",
                    f.len(),
                    self.head_dim / 2
                ));
            }
        }
        if let Some(layers) = &self.sliding_layers {
            if layers.len() != self.n_layers {
                return bad(format!(
                    "{} sliding-window layer flags for {} layers",
                    layers.len(),
                    self.n_layers
                ));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head size {} is odd; rotary embeddings need it even",
                self.head_dim
            ));
        }
        Ok(())
    }

    /// True when layer `l` attends through the sliding window.
    pub fn is_local(&self, l: usize) -> bool {
        self.sliding_window.is_some() && self.sliding_layers.as_ref().is_none_or(|v| v[l])
    }

    /// The divisor of attention scores: √(query_pre_attn_scalar), else √d_h.
    pub fn score_divisor(&self) -> f64 {
        self.query_pre_attn_scalar
            .unwrap_or(self.head_dim as f64)
            .sqrt()
    }

    /// A Llama-style configuration (SwiGLU, one norm per sublayer, no caps); the families'
    /// loaders start from it and set what differs.
    pub fn llama_like(family: Family) -> ModelConfig {
        ModelConfig {
            family,
            n_layers: 0,
            n_heads: 0,
            n_kv_heads: 0,
            d_model: 0,
            d_ff: 0,
            head_dim: 0,
            vocab_size: 0,
            context_length: 4096,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rms_eps: 1e-5,
            rope_style: RopeStyle::HalfSplit,
            tied_embeddings: false,
            qkv_bias: family == Family::Qwen2,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            sliding_window: None,
            sliding_layers: None,
            local_rope_theta: None,
            activation: match family {
                Family::Gemma2 | Family::Gemma3 => Activation::GeluTanh,
                _ => Activation::Silu,
            },
            scale_embeddings: matches!(family, Family::Gemma2 | Family::Gemma3),
            post_norms: matches!(family, Family::Gemma2 | Family::Gemma3),
            query_pre_attn_scalar: None,
            attn_softcap: None,
            final_softcap: None,
        }
    }

    /// Parameters, counting tied embeddings once.
    pub fn parameter_count(&self) -> usize {
        let d = self.d_model;
        let attn = d * self.n_heads * self.head_dim * 2 + d * self.n_kv_heads * self.head_dim * 2;
        let bias = if self.qkv_bias {
            (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        } else {
            0
        };
        let mlp = 3 * d * self.d_ff;
        let qk_norm = if self.qk_norm { 2 * self.head_dim } else { 0 };
        let norms = if self.post_norms { 4 * d } else { 2 * d };
        let per_layer = attn + bias + qk_norm + mlp + norms;
        let embed = self.vocab_size * d * if self.tied_embeddings { 1 } else { 2 };
        self.n_layers * per_layer + embed + d
    }
}
