//! `refusal-lens heads <metric>`: per-head attribution tables (DLA, interchange, ablation).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use refusal_lens_engine::heads::{
    ablation_effect, attribution_patching, correlation, dla, dla_difference, interchange, HeadMap,
};
use refusal_lens_engine::prompts::{PromptSet, Split};
use refusal_lens_engine::LoadedModel;

#[derive(Args, Debug)]
pub struct HeadsArgs {
    /// dla (harmful − harmless), interchange (necessity and sufficiency), attribution
    /// (attribution patching vs exact interchange) or ablation.
    pub metric: String,
    /// The harmful prompt of the pair (default: a test pair of the sample sets).
    #[arg(long)]
    pub harmful_prompt: Option<String>,
    /// The harmless prompt of the pair.
    #[arg(long)]
    pub harmless_prompt: Option<String>,
    /// Harmful and harmless sets with `pair_id`s.
    #[arg(long, default_value = "sample_prompts/harmful.jsonl")]
    pub harmful: PathBuf,
    #[arg(long, default_value = "sample_prompts/harmless.jsonl")]
    pub harmless: PathBuf,
    /// The split the pairs come from (pick heads on val, measure on test).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Which pair of the split (0-based).
    #[arg(long, default_value_t = 0)]
    pub pair: usize,
    /// dla/ablation: average over this many pairs (harmful side for ablation).
    #[arg(long, default_value_t = 1)]
    pub pairs: usize,
    /// interchange: patch the last k positions (default: the post-instruction tokens).
    #[arg(long)]
    pub k: Option<usize>,
    /// ablation: scale each head's z by this (0 = zero ablation; 0.1 traces, 0.01 ablates).
    #[arg(long, default_value_t = 0.0)]
    pub factor: f32,
    /// Rows of the top-heads table.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    #[arg(long)]
    pub json: bool,
}

/// The (harmful, harmless) test pairs of two sets, matched by `pair_id`.
pub fn test_pairs(harmful: &PromptSet, harmless: &PromptSet) -> Vec<(String, String)> {
    pairs_in(harmful, harmless, Split::Test)
}

/// The (harmful, harmless) pairs of one split, matched by `pair_id`.
pub fn pairs_in(harmful: &PromptSet, harmless: &PromptSet, split: Split) -> Vec<(String, String)> {
    harmful
        .split(Some(split))
        .filter_map(|a| {
            let id = a.pair_id.as_ref()?;
            let b = harmless
                .records
                .iter()
                .find(|b| b.pair_id.as_ref() == Some(id))?;
            Some((a.prompt.clone(), b.prompt.clone()))
        })
        .collect()
}

fn print_top(name: &str, map: &HeadMap, top: usize) {
    println!("{name}: top {top} heads");
    for (l, h, v) in map.ranked().into_iter().take(top) {
        println!("  L{l}.H{h:<3} {v:>9.4}");
    }
}

pub fn run(lm: &LoadedModel, a: HeadsArgs) -> Result<()> {
    let pairs = match (&a.harmful_prompt, &a.harmless_prompt) {
        (Some(x), Some(y)) => vec![(x.clone(), y.clone())],
        (None, None) => {
            let load = |p: &PathBuf| {
                PromptSet::load(p, None).with_context(|| format!("cannot read {}", p.display()))
            };
            let split: Split = a.split.parse()?;
            let all = pairs_in(&load(&a.harmful)?, &load(&a.harmless)?, split);
            if all.is_empty() {
                bail!(
                    "the sets have no {} pairs (records with a shared pair_id)",
                    a.split
                );
            }
            all.into_iter().skip(a.pair).take(a.pairs.max(1)).collect()
        }
        _ => bail!("give both --harmful-prompt and --harmless-prompt, or neither"),
    };
    if pairs.is_empty() {
        bail!("--pair {} is past the sets' test pairs", a.pair);
    }
    let mut bar = crate::lens_cli::progress_bar(a.json);
    let started = std::time::Instant::now();
    let harmful: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
    let harmless: Vec<&str> = pairs.iter().map(|p| p.1.as_str()).collect();
    let result = match a.metric.as_str() {
        "dla" => {
            let da = dla(lm, &harmful, None, &|| false, &mut |d, t| {
                bar("DLA harmful", d, t)
            })?;
            let db = dla(lm, &harmless, None, &|| false, &mut |d, t| {
                bar("DLA harmless", d, t)
            })?;
            let diff = dla_difference(&da, &db)?;
            if !a.json {
                println!(
                    "DLA onto the refusal-vs-compliance logit direction at t_post, harmful − harmless, {} pair(s)",
                    pairs.len()
                );
                println!(
                    "logit difference: harmful {:.3}, harmless {:.3} (heads + embedding + MLPs reproduce it: {:.3}, {:.3})",
                    da.iter().map(|d| d.logit_difference).sum::<f32>() / da.len() as f32,
                    db.iter().map(|d| d.logit_difference).sum::<f32>() / db.len() as f32,
                    da.iter().map(|d| d.sum()).sum::<f32>() / da.len() as f32,
                    db.iter().map(|d| d.sum()).sum::<f32>() / db.len() as f32,
                );
                print_top("refusal-promoting (DLA difference)", &diff, a.top);
            }
            serde_json::json!({"metric": "dla", "pairs": pairs, "heads": diff})
        }
        "interchange" => {
            let (x, y) = &pairs[0];
            let r = interchange(lm, x, y, a.k, &|| false, &mut |d, t| {
                bar("patching heads", d, t)
            })?;
            if !a.json {
                println!("pair: {x:?} vs {y:?}");
                println!(
                    "clean refusal score harmful {:.3}, harmless {:.3}; last {} positions patched",
                    r.clean_harmful, r.clean_harmless, r.k
                );
                print_top(
                    "necessity (harmless z into the harmful run; fall / gap)",
                    &r.necessity,
                    a.top,
                );
                print_top(
                    "sufficiency (harmful z into the harmless run; rise / gap)",
                    &r.sufficiency,
                    a.top,
                );
            }
            serde_json::json!({"metric": "interchange", "pair": pairs[0], "result": r})
        }
        "attribution" => {
            let (x, y) = &pairs[0];
            let t0 = std::time::Instant::now();
            let fast = attribution_patching(lm, x, y, a.k)?;
            let fast_seconds = t0.elapsed().as_secs_f64();
            let exact = interchange(lm, x, y, a.k, &|| false, &mut |d, t| {
                bar("exact patching", d, t)
            })?;
            let r_nec = correlation(&fast.necessity, &exact.necessity);
            let r_suf = correlation(&fast.sufficiency, &exact.sufficiency);
            if !a.json {
                println!("pair: {x:?} vs {y:?}; last {} positions", fast.k);
                println!(
                    "attribution patching (one forward + one backward per prompt) in {fast_seconds:.2} s; \
                     Pearson r with exact interchange: necessity {r_nec:.3}, sufficiency {r_suf:.3}"
                );
                print_top("necessity, attribution estimate", &fast.necessity, a.top);
                print_top("necessity, exact", &exact.necessity, a.top);
            }
            serde_json::json!({"metric": "attribution", "pair": pairs[0], "attribution": fast,
                "exact": exact, "attribution_seconds": fast_seconds,
                "correlation": {"necessity": r_nec, "sufficiency": r_suf}})
        }
        "ablation" => {
            let effect = ablation_effect(lm, &harmful, a.factor, &|| false, &mut |d, t| {
                bar("ablating heads", d, t)
            })?;
            if !a.json {
                println!(
                    "change in refusal score when each head's z is scaled by {} ({} harmful prompt(s)); most refusal-suppressing first",
                    a.factor,
                    harmful.len()
                );
                print_top("refusal score rise on ablation", &effect, a.top);
            }
            serde_json::json!({"metric": "ablation", "factor": a.factor, "prompts": harmful, "heads": effect})
        }
        other => bail!("unknown metric `{other}` (use dla, interchange, attribution or ablation)"),
    };
    let seconds = started.elapsed().as_secs_f64();
    if a.json {
        let mut v = result;
        v["seconds"] = serde_json::json!(seconds);
        println!("{v}");
    } else {
        eprintln!("[{seconds:.2} s]");
    }
    Ok(())
}
