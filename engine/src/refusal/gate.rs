//! The refusal gate of a model with refusal tokens, the same control for ordinary models (a
//! bias on the refusal openers), the first-token refusal probabilities the gate reads, and
//! its calibration on labelled prompts.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::calibration::{calibrated_tau, CalibratedTau, GateGoal, GateScores};
use super::signal::{opener_ids, REFUSAL_OPENERS, REFUSE_TOKEN, RESPOND_TOKEN};
use crate::data::prompts::{Label, PromptRecord};
use crate::hooks::HookSpec;
use crate::run::batch::first_positions;
use crate::{LoadedModel, Result};

/// Calibrated refusal tokens (docs/methods.md, "Refusal tokens"): at the first reply position emit
/// `[refuse]` when `p([refuse]) ≥ tau`, else `[respond]`; neither appears again afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RefusalGate {
    pub refuse: u32,
    pub respond: u32,
    pub tau: f32,
}

impl RefusalGate {
    /// The gate of a model with refusal tokens at threshold `tau`; None for other models.
    pub fn for_model(lm: &LoadedModel, tau: f32) -> Option<RefusalGate> {
        Some(RefusalGate {
            refuse: lm.tokenizer.token_to_id(REFUSE_TOKEN)?,
            respond: lm.tokenizer.token_to_id(RESPOND_TOKEN)?,
            tau,
        })
    }

    /// The first reply token for `p([refuse])`.
    pub fn decide(&self, p: f32) -> u32 {
        if p >= self.tau {
            self.refuse
        } else {
            self.respond
        }
    }

    /// At the first reply position, from its `[vocab]` logits: the token the gate emits, its
    /// log-probability, and `p([refuse])`.
    pub(crate) fn first_token(&self, logits: &Tensor) -> Result<(u32, f32, f32)> {
        let logprobs = candle_nn::ops::log_softmax(logits, D::Minus1)?.to_vec1::<f32>()?;
        let p = logprobs[self.refuse as usize].exp();
        let id = self.decide(p);
        Ok((id, logprobs[id as usize], p))
    }
}

/// For a model without refusal tokens, the same control as the gate: a logit bias on the
/// refusal-opener set at the first reply token (none when `bias` is 0 or the model has
/// refusal tokens).
pub fn opener_bias(lm: &LoadedModel, bias: f32) -> Result<Option<(Vec<u32>, f32)>> {
    if bias == 0.0 || RefusalGate::for_model(lm, 0.5).is_some() {
        return Ok(None);
    }
    Ok(Some((opener_ids(lm, REFUSAL_OPENERS)?, bias)))
}

/// `p([refuse])` (or `P(R)` for ordinary models) at t_post for each prompt.
pub fn first_token_probabilities(
    lm: &LoadedModel,
    prompts: &[&str],
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f32>> {
    let signal = crate::refusal::RefusalSignal::for_model(lm)?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| lm.chat_prompt(None, p).map(|c| c.ids))
        .collect::<Result<_>>()?;
    // The exact weights: these probabilities set and check the gate, so they must not
    // depend on which quantised kernels this CPU has.
    let states = first_positions(
        lm,
        &lm.model.dense,
        &ids,
        &HookSpec::default(),
        cancelled,
        progress,
    )?;
    Ok(states
        .iter()
        .map(|s| signal.probability(&s.logprobs))
        .collect())
}

/// Calibrates the gate of a model with refusal tokens on labelled held-out prompts (the val
/// split) for `goal`: `refusal::calibrated_tau` of the harmful prompts' `p([refuse])` against
/// the harmless and borderline ones'. None when `held_out` lacks either label.
pub fn calibrate_gate(
    organism: &LoadedModel,
    held_out: &[PromptRecord],
    goal: GateGoal,
    cancelled: &dyn Fn() -> bool,
) -> Result<Option<CalibratedTau>> {
    let has = |label| held_out.iter().any(|r| r.label == Some(label));
    if !(has(Label::Harmful) && has(Label::Harmless)) {
        return Ok(None);
    }
    let prompts: Vec<&str> = held_out.iter().map(|r| r.prompt.as_str()).collect();
    let ps = first_token_probabilities(organism, &prompts, cancelled, &mut |_, _| {})?;
    Ok(calibrated_tau_of(held_out.iter().zip(ps), goal))
}

/// `refusal::calibrated_tau` of scored prompts, sorted by label (and borderline or not); None
/// without both harmful and harmless prompts.
pub fn calibrated_tau_of<'a>(
    scored: impl IntoIterator<Item = (&'a PromptRecord, f32)>,
    goal: GateGoal,
) -> Option<CalibratedTau> {
    let mut scores = GateScores::default();
    for (r, p) in scored {
        match r.label {
            Some(Label::Harmful) => scores.harmful.push(p),
            Some(Label::Harmless) if r.is_borderline() => scores.borderline.push(p),
            Some(Label::Harmless) => scores.harmless.push(p),
            None => {}
        }
    }
    let has_respond = !(scores.harmless.is_empty() && scores.borderline.is_empty());
    (!scores.harmful.is_empty() && has_respond).then(|| calibrated_tau(&scores, goal))
}
