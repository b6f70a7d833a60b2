//! The intervention stack as users edit it (docs/methods.md, "Interventions"): a serialisable list
//! of edits that names directions and heads instead of holding tensors, turned into hooks for
//! one prompt at a time; the reply-inversion judgement; and dose-response sweeps.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::analysis::activations::state_points;
use crate::analysis::directions::Directions;
use crate::hooks::{HeadValue, HookSpec, Intervention, Positions};
use crate::model::chat::ChatPrompt;
use crate::model::{ForwardOptions, LogitsAt};
use crate::refusal::response::{classify, ResponseMode};
use crate::refusal::{log_mass, RefusalGate};
use crate::refusal::{refusal_rate, refusal_score, RefusalSignal};
use crate::run::generate::{generate, GenerateConfig, Precision, Sampling};
use crate::{Error, LoadedModel, Result};

/// Which direction an edit uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// The refusal direction (t_post family; the chosen post-instruction position).
    Refusal,
    /// The harmfulness direction (t_inst).
    Harmfulness,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Refusal => "refusal",
            Direction::Harmfulness => "harmfulness",
        }
    }
}

/// Where activation addition applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum StreamPositions {
    /// Every position, prompt and reply.
    #[default]
    All,
    /// The post-instruction template tokens and every generated token.
    PostInstruction,
}

/// How a head is ablated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HeadAblation {
    /// `z ← 0`.
    Zero,
    /// `z ← factor · z`, equal to scaling the head's attention weights (the cliff code uses
    /// 0.1 to trace and 0.01 to ablate).
    Scale(f32),
    /// `z ←` its mean over a reference set (`[d_h]`).
    Mean(Vec<f32>),
}

fn full_ablation() -> f32 {
    1.0
}

/// One edit of the stack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Edit {
    /// `x_l ← x_l + α · v_l` at each residual state `l` in `layers` (`v_l`: the direction
    /// computed at that layer, unnormalised).
    Add {
        direction: Direction,
        layers: (usize, usize),
        alpha: f32,
        positions: StreamPositions,
    },
    /// Remove `fraction` of the (unit) direction's component from every write into the
    /// residual stream: 1 projects it out, 0 does nothing, above 1 reflects it.
    Ablate {
        direction: Direction,
        #[serde(default = "full_ablation")]
        fraction: f32,
    },
    AblateHead {
        layer: usize,
        head: usize,
        how: HeadAblation,
    },
    /// `logits[t] += bias` for each token.
    LogitBias { tokens: Vec<u32>, bias: f32 },
    /// `logit([refuse]) += bias` on a model with refusal tokens (the gate then reads the
    /// biased `p([refuse])`).
    RefusalTokenBias { bias: f32 },
}

impl Edit {
    /// A one-line description for lists.
    pub fn describe(&self) -> String {
        match self {
            Edit::Add {
                direction,
                layers: (a, b),
                alpha,
                positions,
            } => format!(
                "add {alpha:+.2} × {} at layer{} ({})",
                direction.name(),
                if a == b {
                    format!(" {a}")
                } else {
                    format!("s {a}–{b}")
                },
                match positions {
                    StreamPositions::All => "all positions",
                    StreamPositions::PostInstruction => "post-instruction + reply",
                }
            ),
            Edit::Ablate {
                direction,
                fraction,
            } if *fraction == 1.0 => format!("ablate the {} direction", direction.name()),
            Edit::Ablate {
                direction,
                fraction,
            } => format!(
                "ablate {fraction:.2} of the {} direction's component",
                direction.name()
            ),
            Edit::AblateHead { layer, head, how } => format!(
                "ablate L{layer}.H{head} ({})",
                match how {
                    HeadAblation::Zero => "zero".to_string(),
                    HeadAblation::Scale(f) => format!("attention ×{f}"),
                    HeadAblation::Mean(_) => "mean".to_string(),
                }
            ),
            Edit::LogitBias { tokens, bias } => {
                format!("logit bias {bias:+.1} on {} tokens", tokens.len())
            }
            Edit::RefusalTokenBias { bias } => format!("logit bias {bias:+.1} on [refuse]"),
        }
    }

    pub fn needs_directions(&self) -> bool {
        matches!(self, Edit::Add { .. } | Edit::Ablate { .. })
    }
}

/// The edits in force, applied in order on every forward pass.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Steering {
    pub edits: Vec<Edit>,
}

fn vector(dirs: &Directions, direction: Direction, layer: usize) -> &[f32] {
    match direction {
        Direction::Refusal => dirs.refusal_at(layer, dirs.position),
        Direction::Harmfulness => dirs.harmfulness_at(layer),
    }
}

impl Steering {
    pub fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    /// The hooks for one prompt. Edits touch absolute positions `< limit` only when a limit
    /// is given (the judgement steers the request, not the question after it).
    pub fn hooks(
        &self,
        lm: &LoadedModel,
        dirs: Option<&Directions>,
        prompt: &ChatPrompt,
        limit: Option<usize>,
    ) -> Result<HookSpec> {
        let clip = |p: Positions| clip_positions(p, limit);
        let need_dirs = || -> Result<&Directions> {
            let d = dirs.ok_or_else(|| {
                Error::InvalidInput("this edit needs directions: compute or load them".into())
            })?;
            d.check_fits(lm)?;
            Ok(d)
        };
        let mut out = Vec::new();
        for edit in &self.edits {
            match edit {
                Edit::Add {
                    direction,
                    layers,
                    alpha,
                    positions,
                } => {
                    let from = match positions {
                        StreamPositions::All => Positions::All,
                        StreamPositions::PostInstruction => {
                            Positions::From(prompt.post_instruction.start)
                        }
                    };
                    let d = need_dirs()?;
                    out.extend(addition(lm, d, *direction, *layers, *alpha, clip(from))?);
                }
                Edit::Ablate {
                    direction,
                    fraction,
                } => {
                    let d = need_dirs()?;
                    let v = vector(d, *direction, d.layer);
                    let v = Tensor::from_slice(v, v.len(), lm.model.device())?;
                    let n_layers = lm.model.config.n_layers;
                    let ablate = Intervention::ablate_fraction(&v, n_layers, *fraction as f64)?;
                    out.extend(ablate.into_iter().map(|i| i.map_positions(clip)));
                }
                Edit::AblateHead { layer, head, how } => {
                    out.push(head_ablation(lm, *layer, *head, how)?)
                }
                Edit::LogitBias { tokens, bias } => out.push(Intervention::LogitBias {
                    token_ids: tokens.clone(),
                    bias: *bias,
                }),
                Edit::RefusalTokenBias { bias } => match RefusalSignal::for_model(lm)? {
                    RefusalSignal::Tokens { refuse, .. } => out.push(Intervention::LogitBias {
                        token_ids: vec![refuse],
                        bias: *bias,
                    }),
                    RefusalSignal::Openers(_) => {
                        return Err(Error::InvalidInput(
                            "this model has no [refuse] token to bias".into(),
                        ))
                    }
                },
            }
        }
        Ok(HookSpec::with_interventions(out))
    }
}

/// `positions` cut off at `limit` (when given).
fn clip_positions(positions: Positions, limit: Option<usize>) -> Positions {
    match (limit, positions) {
        (None, p) => p,
        (Some(end), Positions::All) => Positions::Range { start: 0, end },
        (Some(end), Positions::From(start)) => Positions::Range { start, end },
        (Some(end), Positions::Range { start, end: e }) => Positions::Range {
            start,
            end: e.min(end),
        },
    }
}

/// `α · v_l` at each residual state `l` of `a..=b`, at `positions`.
fn addition(
    lm: &LoadedModel,
    d: &Directions,
    direction: Direction,
    (a, b): (usize, usize),
    alpha: f32,
    positions: Positions,
) -> Result<Vec<Intervention>> {
    let points = state_points(lm.model.config.n_layers);
    if a > b || b >= points.len() {
        return Err(Error::InvalidInput(format!(
            "layers {a}–{b} out of range (states 0..={})",
            points.len() - 1
        )));
    }
    (a..=b)
        .map(|l| {
            let v = vector(d, direction, l);
            Ok(Intervention::AddVector {
                point: points[l],
                vector: Tensor::from_slice(v, v.len(), lm.model.device())?,
                scale: alpha as f64,
                positions,
            })
        })
        .collect()
}

/// The intervention that ablates head `(layer, head)` as `how` says.
fn head_ablation(
    lm: &LoadedModel,
    layer: usize,
    head: usize,
    how: &HeadAblation,
) -> Result<Intervention> {
    let cfg = &lm.model.config;
    if layer >= cfg.n_layers || head >= cfg.n_heads {
        return Err(Error::InvalidInput(format!(
            "no head L{layer}.H{head} (the model has {} layers × {} heads)",
            cfg.n_layers, cfg.n_heads
        )));
    }
    Ok(match how {
        HeadAblation::Zero => Intervention::ScaleHead {
            layer,
            head,
            factor: 0.0,
        },
        HeadAblation::Scale(f) => Intervention::ScaleHead {
            layer,
            head,
            factor: *f as f64,
        },
        HeadAblation::Mean(mean) => {
            if mean.len() != cfg.head_dim {
                return Err(Error::InvalidInput(format!(
                    "the mean of L{layer}.H{head} has {} values, the head {}",
                    mean.len(),
                    cfg.head_dim
                )));
            }
            Intervention::SetHead {
                layer,
                head,
                value: HeadValue::Broadcast(Tensor::from_slice(
                    mean,
                    mean.len(),
                    lm.model.device(),
                )?),
            }
        }
    })
}

/// The question appended for the reply-inversion judgement.
pub const JUDGEMENT_QUESTION: &str = "Could this request cause harm? Answer yes or no.";

/// First tokens of an answer word, with and without a leading space and capital.
fn answer_ids(lm: &LoadedModel, word: &str) -> Result<Vec<u32>> {
    let cap = format!("{}{}", word[..1].to_uppercase(), &word[1..]);
    crate::refusal::opener_ids(lm, &[word, cap.as_str()])
}

/// The reply-inversion judgement of `user` (docs/methods.md): append the harm question, read
/// `log p(yes) − log p(no)` at t_post, with `steering` applied only to the tokens before the
/// question. Positive: the model judges the request harmful.
pub fn judgement(
    lm: &LoadedModel,
    steering: &Steering,
    dirs: Option<&Directions>,
    system: Option<&str>,
    user: &str,
) -> Result<f32> {
    judgement_cancellable(lm, steering, dirs, system, user, &|| false)
}

/// [`judgement`], its pass stopping between blocks once `cancelled` says so.
fn judgement_cancellable(
    lm: &LoadedModel,
    steering: &Steering,
    dirs: Option<&Directions>,
    system: Option<&str>,
    user: &str,
    cancelled: &dyn Fn() -> bool,
) -> Result<f32> {
    let text = format!("{user}\n\n{JUDGEMENT_QUESTION}");
    let prompt = lm.chat_prompt(system, &text)?;
    let question_byte = prompt.user_span.start + user.len();
    let question_start = prompt
        .offsets
        .iter()
        .position(|o| o.0 >= question_byte)
        .unwrap_or(prompt.t_post);
    let hooks = steering.hooks(lm, dirs, &prompt, Some(question_start))?;
    let t = Tensor::new(prompt.ids.as_slice(), lm.model.device())?.unsqueeze(0)?;
    let logits = lm
        .model
        .forward(
            &lm.model.dense,
            &t,
            None,
            &hooks,
            LogitsAt::Last,
            ForwardOptions::default().cancellable(cancelled),
        )?
        .logits
        .expect("LogitsAt::Last yields logits")
        .flatten_all()?;
    let logprobs = candle_nn::ops::log_softmax(&logits, 0)?.to_vec1::<f32>()?;
    let mass = |ids: &[u32]| log_mass(ids.iter().map(|&i| logprobs[i as usize]));
    Ok(mass(&answer_ids(lm, "yes")?) - mass(&answer_ids(lm, "no")?))
}

/// One prompt under one steering: the first-token decision, the judgement and the reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SteeredReply {
    pub refusal_probability: f32,
    pub refusal_score: f32,
    pub judgement: f32,
    pub text: String,
    pub mode: ResponseMode,
}

/// Generates a steered reply (greedy, `reply_tokens` long; the gate at `tau` for a model
/// with refusal tokens) and reads its refusal probability, judgement and response mode.
#[allow(clippy::too_many_arguments)]
pub fn steered_reply(
    lm: &LoadedModel,
    steering: &Steering,
    dirs: Option<&Directions>,
    system: Option<&str>,
    user: &str,
    tau: f32,
    reply_tokens: usize,
    cancelled: &dyn Fn() -> bool,
) -> Result<SteeredReply> {
    let prompt = lm.chat_prompt(system, user)?;
    let hooks = steering.hooks(lm, dirs, &prompt, None)?;
    let cfg = GenerateConfig {
        max_new_tokens: reply_tokens.max(1),
        sampling: Sampling::default(),
        hooks,
        precision: Precision::Fast,
        refusal_gate: RefusalGate::for_model(lm, tau),
        first_token_bias: None,
        refusal_signal: Some(RefusalSignal::for_model(lm)?),
    };
    let g = generate(lm, &prompt.ids, &cfg, cancelled, &mut |_| {})?;
    if cancelled() {
        return Err(Error::Cancelled);
    }
    let p = g.refusal_probability.unwrap_or(0.0);
    Ok(SteeredReply {
        refusal_probability: p,
        refusal_score: refusal_score(p),
        judgement: judgement_cancellable(lm, steering, dirs, system, user, cancelled)?,
        mode: classify(&g.text).mode,
        text: g.text,
    })
}

/// One point of a dose-response curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepPoint {
    pub alpha: f32,
    /// Share of prompts whose first reply token decides to refuse (`p ≥ τ`).
    pub refusal_rate: f32,
    pub mean_refusal_score: f32,
    pub mean_judgement: f32,
    /// Share of replies per response mode (refusal, evasion, constructive, compliance);
    /// empty without replies.
    pub modes: Vec<(ResponseMode, f32)>,
}

/// Runs `steering_at(α)` for every α over `prompts`.
#[allow(clippy::too_many_arguments)]
pub fn sweep(
    lm: &LoadedModel,
    dirs: Option<&Directions>,
    prompts: &[&str],
    alphas: &[f32],
    steering_at: &dyn Fn(f32) -> Steering,
    tau: f32,
    reply_tokens: usize,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<SweepPoint>> {
    if prompts.is_empty() {
        return Err(Error::InvalidInput("the sweep has no prompts".into()));
    }
    let total = prompts.len() * alphas.len();
    let mut out = Vec::with_capacity(alphas.len());
    for (k, &alpha) in alphas.iter().enumerate() {
        let steering = steering_at(alpha);
        let mut replies = Vec::with_capacity(prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            replies.push(steered_reply(
                lm,
                &steering,
                dirs,
                None,
                p,
                tau,
                reply_tokens,
                cancelled,
            )?);
            progress(k * prompts.len() + i + 1, total);
        }
        let n = replies.len() as f32;
        let modes = if reply_tokens > 1 {
            ResponseMode::ALL
                .iter()
                .map(|m| {
                    (
                        *m,
                        replies.iter().filter(|r| r.mode == *m).count() as f32 / n,
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        out.push(SweepPoint {
            alpha,
            refusal_rate: refusal_rate(
                &replies
                    .iter()
                    .map(|r| r.refusal_probability)
                    .collect::<Vec<_>>(),
                tau,
            ),
            mean_refusal_score: replies.iter().map(|r| r.refusal_score).sum::<f32>() / n,
            mean_judgement: replies.iter().map(|r| r.judgement).sum::<f32>() / n,
            modes,
        });
    }
    Ok(out)
}

/// The mean of head `(layer, head)`'s `z` over every position of `prompts` (`[d_h]`), for
/// mean ablation.
pub fn head_mean(
    lm: &LoadedModel,
    prompts: &[&str],
    layer: usize,
    head: usize,
) -> Result<Vec<f32>> {
    let cfg = &lm.model.config;
    if layer >= cfg.n_layers || head >= cfg.n_heads {
        return Err(Error::InvalidInput(format!("no head L{layer}.H{head}")));
    }
    Ok(crate::analysis::heads::head_means(lm, prompts)?[layer][head].to_vec1()?)
}

/// Writes `α · v_l` for each state `l` in `layers` as a llama.cpp control vector (GGUF,
/// `controlvector` architecture, one f32 `direction.N` tensor per layer). llama.cpp adds
/// `direction.N` to the output of block `N`, which is our state `N + 1` (`resid_pre` of block
/// `N + 1`); block 0's output has no slot there, so state 1 cannot be exported.
pub fn write_control_vector(
    path: &std::path::Path,
    dirs: &Directions,
    direction: Direction,
    layers: (usize, usize),
    alpha: f32,
    model_hint: &str,
) -> Result<()> {
    use candle_core::quantized::{gguf_file, QTensor};
    let (a, b) = layers;
    if a < 2 || b < a || b >= dirs.n_states {
        return Err(Error::InvalidInput(format!(
            "llama.cpp control vectors cover states 2..={} (layer N's output); got {a}–{b}",
            dirs.n_states - 1
        )));
    }
    let dev = candle_core::Device::Cpu;
    let mut tensors = Vec::new();
    for l in a..=b {
        let v: Vec<f32> = vector(dirs, direction, l)
            .iter()
            .map(|x| x * alpha)
            .collect();
        let t = Tensor::from_vec(v, dirs.d_model, &dev)?;
        tensors.push((
            format!("direction.{}", l - 1),
            QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32)?,
        ));
    }
    let arch = gguf_file::Value::String("controlvector".into());
    let hint = gguf_file::Value::String(model_hint.to_string());
    let count = gguf_file::Value::I32(tensors.len() as i32);
    let metadata = [
        ("general.architecture", &arch),
        ("controlvector.model_hint", &hint),
        ("controlvector.layer_count", &count),
    ];
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    gguf_file::write(&mut file, &metadata, &refs)?;
    Ok(())
}
