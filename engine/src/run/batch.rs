//! The batched prompt runner: many prompts' forward passes sharing their common prefix's KV
//! cache, right-padded in batches. Directions, probes, DLA, calibration and training read
//! prompt states through it.

use candle_core::{IndexOp, Tensor, D};

use crate::hooks::{Captures, HookPoint, HookSpec};
use crate::model::{ForwardOptions, KvCache, LogitsAt, Weights};
use crate::{Error, LoadedModel, Result};

pub struct FirstPosition {
    /// Log-probabilities over the vocabulary at t_post.
    pub logprobs: Vec<f32>,
    /// log Σ exp(logits) at t_post.
    pub logsumexp: f32,
    /// `unembed.hook_in` at t_post (the final norm's output, weight applied), `[d]`.
    pub unembed_in: Tensor,
}

/// Runs every prompt to its last position, computing the longest token prefix they all share
/// (the chat template's system prompt and header) once and reusing its KV cache.
pub fn first_positions(
    lm: &LoadedModel,
    weights: &Weights,
    prompts: &[Vec<u32>],
    hooks: &HookSpec,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<FirstPosition>> {
    let mut spec = hooks.clone();
    spec.capture.insert(HookPoint::UnembedIn);
    let mut out = Vec::with_capacity(prompts.len());
    for_each_prompt(
        lm,
        weights,
        prompts,
        usize::MAX,
        &spec,
        cancelled,
        progress,
        &mut |pass| {
            let logits = pass.last_logits()?;
            out.push(FirstPosition {
                logprobs: candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec1::<f32>()?,
                logsumexp: logits.log_sum_exp(0)?.to_scalar::<f32>()?,
                unembed_in: pass.last_unembed_in()?,
            });
            Ok(())
        },
    )?;
    Ok(out)
}

/// Prompts run together in one right-padded batch: the shared weights are read once for
/// all of them, which is what bounds a short forward pass on a CPU.
const PROMPT_BATCH: usize = 16;

/// One prompt's part of a batched forward pass (see [`for_each_prompt`]).
pub struct PromptPass<'a> {
    /// The prompt's index in the input.
    pub index: usize,
    /// Absolute position of the first token this pass computed (the shared prefix is cached).
    pub offset: usize,
    /// Tokens this pass computed for the prompt (positions `offset..offset + len`).
    pub len: usize,
    row: usize,
    output: &'a crate::model::ForwardOutput,
}

impl PromptPass<'_> {
    /// The prompt's activation at a per-position `point` (captured by the hook spec),
    /// `[len, …]`: its own positions only, padding removed.
    pub fn capture(&self, point: HookPoint) -> Result<Tensor> {
        let x = self
            .output
            .captures
            .get(point)?
            .ok_or_else(|| Error::InvalidInput(format!("{point} was not captured")))?;
        Ok(x.i(self.row)?.narrow(0, 0, self.len)?)
    }

    /// Every point the spec captures at one of the prompt's positions (counted from
    /// `offset`), each `[1, 1, …]`: an activation cache of that position.
    pub fn captures_at(&self, position: usize) -> Result<Captures> {
        let mut out = Captures::default();
        for point in self.output.captures.points() {
            if point.has_key_axis() || point == HookPoint::UnembedIn {
                continue; // not per position, or (unembed.hook_in) at the last one only
            }
            let x = self.capture(point)?.narrow(0, position, 1)?.unsqueeze(0)?;
            out.push(point, x);
        }
        Ok(out)
    }

    /// `unembed.hook_in` (the final norm's output, input to the unembedding) `[d]` at the
    /// prompt's last token (the only position it is computed at when the spec captures it).
    pub fn last_unembed_in(&self) -> Result<Tensor> {
        let x = self
            .output
            .captures
            .get(HookPoint::UnembedIn)?
            .ok_or_else(|| Error::InvalidInput("unembed.hook_in was not captured".into()))?;
        Ok(x.i((self.row, 0))?)
    }

    /// Logits `[vocab]` at the prompt's last token (computed when the spec captures
    /// `unembed.hook_in`), with the spec's logit interventions applied.
    pub fn last_logits(&self) -> Result<Tensor> {
        self.output
            .logits
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("no logits were computed".into()))?
            .i((self.row, 0))
            .map_err(Into::into)
    }
}

/// The forward pass of each prompt, sharing the KV cache of the longest token prefix common
/// to all of them (at most `max_shared` tokens, so positions the caller reads stay in the
/// part it sees) and batching the rest [`PROMPT_BATCH`] at a time, right-padded: with a
/// causal mask a token never attends to the padding after it, so every prompt's values are
/// those of its own pass. `visit` sees the prompts in order.
#[allow(clippy::too_many_arguments)]
pub fn for_each_prompt(
    lm: &LoadedModel,
    weights: &Weights,
    prompts: &[Vec<u32>],
    max_shared: usize,
    hooks: &HookSpec,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
    visit: &mut dyn FnMut(PromptPass<'_>) -> Result<()>,
) -> Result<()> {
    let model = &lm.model;
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::InvalidInput(format!("prompt {i} has no tokens")));
    }
    let shared = prompts
        .iter()
        .skip(1)
        .fold(
            prompts.first().map_or(0, |p| p.len().saturating_sub(1)),
            |n, p| {
                n.min(
                    p.iter()
                        .zip(&prompts[0])
                        .take_while(|(a, b)| a == b)
                        .count(),
                )
                .min(p.len().saturating_sub(1))
            },
        )
        .min(max_shared);
    let mut prefix = KvCache::new(model.config.n_layers);
    if shared > 0 {
        let t = Tensor::new(&prompts[0][..shared], model.device())?.unsqueeze(0)?;
        model.forward(
            weights,
            &t,
            Some(&mut prefix),
            &HookSpec::with_interventions(hooks.interventions.clone()),
            LogitsAt::None,
            ForwardOptions::default().cancellable(cancelled),
        )?;
    }
    let wants_logits = hooks.wants(HookPoint::UnembedIn);
    let mut done = 0;
    for (chunk_index, chunk) in prompts.chunks(PROMPT_BATCH).enumerate() {
        if cancelled() {
            return Err(Error::Cancelled);
        }
        let lens: Vec<usize> = chunk.iter().map(|p| p.len() - shared).collect();
        let width = lens.iter().copied().max().unwrap_or(1);
        // Pad with each prompt's own last token; the padded positions are never read.
        let mut ids = Vec::with_capacity(chunk.len() * width);
        for p in chunk {
            ids.extend_from_slice(&p[shared..]);
            ids.extend(std::iter::repeat_n(
                p[p.len() - 1],
                width - (p.len() - shared),
            ));
        }
        let t = Tensor::from_vec(ids, (chunk.len(), width), model.device())?;
        let mut cache = prefix.repeat_batch(chunk.len())?;
        let logits_at = if wants_logits {
            LogitsAt::PerRow(lens.iter().map(|l| l - 1).collect())
        } else {
            LogitsAt::None
        };
        let output = model.forward(
            weights,
            &t,
            Some(&mut cache),
            hooks,
            logits_at,
            ForwardOptions::default().cancellable(cancelled),
        )?;
        for (row, &len) in lens.iter().enumerate() {
            visit(PromptPass {
                index: chunk_index * PROMPT_BATCH + row,
                offset: shared,
                len,
                row,
                output: &output,
            })?;
        }
        done += chunk.len();
        progress(done, prompts.len());
    }
    Ok(())
}
