//! Organism jobs: train refusal tokens (and switch to the result), and the calibration
//! curves' first-token refusal probabilities.

use std::path::PathBuf;
use std::time::Instant;

use refusal_lens_engine::data::prompts::PromptRecord;
use refusal_lens_engine::organism::{train_refusal_tokens, TrainOptions};
use refusal_lens_engine::refusal::{first_token_probabilities, GateGoal, RefusalSignal};
use refusal_lens_engine::Error;

use super::protocol::{Event, OrganismInfo};
use super::state::{Lens, State};
use super::{Ctx, JobResult};

pub(super) fn train(
    state: &mut State,
    ctx: &Ctx,
    train: &[PromptRecord],
    val: &[PromptRecord],
    options: &TrainOptions,
    goal: GateGoal,
    out: PathBuf,
) -> JobResult {
    let base = state
        .base
        .as_ref()
        .ok_or_else(|| Error::InvalidInput("no model is loaded".into()))?;
    let started = Instant::now();
    let cancelled = || ctx.cancelled();
    let mut adapter = train_refusal_tokens(base, train, options, &cancelled, &mut |p| {
        ctx.emit(Event::Progress {
            id: ctx.id,
            progress: p.clone(),
        })
    })?;
    let organism = adapter.apply_calibrated(base, val, goal, &cancelled)?;
    adapter.save(&out)?;
    let info = OrganismInfo {
        name: out.display().to_string(),
        metrics: adapter.meta.metrics,
    };
    state.organism = Some((organism, info));
    state.use_organism = true;
    state.lens = Lens::default();
    ctx.emit(Event::Trained {
        id: ctx.id,
        out,
        seconds: started.elapsed().as_secs_f64(),
    });
    if let Some(e) = state.loaded_event(ctx.id, None) {
        ctx.emit(e);
    }
    Ok(())
}

pub(super) fn calibrate(state: &State, ctx: &Ctx, sets: &[(String, Vec<String>)]) -> JobResult {
    let m = state.active()?;
    let total: usize = sets.iter().map(|(_, p)| p.len()).sum();
    let mut done = 0;
    let mut out = Vec::with_capacity(sets.len());
    for (name, prompts) in sets {
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let ps = first_token_probabilities(m, &prompts, &|| ctx.cancelled(), &mut |i, _| {
            ctx.progress("first-token probabilities", done + i, total)
        })?;
        done += prompts.len();
        out.push((name.clone(), ps));
    }
    ctx.emit(Event::Calibrated {
        id: ctx.id,
        signal: RefusalSignal::for_model(m)?.describe().to_string(),
        sets: out,
    });
    Ok(())
}
