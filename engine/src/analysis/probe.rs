//! Linear probes (docs/methods.md, "Probes, trajectories and the refusal cliff"): logistic
//! regression (default) or a two-layer MLP mapping one residual state to `P(refuse)`, trained
//! per layer with binary cross-entropy on a seeded 80/20 split, reported with held-out
//! accuracy and AUC.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::analysis::activations::{Feature, SetActivations};
use crate::analysis::directions::Provenance;
use crate::data::tensorfile::{self, Array};
use crate::refusal::refusal_score;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeKind {
    Logistic,
    /// ReLU MLP with one hidden layer of this width (the published code uses 1024).
    Mlp {
        hidden: usize,
    },
}

impl std::str::FromStr for ProbeKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "logistic" => Ok(ProbeKind::Logistic),
            "mlp" => Ok(ProbeKind::Mlp { hidden: 1024 }),
            _ => Err(Error::InvalidInput(format!(
                "unknown probe kind `{s}` (use logistic or mlp)"
            ))),
        }
    }
}

/// Where a prompt's label (1 = refuses) comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum LabelSource {
    /// The model's own first-token behaviour: refusal score > 0 at t_post.
    #[default]
    Behaviour,
    /// The set it came from: harmful = 1, harmless = 0.
    SetLabel,
}

impl std::str::FromStr for LabelSource {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "behaviour" | "behavior" => Ok(LabelSource::Behaviour),
            "set" => Ok(LabelSource::SetLabel),
            _ => Err(Error::InvalidInput(format!(
                "unknown label source `{s}` (use behaviour or set)"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ProbeOptions {
    pub kind: ProbeKind,
    pub feature: Feature,
    pub labels: LabelSource,
    /// Full-batch AdamW steps.
    pub steps: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions::for_kind(ProbeKind::Logistic)
    }
}

impl ProbeOptions {
    /// Defaults that converge for each kind on standardised residual states.
    pub fn for_kind(kind: ProbeKind) -> Self {
        let (steps, lr) = match kind {
            ProbeKind::Logistic => (300, 5e-2),
            ProbeKind::Mlp { .. } => (200, 1e-3),
        };
        ProbeOptions {
            kind,
            feature: Feature::TPost,
            labels: LabelSource::Behaviour,
            steps,
            lr,
            weight_decay: 1e-2,
            seed: 0,
        }
    }
}

/// A trained probe. Inputs are standardised with the training set's mean and scale first,
/// because a few residual dimensions are orders of magnitude larger than the rest.
#[derive(Debug, Clone)]
pub struct Probe {
    pub kind: ProbeKind,
    pub mean: Vec<f32>,
    pub scale: Vec<f32>,
    /// Logistic: `[d]`. MLP: `[d, hidden]`.
    pub w1: Vec<f32>,
    /// Logistic: `[1]`. MLP: `[hidden]`.
    pub b1: Vec<f32>,
    /// MLP only: `[hidden]`, plus the output bias.
    pub w2: Vec<f32>,
    pub b2: f32,
}

impl Probe {
    fn d(&self) -> usize {
        self.mean.len()
    }

    /// Logits for rows `xs` (`[n, d]`).
    pub fn logits(&self, xs: &Tensor) -> Result<Vec<f32>> {
        let dev = xs.device();
        let d = self.d();
        let x = xs
            .to_dtype(DType::F32)?
            .broadcast_sub(&Tensor::from_slice(&self.mean, d, dev)?)?
            .broadcast_div(&Tensor::from_slice(&self.scale, d, dev)?)?;
        let out = match self.kind {
            ProbeKind::Logistic => x
                .matmul(&Tensor::from_slice(&self.w1, (d, 1), dev)?)?
                .affine(1.0, self.b1[0] as f64)?,
            ProbeKind::Mlp { hidden } => x
                .matmul(&Tensor::from_slice(&self.w1, (d, hidden), dev)?)?
                .broadcast_add(&Tensor::from_slice(&self.b1, hidden, dev)?)?
                .relu()?
                .matmul(&Tensor::from_slice(&self.w2, (hidden, 1), dev)?)?
                .affine(1.0, self.b2 as f64)?,
        };
        Ok(out.flatten_all()?.to_vec1()?)
    }

    /// `P(refuse)` for rows `xs` (`[n, d]`).
    pub fn probabilities(&self, xs: &Tensor) -> Result<Vec<f32>> {
        Ok(self.logits(xs)?.into_iter().map(sigmoid).collect())
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Trains one probe on rows `x` (`n` rows of width `d`) with labels `y` (1 = refuses).
/// Classes are weighted to count equally.
pub fn train_probe(x: &[Vec<f32>], y: &[bool], options: &ProbeOptions) -> Result<Probe> {
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    let n = x.len();
    let n_pos = y.iter().filter(|&&t| t).count();
    if n == 0 || n_pos == 0 || n_pos == n {
        return Err(Error::InvalidInput(format!(
            "a probe needs both classes in its training data ({n_pos} refusing of {n})"
        )));
    }
    let d = x[0].len();
    let dev = Device::Cpu;
    let mut mean = vec![0.0f32; d];
    for row in x {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v / n as f32;
        }
    }
    let mut scale = vec![0.0f32; d];
    for row in x {
        for ((s, v), m) in scale.iter_mut().zip(row).zip(&mean) {
            *s += (v - m).powi(2) / n as f32;
        }
    }
    let scale: Vec<f32> = scale.into_iter().map(|v| v.sqrt().max(1e-6)).collect();
    let flat: Vec<f32> = x
        .iter()
        .flat_map(|row| {
            row.iter()
                .zip(&mean)
                .zip(&scale)
                .map(|((v, m), s)| (v - m) / s)
        })
        .collect();
    let xs = Tensor::from_vec(flat, (n, d), &dev)?;
    let targets = Tensor::from_vec(
        y.iter().map(|&t| if t { 1.0f32 } else { 0.0 }).collect(),
        (n, 1),
        &dev,
    )?;
    let w_pos = 0.5 / n_pos as f32;
    let w_neg = 0.5 / (n - n_pos) as f32;
    let weights = Tensor::from_vec(
        y.iter().map(|&t| if t { w_pos } else { w_neg }).collect(),
        (n, 1),
        &dev,
    )?;

    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let mut init = |len: usize, std: f32| -> Result<Var> {
        let v: Vec<f32> = (0..len)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * std * 3f32.sqrt())
            .collect();
        Ok(Var::from_vec(v, len, &dev)?)
    };
    let (w1, b1, w2, b2) = match options.kind {
        ProbeKind::Logistic => (init(d, 0.0)?, init(1, 0.0)?, init(0, 0.0)?, init(1, 0.0)?),
        ProbeKind::Mlp { hidden } => (
            init(d * hidden, (1.0 / d as f32).sqrt())?,
            init(hidden, 0.0)?,
            init(hidden, (1.0 / hidden as f32).sqrt())?,
            init(1, 0.0)?,
        ),
    };
    let forward = |xs: &Tensor| -> Result<Tensor> {
        Ok(match options.kind {
            ProbeKind::Logistic => xs
                .matmul(&w1.as_tensor().reshape((d, 1))?)?
                .broadcast_add(b1.as_tensor())?,
            ProbeKind::Mlp { hidden } => xs
                .matmul(&w1.as_tensor().reshape((d, hidden))?)?
                .broadcast_add(b1.as_tensor())?
                .relu()?
                .matmul(&w2.as_tensor().reshape((hidden, 1))?)?
                .broadcast_add(b2.as_tensor())?,
        })
    };
    let params = match options.kind {
        ProbeKind::Logistic => vec![w1.clone(), b1.clone()],
        ProbeKind::Mlp { .. } => vec![w1.clone(), b1.clone(), w2.clone(), b2.clone()],
    };
    let mut opt = AdamW::new(
        params,
        ParamsAdamW {
            lr: options.lr,
            weight_decay: options.weight_decay,
            ..Default::default()
        },
    )?;
    for _ in 0..options.steps {
        let z = forward(&xs)?;
        // Stable BCE with logits: max(z, 0) − z·t + log(1 + e^{−|z|}).
        let loss = (z.relu()? - (&z * &targets)? + ((z.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
        let loss = (loss * &weights)?.sum_all()?;
        opt.backward_step(&loss)?;
    }
    let read = |v: &Var| -> Result<Vec<f32>> { Ok(v.as_tensor().to_vec1::<f32>()?) };
    let (w1, b1, w2, b2) = (read(&w1)?, read(&b1)?, read(&w2)?, read(&b2)?);
    Ok(Probe {
        kind: options.kind,
        mean,
        scale,
        w1,
        b1,
        w2,
        b2: match options.kind {
            ProbeKind::Logistic => 0.0,
            ProbeKind::Mlp { .. } => b2[0],
        },
    })
}

/// Area under the ROC curve of `scores` for `labels` (the chance that a random positive
/// scores above a random negative; ties count half). `None` without both classes.
pub fn auc(scores: &[f32], labels: &[bool]) -> Option<f32> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks over ties (Mann–Whitney U).
    let mut ranks = vec![0.0f64; scores.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    let n_pos = labels.iter().filter(|&&l| l).count();
    let n_neg = labels.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let rank_sum: f64 = ranks
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l)
        .map(|(r, _)| r)
        .sum();
    let u = rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some((u / (n_pos * n_neg) as f64) as f32)
}

/// A seeded choice of `fraction` of `n` items to hold out.
pub fn random_holdout(n: usize, fraction: f32, seed: u64) -> Vec<bool> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let n_out = ((n as f32) * fraction).round() as usize;
    let mut held = vec![false; n];
    for &i in &idx[..n_out.min(n)] {
        held[i] = true;
    }
    held
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerMetrics {
    pub layer: usize,
    pub train_accuracy: f32,
    pub test_accuracy: f32,
    pub test_auc: Option<f32>,
}

/// Probes at several layers, trained together on one split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeSet {
    pub options: ProbeOptions,
    pub d_model: usize,
    pub n_states: usize,
    pub layers: Vec<usize>,
    #[serde(skip)]
    pub probes: Vec<Probe>,
    pub metrics: Vec<LayerMetrics>,
    pub n_train: usize,
    pub n_test: usize,
    pub n_refusing: usize,
    pub provenance: Provenance,
}

impl ProbeSet {
    /// The probe at `layer`, if one was trained there.
    pub fn at(&self, layer: usize) -> Option<&Probe> {
        self.layers
            .iter()
            .position(|&l| l == layer)
            .map(|i| &self.probes[i])
    }

    /// The layer with the highest held-out AUC (then accuracy).
    pub fn best_layer(&self) -> usize {
        self.metrics
            .iter()
            .max_by(|a, b| {
                (a.test_auc.unwrap_or(0.0), a.test_accuracy)
                    .partial_cmp(&(b.test_auc.unwrap_or(0.0), b.test_accuracy))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .map_or(0, |m| m.layer)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut arrays = Vec::new();
        for (l, p) in self.layers.iter().zip(&self.probes) {
            let d = p.d();
            let h = p.b1.len();
            arrays.push(Array::new(&format!("{l}.mean"), vec![d], p.mean.clone()));
            arrays.push(Array::new(&format!("{l}.scale"), vec![d], p.scale.clone()));
            arrays.push(Array::new(
                &format!("{l}.w1"),
                vec![p.w1.len()],
                p.w1.clone(),
            ));
            arrays.push(Array::new(&format!("{l}.b1"), vec![h], p.b1.clone()));
            let mut w2 = p.w2.clone();
            w2.push(p.b2);
            arrays.push(Array::new(&format!("{l}.w2"), vec![w2.len()], w2));
        }
        tensorfile::save(path, &arrays, self)
    }

    pub fn load(path: &Path) -> Result<ProbeSet> {
        let (mut arrays, meta): (_, ProbeSet) = tensorfile::load(path)?;
        let d = meta.d_model;
        let (w1_len, h, w2_len) = match meta.options.kind {
            ProbeKind::Logistic => (d, 1, 1),
            ProbeKind::Mlp { hidden } => (d * hidden, hidden, hidden + 1),
        };
        let mut probes = Vec::new();
        for l in &meta.layers {
            let mut take = |name: &str, len: usize| {
                tensorfile::take(&mut arrays, path, &format!("{l}.{name}"), &[len])
            };
            let mean = take("mean", d)?;
            let scale = take("scale", d)?;
            let w1 = take("w1", w1_len)?;
            let b1 = take("b1", h)?;
            let mut w2 = take("w2", w2_len)?;
            let b2 = w2.pop().unwrap_or(0.0);
            probes.push(Probe {
                kind: meta.options.kind,
                mean,
                scale,
                w1,
                b1,
                w2,
                b2,
            });
        }
        Ok(ProbeSet { probes, ..meta })
    }
}

/// The label of each prompt of the two sets (harmful first).
pub fn labels(
    harmful: &SetActivations,
    harmless: &SetActivations,
    source: LabelSource,
) -> Vec<bool> {
    match source {
        LabelSource::SetLabel => std::iter::repeat_n(true, harmful.len())
            .chain(std::iter::repeat_n(false, harmless.len()))
            .collect(),
        LabelSource::Behaviour => harmful
            .refusal_probability
            .iter()
            .chain(&harmless.refusal_probability)
            .map(|&p| refusal_score(p) > 0.0)
            .collect(),
    }
}

/// Trains a probe at each of `layers` on the prompts of both sets not in `held_out`
/// (harmful first, then harmless) and scores it on those that are.
#[allow(clippy::too_many_arguments)]
pub fn train_probes(
    harmful: &SetActivations,
    harmless: &SetActivations,
    held_out: &[bool],
    layers: &[usize],
    options: &ProbeOptions,
    provenance: Provenance,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ProbeSet> {
    let n = harmful.len() + harmless.len();
    if held_out.len() != n {
        return Err(Error::InvalidInput(
            "the holdout mask does not fit the sets".into(),
        ));
    }
    if let Some(&l) = layers.iter().find(|&&l| l >= harmful.n_states) {
        return Err(Error::InvalidInput(format!(
            "layer {l} out of range (the model has states 0..={})",
            harmful.n_states - 1
        )));
    }
    let y = labels(harmful, harmless, options.labels);
    let split =
        |want_held: bool| -> Vec<usize> { (0..n).filter(|&i| held_out[i] == want_held).collect() };
    let (train_idx, test_idx) = (split(false), split(true));
    let mut probes = Vec::new();
    let mut metrics = Vec::new();
    for (k, &layer) in layers.iter().enumerate() {
        if cancelled() {
            return Err(Error::Cancelled);
        }
        let row = |i: usize| {
            if i < harmful.len() {
                harmful.feature(i, layer, options.feature)
            } else {
                harmless.feature(i - harmful.len(), layer, options.feature)
            }
        };
        let xs: Vec<Vec<f32>> = train_idx.iter().map(|&i| row(i)).collect();
        let ys: Vec<bool> = train_idx.iter().map(|&i| y[i]).collect();
        let probe = train_probe(&xs, &ys, options)?;
        let accuracy = |idx: &[usize], p: &[f32]| {
            idx.iter()
                .zip(p)
                .filter(|(&i, &p)| (p >= 0.5) == y[i])
                .count() as f32
                / idx.len().max(1) as f32
        };
        let rows = |idx: &[usize]| -> Result<Tensor> {
            let flat: Vec<f32> = idx.iter().flat_map(|&i| row(i)).collect();
            Ok(Tensor::from_vec(
                flat,
                (idx.len(), harmful.d_model),
                &Device::Cpu,
            )?)
        };
        let p_train = probe.probabilities(&rows(&train_idx)?)?;
        let (test_accuracy, test_auc) = if test_idx.is_empty() {
            (f32::NAN, None)
        } else {
            let p_test = probe.probabilities(&rows(&test_idx)?)?;
            let y_test: Vec<bool> = test_idx.iter().map(|&i| y[i]).collect();
            (accuracy(&test_idx, &p_test), auc(&p_test, &y_test))
        };
        metrics.push(LayerMetrics {
            layer,
            train_accuracy: accuracy(&train_idx, &p_train),
            test_accuracy,
            test_auc,
        });
        probes.push(probe);
        progress(k + 1, layers.len());
    }
    Ok(ProbeSet {
        options: *options,
        d_model: harmful.d_model,
        n_states: harmful.n_states,
        layers: layers.to_vec(),
        probes,
        metrics,
        n_train: train_idx.len(),
        n_test: test_idx.len(),
        n_refusing: y.iter().filter(|&&t| t).count(),
        provenance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_matches_hand_counts() {
        assert_eq!(
            auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]),
            Some(0.75)
        );
        assert_eq!(auc(&[0.1, 0.9], &[false, true]), Some(1.0));
        assert_eq!(auc(&[0.5, 0.5], &[false, true]), Some(0.5));
        assert_eq!(auc(&[0.5, 0.5], &[true, true]), None);
    }

    /// Points labelled by the sign of a known linear function, with a huge nuisance
    /// dimension that standardisation must tame.
    fn separable(n: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<bool>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for _ in 0..n {
            let x: Vec<f32> = (0..6).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            let y = 2.0 * x[0] - x[2] > 0.0;
            let mut row = x;
            row.push(rng.random::<f32>() * 1000.0);
            xs.push(row);
            ys.push(y);
        }
        (xs, ys)
    }

    #[test]
    fn logistic_probe_learns_a_linear_rule() {
        let (xs, ys) = separable(300, 1);
        let probe = train_probe(&xs, &ys, &ProbeOptions::default()).unwrap();
        let (tx, ty) = separable(200, 2);
        let flat: Vec<f32> = tx.iter().flatten().copied().collect();
        let p = probe
            .probabilities(&Tensor::from_vec(flat, (200, 7), &Device::Cpu).unwrap())
            .unwrap();
        let acc = p
            .iter()
            .zip(&ty)
            .filter(|(p, y)| (**p >= 0.5) == **y)
            .count();
        assert!(acc >= 190, "held-out accuracy {acc}/200");
        assert!(auc(&p, &ty).unwrap() > 0.99);
        // The weight on the nuisance dimension stays small next to the signal's.
        assert!(
            probe.w1[6].abs() < 0.2 * probe.w1[0].abs(),
            "{:?}",
            probe.w1
        );
    }

    #[test]
    fn mlp_probe_learns_xor_that_a_linear_probe_cannot() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for _ in 0..400 {
            let (a, b) = (
                rng.random::<f32>() * 2.0 - 1.0,
                rng.random::<f32>() * 2.0 - 1.0,
            );
            xs.push(vec![a, b]);
            ys.push((a > 0.0) != (b > 0.0));
        }
        let fit = |kind| {
            let options = ProbeOptions {
                steps: 400,
                lr: 1e-2,
                ..ProbeOptions::for_kind(kind)
            };
            let probe = train_probe(&xs, &ys, &options).unwrap();
            let flat: Vec<f32> = xs.iter().flatten().copied().collect();
            let p = probe
                .probabilities(&Tensor::from_vec(flat, (400, 2), &Device::Cpu).unwrap())
                .unwrap();
            p.iter()
                .zip(&ys)
                .filter(|(p, y)| (**p >= 0.5) == **y)
                .count() as f32
                / 400.0
        };
        let linear = fit(ProbeKind::Logistic);
        let mlp = fit(ProbeKind::Mlp { hidden: 32 });
        assert!(linear < 0.7, "a linear probe cannot fit XOR ({linear})");
        assert!(mlp > 0.9, "the MLP probe should ({mlp})");
    }

    #[test]
    fn holdout_is_seeded_and_sized() {
        let a = random_holdout(100, 0.2, 7);
        assert_eq!(a.iter().filter(|&&h| h).count(), 20);
        assert_eq!(a, random_holdout(100, 0.2, 7));
        assert_ne!(a, random_holdout(100, 0.2, 8));
    }

    #[test]
    fn a_single_class_is_refused_with_a_reason() {
        let err = train_probe(
            &[vec![1.0], vec![2.0]],
            &[true, true],
            &ProbeOptions::default(),
        );
        assert!(err.unwrap_err().to_string().contains("both classes"));
    }
}
