//! Reply jobs: a streamed reply, steered replies with their baseline, dose-response sweeps,
//! and a reply's trajectory.

use std::time::Instant;

use refusal_lens_engine::analysis::directions::Directions;
use refusal_lens_engine::analysis::steering::{judgement, sweep as sweep_steering, Edit, Steering};
use refusal_lens_engine::analysis::trajectory::{trajectory as score_trajectory, CliffOptions};
use refusal_lens_engine::model::chat::ChatPrompt;
use refusal_lens_engine::refusal::response::classify as classify_reply;
use refusal_lens_engine::refusal::{opener_bias, RefusalGate, RefusalSignal};
use refusal_lens_engine::run::generate::{generate_with, GenerateConfig, Generation, PassKind};
use refusal_lens_engine::{Error, LoadedModel};

use super::ahead::Ahead;
use super::protocol::{Event, GenerateRequest, SteeredReply};
use super::state::State;
use super::{Ctx, JobResult};

/// The generation settings of a request for `m`, its steering turned into hooks.
pub(super) fn generate_config(
    m: &LoadedModel,
    dirs: Option<&Directions>,
    request: &GenerateRequest,
    prompt: &ChatPrompt,
) -> refusal_lens_engine::Result<GenerateConfig> {
    Ok(GenerateConfig {
        max_new_tokens: request.max_new_tokens,
        sampling: request.sampling,
        hooks: request.steering.hooks(m, dirs, prompt, None)?,
        refusal_gate: RefusalGate::for_model(m, request.tau),
        first_token_bias: opener_bias(m, request.opener_bias)?,
        refusal_signal: Some(RefusalSignal::for_model(m)?),
        ..Default::default()
    })
}

/// A reply, streamed; from a prompt pass kept in `ahead` when it has one (a Steer job may
/// have computed it).
pub(super) fn generate(
    state: &State,
    ahead: &mut Ahead,
    ctx: &Ctx,
    request: &GenerateRequest,
) -> JobResult {
    let m = state.active()?;
    let prompt = m.chat_prompt(request.system.as_deref(), &request.prompt)?;
    ctx.emit(Event::Prompt {
        id: ctx.id,
        prompt_tokens: prompt.ids.iter().map(|&t| (t, m.token_text(t))).collect(),
        t_inst: prompt.t_inst,
        t_post: prompt.t_post,
    });
    let cfg = generate_config(m, state.lens.directions.as_deref(), request, &prompt)?;
    let (generation, _) = streamed(m, ahead, ctx, &prompt, &cfg, &request.steering, false)?;
    ctx.emit(Event::Finished {
        id: ctx.id,
        generation: Box::new(generation),
    });
    Ok(())
}

/// The steered reply (after the unsteered baseline, if asked), each streamed as tokens and
/// then summarised with its judgement. Both start from prompt passes kept in `ahead` when it
/// has them, and leave theirs there.
pub(super) fn steer(
    state: &State,
    ahead: &mut Ahead,
    ctx: &Ctx,
    request: &GenerateRequest,
    baseline: bool,
) -> JobResult {
    let requested = Instant::now();
    let runs: &[bool] = if baseline { &[true, false] } else { &[false] };
    for &is_baseline in runs {
        let mut request = request.clone();
        if is_baseline {
            request.steering = Steering::default();
        }
        steered_reply(state, ahead, ctx, &request, is_baseline, requested)?;
    }
    Ok(())
}

fn steered_reply(
    state: &State,
    ahead: &mut Ahead,
    ctx: &Ctx,
    request: &GenerateRequest,
    baseline: bool,
    requested: Instant,
) -> JobResult {
    let m = state.active()?;
    let dirs = state.lens.directions.as_deref();
    let prompt = m.chat_prompt(request.system.as_deref(), &request.prompt)?;
    let cfg = generate_config(m, dirs, request, &prompt)?;
    let computed_ahead = ahead.has(&prompt.ids, &request.steering, PassKind::Prompt);
    let (g, first_token) = streamed(m, ahead, ctx, &prompt, &cfg, &request.steering, baseline)?;
    let first_token_seconds = first_token.map(|t| t.duration_since(requested).as_secs_f64());
    if ctx.cancelled() {
        return Err(Error::Cancelled);
    }
    let seconds = requested.elapsed().as_secs_f64();
    let judgement = judgement(
        m,
        &request.steering,
        dirs,
        request.system.as_deref(),
        &request.prompt,
    )?;
    ctx.emit(Event::Steered {
        id: ctx.id,
        reply: SteeredReply {
            baseline,
            mode: classify_reply(&g.text).mode,
            text: g.text,
            refusal_probability: g.refusal_probability.unwrap_or(f32::NAN),
            judgement,
            first_token_seconds: first_token_seconds.unwrap_or(seconds),
            computed_ahead,
            seconds,
        },
    });
    Ok(())
}

/// A reply to `prompt` under `cfg` (whose hooks `steering` made), from prompt passes kept in
/// `ahead` when it has them (it keeps the ones computed), each token sent as it comes, and
/// when the first one came.
fn streamed(
    m: &LoadedModel,
    ahead: &mut Ahead,
    ctx: &Ctx,
    prompt: &ChatPrompt,
    cfg: &GenerateConfig,
    steering: &Steering,
    baseline: bool,
) -> refusal_lens_engine::Result<(Generation, Option<Instant>)> {
    let mut first_token = None;
    // The prompt pass runs while the UI waits idle for the first token: every core for it.
    crate::set_kernel_threads(false);
    let g = generate_with(
        m,
        &prompt.ids,
        cfg,
        &mut ahead.passes_for(&prompt.ids, steering),
        &|| ctx.cancelled(),
        &mut |step| {
            streaming_from_now();
            first_token.get_or_insert_with(Instant::now);
            ctx.emit(Event::Token {
                id: ctx.id,
                baseline,
                step: step.clone(),
                worker_seconds: ctx.started.elapsed().as_secs_f64(),
            })
        },
    )?;
    Ok((g, first_token))
}

/// Tokens stream from here on, each repainting the UI: leave it a core (see
/// `crate::set_kernel_threads`).
fn streaming_from_now() {
    crate::set_kernel_threads(true);
}

/// `steering` with every activation addition's α multiplied by `alpha`.
pub fn scale_additions(steering: &Steering, alpha: f32) -> Steering {
    let mut s = steering.clone();
    for e in &mut s.edits {
        if let Edit::Add { alpha: a, .. } = e {
            *a *= alpha;
        }
    }
    s
}

pub(super) fn sweep(
    state: &State,
    ctx: &Ctx,
    prompts: &[String],
    alphas: &[f32],
    steering: &Steering,
    tau: f32,
) -> JobResult {
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let at = |alpha: f32| scale_additions(steering, alpha);
    let points = sweep_steering(
        state.active()?,
        state.lens.directions.as_deref(),
        &refs,
        alphas,
        &at,
        tau,
        1,
        &|| ctx.cancelled(),
        &mut |done, total| ctx.progress("sweep", done, total),
    )?;
    ctx.emit(Event::Swept { id: ctx.id, points });
    Ok(())
}

pub(super) fn trajectory(
    state: &State,
    ctx: &Ctx,
    system: Option<&str>,
    prompt: &str,
    reply: &[u32],
    steering: &Steering,
    layer: Option<usize>,
) -> JobResult {
    let m = state.active()?;
    let d = state.directions()?;
    let p = m.chat_prompt(system, prompt)?;
    let hooks = steering.hooks(m, Some(d), &p, None)?;
    let trajectory = score_trajectory(
        m,
        &p,
        reply,
        state.lens.probes.as_deref(),
        Some(d),
        layer.unwrap_or(d.layer),
        CliffOptions::default(),
        &hooks,
    )?;
    ctx.emit(Event::Trajectory {
        id: ctx.id,
        trajectory: Box::new(trajectory),
    });
    Ok(())
}
