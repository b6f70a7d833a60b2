//! Headless subcommands: every GUI action is also a command, one module per group. Errors
//! print as one line and exit non-zero.

mod abliterate;
mod compare;
mod guard;
mod heads;
mod lens;
mod model;
mod organism;
mod prompts;
mod steer;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use refusal_lens_engine::device::parse_device;
use refusal_lens_engine::model::{ExactWeights, FastPrecision};
use refusal_lens_engine::organism::Adapter;
use refusal_lens_engine::{default_model_path, LoadedModel};

use crate::session_file::SessionFile;

pub use heads::parse_head;
pub use lens::{progress_bar, SetPair};
pub use steer::parse_layers;

#[derive(Parser, Debug)]
#[command(
    name = "refusal-lens",
    version,
    about = "See and steer how chat LLMs decide to refuse.",
    long_about = "See and steer how chat LLMs decide to refuse.\n\nWith no subcommand, opens the GUI on the default model (SmolLM2-135M-Instruct Q4_1). \
Every GUI action is also a subcommand; add --json for machine-readable output."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The model: a GGUF file or an HF safetensors folder (default: the cached default model).
    #[arg(long, global = true)]
    pub model: Option<PathBuf>,
    /// Refusal-token adapter to apply (a folder with adapter.json). The default model gets the
    /// project's organism adapter (assets/organism) unless --base is given.
    #[arg(long, global = true)]
    pub adapter: Option<PathBuf>,
    /// Use the model without any adapter.
    #[arg(long, global = true)]
    pub base: bool,
    /// How the exact path holds the weights: f32 (fastest analyses, 4 bytes per parameter),
    /// stored (as in the checkpoint, dequantised per matrix on use), or auto (f32 up to a
    /// 2 GiB copy, else stored).
    #[arg(long, global = true, default_value = "auto", value_parser = parse_exact_weights)]
    pub exact_weights: ExactWeights,
    /// Reasoning models: render chat prompts with thinking on (the template's
    /// `enable_thinking`, e.g. Qwen3), so replies start with a <think> … </think> span.
    #[arg(long, global = true)]
    pub think: bool,
    /// After the gate chose [respond], let the adapter's own blocks write the answer (by
    /// default the base model's blocks write it: the adapter only decides).
    #[arg(long, global = true)]
    pub adapter_answers: bool,
    /// A session saved by the GUI: its model and adapter (unless --model/--adapter/--base say
    /// otherwise) and, for trajectory and cliff-rank, its directions and probes. Every file it
    /// names is checked against the hash it was saved with.
    #[arg(long, global = true)]
    pub session: Option<PathBuf>,
    /// Where the model runs: cpu, cuda, cuda:N, metal or metal:N (a GPU needs a build with
    /// `--features cuda` or `--features metal`).
    #[arg(long, global = true, default_value = "cpu")]
    pub device: String,
}

impl Cli {
    /// The model choice the flags (and the session, if given) make.
    pub fn model_choice(&self) -> Result<ModelChoice> {
        let mut choice = ModelChoice {
            model: self.model.clone(),
            adapter: self.adapter.clone(),
            base: self.base,
            exact_weights: self.exact_weights,
            think: self.think,
            adapter_answers: self.adapter_answers,
            session: None,
            session_path: self.session.clone(),
            device: self.device.clone(),
        };
        if let Some(path) = &self.session {
            let session = SessionFile::open(path)?;
            if choice.model.is_none() {
                choice.model = Some(session.model.file.path.clone());
                if choice.adapter.is_none() && !choice.base {
                    match (&session.model.adapter, session.model.adapter_active) {
                        (Some(a), true) => choice.adapter = Some(a.path.clone()),
                        _ => choice.base = true,
                    }
                }
            }
            choice.session = Some(session);
        }
        Ok(choice)
    }
}

fn parse_exact_weights(s: &str) -> std::result::Result<ExactWeights, String> {
    ExactWeights::parse(s).ok_or_else(|| format!("`{s}`: expected auto, f32 or stored"))
}

/// Which model and adapter a command runs on.
#[derive(Debug, Clone, Default)]
pub struct ModelChoice {
    pub model: Option<PathBuf>,
    pub adapter: Option<PathBuf>,
    pub base: bool,
    pub exact_weights: ExactWeights,
    pub think: bool,
    pub adapter_answers: bool,
    /// The session given with --session (read and checked) …
    pub session: Option<SessionFile>,
    /// … and its path (the GUI opens it).
    pub session_path: Option<PathBuf>,
    /// `--device`, as given.
    pub device: String,
}

impl ModelChoice {
    /// The adapter to apply: the one given, else the organism for the default model.
    pub fn adapter_dir(&self) -> Option<PathBuf> {
        if self.base {
            return None;
        }
        self.adapter.clone().or_else(|| {
            let organism = refusal_lens_engine::organism_dir();
            (self.model.is_none()
                && organism
                    .join(refusal_lens_engine::organism::META_FILE)
                    .exists())
            .then_some(organism)
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the model card: architecture, shape, vocabulary, context, quantisation, template.
    Info(model::InfoArgs),
    /// Generate a reply to a prompt (streamed).
    Generate(model::GenerateArgs),
    /// Capture activations at hook points and write them to a safetensors file.
    Activations(model::ActivationsArgs),
    /// Measure tokens/s: prefill, generation, steered generation, forward with captures.
    Bench(model::BenchArgs),
    /// Read a prompt set (JSONL, CSV/TSV, JSON array or TXT) and summarise or convert it.
    Prompts(prompts::PromptsArgs),
    /// Classify a reply into a response mode (refusal, evasion, constructive, compliance).
    Classify(prompts::ClassifyArgs),
    /// Fine-tune refusal tokens ([refuse]/[respond]) on the prompt sets' train split.
    TrainRefusalTokens(organism::TrainArgs),
    /// Sweep the refusal threshold τ and print the refusal rate of each set (and category).
    Calibrate(organism::CalibrateArgs),
    /// Refusal (t_post) and harmfulness (t_inst) directions at every layer, by difference in
    /// means of two prompt sets; the layer chosen by ablation on held-out prompts.
    Directions(lens::DirectionsArgs),
    /// First-token refusal score (log-odds of refusing) of a prompt or a set.
    Score(lens::ScoreArgs),
    /// Train refusal probes (logistic or MLP) at every layer; held-out accuracy and AUC.
    Probe(lens::ProbeArgs),
    /// Probe score and direction projections at every token of a prompt and its reply.
    Trajectory(lens::TrajectoryArgs),
    /// Rank a prompt set by refusal-cliff magnitude (or final score) and export the top.
    CliffRank(lens::CliffRankArgs),
    /// Dose-response: refusal rate, refusal score, judgement and response modes vs α.
    Sweep(steer::SweepArgs),
    /// Export a steering vector as a llama.cpp control vector (GGUF).
    ControlVector(steer::ControlVectorArgs),
    /// Per-head attribution (layers × heads, top heads): dla, interchange, attribution,
    /// ablation, suppression, cascade/routing, cipher.
    Heads(heads::HeadsArgs),
    /// Latent Guard: harmfulness at t_inst as a harmful-input detector, beside refusal-based
    /// detection, on plain and jailbreak-wrapped prompts (fit, eval, scatter).
    Guard(guard::GuardArgs),
    /// Bake the directional ablation of the refusal direction into the weights and write a
    /// GGUF llama.cpp loads; reports its KL and refusal rate.
    ExportAblated(abliterate::ExportAblatedArgs),
    /// Two models side by side (another model, the model without its adapter, or with the
    /// refusal direction ablated): per-layer direction cosines, each guard on the other's
    /// prompts, refusal rates, replies.
    Compare(compare::CompareArgs),
}

/// Runs a subcommand; the caller prints the error chain on one line and exits 1.
pub fn run(command: Command, choice: ModelChoice) -> Result<()> {
    // Commands that need no model.
    let command = match command {
        Command::Prompts(a) => return prompts::prompts(a),
        Command::Classify(a) => return prompts::classify(a),
        other => other,
    };
    let device = parse_device(&choice.device).context("--device")?;
    let path = choice.model.clone().unwrap_or_else(default_model_path);
    let mut lm = load(&path, choice.exact_weights, json_of(&command))?;
    if choice.think && !lm.template.supports_thinking() {
        bail!("--think: this model's chat template has no thinking (neither enable_thinking nor <think>)");
    }
    lm.template.enable_thinking = choice.think;
    // Models load (and adapters apply) on the CPU, then move whole to the device.
    let on_device = |lm: LoadedModel| -> Result<LoadedModel> {
        lm.into_device(&device)
            .with_context(|| format!("cannot move the model to {}", choice.device))
    };
    if let Command::TrainRefusalTokens(a) = command {
        return organism::train(&on_device(lm)?, a);
    }
    let mut base = None;
    if let Some(dir) = choice.adapter_dir() {
        let adapter = Adapter::load(&dir)
            .with_context(|| format!("cannot read the adapter in {}", dir.display()))?;
        let adapted = adapter.apply(&lm)?;
        base = Some(on_device(std::mem::replace(&mut lm, adapted))?);
        if choice.adapter_answers {
            lm.respond_blocks = None;
        }
    }
    let lm = on_device(lm)?;
    match command {
        Command::Info(a) => model::info(&lm, a),
        Command::Generate(a) => model::reply(&lm, a),
        Command::Activations(a) => model::activations(&lm, a),
        Command::Bench(a) => model::bench(&lm, a),
        Command::Calibrate(a) => organism::calibrate(&lm, choice.adapter_dir().as_deref(), a),
        Command::Directions(a) => lens::directions(&lm, a),
        Command::Score(a) => lens::score(&lm, a),
        Command::Probe(a) => lens::probe(&lm, a),
        Command::Trajectory(mut a) => {
            a.lens.fill_from(choice.session.as_ref());
            lens::run_trajectory(&lm, a)
        }
        Command::CliffRank(mut a) => {
            a.lens.fill_from(choice.session.as_ref());
            lens::cliff_rank(&lm, a)
        }
        Command::Sweep(a) => steer::run_sweep(&lm, a),
        Command::ControlVector(a) => steer::control_vector(&lm, a),
        Command::Heads(a) => heads::run(&lm, a),
        Command::Guard(a) => guard::run(&lm, a),
        Command::ExportAblated(a) => abliterate::run(&lm, a),
        Command::Compare(a) => compare::run(&lm, base.as_ref(), a, &choice),
        Command::Prompts(_) | Command::Classify(_) | Command::TrainRefusalTokens(_) => {
            unreachable!("handled above")
        }
    }
}

fn json_of(c: &Command) -> bool {
    match c {
        Command::Info(a) => a.json,
        Command::Generate(a) => a.json,
        Command::Activations(a) => a.json,
        Command::Bench(a) => a.json,
        Command::Prompts(a) => a.json,
        Command::Classify(a) => a.json,
        Command::TrainRefusalTokens(a) => a.json,
        Command::Calibrate(a) => a.json,
        Command::Directions(a) => a.json,
        Command::Score(a) => a.json,
        Command::Probe(a) => a.json,
        Command::Trajectory(a) => a.json,
        Command::CliffRank(a) => a.json,
        Command::Sweep(a) => a.json,
        Command::ControlVector(_) => false,
        Command::Heads(a) => a.json,
        Command::ExportAblated(a) => a.json,
        Command::Compare(a) => a.json,
        Command::Guard(a) => match &a.action {
            guard::GuardAction::Fit(a) => a.json,
            guard::GuardAction::Eval(a) => a.json,
            guard::GuardAction::Scatter(a) => a.json,
        },
    }
}

/// A spinner on stderr while loading, only when stderr is a terminal.
pub(crate) fn spinner(message: String, quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new_spinner().with_message(message);
    pb.enable_steady_tick(Duration::from_millis(100));
    Some(pb)
}

pub fn load(path: &std::path::Path, exact: ExactWeights, quiet: bool) -> Result<LoadedModel> {
    let pb = spinner(format!("loading {}", path.display()), quiet);
    let lm = LoadedModel::load_with(path, FastPrecision::Auto, exact)
        .context("cannot open the model")?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(lm)
}
