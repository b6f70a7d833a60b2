//! The worker thread: it owns the model, runs jobs one at a time and reports events.
//! The UI (or any other client) only sends [`Job`]s and reads [`Event`]s; it never blocks.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use refusal_lens_engine::analysis::activations::default_cache_dir;
use refusal_lens_engine::analysis::directions::Directions;
use refusal_lens_engine::organism::{train_refusal_tokens, Adapter, TrainOptions, TrainProgress};
use refusal_lens_engine::refusal::{first_token_probabilities, RefusalGate, opener_bias};
use refusal_lens_engine::run::generate::{generate, GenerateConfig, Generation, Sampling, TokenStep};
use refusal_lens_engine::analysis::heads::{HeadMap, Routing};
use refusal_lens_engine::analysis::lens::{self, DirectionOptions, ProbeJob};
use refusal_lens_engine::model::loader::ModelCard;
use refusal_lens_engine::model::FastPrecision;
use refusal_lens_engine::analysis::probe::ProbeSet;
use refusal_lens_engine::data::prompts::{PromptRecord, PromptSet};
use refusal_lens_engine::refusal::{GateGoal, RefusalSignal};
use refusal_lens_engine::refusal::response::{classify as classify_reply, ResponseMode};
use refusal_lens_engine::analysis::steering::{
    judgement as steering_judgement, sweep, Edit, Steering, SweepPoint,
};
use refusal_lens_engine::analysis::trajectory::{trajectory, Trajectory, DEFAULT_CLIFF_K};
use refusal_lens_engine::LoadedModel;

pub type JobId = u64;

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub system: Option<String>,
    pub prompt: String,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Refusal threshold for models with refusal tokens.
    pub tau: f32,
    /// For models without them: logit bias on the refusal openers at the first reply token.
    pub opener_bias: f32,
    /// Interventions on every forward pass (directions come from the worker's lens).
    pub steering: Steering,
}

pub enum Job {
    /// Load a model and, if given, the refusal-token adapter to apply on top of it.
    LoadModel {
        path: PathBuf,
        adapter: Option<PathBuf>,
    },
    /// Replace the model with one built in memory (tests, fine-tuned models).
    UseModel {
        base: Box<LoadedModel>,
        organism: Option<Box<LoadedModel>>,
    },
    /// Switch between the base model and the adapted one.
    UseOrganism(bool),
    Generate {
        id: JobId,
        request: GenerateRequest,
    },
    /// First-token refusal probabilities of named prompt lists (calibration curves).
    Calibrate {
        id: JobId,
        sets: Vec<(String, Vec<String>)>,
    },
    /// Directions and probes from a harmful and a harmless set (they replace the current ones).
    BuildLens {
        id: JobId,
        harmful: Box<PromptSet>,
        harmless: Box<PromptSet>,
        /// Layer selection, behaviour filter and the rest.
        options: DirectionOptions,
    },
    /// Make `layer` the directions' chosen layer (steering, saving and trajectories use it).
    ChooseLayer {
        layer: usize,
    },
    /// Save the current directions to `path` (and the probes beside it).
    SaveLens {
        path: PathBuf,
    },
    /// Load directions from `path` (and probes from beside it, if there).
    LoadLens {
        path: PathBuf,
    },
    /// A steered reply (and first, if asked, the unsteered baseline), each with its judgement.
    /// Newer steer jobs cancel older ones; other jobs do not.
    Steer {
        id: JobId,
        request: GenerateRequest,
        baseline: bool,
    },
    /// Dose-response over prompts: the steering at each α.
    Sweep {
        id: JobId,
        prompts: Vec<String>,
        alphas: Vec<f32>,
        /// The edits at α = 1; every Add edit's α is multiplied by the sweep's α.
        steering: Steering,
        tau: f32,
    },
    /// Per-head metrics for a harmful/harmless pair: DLA difference, interchange necessity
    /// and sufficiency, and the effect of zero-ablating each head on the harmful prompt.
    Heads {
        id: JobId,
        /// (harmful, harmless) pairs; metrics are their means.
        pairs: Vec<(String, String)>,
    },
    /// The knockout cascade of a chosen gate head on a harmful prompt.
    Cascade {
        id: JobId,
        harmful: String,
        gate: (usize, usize),
    },
    /// Score every token of a prompt and its reply with the current probes and directions.
    Trajectory {
        id: JobId,
        system: Option<String>,
        prompt: String,
        reply: Vec<u32>,
        /// The interventions the reply was generated under (so is its trajectory).
        steering: Steering,
        /// Residual state of the curves (default: the directions' chosen layer).
        layer: Option<usize>,
    },
    /// Fine-tune refusal tokens on the base model, save the adapter to `out`, and switch to it.
    Train {
        id: JobId,
        train: Vec<PromptRecord>,
        /// Held-out prompts the gate's τ is calibrated on (without harmful and harmless ones
        /// τ stays 0.5).
        val: Vec<PromptRecord>,
        options: TrainOptions,
        goal: GateGoal,
        out: PathBuf,
    },
}

/// The adapted model's name and held-out metrics, as the model card shows them.
#[derive(Debug, Clone)]
pub struct OrganismInfo {
    pub name: String,
    pub metrics: serde_json::Value,
}

#[derive(Debug, Clone)]
pub enum Event {
    ModelLoading {
        path: PathBuf,
    },
    ModelLoaded {
        card: Box<ModelCard>,
        seconds: f64,
        organism: Option<OrganismInfo>,
        organism_active: bool,
    },
    ModelFailed {
        path: PathBuf,
        error: String,
    },
    /// The prompt as the model sees it: templated token ids and their text.
    Started {
        id: JobId,
        prompt_tokens: Vec<(u32, String)>,
        t_inst: usize,
        t_post: usize,
    },
    Token {
        id: JobId,
        step: TokenStep,
    },
    Finished {
        id: JobId,
        generation: Box<Generation>,
    },
    Progress {
        id: JobId,
        done: usize,
        total: usize,
    },
    Calibrated {
        id: JobId,
        signal: String,
        sets: Vec<(String, Vec<f32>)>,
    },
    Training {
        id: JobId,
        progress: TrainProgress,
    },
    Trained {
        id: JobId,
        out: PathBuf,
        seconds: f64,
    },
    LensProgress {
        id: JobId,
        phase: String,
        done: usize,
        total: usize,
    },
    /// New directions and (when built or found) probes for the model in use.
    LensReady {
        id: JobId,
        directions: Arc<Directions>,
        probes: Option<Arc<ProbeSet>>,
        seconds: f64,
    },
    LensSaved {
        path: PathBuf,
    },
    LensFailed {
        error: String,
    },
    Trajectory {
        id: JobId,
        trajectory: Box<Trajectory>,
    },
    SteerToken {
        id: JobId,
        baseline: bool,
        step: TokenStep,
    },
    SteerFinished {
        id: JobId,
        baseline: bool,
        text: String,
        mode: ResponseMode,
        /// First-token refusal probability (`p([refuse])` or `P(R)`).
        refusal_probability: f32,
        /// Reply-inversion judgement, log p(yes) − log p(no).
        judgement: f32,
        /// From the steer request to the first token of this reply.
        first_token_seconds: f64,
        seconds: f64,
    },
    SweepProgress {
        id: JobId,
        done: usize,
        total: usize,
    },
    HeadsProgress {
        id: JobId,
        phase: String,
        done: usize,
        total: usize,
    },
    HeadsReady {
        id: JobId,
        metrics: Box<HeadMetrics>,
    },
    Cascade {
        id: JobId,
        gate: (usize, usize),
        cascade: HeadMap,
    },
    Swept {
        id: JobId,
        points: Vec<SweepPoint>,
    },
    Failed {
        id: JobId,
        error: String,
    },
}

/// The client side of the worker.
pub struct Worker {
    jobs: Sender<Job>,
    events: Receiver<Event>,
    /// Every job with an id at or below this is cancelled.
    cancel_through: Arc<AtomicU64>,
    /// The same for lens builds and sweeps, which a new generation does not supersede.
    lens_cancel_through: Arc<AtomicU64>,
    /// The same for steered replies, which supersede only each other.
    steer_cancel_through: Arc<AtomicU64>,
    next_id: JobId,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the worker thread. `notify` is called after every event (the GUI passes its
    /// repaint request so events show up at once).
    pub fn spawn(notify: impl Fn() + Send + 'static) -> Worker {
        let (jobs, job_rx) = crossbeam_channel::unbounded();
        let (event_tx, events) = crossbeam_channel::unbounded();
        let cancel_through = Arc::new(AtomicU64::new(0));
        let lens_cancel_through = Arc::new(AtomicU64::new(0));
        let steer_cancel_through = Arc::new(AtomicU64::new(0));
        let cancels = Cancels {
            jobs: cancel_through.clone(),
            lens: lens_cancel_through.clone(),
            steer: steer_cancel_through.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("refusal-lens-worker".into())
            .spawn(move || run(job_rx, event_tx, cancels, notify))
            .expect("spawning the worker thread");
        Worker {
            jobs,
            events,
            cancel_through,
            lens_cancel_through,
            steer_cancel_through,
            next_id: 0,
            thread: Some(thread),
        }
    }

    pub fn send(&self, job: Job) {
        // The worker only stops when this handle drops, so sending cannot fail while we exist.
        let _ = self.jobs.send(job);
    }

    pub fn load_model(&self, path: PathBuf, adapter: Option<PathBuf>) {
        self.send(Job::LoadModel { path, adapter });
    }

    /// Sends the job made with the next id and returns that id.
    fn queue(&mut self, job: impl FnOnce(JobId) -> Job) -> JobId {
        self.next_id += 1;
        self.send(job(self.next_id));
        self.next_id
    }

    /// Queues a generation, cancelling every earlier job (a newer request supersedes).
    pub fn generate(&mut self, request: GenerateRequest) -> JobId {
        self.cancel_through.store(self.next_id, Ordering::SeqCst);
        self.queue(|id| Job::Generate { id, request })
    }

    /// Queues a refusal-token training run.
    pub fn train(
        &mut self,
        train: Vec<PromptRecord>,
        val: Vec<PromptRecord>,
        options: TrainOptions,
        goal: GateGoal,
        out: PathBuf,
    ) -> JobId {
        self.queue(|id| Job::Train {
            id,
            train,
            val,
            options,
            goal,
            out,
        })
    }

    /// Queues a calibration sweep (it does not cancel anything).
    pub fn calibrate(&mut self, sets: Vec<(String, Vec<String>)>) -> JobId {
        self.queue(|id| Job::Calibrate { id, sets })
    }

    /// Cancels every job sent so far.
    pub fn cancel_all(&self) {
        self.cancel_through.store(self.next_id, Ordering::SeqCst);
        self.lens_cancel_through
            .store(self.next_id, Ordering::SeqCst);
        self.steer_cancel_through
            .store(self.next_id, Ordering::SeqCst);
    }

    /// Queues a steered reply (after the baseline, if asked), cancelling older steered
    /// replies: the text shown always belongs to the latest slider values.
    pub fn steer(&mut self, request: GenerateRequest, baseline: bool) -> JobId {
        self.steer_cancel_through
            .store(self.next_id, Ordering::SeqCst);
        self.queue(|id| Job::Steer {
            id,
            request,
            baseline,
        })
    }

    /// Queues a dose-response sweep (cancelled by [`Worker::cancel_lens`]).
    pub fn sweep(
        &mut self,
        prompts: Vec<String>,
        alphas: Vec<f32>,
        steering: Steering,
        tau: f32,
    ) -> JobId {
        self.queue(|id| Job::Sweep {
            id,
            prompts,
            alphas,
            steering,
            tau,
        })
    }

    /// Queues the per-head metrics of a pair (cancelled by [`Worker::cancel_lens`]).
    pub fn heads(&mut self, pairs: Vec<(String, String)>) -> JobId {
        self.queue(|id| Job::Heads { id, pairs })
    }

    /// Queues a knockout cascade (cancelled by [`Worker::cancel_lens`]).
    pub fn cascade(&mut self, harmful: String, gate: (usize, usize)) -> JobId {
        self.queue(|id| Job::Cascade { id, harmful, gate })
    }

    /// Queues a lens build (directions + probes); later generations do not cancel it.
    pub fn build_lens(
        &mut self,
        harmful: PromptSet,
        harmless: PromptSet,
        options: DirectionOptions,
    ) -> JobId {
        self.queue(|id| Job::BuildLens {
            id,
            harmful: Box::new(harmful),
            harmless: Box::new(harmless),
            options,
        })
    }

    pub fn cancel_lens(&self) {
        self.lens_cancel_through
            .store(self.next_id, Ordering::SeqCst);
    }

    /// Queues a trajectory (it does not cancel anything).
    pub fn trajectory(
        &mut self,
        system: Option<String>,
        prompt: String,
        reply: Vec<u32>,
        steering: Steering,
        layer: Option<usize>,
    ) -> JobId {
        self.queue(|id| Job::Trajectory {
            id,
            system,
            prompt,
            reply,
            steering,
            layer,
        })
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

/// Every per-head metric of one pair.
#[derive(Debug, Clone)]
pub struct HeadMetrics {
    /// The first pair (and how many pairs the metrics average over).
    pub harmful: String,
    pub harmless: String,
    pub pairs: usize,
    /// Mean DLA of the harmful prompt minus the harmless one's.
    pub dla: HeadMap,
    pub necessity: HeadMap,
    pub sufficiency: HeadMap,
    /// Attribution patching's estimate of `necessity`, and its Pearson r with it.
    pub attribution: HeadMap,
    pub attribution_r: f32,
    /// Change in the harmful prompt's refusal score when the head is zeroed.
    pub ablation: HeadMap,
    /// DLA of the harmful prompt plain minus Caesar-encoded (cipher contrast), or why it
    /// could not be computed (the encoded prompt states its key and may not fit the context).
    pub cipher: Result<HeadMap, String>,
    /// The gate/amplifier finder's answer.
    pub routing: Routing,
    /// The knockout cascade of `cascade_gate`: every head's DLA change with it zeroed.
    pub cascade: HeadMap,
    pub cascade_gate: (usize, usize),
    pub clean_harmful: f32,
    pub clean_harmless: f32,
    pub seconds: f64,
}

/// Emits `ok(value)`, or the error as [`Event::Failed`].
fn report<T>(
    emit: &dyn Fn(Event),
    id: JobId,
    result: Result<T, String>,
    ok: impl FnOnce(T) -> Event,
) {
    emit(match result {
        Ok(v) => ok(v),
        Err(error) => Event::Failed { id, error },
    })
}

/// Cancellation marks shared with the client.
struct Cancels {
    jobs: Arc<AtomicU64>,
    lens: Arc<AtomicU64>,
    steer: Arc<AtomicU64>,
}

/// The directions and probes of the model in use (dropped when the model changes).
#[derive(Default)]
struct Lens {
    directions: Option<Arc<Directions>>,
    probes: Option<Arc<ProbeSet>>,
}

/// The models the worker holds: the base, optionally an adapted one, and which is in use.
#[derive(Default)]
struct Models {
    base: Option<LoadedModel>,
    organism: Option<(LoadedModel, OrganismInfo)>,
    use_organism: bool,
}

impl Models {
    /// Runs `f` on the model in use; errors (and a missing model) as one-line text.
    fn with_active<T>(
        &self,
        f: impl FnOnce(&LoadedModel) -> refusal_lens_engine::Result<T>,
    ) -> Result<T, String> {
        let m = self
            .active()
            .ok_or_else(|| "no model is loaded".to_string())?;
        f(m).map_err(|e| e.to_string())
    }

    fn active(&self) -> Option<&LoadedModel> {
        match (&self.organism, self.use_organism) {
            (Some((m, _)), true) => Some(m),
            _ => self.base.as_ref(),
        }
    }

    fn loaded_event(&self, seconds: f64) -> Option<Event> {
        let active = self.active()?;
        Some(Event::ModelLoaded {
            card: Box::new(active.card.clone()),
            seconds,
            organism: self.organism.as_ref().map(|(_, info)| info.clone()),
            organism_active: self.use_organism && self.organism.is_some(),
        })
    }
}

fn load(
    path: &std::path::Path,
    adapter: Option<&std::path::Path>,
) -> refusal_lens_engine::Result<Models> {
    let base = LoadedModel::load(path, FastPrecision::Auto)?;
    let organism = match adapter {
        Some(dir) => {
            let a = Adapter::load(dir)?;
            let m = a.apply(&base)?;
            Some((
                m,
                OrganismInfo {
                    name: dir.display().to_string(),
                    metrics: a.meta.metrics.clone(),
                },
            ))
        }
        None => None,
    };
    Ok(Models {
        use_organism: organism.is_some(),
        base: Some(base),
        organism,
    })
}

fn run(jobs: Receiver<Job>, events: Sender<Event>, cancels: Cancels, notify: impl Fn()) {
    let cancel_through = cancels.jobs;
    let mut models = Models::default();
    let mut lens = Lens::default();
    let emit = |e: Event| {
        let _ = events.send(e);
        notify();
    };
    for job in jobs {
        let mut job_id = 0;
        // A panic inside a job (a bug) must not kill the worker: report it and keep serving.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job {
            Job::LoadModel { path, adapter } => {
                emit(Event::ModelLoading { path: path.clone() });
                let started = Instant::now();
                match load(&path, adapter.as_deref()) {
                    Ok(m) => {
                        models = m;
                        lens = Lens::default();
                        emit(
                            models
                                .loaded_event(started.elapsed().as_secs_f64())
                                .expect("a model was just loaded"),
                        );
                    }
                    Err(e) => emit(Event::ModelFailed {
                        path,
                        error: e.to_string(),
                    }),
                }
            }
            Job::UseModel { base, organism } => {
                lens = Lens::default();
                models = Models {
                    use_organism: organism.is_some(),
                    organism: organism.map(|m| {
                        (
                            *m,
                            OrganismInfo {
                                name: "in memory".into(),
                                metrics: serde_json::Value::Null,
                            },
                        )
                    }),
                    base: Some(*base),
                };
                emit(models.loaded_event(0.0).expect("a model was just set"));
            }
            Job::UseOrganism(on) => {
                if on != models.use_organism {
                    lens = Lens::default();
                }
                models.use_organism = on;
                if let Some(e) = models.loaded_event(0.0) {
                    emit(e);
                }
            }
            Job::Generate { id, request } => {
                job_id = id;
                if cancel_through.load(Ordering::SeqCst) >= id {
                    return; // superseded before it started
                }
                let result = models.with_active(|m| {
                    run_generate(
                        m,
                        lens.directions.as_deref(),
                        id,
                        &request,
                        &cancel_through,
                        &emit,
                    )
                });
                report(&emit, id, result, |generation| Event::Finished {
                    id,
                    generation: Box::new(generation),
                });
            }
            Job::Train {
                id,
                train,
                val,
                options,
                goal,
                out,
            } => {
                job_id = id;
                let started = Instant::now();
                let cancelled = || cancel_through.load(Ordering::SeqCst) >= id;
                let result = match &models.base {
                    None => Err("no model is loaded".to_string()),
                    Some(base) => {
                        train_refusal_tokens(base, &train, &options, &cancelled, &mut |p| {
                            emit(Event::Training {
                                id,
                                progress: p.clone(),
                            })
                        })
                        .and_then(|mut adapter| {
                            let organism =
                                adapter.apply_calibrated(base, &val, goal, &cancelled)?;
                            adapter.save(&out)?;
                            Ok((organism, adapter))
                        })
                        .map_err(|e| e.to_string())
                    }
                };
                match result {
                    Ok((organism, adapter)) => {
                        models.organism = Some((
                            organism,
                            OrganismInfo {
                                name: out.display().to_string(),
                                metrics: adapter.meta.metrics,
                            },
                        ));
                        models.use_organism = true;
                        emit(Event::Trained {
                            id,
                            out,
                            seconds: started.elapsed().as_secs_f64(),
                        });
                        if let Some(e) = models.loaded_event(0.0) {
                            emit(e);
                        }
                    }
                    Err(error) => emit(Event::Failed { id, error }),
                }
            }
            Job::BuildLens {
                id,
                harmful,
                harmless,
                options,
            } => {
                job_id = id;
                let started = Instant::now();
                let cancelled = || cancels.lens.load(Ordering::SeqCst) >= id;
                let result = models.with_active(|m| {
                    build_lens(m, id, &harmful, &harmless, &options, &cancelled, &emit)
                });
                match result {
                    Ok((directions, probes)) => {
                        lens.directions = Some(directions.clone());
                        lens.probes = Some(probes.clone());
                        emit(Event::LensReady {
                            id,
                            directions,
                            probes: Some(probes),
                            seconds: started.elapsed().as_secs_f64(),
                        });
                    }
                    Err(error) => emit(Event::LensFailed { error }),
                }
            }
            Job::ChooseLayer { layer } => match &lens.directions {
                Some(d) if layer < d.n_states => {
                    let mut d = (**d).clone();
                    d.layer = layer;
                    let directions = Arc::new(d);
                    lens.directions = Some(directions.clone());
                    emit(Event::LensReady {
                        id: 0,
                        directions,
                        probes: lens.probes.clone(),
                        seconds: 0.0,
                    });
                }
                _ => emit(Event::LensFailed {
                    error: format!("no directions with a layer {layer}"),
                }),
            },
            Job::SaveLens { path } => {
                let result = match &lens.directions {
                    None => Err("no directions to save yet".to_string()),
                    Some(d) => d
                        .save(&path)
                        .and_then(|_| match &lens.probes {
                            Some(p) => p.save(&probes_path(&path)),
                            None => Ok(()),
                        })
                        .map_err(|e| e.to_string()),
                };
                match result {
                    Ok(()) => emit(Event::LensSaved { path }),
                    Err(error) => emit(Event::LensFailed { error }),
                }
            }
            Job::LoadLens { path } => {
                let result = (|| -> refusal_lens_engine::Result<_> {
                    let m = models.active().ok_or_else(|| {
                        refusal_lens_engine::Error::InvalidInput("no model is loaded".into())
                    })?;
                    let d = Directions::load(&path)?;
                    d.check_fits(m)?;
                    let probes_file = probes_path(&path);
                    let p = if probes_file.exists() {
                        Some(Arc::new(ProbeSet::load(&probes_file)?))
                    } else {
                        None
                    };
                    Ok((Arc::new(d), p))
                })();
                match result {
                    Ok((directions, probes)) => {
                        lens.directions = Some(directions.clone());
                        lens.probes = probes.clone();
                        emit(Event::LensReady {
                            id: 0,
                            directions,
                            probes,
                            seconds: 0.0,
                        });
                    }
                    Err(e) => emit(Event::LensFailed {
                        error: format!("cannot load {}: {e}", path.display()),
                    }),
                }
            }
            Job::Steer {
                id,
                request,
                baseline,
            } => {
                job_id = id;
                let cancelled = || cancels.steer.load(Ordering::SeqCst) >= id;
                if cancelled() {
                    return;
                }
                let Some(m) = models.active() else {
                    emit(Event::Failed {
                        id,
                        error: "no model is loaded".into(),
                    });
                    return;
                };
                let dirs = lens.directions.as_deref();
                let requested = Instant::now();
                let runs: &[bool] = if baseline { &[true, false] } else { &[false] };
                for &is_baseline in runs {
                    let mut req = request.clone();
                    if is_baseline {
                        req.steering = Steering::default();
                    }
                    match run_steered(m, dirs, id, &req, is_baseline, requested, &cancelled, &emit)
                    {
                        Ok(()) => {}
                        Err(refusal_lens_engine::Error::Cancelled) => return,
                        Err(e) => {
                            emit(Event::Failed {
                                id,
                                error: e.to_string(),
                            });
                            return;
                        }
                    }
                }
            }
            Job::Sweep {
                id,
                prompts,
                alphas,
                steering,
                tau,
            } => {
                job_id = id;
                let cancelled = || cancels.lens.load(Ordering::SeqCst) >= id;
                let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
                let at = |alpha: f32| scale_additions(&steering, alpha);
                let result = models.with_active(|m| {
                    sweep(
                        m,
                        lens.directions.as_deref(),
                        &refs,
                        &alphas,
                        &at,
                        tau,
                        1,
                        &cancelled,
                        &mut |done, total| emit(Event::SweepProgress { id, done, total }),
                    )
                });
                report(&emit, id, result, |points| Event::Swept { id, points });
            }
            Job::Heads { id, pairs } => {
                job_id = id;
                let cancelled = || cancels.lens.load(Ordering::SeqCst) >= id;
                let result = models.with_active(|m| head_metrics(m, id, &pairs, &cancelled, &emit));
                report(&emit, id, result, |metrics| Event::HeadsReady {
                    id,
                    metrics: Box::new(metrics),
                });
            }
            Job::Cascade { id, harmful, gate } => {
                job_id = id;
                let cancelled = || cancels.lens.load(Ordering::SeqCst) >= id;
                let result = models.with_active(|m| {
                    refusal_lens_engine::analysis::heads::knockout_cascade(
                        m,
                        &[harmful.as_str()],
                        gate,
                        &cancelled,
                    )
                });
                report(&emit, id, result, |cascade| Event::Cascade {
                    id,
                    gate,
                    cascade,
                });
            }
            Job::Trajectory {
                id,
                system,
                prompt,
                reply,
                steering,
                layer,
            } => {
                job_id = id;
                let result = match (models.active(), &lens.directions) {
                    (None, _) => Err("no model is loaded".to_string()),
                    (_, None) => Err("compute or load directions first".to_string()),
                    (Some(m), Some(d)) => m
                        .chat_prompt(system.as_deref(), &prompt)
                        .and_then(|p| {
                            let hooks = steering.hooks(m, Some(d), &p, None)?;
                            trajectory(
                                m,
                                &p,
                                &reply,
                                lens.probes.as_deref(),
                                Some(d),
                                layer.unwrap_or(d.layer),
                                DEFAULT_CLIFF_K,
                                &hooks,
                            )
                        })
                        .map_err(|e| e.to_string()),
                };
                match result {
                    Ok(t) => emit(Event::Trajectory {
                        id,
                        trajectory: Box::new(t),
                    }),
                    Err(error) => emit(Event::Failed { id, error }),
                }
            }
            Job::Calibrate { id, sets } => {
                job_id = id;
                let result =
                    models.with_active(|m| run_calibrate(m, id, &sets, &cancel_through, &emit));
                report(&emit, id, result, |(signal, sets)| Event::Calibrated {
                    id,
                    signal,
                    sets,
                });
            }
        }));
        if let Err(panic) = outcome {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            emit(Event::Failed {
                id: job_id,
                error: format!("internal error: {msg}"),
            });
        }
    }
}

/// The generation settings of a request for `m`, its steering turned into hooks.
fn generate_config(
    m: &LoadedModel,
    dirs: Option<&Directions>,
    request: &GenerateRequest,
    prompt: &refusal_lens_engine::model::chat::ChatPrompt,
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

/// One reply of a steer job, streamed as [`Event::SteerToken`]s, then its summary.
#[allow(clippy::too_many_arguments)]
fn run_steered(
    m: &LoadedModel,
    dirs: Option<&Directions>,
    id: JobId,
    request: &GenerateRequest,
    baseline: bool,
    requested: Instant,
    cancelled: &dyn Fn() -> bool,
    emit: &dyn Fn(Event),
) -> refusal_lens_engine::Result<()> {
    let prompt = m.chat_prompt(request.system.as_deref(), &request.prompt)?;
    let cfg = generate_config(m, dirs, request, &prompt)?;
    let mut first_token_seconds = None;
    let g = generate(m, &prompt.ids, &cfg, cancelled, &mut |step| {
        first_token_seconds.get_or_insert_with(|| requested.elapsed().as_secs_f64());
        emit(Event::SteerToken {
            id,
            baseline,
            step: step.clone(),
        })
    })?;
    if cancelled() {
        return Err(refusal_lens_engine::Error::Cancelled);
    }
    let seconds = requested.elapsed().as_secs_f64();
    let judgement = steering_judgement(
        m,
        &request.steering,
        dirs,
        request.system.as_deref(),
        &request.prompt,
    )?;
    emit(Event::SteerFinished {
        id,
        baseline,
        mode: classify_reply(&g.text).mode,
        text: g.text,
        refusal_probability: g.refusal_probability.unwrap_or(f32::NAN),
        judgement,
        first_token_seconds: first_token_seconds.unwrap_or(seconds),
        seconds,
    });
    Ok(())
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

fn run_generate(
    m: &LoadedModel,
    dirs: Option<&Directions>,
    id: JobId,
    request: &GenerateRequest,
    cancel_through: &AtomicU64,
    emit: &dyn Fn(Event),
) -> refusal_lens_engine::Result<Generation> {
    let prompt = m.chat_prompt(request.system.as_deref(), &request.prompt)?;
    let prompt_tokens = prompt.ids.iter().map(|&t| (t, m.token_text(t))).collect();
    emit(Event::Started {
        id,
        prompt_tokens,
        t_inst: prompt.t_inst,
        t_post: prompt.t_post,
    });
    let cfg = generate_config(m, dirs, request, &prompt)?;
    let cancelled = || cancel_through.load(Ordering::SeqCst) >= id;
    generate(m, &prompt.ids, &cfg, &cancelled, &mut |step| {
        emit(Event::Token {
            id,
            step: step.clone(),
        })
    })
}

fn head_metrics(
    m: &LoadedModel,
    id: JobId,
    pairs: &[(String, String)],
    cancelled: &dyn Fn() -> bool,
    emit: &dyn Fn(Event),
) -> refusal_lens_engine::Result<HeadMetrics> {
    use refusal_lens_engine::analysis::heads::{
        ablation_effect, attribution_patching, cipher_contrast, correlation, dla, dla_difference,
        find_routing, interchange, Cipher, ScanAblation,
    };
    let (first_harmful, first_harmless) = pairs
        .first()
        .cloned()
        .ok_or_else(|| refusal_lens_engine::Error::InvalidInput("no pair chosen".into()))?;
    let started = Instant::now();
    let progress = |phase: String| {
        move |done: usize, total: usize| {
            emit(Event::HeadsProgress {
                id,
                phase: phase.clone(),
                done,
                total,
            })
        }
    };
    let harmful: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
    let harmless: Vec<&str> = pairs.iter().map(|p| p.1.as_str()).collect();
    let da = dla(
        m,
        &harmful,
        None,
        &[],
        cancelled,
        &mut progress("DLA".into()),
    )?;
    let db = dla(
        m,
        &harmless,
        None,
        &[],
        cancelled,
        &mut progress("DLA".into()),
    )?;
    let dla_diff = dla_difference(&da, &db)?;
    // Interchange and attribution per pair (each normalised by its own gap), then averaged.
    let (mut necessity, mut sufficiency, mut attribution) = (Vec::new(), Vec::new(), Vec::new());
    let (mut clean_harmful, mut clean_harmless) = (0.0, 0.0);
    for (i, (a, b)) in pairs.iter().enumerate() {
        let phase = format!("interchange, pair {}/{}", i + 1, pairs.len());
        let x = interchange(m, a, b, None, cancelled, &mut progress(phase))?;
        attribution.push(attribution_patching(m, a, b, Some(x.k))?.necessity);
        clean_harmful += x.clean_harmful / pairs.len() as f32;
        clean_harmless += x.clean_harmless / pairs.len() as f32;
        necessity.push(x.necessity);
        sufficiency.push(x.sufficiency);
    }
    let necessity = HeadMap::mean(&necessity)?;
    let attribution = HeadMap::mean(&attribution)?;
    let ablation = ablation_effect(
        m,
        &harmful,
        &ScanAblation::Scale(0.0),
        cancelled,
        &mut progress("ablation".into()),
    )?;
    let (routing, cascade) = find_routing(m, &first_harmful, &dla_diff, &necessity, cancelled)?;
    let cipher = cipher_contrast(m, &harmful, Cipher::Caesar, cancelled, &mut |_, _| {})
        .map_err(|e| e.to_string());
    Ok(HeadMetrics {
        attribution_r: correlation(&attribution, &necessity),
        attribution,
        dla: dla_diff,
        cipher,
        cascade_gate: routing.gate,
        routing,
        cascade,
        necessity,
        sufficiency: HeadMap::mean(&sufficiency)?,
        ablation,
        clean_harmful,
        clean_harmless,
        pairs: pairs.len(),
        harmful: first_harmful,
        harmless: first_harmless,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Where the probes of a directions file live: `name.safetensors` → `name.probes.safetensors`.
pub fn probes_path(directions: &std::path::Path) -> PathBuf {
    directions.with_extension("probes.safetensors")
}

fn build_lens(
    m: &LoadedModel,
    id: JobId,
    harmful: &PromptSet,
    harmless: &PromptSet,
    options: &DirectionOptions,
    cancelled: &dyn Fn() -> bool,
    emit: &dyn Fn(Event),
) -> refusal_lens_engine::Result<(Arc<Directions>, Arc<ProbeSet>)> {
    let cache = default_cache_dir();
    let mut progress = |phase: &str, done: usize, total: usize| {
        emit(Event::LensProgress {
            id,
            phase: phase.to_string(),
            done,
            total,
        })
    };
    // Both read the same states: collect (or load) them once.
    let job = ProbeJob {
        system: options.system.clone(),
        ..Default::default()
    };
    let states = lens::collect_pair(
        m,
        harmful,
        harmless,
        options.system.as_deref(),
        Some(&cache),
        cancelled,
        &mut progress,
    )?;
    let directions = lens::directions_from_states(
        m,
        harmful,
        harmless,
        &states,
        options,
        cancelled,
        &mut progress,
    )?;
    let probes = lens::probes_from_states(
        m,
        harmful,
        harmless,
        &states,
        &job,
        cancelled,
        &mut progress,
    )?;
    Ok((Arc::new(directions), Arc::new(probes)))
}

type CalibrationResult = (String, Vec<(String, Vec<f32>)>);

fn run_calibrate(
    m: &LoadedModel,
    id: JobId,
    sets: &[(String, Vec<String>)],
    cancel_through: &AtomicU64,
    emit: &dyn Fn(Event),
) -> refusal_lens_engine::Result<CalibrationResult> {
    let total: usize = sets.iter().map(|(_, p)| p.len()).sum();
    let cancelled = || cancel_through.load(Ordering::SeqCst) >= id;
    let mut done = 0;
    let mut out = Vec::with_capacity(sets.len());
    for (name, prompts) in sets {
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let ps = first_token_probabilities(m, &prompts, &cancelled, &mut |i, _| {
            emit(Event::Progress {
                id,
                done: done + i,
                total,
            })
        })?;
        done += prompts.len();
        out.push((name.clone(), ps));
    }
    let signal = refusal_lens_engine::refusal::RefusalSignal::for_model(m)?
        .describe()
        .to_string();
    Ok((signal, out))
}
