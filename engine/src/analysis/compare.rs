//! Two models side by side (docs/methods.md, "Comparing two models"): a base model and its
//! fine-tune, a model with and without its adapter, a model and its abliterated copy. Layer by
//! layer, how their refusal and harmfulness directions line up; whether one model's Latent
//! Guard still reads the other's harmfulness (does harmfulness survive fine-tuning?); and how
//! often each refuses the same prompts.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::analysis::activations::SetActivations;
use crate::analysis::directions::{Directions, Provenance};
use crate::analysis::guard::{split_states, DetectorReport, LatentGuard};
use crate::data::prompts::{PromptSet, Split};
use crate::refusal::{refusal_rate, RefusalGate};
use crate::run::generate::greedy_replies;
use crate::{Error, LoadedModel, Result};

/// One model's own numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSide {
    pub name: String,
    /// First-token refusal rates on the test split at the model's gate τ.
    pub tau: f32,
    pub harmful_refusal_rate: f32,
    pub harmless_refusal_rate: f32,
    pub borderline_refusal_rate: Option<f32>,
    /// Its own guard (fitted on train, layers and τ chosen on val) on its test split.
    pub guard: LatentGuard,
    pub own_guard: DetectorReport,
    /// The layer where its refusal direction separates the train sets best.
    pub best_refusal_layer: usize,
}

/// How the two models' directions agree at one residual state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LayerAgreement {
    pub layer: usize,
    /// Cosine between the two models' refusal directions (t_post); None where either is zero
    /// (the embedding state, where t_post is the same template token in every prompt).
    pub refusal: Option<f32>,
    /// Cosine between their harmfulness directions (t_inst); None where either is zero.
    pub harmfulness: Option<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub first: ModelSide,
    pub second: ModelSide,
    /// Per residual state; empty when the two models' residual streams differ in shape.
    pub layers: Vec<LayerAgreement>,
    /// The first model's guard on the second model's test states, and the second's on the
    /// first's; None when the streams differ in shape.
    pub first_guard_on_second: Option<DetectorReport>,
    pub second_guard_on_first: Option<DetectorReport>,
    pub n_test_harmful: usize,
    pub n_test_harmless: usize,
}

impl Comparison {
    /// The per-layer cosines as CSV (`layer,refusal_cosine,harmfulness_cosine`; empty cells
    /// where a direction is zero).
    pub fn layers_csv(&self) -> String {
        let mut text = String::from("layer,refusal_cosine,harmfulness_cosine\n");
        let num = |v: Option<f32>| v.map_or(String::new(), |c| c.to_string());
        for l in &self.layers {
            text.push_str(&format!(
                "{},{},{}\n",
                l.layer,
                num(l.refusal),
                num(l.harmfulness)
            ));
        }
        text
    }
}

/// Everything one model contributes: its states on every split, directions and guard.
struct Side {
    side: ModelSide,
    directions: Directions,
    test: [SetActivations; 2],
}

/// The cosine of two directions; None when either is zero.
fn cosine(a: &[f32], b: &[f32]) -> Option<f32> {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let norms = norm(a) * norm(b);
    (norms > 0.0).then(|| dot / norms)
}

/// Scores of `guard` on harmful then harmless test states, with their labels.
fn guard_report(guard: &LatentGuard, test: &[SetActivations; 2]) -> Result<DetectorReport> {
    let scores = [guard.scores(&test[0])?, guard.scores(&test[1])?].concat();
    let labels: Vec<bool> = (0..scores.len()).map(|i| i < test[0].len()).collect();
    Ok(DetectorReport::new(&scores, &labels, guard.tau))
}

#[allow(clippy::too_many_arguments)]
fn side(
    lm: &LoadedModel,
    label: &str,
    harmful: &PromptSet,
    harmless: &PromptSet,
    borderline: Option<&PromptSet>,
    cache: Option<&Path>,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Side> {
    let mut get = |set: &PromptSet, name: &str, split: Split| {
        split_states(
            lm,
            &format!("{label}: {name} {split:?}").to_lowercase(),
            set,
            split,
            cache,
            cancelled,
            progress,
        )
    };
    let train = [
        get(harmful, "harmful", Split::Train)?,
        get(harmless, "harmless", Split::Train)?,
    ];
    let val = [
        get(harmful, "harmful", Split::Val)?,
        get(harmless, "harmless", Split::Val)?,
    ];
    let test = [
        get(harmful, "harmful", Split::Test)?,
        get(harmless, "harmless", Split::Test)?,
    ];
    let borderline = borderline
        .map(|b| get(b, "borderline", Split::Test))
        .transpose()?;
    let provenance = Provenance {
        model_fingerprint: lm.fingerprint()?,
        model_name: lm.card.name.clone(),
        harmful_set: harmful.path.display().to_string(),
        harmless_set: harmless.path.display().to_string(),
        n_harmful: train[0].len(),
        n_harmless: train[1].len(),
        filtered_by_behaviour: false,
        system: None,
    };
    let directions = Directions::diff_in_means(&train[0], &train[1], provenance)?;
    let mut guard = LatentGuard::fit(&train[0], &train[1])?;
    guard.choose(&val[0], &val[1])?;
    let tau = lm.refusal_tau();
    let side = ModelSide {
        name: lm.card.name.clone(),
        tau,
        harmful_refusal_rate: refusal_rate(&test[0].refusal_probability, tau),
        harmless_refusal_rate: refusal_rate(&test[1].refusal_probability, tau),
        borderline_refusal_rate: borderline
            .as_ref()
            .map(|b| refusal_rate(&b.refusal_probability, tau)),
        own_guard: guard_report(&guard, &test)?,
        guard,
        best_refusal_layer: directions.layer,
    };
    Ok(Side {
        side,
        directions,
        test,
    })
}

/// Compares `first` and `second` on the same sets: each model's states on the train, val and
/// test splits (through the activation cache), directions by difference in means on train,
/// guards fitted on train and chosen on val, everything reported on test.
#[allow(clippy::too_many_arguments)]
pub fn compare(
    first: &LoadedModel,
    second: &LoadedModel,
    harmful: &PromptSet,
    harmless: &PromptSet,
    borderline: Option<&PromptSet>,
    cache: Option<&Path>,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Comparison> {
    let a = side(
        first, "first", harmful, harmless, borderline, cache, cancelled, progress,
    )?;
    let b = side(
        second, "second", harmful, harmless, borderline, cache, cancelled, progress,
    )?;
    let (da, db) = (&a.directions, &b.directions);
    let same_stream = (da.n_states, da.d_model) == (db.n_states, db.d_model);
    let layers = if same_stream {
        (0..da.n_states)
            .map(|l| LayerAgreement {
                layer: l,
                refusal: cosine(
                    da.refusal_at(l, da.n_post - 1),
                    db.refusal_at(l, db.n_post - 1),
                ),
                harmfulness: cosine(da.harmfulness_at(l), db.harmfulness_at(l)),
            })
            .collect()
    } else {
        Vec::new()
    };
    let transfer = |guard: &LatentGuard, test: &[SetActivations; 2]| {
        same_stream.then(|| guard_report(guard, test)).transpose()
    };
    if a.test[0].len() != b.test[0].len() || a.test[1].len() != b.test[1].len() {
        return Err(Error::InvalidInput(
            "the two models read different test prompts".into(),
        ));
    }
    Ok(Comparison {
        first_guard_on_second: transfer(&a.side.guard, &b.test)?,
        second_guard_on_first: transfer(&b.side.guard, &a.test)?,
        n_test_harmful: a.test[0].len(),
        n_test_harmless: a.test[1].len(),
        first: a.side,
        second: b.side,
        layers,
    })
}

/// Each model's greedy reply to `prompt` (each through its own refusal gate, at its τ), on the
/// exact path: the same text on every CPU.
pub fn replies(
    models: [&LoadedModel; 2],
    prompt: &str,
    max_new_tokens: usize,
    cancelled: &dyn Fn() -> bool,
) -> Result<[String; 2]> {
    let reply = |m: &LoadedModel| -> Result<String> {
        let ids = m.chat_prompt(None, prompt)?.ids;
        let gate = RefusalGate::for_model(m, m.refusal_tau());
        let mut out = greedy_replies(m, &[ids], max_new_tokens, gate, cancelled, &mut |_, _| {})?;
        Ok(out.pop().map(|g| g.text).unwrap_or_default())
    };
    Ok([reply(models[0])?, reply(models[1])?])
}
