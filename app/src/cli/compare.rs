//! `refusal-lens compare`: two models side by side. The first is the model the command runs
//! on; the second is another model (`--other`, optionally with `--other-adapter`), the first
//! without its adapter (`--other-base`), or the first with a refusal direction ablated from its
//! weights (`--other-ablated`). Per layer the cosine of their refusal and harmfulness
//! directions; each model's Latent Guard on its own and on the other's test prompts; their
//! refusal rates; and, with `--prompt`, their replies side by side.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{ArgGroup, Args};
use refusal_lens_engine::analysis::abliterate::orthogonalized;
use refusal_lens_engine::analysis::compare::{compare, replies};
use refusal_lens_engine::analysis::directions::Directions;
use refusal_lens_engine::analysis::guard::DetectorReport;
use refusal_lens_engine::data::prompts::PromptSet;
use refusal_lens_engine::model::FastPrecision;
use refusal_lens_engine::organism::Adapter;
use refusal_lens_engine::refusal::response::classify;
use refusal_lens_engine::LoadedModel;

use super::lens::{progress_bar, SetPair};
use super::ModelChoice;

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("second").required(true).args(["other", "other_base", "other_ablated"])))]
pub struct CompareArgs {
    /// The second model: a GGUF file or an HF safetensors folder.
    #[arg(long)]
    pub other: Option<PathBuf>,
    /// A refusal-token adapter for the second model (with --other).
    #[arg(long, requires = "other")]
    pub other_adapter: Option<PathBuf>,
    /// The second model is the first without its adapter (e.g. the organism against its base).
    #[arg(long)]
    pub other_base: bool,
    /// The second model is the first with the refusal direction of these directions (saved by
    /// `refusal-lens directions --out`) ablated from its weights.
    #[arg(long)]
    pub other_ablated: Option<PathBuf>,
    #[command(flatten)]
    pub sets: SetPair,
    /// Harmless prompts with trigger words (over-refusal); "none" to skip.
    #[arg(long, default_value = "sample_prompts/borderline.jsonl")]
    pub borderline: String,
    /// Also write both models' greedy replies to this prompt.
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(long, default_value_t = 48)]
    pub reply_tokens: usize,
    /// Write the per-layer cosines here as CSV.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// The second model as the arguments name it. `base` is the first model before its adapter,
/// if it has one.
fn second_model(
    first: &LoadedModel,
    base: Option<&LoadedModel>,
    a: &CompareArgs,
    choice: &ModelChoice,
) -> Result<LoadedModel> {
    if let Some(path) = &a.other {
        let mut lm = LoadedModel::load_with(path, FastPrecision::Auto, choice.exact_weights)
            .with_context(|| format!("cannot load the second model {}", path.display()))?;
        lm.template.enable_thinking = first.template.enable_thinking;
        if let Some(dir) = &a.other_adapter {
            let adapter = Adapter::load(dir)
                .with_context(|| format!("cannot read the adapter in {}", dir.display()))?;
            lm = adapter.apply(&lm)?;
        }
        return Ok(lm);
    }
    if a.other_base {
        let base = base.context(
            "--other-base: the model has no adapter to take off (give --adapter, or --other)",
        )?;
        return Ok(base.clone());
    }
    let path = a.other_ablated.as_ref().expect("clap requires one");
    let dirs = Directions::load(path)
        .with_context(|| format!("cannot read the directions in {}", path.display()))?;
    dirs.check_fits(first)?;
    Ok(orthogonalized(first, dirs.refusal_direction())?)
}

fn auc(r: &Option<DetectorReport>) -> String {
    r.as_ref()
        .and_then(|r| r.auc)
        .map_or("n/a".into(), |a| format!("{a:.3}"))
}

fn cell(v: Option<f32>) -> String {
    v.map_or("-".into(), |c| format!("{c:+.3}"))
}

pub fn run(
    first: &LoadedModel,
    base: Option<&LoadedModel>,
    a: CompareArgs,
    choice: &ModelChoice,
) -> Result<()> {
    let second = second_model(first, base, &a, choice)?;
    let (harmful, harmless) = a.sets.load()?;
    let borderline = match a.borderline.as_str() {
        "none" => None,
        path => Some(PromptSet::load(Path::new(path), None)?),
    };
    let cache = a.sets.cache();
    let mut bar = progress_bar(a.json);
    let c = compare(
        first,
        &second,
        &harmful,
        &harmless,
        borderline.as_ref(),
        cache.as_deref(),
        &|| false,
        &mut bar,
    )?;
    if let Some(path) = &a.csv {
        std::fs::write(path, c.layers_csv())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let replies = a
        .prompt
        .as_deref()
        .map(|p| replies([first, &second], p, a.reply_tokens, &|| false))
        .transpose()?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"comparison": c, "prompt": a.prompt, "replies": replies})
        );
        return Ok(());
    }
    println!("first:  {}\nsecond: {}", c.first.name, c.second.name);
    println!(
        "\ntest split: {} harmful, {} harmless prompts",
        c.n_test_harmful, c.n_test_harmless
    );
    println!("                          first    second");
    let rate = |v: Option<f32>| v.map_or("   n/a".into(), |r| format!("{r:6.2}"));
    for (name, x, y) in [
        (
            "refusal rate, harmful",
            Some(c.first.harmful_refusal_rate),
            Some(c.second.harmful_refusal_rate),
        ),
        (
            "refusal rate, harmless",
            Some(c.first.harmless_refusal_rate),
            Some(c.second.harmless_refusal_rate),
        ),
        (
            "refusal rate, borderline",
            c.first.borderline_refusal_rate,
            c.second.borderline_refusal_rate,
        ),
    ] {
        println!("{name:24}  {}    {}", rate(x), rate(y));
    }
    println!(
        "{:24}  {:>6}    {:>6}",
        "gate τ",
        format!("{:.2}", c.first.tau),
        format!("{:.2}", c.second.tau)
    );
    println!("\nLatent Guard test AUC (rows: whose guard; columns: whose states)");
    println!(
        "{:24}  {:>6}    {:>6}",
        "first's guard",
        auc(&Some(c.first.own_guard.clone())),
        auc(&c.first_guard_on_second)
    );
    println!(
        "{:24}  {:>6}    {:>6}",
        "second's guard",
        auc(&c.second_guard_on_first),
        auc(&Some(c.second.own_guard.clone()))
    );
    if c.layers.is_empty() {
        println!("\nthe residual streams differ in shape: no per-layer cosines");
    } else {
        println!("\nlayer   cos(refusal)   cos(harmfulness)   (first vs second)");
        for l in &c.layers {
            println!(
                "{:5}   {:>12}   {:>16}",
                l.layer,
                cell(l.refusal),
                cell(l.harmfulness)
            );
        }
    }
    if let (Some(prompt), Some(replies)) = (&a.prompt, &replies) {
        println!("\nprompt: {prompt}");
        for (who, reply) in ["first", "second"].iter().zip(replies) {
            println!(
                "{who:6}  [{}] {reply}",
                classify(
                    reply
                        .trim_start_matches("[refuse]")
                        .trim_start_matches("[respond]")
                )
                .mode
                .name()
            );
        }
    }
    Ok(())
}
