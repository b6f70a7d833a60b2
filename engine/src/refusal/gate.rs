//! What the refusal gate needs that runs the model: the same control for ordinary models (a
//! bias on the refusal openers), the first-token refusal probabilities the gate reads, and
//! the gate's calibration on labelled prompts. The gate itself ([`super::RefusalGate`]) is a
//! decision rule in `signal.rs`, which generation uses.

use super::calibration::{calibrated_tau, CalibratedTau, GateGoal, GateScores};
use super::signal::{opener_ids, RefusalGate, REFUSAL_OPENERS};
use crate::data::prompts::{Label, PromptRecord};
use crate::hooks::HookSpec;
use crate::run::batch::first_positions;
use crate::{LoadedModel, Result};

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
