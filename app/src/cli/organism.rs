//! Organism commands: train refusal tokens, and calibrate the gate's threshold τ.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use refusal_lens_engine::data::prompts::{PromptRecord, PromptSet, Split};
use refusal_lens_engine::organism::{train_refusal_tokens, Adapter, TrainOptions};
use refusal_lens_engine::refusal::{
    calibrated_tau_of, first_token_probabilities, refusal_rate, refusals_at, Calibration, GateGoal,
    RefusalSignal, DEFAULT_TAU,
};
use refusal_lens_engine::LoadedModel;

use super::spinner;

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

fn load_sets(dir: &std::path::Path) -> Result<[PromptSet; 3]> {
    let load = |name: &str| {
        PromptSet::load(&dir.join(format!("{name}.jsonl")), None)
            .with_context(|| format!("cannot read the {name} set in {}", dir.display()))
    };
    Ok([load("harmful")?, load("harmless")?, load("borderline")?])
}

pub fn train(base: &LoadedModel, a: TrainArgs) -> Result<()> {
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
            pb.set_position(p.done as u64);
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

pub fn calibrate(
    lm: &LoadedModel,
    adapter: Option<&std::path::Path>,
    a: CalibrateArgs,
) -> Result<()> {
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
    let (records, probabilities) = read_probabilities(lm, &sets, split, a.json)?;
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
    let (at_tau, per_category) = rates_at_tau(&sets, &records, &probabilities, tau);
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
    print_curves(&cal, &signal, &sets);
    if let (Some(c), false) = (calibrated, a.save_tau) {
        println!(
            "\nτ by {} on these prompts: {:.2} (--save-tau keeps it)",
            c.goal.describe(),
            c.tau
        );
    }
    print_rates_at_tau(tau, &at_tau, &per_category);
    Ok(())
}

/// Each set's records (in one split).
type Records<'a> = Vec<Vec<&'a PromptRecord>>;

/// Each set's records in `split` and their first-token refusal probabilities.
fn read_probabilities<'a>(
    lm: &LoadedModel,
    sets: &'a [PromptSet],
    split: Option<Split>,
    quiet: bool,
) -> Result<(Records<'a>, Vec<Vec<f32>>)> {
    let pb = spinner("reading first-token probabilities".into(), quiet);
    let mut probabilities = Vec::new();
    let mut records = Vec::new();
    for set in sets {
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
    Ok((records, probabilities))
}

/// Each set's refusals at τ with their 95% interval (small sets measure coarsely), and each
/// category's refusal rate.
fn rates_at_tau(
    sets: &[PromptSet],
    records: &[Vec<&PromptRecord>],
    probabilities: &[Vec<f32>],
    tau: f32,
) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let at_tau: Vec<_> = sets
        .iter()
        .zip(probabilities)
        .map(|(s, ps)| {
            let r = refusals_at(ps, tau);
            serde_json::json!({"set": s.name, "refused": r.refused, "prompts": r.prompts,
                "refusal_rate": refusal_rate(ps, tau), "ci95": [r.interval.0, r.interval.1]})
        })
        .collect();
    let mut per_category = Vec::new();
    for (set, (rs, ps)) in sets.iter().zip(records.iter().zip(probabilities)) {
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
    (at_tau, per_category)
}

/// The refusal rate of every set at every τ of the sweep.
fn print_curves(cal: &Calibration, signal: &RefusalSignal, sets: &[PromptSet]) {
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
    for s in sets {
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
}

fn print_rates_at_tau(tau: f32, at_tau: &[serde_json::Value], per_category: &[serde_json::Value]) {
    println!("\nat τ = {tau} (95% Wilson interval)");
    for s in at_tau {
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
}
