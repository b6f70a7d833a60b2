//! A refusal-token adapter on disk: the new tokens' rows, the LoRA factors and the metadata
//! (training options, held-out metrics, the calibrated τ), and applying it to a base model.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::training::TrainOptions;
use crate::data::prompts::PromptRecord;
use crate::model::{Linear, RespondBlocks};
use crate::refusal::{calibrate_gate, CalibratedTau, GateGoal};
use crate::{Error, LoadedModel, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterMeta {
    pub tokens: Vec<String>,
    pub base_model: String,
    pub base_model_sha256: String,
    pub data_sha256: String,
    pub train_prompts: usize,
    pub options: TrainOptions,
    /// Loss at each step of the row fit, then of the LoRA phase.
    pub losses: Vec<f32>,
    #[serde(default)]
    pub lora_losses: Vec<f32>,
    #[serde(default)]
    pub lora_tokens_per_second: f64,
    pub seconds: f64,
    /// Held-out metrics, filled in by whoever evaluates.
    #[serde(default)]
    pub metrics: serde_json::Value,
    /// The gate's threshold, calibrated on the val split (`calibrate_gate`); None: 0.5.
    #[serde(default)]
    pub tau: Option<f32>,
    /// The rule that chose `tau` (absent in adapters calibrated before there was a choice:
    /// those used Youden's J).
    #[serde(default)]
    pub tau_goal: Option<GateGoal>,
    pub created_by: String,
}

/// What training produces: the new tokens' rows and how they were made.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `[n_tokens, d]` unembedding (output) rows: the decision probe.
    pub rows: Tensor,
    /// `[n_tokens, d]` embedding (input) rows, when they differ from the output rows. The
    /// output rows grow large to win the first-token softmax; as inputs they would swamp the
    /// residual stream, so the inputs are their own parameters.
    pub input_rows: Option<Tensor>,
    /// `blocks.{l}.attn.{q,k,v,o}.lora_{a,b}` → `A` `[r, in]` / `B` `[out, r]`.
    pub lora: std::collections::BTreeMap<String, Tensor>,
    pub meta: AdapterMeta,
}

pub(super) const LORA_TARGETS: [&str; 4] = ["q", "k", "v", "o"];

pub(super) fn lora_name(layer: usize, target: &str, part: &str) -> String {
    format!("blocks.{layer}.attn.{target}.lora_{part}")
}

pub const ADAPTER_FILE: &str = "adapter.safetensors";
pub const META_FILE: &str = "adapter.json";

impl AdapterMeta {
    /// Records a calibration (None: uncalibrated, τ = 0.5).
    pub fn set_tau(&mut self, calibrated: Option<CalibratedTau>) {
        self.tau = calibrated.map(|c| c.tau);
        self.tau_goal = calibrated.map(|c| c.goal);
    }

    /// Puts the gate's calibrated τ and its rule on the card of the model the adapter is on.
    fn mark_gate(&self, card: &mut crate::model::loader::ModelCard) {
        card.refusal_tau = self.tau;
        // Adapters calibrated before there was a choice of rule used Youden's J.
        card.refusal_tau_goal = self.tau.map(|_| self.tau_goal.unwrap_or(GateGoal::Youden));
    }

    /// Writes `adapter.json` (the weights beside it are left alone).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let json =
            serde_json::to_string_pretty(self).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let (path, tmp) = (
            dir.join(META_FILE),
            dir.join(format!("{META_FILE}.partial")),
        );
        std::fs::write(&tmp, json).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }
}

impl Adapter {
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors: std::collections::HashMap<String, Tensor> = self
            .lora
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        tensors.insert("token_rows".to_string(), self.rows.clone());
        if let Some(input) = &self.input_rows {
            tensors.insert("token_input_rows".to_string(), input.clone());
        }
        // Each file is written beside itself and renamed over the old one, so a crash leaves
        // the previous file whole (tensors first: the metadata names what they hold).
        let tmp = dir.join(format!("{ADAPTER_FILE}.partial"));
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, dir.join(ADAPTER_FILE)).map_err(|e| Error::io(dir, e))?;
        self.meta.save(dir)
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
        let lora: std::collections::BTreeMap<String, Tensor> = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .filter(|(k, _)| k.starts_with("blocks."))
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        let input_rows = tensors
            .get("token_input_rows")
            .map(|t| t.to_dtype(DType::F32))
            .transpose()?;
        Ok(Adapter {
            rows: rows.to_dtype(DType::F32)?,
            input_rows,
            lora,
            meta,
        })
    }

    /// [`Adapter::apply`], then the gate calibrated on `held_out` for `goal`
    /// ([`calibrate_gate`]): the τ goes into the adapter's metadata and the returned model's card.
    pub fn apply_calibrated(
        &mut self,
        base: &LoadedModel,
        held_out: &[PromptRecord],
        goal: GateGoal,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<LoadedModel> {
        let mut organism = self.apply(base)?;
        self.meta
            .set_tau(calibrate_gate(&organism, held_out, goal, cancelled)?);
        self.meta.mark_gate(&mut organism.card);
        Ok(organism)
    }

    /// SHA-256 of the adapter's token rows (output, then input rows; f32 little-endian):
    /// what tells one trained adapter from another once applied.
    pub fn fingerprint(&self) -> Result<String> {
        let mut h = Sha256::new();
        for t in std::iter::once(&self.rows).chain(&self.input_rows) {
            for v in t.flatten_all()?.to_vec1::<f32>()? {
                h.update(v.to_le_bytes());
            }
        }
        Ok(format!("{:x}", h.finalize()))
    }

    /// The model with the adapter's tokens added (the base model is left as it is).
    pub fn apply(&self, base: &LoadedModel) -> Result<LoadedModel> {
        let mut m = base.clone();
        if !self.lora.is_empty() {
            let scale = self.meta.options.alpha / self.meta.options.rank as f64;
            for (l, block) in m.model.dense.blocks.iter_mut().enumerate() {
                for (target, lin) in LORA_TARGETS.iter().zip([
                    &mut block.q,
                    &mut block.k,
                    &mut block.v,
                    &mut block.o,
                ]) {
                    let (Some(a), Some(b)) = (
                        self.lora.get(&lora_name(l, target, "a")),
                        self.lora.get(&lora_name(l, target, "b")),
                    ) else {
                        continue;
                    };
                    let merged = Linear::LoRA {
                        base: Box::new(lin.clone()),
                        a: a.clone(),
                        b: b.clone(),
                        scale,
                    }
                    .dense_weight()?;
                    *lin = Linear::dense(&merged, lin.bias().cloned())?;
                }
            }
        }
        let names: Vec<&str> = self.meta.tokens.iter().map(String::as_str).collect();
        m.add_tokens_untied(
            &names,
            self.input_rows.as_ref().unwrap_or(&self.rows),
            &self.rows,
        )?;
        m.card.name = format!("{} + refusal tokens", base.card.name);
        m.card.adapter_fingerprint = Some(self.fingerprint()?);
        self.meta.mark_gate(&mut m.card);
        // The adapter decides; after `[respond]` the base model's blocks write the answer.
        m.respond_blocks = Some(RespondBlocks {
            dense: base.model.dense.blocks.clone(),
            fast: base.model.fast.as_ref().map(|f| f.blocks.clone()),
        });
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
