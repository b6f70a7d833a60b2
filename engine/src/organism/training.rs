//! Training refusal tokens: build the examples, fit the rows, then LoRA with AdamW on the f32
//! forward pass.

use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::adapter::{lora_name, model_sha256, Adapter, AdapterMeta, LORA_TARGETS};
use super::examples::{build_examples, Example};
use super::row_fit::fit_token_rows;
use crate::data::prompts::{Label, PromptRecord};
use crate::hooks::{HookPoint, HookSpec};
use crate::model::{ForwardOptions, Linear, LogitsAt, Weights};
use crate::refusal::{REFUSE_TOKEN, RESPOND_TOKEN};
use crate::run::batch::first_positions;
use crate::{Error, LoadedModel, Progress, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    /// AdamW steps for the token rows (full batch).
    pub row_steps: usize,
    pub row_lr: f64,
    pub seed: u64,
    /// LoRA epochs (0 = rows only).
    pub epochs: usize,
    pub rank: usize,
    pub alpha: f64,
    pub lr: f64,
    /// Prompts per optimiser step.
    pub batch: usize,
    pub warmup_steps: usize,
    /// Loss weight of the first reply token (the decision).
    pub first_token_weight: f32,
    /// Scale each class's decision weight by `n / (2·n_class)` so `[refuse]` and `[respond]`
    /// examples weigh the same in total however many borderline prompts the set has. Absent
    /// (false) in adapters trained before it existed.
    #[serde(default)]
    pub balance_classes: bool,
    /// Label smoothing of the decision: the first token's target puts this much probability on
    /// the other refusal token, so `p([refuse])` stays graded and τ has something to trade.
    #[serde(default)]
    pub decision_smoothing: f32,
    /// Length of the base model's self-distilled replies to harmless prompts.
    pub reply_tokens: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            row_steps: 150,
            row_lr: 0.02,
            seed: 0,
            epochs: 3,
            rank: 8,
            alpha: 16.0,
            lr: 1e-3,
            batch: 8,
            warmup_steps: 10,
            first_token_weight: 10.0,
            balance_classes: true,
            decision_smoothing: 0.0,
            reply_tokens: 32,
        }
    }
}

/// Training targets: harmful → `[refuse]` (0), harmless (incl. borderline) → `[respond]` (1).
pub fn target_of(r: &PromptRecord) -> Option<u32> {
    match r.label? {
        Label::Harmful => Some(0),
        Label::Harmless => Some(1),
    }
}

/// The labelled records of `train` with their targets, once the inputs are checked.
fn labelled_examples<'a>(
    base: &LoadedModel,
    train: &'a [PromptRecord],
    opts: &TrainOptions,
) -> Result<Vec<(&'a PromptRecord, u32)>> {
    let labelled: Vec<(&PromptRecord, u32)> = train
        .iter()
        .filter_map(|r| target_of(r).map(|t| (r, t)))
        .collect();
    if !labelled.iter().any(|(_, t)| *t == 0) || !labelled.iter().any(|(_, t)| *t == 1) {
        return Err(Error::InvalidInput(
            "training needs labelled harmful and harmless prompts".into(),
        ));
    }
    if !(0.0..0.5).contains(&opts.decision_smoothing) {
        return Err(Error::InvalidInput(format!(
            "decision smoothing must be in [0, 0.5), not {}",
            opts.decision_smoothing
        )));
    }
    if base.tokenizer.token_to_id(REFUSE_TOKEN).is_some() {
        return Err(Error::InvalidInput(
            "the model already has refusal tokens; train on its base model".into(),
        ));
    }
    Ok(labelled)
}

/// SHA-256 of the training prompts and their targets, in order.
fn data_sha256(labelled: &[(&PromptRecord, u32)]) -> String {
    let mut data = Sha256::new();
    for (r, t) in labelled {
        data.update(r.prompt.as_bytes());
        data.update([*t as u8, b'\n']);
    }
    format!("{:x}", data.finalize())
}

/// Fits the refusal tokens on `train` (records with labels). `progress` sees every phase.
pub fn train_refusal_tokens(
    base: &LoadedModel,
    train: &[PromptRecord],
    opts: &TrainOptions,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Adapter> {
    let started = Instant::now();
    let labelled = labelled_examples(base, train, opts)?;
    let ids: Vec<Vec<u32>> = labelled
        .iter()
        .map(|(r, _)| base.chat_prompt(None, &r.prompt).map(|p| p.ids))
        .collect::<Result<_>>()?;
    let total = ids.len();
    let states = first_positions(
        base,
        &base.model.dense,
        &ids,
        &HookSpec::default(),
        cancelled,
        &mut |i, n| {
            progress(&Progress {
                phase: "reading t_post states".into(),
                done: i,
                total: n,
                loss: None,
                tokens_per_second: None,
            })
        },
    )?;
    let normalized = Tensor::stack(
        &states
            .iter()
            .map(|s| s.unembed_in.clone())
            .collect::<Vec<_>>(),
        0,
    )?;
    let lse = Tensor::from_vec(
        states.iter().map(|s| s.logsumexp).collect::<Vec<_>>(),
        total,
        normalized.device(),
    )?;
    let targets: Vec<u32> = labelled.iter().map(|(_, t)| *t).collect();
    // Start both rows at the mean embedding: a neutral token the model has no opinion on.
    let mean = base.model.dense.embed.dense()?.mean_keepdim(0)?;
    let init = Tensor::cat(&[&mean, &mean], 0)?;
    let fit = fit_token_rows(
        &normalized,
        &lse,
        &targets,
        &init,
        base.model.config.final_softcap,
        opts.row_steps,
        opts.row_lr,
    )?;
    progress(&Progress {
        phase: "fitting token rows".into(),
        done: opts.row_steps,
        total: opts.row_steps,
        loss: fit.losses.last().copied(),
        tokens_per_second: None,
    });

    let (input_rows, rows, lora, lora_losses, lora_tps) = if opts.epochs > 0 {
        let examples = build_examples(base, &labelled, &ids, opts, cancelled, progress)?;
        train_lora(base, &examples, &init, &fit.rows, opts, cancelled, progress)?
    } else {
        (
            init.clone(),
            fit.rows.clone(),
            Default::default(),
            Vec::new(),
            0.0,
        )
    };

    let meta = AdapterMeta {
        tokens: vec![REFUSE_TOKEN.into(), RESPOND_TOKEN.into()],
        base_model: base.card.name.clone(),
        base_model_sha256: model_sha256(&base.card.path).unwrap_or_default(),
        data_sha256: data_sha256(&labelled),
        train_prompts: total,
        options: opts.clone(),
        losses: fit.losses,
        lora_losses,
        lora_tokens_per_second: lora_tps,
        seconds: started.elapsed().as_secs_f64(),
        metrics: serde_json::Value::Null,
        tau: None,
        tau_goal: None,
        created_by: format!("refusal-lens {}", env!("CARGO_PKG_VERSION")),
    };
    Ok(Adapter {
        rows: rows.to_dtype(DType::F32)?,
        input_rows: Some(input_rows),
        lora,
        meta,
    })
}

type LoraResult = (
    Tensor,
    Tensor,
    std::collections::BTreeMap<String, Tensor>,
    Vec<f32>,
    f64,
);

/// LoRA factors for q, k, v and o of every block: A uniform(±1/√in) from the seed, B zeros,
/// so training starts at the base model.
fn init_lora(
    dense: &Weights,
    rank: usize,
    rng: &mut rand::rngs::StdRng,
) -> Result<Vec<[(candle_core::Var, candle_core::Var); 4]>> {
    use candle_core::Var;
    use rand::Rng;
    let dev = &dense.embed.device();
    let mut make = |lin: &Linear| -> Result<(Var, Var)> {
        let (out, inp) = lin.dims()?;
        let bound = 1.0 / (inp as f32).sqrt();
        let a: Vec<f32> = (0..rank * inp)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (rank, inp), dev)?)?;
        let b = Var::from_tensor(&Tensor::zeros((out, rank), DType::F32, dev)?)?;
        Ok((a, b))
    };
    dense
        .blocks
        .iter()
        .map(|block| {
            Ok([
                make(&block.q)?,
                make(&block.k)?,
                make(&block.v)?,
                make(&block.o)?,
            ])
        })
        .collect()
}

/// Linear warm-up over `warmup` steps, then linear decay to zero at `total`.
fn learning_rate(peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        peak * (step + 1) as f64 / warmup as f64
    } else {
        peak * (total - step) as f64 / (total - warmup) as f64
    }
}

fn train_lora(
    base: &LoadedModel,
    examples: &[Example],
    init_input_rows: &Tensor,
    init_rows: &Tensor,
    opts: &TrainOptions,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<LoraResult> {
    use candle_core::Var;
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    use rand::seq::SliceRandom;
    use rand::SeedableRng;

    let model = &base.model;
    let cfg = &model.config;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let rows = Var::from_tensor(init_rows)?;
    let input_rows = Var::from_tensor(init_input_rows)?;
    let lora = init_lora(&model.dense, opts.rank, &mut rng)?;
    let mut vars = vec![rows.clone(), input_rows.clone()];
    vars.extend(
        lora.iter()
            .flatten()
            .flat_map(|(a, b)| [a.clone(), b.clone()]),
    );
    let scale = opts.alpha / opts.rank as f64;
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: opts.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let batch = opts.batch.max(1);
    let total_steps = examples.len().div_ceil(batch) * opts.epochs;
    let warmup = opts.warmup_steps.min(total_steps.saturating_sub(1));
    let decision = |ex: &Example| ex.ids[ex.reply_start] as usize - cfg.vocab_size;
    let n_refuse = examples.iter().filter(|ex| decision(ex) == 0).count();
    let class_weight = if opts.balance_classes {
        balanced_class_weights(n_refuse, examples.len() - n_refuse)
    } else {
        [1.0; 2]
    };
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let mut losses = Vec::with_capacity(total_steps);
    let (mut tokens_seen, started) = (0usize, Instant::now());
    let mut step = 0;
    for _epoch in 0..opts.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(batch) {
            if cancelled() {
                return Err(Error::Cancelled);
            }
            opt.set_learning_rate(learning_rate(opts.lr, step, warmup, total_steps));
            let weights = lora_weights(&model.dense, &lora, scale)?;
            let mut total_loss: Option<Tensor> = None;
            let mut total_weight = 0f32;
            for &i in chunk {
                let (loss, weight) = example_loss(
                    base,
                    &weights,
                    input_rows.as_tensor(),
                    rows.as_tensor(),
                    &examples[i],
                    opts.first_token_weight * class_weight[decision(&examples[i])],
                    opts.decision_smoothing,
                )?;
                total_weight += weight;
                tokens_seen += examples[i].ids.len();
                total_loss = Some(match total_loss {
                    Some(t) => (t + loss)?,
                    None => loss,
                });
            }
            let loss = (total_loss.expect("a chunk is never empty") / total_weight as f64)?;
            opt.backward_step(&loss)?;
            let value = loss.to_scalar::<f32>()?;
            losses.push(value);
            step += 1;
            let tps = tokens_seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
            progress(&Progress {
                phase: "training LoRA".into(),
                done: step,
                total: total_steps,
                loss: Some(value),
                tokens_per_second: Some(tps),
            });
        }
    }
    let tps = tokens_seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let mut tensors = std::collections::BTreeMap::new();
    for (l, targets) in lora.iter().enumerate() {
        for (name, (a, b)) in LORA_TARGETS.iter().zip(targets) {
            tensors.insert(lora_name(l, name, "a"), a.as_tensor().detach());
            tensors.insert(lora_name(l, name, "b"), b.as_tensor().detach());
        }
    }
    Ok((
        input_rows.as_tensor().detach(),
        rows.as_tensor().detach(),
        tensors,
        losses,
        tps,
    ))
}

/// Weights `[w_refuse, w_respond]` under which both classes weigh the same in total and the
/// mean weight per example stays 1: `w_c = n / (2·n_c)`.
pub fn balanced_class_weights(n_refuse: usize, n_respond: usize) -> [f32; 2] {
    let n = (n_refuse + n_respond) as f32;
    [n_refuse, n_respond].map(|n_c| n / (2 * n_c.max(1)) as f32)
}

type LoraVars = [(candle_core::Var, candle_core::Var); 4];

/// The dense weights, frozen, with LoRA on q, k, v, o. The token rows stay outside (see
/// `example_loss`) so that no gradient is ever formed for the 49k-row embedding.
fn lora_weights(dense: &Weights, lora: &[LoraVars], scale: f64) -> Result<Weights> {
    let freeze = |lin: &Linear| lin.frozen();
    let wrap = |lin: &Linear, (a, b): &(candle_core::Var, candle_core::Var)| -> Result<Linear> {
        Ok(Linear::LoRA {
            base: Box::new(freeze(lin)?),
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale,
        })
    };
    let blocks = dense
        .blocks
        .iter()
        .zip(lora)
        .map(|(bw, [q, k, v, o])| {
            let mut bw = bw.clone();
            bw.q = wrap(&bw.q, q)?;
            bw.k = wrap(&bw.k, k)?;
            bw.v = wrap(&bw.v, v)?;
            bw.o = wrap(&bw.o, o)?;
            bw.gate = freeze(&bw.gate)?;
            bw.up = freeze(&bw.up)?;
            bw.down = freeze(&bw.down)?;
            Ok(bw)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Weights {
        embed: dense.embed.clone(),
        blocks,
        final_norm: dense.final_norm.clone(),
        lm_head: freeze(&dense.lm_head)?,
    })
}

/// Weighted cross-entropy of an example's reply tokens (the first weighted, its target smoothed
/// towards the other refusal token by `smoothing`), and the weight sum.
/// The decision token (id ≥ the base vocabulary) enters as base token 0 whose embedding is
/// replaced by its input row through the `hook_embed` point; its logit is `h · output row`.
fn example_loss(
    lm: &LoadedModel,
    weights: &Weights,
    input_rows: &Tensor,
    rows: &Tensor,
    ex: &Example,
    first_weight: f32,
    smoothing: f32,
) -> Result<(Tensor, f32)> {
    let model = &lm.model;
    let dev = model.device();
    let vocab = model.config.vocab_size as u32;
    let n = ex.ids.len();
    let mut ids = ex.ids.clone();
    let decision = ids[ex.reply_start].checked_sub(vocab).ok_or_else(|| {
        Error::InvalidInput("a training reply must start with a refusal token".into())
    })? as usize;
    ids[ex.reply_start] = 0;
    let zero = Tensor::new(&[0u32], dev)?;
    let row_delta = (input_rows.get(decision)? - model.dense.embed.lookup(&zero)?.squeeze(0)?)?;
    // hook_embed holds the embedding × √d on families that scale it (Gemma).
    let embed_scale = if model.config.scale_embeddings {
        (model.config.d_model as f64).sqrt()
    } else {
        1.0
    };
    let mut spec = HookSpec::with_interventions(vec![crate::hooks::Intervention::AddVector {
        point: HookPoint::Embed,
        vector: row_delta,
        scale: embed_scale,
        positions: crate::hooks::Positions::Range {
            start: ex.reply_start,
            end: ex.reply_start + 1,
        },
    }]);
    spec.capture.insert(HookPoint::UnembedIn);
    let tokens = Tensor::new(ids.as_slice(), dev)?.unsqueeze(0)?;
    let fwd = model.forward(
        weights,
        &tokens,
        None,
        &spec,
        LogitsAt::None,
        ForwardOptions::differentiable(),
    )?;
    let normed = fwd
        .captures
        .get(HookPoint::UnembedIn)?
        .expect("captured")
        .squeeze(0)?;
    // Positions reply_start−1 … n−2 predict tokens reply_start … n−1.
    let count = n - ex.reply_start;
    let h = normed.narrow(0, ex.reply_start - 1, count)?;
    // Decoding forbids the refusal tokens after the first reply position (RefusalGate), so the
    // loss does too; otherwise the large decision rows would swamp every later softmax.
    let n_new = rows.dim(0)?;
    let mask: Vec<f32> = (0..count * n_new)
        .map(|i| if i < n_new { 0.0 } else { -1e9 })
        .collect();
    let cap = model.config.final_softcap;
    let new_logits = crate::model::softcap(h.matmul(&rows.t()?)?, cap)?
        .broadcast_add(&Tensor::from_vec(mask, (count, n_new), dev)?)?;
    let base_logits = crate::model::softcap(weights.lm_head.forward(&h)?, cap)?;
    let logits = Tensor::cat(&[&base_logits, &new_logits], 1)?;
    let logprobs = candle_nn::ops::log_softmax(&logits, 1)?;
    let targets = Tensor::new(&ex.ids[ex.reply_start..], dev)?.unsqueeze(1)?;
    let mut picked = logprobs.gather(&targets, 1)?.squeeze(1)?;
    if smoothing > 0.0 {
        // The decision's target: 1 − ε on its token, ε on the other refusal token.
        let other = (vocab as usize + (1 - decision)) as u32;
        let first = logprobs.get(0)?;
        let smoothed = ((first.get(ex.ids[ex.reply_start] as usize)? * (1.0 - smoothing as f64))?
            + (first.get(other as usize)? * smoothing as f64)?)?;
        picked = Tensor::cat(
            &[&smoothed.unsqueeze(0)?, &picked.narrow(0, 1, count - 1)?],
            0,
        )?;
    }
    let w: Vec<f32> = (0..count)
        .map(|i| if i == 0 { first_weight } else { 1.0 })
        .collect();
    let total: f32 = w.iter().sum();
    let w = Tensor::from_vec(w, count, dev)?;
    Ok(((picked * w)?.sum_all()?.neg()?, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Family;
    use crate::testing::tiny_model;

    #[test]
    fn balanced_class_weights_give_both_classes_equal_total_weight() {
        let [w_refuse, w_respond] = balanced_class_weights(160, 272);
        assert!((160.0 * w_refuse - 272.0 * w_respond).abs() < 1e-3);
        assert!((160.0 * w_refuse + 272.0 * w_respond - 432.0).abs() < 1e-3);
        assert_eq!(balanced_class_weights(5, 5), [1.0, 1.0]);
    }

    /// The training forward (frozen weights, LoRA with B = 0, rows outside the vocabulary) gives
    /// the same loss as the inference model with the rows added.
    #[test]
    fn training_loss_at_init_equals_the_inference_models_loss() {
        for family in [Family::Llama, Family::Qwen2] {
            let base = tiny_model(family, 31).unwrap();
            let d = base.model.config.d_model;
            let dev = base.model.device().clone();
            let rows = Tensor::arange(0f32, 2.0 * d as f32, &dev)
                .unwrap()
                .affine(0.02, 0.1)
                .unwrap()
                .cos()
                .unwrap()
                .reshape((2, d))
                .unwrap();
            let input_rows = (rows.clone() * 0.3).unwrap();
            let v = base.model.config.vocab_size as u32;
            let prompt = base.chat_prompt(None, "hi there").unwrap();
            let mut ids = prompt.ids.clone();
            let reply_start = ids.len();
            ids.extend([v + 1, 104, 105, 33]);
            let ex = Example {
                ids: ids.clone(),
                reply_start,
            };
            let lora: Vec<LoraVars> = base
                .model
                .dense
                .blocks
                .iter()
                .map(|b| {
                    [&b.q, &b.k, &b.v, &b.o].map(|lin| {
                        let (out, inp) = lin.dims().unwrap();
                        let a = candle_core::Var::from_tensor(
                            &Tensor::ones((4, inp), DType::F32, &dev).unwrap(),
                        )
                        .unwrap();
                        let b = candle_core::Var::from_tensor(
                            &Tensor::zeros((out, 4), DType::F32, &dev).unwrap(),
                        )
                        .unwrap();
                        (a, b)
                    })
                })
                .collect();
            let weights = lora_weights(&base.model.dense, &lora, 2.0).unwrap();
            let (loss, w) =
                example_loss(&base, &weights, &input_rows, &rows, &ex, 1.0, 0.0).unwrap();
            assert_eq!(w, 4.0);
            let mut organism = base.clone();
            organism
                .add_tokens_untied(&["[refuse]", "[respond]"], &input_rows, &rows)
                .unwrap();
            let logits = crate::testing::dense_logits(&organism, &ids)
                .squeeze(0)
                .unwrap();
            // After the first reply position the refusal tokens are forbidden.
            let vocab = logits.dim(1).unwrap();
            let lp: Vec<Vec<f32>> = (reply_start..ids.len())
                .map(|p| {
                    let mut row = logits.get(p - 1).unwrap().to_vec1::<f32>().unwrap();
                    if p > reply_start {
                        row[vocab - 2..]
                            .iter_mut()
                            .for_each(|x| *x = f32::NEG_INFINITY);
                    }
                    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
                    row.iter().map(|x| x - lse).collect()
                })
                .collect();
            let want: f32 = (reply_start..ids.len())
                .map(|p| -lp[p - reply_start][ids[p] as usize])
                .sum();
            let got = loss.to_scalar::<f32>().unwrap();
            assert!(
                (got - want).abs() < 1e-3 * want.abs().max(1.0),
                "{family:?}: training loss {got} vs inference {want}"
            );
            // Smoothing moves ε of the decision's target onto the other refusal token
            // ([respond] is the target here, so [refuse] = v gets ε).
            let eps = 0.2;
            let (smoothed, _) =
                example_loss(&base, &weights, &input_rows, &rows, &ex, 1.0, eps).unwrap();
            let first = &lp[0];
            let want_smoothed = want + first[ids[reply_start] as usize]
                - ((1.0 - eps) * first[ids[reply_start] as usize] + eps * first[v as usize]);
            let got = smoothed.to_scalar::<f32>().unwrap();
            assert!(
                (got - want_smoothed).abs() < 1e-3 * want_smoothed.abs().max(1.0),
                "{family:?}: smoothed loss {got} vs {want_smoothed}"
            );
        }
    }
}
