//! `refusal-lens export-ablated`: the refusal direction ablated from the weights, written as a
//! GGUF llama.cpp loads, with its KL from the original on harmless prompts and its refusal
//! rate on harmful ones (as heretic reports them).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use refusal_lens_engine::analysis::abliterate::{orthogonalized, write_gguf};
use refusal_lens_engine::analysis::directions::{kl_divergence, Directions};
use refusal_lens_engine::data::prompts::Split;
use refusal_lens_engine::model::FastPrecision;
use refusal_lens_engine::refusal::{first_token_probabilities, refusal_rate};
use refusal_lens_engine::run::batch::first_positions;
use refusal_lens_engine::LoadedModel;

use super::lens::{progress_bar, SetPair};

#[derive(Args, Debug)]
pub struct ExportAblatedArgs {
    /// Directions saved by `refusal-lens directions --out`.
    #[arg(long)]
    pub directions: PathBuf,
    /// refusal (the chosen layer and position) or harmfulness (t_inst at the chosen layer).
    #[arg(long, default_value = "refusal")]
    pub direction: String,
    /// The GGUF to write (f32 weights).
    #[arg(long)]
    pub out: PathBuf,
    /// The harmful and harmless prompts the export is measured on (their test split).
    #[command(flatten)]
    pub sets: SetPair,
    #[arg(long)]
    pub json: bool,
}

pub fn run(lm: &LoadedModel, a: ExportAblatedArgs) -> Result<()> {
    let dirs = Directions::load(&a.directions)
        .with_context(|| format!("cannot read the directions in {}", a.directions.display()))?;
    dirs.check_fits(lm)?;
    let direction = match a.direction.as_str() {
        "refusal" => dirs.refusal_direction().to_vec(),
        "harmfulness" => dirs.harmfulness_at(dirs.layer).to_vec(),
        other => bail!("unknown direction `{other}` (refusal or harmfulness)"),
    };
    let ablated = orthogonalized(lm, &direction)?;
    write_gguf(&ablated, &lm.card.path, &a.out)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    // What llama.cpp will load: the file itself, read back.
    let exported =
        LoadedModel::load(&a.out, FastPrecision::Auto).context("the written GGUF does not load")?;
    let (harmful, harmless) = a.sets.load()?;
    let texts = |set: &refusal_lens_engine::data::prompts::PromptSet| -> Vec<String> {
        set.split(Some(Split::Test))
            .map(|r| r.prompt.clone())
            .collect()
    };
    let (harmful, harmless) = (texts(&harmful), texts(&harmless));
    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let mut bar = progress_bar(a.json);
    let mut rate = |m: &LoadedModel, phase: &str| -> Result<f32> {
        let p =
            first_token_probabilities(m, &refs(&harmful), &|| false, &mut |d, t| bar(phase, d, t))?;
        Ok(refusal_rate(&p, m.refusal_tau()))
    };
    let (rate_before, rate_after) = (rate(lm, "original")?, rate(&exported, "exported")?);
    let logprobs = |m: &LoadedModel| -> Result<Vec<Vec<f32>>> {
        let ids = refs(&harmless)
            .iter()
            .map(|p| Ok(m.chat_prompt(None, p)?.ids))
            .collect::<Result<Vec<_>>>()?;
        Ok(first_positions(
            m,
            &m.model.dense,
            &ids,
            &Default::default(),
            &|| false,
            &mut |_, _| {},
        )?
        .into_iter()
        .map(|f| f.logprobs)
        .collect())
    };
    let (before, after) = (logprobs(lm)?, logprobs(&exported)?);
    let kl = before
        .iter()
        .zip(&after)
        .map(|(p, q)| kl_divergence(p, q))
        .sum::<f32>()
        / before.len().max(1) as f32;
    let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"out": a.out, "bytes": bytes, "direction": a.direction,
                "layer": dirs.layer, "harmful_refusal_rate_before": rate_before,
                "harmful_refusal_rate_after": rate_after, "harmless_mean_kl": kl,
                "n_harmful": harmful.len(), "n_harmless": harmless.len()})
        );
        return Ok(());
    }
    println!(
        "wrote {} ({:.0} MB, f32): the {} direction (layer {}) ablated from the weights",
        a.out.display(),
        bytes as f64 / 1e6,
        a.direction,
        dirs.layer
    );
    println!(
        "refusal rate on {} harmful test prompts: {:.2} → {:.2}; mean next-token KL from the original on {} harmless ones: {kl:.4}",
        harmful.len(),
        rate_before,
        rate_after,
        harmless.len()
    );
    Ok(())
}
