//! `refusal-lens guard fit|eval|scatter`: Latent Guard (harmfulness at t_inst as a
//! harmful-input detector) beside refusal-based detection, on plain and jailbreak-wrapped
//! prompts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use refusal_lens_engine::analysis::activations::{collect_cached, SetActivations};
use refusal_lens_engine::analysis::guard::{
    Detection, DetectorInputs, GuardComparison, LatentGuard,
};
use refusal_lens_engine::data::prompts::{Jailbreak, PromptRecord, PromptSet, Split};
use refusal_lens_engine::refusal::response::{classify, ResponseMode};
use refusal_lens_engine::refusal::{refusal_score, RefusalGate};
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

/// States of `prompts` (cached like every analysis's), with a progress bar.
fn states(
    lm: &LoadedModel,
    prompts: &[&str],
    cache: Option<&Path>,
    phase: &str,
    quiet: bool,
) -> Result<SetActivations> {
    if prompts.is_empty() {
        bail!("no prompts for {phase}");
    }
    let mut bar = progress_bar(quiet);
    Ok(collect_cached(
        lm,
        prompts,
        None,
        cache,
        &|| false,
        &mut |d, t| bar(phase, d, t),
    )?)
}

fn prompts_of(set: &PromptSet, split: Split) -> Vec<&str> {
    set.split(Some(split)).map(|r| r.prompt.as_str()).collect()
}

fn fit(lm: &LoadedModel, a: FitArgs) -> Result<()> {
    let (harmful, harmless) = a.sets.load()?;
    let cache = a.sets.cache();
    let get = |set: &PromptSet, split, phase| {
        states(lm, &prompts_of(set, split), cache.as_deref(), phase, a.json)
    };
    let mut guard = LatentGuard::fit(
        &get(&harmful, Split::Train, "harmful train")?,
        &get(&harmless, Split::Train, "harmless train")?,
    )?;
    let (val_h, val_l) = (
        get(&harmful, Split::Val, "harmful val")?,
        get(&harmless, Split::Val, "harmless val")?,
    );
    guard.choose(&val_h, &val_l)?;
    guard
        .save(&a.out)
        .with_context(|| format!("cannot save the guard to {}", a.out.display()))?;
    let val = GuardComparison::new(
        &DetectorInputs {
            guard: (&guard.scores(&val_h)?, &guard.scores(&val_l)?),
            refusal_score: (&scores_at_t_post(&val_h), &scores_at_t_post(&val_l)),
            refused_reply: None,
        },
        guard.tau,
        refusal_score(lm.refusal_tau()),
    );
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

/// Each prompt's refusal score (log-odds of refusing) at t_post.
fn scores_at_t_post(acts: &SetActivations) -> Vec<f32> {
    acts.refusal_probability
        .iter()
        .map(|&p| refusal_score(p))
        .collect()
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

/// One jailbreak template's row: how many wrapped harmful prompts the guard flags and how
/// many the model refuses (p ≥ its gate's τ at t_post).
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

/// The evaluation's prompts and their states.
struct Evaluated {
    guard: LatentGuard,
    harmful: Vec<PromptRecord>,
    harmless: Vec<PromptRecord>,
    borderline: Vec<PromptRecord>,
    jailbreaks: Vec<Jailbreak>,
    states: BTreeMap<String, SetActivations>,
}

fn evaluated(lm: &LoadedModel, inputs: &EvalInputs, quiet: bool) -> Result<Evaluated> {
    let guard = LatentGuard::load(&inputs.guard)?;
    let split = parse_split(&inputs.split)?;
    let (harmful, harmless) = inputs.sets.load()?;
    let pick = |set: &PromptSet| set.split(Some(split)).cloned().collect::<Vec<_>>();
    let borderline = match inputs.borderline.as_str() {
        "none" => Vec::new(),
        path => pick(&PromptSet::load(Path::new(path), None)?),
    };
    let jailbreaks = match inputs.jailbreaks.as_str() {
        "none" => Vec::new(),
        path => Jailbreak::load_all(Path::new(path))?,
    };
    let (harmful, harmless) = (pick(&harmful), pick(&harmless));
    let cache = inputs.sets.cache();
    let mut states_of = BTreeMap::new();
    let texts = |rs: &[PromptRecord]| rs.iter().map(|r| r.prompt.clone()).collect::<Vec<_>>();
    let mut groups = vec![
        ("harmful".to_string(), texts(&harmful)),
        ("harmless".to_string(), texts(&harmless)),
    ];
    if !borderline.is_empty() {
        groups.push(("borderline".into(), texts(&borderline)));
    }
    for j in &jailbreaks {
        groups.push((
            format!("jailbreak:{}", j.id),
            harmful.iter().map(|r| j.wrap(&r.prompt)).collect(),
        ));
    }
    for (name, prompts) in groups {
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        states_of.insert(
            name.clone(),
            states(lm, &refs, cache.as_deref(), &name, quiet)?,
        );
    }
    Ok(Evaluated {
        guard,
        harmful,
        harmless,
        borderline,
        jailbreaks,
        states: states_of,
    })
}

fn eval(lm: &LoadedModel, a: EvalArgs) -> Result<()> {
    let e = evaluated(lm, &a.inputs, a.json)?;
    let tau_score = refusal_score(lm.refusal_tau());
    let scores = |name: &str| -> Result<(Vec<f32>, Vec<f32>)> {
        let acts = &e.states[name];
        Ok((e.guard.scores(acts)?, scores_at_t_post(acts)))
    };
    let (guard_h, refusal_h) = scores("harmful")?;
    let (guard_l, refusal_l) = scores("harmless")?;
    let refused = if a.reply_tokens > 0 {
        fn texts(rs: &[PromptRecord]) -> Vec<&str> {
            rs.iter().map(|r| r.prompt.as_str()).collect()
        }
        Some((
            refused_replies(lm, &texts(&e.harmful), a.reply_tokens, a.json)?,
            refused_replies(lm, &texts(&e.harmless), a.reply_tokens, a.json)?,
        ))
    } else {
        None
    };
    let comparison = GuardComparison::new(
        &DetectorInputs {
            guard: (&guard_h, &guard_l),
            refusal_score: (&refusal_h, &refusal_l),
            refused_reply: refused.as_ref().map(|(h, l)| (h.as_slice(), l.as_slice())),
        },
        e.guard.tau,
        tau_score,
    );
    let rate =
        |flags: &[bool]| flags.iter().filter(|&&f| f).count() as f32 / flags.len().max(1) as f32;
    let flagged = |s: &[f32], tau: f32| s.iter().map(|&x| x >= tau).collect::<Vec<_>>();
    // Per category of the harmful prompts.
    let mut by_category: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in e.harmful.iter().enumerate() {
        by_category
            .entry(r.category.clone().unwrap_or_else(|| "(none)".into()))
            .or_default()
            .push(i);
    }
    let categories: Vec<CategoryRow> = by_category
        .into_iter()
        .map(|(category, idx)| CategoryRow {
            n: idx.len(),
            guard_detection_rate: rate(
                &idx.iter()
                    .map(|&i| guard_h[i] >= e.guard.tau)
                    .collect::<Vec<_>>(),
            ),
            refusal_rate: rate(
                &idx.iter()
                    .map(|&i| refusal_h[i] >= tau_score)
                    .collect::<Vec<_>>(),
            ),
            category,
        })
        .collect();
    let borderline = (!e.borderline.is_empty())
        .then(|| -> Result<serde_json::Value> {
            let (g, r) = scores("borderline")?;
            Ok(serde_json::json!({"n": g.len(),
                "guard_false_positive_rate": rate(&flagged(&g, e.guard.tau)),
                "refusal_rate": rate(&flagged(&r, tau_score))}))
        })
        .transpose()?;
    let jailbreaks: Vec<JailbreakRow> = e
        .jailbreaks
        .iter()
        .map(|j| -> Result<JailbreakRow> {
            let (g, r) = scores(&format!("jailbreak:{}", j.id))?;
            Ok(JailbreakRow {
                id: j.id.clone(),
                technique: j.technique.clone(),
                n: g.len(),
                guard_detection_rate: rate(&flagged(&g, e.guard.tau)),
                refusal_rate: rate(&flagged(&r, tau_score)),
                mean_guard_score: g.iter().sum::<f32>() / g.len().max(1) as f32,
                mean_refusal_score: r.iter().sum::<f32>() / r.len().max(1) as f32,
            })
        })
        .collect::<Result<_>>()?;
    let plain = JailbreakRow {
        id: "(plain)".into(),
        technique: "no wrapper".into(),
        n: guard_h.len(),
        guard_detection_rate: rate(&flagged(&guard_h, e.guard.tau)),
        refusal_rate: rate(&flagged(&refusal_h, tau_score)),
        mean_guard_score: guard_h.iter().sum::<f32>() / guard_h.len().max(1) as f32,
        mean_refusal_score: refusal_h.iter().sum::<f32>() / refusal_h.len().max(1) as f32,
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({"split": a.inputs.split, "guard": {"layers": e.guard.layers,
                "tau": e.guard.tau}, "refusal_tau": lm.refusal_tau(), "comparison": comparison,
                "categories": categories, "borderline": borderline, "plain": plain,
                "jailbreaks": jailbreaks})
        );
        return Ok(());
    }
    print_eval(
        &e,
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
    e: &Evaluated,
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
        c.n_harmful, c.n_harmless, e.guard.layers.start, e.guard.layers.end, e.guard.tau
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

/// One point of the 2-D view.
#[derive(Debug, Clone, Serialize)]
struct ScatterPoint {
    group: String,
    id: String,
    /// The plain prompt's id for a jailbreak-wrapped one (the arrow's tail).
    wraps: Option<String>,
    prompt: String,
    harmfulness: f32,
    refusal_score: f32,
}

fn scatter(lm: &LoadedModel, a: ScatterArgs) -> Result<()> {
    let e = evaluated(lm, &a.inputs, a.json)?;
    let mut points = Vec::new();
    let mut add = |group: &str, records: &[PromptRecord], wrap: Option<&Jailbreak>| -> Result<()> {
        let acts = &e.states[group];
        let guard = e.guard.scores(acts)?;
        let refusal = scores_at_t_post(acts);
        for (i, r) in records.iter().enumerate() {
            points.push(ScatterPoint {
                group: group.to_string(),
                id: wrap.map_or(r.id.clone(), |j| format!("{}+{}", r.id, j.id)),
                wraps: wrap.map(|_| r.id.clone()),
                prompt: wrap.map_or(r.prompt.clone(), |j| j.wrap(&r.prompt)),
                harmfulness: guard[i],
                refusal_score: refusal[i],
            });
        }
        Ok(())
    };
    add("harmful", &e.harmful, None)?;
    add("harmless", &e.harmless, None)?;
    if !e.borderline.is_empty() {
        add("borderline", &e.borderline, None)?;
    }
    for j in &e.jailbreaks {
        add(&format!("jailbreak:{}", j.id), &e.harmful, Some(j))?;
    }
    if let Some(out) = &a.out {
        let mut csv = String::from("group,id,wraps,harmfulness,refusal_score,prompt\n");
        for p in &points {
            csv.push_str(&format!(
                "{},{},{},{},{},\"{}\"\n",
                p.group,
                p.id,
                p.wraps.as_deref().unwrap_or(""),
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
            serde_json::json!({"guard_tau": e.guard.tau, "refusal_score_tau": refusal_score(lm.refusal_tau()), "points": points})
        );
        return Ok(());
    }
    // Group means: where each group sits in the plane.
    let mut means: BTreeMap<&str, (f32, f32, usize)> = BTreeMap::new();
    for p in &points {
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
