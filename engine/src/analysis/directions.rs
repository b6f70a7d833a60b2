//! Difference-in-means directions (docs/methods.md, "Difference-in-means directions"): the refusal
//! direction at every post-instruction position and the harmfulness direction at t_inst, at
//! every layer, their per-layer statistics, and the choice of the refusal direction's layer
//! and position by ablation on held-out prompts.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::analysis::activations::{state_points, SetActivations};
use crate::data::tensorfile::{self, Array};
use crate::hooks::{HookPoint, HookSpec, Intervention, Positions};
use crate::refusal::{refusal_score, RefusalSignal};
use crate::run::batch::first_positions;
use crate::{Error, LoadedModel, Result};

/// One layer's view of the two directions (refusal at t_post).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerStats {
    pub layer: usize,
    pub refusal_norm: f32,
    pub harmfulness_norm: f32,
    /// Gap of the two sets' mean projections onto the unit direction, over their pooled std.
    pub refusal_separation: f32,
    pub harmfulness_separation: f32,
    /// cos(refusal direction at t_post, harmfulness direction).
    pub cosine: f32,
    /// Mean projection (onto the unit direction) of the harmful and of the harmless set.
    pub refusal_means: [f32; 2],
    pub harmfulness_means: [f32; 2],
}

/// How one (layer, position) candidate fared in the selection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Candidate {
    pub layer: usize,
    /// Index into the post-instruction positions (`n_post − 1` is t_post).
    pub position: usize,
    /// Mean refusal score on held-out harmful prompts with the direction ablated.
    pub ablated_score: f32,
    /// Mean KL(clean ‖ ablated) of the next-token distribution at t_post on harmless prompts.
    pub kl: f32,
    /// Mean refusal score on held-out harmless prompts with the direction added at its layer.
    pub added_score: f32,
    /// Why the candidate was discarded (`None` if it was kept).
    pub rejected: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Selection {
    pub baseline_harmful_score: f32,
    pub baseline_harmless_score: f32,
    pub n_harmful: usize,
    pub n_harmless: usize,
    pub candidates: Vec<Candidate>,
}

/// What the directions were computed from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Provenance {
    pub model_fingerprint: String,
    pub model_name: String,
    pub harmful_set: String,
    pub harmless_set: String,
    pub n_harmful: usize,
    pub n_harmless: usize,
    /// Only refused harmful and answered harmless prompts were used.
    pub filtered_by_behaviour: bool,
    pub system: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Directions {
    pub n_states: usize,
    pub d_model: usize,
    pub n_post: usize,
    /// `[n_post, n_states, d]`: mean harmful − mean harmless state at post-instruction
    /// position `j` (unnormalised).
    #[serde(skip)]
    pub refusal: Vec<f32>,
    /// `[n_states, d]`: the same at t_inst.
    #[serde(skip)]
    pub harmfulness: Vec<f32>,
    pub stats: Vec<LayerStats>,
    /// The chosen refusal direction: state index and post-instruction position.
    pub layer: usize,
    pub position: usize,
    pub selection: Option<Selection>,
    pub provenance: Provenance,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

fn mean_rows<'a>(rows: impl Iterator<Item = &'a [f32]>, d: usize) -> Vec<f32> {
    let mut mean = vec![0.0f64; d];
    let mut n = 0usize;
    for r in rows {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += *v as f64;
        }
        n += 1;
    }
    mean.iter().map(|m| (m / n.max(1) as f64) as f32).collect()
}

/// Mean and variance of the projections of `rows` onto `unit`.
fn projection_moments<'a>(rows: impl Iterator<Item = &'a [f32]>, unit: &[f32]) -> (f32, f32) {
    let p: Vec<f32> = rows.map(|r| dot(r, unit)).collect();
    let n = p.len().max(1) as f32;
    let mean = p.iter().sum::<f32>() / n;
    let var = p.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n;
    (mean, var)
}

/// `(separation, [mean_a, mean_b])` of two sets of rows along `v`.
fn separation<'a>(
    a: impl Iterator<Item = &'a [f32]>,
    b: impl Iterator<Item = &'a [f32]>,
    v: &[f32],
) -> (f32, [f32; 2]) {
    let n = norm(v).max(f32::MIN_POSITIVE);
    let unit: Vec<f32> = v.iter().map(|x| x / n).collect();
    let (ma, va) = projection_moments(a, &unit);
    let (mb, vb) = projection_moments(b, &unit);
    let pooled = ((va + vb) / 2.0).sqrt().max(1e-12);
    ((ma - mb) / pooled, [ma, mb])
}

/// Keeps only harmful prompts the model refuses and harmless ones it answers (refusal score
/// above / below 0), as the published pipelines do.
pub fn filter_by_behaviour(
    harmful: &SetActivations,
    harmless: &SetActivations,
) -> Result<(SetActivations, SetActivations)> {
    let refused: Vec<bool> = harmful
        .refusal_probability
        .iter()
        .map(|&p| refusal_score(p) > 0.0)
        .collect();
    let answered: Vec<bool> = harmless
        .refusal_probability
        .iter()
        .map(|&p| refusal_score(p) < 0.0)
        .collect();
    let (a, b) = (harmful.select(&refused), harmless.select(&answered));
    if a.len() < 2 || b.len() < 2 {
        return Err(Error::InvalidInput(format!(
            "filtering by behaviour leaves {} refused harmful and {} answered harmless prompts; \
             need at least 2 of each (this model may not refuse: drop the filter)",
            a.len(),
            b.len()
        )));
    }
    Ok((a, b))
}

impl Directions {
    /// Difference in means of the two sets at every layer and position role.
    pub fn diff_in_means(
        harmful: &SetActivations,
        harmless: &SetActivations,
        provenance: Provenance,
    ) -> Result<Directions> {
        let (a, b) = (harmful, harmless);
        if a.is_empty() || b.is_empty() {
            return Err(Error::InvalidInput(
                "directions need at least one harmful and one harmless prompt".into(),
            ));
        }
        if (a.n_states, a.d_model, a.n_post) != (b.n_states, b.d_model, b.n_post) {
            return Err(Error::InvalidInput(
                "the two sets were collected from different models or templates".into(),
            ));
        }
        let (n_states, d, n_post) = (a.n_states, a.d_model, a.n_post);
        fn diff<'a>(
            a: impl Iterator<Item = &'a [f32]>,
            b: impl Iterator<Item = &'a [f32]>,
            d: usize,
        ) -> Vec<f32> {
            let (ma, mb) = (mean_rows(a, d), mean_rows(b, d));
            ma.iter().zip(&mb).map(|(x, y)| x - y).collect()
        }
        let mut refusal = Vec::with_capacity(n_post * n_states * d);
        for j in 0..n_post {
            let back = n_post - 1 - j;
            for l in 0..n_states {
                refusal.extend(diff(
                    (0..a.len()).map(|i| a.before_t_post(i, back, l)),
                    (0..b.len()).map(|i| b.before_t_post(i, back, l)),
                    d,
                ));
            }
        }
        let mut harmfulness = Vec::with_capacity(n_states * d);
        for l in 0..n_states {
            harmfulness.extend(diff(
                (0..a.len()).map(|i| a.t_inst(i, l)),
                (0..b.len()).map(|i| b.t_inst(i, l)),
                d,
            ));
        }
        let mut dirs = Directions {
            n_states,
            d_model: d,
            n_post,
            refusal,
            harmfulness,
            stats: Vec::new(),
            layer: 0,
            position: n_post - 1,
            selection: None,
            provenance,
        };
        dirs.stats = (0..n_states)
            .map(|l| {
                let r = dirs.refusal_at(l, n_post - 1);
                let h = dirs.harmfulness_at(l);
                let (refusal_separation, refusal_means) = separation(
                    (0..a.len()).map(|i| a.before_t_post(i, 0, l)),
                    (0..b.len()).map(|i| b.before_t_post(i, 0, l)),
                    r,
                );
                let (harmfulness_separation, harmfulness_means) = separation(
                    (0..a.len()).map(|i| a.t_inst(i, l)),
                    (0..b.len()).map(|i| b.t_inst(i, l)),
                    h,
                );
                LayerStats {
                    layer: l,
                    refusal_norm: norm(r),
                    harmfulness_norm: norm(h),
                    refusal_separation,
                    harmfulness_separation,
                    cosine: dot(r, h) / (norm(r) * norm(h)).max(f32::MIN_POSITIVE),
                    refusal_means,
                    harmfulness_means,
                }
            })
            .collect();
        // Until a selection runs: the best-separating layer outside the last 20%.
        dirs.layer = (0..selectable_layers(n_states))
            .max_by(|&x, &y| {
                dirs.stats[x]
                    .refusal_separation
                    .total_cmp(&dirs.stats[y].refusal_separation)
            })
            .unwrap_or(0);
        Ok(dirs)
    }

    /// The refusal direction at state `layer`, post-instruction position `position`.
    pub fn refusal_at(&self, layer: usize, position: usize) -> &[f32] {
        let d = self.d_model;
        let start = (position * self.n_states + layer) * d;
        &self.refusal[start..start + d]
    }

    /// The chosen refusal direction.
    pub fn refusal_direction(&self) -> &[f32] {
        self.refusal_at(self.layer, self.position)
    }

    pub fn harmfulness_at(&self, layer: usize) -> &[f32] {
        let d = self.d_model;
        &self.harmfulness[layer * d..(layer + 1) * d]
    }

    /// Checks that these directions fit `lm`'s residual stream.
    pub fn check_fits(&self, lm: &LoadedModel) -> Result<()> {
        let cfg = &lm.model.config;
        if self.d_model != cfg.d_model || self.n_states != cfg.n_layers + 1 {
            return Err(Error::InvalidInput(format!(
                "these directions are for a model of width {} with {} layers, not {} with {}",
                self.d_model,
                self.n_states - 1,
                cfg.d_model,
                cfg.n_layers
            )));
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        tensorfile::save(
            path,
            &[
                Array::new(
                    "refusal",
                    vec![self.n_post, self.n_states, self.d_model],
                    self.refusal.clone(),
                ),
                Array::new(
                    "harmfulness",
                    vec![self.n_states, self.d_model],
                    self.harmfulness.clone(),
                ),
            ],
            self,
        )
    }

    pub fn load(path: &Path) -> Result<Directions> {
        let (mut arrays, meta): (_, Directions) = tensorfile::load(path)?;
        let refusal = tensorfile::take(
            &mut arrays,
            path,
            "refusal",
            &[meta.n_post, meta.n_states, meta.d_model],
        )?;
        let harmfulness = tensorfile::take(
            &mut arrays,
            path,
            "harmfulness",
            &[meta.n_states, meta.d_model],
        )?;
        if meta.layer >= meta.n_states || meta.position >= meta.n_post {
            return Err(Error::InvalidInput(format!(
                "{}: chosen layer/position out of range",
                path.display()
            )));
        }
        Ok(Directions {
            refusal,
            harmfulness,
            ..meta
        })
    }
}

/// Layers a refusal direction may be chosen from: all but the last 20%.
pub fn selectable_layers(n_states: usize) -> usize {
    ((n_states as f32 * 0.8).floor() as usize).max(1)
}

/// Settings of the layer/position selection (the defaults of docs/methods.md).
#[derive(Debug, Clone, Copy)]
pub struct SelectOptions {
    /// Discard candidates whose ablation moves the harmless next-token distribution by more.
    pub max_kl: f32,
    /// Try every post-instruction position (else t_post only).
    pub all_positions: bool,
}

impl Default for SelectOptions {
    fn default() -> Self {
        SelectOptions {
            max_kl: 0.1,
            all_positions: true,
        }
    }
}

pub fn to_tensor(v: &[f32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), device)?)
}

/// The held-out prompts layer selection scores candidates on.
struct ValSets<'a> {
    lm: &'a LoadedModel,
    harmful: Vec<Vec<u32>>,
    harmless: Vec<Vec<u32>>,
    signal: RefusalSignal,
    cancelled: &'a dyn Fn() -> bool,
}

/// The unsteered runs a candidate is compared with.
struct Baseline {
    harmful_score: f32,
    harmless_score: f32,
    /// Next-token log-probabilities of the harmless prompts at t_post.
    harmless: Vec<Vec<f32>>,
}

impl ValSets<'_> {
    /// Next-token log-probabilities at t_post of each prompt under `hooks`.
    fn logprobs(&self, prompts: &[Vec<u32>], hooks: &HookSpec) -> Result<Vec<Vec<f32>>> {
        let lm = self.lm;
        let out = first_positions(
            lm,
            &lm.model.dense,
            prompts,
            hooks,
            self.cancelled,
            &mut |_, _| {},
        )?;
        Ok(out.into_iter().map(|f| f.logprobs).collect())
    }

    fn mean_score(&self, logprobs: &[Vec<f32>]) -> f32 {
        logprobs
            .iter()
            .map(|lp| refusal_score(self.signal.probability(lp)))
            .sum::<f32>()
            / logprobs.len() as f32
    }

    /// A candidate direction `v` (added at `point`): the harmful prompts' mean refusal score
    /// with it ablated, the harmless prompts' mean KL from the unsteered run with it ablated,
    /// and their mean refusal score with it added.
    fn candidate(
        &self,
        v: &Tensor,
        point: HookPoint,
        baseline: &Baseline,
    ) -> Result<(f32, f32, f32)> {
        let n_layers = self.lm.model.config.n_layers;
        let ablate = HookSpec::with_interventions(Intervention::ablate_direction(v, n_layers)?);
        let ablated_score = self.mean_score(&self.logprobs(&self.harmful, &ablate)?);
        let ablated_harmless = self.logprobs(&self.harmless, &ablate)?;
        let kl = baseline
            .harmless
            .iter()
            .zip(&ablated_harmless)
            .map(|(p, q)| kl_divergence(p, q))
            .sum::<f32>()
            / self.harmless.len() as f32;
        let add = HookSpec::with_interventions(vec![Intervention::AddVector {
            point,
            vector: v.clone(),
            scale: 1.0,
            positions: Positions::All,
        }]);
        let added_score = self.mean_score(&self.logprobs(&self.harmless, &add)?);
        Ok((ablated_score, kl, added_score))
    }
}

/// Chooses the refusal direction's layer and position: for each candidate, ablate it and
/// measure the mean refusal score on held-out harmful prompts; discard candidates in the
/// last 20% of layers, those whose ablation moves harmless prompts' next-token distribution
/// by KL > `max_kl`, and those whose addition does not raise refusal on harmless prompts;
/// pick the lowest ablated score. Records every candidate's numbers (zero directions,
/// such as the embedding at a template token, are skipped).
#[allow(clippy::too_many_arguments)]
pub fn select(
    lm: &LoadedModel,
    dirs: &mut Directions,
    val_harmful: &[&str],
    val_harmless: &[&str],
    system: Option<&str>,
    options: SelectOptions,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    dirs.check_fits(lm)?;
    if val_harmful.is_empty() || val_harmless.is_empty() {
        return Err(Error::InvalidInput(
            "layer selection needs held-out harmful and harmless prompts".into(),
        ));
    }
    let ids = |set: &[&str]| -> Result<Vec<Vec<u32>>> {
        set.iter()
            .map(|p| lm.chat_prompt(system, p).map(|c| c.ids))
            .collect()
    };
    let val = ValSets {
        lm,
        harmful: ids(val_harmful)?,
        harmless: ids(val_harmless)?,
        signal: RefusalSignal::for_model(lm)?,
        cancelled,
    };
    let n_layers = lm.model.config.n_layers;
    let positions: Vec<usize> = if options.all_positions {
        (0..dirs.n_post).collect()
    } else {
        vec![dirs.n_post - 1]
    };
    let layers = selectable_layers(dirs.n_states).min(n_layers);
    let total = 2 + layers * positions.len() * 3;
    let clean_harmless = val.logprobs(&val.harmless, &HookSpec::default())?;
    let baseline = Baseline {
        harmful_score: val.mean_score(&val.logprobs(&val.harmful, &HookSpec::default())?),
        harmless_score: val.mean_score(&clean_harmless),
        harmless: clean_harmless,
    };
    let mut done = 2;
    progress(done, total);
    let points = state_points(n_layers);
    let mut candidates = Vec::new();
    for (layer, &point) in points.iter().enumerate().take(layers) {
        for &position in &positions {
            let raw = dirs.refusal_at(layer, position);
            done += 3;
            // E.g. the embedding at a template token, the same in every prompt: nothing to
            // ablate or add.
            if norm(raw) >= 1e-6 {
                let v = to_tensor(raw, lm.model.device())?;
                let (ablated_score, kl, added_score) = val.candidate(&v, point, &baseline)?;
                let rejected = if kl > options.max_kl {
                    Some(format!("KL {kl:.3} > {}", options.max_kl))
                } else if added_score <= baseline.harmless_score {
                    Some("adding it does not raise refusal on harmless prompts".to_string())
                } else {
                    None
                };
                candidates.push(Candidate {
                    layer,
                    position,
                    ablated_score,
                    kl,
                    added_score,
                    rejected,
                });
            }
            progress(done, total);
        }
    }
    let (baseline_harmful_score, baseline_harmless_score) =
        (baseline.harmful_score, baseline.harmless_score);
    let (harmful, harmless) = (&val.harmful, &val.harmless);
    let best = candidates
        .iter()
        .filter(|c| c.rejected.is_none())
        .min_by(|a, b| a.ablated_score.total_cmp(&b.ablated_score))
        .map(|c| (c.layer, c.position));
    if let Some((layer, position)) = best {
        dirs.layer = layer;
        dirs.position = position;
    }
    dirs.selection = Some(Selection {
        baseline_harmful_score,
        baseline_harmless_score,
        n_harmful: harmful.len(),
        n_harmless: harmless.len(),
        candidates,
    });
    if best.is_none() {
        return Err(Error::InvalidInput(
            "no (layer, position) candidate passed the KL and addition filters".into(),
        ));
    }
    Ok(())
}

/// KL(p ‖ q) for log-probability vectors.
pub fn kl_divergence(log_p: &[f32], log_q: &[f32]) -> f32 {
    log_p
        .iter()
        .zip(log_q)
        .map(|(&lp, &lq)| lp.exp() * (lp - lq))
        .sum::<f32>()
        .max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Synthetic sets whose t_post states differ by a known vector at each layer, and whose
    /// t_inst states differ by another.
    fn synthetic(n: usize, shift_post: f32, shift_inst: f32) -> SetActivations {
        let (n_states, d, n_tail) = (3, 4, 3);
        let mut states = Vec::new();
        for i in 0..n {
            // Zero-mean noise for even `n`, so set means differ by the planted shift only.
            let noise = if i % 2 == 0 { 0.01 } else { -0.01 };
            for role in 0..=n_tail {
                for l in 0..n_states {
                    let mut row = vec![noise; d];
                    if role == 0 {
                        row[1] += shift_inst * (l + 1) as f32;
                    } else if role == n_tail {
                        row[0] += shift_post * (l + 1) as f32;
                    }
                    states.extend(row);
                }
            }
        }
        SetActivations {
            n_states,
            d_model: d,
            n_tail,
            n_post: 2,
            states,
            refusal_probability: vec![0.5; n],
        }
    }

    #[test]
    fn diff_in_means_recovers_the_planted_vectors() {
        let a = synthetic(10, 2.0, 3.0);
        let b = synthetic(8, 0.0, 0.0);
        let dirs = Directions::diff_in_means(&a, &b, Provenance::default()).unwrap();
        for l in 0..3 {
            let r = dirs.refusal_at(l, 1);
            let h = dirs.harmfulness_at(l);
            let k = (l + 1) as f32;
            assert!((r[0] - 2.0 * k).abs() < 1e-5 && r[1].abs() < 1e-5, "{r:?}");
            assert!((h[1] - 3.0 * k).abs() < 1e-5 && h[0].abs() < 1e-5, "{h:?}");
            // The earlier post-instruction position carries no shift.
            assert!(norm(dirs.refusal_at(l, 0)) < 1e-5);
            let s = &dirs.stats[l];
            assert!(s.cosine.abs() < 1e-5);
            assert!((s.refusal_norm - 2.0 * k).abs() < 1e-4);
            assert!(s.refusal_separation > 10.0);
            assert!((s.refusal_means[0] - s.refusal_means[1] - 2.0 * k).abs() < 1e-3);
        }
    }

    #[test]
    fn saved_directions_round_trip() {
        let a = synthetic(5, 1.0, 0.5);
        let b = synthetic(5, 0.0, 0.0);
        let mut dirs = Directions::diff_in_means(&a, &b, Provenance::default()).unwrap();
        dirs.layer = 1;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dirs.safetensors");
        dirs.save(&path).unwrap();
        let back = Directions::load(&path).unwrap();
        assert_eq!(back.refusal, dirs.refusal);
        assert_eq!(back.harmfulness, dirs.harmfulness);
        assert_eq!((back.layer, back.position), (1, 1));
        assert_eq!(back.stats.len(), 3);
        std::fs::write(&path, b"not a safetensors file").unwrap();
        assert!(Directions::load(&path).is_err());
    }

    #[test]
    fn kl_is_zero_for_equal_distributions() {
        let p = [0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln()];
        assert!(kl_divergence(&p, &p).abs() < 1e-7);
        let q = [0.25f32.ln(), 0.5f32.ln(), 0.25f32.ln()];
        assert!((kl_divergence(&p, &q) - 0.25 * 2f32.ln()).abs() < 1e-6);
    }
}
