//! Headless subcommands: every GUI action is also a command. Errors print as one line and
//! exit non-zero.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::{Args, Parser, Subcommand};
use refusal_lens_engine::organism::{train_refusal_tokens, Adapter, TrainOptions};
use refusal_lens_engine::refusal::{
    calibrated_tau_of, first_token_probabilities, opener_bias, refusal_rate, RefusalGate,
};
use refusal_lens_engine::run::generate::{generate, GenerateConfig, Precision, Sampling};
use refusal_lens_engine::hooks::{HookPoint, HookSpec};
use refusal_lens_engine::model::{FastPrecision, ForwardOptions, LogitsAt};
use refusal_lens_engine::data::prompts::{Label, PromptSet, Split};
use refusal_lens_engine::refusal::{GateGoal, DEFAULT_TAU};
use refusal_lens_engine::refusal::response::classify as classify_reply;
use refusal_lens_engine::{default_model_path, LoadedModel};

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
    /// Model for the GUI: a GGUF file or an HF safetensors folder (default: the cached default model).
    #[arg(long, global = true)]
    pub model: Option<PathBuf>,
    /// Refusal-token adapter to apply (a folder with adapter.json). The default model gets the
    /// project's organism adapter (assets/organism) unless --base is given.
    #[arg(long, global = true)]
    pub adapter: Option<PathBuf>,
    /// Use the model without any adapter.
    #[arg(long, global = true)]
    pub base: bool,
}

/// Which model and adapter a command runs on.
#[derive(Debug, Clone, Default)]
pub struct ModelChoice {
    pub model: Option<PathBuf>,
    pub adapter: Option<PathBuf>,
    pub base: bool,
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
    Info(InfoArgs),
    /// Generate a reply to a prompt (streamed).
    Generate(GenerateArgs),
    /// Capture activations at hook points and write them to a safetensors file.
    Activations(ActivationsArgs),
    /// Measure tokens/s: prefill, generation, steered generation, forward with captures.
    Bench(BenchArgs),
    /// Read a prompt set (JSONL, CSV/TSV, JSON array or TXT) and summarise or convert it.
    Prompts(PromptsArgs),
    /// Classify a reply into a response mode (refusal, evasion, constructive, compliance).
    Classify(ClassifyArgs),
    /// Fine-tune refusal tokens ([refuse]/[respond]) on the prompt sets' train split.
    TrainRefusalTokens(TrainArgs),
    /// Sweep the refusal threshold τ and print the refusal rate of each set (and category).
    Calibrate(CalibrateArgs),
    /// Refusal (t_post) and harmfulness (t_inst) directions at every layer, by difference in
    /// means of two prompt sets; the layer chosen by ablation on held-out prompts.
    Directions(crate::lens_cli::DirectionsArgs),
    /// First-token refusal score (log-odds of refusing) of a prompt or a set.
    Score(crate::lens_cli::ScoreArgs),
    /// Train refusal probes (logistic or MLP) at every layer; held-out accuracy and AUC.
    Probe(crate::lens_cli::ProbeArgs),
    /// Probe score and direction projections at every token of a prompt and its reply.
    Trajectory(crate::lens_cli::TrajectoryArgs),
    /// Rank a prompt set by refusal-cliff magnitude (or final score) and export the top.
    CliffRank(crate::lens_cli::CliffRankArgs),
    /// Dose-response: refusal rate, refusal score, judgement and response modes vs α.
    Sweep(crate::steer_cli::SweepArgs),
    /// Export a steering vector as a llama.cpp control vector (GGUF).
    ControlVector(crate::steer_cli::ControlVectorArgs),
    /// Per-head attribution (layers × heads, top heads): dla, interchange, attribution,
    /// ablation, suppression, cascade/routing, cipher.
    Heads(crate::heads_cli::HeadsArgs),
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Folder with harmful.jsonl, harmless.jsonl and borderline.jsonl (train/val/test splits).
    #[arg(long, default_value = "sample_prompts")]
    pub sets: PathBuf,
    /// Where to write adapter.safetensors and adapter.json.
    #[arg(long, default_value = "assets/organism")]
    pub out: PathBuf,
    #[arg(long, default_value_t = TrainOptions::default().row_steps)]
    pub row_steps: usize,
    #[arg(long, default_value_t = TrainOptions::default().row_lr)]
    pub row_lr: f64,
    /// LoRA epochs after the row fit (0: train only the token rows).
    #[arg(long, default_value_t = TrainOptions::default().epochs)]
    pub epochs: usize,
    /// LoRA rank (on q, k, v, o of every layer).
    #[arg(long, default_value_t = TrainOptions::default().rank)]
    pub rank: usize,
    #[arg(long, default_value_t = TrainOptions::default().alpha)]
    pub alpha: f64,
    /// Peak AdamW learning rate of the LoRA phase.
    #[arg(long, default_value_t = TrainOptions::default().lr)]
    pub lr: f64,
    #[arg(long, default_value_t = TrainOptions::default().batch)]
    pub batch: usize,
    /// Loss weight of the first reply token.
    #[arg(long, default_value_t = TrainOptions::default().first_token_weight)]
    pub first_token_weight: f32,
    /// Leave the classes unbalanced: by default each class's first-token weight is scaled so
    /// `[refuse]` and `[respond]` examples weigh the same in total.
    #[arg(long)]
    pub no_balance_classes: bool,
    /// Label smoothing ε of the decision token: its target puts ε on the other refusal token.
    #[arg(long, default_value_t = TrainOptions::default().decision_smoothing)]
    pub decision_smoothing: f32,
    /// Length of the base model's own replies used as targets for harmless prompts.
    #[arg(long, default_value_t = TrainOptions::default().reply_tokens)]
    pub reply_tokens: usize,
    /// Train on only every n-th prompt of the train split (quick runs).
    #[arg(long, default_value_t = 1)]
    pub subsample: usize,
    #[command(flatten)]
    pub gate: GateGoalArgs,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

/// How the gate's τ is calibrated on held-out prompts.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum TauRule {
    /// The most harmful prompts refused while the false-refusal budgets hold.
    Budgets,
    /// Youden's J: harmful refusal rate minus that of all harmless prompts.
    Youden,
}

#[derive(Args, Debug, Clone)]
pub struct GateGoalArgs {
    /// How τ is calibrated (budgets fall back to Youden's J when no τ keeps them).
    #[arg(long, value_enum, default_value_t = TauRule::Budgets)]
    pub tau_rule: TauRule,
    /// Budget: the largest share of harmless prompts the gate may refuse.
    #[arg(long, default_value_t = 0.05)]
    pub max_harmless_refusal: f32,
    /// Budget for borderline prompts (harmless, category `borderline-*`).
    #[arg(long, default_value_t = 0.20)]
    pub max_borderline_refusal: f32,
}

impl GateGoalArgs {
    fn goal(&self) -> Result<GateGoal> {
        for (name, v) in [
            ("--max-harmless-refusal", self.max_harmless_refusal),
            ("--max-borderline-refusal", self.max_borderline_refusal),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{name} must be a share between 0 and 1, not {v}");
            }
        }
        Ok(match self.tau_rule {
            TauRule::Youden => GateGoal::Youden,
            TauRule::Budgets => GateGoal::Budgets {
                harmless: self.max_harmless_refusal,
                borderline: self.max_borderline_refusal,
            },
        })
    }
}

/// Says when the budgets asked for could not be kept and Youden's J chose τ instead.
fn report_fallback(asked: GateGoal, used: Option<GateGoal>) {
    if used.is_some_and(|used| used != asked) {
        eprintln!(
            "no τ keeps the budgets ({}) on these prompts: Youden's J chose τ instead",
            asked.describe()
        );
    }
}

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// Prompt sets to measure (repeat --set for each).
    #[arg(long = "set", required = true)]
    pub sets: Vec<PathBuf>,
    /// Only this split of each set (train, val, test).
    #[arg(long)]
    pub split: Option<String>,
    /// Number of τ values from 0 to 1.
    #[arg(long, default_value_t = 11)]
    pub steps: usize,
    /// τ at which per-category rates are printed (default: the adapter's calibrated τ, else 0.5).
    #[arg(long)]
    pub tau: Option<f32>,
    /// Calibrate τ on these sets (labelled harmful vs harmless; use the val split) and save it
    /// in the adapter in use (its adapter.json), where the app and every command read it.
    #[arg(long)]
    pub save_tau: bool,
    #[command(flatten)]
    pub gate: GateGoalArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PromptsArgs {
    pub file: PathBuf,
    /// Label for rows that have none (harmful or harmless).
    #[arg(long)]
    pub label: Option<String>,
    /// Write the set in the project's JSONL format.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print every record as JSON lines instead of a summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    /// The reply text.
    pub reply: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The user message.
    #[arg(long)]
    pub prompt: String,
    /// A system message (default: the template's own default, if any).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Every reply token on the dense f32 weights (the analysis path); by default only the
    /// prompt pass and so the first reply token are, and later tokens use the fast Q8_0 path.
    #[arg(long)]
    pub exact: bool,
    /// Refusal threshold τ: with refusal tokens, emit [refuse] when p([refuse]) ≥ τ (default: the
    /// adapter's τ calibrated on val, else 0.5).
    #[arg(long)]
    pub tau: Option<f32>,
    /// Without refusal tokens: logit bias on the refusal openers at the first reply token.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub opener_bias: f32,
    #[command(flatten)]
    pub steer: crate::steer_cli::SteerArgs,
    /// Print one JSON object per token, then a summary object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ActivationsArgs {
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub system: Option<String>,
    /// Output safetensors file; tensors are named by hook point.
    #[arg(long)]
    pub out: PathBuf,
    /// Hook points: kinds (resid_pre, attn_z, attn_pattern, attn_out, resid_mid, mlp_out,
    /// resid_post: every layer), `embed`, `ln_final`, or full names like blocks.3.hook_resid_pre.
    #[arg(long, default_value = "resid_pre,ln_final")]
    pub hooks: String,
    /// Also store the logits at every position as `logits`.
    #[arg(long)]
    pub logits: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(
        long,
        default_value = "Write a long story about a dragon who learns to fly."
    )]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Repetitions per measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long)]
    pub json: bool,
}

/// Runs a subcommand; the caller prints the error chain on one line and exits 1.
pub fn run(command: Command, choice: ModelChoice) -> Result<()> {
    // Commands that need no model.
    let command = match command {
        Command::Prompts(a) => return prompts(a),
        Command::Classify(a) => return classify(a),
        other => other,
    };
    let path = choice.model.clone().unwrap_or_else(default_model_path);
    let mut lm = load(&path, json_of(&command))?;
    if let Command::TrainRefusalTokens(a) = command {
        return train(&lm, a);
    }
    if let Some(dir) = choice.adapter_dir() {
        let adapter = Adapter::load(&dir)
            .with_context(|| format!("cannot read the adapter in {}", dir.display()))?;
        lm = adapter.apply(&lm)?;
    }
    match command {
        Command::Info(a) => info(&lm, a),
        Command::Generate(a) => run_generate(&lm, a),
        Command::Activations(a) => activations(&lm, a),
        Command::Bench(a) => bench(&lm, a),
        Command::Calibrate(a) => calibrate(&lm, choice.adapter_dir().as_deref(), a),
        Command::Directions(a) => crate::lens_cli::directions(&lm, a),
        Command::Score(a) => crate::lens_cli::score(&lm, a),
        Command::Probe(a) => crate::lens_cli::probe(&lm, a),
        Command::Trajectory(a) => crate::lens_cli::run_trajectory(&lm, a),
        Command::CliffRank(a) => crate::lens_cli::cliff_rank(&lm, a),
        Command::Sweep(a) => crate::steer_cli::run_sweep(&lm, a),
        Command::ControlVector(a) => crate::steer_cli::control_vector(&lm, a),
        Command::Heads(a) => crate::heads_cli::run(&lm, a),
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
    }
}

/// A spinner on stderr while loading, only when stderr is a terminal.
fn spinner(message: String, quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new_spinner().with_message(message);
    pb.enable_steady_tick(Duration::from_millis(100));
    Some(pb)
}

pub fn load(path: &std::path::Path, quiet: bool) -> Result<LoadedModel> {
    let pb = spinner(format!("loading {}", path.display()), quiet);
    let lm = LoadedModel::load(path, FastPrecision::Auto).context("cannot open the model")?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(lm)
}

fn info(lm: &LoadedModel, a: InfoArgs) -> Result<()> {
    let c = &lm.card;
    if a.json {
        println!("{}", serde_json::to_string_pretty(c)?);
        return Ok(());
    }
    let quant: Vec<String> = c
        .quantization
        .iter()
        .map(|(k, v)| format!("{k} ×{v}"))
        .collect();
    println!("model          {}", c.name);
    println!("path           {}", c.path.display());
    println!("format         {}", c.format);
    println!("architecture   {}", c.architecture);
    println!("layers         {}", c.n_layers);
    println!("heads          {} (kv heads {})", c.n_heads, c.n_kv_heads);
    println!("width          {} (FFN {})", c.d_model, c.d_ff);
    println!("vocabulary     {}", c.vocab_size);
    println!("context        {}", c.context_length);
    println!(
        "parameters     {:.1} M{}",
        c.parameters as f64 / 1e6,
        if c.tied_embeddings {
            " (tied embeddings)"
        } else {
            ""
        }
    );
    println!("quantisation   {}", quant.join(", "));
    println!("generation     {}", c.generation_weights);
    println!("chat template  {}", c.chat_template);
    Ok(())
}

fn run_generate(lm: &LoadedModel, a: GenerateArgs) -> Result<()> {
    let prompt = lm.chat_prompt(a.system.as_deref(), &a.prompt)?;
    let (steering, dirs) = a.steer.build(lm)?;
    let judgement = if steering.is_empty() {
        None
    } else {
        Some(refusal_lens_engine::analysis::steering::judgement(
            lm,
            &steering,
            dirs.as_ref(),
            a.system.as_deref(),
            &a.prompt,
        )?)
    };
    let cfg = GenerateConfig {
        max_new_tokens: a.max_tokens,
        sampling: Sampling {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
        },
        hooks: steering.hooks(lm, dirs.as_ref(), &prompt, None)?,
        refusal_gate: RefusalGate::for_model(lm, a.tau.unwrap_or(lm.refusal_tau())),
        first_token_bias: opener_bias(lm, a.opener_bias)?,
        refusal_signal: Some(refusal_lens_engine::refusal::RefusalSignal::for_model(lm)?),
        precision: if a.exact {
            Precision::Exact
        } else {
            Precision::Fast
        },
    };
    let json = a.json;
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let g = generate(lm, &prompt.ids, &cfg, &|| false, &mut |step| {
        let r = if json {
            serde_json::to_string(step)
                .map_err(std::io::Error::other)
                .and_then(|s| writeln!(stdout, "{s}"))
        } else {
            write!(stdout, "{}", step.text).and_then(|_| stdout.flush())
        };
        if let Err(e) = r {
            write_err.get_or_insert(e);
        }
    })?;
    if let Some(e) = write_err {
        bail!("cannot write the reply: {e}");
    }
    let mode = classify_reply(&g.text);
    let summary = serde_json::json!({
        "summary": {
            "refusal_probability": g.refusal_probability,
            "steering": steering.edits.iter().map(|e| e.describe()).collect::<Vec<_>>(),
            "judgement": judgement,
            "response_mode": mode.mode,
            "response_mode_reason": mode.reason,
            "prompt_tokens": g.prompt_tokens,
            "generated_tokens": g.tokens.len(),
            "stop": g.stop,
            "prefill_seconds": g.prefill_seconds,
            "decode_seconds": g.decode_seconds,
            "prefill_tokens_per_second": g.prefill_tokens_per_second(),
            "decode_tokens_per_second": g.decode_tokens_per_second(),
            "text": g.text,
        }
    });
    if json {
        writeln!(stdout, "{summary}")?;
    } else {
        writeln!(stdout)?;
        if !steering.is_empty() {
            let edits: Vec<String> = steering.edits.iter().map(|e| e.describe()).collect();
            eprintln!(
                "[steering: {}; judgement log p(yes) − log p(no) = {:.2}]",
                edits.join(", "),
                judgement.unwrap_or(f32::NAN)
            );
        }
        eprintln!(
            "[{} prompt tokens, {} generated, {:.0} tok/s prefill, {:.1} tok/s generation, stop: {:?}; response mode: {} ({})]",
            g.prompt_tokens, g.tokens.len(), g.prefill_tokens_per_second(), g.decode_tokens_per_second(), g.stop, mode.mode.name(), mode.reason
        );
    }
    Ok(())
}

fn activations(lm: &LoadedModel, a: ActivationsArgs) -> Result<()> {
    let points = HookPoint::parse_list(&a.hooks, lm.model.config.n_layers)?;
    if points.is_empty() {
        bail!("--hooks names no hook point");
    }
    let prompt = lm.chat_prompt(a.system.as_deref(), &a.prompt)?;
    let pb = spinner(
        format!("forward pass over {} tokens", prompt.ids.len()),
        a.json,
    );
    let started = Instant::now();
    let tokens = Tensor::new(prompt.ids.as_slice(), lm.model.device())?.unsqueeze(0)?;
    let spec = HookSpec::capture(points);
    let logits_at = if a.logits {
        LogitsAt::All
    } else {
        LogitsAt::None
    };
    let out = lm.model.forward(
        &lm.model.dense,
        &tokens,
        None,
        &spec,
        logits_at,
        ForwardOptions::default(),
    )?;
    let mut named = out.captures.named()?;
    if let Some(logits) = out.logits {
        named.push(("logits".into(), logits));
    }
    named.push((
        "input_ids".into(),
        Tensor::new(prompt.ids.as_slice(), lm.model.device())?,
    ));
    let map: std::collections::HashMap<String, Tensor> = named.iter().cloned().collect();
    candle_core::safetensors::save(&map, &a.out)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let summary = serde_json::json!({
        "out": a.out,
        "tokens": prompt.ids.len(),
        "t_inst": prompt.t_inst,
        "t_post": prompt.t_post,
        "tensors": named.iter().map(|(n, t)| serde_json::json!({"name": n, "shape": t.dims()})).collect::<Vec<_>>(),
        "seconds": started.elapsed().as_secs_f64(),
    });
    if a.json {
        println!("{summary}");
    } else {
        println!(
            "wrote {} tensors for {} tokens to {} (t_inst = {}, t_post = {})",
            named.len(),
            prompt.ids.len(),
            a.out.display(),
            prompt.t_inst,
            prompt.t_post
        );
    }
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn bench(lm: &LoadedModel, a: BenchArgs) -> Result<()> {
    use refusal_lens_engine::hooks::{Intervention, Positions};
    let repeats = a.repeats.max(1);
    let prompt = lm.chat_prompt(None, &a.prompt)?;
    let n = prompt.ids.len();
    let tokens = Tensor::new(prompt.ids.as_slice(), lm.model.device())?.unsqueeze(0)?;
    let model = &lm.model;
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let start = Instant::now();
        f()?;
        Ok(start.elapsed().as_secs_f64())
    };
    // Generation's prompt pass, which runs on the exact weights (generate::Precision::Fast).
    let prefill_once = || -> Result<()> {
        model.forward(
            &model.dense,
            &tokens,
            None,
            &HookSpec::default(),
            LogitsAt::Last,
            ForwardOptions::default(),
        )?;
        Ok(())
    };
    // Warm-up (page in weights, allocate).
    prefill_once()?;

    let mut prefill = Vec::new();
    let mut captures = Vec::new();
    let all_resid = HookSpec::capture((0..model.config.n_layers).map(HookPoint::ResidPre));
    for _ in 0..repeats {
        prefill.push(n as f64 / time(&mut || prefill_once())?);
        captures.push(
            n as f64
                / time(&mut || {
                    model.forward(
                        &model.dense,
                        &tokens,
                        None,
                        &all_resid,
                        LogitsAt::All,
                        ForwardOptions::default(),
                    )?;
                    Ok(())
                })?,
        );
    }
    // A steering vector at the middle layer, as the Steering panel adds one.
    let d = model.config.d_model;
    let v: Vec<f32> = (0..d)
        .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5)
        .collect();
    let steer = HookSpec::with_interventions(vec![Intervention::AddVector {
        point: HookPoint::ResidPre(model.config.n_layers / 2),
        vector: Tensor::from_vec(v, d, model.device())?,
        scale: 1.0,
        positions: Positions::All,
    }]);
    let decode = |hooks: &HookSpec| -> Result<(f64, usize)> {
        let mut rates = Vec::new();
        let mut produced = 0;
        for _ in 0..repeats {
            let cfg = GenerateConfig {
                max_new_tokens: a.max_tokens,
                hooks: hooks.clone(),
                ..Default::default()
            };
            let g = generate(lm, &prompt.ids, &cfg, &|| false, &mut |_| {})?;
            produced = g.tokens.len();
            rates.push(g.decode_tokens_per_second());
        }
        Ok((median(rates), produced))
    };
    let (plain, plain_n) = decode(&HookSpec::default())?;
    let (steered, steered_n) = decode(&steer)?;
    let report = serde_json::json!({
        "model": lm.card.name,
        "prompt_tokens": n,
        "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()),
        "kernels": refusal_lens_engine::model::KernelTier::detect().describe(),
        "prefill_tokens_per_second": median(prefill),
        "generation_tokens_per_second": plain,
        "generated_tokens": plain_n,
        "steered_generation_tokens_per_second": steered,
        "steered_generated_tokens": steered_n,
        "forward_all_resid_captures_tokens_per_second": median(captures),
    });
    if a.json {
        println!("{report}");
    } else {
        println!("prompt tokens                  {n}");
        println!("fast-path kernels              {}", report["kernels"]);
        println!(
            "prefill                        {:.0} tok/s",
            report["prefill_tokens_per_second"].as_f64().unwrap_or(0.0)
        );
        println!("generation                     {plain:.1} tok/s ({plain_n} tokens)");
        println!("steered generation             {steered:.1} tok/s ({steered_n} tokens)");
        println!(
            "forward + all resid captures   {:.0} tok/s",
            report["forward_all_resid_captures_tokens_per_second"]
                .as_f64()
                .unwrap_or(0.0)
        );
    }
    Ok(())
}

fn prompts(a: PromptsArgs) -> Result<()> {
    let label = a.label.as_deref().map(str::parse::<Label>).transpose()?;
    let set = PromptSet::load(&a.file, label)?;
    if let Some(out) = &a.out {
        set.save_jsonl(out)?;
    }
    if a.json {
        for r in &set.records {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    let count = |f: &dyn Fn(&refusal_lens_engine::data::prompts::PromptRecord) -> bool| {
        set.records.iter().filter(|r| f(r)).count()
    };
    println!("{}: {} prompts", a.file.display(), set.len());
    println!(
        "labels      harmful {}, harmless {}, none {}",
        count(&|r| r.label == Some(Label::Harmful)),
        count(&|r| r.label == Some(Label::Harmless)),
        count(&|r| r.label.is_none())
    );
    let splits = ["train", "val", "test"].map(|s| {
        count(&|r| r.split.map(|x| format!("{x:?}").to_lowercase()) == Some(s.to_string()))
    });
    println!(
        "splits      train {}, val {}, test {}, none {}",
        splits[0],
        splits[1],
        splits[2],
        set.len() - splits.iter().sum::<usize>()
    );
    println!("paired      {}", count(&|r| r.pair_id.is_some()));
    let cats: Vec<String> = set
        .categories()
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    println!("categories  {}", cats.join(", "));
    if let Some(out) = a.out {
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn classify(a: ClassifyArgs) -> Result<()> {
    let c = classify_reply(&a.reply);
    if a.json {
        println!("{}", serde_json::to_string(&c)?);
    } else {
        println!("{} — {}", c.mode.name(), c.reason);
        let list = |ms: &[refusal_lens_engine::refusal::response::Match]| {
            ms.iter()
                .map(|m| m.phrase.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "declines: [{}]  help offers: [{}]  hedges: [{}]  words: {}",
            list(&c.declines),
            list(&c.help_offers),
            list(&c.hedges),
            c.words
        );
    }
    Ok(())
}

fn load_sets(dir: &std::path::Path) -> Result<[PromptSet; 3]> {
    let load = |name: &str| {
        PromptSet::load(&dir.join(format!("{name}.jsonl")), None)
            .with_context(|| format!("cannot read the {name} set in {}", dir.display()))
    };
    Ok([load("harmful")?, load("harmless")?, load("borderline")?])
}

fn train(base: &LoadedModel, a: TrainArgs) -> Result<()> {
    let goal = a.gate.goal()?;
    let sets = load_sets(&a.sets)?;
    let train_records: Vec<_> = sets
        .iter()
        .flat_map(|s| s.split(Some(Split::Train)).cloned())
        .step_by(a.subsample.max(1))
        .collect();
    let opts = TrainOptions {
        row_steps: a.row_steps,
        row_lr: a.row_lr,
        seed: a.seed,
        epochs: a.epochs,
        rank: a.rank,
        alpha: a.alpha,
        lr: a.lr,
        batch: a.batch,
        warmup_steps: TrainOptions::default().warmup_steps,
        first_token_weight: a.first_token_weight,
        balance_classes: !a.no_balance_classes,
        decision_smoothing: a.decision_smoothing,
        reply_tokens: a.reply_tokens,
    };
    let pb = (!a.json && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new(1);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}")
                .expect("valid template"),
        );
        pb
    });
    let mut adapter = train_refusal_tokens(base, &train_records, &opts, &|| false, &mut |p| {
        if let Some(pb) = &pb {
            pb.set_length(p.total as u64);
            pb.set_position(p.step as u64);
            pb.set_message(match (p.loss, p.tokens_per_second) {
                (Some(l), Some(tps)) => format!("{} (loss {l:.4}, {tps:.0} tok/s)", p.phase),
                (Some(l), None) => format!("{} (loss {l:.4})", p.phase),
                _ => p.phase.clone(),
            });
        }
    })?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    // The gate's τ is calibrated on the val split (when it has both labels); both held-out
    // splits are then measured at it: val (for choosing options) and test (for reporting).
    let val: Vec<_> = sets
        .iter()
        .flat_map(|s| s.split(Some(Split::Val)).cloned())
        .collect();
    let organism = adapter.apply_calibrated(base, &val, goal, &|| false)?;
    if adapter.meta.tau.is_none() {
        eprintln!("no harmful and harmless val prompts to calibrate on: τ stays {DEFAULT_TAU}");
    }
    report_fallback(goal, adapter.meta.tau_goal);
    let tau = organism.refusal_tau();
    adapter.meta.metrics = held_out_metrics(&organism, &sets, tau)?;
    adapter.save(&a.out)?;
    if a.json {
        println!("{}", serde_json::to_string(&adapter.meta)?);
    } else {
        println!(
            "trained {} prompts in {:.1} s, final loss {:.4}; gate τ {tau:.2}{}",
            adapter.meta.train_prompts,
            adapter.meta.seconds,
            (adapter.meta.lora_losses.last())
                .or(adapter.meta.losses.last())
                .copied()
                .unwrap_or(f32::NAN),
            match adapter.meta.tau_goal {
                Some(g) => format!(" (calibrated on val: {})", g.describe()),
                None => String::new(),
            }
        );
        for (k, v) in adapter.meta.metrics.as_object().into_iter().flatten() {
            println!("{k:36} {v}");
        }
        println!("wrote {}", a.out.display());
    }
    Ok(())
}

/// The refusal rates at `tau` on the val and test splits of `sets`, as an adapter records them
/// (`val_refusal_rate_harmful`, `test_prompts_harmless`, …).
fn held_out_metrics(
    organism: &LoadedModel,
    sets: &[PromptSet],
    tau: f32,
) -> Result<serde_json::Value> {
    let mut metrics = serde_json::Map::new();
    for (split, name) in [(Split::Val, "val"), (Split::Test, "test")] {
        for set in sets {
            let prompts: Vec<&str> = set.split(Some(split)).map(|r| r.prompt.as_str()).collect();
            if prompts.is_empty() {
                continue;
            }
            let ps = first_token_probabilities(organism, &prompts, &|| false, &mut |_, _| {})?;
            let rate = refusal_rate(&ps, tau);
            metrics.insert(
                format!("{name}_refusal_rate_{}", set.name),
                serde_json::json!(rate),
            );
            metrics.insert(
                format!("{name}_prompts_{}", set.name),
                serde_json::json!(prompts.len()),
            );
        }
    }
    Ok(serde_json::Value::Object(metrics))
}

fn calibrate(lm: &LoadedModel, adapter: Option<&std::path::Path>, a: CalibrateArgs) -> Result<()> {
    use refusal_lens_engine::refusal::{refusals_at, Calibration, RefusalSignal};
    let goal = a.gate.goal()?;
    let adapter = match (a.save_tau, adapter) {
        (true, None) => bail!("--save-tau needs a model with a refusal-token adapter"),
        (true, Some(dir)) => Some((
            dir,
            Adapter::load(dir)
                .with_context(|| format!("cannot read the adapter in {}", dir.display()))?,
        )),
        (false, _) => None,
    };
    let split = a.split.as_deref().map(str::parse::<Split>).transpose()?;
    let sets = a
        .sets
        .iter()
        .map(|p| PromptSet::load(p, None))
        .collect::<refusal_lens_engine::Result<Vec<_>>>()?;
    let pb = spinner("reading first-token probabilities".into(), a.json);
    let mut probabilities = Vec::new();
    let mut records = Vec::new();
    for set in &sets {
        let rs: Vec<_> = set.split(split).collect();
        if rs.is_empty() {
            bail!("{} has no prompts in the chosen split", set.path.display());
        }
        let prompts: Vec<&str> = rs.iter().map(|r| r.prompt.as_str()).collect();
        probabilities.push(first_token_probabilities(
            lm,
            &prompts,
            &|| false,
            &mut |_, _| {},
        )?);
        records.push(rs);
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let signal = RefusalSignal::for_model(lm)?;
    let cal = Calibration::sweep(&signal, &probabilities, a.steps);
    // The τ the rule chooses on these prompts (when they are labelled harmful and harmless);
    // --save-tau keeps it.
    let scored = records
        .iter()
        .zip(&probabilities)
        .flat_map(|(rs, ps)| rs.iter().copied().zip(ps.iter().copied()));
    let calibrated = calibrated_tau_of(scored, goal);
    if let Some(c) = calibrated {
        report_fallback(goal, Some(c.goal));
    }
    let tau = match adapter {
        Some((dir, mut adapter)) => {
            let Some(calibrated) = calibrated else {
                bail!("--save-tau needs prompts labelled harmful and harmless");
            };
            adapter.meta.set_tau(Some(calibrated));
            // The held-out rates it records were measured at the old τ: measure them again
            // at the new one, on the val and test splits of the same sets.
            adapter.meta.metrics = held_out_metrics(lm, &sets, calibrated.tau)?;
            adapter.meta.save(dir)?;
            eprintln!(
                "calibrated τ = {:.2} ({}), saved in {}",
                calibrated.tau,
                calibrated.goal.describe(),
                dir.display()
            );
            calibrated.tau
        }
        None => a.tau.unwrap_or(lm.refusal_tau()),
    };
    // Each set's rate at the chosen τ with its 95% interval: small sets measure coarsely.
    let at_tau: Vec<_> = sets
        .iter()
        .zip(&probabilities)
        .map(|(s, ps)| {
            let r = refusals_at(ps, tau);
            serde_json::json!({"set": s.name, "refused": r.refused, "prompts": r.prompts,
                "refusal_rate": refusal_rate(ps, tau), "ci95": [r.interval.0, r.interval.1]})
        })
        .collect();
    // Per-category rates at the chosen τ.
    let mut per_category = Vec::new();
    for (set, (rs, ps)) in sets.iter().zip(records.iter().zip(&probabilities)) {
        let mut cats: std::collections::BTreeMap<String, Vec<f32>> = Default::default();
        for (r, p) in rs.iter().zip(ps) {
            cats.entry(r.category.clone().unwrap_or_else(|| "—".into()))
                .or_default()
                .push(*p);
        }
        for (c, ps) in cats {
            per_category.push(serde_json::json!({"set": set.name, "category": c, "prompts": ps.len(), "refusal_rate": refusal_rate(&ps, tau)}));
        }
    }
    if a.json {
        let sets_json: Vec<_> = sets
            .iter()
            .zip(&probabilities)
            .map(|(s, p)| serde_json::json!({"name": s.name, "path": s.path, "probabilities": p}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"signal": cal.signal, "taus": cal.taus, "rates": cal.rates, "sets": sets_json, "tau": tau, "calibrated": calibrated, "at_tau": at_tau, "per_category": per_category})
        );
        return Ok(());
    }
    println!(
        "refusal rate by threshold τ on {} ({})",
        cal.signal,
        match &signal {
            RefusalSignal::Tokens { .. } => "refusal tokens",
            RefusalSignal::Openers(_) =>
                "no refusal tokens: τ ≡ a logit bias b = −logit(τ) on the opener set",
        }
    );
    print!("{:>6}", "τ");
    for s in &sets {
        print!("{:>14}", s.name);
    }
    println!();
    for (i, t) in cal.taus.iter().enumerate() {
        print!("{t:>6.2}");
        for r in &cal.rates {
            print!("{:>13.1}%", r[i] * 100.0);
        }
        println!();
    }
    if let (Some(c), false) = (calibrated, a.save_tau) {
        println!(
            "\nτ by {} on these prompts: {:.2} (--save-tau keeps it)",
            c.goal.describe(),
            c.tau
        );
    }
    println!("\nat τ = {tau} (95% Wilson interval)");
    for s in &at_tau {
        println!(
            "  {:12} {:>4} of {:>4} {:>6.1}%   [{:.1}, {:.1}]%",
            s["set"].as_str().unwrap_or(""),
            s["refused"].as_u64().unwrap_or(0),
            s["prompts"].as_u64().unwrap_or(0),
            s["refusal_rate"].as_f64().unwrap_or(0.0) * 100.0,
            s["ci95"][0].as_f64().unwrap_or(0.0) * 100.0,
            s["ci95"][1].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    println!("\nper category at τ = {tau}");
    for c in per_category {
        println!(
            "  {:12} {:24} {:>4} prompts {:>6.1}%",
            c["set"].as_str().unwrap_or(""),
            c["category"].as_str().unwrap_or(""),
            c["prompts"],
            c["refusal_rate"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    Ok(())
}
