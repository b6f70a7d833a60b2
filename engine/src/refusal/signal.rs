//! The refusal signal read at the first reply position (t_post): `p([refuse])` on a model
//! with refusal tokens, else the mass on the refusal-opener set `R`; the refusal score (its
//! log-odds); and the gate that decides `[refuse]` or `[respond]` from it. Every analysis,
//! generation and the CLI read refusal through this module, which runs no model.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use crate::{Error, LoadedModel, Result};

pub const REFUSE_TOKEN: &str = "[refuse]";
pub const RESPOND_TOKEN: &str = "[respond]";

/// Openers of refusals; their first tokens (with and without a leading space) form `R`.
pub const REFUSAL_OPENERS: &[&str] = &[
    "I",
    "I'm",
    "I am",
    "I cannot",
    "I can't",
    "I apologize",
    "Sorry",
    "As",
    "Unfortunately",
    "No",
    "My apologies",
    "cannot",
    "Cannot",
];

/// The first token ids of the refusal openers under this model's tokenizer.
pub fn opener_ids(lm: &LoadedModel, openers: &[&str]) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for o in openers {
        for text in [o.to_string(), format!(" {o}")] {
            let enc = lm
                .tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            ids.extend(enc.get_ids().first().copied());
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// What "the model leans to refusing" is read from at t_post.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RefusalSignal {
    /// A model fine-tuned with refusal tokens: `p([refuse])`.
    Tokens { refuse: u32, respond: u32 },
    /// Any other model: the mass on the refusal-opener set, `P(R)`.
    Openers(Vec<u32>),
}

impl RefusalSignal {
    pub fn for_model(lm: &LoadedModel) -> Result<Self> {
        match (
            lm.tokenizer.token_to_id(REFUSE_TOKEN),
            lm.tokenizer.token_to_id(RESPOND_TOKEN),
        ) {
            (Some(refuse), Some(respond)) => Ok(RefusalSignal::Tokens { refuse, respond }),
            _ => Ok(RefusalSignal::Openers(opener_ids(lm, REFUSAL_OPENERS)?)),
        }
    }

    /// The tokens whose probability mass is the signal: `[refuse]`, or the opener set `R`.
    pub fn ids(&self) -> &[u32] {
        match self {
            RefusalSignal::Tokens { refuse, .. } => std::slice::from_ref(refuse),
            RefusalSignal::Openers(ids) => ids,
        }
    }

    /// The probability this signal reads from next-token log-probabilities.
    pub fn probability(&self, logprobs: &[f32]) -> f32 {
        self.ids()
            .iter()
            .map(|&i| logprobs[i as usize].exp())
            .sum::<f32>()
            .min(1.0)
    }

    /// The refusal score from next-token log-probabilities: [`refusal_score`] of
    /// [`RefusalSignal::probability`], computed in log space so it stays exact when the
    /// model is nearly certain either way (where `1 − p` rounds to 0 or 1).
    pub fn score(&self, logprobs: &[f32]) -> f32 {
        let ids = self.ids();
        let off = logprobs
            .iter()
            .enumerate()
            .filter(|(i, _)| !ids.contains(&(*i as u32)))
            .map(|(_, &x)| x);
        log_mass(ids.iter().map(|&i| logprobs[i as usize])) - log_mass(off)
    }

    /// [`RefusalSignal::score`] of `[vocab]` logits.
    pub fn score_of_logits(&self, logits: &Tensor) -> Result<f32> {
        let logprobs = candle_nn::ops::log_softmax(logits, D::Minus1)?.to_vec1::<f32>()?;
        Ok(self.score(&logprobs))
    }

    /// [`RefusalSignal::score`] as a differentiable function of `[vocab]` logits (for
    /// gradients): `lse(logits on the set) − lse(logits off it)`.
    pub fn score_tensor(&self, logits: &Tensor) -> Result<Tensor> {
        let vocab = logits.dim(0)?;
        let mut on = vec![-1e9f32; vocab];
        let mut off = vec![0f32; vocab];
        for &i in self.ids() {
            on[i as usize] = 0.0;
            off[i as usize] = -1e9;
        }
        let dev = logits.device();
        let on = (logits + Tensor::from_vec(on, vocab, dev)?)?.log_sum_exp(0)?;
        let off = (logits + Tensor::from_vec(off, vocab, dev)?)?.log_sum_exp(0)?;
        Ok((on - off)?)
    }

    pub fn describe(&self) -> &'static str {
        match self {
            RefusalSignal::Tokens { .. } => "p([refuse]) at t_post",
            RefusalSignal::Openers(_) => "P(refusal openers) at t_post",
        }
    }
}

/// `log Σ exp(x)` of log-probabilities: the log of their total mass (−∞ for none).
pub fn log_mass(logprobs: impl Iterator<Item = f32>) -> f32 {
    let v: Vec<f32> = logprobs.collect();
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !m.is_finite() {
        return m;
    }
    m + v.iter().map(|x| (x - m).exp()).sum::<f32>().ln()
}

/// The refusal score: the log-odds `log p − log(1 − p)` of the refusal probability `p`
/// (positive means the model leans to refusing). From a probability alone, clamped to
/// (1e−7, 1 − 1e−7); [`RefusalSignal::score`] computes it exactly from log-probabilities.
pub fn refusal_score(p: f32) -> f32 {
    let p = p.clamp(1e-7, 1.0 - 1e-7);
    p.ln() - (1.0 - p).ln()
}

/// The probability whose [`refusal_score`] is `score` (the logistic function).
pub fn probability_of_score(score: f32) -> f32 {
    1.0 / (1.0 + (-score).exp())
}

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
