//! Routing: the knockout cascade of a gate head, the gate/amplifier finder, and the
//! suppression scan.

use serde::{Deserialize, Serialize};

use crate::hooks::{HookSpec, Intervention};
use crate::refusal::RefusalSignal;
use crate::{Error, LoadedModel, Result};

use super::{ablation_effect, dla, Dla, HeadMap, ScanAblation};

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
    let clean = dla(lm, prompts, None, &[], cancelled, &mut |_, _| {})?;
    cascade_from(lm, prompts, &clean, gate, cancelled)
}

/// [`knockout_cascade`] against the prompts' clean DLA, already computed.
fn cascade_from(
    lm: &LoadedModel,
    prompts: &[&str],
    clean: &[Dla],
    gate: (usize, usize),
    cancelled: &dyn Fn() -> bool,
) -> Result<HeadMap> {
    let knock = [Intervention::ScaleHead {
        layer: gate.0,
        head: gate.1,
        factor: 0.0,
    }];
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

/// The gate/amplifier finder (docs/methods.md, "Head attribution") on one pair's metrics.
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
    let cascade = cascade_from(lm, &[harmful], &clean, gate, cancelled)?;
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

/// The suppression-head scan (docs/methods.md): on the harmful prompts the model complies with
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
