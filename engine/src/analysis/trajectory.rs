//! Per-token trajectories and the refusal cliff (docs/methods.md, "Probes, trajectories and
//! the refusal cliff"): the probe's `P(refuse)` and the projections onto the refusal and
//! harmfulness directions at every token of prompt + reply, from one forward pass.
//!
//! **Cliff magnitude** (the published code does not define it): over the window from the
//! first instruction token to the last token before the answer (t_post for a chat model;
//! the end of the thinking text for a reasoning model), the maximum score before the final
//! `k` tokens minus the mean score over the final `k` tokens (default `k = 8`). A large
//! value means the model's refusal intention was high while it read the request and fell
//! just before it answered.

use candle_core::{IndexOp, Tensor};
use serde::{Deserialize, Serialize};

use crate::analysis::activations::state_points;
use crate::analysis::directions::Directions;
use crate::analysis::probe::{Probe, ProbeSet};
use crate::hooks::HookSpec;
use crate::model::chat::ChatPrompt;
use crate::model::{ForwardOptions, LogitsAt};
use crate::run::batch::for_each_prompt;
use crate::{Error, LoadedModel, Result};

pub const DEFAULT_CLIFF_K: usize = 8;

/// The cliff magnitude of `scores` (the window): max over all but the final `k` scores minus
/// the mean of the final `k`. `None` when the window has no more than `k` scores.
pub fn cliff_magnitude(scores: &[f32], k: usize) -> Option<f32> {
    let k = k.max(1);
    if scores.len() <= k {
        return None;
    }
    let (before, last) = scores.split_at(scores.len() - k);
    let peak = before.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    Some(peak - last.iter().sum::<f32>() / k as f32)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrajectoryToken {
    pub id: u32,
    pub text: String,
}

/// Scores of every token of one prompt + reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trajectory {
    pub tokens: Vec<TrajectoryToken>,
    /// Tokens `0..prompt_len` are the prompt; the rest is the reply.
    pub prompt_len: usize,
    pub instruction_start: usize,
    pub t_inst: usize,
    pub t_post: usize,
    /// The residual state the curves read (see `activations::state_points`).
    pub layer: usize,
    /// `P(refuse)` from the probe at `layer`, per token.
    pub score: Option<Vec<f32>>,
    /// Projection onto the refusal (t_post) and harmfulness (t_inst) directions at `layer`,
    /// rescaled so the harmless set's mean is 0 and the harmful set's mean is 1.
    pub refusal: Option<Vec<f32>>,
    pub harmfulness: Option<Vec<f32>>,
    /// Layers × positions: `P(refuse)` of each trained probe, `heatmap[i]` for
    /// `heatmap_layers[i]`.
    pub heatmap_layers: Vec<usize>,
    pub heatmap: Vec<Vec<f32>>,
    pub cliff_k: usize,
    /// Cliff magnitude of `score` (else of `refusal`) over the prompt window.
    pub cliff: Option<f32>,
    /// The score at t_post: what the Cliff-as-a-Judge ranking sorts by.
    pub final_score: Option<f32>,
}

/// `(x·û − mean_harmless) / (mean_harmful − mean_harmless)` for every row of `x` (`[t, d]`).
fn normalised_projection(x: &Tensor, v: &[f32], means: [f32; 2]) -> Result<Vec<f32>> {
    let n: f32 = v
        .iter()
        .map(|a| a * a)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    let unit: Vec<f32> = v.iter().map(|a| a / n).collect();
    let u = Tensor::from_vec(unit, (v.len(), 1), x.device())?;
    let proj = x.matmul(&u)?.flatten_all()?.to_vec1::<f32>()?;
    let gap = means[0] - means[1];
    let gap = if gap.abs() < 1e-12 { 1.0 } else { gap };
    Ok(proj.into_iter().map(|p| (p - means[1]) / gap).collect())
}

/// Runs prompt + reply once (dense weights, `hooks` applied) and scores every token.
#[allow(clippy::too_many_arguments)]
pub fn trajectory(
    lm: &LoadedModel,
    prompt: &ChatPrompt,
    reply: &[u32],
    probes: Option<&ProbeSet>,
    directions: Option<&Directions>,
    layer: usize,
    cliff_k: usize,
    hooks: &HookSpec,
) -> Result<Trajectory> {
    let cfg = &lm.model.config;
    let points = state_points(cfg.n_layers);
    if layer >= points.len() {
        return Err(Error::InvalidInput(format!(
            "layer {layer} out of range (states 0..={})",
            points.len() - 1
        )));
    }
    if let Some(d) = directions {
        d.check_fits(lm)?;
    }
    if let Some(p) = probes {
        if p.d_model != cfg.d_model || p.n_states != points.len() {
            return Err(Error::InvalidInput(
                "these probes were trained on a model of another shape".into(),
            ));
        }
    }
    let ids: Vec<u32> = prompt.ids.iter().chain(reply).copied().collect();
    let heatmap_layers: Vec<usize> = probes.map(|p| p.layers.clone()).unwrap_or_default();
    let mut spec = hooks.clone();
    spec.capture.insert(points[layer]);
    spec.capture
        .extend(heatmap_layers.iter().map(|&l| points[l]));
    let t = Tensor::new(ids.as_slice(), lm.model.device())?.unsqueeze(0)?;
    let fwd = lm.model.forward(
        &lm.model.dense,
        &t,
        None,
        &spec,
        LogitsAt::None,
        ForwardOptions::default(),
    )?;
    let state =
        |l: usize| -> Result<Tensor> { Ok(fwd.captures.get(points[l])?.expect("captured").i(0)?) };
    let heatmap = probes
        .map(|p| {
            p.layers
                .iter()
                .zip(&p.probes)
                .map(|(&l, probe)| probe.probabilities(&state(l)?))
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?
        .unwrap_or_default();
    let score = heatmap_layers
        .iter()
        .position(|&l| l == layer)
        .map(|i| heatmap[i].clone());
    let x = state(layer)?;
    let (refusal, harmfulness) = match directions {
        Some(d) => {
            let s = &d.stats[layer];
            (
                Some(normalised_projection(
                    &x,
                    d.refusal_at(layer, d.n_post - 1),
                    s.refusal_means,
                )?),
                Some(normalised_projection(
                    &x,
                    d.harmfulness_at(layer),
                    s.harmfulness_means,
                )?),
            )
        }
        None => (None, None),
    };
    let window = prompt.instruction.start..prompt.t_post + 1;
    let curve = score.as_ref().or(refusal.as_ref());
    Ok(Trajectory {
        tokens: ids
            .iter()
            .map(|&id| TrajectoryToken {
                id,
                text: lm.token_text(id),
            })
            .collect(),
        prompt_len: prompt.ids.len(),
        instruction_start: prompt.instruction.start,
        t_inst: prompt.t_inst,
        t_post: prompt.t_post,
        layer,
        cliff: curve.and_then(|c| cliff_magnitude(&c[window], cliff_k)),
        final_score: curve.map(|c| c[prompt.t_post]),
        score,
        refusal,
        harmfulness,
        heatmap_layers,
        heatmap,
        cliff_k,
    })
}

/// One prompt's cliff-judge numbers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct CliffScore {
    pub cliff: Option<f32>,
    /// Probe `P(refuse)` at t_post.
    pub final_score: f32,
}

/// Cliff magnitude and final score of every prompt of a set (prompt window only), with the
/// probe at `layer`; one forward pass per prompt, the shared template prefix computed once.
#[allow(clippy::too_many_arguments)]
pub fn cliff_scores(
    lm: &LoadedModel,
    prompts: &[&str],
    system: Option<&str>,
    probe: &Probe,
    layer: usize,
    cliff_k: usize,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<CliffScore>> {
    let points = state_points(lm.model.config.n_layers);
    let point = *points
        .get(layer)
        .ok_or_else(|| Error::InvalidInput(format!("layer {layer} out of range")))?;
    let chats = prompts
        .iter()
        .map(|p| lm.chat_prompt(system, p))
        .collect::<Result<Vec<_>>>()?;
    let max_shared = chats.iter().map(|c| c.instruction.start).min().unwrap_or(0);
    let ids: Vec<Vec<u32>> = chats.iter().map(|c| c.ids.clone()).collect();
    let mut out = Vec::with_capacity(prompts.len());
    for_each_prompt(
        lm,
        &lm.model.dense,
        &ids,
        max_shared,
        &HookSpec::capture([point]),
        cancelled,
        progress,
        &mut |pass| {
            let (c, offset) = (&chats[pass.index], pass.offset);
            let x = pass.capture(point)?;
            let x = x.narrow(
                0,
                c.instruction.start - offset,
                c.t_post + 1 - c.instruction.start,
            )?;
            let p = probe.probabilities(&x)?;
            out.push(CliffScore {
                cliff: cliff_magnitude(&p, cliff_k),
                final_score: *p.last().expect("non-empty window"),
            });
            Ok(())
        },
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cliff_is_peak_before_minus_mean_of_last_k() {
        let s = [0.2, 0.9, 0.8, 0.7, 0.1, 0.3];
        let c = cliff_magnitude(&s, 2).unwrap();
        assert!((c - (0.9 - 0.2)).abs() < 1e-6);
        // A flat curve has no cliff; a rising one a negative value.
        assert_eq!(cliff_magnitude(&[0.5; 10], 8), Some(0.0));
        assert!(cliff_magnitude(&[0.0, 0.0, 1.0, 1.0], 2).unwrap() < 0.0);
        assert_eq!(cliff_magnitude(&[0.5; 8], 8), None);
    }
}
