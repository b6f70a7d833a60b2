//! Model jobs: load from disk, use models built in memory, switch to or from the organism.

use std::path::{Path, PathBuf};
use std::time::Instant;

use refusal_lens_engine::device::parse_device;
use refusal_lens_engine::model::FastPrecision;
use refusal_lens_engine::organism::Adapter;
use refusal_lens_engine::LoadedModel;

use super::protocol::{Event, OrganismInfo};
use super::state::{Lens, State};
use super::{Ctx, JobResult};

pub(super) fn load(
    state: &mut State,
    ctx: &Ctx,
    path: PathBuf,
    adapter: Option<&Path>,
) -> JobResult {
    ctx.emit(Event::ModelLoading {
        id: ctx.id,
        path: path.clone(),
    });
    let started = Instant::now();
    let base = LoadedModel::load(&path, FastPrecision::Auto)?;
    let organism = match adapter {
        Some(dir) => {
            let a = Adapter::load(dir)?;
            let info = OrganismInfo {
                name: dir.display().to_string(),
                metrics: a.meta.metrics.clone(),
            };
            Some((a.apply(&base)?.into_device(&state.device)?, info))
        }
        None => None,
    };
    *state = State {
        use_organism: organism.is_some(),
        base: Some(base.into_device(&state.device)?),
        organism,
        lens: Lens::default(),
        model_sha256: None,
        device: state.device.clone(),
    };
    ctx.emit(
        state
            .loaded_event(ctx.id, Some(started.elapsed().as_secs_f64()))
            .expect("a model was just loaded"),
    );
    Ok(())
}

/// Moves the loaded models to `spec`'s device and runs there from now on. The app treats
/// this like a model change: the lens is dropped (the shipped one then reloads).
pub(super) fn use_device(state: &mut State, ctx: &Ctx, spec: &str) -> JobResult {
    let device = parse_device(spec)?;
    if let Some(base) = state.base.take() {
        state.base = Some(base.into_device(&device)?);
    }
    if let Some((organism, info)) = state.organism.take() {
        state.organism = Some((organism.into_device(&device)?, info));
    }
    state.device = device;
    state.lens = Lens::default();
    if let Some(event) = state.loaded_event(ctx.id, None) {
        ctx.emit(event);
    }
    Ok(())
}

pub(super) fn use_model(
    state: &mut State,
    ctx: &Ctx,
    base: LoadedModel,
    organism: Option<Box<LoadedModel>>,
) -> JobResult {
    let info = || OrganismInfo {
        name: "in memory".into(),
        metrics: serde_json::Value::Null,
    };
    let organism = match organism {
        Some(m) => Some(((*m).into_device(&state.device)?, info())),
        None => None,
    };
    *state = State {
        use_organism: organism.is_some(),
        organism,
        base: Some(base.into_device(&state.device)?),
        lens: Lens::default(),
        model_sha256: None,
        device: state.device.clone(),
    };
    ctx.emit(
        state
            .loaded_event(ctx.id, None)
            .expect("a model was just set"),
    );
    Ok(())
}

/// Thinking on or off for every later prompt of both models. Directions and probes stay as
/// they were computed (with the template as it rendered then).
pub(super) fn set_thinking(state: &mut State, on: bool) -> JobResult {
    let organism = state.organism.as_mut().map(|(m, _)| m);
    for m in state.base.iter_mut().chain(organism) {
        m.template.enable_thinking = on;
    }
    Ok(())
}

pub(super) fn use_organism(state: &mut State, ctx: &Ctx, on: bool) -> JobResult {
    if on != state.use_organism {
        // Directions and probes belong to the model that made them.
        state.lens = Lens::default();
    }
    state.use_organism = on;
    if let Some(e) = state.loaded_event(ctx.id, None) {
        ctx.emit(e);
    }
    Ok(())
}
