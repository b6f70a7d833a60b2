//! `refusal-lens guard fit|eval|scatter`: Latent Guard (harmfulness at t_inst as a
//! harmful-input detector) beside refusal-based detection, on plain and jailbreak-wrapped
//! prompts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use refusal_lens_engine::analysis::guard::{
    evaluate, fit_on_splits, Detection, GuardComparison, GuardInputs, GuardPoint, GuardStudy,
    LatentGuard,
};
use refusal_lens_engine::data::prompts::{Jailbreak, PromptSet, Split};
use refusal_lens_engine::refusal::response::{classify, ResponseMode};
use refusal_lens_engine::refusal::RefusalGate;
use refusal_lens_engine::run::generate::greedy_replies;
use refusal_lens_engine::LoadedModel;
use serde::Serialize;

use super::lens::{progress_bar, SetPair};

#[derive(Args, Debug)]
pub struct GuardArgs {
    #[command(subcommand)]
    pub action: GuardAction,
}

#[derive(Subcommand, Debug)]
pub enum GuardAction {
    /// Fit the centroids on the sets' train split; choose the layer range and τ on val.
    Fit(FitArgs),
    /// Evaluate a guard on a split beside refusal-based detection, per category, on the
    /// borderline set and under every jailbreak template.
    Eval(EvalArgs),
    /// The 2-D view as rows (CSV or JSON): harmfulness score at t_inst and refusal score at
    /// t_post of harmful, harmless, borderline and jailbreak-wrapped prompts.
    Scatter(ScatterArgs),
}

#[derive(Args, Debug)]
pub struct FitArgs {
    #[command(flatten)]
    pub sets: SetPair,
    /// Save the guard here (JSON).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// The prompts an evaluation reads beside the two sets.
#[derive(Args, Debug, Clone)]
pub struct EvalInputs {
    /// A guard saved by `guard fit`.
    #[arg(long)]
    pub guard: PathBuf,
    #[command(flatten)]
    pub sets: SetPair,
    /// Harmless prompts with trigger words (over-refusal); "none" to skip.
    #[arg(long, default_value = "sample_prompts/borderline.jsonl")]
    pub borderline: String,
    /// Jailbreak templates with a {prompt} slot (JSONL); "none" to skip.
    #[arg(long, default_value = "sample_prompts/jailbreaks.jsonl")]
    pub jailbreaks: String,
    /// The split evaluated.
    #[arg(long, default_value = "test")]
    pub split: String,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub inputs: EvalInputs,
    /// Greedy reply tokens per prompt for "did it refuse" (0: skip the replies).
    #[arg(long, default_value_t = 32)]
    pub reply_tokens: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ScatterArgs {
    #[command(flatten)]
    pub inputs: EvalInputs,
    /// Write the rows here as CSV.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(lm: &LoadedModel, a: GuardArgs) -> Result<()> {
    match a.action {
        GuardAction::Fit(a) => fit(lm, a),
        GuardAction::Eval(a) => eval(lm, a),
        GuardAction::Scatter(a) => scatter(lm, a),
    }
}

fn parse_split(s: &str) -> Result<Split> {
    Ok(match s {
        "train" => Split::Train,
        "val" => Split::Val,
        "test" => Split::Test,
        other => bail!("unknown split `{other}` (train, val or test)"),
    })
}

fn fit(lm: &LoadedModel, a: FitArgs) -> Result<()> {
    let (harmful, harmless) = a.sets.load()?;
    let cache = a.sets.cache();
    let mut bar = progress_bar(a.json);
    let guard = fit_on_splits(
        lm,
        &harmful,
        &harmless,
        cache.as_deref(),
        &|| false,
        &mut bar,
    )?;
    guard
        .save(&a.out)
        .with_context(|| format!("cannot save the guard to {}", a.out.display()))?;
    // The val split it was chosen on, as the test split is evaluated (states are cached).
    let inputs = GuardInputs {
        harmful: &harmful,
        harmless: &harmless,
        borderline: None,
        jailbreaks: &[],
        split: Split::Val,
    };
    let tau = guard.tau;
    let val = evaluate(lm, guard, &inputs, cache.as_deref(), &|| false, &mut bar)?;
    let (guard, val) = (&val.guard, val.comparison(tau));
    if a.json {
        println!(
            "{}",
            serde_json::json!({"guard": {"layers": guard.layers, "tau": guard.tau,
            "n_harmful": guard.n_harmful, "n_harmless": guard.n_harmless}, "val": val})
        );
        return Ok(());
    }
    println!(
        "Latent Guard fitted on {} harmful and {} harmless train prompts; states {}..{} and τ = {:.4} chosen on val ({} + {} prompts)",
        guard.n_harmful, guard.n_harmless, guard.layers.start, guard.layers.end, guard.tau,
        val.n_harmful, val.n_harmless
    );
    println!(
        "val: guard AUC {} · refusal score AUC {}",
        fmt_auc(val.guard.auc),
        fmt_auc(val.refusal_score.auc)
    );
    println!("saved {}", a.out.display());
    Ok(())
}

fn fmt_auc(a: Option<f32>) -> String {
    a.map_or("—".into(), |a| format!("{a:.3}"))
}

/// "Did it refuse": each prompt's greedy reply (through the model's gate, if it has one)
/// classified by response mode.
fn refused_replies(
    lm: &LoadedModel,
    prompts: &[&str],
    tokens: usize,
    quiet: bool,
) -> Result<Vec<bool>> {
    let ids = prompts
        .iter()
        .map(|p| Ok(lm.chat_prompt(None, p)?.ids))
        .collect::<Result<Vec<_>>>()?;
    let mut bar = progress_bar(quiet);
    let replies = greedy_replies(
        lm,
        &ids,
        tokens,
        RefusalGate::for_model(lm, lm.refusal_tau()),
        &|| false,
        &mut |d, t| bar("replies", d, t),
    )?;
    Ok(replies
        .iter()
        .map(|r| classify(&r.text).mode == ResponseMode::Refusal)
        .collect())
}

/// One group of harmful prompts' row (a jailbreak template, or the plain prompts): how many
/// the guard flags and how many the model refuses (p ≥ its gate's τ at t_post).
#[derive(Debug, Clone, Serialize)]
struct JailbreakRow {
    id: String,
    technique: String,
    n: usize,
    guard_detection_rate: f32,
    refusal_rate: f32,
    mean_guard_score: f32,
    mean_refusal_score: f32,
}

#[derive(Debug, Clone, Serialize)]
struct CategoryRow {
    category: String,
    n: usize,
    guard_detection_rate: f32,
    refusal_rate: f32,
}

/// The guard saved in `inputs.guard` evaluated on the inputs' split, and the jailbreak
/// templates it was evaluated under.
fn evaluated(
    lm: &LoadedModel,
    inputs: &EvalInputs,
    quiet: bool,
) -> Result<(GuardStudy, Vec<Jailbreak>)> {
    let guard = LatentGuard::load(&inputs.guard)?;
    let split = parse_split(&inputs.split)?;
    let (harmful, harmless) = inputs.sets.load()?;
    let borderline = match inputs.borderline.as_str() {
        "none" => None,
        path => Some(PromptSet::load(Path::new(path), None)?),
    };
    let jailbreaks = match inputs.jailbreaks.as_str() {
        "none" => Vec::new(),
        path => Jailbreak::load_all(Path::new(path))?,
    };
    let guard_inputs = GuardInputs {
        harmful: &harmful,
        harmless: &harmless,
        borderline: borderline.as_ref(),
        jailbreaks: &jailbreaks,
        split,
    };
    let mut bar = progress_bar(quiet);
    let cache = inputs.sets.cache();
    let study = evaluate(
        lm,
        guard,
        &guard_inputs,
        cache.as_deref(),
        &|| false,
        &mut bar,
    )?;
    Ok((study, jailbreaks))
}

/// Share of `flags` that are true.
fn rate(flags: impl Iterator<Item = bool>) -> f32 {
    let (n, k) = flags.fold((0, 0), |(n, k), f| (n + 1, k + f as usize));
    k as f32 / n.max(1) as f32
}

fn mean(v: impl Iterator<Item = f32>) -> f32 {
    let (n, sum) = v.fold((0, 0.0), |(n, s), x| (n + 1, s + x));
    sum / n.max(1) as f32
}

fn eval(lm: &LoadedModel, a: EvalArgs) -> Result<()> {
    let (study, templates) = evaluated(lm, &a.inputs, a.json)?;
    let (tau, tau_score) = (study.guard.tau, study.refusal_score_tau);
    let refused = if a.reply_tokens > 0 {
        let prompts = |group: &'static str| -> Vec<&str> {
            study.group(group).map(|p| p.prompt.as_str()).collect()
        };
        Some((
            refused_replies(lm, &prompts("harmful"), a.reply_tokens, a.json)?,
            refused_replies(lm, &prompts("harmless"), a.reply_tokens, a.json)?,
        ))
    } else {
        None
    };
    let comparison = study.comparison_with_replies(
        tau,
        refused.as_ref().map(|(h, l)| (h.as_slice(), l.as_slice())),
    );
    let row = |group: &str, id: &str, technique: &str| JailbreakRow {
        id: id.into(),
        technique: technique.into(),
        n: study.group(group).count(),
        guard_detection_rate: rate(study.group(group).map(|p| p.harmfulness >= tau)),
        refusal_rate: rate(study.group(group).map(|p| p.refusal_score >= tau_score)),
        mean_guard_score: mean(study.group(group).map(|p| p.harmfulness)),
        mean_refusal_score: mean(study.group(group).map(|p| p.refusal_score)),
    };
    let plain = row("harmful", "(plain)", "no wrapper");
    let jailbreaks: Vec<JailbreakRow> = templates
        .iter()
        .map(|j| row(&format!("jailbreak:{}", j.id), &j.id, &j.technique))
        .collect();
    let mut by_category: BTreeMap<String, Vec<&GuardPoint>> = BTreeMap::new();
    for p in study.group("harmful") {
        by_category
            .entry(p.category.clone().unwrap_or_else(|| "(none)".into()))
            .or_default()
            .push(p);
    }
    let categories: Vec<CategoryRow> = by_category
        .into_iter()
        .map(|(category, points)| CategoryRow {
            n: points.len(),
            guard_detection_rate: rate(points.iter().map(|p| p.harmfulness >= tau)),
            refusal_rate: rate(points.iter().map(|p| p.refusal_score >= tau_score)),
            category,
        })
        .collect();
    let borderline = (study.group("borderline").count() > 0).then(|| {
        serde_json::json!({"n": study.group("borderline").count(),
            "guard_false_positive_rate": rate(study.group("borderline").map(|p| p.harmfulness >= tau)),
            "refusal_rate": rate(study.group("borderline").map(|p| p.refusal_score >= tau_score))})
    });
    if a.json {
        println!(
            "{}",
            serde_json::json!({"split": a.inputs.split, "guard": {"layers": study.guard.layers,
                "tau": tau}, "refusal_tau": lm.refusal_tau(), "comparison": comparison,
                "categories": categories, "borderline": borderline, "plain": plain,
                "jailbreaks": jailbreaks})
        );
        return Ok(());
    }
    print_eval(
        &study.guard,
        &comparison,
        lm.refusal_tau(),
        &categories,
        borderline.as_ref(),
        &plain,
        &jailbreaks,
        &a.inputs.split,
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn print_eval(
    guard: &LatentGuard,
    c: &GuardComparison,
    refusal_tau: f32,
    categories: &[CategoryRow],
    borderline: Option<&serde_json::Value>,
    plain: &JailbreakRow,
    jailbreaks: &[JailbreakRow],
    split: &str,
) {
    println!(
        "{split} split: {} harmful, {} harmless · guard on states {}..{}, τ = {:.4} · refusal at p ≥ {refusal_tau}",
        c.n_harmful, c.n_harmless, guard.layers.start, guard.layers.end, guard.tau
    );
    println!(
        "{:32} {:>6} {:>9} {:>6}   TP  FN  FP  TN",
        "detector", "AUC", "accuracy", "F1"
    );
    let row = |name: &str, auc: Option<f32>, d: &Detection| {
        println!(
            "{name:32} {:>6} {:>9.3} {:>6.3} {:>4}{:>4}{:>4}{:>4}",
            fmt_auc(auc),
            d.accuracy(),
            d.f1(),
            d.true_positives,
            d.false_negatives,
            d.false_positives,
            d.true_negatives
        )
    };
    row("Latent Guard (t_inst)", c.guard.auc, &c.guard.at_tau);
    row(
        "refusal score (t_post)",
        c.refusal_score.auc,
        &c.refusal_score.at_tau,
    );
    if let Some(d) = &c.refused_reply {
        row("refused (reply's response mode)", None, d);
    }
    println!("\nharmful prompts by category: guard detection rate / refusal rate");
    for r in categories {
        println!(
            "  {:28} n={:<3} {:>5.2} / {:.2}",
            r.category, r.n, r.guard_detection_rate, r.refusal_rate
        );
    }
    if let Some(b) = borderline {
        println!(
            "\nborderline (harmless, trigger words): n={}, guard flags {:.2}, model refuses {:.2}",
            b["n"],
            b["guard_false_positive_rate"].as_f64().unwrap_or(f64::NAN),
            b["refusal_rate"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!("\njailbreak-wrapped harmful prompts: guard detection rate vs refusal rate");
    println!(
        "  {:26} {:>4} {:>7} {:>7} {:>12} {:>14}",
        "template", "n", "guard", "refuse", "mean guard", "mean refusal"
    );
    for r in std::iter::once(plain).chain(jailbreaks) {
        println!(
            "  {:26} {:>4} {:>7.2} {:>7.2} {:>12.4} {:>14.2}",
            r.id,
            r.n,
            r.guard_detection_rate,
            r.refusal_rate,
            r.mean_guard_score,
            r.mean_refusal_score
        );
    }
}

fn scatter(lm: &LoadedModel, a: ScatterArgs) -> Result<()> {
    let (study, _) = evaluated(lm, &a.inputs, a.json)?;
    let points = &study.points;
    // The plain prompt a wrapped one wraps, by id.
    let wraps = |p: &GuardPoint| p.wraps.map(|i| points[i].id.clone());
    if let Some(out) = &a.out {
        let mut csv = String::from("group,id,wraps,harmfulness,refusal_score,prompt\n");
        for p in points {
            csv.push_str(&format!(
                "{},{},{},{},{},\"{}\"\n",
                p.group,
                p.id,
                wraps(p).unwrap_or_default(),
                p.harmfulness,
                p.refusal_score,
                p.prompt.replace('"', "\"\"")
            ));
        }
        std::fs::write(out, csv).with_context(|| format!("cannot write {}", out.display()))?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({"guard_tau": study.guard.tau, "refusal_score_tau": study.refusal_score_tau,
                "points": points.iter().map(|p| serde_json::json!({"group": p.group, "id": p.id,
                    "wraps": wraps(p), "prompt": p.prompt, "harmfulness": p.harmfulness,
                    "refusal_score": p.refusal_score})).collect::<Vec<_>>()})
        );
        return Ok(());
    }
    // Group means: where each group sits in the plane.
    let mut means: BTreeMap<&str, (f32, f32, usize)> = BTreeMap::new();
    for p in points {
        let group = if p.group.starts_with("jailbreak:") {
            "jailbreak-wrapped"
        } else {
            p.group.as_str()
        };
        let m = means.entry(group).or_default();
        *m = (m.0 + p.harmfulness, m.1 + p.refusal_score, m.2 + 1);
    }
    println!(
        "{} points (harmfulness at t_inst, refusal score at t_post); group means:",
        points.len()
    );
    for (g, (h, r, n)) in means {
        println!(
            "  {g:20} n={n:<4} harmfulness {:>8.4}  refusal score {:>7.2}",
            h / n as f32,
            r / n as f32
        );
    }
    if let Some(out) = &a.out {
        println!("wrote {}", out.display());
    }
    Ok(())
}
