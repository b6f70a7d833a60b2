//! KV-cached generation with interventions on every token, streamed and cancellable.

use std::time::Instant;

use candle_core::{Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::hooks::HookSpec;
use crate::model::tokenizer::StreamDecoder;
use crate::model::{ForwardOptions, KvCache, LogitsAt, Weights};
use crate::refusal::RefusalGate;
use crate::{Error, LoadedModel, Result};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus sampling mass (1 = off).
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Which weights generation runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Precision {
    /// Every prompt pass on the dense f32 weights, every later token on the fast quantised
    /// path when the model has one. The first reply token is where the model decides to
    /// refuse (the gate, `P(R)`, the refusal score): computed exactly, it is the same on every
    /// CPU and equals what the analyses read. After `[respond]` the respond blocks' own pass
    /// over the prompt is exact too (and on an AVX2-only CPU 2.5× faster than the quantised
    /// one). The fast path's kernels differ between CPU classes (VNNI vs AVX2), so the
    /// single-token steps may differ between them.
    #[default]
    Fast,
    /// Every token on the dense f32 weights (bit-for-bit the analysis path).
    Exact,
}

#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Interventions applied on the prompt and every generated token.
    pub hooks: HookSpec,
    pub precision: Precision,
    pub refusal_gate: Option<RefusalGate>,
    /// For models without refusal tokens: a logit bias on these tokens (the refusal-opener
    /// set) at the first reply position only, the same control as τ (b = −logit(τ) makes
    /// the first token a refusal opener exactly when `P(R) ≥ τ`, greedy aside).
    pub first_token_bias: Option<(Vec<u32>, f32)>,
    /// Read this refusal signal at the first reply position into
    /// [`Generation::refusal_probability`] (the gate reports its own `p([refuse])` anyway).
    pub refusal_signal: Option<crate::refusal::RefusalSignal>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            max_new_tokens: 128,
            sampling: Sampling::default(),
            hooks: HookSpec::default(),
            precision: Precision::Fast,
            refusal_gate: None,
            first_token_bias: None,
            refusal_signal: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenStep {
    /// Index in the reply (0 = first reply token).
    pub index: usize,
    pub id: u32,
    /// The text this token completes (empty while a multi-byte character is unfinished).
    pub text: String,
    /// Log-probability of this token under the (intervened) model at temperature 1.
    pub logprob: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    EndOfTurn,
    MaxTokens,
    ContextFull,
    Cancelled,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub tokens: Vec<TokenStep>,
    pub text: String,
    pub stop: StopReason,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// `p([refuse])` at the first reply position, when a refusal gate was set.
    pub refusal_probability: Option<f32>,
}

impl Generation {
    /// Nothing generated yet after a prompt of `prompt_tokens`.
    fn new(prompt_tokens: usize) -> Self {
        Generation {
            prompt_tokens,
            tokens: Vec::new(),
            text: String::new(),
            stop: StopReason::MaxTokens,
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
            refusal_probability: None,
        }
    }

    /// Continues this reply with `rest`, decoded after it.
    fn append(&mut self, rest: Generation) {
        let offset = self.tokens.len();
        self.tokens.extend(rest.tokens.into_iter().map(|mut t| {
            t.index += offset;
            t
        }));
        self.text.push_str(&rest.text);
        self.stop = rest.stop;
        self.decode_seconds += rest.prefill_seconds + rest.decode_seconds;
    }

    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds.max(1e-9)
    }

    /// Tokens per second after the first (the first comes from the prefill).
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_seconds.max(1e-9)
    }
}

/// Which prompt pass of a reply: the model reading the prompt to decide its first token, or
/// (models with refusal tokens) the respond blocks reading it afresh after `[respond]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PassKind {
    Prompt,
    Respond,
}

/// The state after a prompt pass: its keys and values and the last position's logits, all a
/// reply needs to go on from there.
#[derive(Debug, Clone)]
pub struct PromptPass {
    cache: KvCache,
    /// `[vocab]`, after the hooks' logit edits.
    logits: Tensor,
}

impl PromptPass {
    /// Bytes held (keys, values and logits, f32).
    pub fn bytes(&self) -> usize {
        (self.cache.elem_count() + self.logits.elem_count()) * 4
    }
}

/// Prompt passes kept between replies. A reply asks for each pass it needs and hands over the
/// ones it had to compute; the caller guarantees that whatever it returns was made for the
/// same model, prompt and hooks (e.g. by keying its store on them), so a reply that reuses a
/// pass is exactly the reply that computes it.
pub trait PromptPasses {
    fn get(&mut self, kind: PassKind) -> Option<PromptPass>;
    fn put(&mut self, kind: PassKind, pass: &PromptPass);
}

/// No passes kept: every reply computes its own.
pub struct NoPasses;

impl PromptPasses for NoPasses {
    fn get(&mut self, _: PassKind) -> Option<PromptPass> {
        None
    }
    fn put(&mut self, _: PassKind, _: &PromptPass) {}
}

/// Generates a reply to `prompt` (already templated token ids). `on_token` sees each token as
/// it is produced; `cancelled` is polled before every forward pass.
pub fn generate(
    lm: &LoadedModel,
    prompt: &[u32],
    cfg: &GenerateConfig,
    cancelled: &dyn Fn() -> bool,
    on_token: &mut dyn FnMut(&TokenStep),
) -> Result<Generation> {
    generate_with(lm, prompt, cfg, &mut NoPasses, cancelled, on_token)
}

/// [`generate`], taking its prompt passes from `passes` when it has them and giving it the
/// ones it computes.
pub fn generate_with(
    lm: &LoadedModel,
    prompt: &[u32],
    cfg: &GenerateConfig,
    passes: &mut dyn PromptPasses,
    cancelled: &dyn Fn() -> bool,
    on_token: &mut dyn FnMut(&TokenStep),
) -> Result<Generation> {
    let model = &lm.model;
    let context = model.config.context_length;
    if prompt.is_empty() {
        return Err(Error::InvalidInput("the prompt has no tokens".into()));
    }
    if prompt.len() >= context {
        return Err(Error::ContextOverflow {
            len: prompt.len(),
            max: context,
        });
    }
    // Prompt passes are always exact (see `Precision::Fast`): the first reply token, and the
    // respond blocks' first answer token, are the same on every CPU. Single-token steps run
    // on `decode_weights`.
    let mut decode_weights: &Weights = match cfg.precision {
        Precision::Fast => model.generation_weights(),
        Precision::Exact => &model.dense,
    };
    let respond_weights = cfg.refusal_gate.and(lm.respond_weights());
    let mut prompt_weights = &model.dense;
    let mut rng = StdRng::seed_from_u64(cfg.sampling.seed);
    let mut cache = KvCache::new(model.config.n_layers);
    let mut decoder = StreamDecoder::default();
    let mut out = Generation::new(prompt.len());
    let forbidden: Vec<u32> = cfg
        .refusal_gate
        .map(|g| vec![g.refuse, g.respond])
        .unwrap_or_default();
    let mut input = prompt.to_vec();
    // The pass the next step is, while it reads the whole prompt.
    let mut pass = Some(PassKind::Prompt);
    let started = Instant::now();
    for index in 0..cfg.max_new_tokens {
        if cancelled() {
            out.stop = StopReason::Cancelled;
            break;
        }
        if cache.len() + input.len() > context {
            out.stop = StopReason::ContextFull;
            break;
        }
        let kept = pass.and_then(|kind| passes.get(kind));
        let logits = match kept {
            Some(kept) => {
                cache = kept.cache;
                kept.logits
            }
            None => {
                let tokens = Tensor::new(input.as_slice(), model.device())?.unsqueeze(0)?;
                let weights = if pass.is_some() {
                    prompt_weights
                } else {
                    decode_weights
                };
                // A long prompt's pass stops between blocks once cancelled (the cache is then
                // half-written, but nothing reads it again).
                let fwd = match model.forward(
                    weights,
                    &tokens,
                    Some(&mut cache),
                    &cfg.hooks,
                    LogitsAt::Last,
                    ForwardOptions::default().cancellable(cancelled),
                ) {
                    Err(Error::Cancelled) => {
                        out.stop = StopReason::Cancelled;
                        break;
                    }
                    fwd => fwd?,
                };
                let logits = fwd
                    .logits
                    .expect("LogitsAt::Last yields logits")
                    .flatten_all()?;
                if let Some(kind) = pass {
                    passes.put(
                        kind,
                        &PromptPass {
                            cache: cache.clone(),
                            logits: logits.clone(),
                        },
                    );
                }
                logits
            }
        };
        pass = None;
        let (id, logprob) = match (index, cfg.refusal_gate) {
            (0, Some(gate)) => {
                let (id, logprob, p) = gate.first_token(&logits)?;
                out.refusal_probability = Some(p);
                (id, logprob)
            }
            (0, None) => {
                if let Some(signal) = &cfg.refusal_signal {
                    let logprobs =
                        candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec1::<f32>()?;
                    out.refusal_probability = Some(signal.probability(&logprobs));
                }
                match &cfg.first_token_bias {
                    Some((ids, bias)) => {
                        let biased = HookSpec::with_interventions(vec![
                            crate::hooks::Intervention::LogitBias {
                                token_ids: ids.clone(),
                                bias: *bias,
                            },
                        ]);
                        sample(
                            &biased.logits(logits.unsqueeze(0)?)?.squeeze(0)?,
                            &cfg.sampling,
                            &[],
                            &mut rng,
                        )?
                    }
                    None => sample(&logits, &cfg.sampling, &[], &mut rng)?,
                }
            }
            _ => sample(&logits, &cfg.sampling, &forbidden, &mut rng)?,
        };
        if index == 0 {
            out.prefill_seconds = started.elapsed().as_secs_f64();
        }
        if lm.stop_ids.contains(&id) {
            out.stop = StopReason::EndOfTurn;
            break;
        }
        let text = decoder.push(&lm.tokenizer, id)?;
        out.text.push_str(&text);
        let step = TokenStep {
            index,
            id,
            text,
            logprob,
        };
        on_token(&step);
        out.tokens.push(step);
        input = vec![id];
        if let (0, Some(gate), Some((dense, fast))) = (index, cfg.refusal_gate, &respond_weights) {
            if id == gate.respond {
                // The answer is the respond blocks' own: they read the prompt afresh, without
                // the `[respond]` token they never saw.
                prompt_weights = dense;
                decode_weights = match cfg.precision {
                    Precision::Fast => fast,
                    Precision::Exact => dense,
                };
                cache = KvCache::new(model.config.n_layers);
                input = prompt.to_vec();
                pass = Some(PassKind::Respond);
            }
        }
    }
    out.decode_seconds = (started.elapsed().as_secs_f64() - out.prefill_seconds).max(0.0);
    Ok(out)
}

/// Prompts decoded together by [`greedy_replies`]: enough to read each weight once for many
/// tokens, few enough that a batch's logits (`[b, vocab]`) stay small.
const REPLY_BATCH: usize = 16;

/// Greedy replies to many prompts on the exact weights, optionally through a refusal gate:
/// the same tokens as [`generate`] with [`Precision::Exact`] (up to float rounding: a batch
/// sums in another order than one prompt), much faster. Prompts of the same length are decoded
/// together: no padding, so every row attends to exactly its own tokens at its own positions,
/// and each step reads the f32 weights once for the whole batch instead of once per prompt
/// (which is what bounds single-prompt decoding on a CPU). For training targets and held-out
/// replies: deterministic, and the same on every CPU up to float rounding. `progress` sees the
/// number of prompts done.
pub fn greedy_replies(
    lm: &LoadedModel,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    gate: Option<RefusalGate>,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Generation>> {
    let dense = &lm.model.dense;
    let (Some(gate), Some((respond, _))) = (gate, lm.respond_weights()) else {
        return decode_greedy(
            lm,
            dense,
            prompts,
            max_new_tokens,
            gate.map(GateRole::Decide),
            cancelled,
            progress,
        );
    };
    // As `generate` does: the gate decides and `[refuse]` replies continue on the model's own
    // blocks in the same pass; `[respond]` rows stop there and the respond blocks write their
    // answers from the bare prompt.
    let mut out = decode_greedy(
        lm,
        dense,
        prompts,
        max_new_tokens,
        Some(GateRole::HandOff(gate)),
        cancelled,
        &mut |_, _| {},
    )?;
    let answered: Vec<usize> = (0..prompts.len())
        .filter(|&i| {
            max_new_tokens > 1 && out[i].tokens.first().map(|t| t.id) == Some(gate.respond)
        })
        .collect();
    let done = prompts.len() - answered.len();
    progress(done, prompts.len());
    let inputs: Vec<Vec<u32>> = answered.iter().map(|&i| prompts[i].clone()).collect();
    let answers = decode_greedy(
        lm,
        &respond,
        &inputs,
        max_new_tokens - 1,
        Some(GateRole::Continue(gate)),
        cancelled,
        &mut |d, _| progress(done + d, prompts.len()),
    )?;
    for (i, answer) in answered.into_iter().zip(answers) {
        out[i].append(answer);
    }
    Ok(out)
}

/// What a refusal gate does in [`decode_greedy`].
#[derive(Clone, Copy)]
enum GateRole {
    /// Picks the first token; neither gate token appears later.
    Decide(RefusalGate),
    /// Picks the first token; rows that chose `[respond]` stop there (their answer is written
    /// by other weights), the others go on without either gate token.
    HandOff(RefusalGate),
    /// The decision was made before this decode: neither gate token appears at all.
    Continue(RefusalGate),
}

/// The batched greedy decoding of [`greedy_replies`] on `weights`.
fn decode_greedy(
    lm: &LoadedModel,
    weights: &Weights,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    gate: Option<GateRole>,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Generation>> {
    let model = &lm.model;
    let context = model.config.context_length;
    let mut by_length: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::InvalidInput(format!("prompt {i} has no tokens")));
        }
        if p.len() >= context {
            return Err(Error::ContextOverflow {
                len: p.len(),
                max: context,
            });
        }
        by_length.entry(p.len()).or_default().push(i);
    }
    let mut out: Vec<Generation> = prompts.iter().map(|p| Generation::new(p.len())).collect();
    let hand_off = matches!(gate, Some(GateRole::HandOff(_)));
    let (deciding, forbidden) = match gate {
        Some(GateRole::Decide(g) | GateRole::HandOff(g)) => (Some(g), vec![g.refuse, g.respond]),
        Some(GateRole::Continue(g)) => (None, vec![g.refuse, g.respond]),
        None => (None, Vec::new()),
    };
    let greedy = Sampling::default();
    let mut rng = StdRng::seed_from_u64(0); // greedy sampling never draws from it
    let mut done = 0;
    for (len, group) in by_length {
        for rows in group.chunks(REPLY_BATCH) {
            let mut cache = KvCache::new(model.config.n_layers);
            let mut decoders = vec![StreamDecoder::default(); rows.len()];
            let mut active = vec![true; rows.len()];
            let mut input: Vec<u32> = rows.iter().flat_map(|&i| prompts[i].clone()).collect();
            let mut width = len;
            for index in 0..max_new_tokens {
                if cancelled() {
                    return Err(Error::Cancelled);
                }
                if len + index > context {
                    for (r, &i) in rows.iter().enumerate() {
                        if active[r] {
                            out[i].stop = StopReason::ContextFull;
                        }
                    }
                    break;
                }
                let tokens = Tensor::from_vec(input, (rows.len(), width), model.device())?;
                let logits = model
                    .forward(
                        weights,
                        &tokens,
                        Some(&mut cache),
                        &HookSpec::default(),
                        LogitsAt::Last,
                        ForwardOptions::default(),
                    )?
                    .logits
                    .expect("LogitsAt::Last yields logits")
                    .squeeze(1)?;
                input = Vec::with_capacity(rows.len());
                for (r, &i) in rows.iter().enumerate() {
                    if !active[r] {
                        // A finished row keeps running (its tokens are never read), so the
                        // batch keeps one shape.
                        input.push(0);
                        continue;
                    }
                    let logits = logits.get(r)?;
                    let (id, logprob) = match (index, deciding) {
                        (0, Some(gate)) => {
                            let (id, logprob, p) = gate.first_token(&logits)?;
                            out[i].refusal_probability = Some(p);
                            (id, logprob)
                        }
                        _ => sample(&logits, &greedy, &forbidden, &mut rng)?,
                    };
                    input.push(id);
                    if lm.stop_ids.contains(&id) {
                        active[r] = false;
                        out[i].stop = StopReason::EndOfTurn;
                        continue;
                    }
                    let text = decoders[r].push(&lm.tokenizer, id)?;
                    out[i].text.push_str(&text);
                    out[i].tokens.push(TokenStep {
                        index,
                        id,
                        text,
                        logprob,
                    });
                    if hand_off && index == 0 && deciding.is_some_and(|g| g.respond == id) {
                        active[r] = false;
                    }
                }
                width = 1;
                if !active.contains(&true) {
                    break;
                }
            }
            done += rows.len();
            progress(done, prompts.len());
        }
    }
    Ok(out)
}

/// Picks the next token from `[vocab]` logits, never one of `forbidden`; returns it with its
/// log-probability at T = 1.
fn sample(
    logits: &Tensor,
    s: &Sampling,
    forbidden: &[u32],
    rng: &mut StdRng,
) -> Result<(u32, f32)> {
    let mut logprobs = candle_nn::ops::log_softmax(logits, D::Minus1)?.to_vec1::<f32>()?;
    for &f in forbidden {
        if let Some(lp) = logprobs.get_mut(f as usize) {
            *lp = f32::NEG_INFINITY;
        }
    }
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 {
                    (i, x)
                } else {
                    best
                }
            })
            .0
    };
    if s.temperature <= 0.0 {
        let id = argmax(&logprobs);
        return Ok((id as u32, logprobs[id]));
    }
    // Tempered distribution, then the smallest set of tokens holding `top_p` of the mass.
    let mut probs: Vec<(usize, f64)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &lp)| (i, (lp as f64 / s.temperature)))
        .collect();
    let max = probs.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let mut total = 0.0;
    for p in probs.iter_mut() {
        p.1 = (p.1 - max).exp();
        total += p.1;
    }
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top_p = s.top_p.clamp(1e-6, 1.0);
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= top_p {
            cut = i + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f64>() * mass;
    for &(i, p) in &probs {
        r -= p;
        if r <= 0.0 {
            return Ok((i as u32, logprobs[i]));
        }
    }
    let last = probs.last().map_or(argmax(&logprobs), |p| p.0);
    Ok((last as u32, logprobs[last]))
}
