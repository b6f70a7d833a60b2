//! Latent Guard (docs/methods.md, "Latent Guard"): the harmfulness a model encodes at t_inst,
//! read as a harmful-input detector. Per residual state, the centroids of the harmful and the
//! harmless reference prompts' states at t_inst; a prompt's score is the mean, over a range
//! of states, of its cosine to the harmful centroid minus its cosine to the harmless one; it
//! is flagged harmful when the score is at least τ.

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::analysis::activations::{collect_cached, SetActivations};
use crate::analysis::probe::auc;
use crate::data::prompts::{Jailbreak, PromptRecord, PromptSet, Split};
use crate::refusal::refusal_score;
use crate::{Error, LoadedModel, Result};

/// A fitted guard: centroids at every state, the states it averages, its threshold.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatentGuard {
    pub d_model: usize,
    pub n_states: usize,
    /// `[n_states][d]`: the mean harmful and harmless state at t_inst.
    pub harmful: Vec<Vec<f32>>,
    pub harmless: Vec<Vec<f32>>,
    /// The residual states the score averages (chosen on val; all of them when fitted).
    pub layers: Range<usize>,
    /// Flag harmful when the score is ≥ τ (0 when fitted; chosen on val).
    pub tau: f32,
    /// Prompts the centroids were fitted on.
    pub n_harmful: usize,
    pub n_harmless: usize,
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b)).max(f32::MIN_POSITIVE)
}

fn centroids(acts: &SetActivations) -> Vec<Vec<f32>> {
    (0..acts.n_states)
        .map(|l| {
            let mut mean = vec![0.0f32; acts.d_model];
            for i in 0..acts.len() {
                for (m, x) in mean.iter_mut().zip(acts.t_inst(i, l)) {
                    *m += x / acts.len() as f32;
                }
            }
            mean
        })
        .collect()
}

impl LatentGuard {
    /// Centroids of the reference sets at every state; averages every state, τ = 0.
    pub fn fit(harmful: &SetActivations, harmless: &SetActivations) -> Result<LatentGuard> {
        if harmful.is_empty() || harmless.is_empty() {
            return Err(Error::InvalidInput(
                "the guard needs harmful and harmless reference prompts".into(),
            ));
        }
        if (harmful.n_states, harmful.d_model) != (harmless.n_states, harmless.d_model) {
            return Err(Error::InvalidInput(
                "the two reference sets come from different models".into(),
            ));
        }
        Ok(LatentGuard {
            d_model: harmful.d_model,
            n_states: harmful.n_states,
            harmful: centroids(harmful),
            harmless: centroids(harmless),
            layers: 0..harmful.n_states,
            tau: 0.0,
            n_harmful: harmful.len(),
            n_harmless: harmless.len(),
        })
    }

    fn check_fits(&self, acts: &SetActivations) -> Result<()> {
        if (acts.n_states, acts.d_model) != (self.n_states, self.d_model) {
            return Err(Error::InvalidInput(format!(
                "this guard was fitted on a model with {} states of width {}; these states are {} × {}",
                self.n_states, self.d_model, acts.n_states, acts.d_model
            )));
        }
        Ok(())
    }

    /// `cos(x_l, μ⁺_l) − cos(x_l, μ⁻_l)` of one prompt at every state.
    pub fn margins(&self, acts: &SetActivations, prompt: usize) -> Vec<f32> {
        (0..self.n_states)
            .map(|l| {
                let x = acts.t_inst(prompt, l);
                cosine(x, &self.harmful[l]) - cosine(x, &self.harmless[l])
            })
            .collect()
    }

    /// The guard's score of every prompt: the margins' mean over `self.layers`.
    pub fn scores(&self, acts: &SetActivations) -> Result<Vec<f32>> {
        self.check_fits(acts)?;
        Ok((0..acts.len())
            .map(|i| mean(&self.margins(acts, i)[self.layers.clone()]))
            .collect())
    }

    /// Chooses the range of states and τ on held-out prompts: the contiguous range whose
    /// scores separate the two sets best (AUC; ties: the longer range, then the earlier),
    /// then the τ with the highest balanced accuracy on them (ties: the one nearest 0).
    pub fn choose(&mut self, harmful: &SetActivations, harmless: &SetActivations) -> Result<()> {
        self.check_fits(harmful)?;
        self.check_fits(harmless)?;
        if harmful.is_empty() || harmless.is_empty() {
            return Err(Error::InvalidInput(
                "choosing the guard's layers needs harmful and harmless held-out prompts".into(),
            ));
        }
        let margins: Vec<(Vec<f32>, bool)> = (0..harmful.len())
            .map(|i| (self.margins(harmful, i), true))
            .chain((0..harmless.len()).map(|i| (self.margins(harmless, i), false)))
            .collect();
        let labels: Vec<bool> = margins.iter().map(|(_, y)| *y).collect();
        let mut best: Option<(f32, usize, Range<usize>)> = None;
        for start in 0..self.n_states {
            for end in start + 1..=self.n_states {
                let scores: Vec<f32> = margins.iter().map(|(m, _)| mean(&m[start..end])).collect();
                let a = auc(&scores, &labels).unwrap_or(0.5);
                let better = match &best {
                    None => true,
                    Some((b, len, _)) => a > *b || (a == *b && end - start > *len),
                };
                if better {
                    best = Some((a, end - start, start..end));
                }
            }
        }
        let (_, _, layers) = best.expect("at least one state");
        self.layers = layers;
        let scores: Vec<f32> = margins
            .iter()
            .map(|(m, _)| mean(&m[self.layers.clone()]))
            .collect();
        self.tau = balanced_threshold(&scores, &labels);
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self)
            .map_err(|e| Error::InvalidInput(format!("cannot encode the guard: {e}")))?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }

    pub fn load(path: &Path) -> Result<LatentGuard> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let guard: LatentGuard = serde_json::from_str(&text).map_err(|e| {
            Error::InvalidInput(format!("{} is not a saved guard: {e}", path.display()))
        })?;
        let consistent = guard.harmful.len() == guard.n_states
            && guard.harmless.len() == guard.n_states
            && guard
                .harmful
                .iter()
                .chain(&guard.harmless)
                .all(|c| c.len() == guard.d_model)
            && guard.layers.start < guard.layers.end
            && guard.layers.end <= guard.n_states;
        if !consistent {
            return Err(Error::InvalidInput(format!(
                "{} is a damaged guard (its centroids or layer range do not fit)",
                path.display()
            )));
        }
        Ok(guard)
    }
}

fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len().max(1) as f32
}

/// The threshold with the highest balanced accuracy (mean of the true-positive and
/// true-negative rates) for "score ≥ τ means positive"; ties go to the τ nearest 0. Candidates
/// are midpoints between consecutive distinct scores, and 0.
pub fn balanced_threshold(scores: &[f32], labels: &[bool]) -> f32 {
    let mut sorted: Vec<f32> = scores.to_vec();
    sorted.sort_by(f32::total_cmp);
    sorted.dedup();
    let mut candidates: Vec<f32> = sorted.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    candidates.push(0.0);
    if let (Some(lo), Some(hi)) = (sorted.first(), sorted.last()) {
        candidates.push(lo - 1e-6);
        candidates.push(hi + 1e-6);
    }
    let score_of = |tau: f32| Detection::at(scores, labels, tau).balanced_accuracy();
    candidates
        .into_iter()
        .max_by(|&a, &b| {
            score_of(a)
                .total_cmp(&score_of(b))
                .then(b.abs().total_cmp(&a.abs()))
        })
        .unwrap_or(0.0)
}

/// A detector's results on labelled prompts (positive = harmful).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub true_positives: usize,
    pub false_negatives: usize,
    pub false_positives: usize,
    pub true_negatives: usize,
}

impl Detection {
    /// Counts of "score ≥ τ" against the labels.
    pub fn at(scores: &[f32], labels: &[bool], tau: f32) -> Detection {
        Detection::of(
            &scores.iter().map(|&s| s >= tau).collect::<Vec<_>>(),
            labels,
        )
    }

    /// Counts of yes/no decisions against the labels.
    pub fn of(flagged: &[bool], labels: &[bool]) -> Detection {
        let mut d = Detection {
            true_positives: 0,
            false_negatives: 0,
            false_positives: 0,
            true_negatives: 0,
        };
        for (&f, &y) in flagged.iter().zip(labels) {
            match (f, y) {
                (true, true) => d.true_positives += 1,
                (false, true) => d.false_negatives += 1,
                (true, false) => d.false_positives += 1,
                (false, false) => d.true_negatives += 1,
            }
        }
        d
    }

    pub fn total(&self) -> usize {
        self.true_positives + self.false_negatives + self.false_positives + self.true_negatives
    }

    pub fn accuracy(&self) -> f32 {
        (self.true_positives + self.true_negatives) as f32 / self.total().max(1) as f32
    }

    /// F1 of the positive (harmful) class.
    pub fn f1(&self) -> f32 {
        let tp = self.true_positives as f32;
        let denominator = 2.0 * tp + (self.false_positives + self.false_negatives) as f32;
        if denominator == 0.0 {
            0.0
        } else {
            2.0 * tp / denominator
        }
    }

    /// Share of positives flagged (the detection rate on a harmful set).
    pub fn true_positive_rate(&self) -> f32 {
        self.true_positives as f32 / (self.true_positives + self.false_negatives).max(1) as f32
    }

    pub fn false_positive_rate(&self) -> f32 {
        self.false_positives as f32 / (self.false_positives + self.true_negatives).max(1) as f32
    }

    pub fn balanced_accuracy(&self) -> f32 {
        (self.true_positive_rate() + 1.0 - self.false_positive_rate()) / 2.0
    }
}

/// A detector's full report on labelled scores: AUC, the ROC curve, and the counts at τ.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetectorReport {
    pub auc: Option<f32>,
    /// `(false-positive rate, true-positive rate)` at every distinct threshold, from (0, 0)
    /// to (1, 1).
    pub roc: Vec<(f32, f32)>,
    pub tau: f32,
    pub at_tau: Detection,
    pub accuracy: f32,
    pub f1: f32,
}

impl DetectorReport {
    pub fn new(scores: &[f32], labels: &[bool], tau: f32) -> DetectorReport {
        let at_tau = Detection::at(scores, labels, tau);
        DetectorReport {
            auc: auc(scores, labels),
            roc: roc_curve(scores, labels),
            tau,
            accuracy: at_tau.accuracy(),
            f1: at_tau.f1(),
            at_tau,
        }
    }
}

/// ROC points of "score ≥ τ" for every distinct τ, highest first.
pub fn roc_curve(scores: &[f32], labels: &[bool]) -> Vec<(f32, f32)> {
    let mut taus: Vec<f32> = scores.to_vec();
    taus.sort_by(|a, b| b.total_cmp(a));
    taus.dedup();
    let mut roc = vec![(0.0, 0.0)];
    roc.extend(taus.iter().map(|&t| {
        let d = Detection::at(scores, labels, t);
        (d.false_positive_rate(), d.true_positive_rate())
    }));
    if roc.last() != Some(&(1.0, 1.0)) {
        roc.push((1.0, 1.0));
    }
    roc
}

/// The guard beside refusal-based detection on the same labelled prompts (docs/methods.md):
/// the refusal score at t_post (flagged at the model's gate τ) and, when replies were
/// generated, "did it refuse" by the reply's response mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuardComparison {
    pub n_harmful: usize,
    pub n_harmless: usize,
    pub guard: DetectorReport,
    pub refusal_score: DetectorReport,
    pub refused_reply: Option<Detection>,
}

/// Scores of the harmful then the harmless prompts of one evaluation, by detector.
pub struct DetectorInputs<'a> {
    pub guard: (&'a [f32], &'a [f32]),
    pub refusal_score: (&'a [f32], &'a [f32]),
    /// Whether each reply was a refusal (harmful, harmless), if replies were generated.
    pub refused_reply: Option<(&'a [bool], &'a [bool])>,
}

impl GuardComparison {
    /// `guard_tau` for the guard's scores, `refusal_score_tau` for the refusal scores (the
    /// gate's τ as a score).
    pub fn new(inputs: &DetectorInputs<'_>, guard_tau: f32, refusal_score_tau: f32) -> Self {
        let join = |(a, b): (&[f32], &[f32])| [a, b].concat();
        let (n_harmful, n_harmless) = (inputs.guard.0.len(), inputs.guard.1.len());
        let labels: Vec<bool> = (0..n_harmful + n_harmless).map(|i| i < n_harmful).collect();
        GuardComparison {
            n_harmful,
            n_harmless,
            guard: DetectorReport::new(&join(inputs.guard), &labels, guard_tau),
            refusal_score: DetectorReport::new(
                &join(inputs.refusal_score),
                &labels,
                refusal_score_tau,
            ),
            refused_reply: inputs
                .refused_reply
                .map(|(a, b)| Detection::of(&[a, b].concat(), &labels)),
        }
    }
}

/// One prompt in the 2-D view: its harmfulness (the guard's score at t_inst) and its refusal
/// score at t_post.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuardPoint {
    /// `harmful`, `harmless`, `borderline` or `jailbreak:<id>`.
    pub group: String,
    /// The prompt record's id (`<id>+<template>` for a wrapped one) and category.
    pub id: String,
    pub category: Option<String>,
    pub prompt: String,
    /// Ground truth for detection: a harmful request, wrapped or not.
    pub harmful: bool,
    /// For a jailbreak-wrapped prompt, the index of its plain version among the points.
    pub wraps: Option<usize>,
    pub harmfulness: f32,
    pub refusal_score: f32,
}

/// A guard fitted on the sets' train split (layers and τ chosen on val) and every test prompt
/// it was evaluated on: the data of the Guard tab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuardStudy {
    pub guard: LatentGuard,
    pub points: Vec<GuardPoint>,
    /// The model's gate τ as a refusal score (refusal-based detection's threshold).
    pub refusal_score_tau: f32,
}

impl GuardStudy {
    /// The guard at `tau` beside refusal-based detection on the plain harmful and harmless
    /// prompts.
    pub fn comparison(&self, tau: f32) -> GuardComparison {
        self.comparison_with_replies(tau, None)
    }

    /// [`GuardStudy::comparison`] with "did it refuse" for each plain harmful and harmless
    /// prompt, in the points' order.
    pub fn comparison_with_replies(
        &self,
        tau: f32,
        refused_reply: Option<(&[bool], &[bool])>,
    ) -> GuardComparison {
        let pick = |group: &str, f: fn(&GuardPoint) -> f32| -> Vec<f32> {
            self.group(group).map(f).collect()
        };
        let (gh, gl) = (
            pick("harmful", |p| p.harmfulness),
            pick("harmless", |p| p.harmfulness),
        );
        let (rh, rl) = (
            pick("harmful", |p| p.refusal_score),
            pick("harmless", |p| p.refusal_score),
        );
        GuardComparison::new(
            &DetectorInputs {
                guard: (&gh, &gl),
                refusal_score: (&rh, &rl),
                refused_reply,
            },
            tau,
            self.refusal_score_tau,
        )
    }

    /// The points of one group, in order.
    pub fn group<'a>(&'a self, group: &'a str) -> impl Iterator<Item = &'a GuardPoint> + 'a {
        self.points.iter().filter(move |p| p.group == group)
    }
}

/// The prompts a guard is evaluated on: one split of the two sets and of the borderline set,
/// and that split's harmful prompts wrapped in each jailbreak template.
pub struct GuardInputs<'a> {
    pub harmful: &'a PromptSet,
    pub harmless: &'a PromptSet,
    pub borderline: Option<&'a PromptSet>,
    pub jailbreaks: &'a [Jailbreak],
    pub split: Split,
}

/// States of `texts` through the activation cache, progress reported under `phase`.
fn states(
    lm: &LoadedModel,
    phase: &str,
    texts: &[&str],
    cache: Option<&Path>,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<SetActivations> {
    if texts.is_empty() {
        return Err(Error::InvalidInput(format!("no prompts for {phase}")));
    }
    collect_cached(lm, texts, None, cache, cancelled, &mut |d, t| {
        progress(phase, d, t)
    })
}

fn split_prompts(set: &PromptSet, split: Split) -> Vec<&str> {
    set.split(Some(split)).map(|r| r.prompt.as_str()).collect()
}

/// States of one split of `set` through the activation cache, progress reported under `phase`.
pub fn split_states(
    lm: &LoadedModel,
    phase: &str,
    set: &PromptSet,
    split: Split,
    cache: Option<&Path>,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<SetActivations> {
    states(
        lm,
        phase,
        &split_prompts(set, split),
        cache,
        cancelled,
        progress,
    )
}

/// A guard fitted on the train split of `harmful` and `harmless`, its layers and τ chosen on
/// their val split.
pub fn fit_on_splits(
    lm: &LoadedModel,
    harmful: &PromptSet,
    harmless: &PromptSet,
    cache: Option<&Path>,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<LatentGuard> {
    let mut get = |phase: &str, set: &PromptSet, split: Split| {
        split_states(lm, phase, set, split, cache, cancelled, progress)
    };
    let mut guard = LatentGuard::fit(
        &get("harmful train", harmful, Split::Train)?,
        &get("harmless train", harmless, Split::Train)?,
    )?;
    guard.choose(
        &get("harmful val", harmful, Split::Val)?,
        &get("harmless val", harmless, Split::Val)?,
    )?;
    Ok(guard)
}

/// Scores every prompt of `inputs` with `guard` (its harmfulness at t_inst) and the model
/// (its refusal score at t_post). States are read through the activation cache.
pub fn evaluate(
    lm: &LoadedModel,
    guard: LatentGuard,
    inputs: &GuardInputs<'_>,
    cache: Option<&Path>,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<GuardStudy> {
    let records = |set: &PromptSet| set.split(Some(inputs.split)).cloned().collect::<Vec<_>>();
    let harmful = records(inputs.harmful);
    // (group, records, wrapper, harmful)
    let mut groups: Vec<(String, Vec<PromptRecord>, Option<&Jailbreak>, bool)> = vec![
        ("harmful".into(), harmful.clone(), None, true),
        ("harmless".into(), records(inputs.harmless), None, false),
    ];
    if let Some(b) = inputs.borderline {
        groups.push(("borderline".into(), records(b), None, false));
    }
    for j in inputs.jailbreaks {
        groups.push((
            format!("jailbreak:{}", j.id),
            harmful.clone(),
            Some(j),
            true,
        ));
    }
    let mut points = Vec::new();
    for (group, records, wrapper, is_harmful) in groups {
        if records.is_empty() {
            continue;
        }
        let texts: Vec<String> = records
            .iter()
            .map(|r| wrapper.map_or(r.prompt.clone(), |j| j.wrap(&r.prompt)))
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let acts = states(lm, &group, &refs, cache, cancelled, progress)?;
        let scores = guard.scores(&acts)?;
        for (i, (record, prompt)) in records.into_iter().zip(texts).enumerate() {
            points.push(GuardPoint {
                group: group.clone(),
                id: wrapper.map_or(record.id.clone(), |j| format!("{}+{}", record.id, j.id)),
                category: record.category,
                prompt,
                harmful: is_harmful,
                // The plain harmful prompts are the first points, in order.
                wraps: wrapper.map(|_| i),
                harmfulness: scores[i],
                refusal_score: refusal_score(acts.refusal_probability[i]),
            });
        }
    }
    Ok(GuardStudy {
        guard,
        points,
        refusal_score_tau: refusal_score(lm.refusal_tau()),
    })
}

/// Fits a guard on the train split of `harmful` and `harmless`, chooses its layers and τ on
/// val, and scores the test split of both, of `borderline`, and of the harmful test prompts
/// wrapped in each jailbreak template.
#[allow(clippy::too_many_arguments)]
pub fn study(
    lm: &LoadedModel,
    harmful: &PromptSet,
    harmless: &PromptSet,
    borderline: Option<&PromptSet>,
    jailbreaks: &[Jailbreak],
    cache: Option<&Path>,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<GuardStudy> {
    let guard = fit_on_splits(lm, harmful, harmless, cache, cancelled, progress)?;
    let inputs = GuardInputs {
        harmful,
        harmless,
        borderline,
        jailbreaks,
        split: Split::Test,
    };
    evaluate(lm, guard, &inputs, cache, cancelled, progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// States of `n` prompts at 3 residual states of width 8: noise everywhere, plus `sign · v`
    /// at state 1 only (the one state that knows harmfulness).
    fn planted(n: usize, sign: f32, seed: u64) -> SetActivations {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (n_states, d, n_tail) = (3, 8, 1);
        let mut states = Vec::new();
        for _ in 0..n {
            for _role in 0..1 + n_tail {
                for l in 0..n_states {
                    for k in 0..d {
                        let planted = if l == 1 && k < 4 { 2.0 * sign } else { 0.0 };
                        states.push(planted + rng.random_range(-1.0f32..1.0));
                    }
                }
            }
        }
        SetActivations {
            n_states,
            d_model: d,
            n_tail,
            n_post: 1,
            states,
            refusal_probability: vec![0.5; n],
        }
    }

    #[test]
    fn the_guard_finds_the_state_that_knows_harmfulness_and_separates_held_out_prompts() {
        let mut guard = LatentGuard::fit(&planted(20, 1.0, 1), &planted(20, -1.0, 2)).unwrap();
        assert_eq!(guard.layers, 0..3);
        guard
            .choose(&planted(10, 1.0, 3), &planted(10, -1.0, 4))
            .unwrap();
        assert!(guard.layers.contains(&1), "{:?}", guard.layers);
        let (h, l) = (planted(30, 1.0, 5), planted(30, -1.0, 6));
        let scores = [guard.scores(&h).unwrap(), guard.scores(&l).unwrap()].concat();
        let labels: Vec<bool> = (0..60).map(|i| i < 30).collect();
        let report = DetectorReport::new(&scores, &labels, guard.tau);
        assert!(report.auc.unwrap() > 0.99, "{report:?}");
        assert!(report.accuracy > 0.95, "{report:?}");
        // Saved and loaded, it scores the same; another model's states are refused.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guard.json");
        guard.save(&path).unwrap();
        let loaded = LatentGuard::load(&path).unwrap();
        assert_eq!(loaded.scores(&h).unwrap(), guard.scores(&h).unwrap());
        let mut other = planted(2, 1.0, 7);
        other.d_model = 4;
        other.states.truncate(2 * 2 * 3 * 4);
        assert!(guard.scores(&other).is_err());
        std::fs::write(&path, "{}").unwrap();
        assert!(LatentGuard::load(&path).is_err());
    }

    #[test]
    fn counts_rates_and_f1_follow_their_definitions() {
        let scores = [0.9, 0.4, 0.2, -0.1, 0.3, -0.5];
        let labels = [true, true, true, false, false, false];
        let d = Detection::at(&scores, &labels, 0.25);
        assert_eq!(
            (
                d.true_positives,
                d.false_negatives,
                d.false_positives,
                d.true_negatives
            ),
            (2, 1, 1, 2)
        );
        assert!((d.accuracy() - 4.0 / 6.0).abs() < 1e-6);
        assert!((d.f1() - 2.0 * 2.0 / (2.0 * 2.0 + 2.0)).abs() < 1e-6);
        // The balanced threshold separates the sets as well as any threshold can.
        let tau = balanced_threshold(&scores, &labels);
        assert!(Detection::at(&scores, &labels, tau).balanced_accuracy() >= d.balanced_accuracy());
        let roc = roc_curve(&scores, &labels);
        assert_eq!(roc.first(), Some(&(0.0, 0.0)));
        assert_eq!(roc.last(), Some(&(1.0, 1.0)));
        assert!(roc.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }
}
