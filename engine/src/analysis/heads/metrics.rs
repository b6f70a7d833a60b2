//! Every per-head metric of harmful/harmless pairs, averaged over the pairs: what the Heads
//! tab shows and `refusal-lens heads` prints.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{
    ablation_effect, attribution_patching, cipher_contrast, correlation, dla, find_routing,
    interchange, Cipher, Dla, HeadMap, Interchange, Routing, ScanAblation,
};
use crate::{Error, LoadedModel, Result};

/// DLA of the two sides of some pairs and the difference of their means.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairDla {
    pub harmful: Vec<Dla>,
    pub harmless: Vec<Dla>,
    /// Mean DLA of the harmful prompts minus that of the harmless ones.
    pub difference: HeadMap,
}

/// DLA of every pair's harmful and harmless prompt. `progress` sees a phase name.
pub fn pair_dla(
    lm: &LoadedModel,
    pairs: &[(String, String)],
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<PairDla> {
    let harmful: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
    let harmless: Vec<&str> = pairs.iter().map(|p| p.1.as_str()).collect();
    let a = dla(lm, &harmful, None, &[], cancelled, &mut |d, t| {
        progress("DLA harmful", d, t)
    })?;
    let b = dla(lm, &harmless, None, &[], cancelled, &mut |d, t| {
        progress("DLA harmless", d, t)
    })?;
    Ok(PairDla {
        difference: super::dla_difference(&a, &b)?,
        harmful: a,
        harmless: b,
    })
}

impl Interchange {
    /// The mean of several pairs' interchange maps and clean scores (each pair normalised by
    /// its own gap before averaging); `k` is the first pair's.
    pub fn mean(results: &[Interchange]) -> Result<Interchange> {
        let first = results
            .first()
            .ok_or_else(|| Error::InvalidInput("no pairs".into()))?;
        let n = results.len() as f32;
        let necessity: Vec<HeadMap> = results.iter().map(|r| r.necessity.clone()).collect();
        let sufficiency: Vec<HeadMap> = results.iter().map(|r| r.sufficiency.clone()).collect();
        Ok(Interchange {
            necessity: HeadMap::mean(&necessity)?,
            sufficiency: HeadMap::mean(&sufficiency)?,
            clean_harmful: results.iter().map(|r| r.clean_harmful).sum::<f32>() / n,
            clean_harmless: results.iter().map(|r| r.clean_harmless).sum::<f32>() / n,
            k: first.k,
        })
    }
}

/// Exact interchange of every pair (the last `k` positions; default: the post-instruction
/// tokens), and their mean.
pub fn pair_interchange(
    lm: &LoadedModel,
    pairs: &[(String, String)],
    k: Option<usize>,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<(Vec<Interchange>, Interchange)> {
    let mut each = Vec::with_capacity(pairs.len());
    for (i, (a, b)) in pairs.iter().enumerate() {
        let phase = format!("interchange, pair {}/{}", i + 1, pairs.len());
        each.push(interchange(lm, a, b, k, cancelled, &mut |d, t| {
            progress(&phase, d, t)
        })?);
    }
    let mean = Interchange::mean(&each)?;
    Ok((each, mean))
}

/// Every per-head metric of some harmful/harmless pairs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HeadMetrics {
    /// The first pair (and how many pairs the metrics average over).
    pub harmful: String,
    pub harmless: String,
    pub pairs: usize,
    /// Mean DLA of the harmful prompts minus the harmless ones'.
    pub dla: HeadMap,
    pub necessity: HeadMap,
    pub sufficiency: HeadMap,
    /// Attribution patching's estimate of `necessity`, and its Pearson r with it.
    pub attribution: HeadMap,
    pub attribution_r: f32,
    /// Change in the harmful prompts' refusal score when the head is zeroed.
    pub ablation: HeadMap,
    /// DLA of the harmful prompts plain minus Caesar-encoded (cipher contrast), or why it
    /// could not be computed (the encoded prompt states its key and may not fit the context).
    pub cipher: std::result::Result<HeadMap, String>,
    /// The gate/amplifier finder's answer on the first pair.
    pub routing: Routing,
    /// The knockout cascade of `cascade_gate` (first `routing.gate`): every head's DLA
    /// change with it zeroed.
    pub cascade: HeadMap,
    pub cascade_gate: (usize, usize),
    pub clean_harmful: f32,
    pub clean_harmless: f32,
    pub seconds: f64,
}

/// Computes [`HeadMetrics`] for `pairs`: DLA, interchange and attribution per pair (then
/// averaged), zero-ablation on the harmful sides, routing and the cipher contrast.
pub fn head_metrics(
    lm: &LoadedModel,
    pairs: &[(String, String)],
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<HeadMetrics> {
    let (first_harmful, first_harmless) = pairs
        .first()
        .cloned()
        .ok_or_else(|| Error::InvalidInput("no pair chosen".into()))?;
    let started = Instant::now();
    let harmful: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
    let dla_diff = pair_dla(lm, pairs, cancelled, progress)?.difference;
    let (each, interchange) = pair_interchange(lm, pairs, None, cancelled, progress)?;
    let attribution = pairs
        .iter()
        .zip(&each)
        .map(|((a, b), x)| Ok(attribution_patching(lm, a, b, Some(x.k))?.necessity))
        .collect::<Result<Vec<_>>>()?;
    let attribution = HeadMap::mean(&attribution)?;
    let ablation = ablation_effect(
        lm,
        &harmful,
        &ScanAblation::Scale(0.0),
        cancelled,
        &mut |d, t| progress("ablation", d, t),
    )?;
    let (routing, cascade) = find_routing(
        lm,
        &first_harmful,
        &dla_diff,
        &interchange.necessity,
        cancelled,
    )?;
    let cipher = cipher_contrast(lm, &harmful, Cipher::Caesar, cancelled, &mut |_, _| {})
        .map_err(|e| e.to_string());
    Ok(HeadMetrics {
        attribution_r: correlation(&attribution, &interchange.necessity),
        attribution,
        dla: dla_diff,
        cipher,
        cascade_gate: routing.gate,
        routing,
        cascade,
        necessity: interchange.necessity,
        sufficiency: interchange.sufficiency,
        ablation,
        clean_harmful: interchange.clean_harmful,
        clean_harmless: interchange.clean_harmless,
        pairs: pairs.len(),
        harmful: first_harmful,
        harmless: first_harmless,
        seconds: started.elapsed().as_secs_f64(),
    })
}
