//! Linear probes (docs/methods.md, "Probes, trajectories and the refusal cliff"): logistic
//! regression (default) or a two-layer MLP mapping one residual state to `P(refuse)`, trained
//! per layer with binary cross-entropy on a seeded 80/20 split, reported with held-out
//! accuracy, AUC, log-loss and calibration error.
//!
//! Residual states are wider than the prompt sets are long, so an unregularised probe
//! separates its training prompts perfectly and its probabilities saturate at 0 and 1. The
//! L2 penalty is therefore chosen on a validation part of the training prompts, and the
//! probe's logits are then rescaled there (temperature or Platt scaling) so that its
//! `P(refuse)` means what it says.

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

/// How a probe's logits are rescaled on the validation prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Calibration {
    /// Raw logits.
    None,
    /// `z / T`, one temperature fitted by log-loss (keeps the decision threshold at 0).
    #[default]
    Temperature,
    /// `a·z + b` fitted by log-loss (Platt scaling).
    Platt,
}

impl std::str::FromStr for Calibration {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Calibration::None),
            "temperature" => Ok(Calibration::Temperature),
            "platt" => Ok(Calibration::Platt),
            _ => Err(Error::InvalidInput(format!(
                "unknown calibration `{s}` (use temperature, platt or none)"
            ))),
        }
    }
}

/// The L2 penalties (on standardised inputs, per training prompt) tried on the validation
/// prompts when none is given.
pub const L2_GRID: [f64; 6] = [0.0, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1];

/// Validation losses within this fraction of the best are a tie, which the stronger penalty
/// wins.
const L2_TIE: f32 = 1e-3;

/// The fraction of the training prompts held back to choose the penalty and calibrate.
pub const VAL_FRACTION: f32 = 0.25;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ProbeOptions {
    pub kind: ProbeKind,
    pub feature: Feature,
    pub labels: LabelSource,
    /// Full-batch AdamW steps.
    pub steps: usize,
    pub lr: f64,
    /// L2 penalty on the weights; `None`: the one of [`L2_GRID`] with the lowest
    /// validation log-loss (the strongest of those within 0.1% of it).
    #[serde(default)]
    pub l2: Option<f64>,
    #[serde(default)]
    pub calibration: Calibration,
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
            l2: None,
            calibration: Calibration::Temperature,
            seed: 0,
        }
    }

    /// The probe as first shipped: no penalty, no calibration (its probabilities saturate).
    pub fn uncalibrated(self) -> Self {
        ProbeOptions {
            l2: Some(0.0),
            calibration: Calibration::None,
            ..self
        }
    }

    /// Whether training needs validation prompts (to choose the penalty or calibrate).
    fn needs_validation(&self) -> bool {
        self.l2.is_none() || self.calibration != Calibration::None
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
    /// The calibrated logit is `scale · z + offset` (1 and 0: uncalibrated).
    pub calibration: [f32; 2],
}

impl Probe {
    fn d(&self) -> usize {
        self.mean.len()
    }

    /// Calibrated logits for rows `xs` (`[n, d]`).
    pub fn logits(&self, xs: &Tensor) -> Result<Vec<f32>> {
        let [a, b] = self.calibration;
        Ok(self
            .raw_logits(xs)?
            .into_iter()
            .map(|z| a * z + b)
            .collect())
    }

    /// The probe's own logits, before calibration.
    pub fn raw_logits(&self, xs: &Tensor) -> Result<Vec<f32>> {
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

/// Trains one probe on rows `x` (`n` rows of width `d`) with labels `y` (1 = refuses),
/// with L2 penalty `l2` on its weights (the options' penalty when given, else none) and no
/// calibration. Classes are weighted to count equally.
pub fn train_probe(x: &[Vec<f32>], y: &[bool], options: &ProbeOptions) -> Result<Probe> {
    train_probe_l2(x, y, options, options.l2.unwrap_or(0.0))
}

fn train_probe_l2(x: &[Vec<f32>], y: &[bool], options: &ProbeOptions, l2: f64) -> Result<Probe> {
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
    if options.kind == ProbeKind::Logistic {
        let (w1, b1) = train_logistic(&flat, y, d, options, l2 as f32);
        return Ok(Probe {
            kind: options.kind,
            mean,
            scale,
            w1,
            b1: vec![b1],
            w2: Vec::new(),
            b2: 0.0,
            calibration: [1.0, 0.0],
        });
    }
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
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    for _ in 0..options.steps {
        let z = forward(&xs)?;
        // Stable BCE with logits: max(z, 0) − z·t + log(1 + e^{−|z|}).
        let loss = (z.relu()? - (&z * &targets)? + ((z.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
        let mut loss = (loss * &weights)?.sum_all()?;
        if l2 > 0.0 {
            // The weighted loss is a mean over prompts, so the penalty is per prompt too.
            let mut penalty = w1.as_tensor().sqr()?.sum_all()?;
            if let ProbeKind::Mlp { .. } = options.kind {
                penalty = (penalty + w2.as_tensor().sqr()?.sum_all()?)?;
            }
            loss = (loss + (penalty * (l2 / 2.0))?)?;
        }
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
        calibration: [1.0, 0.0],
    })
}

/// `Σ a·b` summed in eight interleaved lanes: vectorisable, and the same order on every CPU.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] += x[k] * y[k];
        }
    }
    let mut sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// Logistic regression on standardised rows `x` (`[n, d]`, row-major): full-batch Adam
/// (β 0.9/0.999, ε 1e-8) from zero on the class-weighted binary cross-entropy plus
/// `l2/2·‖w‖²`. Plain loops, not tensors: a probe is 300 steps of two matrix–vector
/// products, where per-operation overhead would dominate; and the fixed summation order
/// gives the same weights on every CPU.
fn train_logistic(
    x: &[f32],
    y: &[bool],
    d: usize,
    options: &ProbeOptions,
    l2: f32,
) -> (Vec<f32>, f32) {
    let n = y.len();
    let n_pos = y.iter().filter(|&&t| t).count();
    let (w_pos, w_neg) = (0.5 / n_pos as f32, 0.5 / (n - n_pos) as f32);
    let lr = options.lr as f32;
    let (beta1, beta2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    // Parameters: d weights, then the bias.
    let mut theta = vec![0.0f32; d + 1];
    let (mut m, mut v) = (vec![0.0f32; d + 1], vec![0.0f32; d + 1]);
    let mut residual = vec![0.0f32; n];
    let mut grad = vec![0.0f32; d + 1];
    for step in 1..=options.steps {
        let (w, b) = theta.split_at(d);
        for (i, r) in residual.iter_mut().enumerate() {
            let z = dot(&x[i * d..(i + 1) * d], w) + b[0];
            let weight = if y[i] { w_pos } else { w_neg };
            *r = weight * (sigmoid(z) - if y[i] { 1.0 } else { 0.0 });
        }
        grad.iter_mut().for_each(|g| *g = 0.0);
        for (i, &r) in residual.iter().enumerate() {
            for (g, &xi) in grad[..d].iter_mut().zip(&x[i * d..(i + 1) * d]) {
                *g += r * xi;
            }
            grad[d] += r;
        }
        for (g, &t) in grad[..d].iter_mut().zip(&theta[..d]) {
            *g += l2 * t;
        }
        let (c1, c2) = (1.0 - beta1.powi(step as i32), 1.0 - beta2.powi(step as i32));
        for k in 0..=d {
            m[k] = beta1 * m[k] + (1.0 - beta1) * grad[k];
            v[k] = beta2 * v[k] + (1.0 - beta2) * grad[k] * grad[k];
            theta[k] -= lr * (m[k] / c1) / ((v[k] / c2).sqrt() + eps);
        }
    }
    let b = theta.pop().unwrap_or(0.0);
    (theta, b)
}

/// The `[scale, offset]` that minimise the log-loss of `σ(scale·z + offset)` on logits `z`
/// with labels `y` (`offset` fixed at 0 for a temperature). Targets are Platt's smoothed
/// ones, `(n₊+1)/(n₊+2)` and `1/(n₋+2)`, so a perfectly separated validation set still gets
/// a finite scale. Newton's method on the (convex) loss.
pub fn fit_calibration(z: &[f32], y: &[bool], kind: Calibration) -> [f32; 2] {
    if kind == Calibration::None || z.is_empty() {
        return [1.0, 0.0];
    }
    let n_pos = y.iter().filter(|&&t| t).count() as f64;
    let n_neg = y.len() as f64 - n_pos;
    let (t_pos, t_neg) = ((n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0));
    let with_offset = kind == Calibration::Platt;
    let target = |yi: bool| if yi { t_pos } else { t_neg };
    let loss = |a: f64, b: f64| -> f64 {
        z.iter()
            .zip(y)
            .map(|(&zi, &yi)| {
                let s = a * zi as f64 + b;
                // BCE with logits: max(s, 0) − s·t + log(1 + e^{−|s|}).
                s.max(0.0) - s * target(yi) + (-s.abs()).exp().ln_1p()
            })
            .sum()
    };
    let (mut a, mut b) = (1.0f64, 0.0f64);
    let mut current = loss(a, b);
    for _ in 0..100 {
        // Gradient and Hessian of the loss in (a, b).
        let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (&zi, &yi) in z.iter().zip(y) {
            let zi = zi as f64;
            let p = 1.0 / (1.0 + (-(a * zi + b)).exp());
            let r = p - target(yi);
            let w = (p * (1.0 - p)).max(1e-12);
            ga += r * zi;
            gb += r;
            haa += w * zi * zi;
            hab += w * zi;
            hbb += w;
        }
        let (da, db) = if with_offset {
            // A small ridge keeps the step defined where every logit saturates.
            let (haa, hbb) = (haa + 1e-9, hbb + 1e-9);
            let det = haa * hbb - hab * hab;
            ((hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det)
        } else {
            (ga / (haa + 1e-9), 0.0)
        };
        // Backtracking: a full Newton step overshoots from saturated starting points.
        // (NaN never counts as no worse.)
        let no_worse = |next: f64| {
            matches!(
                next.partial_cmp(&current),
                Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
            )
        };
        let mut step = 1.0;
        let mut next = loss(a - da, b - db);
        while !no_worse(next) && step > 1e-6 {
            step *= 0.5;
            next = loss(a - step * da, b - step * db);
        }
        if !no_worse(next) {
            break;
        }
        a -= step * da;
        b -= step * db;
        let converged = current - next < 1e-10 * current.max(1.0);
        current = next;
        if converged {
            break;
        }
    }
    [a as f32, b as f32]
}

/// Mean binary log-loss of probabilities `p` for labels `y` (clamped away from 0 and 1).
pub fn log_loss(p: &[f32], y: &[bool]) -> f32 {
    let total: f64 = p
        .iter()
        .zip(y)
        .map(|(&p, &t)| {
            let p = (p as f64).clamp(1e-7, 1.0 - 1e-7);
            -if t { p.ln() } else { (1.0 - p).ln() }
        })
        .sum();
    (total / p.len().max(1) as f64) as f32
}

/// One bin of a reliability diagram: prompts whose `P(refuse)` fell in `[lo, lo + 0.1)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    pub lo: f32,
    pub count: usize,
    /// The bin's mean predicted `P(refuse)`.
    pub mean_predicted: f32,
    /// The fraction of its prompts that refuse.
    pub fraction_refusing: f32,
}

/// A reliability diagram with 10 equal-width bins (empty bins left out).
pub fn reliability(p: &[f32], y: &[bool]) -> Vec<ReliabilityBin> {
    const BINS: usize = 10;
    let mut sums = [(0usize, 0.0f64, 0usize); BINS];
    for (&p, &t) in p.iter().zip(y) {
        let bin = ((p * BINS as f32) as usize).min(BINS - 1);
        sums[bin].0 += 1;
        sums[bin].1 += p as f64;
        sums[bin].2 += t as usize;
    }
    sums.iter()
        .enumerate()
        .filter(|(_, s)| s.0 > 0)
        .map(|(i, &(count, total, pos))| ReliabilityBin {
            lo: i as f32 / BINS as f32,
            count,
            mean_predicted: (total / count as f64) as f32,
            fraction_refusing: pos as f32 / count as f32,
        })
        .collect()
}

/// Expected calibration error: the count-weighted mean gap between predicted and observed
/// refusal over a reliability diagram's bins.
pub fn expected_calibration_error(bins: &[ReliabilityBin]) -> f32 {
    let n: usize = bins.iter().map(|b| b.count).sum();
    bins.iter()
        .map(|b| b.count as f32 * (b.mean_predicted - b.fraction_refusing).abs())
        .sum::<f32>()
        / n.max(1) as f32
}

/// How well a probe's probabilities match outcomes on held-out prompts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CalibrationMetrics {
    pub log_loss: f32,
    pub ece: f32,
    pub reliability: Vec<ReliabilityBin>,
}

impl CalibrationMetrics {
    pub fn of(p: &[f32], y: &[bool]) -> CalibrationMetrics {
        let reliability = reliability(p, y);
        CalibrationMetrics {
            log_loss: log_loss(p, y),
            ece: expected_calibration_error(&reliability),
            reliability,
        }
    }
}

/// Trains a probe on `train` rows and, when the options ask, chooses its penalty and
/// calibrates it on `val` rows. Returns the probe and its penalty.
fn fit_probe(
    train: (&[Vec<f32>], &[bool]),
    val: (&[Vec<f32>], &[bool]),
    options: &ProbeOptions,
) -> Result<(Probe, f64)> {
    let val_logits = |probe: &Probe| -> Result<Vec<f32>> {
        let flat: Vec<f32> = val.0.iter().flatten().copied().collect();
        probe.raw_logits(&Tensor::from_vec(
            flat,
            (val.0.len(), probe.d()),
            &Device::Cpu,
        )?)
    };
    let (mut probe, l2) = match options.l2 {
        Some(l2) => (train_probe_l2(train.0, train.1, options, l2)?, l2),
        None => {
            let mut tried = Vec::with_capacity(L2_GRID.len());
            for l2 in L2_GRID {
                let probe = train_probe_l2(train.0, train.1, options, l2)?;
                // Judged after calibration: what is kept is the calibrated probe.
                let z = val_logits(&probe)?;
                let [a, b] = fit_calibration(&z, val.1, options.calibration);
                let p: Vec<f32> = z.iter().map(|&z| sigmoid(a * z + b)).collect();
                tried.push((log_loss(&p, val.1), probe, l2));
            }
            // The strongest penalty whose loss ties the best: near-equal losses (a probe that
            // separates the classes almost perfectly at several penalties) must not let float
            // rounding, which differs between CPUs, pick the penalty.
            let best = tried.iter().map(|t| t.0).fold(f32::INFINITY, f32::min);
            let (_, probe, l2) = tried
                .into_iter()
                .rev()
                .find(|t| t.0 <= best + L2_TIE * best.abs().max(1e-3))
                .expect("the grid is not empty");
            (probe, l2)
        }
    };
    if options.calibration != Calibration::None {
        probe.calibration = fit_calibration(&val_logits(&probe)?, val.1, options.calibration);
    }
    Ok((probe, l2))
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
    /// The L2 penalty used (given, or chosen on the validation prompts).
    #[serde(default)]
    pub l2: f64,
    /// Held-out log-loss, ECE and reliability of the calibrated probabilities …
    #[serde(default)]
    pub test_calibrated: CalibrationMetrics,
    /// … and of the same probe's raw ones.
    #[serde(default)]
    pub test_uncalibrated: CalibrationMetrics,
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
    /// Training prompts held back to choose the penalty and calibrate (0: none).
    #[serde(default)]
    pub n_val: usize,
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
            arrays.push(Array::new(
                &format!("{l}.calibration"),
                vec![2],
                p.calibration.to_vec(),
            ));
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
            // Files from before calibration have none: their probes are uncalibrated.
            let calibration = match arrays.contains_key(&format!("{l}.calibration")) {
                true => {
                    let c = tensorfile::take(&mut arrays, path, &format!("{l}.calibration"), &[2])?;
                    [c[0], c[1]]
                }
                false => [1.0, 0.0],
            };
            probes.push(Probe {
                kind: meta.options.kind,
                mean,
                scale,
                w1,
                b1,
                w2,
                b2,
                calibration,
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
    let test_idx: Vec<usize> = (0..n).filter(|&i| held_out[i]).collect();
    let mut train_idx: Vec<usize> = (0..n).filter(|&i| !held_out[i]).collect();
    let val_idx = if options.needs_validation() {
        // Stratified: each class gives the same fraction, so neither part loses a rare class.
        let mut val = Vec::new();
        for (class, seed) in [(true, 1u64), (false, 2)] {
            let members: Vec<usize> = train_idx
                .iter()
                .copied()
                .filter(|&i| y[i] == class)
                .collect();
            let held = random_holdout(members.len(), VAL_FRACTION, options.seed.wrapping_add(seed));
            val.extend(
                members
                    .iter()
                    .zip(held)
                    .filter(|(_, h)| *h)
                    .map(|(&i, _)| i),
            );
        }
        val.sort_unstable();
        train_idx.retain(|i| val.binary_search(i).is_err());
        val
    } else {
        Vec::new()
    };
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
        let rows = |idx: &[usize]| -> Vec<Vec<f32>> { idx.iter().map(|&i| row(i)).collect() };
        let labels_of = |idx: &[usize]| -> Vec<bool> { idx.iter().map(|&i| y[i]).collect() };
        let (y_train, y_val, y_test) = (
            labels_of(&train_idx),
            labels_of(&val_idx),
            labels_of(&test_idx),
        );
        let (probe, l2) = fit_probe(
            (&rows(&train_idx), &y_train),
            (&rows(&val_idx), &y_val),
            options,
        )?;
        let tensor = |idx: &[usize]| -> Result<Tensor> {
            let flat: Vec<f32> = idx.iter().flat_map(|&i| row(i)).collect();
            Ok(Tensor::from_vec(
                flat,
                (idx.len(), harmful.d_model),
                &Device::Cpu,
            )?)
        };
        let accuracy = |p: &[f32], y: &[bool]| {
            p.iter().zip(y).filter(|(&p, &y)| (p >= 0.5) == y).count() as f32
                / y.len().max(1) as f32
        };
        let p_train = probe.probabilities(&tensor(&train_idx)?)?;
        let mut m = LayerMetrics {
            layer,
            train_accuracy: accuracy(&p_train, &y_train),
            test_accuracy: f32::NAN,
            test_auc: None,
            l2,
            test_calibrated: CalibrationMetrics::default(),
            test_uncalibrated: CalibrationMetrics::default(),
        };
        if !test_idx.is_empty() {
            let x_test = tensor(&test_idx)?;
            let p_test = probe.probabilities(&x_test)?;
            let p_raw: Vec<f32> = probe
                .raw_logits(&x_test)?
                .into_iter()
                .map(sigmoid)
                .collect();
            m.test_accuracy = accuracy(&p_test, &y_test);
            m.test_auc = auc(&p_test, &y_test);
            m.test_calibrated = CalibrationMetrics::of(&p_test, &y_test);
            m.test_uncalibrated = CalibrationMetrics::of(&p_raw, &y_test);
        }
        metrics.push(m);
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
        n_val: val_idx.len(),
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

    /// Logits drawn from a known model: labels ~ Bernoulli(σ(z / T)). Fitting a temperature
    /// to the logits recovers `T`, and Platt scaling recovers an offset too.
    #[test]
    fn calibration_recovers_a_known_temperature_and_offset() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let z: Vec<f32> = (0..20000)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * 12.0)
            .collect();
        let draw = |a: f32, b: f32, rng: &mut rand::rngs::StdRng| -> Vec<bool> {
            z.iter()
                .map(|&z| rng.random::<f32>() < sigmoid(a * z + b))
                .collect()
        };
        let y = draw(0.25, 0.0, &mut rng);
        let [a, b] = fit_calibration(&z, &y, Calibration::Temperature);
        assert!((a - 0.25).abs() < 0.02 && b == 0.0, "{a} {b}");
        let y = draw(0.5, -1.0, &mut rng);
        let [a, b] = fit_calibration(&z, &y, Calibration::Platt);
        assert!((a - 0.5).abs() < 0.04 && (b + 1.0).abs() < 0.1, "{a} {b}");
        assert_eq!(fit_calibration(&z, &y, Calibration::None), [1.0, 0.0]);
        // Perfectly separated logits still get a finite scale (Platt's smoothed targets).
        let [a, _] = fit_calibration(
            &[-3.0, -2.0, 2.0, 3.0],
            &[false, false, true, true],
            Calibration::Temperature,
        );
        assert!(a.is_finite() && a > 0.0 && a < 10.0, "{a}");
    }

    #[test]
    fn reliability_and_ece_match_hand_counts() {
        let p = [0.05, 0.15, 0.12, 0.95, 0.91];
        let y = [false, true, false, true, true];
        let bins = reliability(&p, &y);
        assert_eq!(bins.len(), 3);
        assert_eq!((bins[1].count, bins[1].fraction_refusing), (2, 0.5));
        assert!((bins[1].mean_predicted - 0.135).abs() < 1e-6);
        // (1·|0.05−0| + 2·|0.135−0.5| + 2·|0.93−1|) / 5
        let want = (0.05 + 2.0 * 0.365 + 2.0 * 0.07) / 5.0;
        assert!((expected_calibration_error(&bins) - want).abs() < 1e-6);
        assert!((log_loss(&[0.5, 0.5], &[true, false]) - std::f32::consts::LN_2).abs() < 1e-6);
    }

    /// Wide, noisy data (more dimensions than training rows, labels 10 % flipped): the
    /// unregularised probe is overconfident on held-out rows; choosing the penalty and a
    /// temperature on validation rows lowers held-out log-loss and ECE.
    #[test]
    fn a_penalised_calibrated_probe_is_not_overconfident() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut rows = |n: usize| -> (Vec<Vec<f32>>, Vec<bool>) {
            (0..n)
                .map(|_| {
                    let x: Vec<f32> = (0..100).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
                    let y = (x[..8].iter().sum::<f32>() > 0.0) != (rng.random::<f32>() < 0.1);
                    (x, y)
                })
                .unzip()
        };
        let (train, val, test) = (rows(120), rows(100), rows(400));
        let held_out = |probe: &Probe| {
            let flat: Vec<f32> = test.0.iter().flatten().copied().collect();
            let p = probe
                .probabilities(&Tensor::from_vec(flat, (400, 100), &Device::Cpu).unwrap())
                .unwrap();
            CalibrationMetrics::of(&p, &test.1)
        };
        let raw_options = ProbeOptions::default().uncalibrated();
        let (raw, _) = fit_probe((&train.0, &train.1), (&val.0, &val.1), &raw_options).unwrap();
        let (cal, l2) = fit_probe(
            (&train.0, &train.1),
            (&val.0, &val.1),
            &ProbeOptions::default(),
        )
        .unwrap();
        let (raw, cal) = (held_out(&raw), held_out(&cal));
        assert!(l2 > 0.0, "a penalty is chosen on wide noisy data");
        assert!(
            raw.log_loss > 0.8,
            "the raw probe is overconfident: {}",
            raw.log_loss
        );
        assert!(
            cal.log_loss < 0.65 && cal.log_loss < raw.log_loss,
            "{} vs {}",
            cal.log_loss,
            raw.log_loss
        );
        assert!(cal.ece < raw.ece, "ECE {} vs {}", cal.ece, raw.ece);
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
