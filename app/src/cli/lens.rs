//! Subcommands of the analysis lens: `directions`, `score`, `probe`, `trajectory` and
//! `cliff-rank`. They share the engine's pipelines (`refusal_lens_engine::analysis::lens`) with the GUI.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use refusal_lens_engine::analysis::activations::{
    check_cache_dir, default_cache_dir, state_name, Feature,
};
use refusal_lens_engine::analysis::directions::{selectable_layers, Directions, SelectOptions};
use refusal_lens_engine::analysis::lens::{self, DirectionOptions, Holdout, ProbeJob};
use refusal_lens_engine::analysis::probe::{
    Calibration, LabelSource, ProbeKind, ProbeOptions, ProbeSet,
};
use refusal_lens_engine::analysis::trajectory::{
    cliff_scores, trajectory, CliffAt, CliffOptions, DEFAULT_CLIFF_K,
};
use refusal_lens_engine::data::prompts::{PromptSet, Split};
use refusal_lens_engine::hooks::HookSpec;
use refusal_lens_engine::refusal::{first_token_probabilities, opener_bias, RefusalGate};
use refusal_lens_engine::refusal::{refusal_score, RefusalSignal};
use refusal_lens_engine::run::generate::{generate, GenerateConfig, Sampling};
use refusal_lens_engine::LoadedModel;

/// The two sets every analysis contrasts (default: the project's sample sets).
#[derive(Args, Debug, Clone)]
pub struct SetPair {
    /// Harmful prompts (JSONL, CSV/TSV, JSON or TXT).
    #[arg(long, default_value = "sample_prompts/harmful.jsonl")]
    pub harmful: PathBuf,
    /// Harmless prompts.
    #[arg(long, default_value = "sample_prompts/harmless.jsonl")]
    pub harmless: PathBuf,
    /// Do not read or write the activation cache (~/.cache/refusal-lens/activations).
    #[arg(long)]
    pub no_cache: bool,
}

impl SetPair {
    pub(crate) fn load(&self) -> Result<(PromptSet, PromptSet)> {
        let load = |p: &Path| Ok::<_, anyhow::Error>(PromptSet::load(p, None)?);
        Ok((load(&self.harmful)?, load(&self.harmless)?))
    }

    pub(crate) fn cache(&self) -> Option<PathBuf> {
        (!self.no_cache)
            .then(default_cache_dir)
            .and_then(usable_cache)
    }
}

/// The activation cache folder if it can be written; otherwise a warning on stderr and none
/// (the command still works, only slower).
pub(crate) fn usable_cache(dir: PathBuf) -> Option<PathBuf> {
    match check_cache_dir(&dir) {
        Ok(()) => Some(dir),
        Err(why) => {
            eprintln!("warning: {why}");
            None
        }
    }
}

#[derive(Args, Debug)]
pub struct DirectionsArgs {
    #[command(flatten)]
    pub sets: SetPair,
    /// Use only harmful prompts the model refuses and harmless ones it answers.
    #[arg(long)]
    pub filter_by_behaviour: bool,
    /// Skip the ablation-based choice of layer and position (take the best-separating layer).
    #[arg(long)]
    pub no_select: bool,
    /// Only consider t_post in the selection (not every post-instruction position).
    #[arg(long)]
    pub t_post_only: bool,
    /// Val prompts per set used by the selection.
    #[arg(long, default_value_t = 16)]
    pub val_prompts: usize,
    /// Discard candidates whose ablation moves harmless next-token distributions by more KL.
    #[arg(long, default_value_t = 0.1)]
    pub max_kl: f32,
    /// Save the directions here (safetensors with metadata).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// One prompt to score.
    #[arg(long, conflicts_with = "set")]
    pub prompt: Option<String>,
    /// A prompt set to score.
    #[arg(long)]
    pub set: Option<PathBuf>,
    /// Only this split of the set.
    #[arg(long)]
    pub split: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub sets: SetPair,
    /// logistic or mlp (1024 hidden units).
    #[arg(long, default_value = "logistic")]
    pub kind: String,
    /// t-post or last3 (mean of the last three prompt positions).
    #[arg(long, default_value = "t-post")]
    pub feature: String,
    /// behaviour (the model's own refusal at t_post; the sets' labels when the model refuses
    /// none or all of the prompts) or set (harmful = refuses).
    #[arg(long, default_value = "behaviour")]
    pub labels: String,
    /// random (seeded 80/20) or test (the sets' test split).
    #[arg(long, default_value = "random")]
    pub holdout: String,
    /// L2 penalty on the probe's weights, or `auto`: the one of 0, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1
    /// with the lowest log-loss on a quarter of the training prompts held back for it.
    #[arg(long, default_value = "auto")]
    pub l2: String,
    /// Rescale the probe's logits on those validation prompts: temperature, platt or none.
    #[arg(long, default_value = "temperature")]
    pub calibration: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Comma-separated residual states to train at (default: all).
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<usize>>,
    /// Save the probes here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// Probes and directions for commands that read them: from files, or built from the
/// sample sets (cached) when not given.
#[derive(Args, Debug, Clone)]
pub struct LensFiles {
    /// Probes saved by `refusal-lens probe --out`.
    #[arg(long)]
    pub probes: Option<PathBuf>,
    /// Directions saved by `refusal-lens directions --out`.
    #[arg(long)]
    pub directions: Option<PathBuf>,
    /// Residual state the curves read (default: the probes' best layer).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Cliff window: the final k tokens.
    #[arg(long, default_value_t = DEFAULT_CLIFF_K)]
    pub k: usize,
    /// Where the cliff window ends: prompt (t_post), thinking (the last thinking token before
    /// </think>, reasoning models) or auto (thinking when the reply has a finished thinking
    /// span).
    #[arg(long, default_value = "auto", value_parser = parse_cliff_at)]
    pub cliff_at: CliffAt,
}

impl LensFiles {
    /// Takes the session's directions and probes where none were given.
    pub fn fill_from(&mut self, session: Option<&crate::session_file::SessionFile>) {
        let Some(lens) = session.and_then(|s| s.lens.as_ref()) else {
            return;
        };
        if self.directions.is_none() && self.probes.is_none() {
            self.directions = Some(lens.directions.path.clone());
            self.probes = lens.probes.as_ref().map(|p| p.path.clone());
            self.layer = self.layer.or(lens.curve_layer);
        }
    }

    fn cliff(&self) -> CliffOptions {
        CliffOptions {
            k: self.k,
            at: self.cliff_at,
        }
    }
}

fn parse_cliff_at(s: &str) -> std::result::Result<CliffAt, String> {
    CliffAt::parse(s).ok_or_else(|| format!("`{s}`: expected auto, prompt or thinking"))
}

#[derive(Args, Debug)]
pub struct TrajectoryArgs {
    #[arg(long)]
    pub prompt: String,
    /// Greedy reply tokens to generate and score after the prompt (0: prompt only).
    #[arg(long, default_value_t = 64)]
    pub reply_tokens: usize,
    /// Refusal threshold τ: with refusal tokens, emit [refuse] when p([refuse]) ≥ τ (default: the
    /// adapter's τ calibrated on val, else 0.5).
    #[arg(long)]
    pub tau: Option<f32>,
    #[command(flatten)]
    pub lens: LensFiles,
    /// Print the layers × positions probe matrix too.
    #[arg(long)]
    pub heatmap: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CliffRankArgs {
    /// The prompt set to rank.
    #[arg(long)]
    pub set: PathBuf,
    #[command(flatten)]
    pub lens: LensFiles,
    /// Rank by `cliff` (magnitude, largest first) or `final` (final-position score, lowest
    /// first: the published rule).
    #[arg(long, default_value = "cliff")]
    pub by: String,
    /// Fraction of the set to export.
    #[arg(long, default_value_t = 0.1)]
    pub top: f32,
    /// Reasoning models: answer each prompt greedily for up to this many tokens first, so the
    /// window can end where the thinking does (with --think; 0: read the prompt only).
    #[arg(long, default_value_t = 0)]
    pub think_tokens: usize,
    /// Write the top fraction here as JSONL (the original records plus the scores).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// A progress bar on stderr (only on a terminal, never with --json).
pub fn progress_bar(quiet: bool) -> impl FnMut(&str, usize, usize) {
    let pb = (!quiet && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new(1);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{msg:28} [{bar:30}] {pos}/{len} {eta}")
                .expect("valid template"),
        );
        pb
    });
    move |phase: &str, done: usize, total: usize| {
        if let Some(pb) = &pb {
            pb.set_message(phase.to_string());
            pb.set_length(total as u64);
            pb.set_position(done as u64);
            if done == total {
                pb.finish_and_clear();
            }
        }
    }
}

pub fn directions(lm: &LoadedModel, a: DirectionsArgs) -> Result<()> {
    let (harmful, harmless) = a.sets.load()?;
    let options = DirectionOptions {
        filter_by_behaviour: a.filter_by_behaviour,
        select: !a.no_select,
        select_options: SelectOptions {
            max_kl: a.max_kl,
            all_positions: !a.t_post_only,
        },
        val_prompts: a.val_prompts,
        system: None,
    };
    let start = std::time::Instant::now();
    let dirs = lens::directions(
        lm,
        &harmful,
        &harmless,
        &options,
        a.sets.cache().as_deref(),
        &|| false,
        &mut progress_bar(a.json),
    )?;
    let seconds = start.elapsed().as_secs_f64();
    if let Some(out) = &a.out {
        dirs.save(out)?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({"directions": dirs, "seconds": seconds, "saved": a.out})
        );
        return Ok(());
    }
    print_directions(lm, &dirs);
    eprintln!("[{seconds:.1} s]");
    if let Some(out) = &a.out {
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn print_directions(lm: &LoadedModel, dirs: &Directions) {
    let p = &dirs.provenance;
    println!(
        "{} harmful vs {} harmless prompts{}; refusal direction at t_post, harmfulness at t_inst",
        p.n_harmful,
        p.n_harmless,
        if p.filtered_by_behaviour {
            " (filtered by behaviour)"
        } else {
            ""
        }
    );
    println!(
        "{:>5}  {:30} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "layer", "state", "‖r‖", "sep r", "‖h‖", "sep h", "cos"
    );
    let n_layers = lm.model.config.n_layers;
    for s in &dirs.stats {
        println!(
            "{:>5}  {:30} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7.3}{}",
            s.layer,
            state_name(s.layer, n_layers),
            s.refusal_norm,
            s.refusal_separation,
            s.harmfulness_norm,
            s.harmfulness_separation,
            s.cosine,
            if s.layer == dirs.layer {
                "  ← chosen"
            } else {
                ""
            }
        );
    }
    if let Some(sel) = &dirs.selection {
        println!(
            "\nselection on {} + {} val prompts: baseline refusal score harmful {:.2}, harmless {:.2}",
            sel.n_harmful, sel.n_harmless, sel.baseline_harmful_score, sel.baseline_harmless_score
        );
        let mut kept: Vec<_> = sel
            .candidates
            .iter()
            .filter(|c| c.rejected.is_none())
            .collect();
        kept.sort_by(|a, b| a.ablated_score.total_cmp(&b.ablated_score));
        println!(
            "{} of {} candidates kept (layers < {}); best:",
            kept.len(),
            sel.candidates.len(),
            selectable_layers(dirs.n_states)
        );
        println!(
            "{:>5} {:>9} {:>14} {:>8} {:>12}",
            "layer", "position", "ablated score", "KL", "added score"
        );
        for c in kept.iter().take(5) {
            println!(
                "{:>5} {:>9} {:>14.2} {:>8.3} {:>12.2}",
                c.layer,
                format!("t_post-{}", dirs.n_post - 1 - c.position),
                c.ablated_score,
                c.kl,
                c.added_score
            );
        }
    }
    println!(
        "\nchosen: layer {} ({}), position t_post-{}",
        dirs.layer,
        state_name(dirs.layer, n_layers),
        dirs.n_post - 1 - dirs.position
    );
}

pub fn score(lm: &LoadedModel, a: ScoreArgs) -> Result<()> {
    let (ids, prompts): (Vec<String>, Vec<String>) = match (&a.prompt, &a.set) {
        (Some(p), None) => (vec!["prompt".into()], vec![p.clone()]),
        (None, Some(path)) => {
            let set = PromptSet::load(path, None)?;
            let split = a.split.as_deref().map(str::parse::<Split>).transpose()?;
            let rs: Vec<_> = set.split(split).collect();
            if rs.is_empty() {
                bail!("{} has no prompts in the chosen split", path.display());
            }
            (
                rs.iter().map(|r| r.id.clone()).collect(),
                rs.iter().map(|r| r.prompt.clone()).collect(),
            )
        }
        _ => bail!("give --prompt or --set"),
    };
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let ps = first_token_probabilities(lm, &refs, &|| false, &mut |_, _| {})?;
    let signal = RefusalSignal::for_model(lm)?;
    let scores: Vec<f32> = ps.iter().map(|&p| refusal_score(p)).collect();
    if a.json {
        let rows: Vec<_> = ids
            .iter()
            .zip(&prompts)
            .zip(ps.iter().zip(&scores))
            .map(|((id, p), (pr, s))| serde_json::json!({"id": id, "prompt": p, "probability": pr, "refusal_score": s}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"signal": signal.describe(), "prompts": rows})
        );
        return Ok(());
    }
    println!(
        "refusal score = log P − log(1 − P), P = {}",
        signal.describe()
    );
    for ((id, p), (pr, s)) in ids.iter().zip(&prompts).zip(ps.iter().zip(&scores)) {
        let short: String = p.chars().take(60).collect();
        println!("{s:>7.2}  P={pr:.3}  {id:12} {short}");
    }
    if scores.len() > 1 {
        let mean = scores.iter().sum::<f32>() / scores.len() as f32;
        let positive = scores.iter().filter(|&&s| s > 0.0).count();
        println!(
            "mean {mean:.2}; {positive} of {} lean to refusing",
            scores.len()
        );
    }
    Ok(())
}

pub fn probe(lm: &LoadedModel, a: ProbeArgs) -> Result<()> {
    let (harmful, harmless) = a.sets.load()?;
    let kind: ProbeKind = a.kind.parse()?;
    let options = ProbeOptions {
        feature: a.feature.parse::<Feature>()?,
        labels: a.labels.parse::<LabelSource>()?,
        l2: match a.l2.as_str() {
            "auto" => None,
            v => Some(
                v.parse::<f64>()
                    .ok()
                    .filter(|v| *v >= 0.0)
                    .with_context(|| format!("--l2 `{v}`: use auto or a number ≥ 0"))?,
            ),
        },
        calibration: a.calibration.parse::<Calibration>()?,
        seed: a.seed,
        ..ProbeOptions::for_kind(kind)
    };
    let holdout = match a.holdout.parse::<Holdout>()? {
        Holdout::Random { fraction, .. } => Holdout::Random {
            fraction,
            seed: a.seed,
        },
        h => h,
    };
    let job = ProbeJob {
        options,
        holdout,
        layers: a.layers.clone(),
        system: None,
    };
    let start = std::time::Instant::now();
    let probes = lens::probes(
        lm,
        &harmful,
        &harmless,
        &job,
        a.sets.cache().as_deref(),
        &|| false,
        &mut progress_bar(a.json),
    )?;
    let seconds = start.elapsed().as_secs_f64();
    if let Some(out) = &a.out {
        probes.save(out)?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({"probes": probes, "best_layer": probes.best_layer(), "seconds": seconds, "saved": a.out})
        );
        return Ok(());
    }
    println!(
        "{:?} probes on {:?}, labels {:?}, calibration {:?}: {} train / {} val / {} held-out prompts, {} labelled refusing",
        kind,
        probes.options.feature,
        probes.options.labels,
        probes.options.calibration,
        probes.n_train,
        probes.n_val,
        probes.n_test,
        probes.n_refusing
    );
    println!(
        "{:>5}  {:30} {:>9} {:>9} {:>6} {:>6}  {:>15}  {:>15}",
        "layer", "state", "train acc", "test acc", "AUC", "L2", "log-loss raw→cal", "ECE raw→cal"
    );
    let best = probes.best_layer();
    for m in &probes.metrics {
        let (raw, cal) = (&m.test_uncalibrated, &m.test_calibrated);
        println!(
            "{:>5}  {:30} {:>8.1}% {:>8.1}% {:>6} {:>6}  {:>6.3} → {:<6.3}  {:>6.3} → {:<6.3}{}",
            m.layer,
            state_name(m.layer, lm.model.config.n_layers),
            m.train_accuracy * 100.0,
            m.test_accuracy * 100.0,
            m.test_auc.map_or("—".into(), |a| format!("{a:.3}")),
            format!("{}", m.l2),
            raw.log_loss,
            cal.log_loss,
            raw.ece,
            cal.ece,
            if m.layer == best { "  ← best" } else { "" }
        );
    }
    eprintln!("[{seconds:.1} s]");
    if let Some(out) = &a.out {
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn sample_sets() -> Result<(PromptSet, PromptSet)> {
    SetPair {
        harmful: "sample_prompts/harmful.jsonl".into(),
        harmless: "sample_prompts/harmless.jsonl".into(),
        no_cache: false,
    }
    .load()
    .context("no --probes/--directions given and the sample sets are not here (run from the repository root)")
}

/// The probes from `--probes` (and, with `with_directions`, the directions from
/// `--directions`). What is not given is built from the sample sets: logistic probes, and
/// diff-in-means directions without layer selection, from states collected (or read from the
/// cache) once for both.
fn lens_inputs(
    lm: &LoadedModel,
    files: &LensFiles,
    with_directions: bool,
    quiet: bool,
) -> Result<(ProbeSet, Option<Directions>)> {
    let given_probes = files.probes.as_deref().map(ProbeSet::load).transpose()?;
    let given_directions = match &files.directions {
        Some(p) if with_directions => Some(Directions::load(p)?),
        _ => None,
    };
    let need_directions = with_directions && given_directions.is_none();
    if let (Some(p), false) = (&given_probes, need_directions) {
        return Ok((p.clone(), given_directions));
    }
    let (harmful, harmless) = sample_sets()?;
    let mut bar = progress_bar(quiet);
    let states = lens::collect_pair(
        lm,
        &harmful,
        &harmless,
        None,
        usable_cache(default_cache_dir()).as_deref(),
        &|| false,
        &mut bar,
    )?;
    let probes = match given_probes {
        Some(p) => p,
        None => lens::probes_from_states(
            lm,
            &harmful,
            &harmless,
            &states,
            &ProbeJob::default(),
            &|| false,
            &mut bar,
        )?,
    };
    let directions = match given_directions {
        Some(d) => Some(d),
        None if need_directions => Some(lens::directions_from_states(
            lm,
            &harmful,
            &harmless,
            &states,
            &DirectionOptions {
                select: false,
                ..Default::default()
            },
            &|| false,
            &mut bar,
        )?),
        None => None,
    };
    Ok((probes, directions))
}

pub fn run_trajectory(lm: &LoadedModel, a: TrajectoryArgs) -> Result<()> {
    let (probes, directions) = lens_inputs(lm, &a.lens, true, a.json)?;
    let directions = directions.expect("asked for directions");
    let layer = a.lens.layer.unwrap_or_else(|| probes.best_layer());
    let prompt = lm.chat_prompt(None, &a.prompt)?;
    let reply = if a.reply_tokens > 0 {
        let cfg = GenerateConfig {
            max_new_tokens: a.reply_tokens,
            sampling: Sampling::default(),
            refusal_gate: RefusalGate::for_model(lm, a.tau.unwrap_or(lm.refusal_tau())),
            first_token_bias: opener_bias(lm, 0.0)?,
            ..Default::default()
        };
        generate(lm, &prompt.ids, &cfg, &|| false, &mut |_| {})?
            .tokens
            .iter()
            .map(|t| t.id)
            .collect()
    } else {
        Vec::new()
    };
    let start = std::time::Instant::now();
    let t = trajectory(
        lm,
        &prompt,
        &reply,
        Some(&probes),
        Some(&directions),
        layer,
        a.lens.cliff(),
        &HookSpec::default(),
    )?;
    let seconds = start.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"trajectory": t, "seconds": seconds})
        );
        return Ok(());
    }
    println!(
        "layer {} ({}); P = probe P(refuse), r/h = refusal/harmfulness projection (0 = harmless mean, 1 = harmful mean)",
        layer,
        state_name(layer, lm.model.config.n_layers)
    );
    println!("{:>4}  {:>6} {:>6} {:>6}  token", "pos", "P", "r", "h");
    let col = |v: &Option<Vec<f32>>, i: usize| {
        v.as_ref()
            .map_or("—".to_string(), |v| format!("{:.2}", v[i]))
    };
    for (i, tok) in t.tokens.iter().enumerate() {
        let mark = if i == t.t_inst {
            "  ← t_inst"
        } else if i == t.t_post {
            "  ← t_post"
        } else if i == t.prompt_len {
            "  ← reply"
        } else if t.thinking.is_some_and(|s| s.open == i) {
            "  ← thinking starts"
        } else if t.thinking.and_then(|s| s.close) == Some(i) {
            "  ← thinking ends"
        } else {
            ""
        };
        println!(
            "{i:>4}  {:>6} {:>6} {:>6}  {:?}{mark}",
            col(&t.score, i),
            col(&t.refusal, i),
            col(&t.harmfulness, i),
            tok.text
        );
    }
    if a.heatmap {
        println!("\nprobe P(refuse), layers × positions (×10, rounded)");
        for (l, row) in t.heatmap_layers.iter().zip(&t.heatmap) {
            let cells: String = row
                .iter()
                .map(|p| char::from_digit(((p * 10.0).round() as u32).min(9), 10).unwrap_or('?'))
                .collect();
            println!("{l:>3} {cells}");
        }
    }
    let end = if t.cliff_window.end == t.t_post + 1 {
        "t_post".to_string()
    } else {
        format!("the end of thinking (token {})", t.cliff_window.end - 1)
    };
    println!(
        "cliff magnitude (k = {}): {}; final score at {end}: {}",
        t.cliff_k,
        t.cliff.map_or("—".into(), |c| format!("{c:.3}")),
        t.final_score.map_or("—".into(), |c| format!("{c:.3}"))
    );
    eprintln!("[trajectory {:.0} ms]", seconds * 1e3);
    Ok(())
}

pub fn cliff_rank(lm: &LoadedModel, a: CliffRankArgs) -> Result<()> {
    let by_cliff = match a.by.as_str() {
        "cliff" => true,
        "final" => false,
        other => bail!("unknown ranking `{other}` (use cliff or final)"),
    };
    if !(a.top > 0.0 && a.top <= 1.0) {
        bail!("--top must be a fraction in (0, 1]");
    }
    let set = PromptSet::load(&a.set, None)?;
    let (probes, _) = lens_inputs(lm, &a.lens, false, a.json)?;
    let layer = a.lens.layer.unwrap_or_else(|| probes.best_layer());
    let probe = probes
        .at(layer)
        .with_context(|| format!("no probe at layer {layer} (trained: {:?})", probes.layers))?;
    let prompts: Vec<&str> = set.records.iter().map(|r| r.prompt.as_str()).collect();
    let scores = cliff_scores(
        lm,
        &prompts,
        None,
        probe,
        layer,
        a.lens.cliff(),
        a.think_tokens,
        &|| false,
        &mut {
            let mut bar = progress_bar(a.json);
            move |d, t| bar("scoring", d, t)
        },
    )?;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    if by_cliff {
        order.sort_by(|&x, &y| {
            let c = |i: usize| scores[i].cliff.unwrap_or(f32::NEG_INFINITY);
            c(y).total_cmp(&c(x))
        });
    } else {
        order.sort_by(|&x, &y| scores[x].final_score.total_cmp(&scores[y].final_score));
    }
    let n_top = ((set.len() as f32 * a.top).ceil() as usize).clamp(1, set.len());
    let rows: Vec<serde_json::Value> = order
        .iter()
        .enumerate()
        .map(|(rank, &i)| {
            let mut v = serde_json::to_value(&set.records[i]).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("rank".into(), serde_json::json!(rank + 1));
                o.insert("cliff".into(), serde_json::json!(scores[i].cliff));
                o.insert(
                    "final_score".into(),
                    serde_json::json!(scores[i].final_score),
                );
            }
            v
        })
        .collect();
    if let Some(out) = &a.out {
        let text: String = rows[..n_top].iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(out, text).with_context(|| format!("cannot write {}", out.display()))?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({"layer": layer, "k": a.lens.k, "by": a.by, "top": n_top, "ranked": rows})
        );
        return Ok(());
    }
    println!(
        "{} prompts ranked by {} (probe at layer {layer}, k = {}); top {n_top}:",
        set.len(),
        if by_cliff {
            "cliff magnitude, largest first"
        } else {
            "final-position score, lowest first"
        },
        a.lens.k
    );
    println!("{:>4} {:>7} {:>7}  prompt", "rank", "cliff", "final");
    for (rank, &i) in order.iter().take(n_top).enumerate() {
        let s = scores[i];
        let short: String = set.records[i].prompt.chars().take(70).collect();
        println!(
            "{:>4} {:>7} {:>7.3}  {short}",
            rank + 1,
            s.cliff.map_or("—".into(), |c| format!("{c:.3}")),
            s.final_score
        );
    }
    if let Some(out) = &a.out {
        println!("wrote {} prompts to {}", n_top, out.display());
    }
    Ok(())
}
