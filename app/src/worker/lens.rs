//! Lens jobs: build directions and probes from two prompt sets, choose the layer, save and
//! load them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use refusal_lens_engine::analysis::abliterate::orthogonalized;
use refusal_lens_engine::analysis::activations::check_cache_dir;
use refusal_lens_engine::analysis::compare;
use refusal_lens_engine::analysis::directions::Directions;
use refusal_lens_engine::analysis::guard::study;
use refusal_lens_engine::analysis::lens::{self, DirectionOptions, ProbeJob, ShippedLens};
use refusal_lens_engine::analysis::probe::ProbeSet;
use refusal_lens_engine::data::prompts::{Jailbreak, PromptSet};
use refusal_lens_engine::model::FastPrecision;
use refusal_lens_engine::organism::model_sha256;
use refusal_lens_engine::{Error, LoadedModel};

use super::protocol::{CompareWith, Event};
use super::state::State;
use super::{Ctx, JobResult};

pub use refusal_lens_engine::analysis::lens::probes_path;

/// The activation cache folder if it can be written; otherwise the job tells the user why
/// and runs without it.
fn usable_cache<'a>(ctx: &Ctx, dir: &'a Path) -> Option<&'a Path> {
    match check_cache_dir(dir) {
        Ok(()) => Some(dir),
        Err(text) => {
            ctx.emit(Event::Notice { id: ctx.id, text });
            None
        }
    }
}

pub(super) fn build(
    state: &mut State,
    ctx: &Ctx,
    harmful: &PromptSet,
    harmless: &PromptSet,
    options: &DirectionOptions,
    activation_cache: &Path,
) -> JobResult {
    let m = state.active()?;
    let started = Instant::now();
    let cancelled = || ctx.cancelled();
    let mut progress = |phase: &str, done: usize, total: usize| ctx.progress(phase, done, total);
    // Directions and probes read the same states: collect (or load) them once.
    let states = lens::collect_pair(
        m,
        harmful,
        harmless,
        options.system.as_deref(),
        usable_cache(ctx, activation_cache),
        &cancelled,
        &mut progress,
    )?;
    let directions = lens::directions_from_states(
        m,
        harmful,
        harmless,
        &states,
        options,
        &cancelled,
        &mut progress,
    )?;
    let job = ProbeJob {
        system: options.system.clone(),
        ..Default::default()
    };
    let probes = lens::probes_from_states(
        m,
        harmful,
        harmless,
        &states,
        &job,
        &cancelled,
        &mut progress,
    )?;
    let (directions, probes) = (Arc::new(directions), Arc::new(probes));
    state.lens.directions = Some(directions.clone());
    state.lens.probes = Some(probes.clone());
    ctx.emit(Event::LensReady {
        id: ctx.id,
        directions,
        probes: Some(probes),
        build_seconds: Some(started.elapsed().as_secs_f64()),
        file: None,
    });
    Ok(())
}

pub(super) fn choose_layer(state: &mut State, ctx: &Ctx, layer: usize) -> JobResult {
    let mut d = match &state.lens.directions {
        Some(d) if layer < d.n_states => (**d).clone(),
        _ => {
            return Err(Error::InvalidInput(format!(
                "no directions with a layer {layer}"
            )))
        }
    };
    d.layer = layer;
    let directions = Arc::new(d);
    state.lens.directions = Some(directions.clone());
    ctx.emit(Event::LensReady {
        id: ctx.id,
        directions,
        probes: state.lens.probes.clone(),
        build_seconds: None,
        file: None,
    });
    Ok(())
}

pub(super) fn save(state: &State, ctx: &Ctx, path: PathBuf) -> JobResult {
    let d = state
        .lens
        .directions
        .as_ref()
        .ok_or_else(|| Error::InvalidInput("no directions to save yet".into()))?;
    d.save(&path)?;
    if let Some(p) = &state.lens.probes {
        p.save(&probes_path(&path))?;
    }
    ctx.emit(Event::LensSaved { id: ctx.id, path });
    Ok(())
}

pub(super) fn load(state: &mut State, ctx: &Ctx, path: &Path) -> JobResult {
    let read = || -> refusal_lens_engine::Result<_> {
        let m = state.active()?;
        let d = Directions::load(path)?;
        d.check_fits(m)?;
        let probes_file = probes_path(path);
        let p = if probes_file.exists() {
            Some(Arc::new(ProbeSet::load(&probes_file)?))
        } else {
            None
        };
        Ok((Arc::new(d), p))
    };
    let (directions, probes) =
        read().map_err(|e| Error::InvalidInput(format!("cannot load {}: {e}", path.display())))?;
    state.lens.directions = Some(directions.clone());
    state.lens.probes = probes.clone();
    ctx.emit(Event::LensReady {
        id: ctx.id,
        directions,
        probes,
        build_seconds: None,
        file: Some(path.to_path_buf()),
    });
    Ok(())
}

/// Loads the directions and probes shipped for the model in use (`assets/lens/`), when it is
/// one the app ships them for and no lens is loaded yet.
pub(super) fn load_shipped(state: &mut State, ctx: &Ctx) -> JobResult {
    if state.lens.directions.is_some() || ShippedLens::all()?.is_empty() {
        return Ok(());
    }
    let m = state.active()?;
    if state.model_sha256.is_none() && m.card.path.is_file() {
        state.model_sha256 = Some(model_sha256(&m.card.path)?);
    }
    let Some(shipped) = ShippedLens::for_model(state.active()?, state.model_sha256.as_deref())?
    else {
        return Ok(());
    };
    load(state, ctx, &shipped.directions_path())?;
    if let Some(metrics) = shipped.head_metrics()? {
        ctx.emit(Event::HeadsReady {
            id: ctx.id,
            metrics: Box::new(metrics),
        });
    }
    Ok(())
}

/// Latent Guard on the sets (`analysis::guard::study`), for the Guard tab.
pub(super) fn guard(
    state: &State,
    ctx: &Ctx,
    (harmful, harmless): (&PromptSet, &PromptSet),
    borderline: Option<&PromptSet>,
    jailbreaks: &[Jailbreak],
    activation_cache: &Path,
) -> JobResult {
    let study = study(
        state.active()?,
        harmful,
        harmless,
        borderline,
        jailbreaks,
        usable_cache(ctx, activation_cache),
        &|| ctx.cancelled(),
        &mut |phase, done, total| ctx.progress(phase, done, total),
    )?;
    ctx.emit(Event::GuardReady {
        id: ctx.id,
        study: Box::new(study),
    });
    Ok(())
}

/// The model in use against a second one (`analysis::compare`), for the Guard tab.
pub(super) fn compare(
    state: &State,
    ctx: &Ctx,
    with: &CompareWith,
    (harmful, harmless): (&PromptSet, &PromptSet),
    borderline: Option<&PromptSet>,
    activation_cache: &Path,
    prompt: Option<(&str, usize)>,
) -> JobResult {
    let first = state.active()?;
    let loaded;
    let second: &LoadedModel = match with {
        CompareWith::Counterpart => state.counterpart()?,
        CompareWith::Abliterated => {
            loaded = orthogonalized(first, state.directions()?.refusal_direction())?;
            &loaded
        }
        CompareWith::File(path) => {
            ctx.progress("loading the second model", 0, 1);
            let mut lm = LoadedModel::load(path, FastPrecision::Auto)?;
            lm.template.enable_thinking = first.template.enable_thinking;
            loaded = lm;
            &loaded
        }
    };
    let comparison = compare::compare(
        first,
        second,
        harmful,
        harmless,
        borderline,
        usable_cache(ctx, activation_cache),
        &|| ctx.cancelled(),
        &mut |phase, done, total| ctx.progress(phase, done, total),
    )?;
    let replies = match prompt {
        Some((prompt, tokens)) => {
            ctx.progress("replies", 0, 2);
            Some(compare::replies([first, second], prompt, tokens, &|| {
                ctx.cancelled()
            })?)
        }
        None => None,
    };
    ctx.emit(Event::Compared {
        id: ctx.id,
        comparison: Box::new(comparison),
        replies,
    });
    Ok(())
}
