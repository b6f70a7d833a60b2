//! Head attribution (methods.md "Head attribution"): direct logit attribution of every head
//! onto the refusal-vs-compliance logit direction, exact interchange (necessity and
//! sufficiency) between a harmful and a harmless prompt, and the effect of ablating each head.
//! Scans batch one layer's heads into one forward pass, each batch row patching a different
//! head ([`Intervention::PatchHeadPerRow`]).

use candle_core::{IndexOp, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::hooks::{HookPoint, HookSpec, Intervention};
use crate::model::{ForwardOptions, KvCache, LogitsAt};
use crate::refusal::{opener_ids, RefusalSignal};
use crate::{Error, LoadedModel, Result};

/// First tokens of compliant replies, the other end of the logit direction for models
/// without refusal tokens.
pub const COMPLIANCE_OPENERS: &[&str] = &[
    "Sure",
    "Here",
    "Certainly",
    "Of course",
    "To",
    "The",
    "Yes",
    "Step",
    "First",
];

/// One value per head, layers × heads, row-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadMap {
    pub n_layers: usize,
    pub n_heads: usize,
    pub values: Vec<f32>,
}

impl HeadMap {
    pub fn zeros(n_layers: usize, n_heads: usize) -> Self {
        HeadMap {
            n_layers,
            n_heads,
            values: vec![0.0; n_layers * n_heads],
        }
    }

    pub fn get(&self, layer: usize, head: usize) -> f32 {
        self.values[layer * self.n_heads + head]
    }

    fn set(&mut self, layer: usize, head: usize, v: f32) {
        self.values[layer * self.n_heads + head] = v;
    }

    /// `(layer, head, value)` sorted by value, largest first.
    pub fn ranked(&self) -> Vec<(usize, usize, f32)> {
        let mut all: Vec<_> = (0..self.n_layers)
            .flat_map(|l| (0..self.n_heads).map(move |h| (l, h)))
            .map(|(l, h)| (l, h, self.get(l, h)))
            .collect();
        all.sort_by(|a, b| b.2.total_cmp(&a.2));
        all
    }

    /// The element-wise mean of several maps of one shape.
    pub fn mean(maps: &[HeadMap]) -> Result<HeadMap> {
        let first = maps
            .first()
            .ok_or_else(|| Error::InvalidInput("no maps to average".into()))?;
        let mut m = HeadMap::zeros(first.n_layers, first.n_heads);
        for x in maps {
            m.add_scaled(x, 1.0 / maps.len() as f32);
        }
        Ok(m)
    }

    fn add_scaled(&mut self, other: &HeadMap, scale: f32) {
        for (a, b) in self.values.iter_mut().zip(&other.values) {
            *a += b * scale;
        }
    }
}

/// `u`: the unembedding direction whose dot product with the final normalised state is the
/// refusal-vs-compliance logit difference: `W_U[refuse] − W_U[respond]` on a model with
/// refusal tokens, else the mean row of the refusal openers minus that of the compliance
/// openers.
pub fn logit_direction(lm: &LoadedModel) -> Result<Vec<f32>> {
    let w = &lm.model.dense.lm_head;
    let mean_row = |ids: &[u32]| -> Result<Tensor> { Ok(w.rows(ids)?.mean(0)?) };
    let u = match RefusalSignal::for_model(lm)? {
        RefusalSignal::Tokens { refuse, respond } => {
            (mean_row(&[refuse])? - mean_row(&[respond])?)?
        }
        RefusalSignal::Openers(r) => {
            let c = opener_ids(lm, COMPLIANCE_OPENERS)?;
            let c: Vec<u32> = c.into_iter().filter(|i| !r.contains(i)).collect();
            (mean_row(&r)? - mean_row(&c)?)?
        }
    };
    Ok(u.to_vec1()?)
}

/// Direct logit attribution at t_post of one prompt: every head's write, the embedding and
/// every MLP write, each dotted with `g ⊙ u / rms(x_L)` (the final RMSNorm linearised at this
/// run). They sum to the logit difference the model computes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dla {
    pub heads: HeadMap,
    pub embed: f32,
    pub mlp: Vec<f32>,
    /// The logit difference from the model's own logits.
    pub logit_difference: f32,
    /// `rms(x_L)` at t_post, the linearisation point.
    pub rms: f32,
}

impl Dla {
    /// Heads + embedding + MLPs.
    pub fn sum(&self) -> f32 {
        self.heads.values.iter().sum::<f32>() + self.embed + self.mlp.iter().sum::<f32>()
    }
}

/// DLA of each prompt (chat-templated), from one batched pass per 16 prompts, with
/// `interventions` applied (e.g. a knocked-out gate head; the norm is linearised at that run).
pub fn dla(
    lm: &LoadedModel,
    prompts: &[&str],
    system: Option<&str>,
    interventions: &[Intervention],
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Dla>> {
    let cfg = &lm.model.config;
    let (n_layers, n_heads, dh, d) = (cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.d_model);
    let dev = lm.model.device().clone();
    let u = Tensor::from_vec(logit_direction(lm)?, d, &dev)?;
    let gain_u = (lm
        .model
        .dense
        .final_norm
        .to_dtype(candle_core::DType::F32)?
        * &u)?;
    // W_O^T (g ⊙ u) per layer, [H, d_h]: a head's DLA is z · this / rms.
    let read: Vec<Tensor> = lm
        .model
        .dense
        .blocks
        .iter()
        .map(|b| -> Result<Tensor> {
            let w_o = b.o.dense_weight()?; // [d, H·d_h]
            Ok(gain_u.unsqueeze(0)?.matmul(&w_o)?.reshape((n_heads, dh))?)
        })
        .collect::<Result<_>>()?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| lm.chat_prompt(system, p).map(|c| c.ids))
        .collect::<Result<_>>()?;
    let mut points: Vec<HookPoint> = vec![
        HookPoint::Embed,
        HookPoint::ResidPost(n_layers - 1),
        HookPoint::LnFinal,
    ];
    points.extend((0..n_layers).flat_map(|l| [HookPoint::AttnZ(l), HookPoint::MlpOut(l)]));
    let eps = cfg.rms_eps as f32;
    let mut out = Vec::with_capacity(prompts.len());
    let mut hooks = HookSpec::capture(points);
    hooks.interventions = interventions.to_vec();
    crate::run::batch::for_each_prompt(
        lm,
        &lm.model.dense,
        &ids,
        usize::MAX,
        &hooks,
        cancelled,
        progress,
        &mut |pass| {
            let t = pass.len - 1;
            let at = |p: HookPoint| -> Result<Tensor> { Ok(pass.capture(p)?.i(t)?) };
            let x_l = at(HookPoint::ResidPost(n_layers - 1))?;
            let rms = (x_l.sqr()?.mean_all()?.to_scalar::<f32>()? + eps).sqrt();
            let dot = |x: &Tensor| -> Result<f32> {
                Ok((x * &gain_u)?.sum_all()?.to_scalar::<f32>()? / rms)
            };
            let mut heads = HeadMap::zeros(n_layers, n_heads);
            let mut mlp = Vec::with_capacity(n_layers);
            for (l, r) in read.iter().enumerate() {
                let z = at(HookPoint::AttnZ(l))?; // [H, d_h]
                let per_head = (z * r)?.sum(D::Minus1)?.to_vec1::<f32>()?;
                for (h, v) in per_head.into_iter().enumerate() {
                    heads.set(l, h, v / rms);
                }
                mlp.push(dot(&at(HookPoint::MlpOut(l))?)?);
            }
            let logit_difference = (pass.last_normalized()? * &u)?
                .sum_all()?
                .to_scalar::<f32>()?;
            out.push(Dla {
                heads,
                embed: dot(&at(HookPoint::Embed)?)?,
                mlp,
                logit_difference,
                rms,
            });
            Ok(())
        },
    )?;
    Ok(out)
}

/// Mean DLA of the harmful prompts minus that of the harmless ones.
pub fn dla_difference(dla_harmful: &[Dla], dla_harmless: &[Dla]) -> Result<HeadMap> {
    let first = dla_harmful
        .first()
        .or(dla_harmless.first())
        .ok_or_else(|| Error::InvalidInput("no prompts".into()))?;
    let mut m = HeadMap::zeros(first.heads.n_layers, first.heads.n_heads);
    for x in dla_harmful {
        m.add_scaled(&x.heads, 1.0 / dla_harmful.len() as f32);
    }
    for x in dla_harmless {
        m.add_scaled(&x.heads, -1.0 / dla_harmless.len() as f32);
    }
    Ok(m)
}

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
    let z_of = |source: &Clean, l: usize, head: usize| Ok(source.z[l].i((.., head))?);
    let into_harmful = patched_scores(
        lm,
        &clean_a,
        k,
        &signal,
        &|l, h| z_of(&clean_b, l, h),
        cancelled,
        &mut tick,
    )?;
    let into_harmless = patched_scores(
        lm,
        &clean_b,
        k,
        &signal,
        &|l, h| z_of(&clean_a, l, h),
        cancelled,
        &mut tick,
    )?;
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
        ForwardOptions {
            differentiable: true,
        },
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
    let a = lm.chat_prompt(None, harmful)?.ids;
    let b = lm.chat_prompt(None, harmless)?.ids;
    let pa = lm.chat_prompt(None, harmful)?;
    let pb = lm.chat_prompt(None, harmless)?;
    let k = k
        .unwrap_or_else(|| pa.post_instruction.len().min(pb.post_instruction.len()))
        .clamp(1, a.len().min(b.len()));
    let (ga, za, sa) = score_gradients(lm, &a)?;
    let (gb, zb, sb) = score_gradients(lm, &b)?;
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

/// Pearson correlation of two head maps.
pub fn correlation(a: &HeadMap, b: &HeadMap) -> f32 {
    let n = a.values.len() as f64;
    let ma = a.values.iter().map(|&x| x as f64).sum::<f64>() / n;
    let mb = b.values.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.values.iter().zip(&b.values) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    (sab / (saa.sqrt() * sbb.sqrt()).max(1e-30)) as f32
}

/// Knockout cascade: every head's DLA on `prompts` with the gate head zero-ablated, minus its
/// clean DLA (mean over prompts), both with the final norm linearised at the clean run (so
/// heads up to the gate's layer are unchanged, the gate itself loses all of its DLA, and
/// amplifiers show up as large negative values after it).
pub fn knockout_cascade(
    lm: &LoadedModel,
    prompts: &[&str],
    gate: (usize, usize),
    cancelled: &dyn Fn() -> bool,
) -> Result<HeadMap> {
    let knock = [Intervention::ScaleHead {
        layer: gate.0,
        head: gate.1,
        factor: 0.0,
    }];
    let clean = dla(lm, prompts, None, &[], cancelled, &mut |_, _| {})?;
    let out = dla(lm, prompts, None, &knock, cancelled, &mut |_, _| {})?;
    let mut m = HeadMap::zeros(clean[0].heads.n_layers, clean[0].heads.n_heads);
    for (c, o) in clean.iter().zip(&out) {
        m.add_scaled(&o.heads, o.rms / c.rms / prompts.len() as f32);
        m.add_scaled(&c.heads, -1.0 / prompts.len() as f32);
    }
    Ok(m)
}

/// What the gate/amplifier finder reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Routing {
    /// The gate: in 25–65% depth, the highest interchange necessity among heads whose |DLA|
    /// is at most a quarter of the largest |DLA| (it routes, it does not write refusal).
    pub gate: (usize, usize),
    pub gate_necessity: f32,
    pub gate_dla: f32,
    /// Later heads among the top DLA heads whose DLA falls by at least 25% when the gate is
    /// knocked out: (layer, head, clean DLA, DLA change).
    pub amplifiers: Vec<(usize, usize, f32, f32)>,
}

/// The gate/amplifier finder of methods.md on one pair's metrics.
pub fn find_routing(
    lm: &LoadedModel,
    harmful: &str,
    dla_diff: &HeadMap,
    necessity: &HeadMap,
    cancelled: &dyn Fn() -> bool,
) -> Result<(Routing, HeadMap)> {
    let n = dla_diff.n_layers;
    let lo = (n as f32 * 0.25).floor() as usize;
    let hi = ((n as f32 * 0.65).ceil() as usize).min(n);
    let max_dla = dla_diff.values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let gate = (lo..hi)
        .flat_map(|l| (0..dla_diff.n_heads).map(move |h| (l, h)))
        .filter(|&(l, h)| dla_diff.get(l, h).abs() <= 0.25 * max_dla)
        .max_by(|a, b| necessity.get(a.0, a.1).total_cmp(&necessity.get(b.0, b.1)))
        .ok_or_else(|| Error::InvalidInput("no head in 25–65% depth".into()))?;
    let clean = dla(lm, &[harmful], None, &[], cancelled, &mut |_, _| {})?;
    let cascade = knockout_cascade(lm, &[harmful], gate, cancelled)?;
    let mut amplifiers: Vec<(usize, usize, f32, f32)> = dla_diff
        .ranked()
        .into_iter()
        .filter(|&(l, _, v)| l > gate.0 && v > 0.0)
        .take(10)
        .map(|(l, h, _)| (l, h, clean[0].heads.get(l, h), cascade.get(l, h)))
        .filter(|&(_, _, c, d)| c > 0.0 && d <= -0.25 * c)
        .collect();
    amplifiers.sort_by(|a, b| a.3.total_cmp(&b.3));
    Ok((
        Routing {
            gate,
            gate_necessity: necessity.get(gate.0, gate.1),
            gate_dla: dla_diff.get(gate.0, gate.1),
            amplifiers,
        },
        cascade,
    ))
}

/// In-context substitution ciphers for the cipher contrast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cipher {
    /// Shift letters by 3.
    Caesar,
    /// a↔z, b↔y, …
    Atbash,
    /// A random letter permutation from this seed.
    Random(u64),
}

impl Cipher {
    fn key(self) -> Vec<char> {
        let alphabet: Vec<char> = ('a'..='z').collect();
        match self {
            Cipher::Caesar => alphabet
                .iter()
                .map(|&c| (((c as u8 - b'a' + 3) % 26) + b'a') as char)
                .collect(),
            Cipher::Atbash => alphabet.iter().rev().copied().collect(),
            Cipher::Random(seed) => {
                use rand::seq::SliceRandom;
                use rand::SeedableRng;
                let mut k = alphabet.clone();
                k.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
                k
            }
        }
    }

    /// `text` with every letter substituted (case kept).
    pub fn encode(self, text: &str) -> String {
        let key = self.key();
        text.chars()
            .map(|c| {
                if c.is_ascii_lowercase() {
                    key[(c as u8 - b'a') as usize]
                } else if c.is_ascii_uppercase() {
                    key[(c.to_ascii_lowercase() as u8 - b'a') as usize].to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    }

    /// The user message: the key stated, then the encoded request.
    pub fn wrap(self, text: &str) -> String {
        let key: String = self.key().into_iter().collect();
        format!(
            "The message below is written in a substitution cipher. Plain letters abcdefghijklmnopqrstuvwxyz map to cipher letters {key}. Decode it and answer it.\n\n{}",
            self.encode(text)
        )
    }
}

impl std::str::FromStr for Cipher {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "caesar" => Ok(Cipher::Caesar),
            "atbash" => Ok(Cipher::Atbash),
            "random" => Ok(Cipher::Random(0)),
            _ => Err(Error::InvalidInput(format!(
                "unknown cipher `{s}` (use caesar, atbash or random)"
            ))),
        }
    }
}

/// Cipher contrast: mean DLA of the plain prompts minus that of their cipher versions.
pub fn cipher_contrast(
    lm: &LoadedModel,
    prompts: &[&str],
    cipher: Cipher,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<HeadMap> {
    let wrapped: Vec<String> = prompts.iter().map(|p| cipher.wrap(p)).collect();
    let wrapped: Vec<&str> = wrapped.iter().map(String::as_str).collect();
    let plain = dla(lm, prompts, None, &[], cancelled, progress)?;
    let coded = dla(lm, &wrapped, None, &[], cancelled, progress)?;
    dla_difference(&plain, &coded)
}

/// First-token refusal log-odds of each prompt under `interventions`.
pub fn refusal_scores(
    lm: &LoadedModel,
    prompts: &[&str],
    interventions: &[Intervention],
) -> Result<Vec<f32>> {
    let signal = RefusalSignal::for_model(lm)?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| lm.chat_prompt(None, p).map(|c| c.ids))
        .collect::<Result<_>>()?;
    let hooks = HookSpec::with_interventions(interventions.to_vec());
    Ok(crate::run::batch::first_positions(
        lm,
        &lm.model.dense,
        &ids,
        &hooks,
        &|| false,
        &mut |_, _| {},
    )?
    .iter()
    .map(|f| signal.score(&f.logprobs))
    .collect())
}

/// The suppression-head scan (methods.md): on the harmful prompts the model complies with
/// (refusal log-odds < 0; at most `limit`), the mean rise in refusal score when each head's
/// attention is scaled by `factor`. Returns those prompts and the map.
pub fn suppression_scan(
    lm: &LoadedModel,
    harmful: &[&str],
    factor: f32,
    limit: usize,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<String>, HeadMap)> {
    let scores = refusal_scores(lm, harmful, &[])?;
    let complied: Vec<&str> = harmful
        .iter()
        .zip(&scores)
        .filter(|(_, s)| **s < 0.0)
        .map(|(p, _)| *p)
        .take(limit)
        .collect();
    if complied.is_empty() {
        return Err(Error::InvalidInput(
            "the model refuses every one of these harmful prompts: nothing to scan".into(),
        ));
    }
    let map = ablation_effect(
        lm,
        &complied,
        &ScanAblation::Scale(factor),
        cancelled,
        progress,
    )?;
    Ok((complied.iter().map(|s| s.to_string()).collect(), map))
}

/// Scale-ablation interventions for heads.
pub fn scale_heads(heads: &[(usize, usize)], factor: f32) -> Vec<Intervention> {
    heads
        .iter()
        .map(|&(layer, head)| Intervention::ScaleHead {
            layer,
            head,
            factor: factor as f64,
        })
        .collect()
}
