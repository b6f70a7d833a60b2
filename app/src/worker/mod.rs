//! The worker thread: it owns the model, runs jobs one at a time and reports events.
//! The UI (or any other client) only submits [`Job`]s and reads [`Event`]s; it never blocks.
//!
//! `protocol` holds the message types; each job kind runs in its own module (`models`,
//! `replies`, `lens`, `heads`, `organism`) against the worker's [`state::State`].

mod ahead;
mod heads;
mod lens;
mod models;
mod organism;
mod protocol;
mod replies;
mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

pub use lens::probes_path;
pub use protocol::{
    CompareWith, Event, GenerateRequest, Job, JobId, OrganismInfo, Progress, SteeredReply,
};
pub use replies::scale_additions;

use protocol::CancelGroup;
use state::State;

/// Cancellation marks shared by the client and the worker: every job of a group with an id at
/// or below its mark is cancelled.
#[derive(Default)]
struct Marks {
    replies: AtomicU64,
    analyses: AtomicU64,
    steer: AtomicU64,
}

impl Marks {
    fn of(&self, group: CancelGroup) -> Option<&AtomicU64> {
        match group {
            CancelGroup::Replies => Some(&self.replies),
            CancelGroup::Analyses => Some(&self.analyses),
            CancelGroup::Steer => Some(&self.steer),
            CancelGroup::None => None,
        }
    }

    fn cancel_through(&self, group: CancelGroup, id: u64) {
        if let Some(mark) = self.of(group) {
            mark.fetch_max(id, Ordering::SeqCst);
        }
    }
}

/// The client side of the worker.
pub struct Worker {
    jobs: Sender<(JobId, Job)>,
    events: Receiver<Event>,
    marks: Arc<Marks>,
    last_id: u64,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the worker thread. `notify` is called after every event (the GUI passes its
    /// repaint request so events show up at once).
    pub fn spawn(notify: impl Fn(&Event) + Send + 'static) -> Worker {
        let (jobs, job_rx) = crossbeam_channel::unbounded();
        let (event_tx, events) = crossbeam_channel::unbounded();
        let marks = Arc::new(Marks::default());
        let worker_marks = marks.clone();
        let thread = std::thread::Builder::new()
            .name("refusal-lens-worker".into())
            .spawn(move || run(job_rx, event_tx, &worker_marks, notify))
            .expect("spawning the worker thread");
        Worker {
            jobs,
            events,
            marks,
            last_id: 0,
            thread: Some(thread),
        }
    }

    /// Queues a job and returns its id. A Generate job supersedes (cancels) earlier replies,
    /// calibrations and training runs, a Steer job earlier steer jobs; other jobs cancel
    /// nothing.
    pub fn submit(&mut self, job: Job) -> JobId {
        match &job {
            Job::Generate(_) => self
                .marks
                .cancel_through(CancelGroup::Replies, self.last_id),
            Job::Steer { .. } => self.marks.cancel_through(CancelGroup::Steer, self.last_id),
            _ => {}
        }
        self.last_id += 1;
        let id = JobId(self.last_id);
        // The worker only stops when this handle drops, so sending cannot fail while we exist.
        let _ = self.jobs.send((id, job));
        id
    }

    /// Cancels every job submitted so far.
    pub fn cancel_all(&self) {
        for group in [
            CancelGroup::Replies,
            CancelGroup::Analyses,
            CancelGroup::Steer,
        ] {
            self.marks.cancel_through(group, self.last_id);
        }
    }

    /// Cancels the lens builds, sweeps and head scans submitted so far.
    pub fn cancel_analyses(&self) {
        self.marks
            .cancel_through(CancelGroup::Analyses, self.last_id);
    }

    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.cancel_all();
        // Closing the job channel ends the worker loop.
        let (closed, _) = crossbeam_channel::unbounded();
        self.jobs = closed;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a running job sees: its id, a way to report, and whether it was cancelled.
pub(crate) struct Ctx<'a> {
    pub id: JobId,
    /// When the worker started the job.
    pub started: std::time::Instant,
    emit: &'a dyn Fn(Event),
    mark: Option<&'a AtomicU64>,
}

impl Ctx<'_> {
    pub fn emit(&self, event: Event) {
        (self.emit)(event)
    }

    pub fn cancelled(&self) -> bool {
        self.mark
            .is_some_and(|m| m.load(Ordering::SeqCst) >= self.id.0)
    }

    pub fn progress(&self, phase: &str, done: usize, total: usize) {
        self.emit(Event::Progress {
            id: self.id,
            progress: Progress::new(phase, done, total),
        })
    }
}

/// How a job ended, for the loop to report.
pub(crate) type JobResult = refusal_lens_engine::Result<()>;

fn run(
    jobs: Receiver<(JobId, Job)>,
    events: Sender<Event>,
    marks: &Marks,
    notify: impl Fn(&Event),
) {
    let mut state = State::default();
    let mut ahead = ahead::Ahead::default();
    let emit = |e: Event| {
        notify(&e);
        let _ = events.send(e);
    };
    loop {
        // Idle with passes to compute ahead: compute one, or stop it once a job arrives.
        let next = if ahead.has_work() {
            match jobs.try_recv() {
                Ok(next) => Ok(next),
                Err(crossbeam_channel::TryRecvError::Empty) => {
                    crate::set_kernel_threads(false);
                    ahead.step(&state, &|| !jobs.is_empty());
                    continue;
                }
                Err(crossbeam_channel::TryRecvError::Disconnected) => break,
            }
        } else {
            jobs.recv().map_err(|_| ())
        };
        let Ok((id, job)) = next else { break };
        let ctx = Ctx {
            id,
            started: std::time::Instant::now(),
            emit: &emit,
            mark: marks.of(job.cancel_group()),
        };
        // A job superseded before it started is dropped without a word.
        if ctx.cancelled() && matches!(job, Job::Generate(_) | Job::Steer { .. }) {
            continue;
        }
        if !job.keeps_model_and_lens() {
            ahead.clear();
        }
        let quiet_when_cancelled = matches!(job, Job::Steer { .. });
        // Every core until a job streams its first token (see `replies`).
        crate::set_kernel_threads(false);
        // A panic inside a job (a bug) must not kill the worker: report it and keep serving.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            dispatch(&mut state, &mut ahead, &ctx, job)
        }));
        let error = match outcome {
            Ok(Ok(())) => {
                emit(Event::Done { id });
                continue;
            }
            Ok(Err(refusal_lens_engine::Error::Cancelled)) if quiet_when_cancelled => continue,
            Ok(Err(e)) => e.to_string(),
            Err(panic) => {
                // What a panicking job left half-written is not trusted.
                ahead.clear();
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                format!("internal error: {msg}")
            }
        };
        emit(Event::Failed { id, error });
    }
}

fn dispatch(state: &mut State, ahead: &mut ahead::Ahead, ctx: &Ctx, job: Job) -> JobResult {
    match job {
        // A model the app ships directions and probes for gets them at once.
        Job::LoadModel { path, adapter } => {
            models::load(state, ctx, path, adapter.as_deref())?;
            lens::load_shipped(state, ctx)
        }
        Job::UseModel { base, organism } => {
            models::use_model(state, ctx, *base, organism)?;
            lens::load_shipped(state, ctx)
        }
        Job::UseOrganism(on) => {
            models::use_organism(state, ctx, on)?;
            lens::load_shipped(state, ctx)
        }
        Job::UseDevice(spec) => {
            models::use_device(state, ctx, &spec)?;
            lens::load_shipped(state, ctx)
        }
        Job::SetThinking(on) => models::set_thinking(state, on),
        Job::Generate(request) => replies::generate(state, ahead, ctx, &request),
        Job::Steer {
            request,
            baseline,
            ahead: stacks,
        } => {
            replies::steer(state, ahead, ctx, &request, baseline)?;
            ahead.plan(&request, stacks);
            Ok(())
        }
        Job::Sweep {
            prompts,
            alphas,
            steering,
            tau,
        } => replies::sweep(state, ctx, &prompts, &alphas, &steering, tau),
        Job::Trajectory {
            system,
            prompt,
            reply,
            steering,
            layer,
        } => replies::trajectory(
            state,
            ctx,
            system.as_deref(),
            &prompt,
            &reply,
            &steering,
            layer,
        ),
        Job::Calibrate { sets } => organism::calibrate(state, ctx, &sets),
        Job::Train {
            train,
            val,
            options,
            goal,
            out,
        } => organism::train(state, ctx, &train, &val, &options, goal, out),
        Job::BuildLens {
            harmful,
            harmless,
            options,
            activation_cache,
        } => lens::build(state, ctx, &harmful, &harmless, &options, &activation_cache),
        Job::ChooseLayer(layer) => lens::choose_layer(state, ctx, layer),
        Job::SaveLens(path) => lens::save(state, ctx, path),
        Job::LoadLens(path) => lens::load(state, ctx, &path),
        Job::Heads { pairs } => heads::metrics(state, ctx, &pairs),
        Job::Cascade { harmful, gate } => heads::cascade(state, ctx, &harmful, gate),
        Job::Guard {
            harmful,
            harmless,
            borderline,
            jailbreaks,
            activation_cache,
        } => lens::guard(
            state,
            ctx,
            (&harmful, &harmless),
            borderline.as_deref(),
            &jailbreaks,
            &activation_cache,
        ),
        Job::Compare {
            with,
            harmful,
            harmless,
            borderline,
            activation_cache,
            prompt,
            reply_tokens,
        } => lens::compare(
            state,
            ctx,
            &with,
            (&harmful, &harmless),
            borderline.as_deref(),
            &activation_cache,
            prompt.as_deref().map(|p| (p, reply_tokens)),
        ),
    }
}
