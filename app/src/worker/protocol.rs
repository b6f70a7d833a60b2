//! The worker protocol: the [`Job`]s a client sends and the [`Event`]s the worker answers
//! with. Every job gets a [`JobId`] when it is submitted and every event names the job it
//! belongs to, so a client routes events by id alone.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use refusal_lens_engine::analysis::compare::Comparison;
use refusal_lens_engine::analysis::directions::Directions;
use refusal_lens_engine::analysis::guard::GuardStudy;
use refusal_lens_engine::analysis::heads::{HeadMap, HeadMetrics};
use refusal_lens_engine::analysis::lens::DirectionOptions;
use refusal_lens_engine::analysis::probe::ProbeSet;
use refusal_lens_engine::analysis::steering::{Steering, SweepPoint};
use refusal_lens_engine::analysis::trajectory::Trajectory;
use refusal_lens_engine::data::prompts::{Jailbreak, PromptRecord, PromptSet};
use refusal_lens_engine::model::loader::ModelCard;
use refusal_lens_engine::organism::TrainOptions;
use refusal_lens_engine::refusal::response::ResponseMode;
use refusal_lens_engine::refusal::GateGoal;
use refusal_lens_engine::run::generate::{Generation, Sampling, TokenStep};
use refusal_lens_engine::LoadedModel;
pub use refusal_lens_engine::Progress;

/// A submitted job's id: increasing in submission order, so "every job up to this one" is
/// one number (how cancellation marks work).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub(super) u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job {}", self.0)
    }
}

/// One reply's settings: the prompt, decoding, the refusal control and the interventions.
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
    /// Run on this device from now on (`cpu`, `cuda:N`, `metal:N`): the loaded models move
    /// there, and later loads go there.
    UseDevice(String),
    /// Render chat prompts with thinking on or off (reasoning models' `enable_thinking`).
    SetThinking(bool),
    /// A reply, streamed token by token. Supersedes earlier replies, calibrations and
    /// training runs.
    Generate(GenerateRequest),
    /// A steered reply (and first, if asked, the unsteered baseline), each with its judgement.
    /// Supersedes earlier steer jobs only. Afterwards, while no job waits, the worker
    /// computes the prompt passes of the request under each stack of `ahead` in turn (the
    /// values the controls are likely to take next, nearest first), so that a reply under one
    /// of them starts at once.
    Steer {
        request: GenerateRequest,
        baseline: bool,
        ahead: Vec<Steering>,
    },
    /// Dose-response over prompts: the steering at each α.
    Sweep {
        prompts: Vec<String>,
        alphas: Vec<f32>,
        /// The edits at α = 1; every Add edit's α is multiplied by the sweep's α.
        steering: Steering,
        tau: f32,
    },
    /// Score every token of a prompt and its reply with the current probes and directions.
    Trajectory {
        system: Option<String>,
        prompt: String,
        reply: Vec<u32>,
        /// The interventions the reply was generated under (so is its trajectory).
        steering: Steering,
        /// Residual state of the curves (default: the directions' chosen layer).
        layer: Option<usize>,
    },
    /// First-token refusal probabilities of named prompt lists (calibration curves).
    Calibrate { sets: Vec<(String, Vec<String>)> },
    /// Fine-tune refusal tokens on the base model, save the adapter to `out`, and switch to it.
    Train {
        train: Vec<PromptRecord>,
        /// Held-out prompts the gate's τ is calibrated on (without harmful and harmless ones
        /// τ stays 0.5).
        val: Vec<PromptRecord>,
        options: TrainOptions,
        goal: GateGoal,
        out: PathBuf,
    },
    /// Directions and probes from a harmful and a harmless set (they replace the current ones).
    BuildLens {
        harmful: Box<PromptSet>,
        harmless: Box<PromptSet>,
        options: DirectionOptions,
        /// Where collected activations are cached (and found again).
        activation_cache: PathBuf,
    },
    /// Make this layer the directions' chosen layer (steering, saving and trajectories use it).
    ChooseLayer(usize),
    /// Save the current directions to the path (and the probes beside it).
    SaveLens(PathBuf),
    /// Load directions from the path (and probes from beside it, if there).
    LoadLens(PathBuf),
    /// Every per-head metric of (harmful, harmless) pairs, averaged over them.
    Heads { pairs: Vec<(String, String)> },
    /// The knockout cascade of a chosen gate head on a harmful prompt.
    Cascade {
        harmful: String,
        gate: (usize, usize),
    },
    /// Latent Guard: fit on the train split, choose on val, score the test split of the sets,
    /// the borderline set and the jailbreak-wrapped harmful prompts.
    Guard {
        harmful: Box<PromptSet>,
        harmless: Box<PromptSet>,
        borderline: Option<Box<PromptSet>>,
        jailbreaks: Vec<Jailbreak>,
        activation_cache: PathBuf,
    },
    /// The model in use against a second one on the sets (`analysis::compare`), and both
    /// replies to `prompt` when given.
    Compare {
        with: CompareWith,
        harmful: Box<PromptSet>,
        harmless: Box<PromptSet>,
        borderline: Option<Box<PromptSet>>,
        activation_cache: PathBuf,
        prompt: Option<String>,
        reply_tokens: usize,
    },
}

/// The second model of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum CompareWith {
    /// The other of base and organism: the model in use with its adapter taken off or put on.
    Counterpart,
    /// The model in use with the current refusal direction ablated from its weights.
    Abliterated,
    /// Another model file or folder.
    File(PathBuf),
}

/// Which cancellation mark a job watches (see `Worker::cancel_all` and
/// `Worker::cancel_analyses`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CancelGroup {
    /// Replies, calibration and training: stopped by `cancel_all` and by a newer Generate.
    Replies,
    /// Lens builds, sweeps and head scans: stopped by `cancel_analyses` and `cancel_all`.
    Analyses,
    /// Steered replies: stopped by a newer steer job and by `cancel_all`.
    Steer,
    /// Quick jobs that are never cancelled.
    None,
}

impl Job {
    /// Jobs that only read the models and the lens (their functions take `&State`); any
    /// other may change what a prompt pass computes (see `ahead`).
    pub(super) fn keeps_model_and_lens(&self) -> bool {
        matches!(
            self,
            Job::Generate(_)
                | Job::Steer { .. }
                | Job::Sweep { .. }
                | Job::Trajectory { .. }
                | Job::Calibrate { .. }
                | Job::Heads { .. }
                | Job::Cascade { .. }
                | Job::SaveLens(_)
        )
    }

    pub(super) fn cancel_group(&self) -> CancelGroup {
        match self {
            Job::Generate(_) | Job::Calibrate { .. } | Job::Train { .. } => CancelGroup::Replies,
            Job::BuildLens { .. }
            | Job::Sweep { .. }
            | Job::Heads { .. }
            | Job::Cascade { .. }
            | Job::Guard { .. }
            | Job::Compare { .. } => CancelGroup::Analyses,
            Job::Steer { .. } => CancelGroup::Steer,
            _ => CancelGroup::None,
        }
    }
}

/// The adapted model's name and held-out metrics, as the model card shows them.
#[derive(Debug, Clone)]
pub struct OrganismInfo {
    pub name: String,
    pub metrics: serde_json::Value,
}

/// What a steer job reports when one of its replies is done.
#[derive(Debug, Clone)]
pub struct SteeredReply {
    /// The unsteered baseline (true) or the steered reply.
    pub baseline: bool,
    pub text: String,
    pub mode: ResponseMode,
    /// First-token refusal probability (`p([refuse])` or `P(R)`).
    pub refusal_probability: f32,
    /// Reply-inversion judgement, log p(yes) − log p(no).
    pub judgement: f32,
    /// From the steer request to the first token of this reply.
    pub first_token_seconds: f64,
    /// Its prompt pass had been computed ahead (see `Job::Steer`).
    pub computed_ahead: bool,
    pub seconds: f64,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// Any job's progress.
    Progress {
        id: JobId,
        progress: Progress,
    },
    /// Any job's failure, as one line.
    Failed {
        id: JobId,
        error: String,
    },
    /// Any job's successful end: the last event of its id (a failed job's is `Failed`).
    Done {
        id: JobId,
    },
    /// Something the user should know that does not stop the job (an unusable cache folder).
    Notice {
        id: JobId,
        text: String,
    },
    ModelLoading {
        id: JobId,
        path: PathBuf,
    },
    /// The model in use changed (a load, a switch to or from the organism, a training run).
    ModelLoaded {
        id: JobId,
        card: Box<ModelCard>,
        /// Seconds the load from disk took (None for a model that was not loaded from disk).
        load_seconds: Option<f64>,
        organism: Option<OrganismInfo>,
        organism_active: bool,
    },
    /// A Generate job's prompt as the model sees it: templated token ids and their text.
    Prompt {
        id: JobId,
        prompt_tokens: Vec<(u32, String)>,
        t_inst: usize,
        t_post: usize,
    },
    /// One reply token (of a Generate job, or of a Steer job's steered or baseline reply).
    Token {
        id: JobId,
        baseline: bool,
        step: TokenStep,
        /// Seconds since the worker started the job (latency split: the rest of the wait
        /// from submit to arrival is queueing).
        worker_seconds: f64,
    },
    /// A Generate job's reply is complete.
    Finished {
        id: JobId,
        generation: Box<Generation>,
    },
    /// One of a Steer job's replies is complete.
    Steered {
        id: JobId,
        reply: SteeredReply,
    },
    Swept {
        id: JobId,
        points: Vec<SweepPoint>,
    },
    Trajectory {
        id: JobId,
        trajectory: Box<Trajectory>,
    },
    Calibrated {
        id: JobId,
        signal: String,
        sets: Vec<(String, Vec<f32>)>,
    },
    Trained {
        id: JobId,
        out: PathBuf,
        seconds: f64,
    },
    /// New directions and (when built or found) probes for the model in use.
    LensReady {
        id: JobId,
        directions: Arc<Directions>,
        probes: Option<Arc<ProbeSet>>,
        /// Seconds the build took (None for a loaded file or a new chosen layer).
        build_seconds: Option<f64>,
        /// The file it was loaded from (None: built, or a new chosen layer).
        file: Option<PathBuf>,
    },
    LensSaved {
        id: JobId,
        path: PathBuf,
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
    GuardReady {
        id: JobId,
        study: Box<GuardStudy>,
    },
    Compared {
        id: JobId,
        comparison: Box<Comparison>,
        /// The first and the second model's replies to the job's prompt.
        replies: Option<[String; 2]>,
    },
}

impl Event {
    /// The job this event belongs to.
    pub fn id(&self) -> JobId {
        use Event::*;
        match self {
            Progress { id, .. }
            | Failed { id, .. }
            | Notice { id, .. }
            | Done { id }
            | ModelLoading { id, .. }
            | ModelLoaded { id, .. }
            | Prompt { id, .. }
            | Token { id, .. }
            | Finished { id, .. }
            | Steered { id, .. }
            | Swept { id, .. }
            | Trajectory { id, .. }
            | Calibrated { id, .. }
            | Trained { id, .. }
            | LensReady { id, .. }
            | LensSaved { id, .. }
            | HeadsReady { id, .. }
            | Cascade { id, .. }
            | GuardReady { id, .. }
            | Compared { id, .. } => *id,
        }
    }
}
