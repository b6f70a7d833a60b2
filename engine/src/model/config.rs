//! The shape of a decoder-only transformer of the Llama family (Llama, Mistral, Qwen2,
//! Qwen3).

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
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Phi3 => "phi3",
        }
    }
}

/// How the rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// A divisor per rotary pair, as llama.cpp stores Llama 3.1's scaling (`rope_freqs`).
    Factors(Vec<f32>),
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
    /// The scaled inverse frequency of rotary pair `pair`.
    pub fn apply(&self, pair: usize, inv_freq: f64) -> f64 {
        match *self {
            RopeScaling::Factors(ref factors) => inv_freq / factors[pair] as f64,
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
    /// Each query attends to at most this many keys, itself included (Mistral).
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

impl ModelConfig {
    pub fn validate(&self) -> crate::Result<()> {
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
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head size {} is odd; rotary embeddings need it even",
                self.head_dim
            ));
        }
        Ok(())
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
        let per_layer = attn + bias + qk_norm + mlp + 2 * d;
        let embed = self.vocab_size * d * if self.tied_embeddings { 1 } else { 2 };
        self.n_layers * per_layer + embed + d
    }
}
