//! The analysis pipelines the CLI and the GUI share: two prompt sets → directions, and two
//! prompt sets → probes. Each set is run through the model once (and cached on disk); every
//! later choice of split, layer or filter reads those states.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::analysis::activations::{collect_cached, SetActivations};
use crate::analysis::directions::{
    filter_by_behaviour, select, Directions, Provenance, SelectOptions,
};
use crate::analysis::probe::{
    labels, random_holdout, train_probes, LabelSource, ProbeOptions, ProbeSet,
};
use crate::data::prompts::{PromptSet, Split};
use crate::organism::model_sha256;
use crate::{Error, LoadedModel, Result};

/// `progress(phase, done, total)`.
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize);

#[derive(Debug, Clone)]
pub struct DirectionOptions {
    /// Keep only refused harmful and answered harmless prompts.
    pub filter_by_behaviour: bool,
    /// Choose the layer and position by ablation on the val split (else: best separation).
    pub select: bool,
    pub select_options: SelectOptions,
    /// At most this many val prompts per set for the selection (it runs 3 passes over them
    /// per candidate).
    pub val_prompts: usize,
    pub system: Option<String>,
}

impl Default for DirectionOptions {
    fn default() -> Self {
        DirectionOptions {
            filter_by_behaviour: false,
            select: true,
            select_options: SelectOptions::default(),
            val_prompts: 16,
            system: None,
        }
    }
}

/// Which prompts a probe is scored on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Holdout {
    /// A seeded random fraction of both sets (docs/methods.md: 80/20).
    Random { fraction: f32, seed: u64 },
    /// The sets' own `test` split (trained on the rest).
    TestSplit,
}

impl Default for Holdout {
    fn default() -> Self {
        Holdout::Random {
            fraction: 0.2,
            seed: 0,
        }
    }
}

impl std::str::FromStr for Holdout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "random" => Ok(Holdout::default()),
            "test" => Ok(Holdout::TestSplit),
            _ => Err(Error::InvalidInput(format!(
                "unknown holdout `{s}` (use random or test)"
            ))),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ProbeJob {
    pub options: ProbeOptions,
    pub holdout: Holdout,
    /// Layers to train at (default: every residual state).
    pub layers: Option<Vec<usize>>,
    pub system: Option<String>,
}

fn prompts(set: &PromptSet) -> Vec<&str> {
    set.records.iter().map(|r| r.prompt.as_str()).collect()
}

/// True for records in `split`; every record when the set has no splits at all.
fn in_split(set: &PromptSet, split: Split) -> Vec<bool> {
    let has_splits = set.records.iter().any(|r| r.split.is_some());
    set.records
        .iter()
        .map(|r| !has_splits || r.split == Some(split))
        .collect()
}

/// What a result was computed from: the model and the two sets with the prompts used.
fn provenance(
    lm: &LoadedModel,
    (harmful, n_harmful): (&PromptSet, usize),
    (harmless, n_harmless): (&PromptSet, usize),
    system: &Option<String>,
) -> Result<Provenance> {
    Ok(Provenance {
        model_fingerprint: lm.fingerprint()?,
        model_name: lm.card.name.clone(),
        harmful_set: harmful.path.display().to_string(),
        harmless_set: harmless.path.display().to_string(),
        n_harmful,
        n_harmless,
        filtered_by_behaviour: false,
        system: system.clone(),
    })
}

/// States of every prompt of both sets (from the disk cache when possible).
pub fn collect_pair(
    lm: &LoadedModel,
    harmful: &PromptSet,
    harmless: &PromptSet,
    system: Option<&str>,
    cache: Option<&Path>,
    cancelled: &dyn Fn() -> bool,
    progress: Progress,
) -> Result<(SetActivations, SetActivations)> {
    let a = collect_cached(
        lm,
        &prompts(harmful),
        system,
        cache,
        cancelled,
        &mut |d, t| progress(&format!("running {}", harmful.name), d, t),
    )?;
    let b = collect_cached(
        lm,
        &prompts(harmless),
        system,
        cache,
        cancelled,
        &mut |d, t| progress(&format!("running {}", harmless.name), d, t),
    )?;
    Ok((a, b))
}

/// Refusal and harmfulness directions from the train split of two sets (all prompts of a
/// set without splits), the layer chosen on the val split.
pub fn directions(
    lm: &LoadedModel,
    harmful: &PromptSet,
    harmless: &PromptSet,
    options: &DirectionOptions,
    cache: Option<&Path>,
    cancelled: &dyn Fn() -> bool,
    progress: Progress,
) -> Result<Directions> {
    let system = options.system.as_deref();
    let states = collect_pair(lm, harmful, harmless, system, cache, cancelled, progress)?;
    directions_from_states(lm, harmful, harmless, &states, options, cancelled, progress)
}

/// [`directions`] from states already collected for every prompt of the two sets (with the
/// same system prompt as `options`).
pub fn directions_from_states(
    lm: &LoadedModel,
    harmful: &PromptSet,
    harmless: &PromptSet,
    (a, b): &(SetActivations, SetActivations),
    options: &DirectionOptions,
    cancelled: &dyn Fn() -> bool,
    progress: Progress,
) -> Result<Directions> {
    let system = options.system.as_deref();
    let (mut a, mut b) = (
        a.select(&in_split(harmful, Split::Train)),
        b.select(&in_split(harmless, Split::Train)),
    );
    if options.filter_by_behaviour {
        (a, b) = filter_by_behaviour(&a, &b)?;
    }
    let provenance = Provenance {
        filtered_by_behaviour: options.filter_by_behaviour,
        ..provenance(lm, (harmful, a.len()), (harmless, b.len()), &options.system)?
    };
    let mut dirs = Directions::diff_in_means(&a, &b, provenance)?;
    if options.select {
        fn val(set: &PromptSet, n: usize) -> Vec<&str> {
            set.records
                .iter()
                .zip(in_split(set, Split::Val))
                .filter(|(_, keep)| *keep)
                .map(|(r, _)| r.prompt.as_str())
                .take(n)
                .collect()
        }
        select(
            lm,
            &mut dirs,
            &val(harmful, options.val_prompts),
            &val(harmless, options.val_prompts),
            system,
            options.select_options,
            cancelled,
            &mut |d, t| progress("choosing the layer", d, t),
        )?;
    }
    Ok(dirs)
}

/// Probes trained on both sets, scored on the holdout.
pub fn probes(
    lm: &LoadedModel,
    harmful: &PromptSet,
    harmless: &PromptSet,
    job: &ProbeJob,
    cache: Option<&Path>,
    cancelled: &dyn Fn() -> bool,
    progress: Progress,
) -> Result<ProbeSet> {
    let system = job.system.as_deref();
    let states = collect_pair(lm, harmful, harmless, system, cache, cancelled, progress)?;
    probes_from_states(lm, harmful, harmless, &states, job, cancelled, progress)
}

/// [`probes`] from states already collected for every prompt of the two sets (with the same
/// system prompt as `job`).
pub fn probes_from_states(
    lm: &LoadedModel,
    harmful: &PromptSet,
    harmless: &PromptSet,
    (a, b): &(SetActivations, SetActivations),
    job: &ProbeJob,
    cancelled: &dyn Fn() -> bool,
    progress: Progress,
) -> Result<ProbeSet> {
    let held_out: Vec<bool> = match job.holdout {
        Holdout::Random { fraction, seed } => random_holdout(a.len() + b.len(), fraction, seed),
        Holdout::TestSplit => {
            let mask: Vec<bool> = [harmful, harmless]
                .iter()
                .flat_map(|s| s.records.iter().map(|r| r.split == Some(Split::Test)))
                .collect();
            if !mask.iter().any(|&t| t) {
                return Err(Error::InvalidInput(
                    "neither set has a test split; use the random holdout".into(),
                ));
            }
            mask
        }
    };
    let layers = job
        .layers
        .clone()
        .unwrap_or_else(|| (0..a.n_states).collect());
    let provenance = provenance(lm, (harmful, a.len()), (harmless, b.len()), &job.system)?;
    // A model that refuses none (or all) of the prompts gives behaviour labels of one class:
    // the sets' labels are the only probe there is then (recorded in the probes' options).
    let mut options = job.options;
    if options.labels == LabelSource::Behaviour {
        let y = labels(a, b, LabelSource::Behaviour);
        if y.iter().all(|&t| t) || !y.iter().any(|&t| t) {
            options.labels = LabelSource::SetLabel;
        }
    }
    train_probes(
        a,
        b,
        &held_out,
        &layers,
        &options,
        provenance,
        cancelled,
        &mut |d, t| progress("training probes", d, t),
    )
}

/// Where the probes of a directions file live: `name.safetensors` → `name.probes.safetensors`.
pub fn probes_path(directions: &Path) -> PathBuf {
    directions.with_extension("probes.safetensors")
}

/// The folder of the directions and probes shipped with the app.
pub fn shipped_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("assets")
        .join("lens");
    // Canonical, so that paths saved in sessions compare equal to it.
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

/// One entry of `assets/lens/manifest.json`: a lens made for one model file (and adapter)
/// by the command it records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShippedLens {
    pub name: String,
    /// SHA-256 of the model file it was made with.
    pub model_sha256: String,
    /// The applied adapter's fingerprint (`Adapter::fingerprint`), or None for the bare model.
    pub adapter_fingerprint: Option<String>,
    /// The directions file in `assets/lens/` (its probes beside it, see [`probes_path`]).
    pub directions: String,
    /// Head metrics of the sets' first test pair (`refusal-lens heads all --out`), if shipped.
    #[serde(default)]
    pub heads: Option<String>,
    /// How it was made (run from the repository root).
    pub command: String,
}

impl ShippedLens {
    pub fn directions_path(&self) -> PathBuf {
        shipped_dir().join(&self.directions)
    }

    /// The shipped head metrics, if any.
    pub fn head_metrics(&self) -> Result<Option<crate::analysis::heads::HeadMetrics>> {
        let Some(name) = &self.heads else {
            return Ok(None);
        };
        let path = shipped_dir().join(name);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))
    }

    /// Every entry of the manifest (none when the app runs without its assets).
    pub fn all() -> Result<Vec<ShippedLens>> {
        let path = shipped_dir().join("manifest.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(Vec::new());
        };
        serde_json::from_str(&text)
            .map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))
    }

    /// The shipped lens made for `lm`, if it is one of the models the app ships a lens for.
    /// `known_sha256` is the model file's hash when the caller knows it already.
    pub fn for_model(lm: &LoadedModel, known_sha256: Option<&str>) -> Result<Option<ShippedLens>> {
        let all = Self::all()?;
        let adapter = lm.card.adapter_fingerprint.as_deref();
        if !all
            .iter()
            .any(|s| s.adapter_fingerprint.as_deref() == adapter)
            || !lm.card.path.is_file()
        {
            return Ok(None);
        }
        let sha = match known_sha256 {
            Some(s) => s.to_string(),
            None => model_sha256(&lm.card.path)?,
        };
        Ok(all
            .into_iter()
            .find(|s| s.model_sha256 == sha && s.adapter_fingerprint.as_deref() == adapter))
    }
}
