//! Patching heads: exact interchange between a harmful and a harmless prompt, its first-order
//! estimate (attribution patching), and ablation scans.

use candle_core::{IndexOp, Tensor};
use serde::{Deserialize, Serialize};

use crate::hooks::{HookPoint, HookSpec, Intervention};
use crate::model::{ForwardOptions, KvCache, LogitsAt};
use crate::refusal::RefusalSignal;
use crate::{Error, LoadedModel, Result};

use super::HeadMap;

/// Exact interchange between a harmful and a harmless prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Interchange {
    /// Harmless head output patched into the harmful run: the fall in refusal score over
    /// the clean gap.
    pub necessity: HeadMap,
    /// Harmful head output patched into the harmless run: the rise over the clean gap.
    pub sufficiency: HeadMap,
    pub clean_harmful: f32,
    pub clean_harmless: f32,
    /// Positions patched: the last `k` of each prompt, aligned at the end.
    pub k: usize,
}

/// A prompt's clean run, split before its last `k` tokens.
struct Clean {
    ids: Vec<u32>,
    prefix: KvCache,
    /// `[k, H, d_h]` per layer at the last `k` positions.
    z: Vec<Tensor>,
    score: f32,
}

fn clean_run(lm: &LoadedModel, ids: Vec<u32>, k: usize, signal: &RefusalSignal) -> Result<Clean> {
    let m = &lm.model;
    let n = m.config.n_layers;
    let split = ids.len() - k;
    let mut prefix = KvCache::new(n);
    if split > 0 {
        let t = Tensor::new(&ids[..split], m.device())?.unsqueeze(0)?;
        m.forward(
            &m.dense,
            &t,
            Some(&mut prefix),
            &HookSpec::default(),
            LogitsAt::None,
            ForwardOptions::default(),
        )?;
    }
    let mut cache = prefix.clone();
    let t = Tensor::new(&ids[split..], m.device())?.unsqueeze(0)?;
    let out = m.forward(
        &m.dense,
        &t,
        Some(&mut cache),
        &HookSpec::capture((0..n).map(HookPoint::AttnZ)),
        LogitsAt::Last,
        ForwardOptions::default(),
    )?;
    let z = (0..n)
        .map(|l| {
            Ok(out
                .captures
                .get(HookPoint::AttnZ(l))?
                .expect("captured")
                .i(0)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let score = signal.score_of_logits(&out.logits.expect("logits").flatten_all()?)?;
    Ok(Clean {
        ids,
        prefix,
        z,
        score,
    })
}

/// Refusal scores of `target`'s run with, in one batch per layer, each head's `z` at the last
/// `k` positions replaced by `value(layer, head)` (`[k, d_h]`): the prefix before them is
/// reused from the clean run, so only those positions are recomputed.
fn patched_scores(
    lm: &LoadedModel,
    target: &Clean,
    k: usize,
    signal: &RefusalSignal,
    value: &dyn Fn(usize, usize) -> Result<Tensor>,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(),
) -> Result<HeadMap> {
    let m = &lm.model;
    let (n, h) = (m.config.n_layers, m.config.n_heads);
    let split = target.ids.len() - k;
    let tail = Tensor::new(&target.ids[split..], m.device())?
        .unsqueeze(0)?
        .repeat((h, 1))?;
    let prefix = target.prefix.repeat_batch(h)?;
    let mut map = HeadMap::zeros(n, h);
    for l in 0..n {
        if cancelled() {
            return Err(Error::Cancelled);
        }
        let values = (0..h)
            .map(|head| Ok(value(l, head)?.contiguous()?))
            .collect::<Result<Vec<_>>>()?;
        let hooks = HookSpec::with_interventions(vec![Intervention::PatchHeadPerRow {
            layer: l,
            start: split,
            heads: (0..h).collect(),
            values,
        }]);
        let mut cache = prefix.clone();
        let logits = m
            .forward(
                &m.dense,
                &tail,
                Some(&mut cache),
                &hooks,
                LogitsAt::Last,
                ForwardOptions::default(),
            )?
            .logits
            .expect("logits");
        for head in 0..h {
            map.set(l, head, signal.score_of_logits(&logits.i((head, 0))?)?);
        }
        progress();
    }
    Ok(map)
}

/// Exact interchange for every head, both directions, patching the last `k` positions
/// (default: the post-instruction tokens, the same template tokens in both prompts).
pub fn interchange(
    lm: &LoadedModel,
    harmful: &str,
    harmless: &str,
    k: Option<usize>,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Interchange> {
    let a = lm.chat_prompt(None, harmful)?;
    let b = lm.chat_prompt(None, harmless)?;
    let k = k
        .unwrap_or_else(|| a.post_instruction.len().min(b.post_instruction.len()))
        .clamp(1, a.ids.len().min(b.ids.len()));
    let signal = RefusalSignal::for_model(lm)?;
    let clean_a = clean_run(lm, a.ids, k, &signal)?;
    let clean_b = clean_run(lm, b.ids, k, &signal)?;
    let gap = clean_a.score - clean_b.score;
    if gap.abs() < 1e-3 {
        return Err(Error::InvalidInput(format!(
            "the two prompts have the same refusal score ({:.3}); interchange needs a gap",
            clean_a.score
        )));
    }
    let total = 2 * lm.model.config.n_layers;
    let mut done = 0;
    let mut tick = || {
        done += 1;
        progress(done, total)
    };
    // Each head's z from `source` patched into `target`'s run.
    let mut patch = |target: &Clean, source: &Clean| {
        let z_of = |l: usize, head: usize| Ok(source.z[l].i((.., head))?);
        patched_scores(lm, target, k, &signal, &z_of, cancelled, &mut tick)
    };
    let into_harmful = patch(&clean_a, &clean_b)?;
    let into_harmless = patch(&clean_b, &clean_a)?;
    let norm = |map: HeadMap, f: &dyn Fn(f32) -> f32| HeadMap {
        values: map.values.into_iter().map(f).collect(),
        ..map
    };
    Ok(Interchange {
        necessity: norm(into_harmful, &|s| (clean_a.score - s) / gap),
        sufficiency: norm(into_harmless, &|s| (s - clean_b.score) / gap),
        clean_harmful: clean_a.score,
        clean_harmless: clean_b.score,
        k,
    })
}

/// How a scan ablates each head.
#[derive(Debug, Clone)]
pub enum ScanAblation {
    /// `z ← factor · z` (0: zero ablation; 0.1/0.01: the cliff code's attention scaling).
    Scale(f32),
    /// `z ←` the head's mean over a reference set, `[L][H] → [d_h]` (see [`head_means`]).
    Mean(Vec<Vec<Tensor>>),
}

/// Every head's mean `z` over every position of `prompts`: `[L][H]`, each `[d_h]`.
pub fn head_means(lm: &LoadedModel, prompts: &[&str]) -> Result<Vec<Vec<Tensor>>> {
    let m = &lm.model;
    let (n, h) = (m.config.n_layers, m.config.n_heads);
    let mut sums: Vec<Option<Tensor>> = vec![None; n];
    let mut count = 0usize;
    for p in prompts {
        let ids = lm.chat_prompt(None, p)?.ids;
        let t = Tensor::new(ids.as_slice(), m.device())?.unsqueeze(0)?;
        let out = m.forward(
            &m.dense,
            &t,
            None,
            &HookSpec::capture((0..n).map(HookPoint::AttnZ)),
            LogitsAt::None,
            ForwardOptions::default(),
        )?;
        for (l, sum) in sums.iter_mut().enumerate() {
            let z = out
                .captures
                .get(HookPoint::AttnZ(l))?
                .expect("captured")
                .i(0)?
                .sum(0)?;
            *sum = Some(match sum.take() {
                Some(s) => (s + z)?,
                None => z,
            });
        }
        count += ids.len();
    }
    if count == 0 {
        return Err(Error::InvalidInput(
            "no reference prompts for the head means".into(),
        ));
    }
    sums.into_iter()
        .map(|s| {
            let mean = (s.expect("one prompt at least") / count as f64)?;
            (0..h).map(|head| Ok(mean.i(head)?)).collect()
        })
        .collect()
}

/// The mean change in refusal score over `prompts` when each head is ablated as `how` says.
pub fn ablation_effect(
    lm: &LoadedModel,
    prompts: &[&str],
    how: &ScanAblation,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<HeadMap> {
    let m = &lm.model;
    let (n, h) = (m.config.n_layers, m.config.n_heads);
    let signal = RefusalSignal::for_model(lm)?;
    let mut mean = HeadMap::zeros(n, h);
    let total = prompts.len() * n;
    for (i, p) in prompts.iter().enumerate() {
        let ids = lm.chat_prompt(None, p)?.ids;
        let len = ids.len();
        // Patch every position: scaling z at layer l is patching it with factor × its clean
        // value, since nothing before layer l changes.
        let clean = clean_run(lm, ids, len, &signal)?;
        let value = |l: usize, head: usize| -> Result<Tensor> {
            let z = clean.z[l].i((.., head))?;
            Ok(match how {
                ScanAblation::Scale(f) => (z * *f as f64)?,
                ScanAblation::Mean(means) => {
                    means[l][head].unsqueeze(0)?.broadcast_as(z.shape())?
                }
            })
        };
        let mut layer = 0;
        let scores = patched_scores(lm, &clean, len, &signal, &value, cancelled, &mut || {
            layer += 1;
            progress(i * n + layer, total);
        })?;
        for (acc, s) in mean.values.iter_mut().zip(&scores.values) {
            *acc += (s - clean.score) / prompts.len() as f32;
        }
    }
    Ok(mean)
}

/// `∂(refusal score)/∂z_l` at every layer for one prompt (`[s, H, d_h]` each), from one
/// differentiable forward pass and one backward pass, plus the clean `z` and score.
pub fn score_gradients(lm: &LoadedModel, ids: &[u32]) -> Result<(Vec<Tensor>, Vec<Tensor>, f32)> {
    let m = &lm.model;
    let cfg = &m.config;
    let (n, h, dh, s) = (cfg.n_layers, cfg.n_heads, cfg.head_dim, ids.len());
    let signal = RefusalSignal::for_model(lm)?;
    let deltas = (0..n)
        .map(|_| candle_core::Var::zeros((1, s, h, dh), candle_core::DType::F32, m.device()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut hooks = HookSpec::with_interventions(
        deltas
            .iter()
            .enumerate()
            .map(|(layer, d)| Intervention::AddToZ {
                layer,
                delta: d.as_tensor().clone(),
            })
            .collect(),
    );
    hooks.capture.extend((0..n).map(HookPoint::AttnZ));
    let t = Tensor::new(ids, m.device())?.unsqueeze(0)?;
    // Frozen linears: the backward pass forms activation gradients only, no weight gradients.
    let frozen = m.dense.frozen()?;
    let out = m.forward(
        &frozen,
        &t,
        None,
        &hooks,
        LogitsAt::Last,
        ForwardOptions::differentiable(),
    )?;
    let score = signal.score_tensor(&out.logits.expect("logits").flatten_all()?)?;
    let grads = score.backward()?;
    let g = deltas
        .iter()
        .map(|d| {
            Ok(match grads.get(d.as_tensor()) {
                Some(g) => g.i(0)?,
                None => Tensor::zeros((s, h, dh), candle_core::DType::F32, m.device())?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let z = (0..n)
        .map(|l| {
            Ok(out
                .captures
                .get(HookPoint::AttnZ(l))?
                .expect("captured")
                .i(0)?
                .detach())
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((g, z, score.to_scalar::<f32>()?))
}

/// Attribution patching: the first-order estimate of [`interchange`] from one forward and one
/// backward pass per prompt: patching head `(l, h)`'s last `k` positions from the other
/// prompt changes the refusal score by ≈ `Σ (z_other − z_self) · ∂score/∂z`.
pub fn attribution_patching(
    lm: &LoadedModel,
    harmful: &str,
    harmless: &str,
    k: Option<usize>,
) -> Result<Interchange> {
    let pa = lm.chat_prompt(None, harmful)?;
    let pb = lm.chat_prompt(None, harmless)?;
    let (a, b) = (&pa.ids, &pb.ids);
    let k = k
        .unwrap_or_else(|| pa.post_instruction.len().min(pb.post_instruction.len()))
        .clamp(1, a.len().min(b.len()));
    let (ga, za, sa) = score_gradients(lm, a)?;
    let (gb, zb, sb) = score_gradients(lm, b)?;
    let gap = sa - sb;
    if gap.abs() < 1e-3 {
        return Err(Error::InvalidInput(
            "the two prompts have the same refusal score".into(),
        ));
    }
    let cfg = &lm.model.config;
    let estimate = |g: &[Tensor], z_self: &[Tensor], z_other: &[Tensor]| -> Result<HeadMap> {
        let mut map = HeadMap::zeros(cfg.n_layers, cfg.n_heads);
        for l in 0..cfg.n_layers {
            let tail = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, t.dim(0)? - k, k)?) };
            let diff = (tail(&z_other[l])? - tail(&z_self[l])?)?;
            let per_head = (diff * tail(&g[l])?)?.sum((0, 2))?.to_vec1::<f32>()?;
            for (h, v) in per_head.into_iter().enumerate() {
                map.set(l, h, v);
            }
        }
        Ok(map)
    };
    let into_harmful = estimate(&ga, &za, &zb)?;
    let into_harmless = estimate(&gb, &zb, &za)?;
    let scale = |m: HeadMap, f: f32| HeadMap {
        values: m.values.into_iter().map(|v| v * f).collect(),
        ..m
    };
    Ok(Interchange {
        necessity: scale(into_harmful, -1.0 / gap),
        sufficiency: scale(into_harmless, 1.0 / gap),
        clean_harmful: sa,
        clean_harmless: sb,
        k,
    })
}
