//! Loading checkpoints: a GGUF file or an HF safetensors folder.

mod gguf;
mod hf;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::model::chat::ChatTemplate;
use crate::model::config::ModelConfig;
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
    /// Quantised tensors as stored, by role name, for the fast path.
    originals: HashMap<String, Arc<QTensor>>,
    quantized: bool,
}

/// The weights once every tensor is read, their shapes checked against the config.
fn assemble(
    path: &Path,
    config: &ModelConfig,
    embed: Tensor,
    blocks: Vec<BlockWeights>,
    final_norm: Tensor,
    lm_head: Linear,
) -> Result<Weights> {
    check_shapes(config, &embed, &blocks).map_err(|e| corrupt(path, e))?;
    Ok(Weights {
        embed,
        blocks,
        final_norm,
        lm_head,
    })
}

/// Where a checkpoint format stores each role of a block's tensors, by role.
type RoleNames = [(&'static str, &'static str)];

/// The stored name of `role`: the first table (a family's overrides, then the format's)
/// that names it.
fn stored_name(tables: &[&RoleNames], role: &str) -> &'static str {
    tables
        .iter()
        .flat_map(|t| t.iter())
        .find(|(r, _)| *r == role)
        .map(|(_, name)| *name)
        .expect("read_block asks only for the roles every table names")
}

/// One block's weights, read by a loader that knows where each role is stored (norm roles:
/// `attn_norm`, `mlp_norm`; with `qk_norm` also `q_norm` and `k_norm`; with `post_norms`
/// also `attn_post_norm` and `mlp_post_norm`).
fn read_block(
    config: &ModelConfig,
    mut linear: impl FnMut(&str) -> Result<Linear>,
    mut norm: impl FnMut(&str) -> Result<Tensor>,
) -> Result<BlockWeights> {
    let mut optional = |wanted: bool, role: &str| wanted.then(|| norm(role)).transpose();
    let q_norm = optional(config.qk_norm, "q_norm")?;
    let k_norm = optional(config.qk_norm, "k_norm")?;
    let attn_post_norm = optional(config.post_norms, "attn_post_norm")?;
    let mlp_post_norm = optional(config.post_norms, "mlp_post_norm")?;
    Ok(BlockWeights {
        attn_norm: norm("attn_norm")?,
        q_norm,
        k_norm,
        q: linear("q")?,
        k: linear("k")?,
        v: linear("v")?,
        o: linear("o")?,
        attn_post_norm,
        mlp_norm: norm("mlp_norm")?,
        mlp_post_norm,
        gate: linear("gate")?,
        up: linear("up")?,
        down: linear("down")?,
    })
}

impl Checkpoint {
    pub fn load(path: &Path) -> Result<Checkpoint> {
        if path.is_dir() {
            hf::load(path)
        } else if !path.exists() {
            Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ))
        } else {
            gguf::load(path)
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

pub(super) fn corrupt(path: &Path, reason: impl std::fmt::Display) -> Error {
    let reason = reason.to_string();
    let reason = reason.lines().next().unwrap_or_default().to_string(); // drop candle's backtrace
    Error::CorruptModel {
        path: path.to_path_buf(),
        reason,
    }
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
        Checkpoint::unquantized(config, dense, tokenizer, template, eos_ids, card)
    }

    /// A checkpoint of float weights: its fast path, if any, is quantised from them.
    fn unquantized(
        config: ModelConfig,
        dense: Weights,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        eos_ids: Vec<u32>,
        card: ModelCard,
    ) -> Checkpoint {
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
