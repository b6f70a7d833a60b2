//! Loading checkpoints: a GGUF file or an HF safetensors folder.

mod gguf;
mod hf;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::model::chat::ChatTemplate;
use crate::model::config::ModelConfig;
use crate::model::weights::keeps_fast_kernel;
use crate::model::{
    BlockWeights, Embedding, ExactWeights, FastPrecision, KernelTier, Linear, Model, Weights,
};
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
    /// What the weights take in memory, measured once loaded.
    #[serde(default)]
    pub memory: MemoryUse,
    /// The chat template knows thinking (a reasoning model: `enable_thinking` or `<think>`).
    #[serde(default)]
    pub reasoning: bool,
    /// Identifies the refusal-token adapter applied on top, if any (see
    /// `organism::Adapter::fingerprint`).
    #[serde(default)]
    pub adapter_fingerprint: Option<String>,
    /// Where the model runs (`cpu`, `cuda:N`, `metal:N`; see `crate::device`).
    #[serde(default = "cpu")]
    pub device: String,
}

fn cpu() -> String {
    "cpu".into()
}

/// Bytes the weights of each path hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryUse {
    /// How the exact path holds its matrices: `f32`, or `stored` (as in the checkpoint,
    /// dequantised per matrix on use).
    pub exact_weights: String,
    /// Bytes of the exact path's weights.
    pub exact_bytes: usize,
    /// Bytes the fast path adds (matrices it re-encodes; those it keeps as stored are shared).
    pub fast_bytes: usize,
}

impl MemoryUse {
    pub fn total_bytes(&self) -> usize {
        self.exact_bytes + self.fast_bytes
    }

    /// e.g. "stored weights 4.6 GB + fast path 0 B".
    pub fn describe(&self) -> String {
        format!(
            "{} weights {} + fast path {}",
            self.exact_weights,
            human_bytes(self.exact_bytes),
            human_bytes(self.fast_bytes)
        )
    }
}

/// `1234567` → "1.2 MB".
pub fn human_bytes(bytes: usize) -> String {
    let b = bytes as f64;
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.0} kB", b / 1e3),
        1_000_000..1_000_000_000 => format!("{:.0} MB", b / 1e6),
        _ => format!("{:.1} GB", b / 1e9),
    }
}

/// Memory a checkpoint will take, estimated from its tensors' stored types and sizes before
/// any is read, and the residence of the exact path's weights it implies.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MemoryPlan {
    pub keep_stored: bool,
    /// Peak bytes while loading and running: the weights of both paths (with an f32 exact
    /// path, the stored tensors too while the file is read) plus working memory.
    pub peak_bytes: usize,
}

impl MemoryPlan {
    /// Activations, KV cache, tokenizer and the app itself: a generous allowance for prompts
    /// of a few thousand tokens.
    const WORKING_BYTES: usize = 768 << 20;

    /// From `(name, stored type, element count)` of every tensor.
    pub fn of<'a>(
        tensors: impl Iterator<Item = (&'a str, GgmlDType, usize)>,
        exact: ExactWeights,
    ) -> MemoryPlan {
        let (mut stored, mut f32_bytes, mut reencoded) = (0, 0, 0);
        for (name, dtype, elems) in tensors {
            stored += elems / dtype.block_size() * dtype.type_size();
            f32_bytes += elems * 4;
            // The fast path re-encodes quantised matrices its kernels do not keep as Q8_0.
            let matrix = !name.contains("norm") && elems > 1 << 16;
            if matrix && dtype.block_size() > 1 && !keeps_fast_kernel(dtype) {
                reencoded += elems / 32 * 34;
            }
        }
        let keep_stored = exact.keeps_stored(f32_bytes);
        let weights = if keep_stored {
            stored
        } else {
            f32_bytes + stored
        };
        MemoryPlan {
            keep_stored,
            peak_bytes: weights + reencoded + Self::WORKING_BYTES,
        }
    }

    /// An error naming what the model needs when that is more than the memory available
    /// (`REFUSAL_LENS_MEMORY_LIMIT` bytes, else the system's available memory), before a
    /// single tensor is allocated.
    pub fn check_fits(&self, path: &Path) -> Result<()> {
        match available_memory() {
            Some(available) => self.check_fits_within(path, available),
            None => Ok(()),
        }
    }

    fn check_fits_within(&self, path: &Path, available: usize) -> Result<()> {
        if self.peak_bytes <= available {
            return Ok(());
        }
        Err(Error::TooLarge {
            path: path.to_path_buf(),
            need_gb: self.peak_bytes as f64 / 1e9,
            available_gb: available as f64 / 1e9,
            plan: if self.keep_stored {
                "weights as stored".into()
            } else {
                "an f32 copy of the weights for the exact path".into()
            },
        })
    }
}

/// Bytes the process may use: `REFUSAL_LENS_MEMORY_LIMIT` if set, else `MemAvailable`.
fn available_memory() -> Option<usize> {
    if let Ok(limit) = std::env::var("REFUSAL_LENS_MEMORY_LIMIT") {
        return limit.trim().parse().ok();
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Rows `start .. start + n` of a stored `[rows, cols]` tensor, as stored (its blocks run along
/// rows, so a row range is a byte range).
pub(crate) fn split_rows(q: &QTensor, start: usize, n: usize) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let dtype = q.dtype();
    if start + n > rows || !cols.is_multiple_of(dtype.block_size()) {
        return Err(Error::InvalidInput(format!(
            "rows {start}..{} of a {rows} × {cols} {dtype:?} tensor",
            start + n
        )));
    }
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let bytes = &data[start * row_bytes..(start + n) * row_bytes];
    let storage = QStorage::from_data(std::borrow::Cow::Borrowed(bytes), &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, (n, cols))?)
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
    embed: Embedding,
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

/// The tokenizer a GGUF file describes, without reading its tensors (vocabulary-only files
/// too).
pub fn gguf_tokenizer(path: &Path) -> Result<Tokenizer> {
    gguf::read_tokenizer(path)
}

impl Checkpoint {
    pub fn load(path: &Path) -> Result<Checkpoint> {
        Checkpoint::load_with(path, ExactWeights::Auto)
    }

    /// Loads with the exact path's weights held as `exact` says.
    pub fn load_with(path: &Path, exact: ExactWeights) -> Result<Checkpoint> {
        refuse_pickles(path)?;
        if path.is_dir() {
            hf::load(path, exact)
        } else if !path.exists() {
            Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ))
        } else {
            gguf::load(path, exact)
        }
    }

    pub fn into_model(
        self,
        precision: FastPrecision,
    ) -> Result<(Model, Tokenizer, ChatTemplate, Vec<u32>, ModelCard)> {
        let originals = &self.originals;
        let stored = matches!(self.dense.lm_head, Linear::Stored { .. });
        // Generation on weights dequantised per matrix would redo that for every token: a
        // model too large for an f32 copy generates on Q8_0 after its exact prompt pass, as
        // quantised checkpoints do.
        let quantized = self.quantized || stored;
        let fast = Weights::fast_from(
            &self.dense,
            &|n| originals.get(n).cloned(),
            precision,
            quantized,
        )?;
        let mut card = self.card;
        card.memory = MemoryUse {
            exact_weights: if stored { "stored" } else { "f32" }.into(),
            exact_bytes: self.dense.bytes(self.config.tied_embeddings),
            fast_bytes: fast.as_ref().map_or(0, |f| f.extra_bytes_over(&self.dense)),
        };
        // Generation's prompt pass (the first reply token) always runs on f32 (generate.rs).
        let kernels = KernelTier::detect().describe();
        card.generation_weights = match &fast {
            None => "f32".into(),
            Some(_) if self.quantized => {
                format!("f32 prompt pass, then Q8_0 · {kernels} (Q4/Q5 re-encoded at load)")
            }
            Some(_) if stored => {
                format!("f32 prompt pass, then Q8_0 · {kernels} (quantised at load: no f32 copy)")
            }
            Some(_) => format!("f32 prompt pass, then Q8_0 · {kernels} (quantised at load)"),
        };
        let model = Model::new(self.config, self.dense, fast)?;
        Ok((model, self.tokenizer, self.template, self.eos_ids, card))
    }
}

/// PyTorch checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) are pickles: loading one runs code
/// from the file. Model files are data here, so they are refused, pointing to safetensors.
fn refuse_pickles(path: &Path) -> Result<()> {
    let is_pickle = |p: &Path| {
        p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            ["bin", "pt", "pth", "ckpt", "pkl"].contains(&e.to_ascii_lowercase().as_str())
        })
    };
    let pickle = if path.is_dir() {
        let files: Vec<PathBuf> = std::fs::read_dir(path)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        let has_safetensors = files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "safetensors"));
        files.into_iter().find(|f| is_pickle(f) && !has_safetensors)
    } else {
        is_pickle(path).then(|| path.to_path_buf())
    };
    match pickle {
        Some(p) => Err(Error::InvalidInput(format!(
            "{} is a PyTorch pickle, which can run code when loaded; Refusal Lens reads safetensors and GGUF only (convert it with transformers' `save_pretrained(..., safe_serialization=True)`, or use the model's safetensors or GGUF release)",
            p.display()
        ))),
        None => Ok(()),
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
    embed: &Embedding,
    blocks: &[BlockWeights],
) -> std::result::Result<(), String> {
    let want = |got: (usize, usize), shape: (usize, usize), what: &str| {
        if got == shape {
            Ok(())
        } else {
            Err(format!("{what} has shape {got:?}, expected {shape:?}"))
        }
    };
    let embed = embed.dims().map_err(|e| e.to_string())?;
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
        memory: MemoryUse::default(),
        reasoning: template.supports_thinking(),
        adapter_fingerprint: None,
        device: cpu(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama-3.1-8B's tensors as a Q4_K_M GGUF stores them (by count and type, roughly):
    /// the plan keeps them stored, fits 8 GB, and an f32 exact path would not.
    #[test]
    fn an_8b_q4_k_m_plan_stays_stored_and_fits_8_gb() {
        let (d, ff, vocab, layers) = (4096, 14336, 128_256, 32);
        let mut tensors = vec![
            ("token_embd.weight".to_string(), GgmlDType::Q4K, vocab * d),
            ("output.weight".to_string(), GgmlDType::Q6K, vocab * d),
        ];
        for l in 0..layers {
            for (name, dtype, n) in [
                ("attn_q", GgmlDType::Q4K, d * d),
                ("attn_k", GgmlDType::Q4K, d * 1024),
                ("attn_v", GgmlDType::Q6K, d * 1024),
                ("attn_output", GgmlDType::Q4K, d * d),
                ("ffn_gate", GgmlDType::Q4K, d * ff),
                ("ffn_up", GgmlDType::Q4K, d * ff),
                ("ffn_down", GgmlDType::Q6K, d * ff),
                ("attn_norm", GgmlDType::F32, d),
                ("ffn_norm", GgmlDType::F32, d),
            ] {
                tensors.push((format!("blk.{l}.{name}.weight"), dtype, n));
            }
        }
        let of =
            |exact| MemoryPlan::of(tensors.iter().map(|(n, t, e)| (n.as_str(), *t, *e)), exact);
        let auto = of(ExactWeights::Auto);
        assert!(auto.keep_stored);
        assert!(auto.peak_bytes < 8_000_000_000, "{auto:?}");
        let f32s = of(ExactWeights::F32);
        assert!(f32s.peak_bytes > 32_000_000_000, "{f32s:?}");
        let path = Path::new("llama-8b.gguf");
        assert!(auto.check_fits_within(path, 8 << 30).is_ok());
        let err = f32s
            .check_fits_within(path, 24 << 30)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("needs about 3") && err.contains("25.8 GB is available"),
            "{err}"
        );
        assert!(err.contains("f32 copy"), "{err}");
    }
}
