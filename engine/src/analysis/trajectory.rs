//! Per-token trajectories and the refusal cliff (docs/methods.md, "Probes, trajectories and
//! the refusal cliff"): the probe's `P(refuse)` and the projections onto the refusal and
//! harmfulness directions at every token of prompt + reply, from one forward pass.
//!
//! **Cliff magnitude** (the published code does not define it): over the window from the
//! first instruction token to the last token before the answer (t_post for a chat model;
//! the last thinking token before `</think>` for a reasoning model), the maximum score before
//! the final `k` tokens minus the mean score over the final `k` tokens (default `k = 8`). A
//! large value means the model's refusal intention was high while it read the request (and
//! thought about it) and fell just before it answered.

use candle_core::{IndexOp, Tensor};
use serde::{Deserialize, Serialize};

use crate::analysis::activations::state_points;
use crate::analysis::directions::Directions;
use crate::analysis::probe::{Probe, ProbeSet};
use crate::hooks::HookSpec;
use crate::model::chat::{ChatPrompt, ThinkingSpan};
use crate::model::{ForwardOptions, LogitsAt};
use crate::run::batch::for_each_prompt;
use crate::{Error, LoadedModel, Result};

pub const DEFAULT_CLIFF_K: usize = 8;

/// Where the cliff window ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CliffAt {
    /// At the end of thinking when the sequence has a closed thinking span, else at t_post.
    #[default]
    Auto,
    /// At t_post, the last prompt token.
    Prompt,
    /// At the last thinking token before `</think>` (reasoning models).
    EndOfThinking,
}

impl CliffAt {
    pub fn parse(s: &str) -> Option<CliffAt> {
        match s {
            "auto" => Some(CliffAt::Auto),
            "prompt" => Some(CliffAt::Prompt),
            "thinking" | "end-of-thinking" => Some(CliffAt::EndOfThinking),
            _ => None,
        }
    }
}

/// How the cliff is measured: over how many final tokens, and where the window ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CliffOptions {
    pub k: usize,
    pub at: CliffAt,
}

impl Default for CliffOptions {
    fn default() -> Self {
        CliffOptions {
            k: DEFAULT_CLIFF_K,
            at: CliffAt::Auto,
        }
    }
}

/// The cliff window of a prompt (+ reply): from the first instruction token through t_post,
/// or through the last thinking token. `thinking` is the sequence's thinking span, if any.
pub fn cliff_window(
    prompt: &ChatPrompt,
    thinking: Option<ThinkingSpan>,
    at: CliffAt,
) -> Result<std::ops::Range<usize>> {
    let start = prompt.instruction.start;
    // Thinking the model did in its reply (a template's empty think block, written when
    // thinking is off, closes inside the prompt and does not count).
    let end_of_thinking = thinking
        .and_then(|t| t.close)
        .filter(|&c| c >= prompt.ids.len() && c > start + 1);
    match (at, end_of_thinking) {
        (CliffAt::Prompt, _) | (CliffAt::Auto, None) => Ok(start..prompt.t_post + 1),
        (_, Some(close)) => Ok(start..close),
        (CliffAt::EndOfThinking, None) => Err(Error::InvalidInput(
            "no finished thinking span (<think> … </think>) to read the cliff at; generate with thinking on and enough tokens".into(),
        )),
    }
}

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
    /// The thinking text (reasoning models): its markers and the tokens between them.
    #[serde(default)]
    pub thinking: Option<ThinkingSpan>,
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
    /// The tokens the cliff is read over (the prompt window, or through the end of thinking).
    #[serde(default)]
    pub cliff_window: std::ops::Range<usize>,
    /// Cliff magnitude of `score` (else of `refusal`) over `cliff_window`.
    pub cliff: Option<f32>,
    /// The score at the window's last token: what the Cliff-as-a-Judge ranking sorts by.
    pub final_score: Option<f32>,
}

/// A stretch of the sequence a trajectory reads, for axes and exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Segment {
    /// Everything before the user's text: system message and template headers.
    System,
    /// The user's text, through t_inst.
    User,
    /// Template tokens after the user's text, through t_post.
    Template,
    /// A reasoning model's thinking, markers included.
    Thinking,
    /// The reply (the answer, after any thinking).
    Reply,
}

impl Segment {
    pub fn name(self) -> &'static str {
        match self {
            Segment::System => "system",
            Segment::User => "user",
            Segment::Template => "template",
            Segment::Thinking => "thinking",
            Segment::Reply => "reply",
        }
    }
}

impl Trajectory {
    /// The sequence cut into its segments, in order, empty ones left out.
    pub fn segments(&self) -> Vec<(Segment, std::ops::Range<usize>)> {
        let len = self.tokens.len();
        let prompt_len = self.prompt_len.min(len);
        let mut cuts = vec![
            (Segment::System, 0..self.instruction_start.min(prompt_len)),
            (
                Segment::User,
                self.instruction_start.min(prompt_len)..(self.t_inst + 1).min(prompt_len),
            ),
            (
                Segment::Template,
                (self.t_inst + 1).min(prompt_len)..prompt_len,
            ),
        ];
        // Thinking written in the reply, markers included (a template's empty think block
        // inside the prompt stays part of the template).
        match self.thinking.filter(|t| t.open >= prompt_len) {
            Some(t) => {
                let end = t.close.map_or(len, |c| (c + 1).min(len));
                cuts.push((Segment::Thinking, t.open..end));
                cuts.push((Segment::Reply, end..len));
            }
            None => cuts.push((Segment::Reply, prompt_len..len)),
        }
        cuts.retain(|(_, r)| r.end > r.start);
        cuts
    }
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
    cliff: CliffOptions,
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
    let tokens: Vec<TrajectoryToken> = ids
        .iter()
        .map(|&id| TrajectoryToken {
            id,
            text: lm.token_text(id),
        })
        .collect();
    let texts: Vec<String> = tokens.iter().map(|t| t.text.clone()).collect();
    let thinking = ThinkingSpan::find(&texts, prompt.t_inst + 1);
    let window = cliff_window(prompt, thinking, cliff.at)?;
    let curve = score.as_ref().or(refusal.as_ref());
    Ok(Trajectory {
        tokens,
        prompt_len: prompt.ids.len(),
        thinking,
        instruction_start: prompt.instruction.start,
        t_inst: prompt.t_inst,
        t_post: prompt.t_post,
        layer,
        cliff: curve.and_then(|c| cliff_magnitude(&c[window.clone()], cliff.k)),
        final_score: curve.map(|c| c[window.end - 1]),
        score,
        refusal,
        harmfulness,
        heatmap_layers,
        heatmap,
        cliff_k: cliff.k,
        cliff_window: window,
    })
}

/// One prompt's cliff-judge numbers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct CliffScore {
    pub cliff: Option<f32>,
    /// Probe `P(refuse)` at the window's last token (t_post, or the last thinking token).
    pub final_score: f32,
}

/// Cliff magnitude and final score of every prompt of a set, with the probe at `layer`; one
/// forward pass per prompt, the shared template prefix computed once. With a positive
/// `think_tokens` each prompt is first answered greedily (up to that many tokens, on the exact
/// weights) so the window can end where its thinking does (reasoning models).
#[allow(clippy::too_many_arguments)]
pub fn cliff_scores(
    lm: &LoadedModel,
    prompts: &[&str],
    system: Option<&str>,
    probe: &Probe,
    layer: usize,
    cliff: CliffOptions,
    think_tokens: usize,
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
    let n = chats.len();
    let mut ids: Vec<Vec<u32>> = chats.iter().map(|c| c.ids.clone()).collect();
    // Two phases when thinking is generated: replies, then scoring.
    let phases = if think_tokens > 0 { 2 } else { 1 };
    if think_tokens > 0 {
        let replies = crate::run::generate::greedy_replies(
            lm,
            &ids,
            think_tokens,
            None,
            cancelled,
            &mut |i, _| progress(i, phases * n),
        )?;
        for (seq, reply) in ids.iter_mut().zip(replies) {
            seq.extend(reply.tokens.iter().map(|t| t.id));
        }
    }
    let windows = chats
        .iter()
        .zip(&ids)
        .map(|(c, seq)| {
            let texts: Vec<String> = seq.iter().map(|&id| lm.token_text(id)).collect();
            cliff_window(c, ThinkingSpan::find(&texts, c.t_inst + 1), cliff.at)
        })
        .collect::<Result<Vec<_>>>()?;
    let max_shared = chats.iter().map(|c| c.instruction.start).min().unwrap_or(0);
    let done_before = (phases - 1) * n;
    let mut out = Vec::with_capacity(n);
    for_each_prompt(
        lm,
        &lm.model.dense,
        &ids,
        max_shared,
        &HookSpec::capture([point]),
        cancelled,
        &mut |i, _| progress(done_before + i, phases * n),
        &mut |pass| {
            let (window, offset) = (&windows[pass.index], pass.offset);
            let x = pass.capture(point)?;
            let x = x.narrow(0, window.start - offset, window.len())?;
            let p = probe.probabilities(&x)?;
            out.push(CliffScore {
                cliff: cliff_magnitude(&p, cliff.k),
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
