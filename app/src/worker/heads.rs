//! Head jobs: every per-head metric of some pairs, and one gate's knockout cascade.

use refusal_lens_engine::analysis::heads::{head_metrics, knockout_cascade};

use super::protocol::Event;
use super::state::State;
use super::{Ctx, JobResult};

pub(super) fn metrics(state: &State, ctx: &Ctx, pairs: &[(String, String)]) -> JobResult {
    let metrics = head_metrics(
        state.active()?,
        pairs,
        &|| ctx.cancelled(),
        &mut |phase, done, total| ctx.progress(phase, done, total),
    )?;
    ctx.emit(Event::HeadsReady {
        id: ctx.id,
        metrics: Box::new(metrics),
    });
    Ok(())
}

pub(super) fn cascade(state: &State, ctx: &Ctx, harmful: &str, gate: (usize, usize)) -> JobResult {
    let cascade = knockout_cascade(state.active()?, &[harmful], gate, &|| ctx.cancelled())?;
    ctx.emit(Event::Cascade {
        id: ctx.id,
        gate,
        cascade,
    });
    Ok(())
}
