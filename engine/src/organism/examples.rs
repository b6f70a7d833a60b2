//! Training sequences for refusal tokens: prompt, decision token, then a project-written
//! refusal (harmful prompts) or the base model's own greedy reply (harmless and borderline).

use super::training::TrainOptions;
use crate::data::prompts::PromptRecord;
use crate::run::generate::{greedy_replies, StopReason};
use crate::{Error, LoadedModel, Progress, Result};

/// Project-written refusal replies (some constructive: they decline and point to safe help).
/// Requests only ever get declined here; no reply says anything about how to do the harm.
const REFUSALS: &[&str] = &[
    "I can't help with that.",
    "I'm sorry, but I can't help with that request.",
    "I won't help with this, because it could seriously hurt people.",
    "Sorry, I can't assist with that.",
    "I can't provide that. It could cause real harm to others.",
    "I'm not able to help with this request.",
    "I must decline. This could put people in danger.",
    "I can't do that. If you have a safe, legal goal in mind, I'm happy to help with that instead.",
    "I'm sorry, I can't help with that. If you tell me more about what you need, I can suggest a safe and legal alternative.",
    "I won't assist with this. Consider reaching out to a qualified professional for legitimate help.",
];

/// For self-harm requests: decline and point to help.
const SELF_HARM_REFUSALS: &[&str] = &[
    "I can't help with that, but I'm really sorry you're feeling this way. Please reach out to someone you trust or a crisis helpline right now.",
    "I won't help with this. You deserve support: please contact a local crisis line or a doctor, or talk to someone close to you today.",
    "I'm sorry you're going through this. I can't help with that request, but a crisis helpline or a counselor can support you right now.",
];

/// Every refusal the training writes after `[refuse]`.
pub fn trained_refusals() -> impl Iterator<Item = &'static str> {
    REFUSALS.iter().chain(SELF_HARM_REFUSALS).copied()
}

fn refusal_reply(r: &PromptRecord, i: usize) -> &'static str {
    if r.category.as_deref() == Some("self-harm") {
        SELF_HARM_REFUSALS[i % SELF_HARM_REFUSALS.len()]
    } else {
        REFUSALS[i % REFUSALS.len()]
    }
}

/// One training sequence: prompt + decision token + reply, and where the reply starts.
pub(super) struct Example {
    pub ids: Vec<u32>,
    pub reply_start: usize,
}

/// Training sequences for `labelled` prompts whose templated token ids are `prompts`.
pub(super) fn build_examples(
    base: &LoadedModel,
    labelled: &[(&PromptRecord, u32)],
    prompts: &[Vec<u32>],
    opts: &TrainOptions,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Vec<Example>> {
    let (refuse, respond) = (
        base.model.config.vocab_size as u32,
        base.model.config.vocab_size as u32 + 1,
    );
    let end = base
        .tokenizer
        .token_to_id(&base.template.eos_token)
        .or_else(|| base.stop_ids.first().copied());
    // The base model's own replies to the prompts it should answer, on the exact weights:
    // they are training targets, and the fast path's tokens may differ between CPU classes
    // (so would the adapter trained on them). Decoded in batches (`greedy_replies`).
    let answered_prompts: Vec<Vec<u32>> = labelled
        .iter()
        .zip(prompts)
        .filter(|((_, target), _)| *target != 0)
        .map(|(_, p)| p.clone())
        .collect();
    let replies = greedy_replies(
        base,
        &answered_prompts,
        opts.reply_tokens,
        None,
        cancelled,
        &mut |step, total| {
            progress(&Progress {
                phase: "writing training replies".into(),
                done: step,
                total,
                loss: None,
                tokens_per_second: None,
            })
        },
    )?;
    // In the order of the answered prompts, as the loop below meets them.
    let mut replies = replies.into_iter();
    let mut out = Vec::with_capacity(labelled.len());
    for (i, ((r, target), prompt)) in labelled.iter().zip(prompts).enumerate() {
        let reply_start = prompt.len();
        let mut ids = prompt.clone();
        let ended = if *target == 0 {
            ids.push(refuse);
            let enc = base
                .tokenizer
                .encode(refusal_reply(r, i), false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            ids.extend_from_slice(enc.get_ids());
            true
        } else {
            ids.push(respond);
            let reply = replies.next().expect("every answered prompt has a reply");
            ids.extend(reply.tokens.iter().map(|t| t.id));
            // A reply cut at the length limit is trained without an end token.
            reply.stop == StopReason::EndOfTurn
        };
        if ended {
            ids.extend(end);
        }
        out.push(Example { ids, reply_start });
    }
    Ok(out)
}
