//! `refusal-lens heads <metric>`: per-head attribution tables (DLA, interchange, ablation).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use refusal_lens_engine::analysis::heads::{
    ablation_effect, attribution_patching, cipher_contrast, correlation, find_routing, head_means,
    interchange, knockout_cascade, pair_dla, pair_interchange, refusal_scores, scale_heads,
    suppression_scan, Cipher, Dla, HeadMap, ScanAblation,
};
use refusal_lens_engine::data::prompts::{PromptSet, Split};
use refusal_lens_engine::refusal::{probability_of_score, refusal_rate};
use refusal_lens_engine::LoadedModel;

#[derive(Args, Debug)]
pub struct HeadsArgs {
    /// dla (harmful − harmless), interchange (necessity and sufficiency), attribution
    /// (attribution patching vs exact interchange), ablation, suppression (heads whose
    /// ablation raises refusal on complied-with harmful prompts; --pairs caps the prompts),
    /// cascade / routing (knockout cascade of a gate; the gate/amplifier finder), cipher, or
    /// all (every metric the GUI's heatmap shows, saved with --out as JSON the GUI can load).
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
    /// dla, interchange, ablation, cipher: average over this many pairs (the harmful side for
    /// ablation and cipher; suppression: at most this many complied-with prompts).
    #[arg(long, default_value_t = 1)]
    pub pairs: usize,
    /// interchange: patch the last k positions (default: the post-instruction tokens).
    #[arg(long)]
    pub k: Option<usize>,
    /// ablation: scale each head's z by this (0 = zero ablation; 0.1 traces, 0.01 ablates).
    #[arg(long, default_value_t = 0.0)]
    pub factor: f32,
    /// ablation: replace each head's z by its mean over the harmless prompts instead.
    #[arg(long)]
    pub mean: bool,
    /// cascade: the gate head L.H to knock out (default: found by the gate/amplifier finder).
    #[arg(long)]
    pub gate: Option<String>,
    /// cipher: caesar, atbash or random (seeded).
    #[arg(long, default_value = "caesar")]
    pub cipher: String,
    /// Rows of the top-heads table.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// all: where to save the metrics (JSON).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// `L.H` (or `L12.H3`).
pub fn parse_head(s: &str) -> Result<(usize, usize)> {
    let (l, h) = s
        .trim_start_matches('L')
        .split_once('.')
        .with_context(|| format!("expected a head as L.H, got `{s}`"))?;
    Ok((
        l.parse().with_context(|| format!("bad layer in `{s}`"))?,
        h.trim_start_matches('H')
            .parse()
            .with_context(|| format!("bad head in `{s}`"))?,
    ))
}

fn print_top(name: &str, map: &HeadMap, top: usize) {
    println!("{name}: top {top} heads");
    for (l, h, v) in map.ranked().into_iter().take(top) {
        println!("  L{l}.H{h:<3} {v:>9.4}");
    }
}

/// One `heads` run: the model, the pairs, the arguments and the progress bar every metric's
/// table reads.
struct Tables<'a> {
    lm: &'a LoadedModel,
    pairs: &'a [(String, String)],
    a: &'a HeadsArgs,
    bar: &'a mut dyn FnMut(&str, usize, usize),
}

impl Tables<'_> {
    /// `dla`: DLA difference (harmful − harmless) over the pairs.
    fn dla(&mut self) -> Result<serde_json::Value> {
        let (lm, pairs, a) = (self.lm, self.pairs, self.a);
        let bar = &mut *self.bar;
        let d = pair_dla(lm, pairs, &|| false, &mut |phase, done, total| {
            bar(phase, done, total)
        })?;
        if !a.json {
            let mean =
                |x: &[Dla], f: &dyn Fn(&Dla) -> f32| x.iter().map(f).sum::<f32>() / x.len() as f32;
            println!(
                "DLA onto the refusal-vs-compliance logit direction at t_post, harmful − harmless, {} pair(s)",
                pairs.len()
            );
            println!(
                "logit difference: harmful {:.3}, harmless {:.3} (heads + embedding + MLPs reproduce it: {:.3}, {:.3})",
                mean(&d.harmful, &|x| x.logit_difference),
                mean(&d.harmless, &|x| x.logit_difference),
                mean(&d.harmful, &|x| x.sum()),
                mean(&d.harmless, &|x| x.sum()),
            );
            print_top("refusal-promoting (DLA difference)", &d.difference, a.top);
        }
        Ok(serde_json::json!({"metric": "dla", "pairs": pairs, "heads": d.difference}))
    }

    /// `interchange`: necessity and sufficiency, the mean over the pairs (each pair normalised
    /// by its own gap).
    fn interchange(&mut self) -> Result<serde_json::Value> {
        let (lm, pairs, a) = (self.lm, self.pairs, self.a);
        let bar = &mut *self.bar;
        let (_, r) = pair_interchange(lm, pairs, a.k, &|| false, &mut |phase, done, total| {
            bar(phase, done, total)
        })?;
        if !a.json {
            match pairs {
                [(x, y)] => println!("pair: {x:?} vs {y:?}"),
                _ => println!("mean over {} pairs", pairs.len()),
            }
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
        Ok(serde_json::json!({"metric": "interchange", "pairs": pairs, "result": r}))
    }

    fn attribution(&mut self) -> Result<serde_json::Value> {
        let (lm, pairs, a) = (self.lm, self.pairs, self.a);
        let bar = &mut *self.bar;
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
        Ok(
            serde_json::json!({"metric": "attribution", "pair": pairs[0], "attribution": fast,
            "exact": exact, "attribution_seconds": fast_seconds,
            "correlation": {"necessity": r_nec, "sufficiency": r_suf}}),
        )
    }

    fn cascade(&mut self) -> Result<serde_json::Value> {
        let (lm, pairs, a) = (self.lm, self.pairs, self.a);
        let bar = &mut *self.bar;
        let (x, y) = &pairs[0];
        let (routing, cascade) = match &a.gate {
            Some(g) => {
                let gate = parse_head(g)?;
                (None, knockout_cascade(lm, &[x.as_str()], gate, &|| false)?)
            }
            None => {
                // The finder needs the first pair's DLA difference and its necessity.
                let diff = pair_dla(lm, &pairs[..1], &|| false, &mut |_, _, _| {})?.difference;
                let ex = interchange(lm, x, y, a.k, &|| false, &mut |d, t| {
                    bar("exact patching", d, t)
                })?;
                let (r, c) = find_routing(lm, x, &diff, &ex.necessity, &|| false)?;
                (Some(r), c)
            }
        };
        if !a.json {
            println!("pair: {x:?} vs {y:?}");
            if let Some(r) = &routing {
                println!(
                    "gate: L{}.H{} (necessity {:.3}, DLA {:+.3}); amplifiers (clean DLA → change with the gate knocked out):",
                    r.gate.0, r.gate.1, r.gate_necessity, r.gate_dla
                );
                for (l, h, c, d) in &r.amplifiers {
                    println!("  L{l}.H{h:<3} {c:>8.3} {d:>+9.3}");
                }
                if r.amplifiers.is_empty() {
                    println!(
                        "  none of the top-10 DLA heads after the gate lose ≥ 25% of their DLA"
                    );
                }
            }
            let mut falls = cascade.clone();
            falls.values.iter_mut().for_each(|v| *v = -*v);
            print_top("knockout cascade: largest DLA falls", &falls, a.top);
        }
        Ok(
            serde_json::json!({"metric": "cascade", "pair": pairs[0], "routing": routing, "cascade": cascade}),
        )
    }

    fn cipher(&mut self) -> Result<serde_json::Value> {
        let (lm, pairs, a) = (self.lm, self.pairs, self.a);
        let bar = &mut *self.bar;
        let harmful: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
        let cipher: Cipher = a.cipher.parse()?;
        let map = cipher_contrast(lm, &harmful, cipher, &|| false, &mut |d, t| {
            bar("DLA", d, t)
        })?;
        if !a.json {
            println!(
                "cipher contrast ({}): DLA plain − cipher over {} harmful prompt(s); e.g. {:?}",
                a.cipher,
                harmful.len(),
                cipher.wrap(harmful[0])
            );
            print_top("cipher-sensitive heads (plain − cipher)", &map, a.top);
        }
        Ok(
            serde_json::json!({"metric": "cipher", "cipher": a.cipher, "prompts": harmful, "heads": map}),
        )
    }

    /// `suppression`: on the complied-with prompts of the whole harmful set (not the pairs).
    fn suppression(&mut self) -> Result<serde_json::Value> {
        let (lm, a) = (self.lm, self.a);
        let bar = &mut *self.bar;
        let set = PromptSet::load(&a.harmful, None)?;
        let all: Vec<&str> = set.records.iter().map(|r| r.prompt.as_str()).collect();
        let factor = if a.factor == 0.0 { 0.1 } else { a.factor };
        let (complied, map) =
            suppression_scan(lm, &all, factor, a.pairs.max(1), &|| false, &mut |d, t| {
                bar("scanning heads", d, t)
            })?;
        let n_top = ((map.values.len() as f32 * 0.03).round() as usize).max(1);
        let top: Vec<(usize, usize)> = map
            .ranked()
            .into_iter()
            .take(n_top)
            .map(|(l, h, _)| (l, h))
            .collect();
        let refs: Vec<&str> = complied.iter().map(String::as_str).collect();
        // The refusal rate at the model's τ, from the scores' probabilities.
        let rate = |scores: &[f32]| {
            let ps: Vec<f32> = scores.iter().map(|&s| probability_of_score(s)).collect();
            refusal_rate(&ps, lm.refusal_tau())
        };
        let before = refusal_scores(lm, &refs, &[])?;
        let after = refusal_scores(lm, &refs, &scale_heads(&top, factor))?;
        if !a.json {
            println!(
                "{} complied-with harmful prompt(s) of {}; attention scaled ×{factor}",
                complied.len(),
                a.harmful.display()
            );
            print_top(
                "refusal-suppressing heads (refusal score rise)",
                &map,
                a.top,
            );
            println!(
                "ablating the top {n_top} (3%): refusal rate on these prompts {:.0}% → {:.0}%, mean score {:.2} → {:.2}",
                rate(&before) * 100.0,
                rate(&after) * 100.0,
                before.iter().sum::<f32>() / before.len() as f32,
                after.iter().sum::<f32>() / after.len() as f32
            );
        }
        Ok(
            serde_json::json!({"metric": "suppression", "factor": factor, "prompts": complied, "heads": map,
            "top": top, "refusal_rate_before": rate(&before), "refusal_rate_after": rate(&after)}),
        )
    }

    fn ablation(&mut self) -> Result<serde_json::Value> {
        let (lm, pairs, a) = (self.lm, self.pairs, self.a);
        let bar = &mut *self.bar;
        let harmful: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
        let harmless: Vec<&str> = pairs.iter().map(|p| p.1.as_str()).collect();
        let how = if a.mean {
            // Means over the harmless sides of the pairs' split.
            ScanAblation::Mean(head_means(lm, &harmless)?)
        } else {
            ScanAblation::Scale(a.factor)
        };
        let effect = ablation_effect(lm, &harmful, &how, &|| false, &mut |d, t| {
            bar("ablating heads", d, t)
        })?;
        if !a.json {
            println!(
                "change in refusal score when each head is {} ({} harmful prompt(s)); most refusal-suppressing first",
                if a.mean {
                    format!("mean-ablated (means over {} harmless prompts)", harmless.len())
                } else {
                    format!("scaled by {}", a.factor)
                },
                harmful.len()
            );
            print_top("refusal score rise on ablation", &effect, a.top);
        }
        Ok(
            serde_json::json!({"metric": "ablation", "factor": a.factor, "prompts": harmful, "heads": effect}),
        )
    }
}

pub fn run(lm: &LoadedModel, a: HeadsArgs) -> Result<()> {
    let pairs = match (&a.harmful_prompt, &a.harmless_prompt) {
        (Some(x), Some(y)) => vec![(x.clone(), y.clone())],
        (None, None) => {
            let load = |p: &PathBuf| Ok::<_, anyhow::Error>(PromptSet::load(p, None)?);
            let split: Split = a.split.parse()?;
            let all = load(&a.harmful)?.pairs_with(&load(&a.harmless)?, split);
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
    let mut bar = super::lens::progress_bar(a.json);
    let started = std::time::Instant::now();
    let mut tables = Tables {
        lm,
        pairs: &pairs,
        a: &a,
        bar: &mut bar,
    };
    let result = match a.metric.as_str() {
        "all" => {
            // Every metric the GUI's heatmap shows, as one JSON file the GUI can load.
            let metrics = refusal_lens_engine::analysis::heads::head_metrics(
                lm,
                &pairs,
                &|| false,
                &mut |phase, done, total| (tables.bar)(phase, done, total),
            )?;
            let out = a.out.as_ref().context("heads all: give --out FILE")?;
            let text = serde_json::to_string(&metrics)?;
            let tmp = out.with_extension("partial");
            std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
            serde_json::json!({"metric": "all", "pair": pairs[0], "pairs": pairs.len(), "saved": out})
        }
        "dla" => tables.dla()?,
        "interchange" => tables.interchange()?,
        "attribution" => tables.attribution()?,
        "cascade" | "routing" => tables.cascade()?,
        "cipher" => tables.cipher()?,
        "suppression" => tables.suppression()?,
        "ablation" => tables.ablation()?,
        other => bail!(
            "unknown metric `{other}` (use dla, interchange, attribution, ablation, suppression, cascade, routing, cipher or all)"
        ),
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
