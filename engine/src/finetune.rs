//! Refusal-token fine-tuning (Refusal Tokens, paper 4): teach a model to begin each reply with
//! `[refuse]` or `[respond]`, then calibrate the threshold on `p([refuse])` at inference.
//!
//! Trained here: the two new vocabulary rows (tied embedding/unembedding rows; a separate output
//! row for untied models), fitted as a probe inside the unembedding on the final normalised
//! state at t_post with cross-entropy over the whole vocabulary. See `fit_token_rows`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::generate::RefusalGate;
use crate::hooks::HookSpec;
use crate::prompts::{Label, PromptRecord};
use crate::refusal::{first_positions, fit_token_rows, refusal_rate, REFUSE_TOKEN, RESPOND_TOKEN};
use crate::{Error, LoadedModel, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    /// AdamW steps for the token rows (full batch).
    pub row_steps: usize,
    pub row_lr: f64,
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            row_steps: 600,
            row_lr: 0.02,
            seed: 0,
        }
    }
}

/// Progress of a training job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainProgress {
    pub phase: String,
    pub step: usize,
    pub total: usize,
    pub loss: Option<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterMeta {
    pub tokens: Vec<String>,
    pub base_model: String,
    pub base_model_sha256: String,
    pub data_sha256: String,
    pub train_prompts: usize,
    pub options: TrainOptions,
    /// Loss at each step.
    pub losses: Vec<f32>,
    pub seconds: f64,
    /// Held-out metrics, filled in by whoever evaluates.
    #[serde(default)]
    pub metrics: serde_json::Value,
    pub created_by: String,
}

/// What training produces: the new tokens' rows and how they were made.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `[n_tokens, d]` embedding (= unembedding, tied) rows.
    pub rows: Tensor,
    pub meta: AdapterMeta,
}

pub const ADAPTER_FILE: &str = "adapter.safetensors";
pub const META_FILE: &str = "adapter.json";

impl Adapter {
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors =
            std::collections::HashMap::from([("token_rows".to_string(), self.rows.clone())]);
        candle_core::safetensors::save(&tensors, dir.join(ADAPTER_FILE))?;
        let json = serde_json::to_string_pretty(&self.meta)
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        std::fs::write(dir.join(META_FILE), json).map_err(|e| Error::io(dir.join(META_FILE), e))
    }

    pub fn load(dir: &Path) -> Result<Adapter> {
        let meta_path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
        let meta: AdapterMeta = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidInput(format!("{}: {e}", meta_path.display())))?;
        let tensors =
            candle_core::safetensors::load(dir.join(ADAPTER_FILE), &candle_core::Device::Cpu)
                .map_err(|e| {
                    Error::InvalidInput(format!(
                        "{}: {}",
                        dir.join(ADAPTER_FILE).display(),
                        crate::error::candle_message(&e)
                    ))
                })?;
        let rows = tensors
            .get("token_rows")
            .cloned()
            .ok_or_else(|| Error::InvalidInput(format!("{} has no token_rows", dir.display())))?;
        Ok(Adapter { rows, meta })
    }

    /// The model with the adapter's tokens added (the base model is left as it is).
    pub fn apply(&self, base: &LoadedModel) -> Result<LoadedModel> {
        let mut m = base.clone();
        let names: Vec<&str> = self.meta.tokens.iter().map(String::as_str).collect();
        m.add_tokens(&names, &self.rows)?;
        m.card.name = format!("{} + refusal tokens", base.card.name);
        Ok(m)
    }
}

/// SHA-256 of a model file, or of every file of a model folder in name order.
pub fn model_sha256(path: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut h = Sha256::new();
    for f in files.drain(..) {
        let mut file = std::fs::File::open(&f).map_err(|e| Error::io(&f, e))?;
        std::io::copy(&mut file, &mut h).map_err(|e| Error::io(&f, e))?;
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Training targets: harmful → `[refuse]` (0), harmless (incl. borderline) → `[respond]` (1).
pub fn target_of(r: &PromptRecord) -> Option<u32> {
    match r.label? {
        Label::Harmful => Some(0),
        Label::Harmless => Some(1),
    }
}

/// Fits the refusal tokens on `train` (records with labels). `progress` sees every phase.
pub fn train_refusal_tokens(
    base: &LoadedModel,
    train: &[PromptRecord],
    opts: &TrainOptions,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&TrainProgress),
) -> Result<Adapter> {
    let started = Instant::now();
    let labelled: Vec<(&PromptRecord, u32)> = train
        .iter()
        .filter_map(|r| target_of(r).map(|t| (r, t)))
        .collect();
    if !labelled.iter().any(|(_, t)| *t == 0) || !labelled.iter().any(|(_, t)| *t == 1) {
        return Err(Error::InvalidInput(
            "training needs labelled harmful and harmless prompts".into(),
        ));
    }
    if base.tokenizer.token_to_id(REFUSE_TOKEN).is_some() {
        return Err(Error::InvalidInput(
            "the model already has refusal tokens; train on its base model".into(),
        ));
    }
    let ids: Vec<Vec<u32>> = labelled
        .iter()
        .map(|(r, _)| base.chat_prompt(None, &r.prompt).map(|p| p.ids))
        .collect::<Result<_>>()?;
    let total = ids.len();
    let states = first_positions(
        base,
        base.model.generation_weights(),
        &ids,
        &HookSpec::default(),
        cancelled,
        &mut |i, n| {
            progress(&TrainProgress {
                phase: "reading t_post states".into(),
                step: i,
                total: n,
                loss: None,
            })
        },
    )?;
    let normalized = Tensor::stack(
        &states
            .iter()
            .map(|s| s.normalized.clone())
            .collect::<Vec<_>>(),
        0,
    )?;
    let lse = Tensor::from_vec(
        states.iter().map(|s| s.logsumexp).collect::<Vec<_>>(),
        total,
        normalized.device(),
    )?;
    let targets: Vec<u32> = labelled.iter().map(|(_, t)| *t).collect();
    // Start both rows at the mean embedding: a neutral token the model has no opinion on.
    let mean = base.model.dense.embed.mean_keepdim(0)?;
    let init = Tensor::cat(&[&mean, &mean], 0)?;
    let fit = fit_token_rows(
        &normalized,
        &lse,
        &targets,
        &init,
        opts.row_steps,
        opts.row_lr,
    )?;
    progress(&TrainProgress {
        phase: "fitting token rows".into(),
        step: opts.row_steps,
        total: opts.row_steps,
        loss: fit.losses.last().copied(),
    });

    let mut data = Sha256::new();
    for (r, t) in &labelled {
        data.update(r.prompt.as_bytes());
        data.update([*t as u8, b'\n']);
    }
    let meta = AdapterMeta {
        tokens: vec![REFUSE_TOKEN.into(), RESPOND_TOKEN.into()],
        base_model: base.card.name.clone(),
        base_model_sha256: model_sha256(&base.card.path).unwrap_or_default(),
        data_sha256: format!("{:x}", data.finalize()),
        train_prompts: total,
        options: opts.clone(),
        losses: fit.losses,
        seconds: started.elapsed().as_secs_f64(),
        metrics: serde_json::Value::Null,
        created_by: format!("refusal-lens {}", env!("CARGO_PKG_VERSION")),
    };
    Ok(Adapter {
        rows: fit.rows.to_dtype(DType::F32)?,
        meta,
    })
}

/// The calibrated gate of a model with refusal tokens.
pub fn gate(lm: &LoadedModel, tau: f32) -> Option<RefusalGate> {
    Some(RefusalGate {
        refuse: lm.tokenizer.token_to_id(REFUSE_TOKEN)?,
        respond: lm.tokenizer.token_to_id(RESPOND_TOKEN)?,
        tau,
    })
}

/// `p([refuse])` (or `P(R)` for ordinary models) at t_post for each prompt.
pub fn first_token_probabilities(
    lm: &LoadedModel,
    prompts: &[&str],
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f32>> {
    let signal = crate::refusal::RefusalSignal::for_model(lm)?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| lm.chat_prompt(None, p).map(|c| c.ids))
        .collect::<Result<_>>()?;
    let states = first_positions(
        lm,
        lm.model.generation_weights(),
        &ids,
        &HookSpec::default(),
        cancelled,
        progress,
    )?;
    Ok(states
        .iter()
        .map(|s| signal.probability(&s.logprobs))
        .collect())
}

/// Refusal rate of each set at `tau`.
pub fn rates_at(probabilities: &[Vec<f32>], tau: f32) -> Vec<f32> {
    probabilities.iter().map(|p| refusal_rate(p, tau)).collect()
}
