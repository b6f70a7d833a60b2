//! `refusal-lens export-ablated`: the refusal direction ablated from the weights, written as a
//! GGUF llama.cpp loads and/or an HF folder transformers loads, with its KL from the original on
//! harmless prompts and its refusal rate on harmful ones (as heretic reports them).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use refusal_lens_engine::analysis::abliterate::{orthogonalized, write_gguf, write_hf_folder};
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
    /// The GGUF to write (f32 weights; the model must have been loaded from a GGUF).
    #[arg(long, required_unless_present = "hf_out")]
    pub out: Option<PathBuf>,
    /// The HF folder to write (model.safetensors in f32, config, tokenizer, chat template).
    #[arg(long)]
    pub hf_out: Option<PathBuf>,
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
    if let Some(out) = &a.out {
        write_gguf(&ablated, &lm.card.path, out)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    if let Some(folder) = &a.hf_out {
        write_hf_folder(&ablated, folder)
            .with_context(|| format!("cannot write {}", folder.display()))?;
    }
    // What llama.cpp or transformers will load: the file itself, read back (the GGUF when
    // both are written; the HF folder's logits are the same to rounding, as the tests check).
    let written = a
        .out
        .as_ref()
        .or(a.hf_out.as_ref())
        .expect("clap requires one");
    let exported = LoadedModel::load(written, FastPrecision::Auto)
        .with_context(|| format!("the written {} does not load", written.display()))?;
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
    // Both at the original's τ: an exported organism's file does not carry its calibration.
    let tau = lm.refusal_tau();
    let mut rate = |m: &LoadedModel, phase: &str| -> Result<f32> {
        let p =
            first_token_probabilities(m, &refs(&harmful), &|| false, &mut |d, t| bar(phase, d, t))?;
        Ok(refusal_rate(&p, tau))
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
    let mut kls: Vec<f32> = before
        .iter()
        .zip(&after)
        .map(|(p, q)| kl_divergence(p, q))
        .collect();
    let kl = kls.iter().sum::<f32>() / kls.len().max(1) as f32;
    // The mean is carried by a few prompts the ablation derails: the median says how typical
    // a harmless prompt fares.
    kls.sort_by(f32::total_cmp);
    let median_kl = kls.get(kls.len() / 2).copied().unwrap_or(0.0);
    let bytes = |p: &Option<PathBuf>| p.as_ref().map(|p| dir_bytes(p)).unwrap_or(0);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"out": a.out, "hf_out": a.hf_out, "gguf_bytes": bytes(&a.out),
                "hf_bytes": bytes(&a.hf_out), "direction": a.direction, "layer": dirs.layer,
                "tau": tau, "harmful_refusal_rate_before": rate_before,
                "harmful_refusal_rate_after": rate_after, "harmless_mean_kl": kl,
                "harmless_median_kl": median_kl,
                "n_harmful": harmful.len(), "n_harmless": harmless.len()})
        );
        return Ok(());
    }
    for (path, kind) in [(&a.out, "GGUF"), (&a.hf_out, "HF folder")] {
        if let Some(p) = path {
            println!(
                "wrote {} ({kind}, {:.0} MB, f32): the {} direction (layer {}) ablated from the weights",
                p.display(),
                bytes(path) as f64 / 1e6,
                a.direction,
                dirs.layer
            );
        }
    }
    println!(
        "refusal rate on {} harmful test prompts at τ {tau:.2}: {:.2} → {:.2}; next-token KL from the original on {} harmless ones: mean {kl:.4}, median {median_kl:.4}",
        harmful.len(),
        rate_before,
        rate_after,
        harmless.len()
    );
    Ok(())
}

/// The size of a file, or of the files in a folder.
fn dir_bytes(path: &std::path::Path) -> u64 {
    match std::fs::read_dir(path) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum(),
        Err(_) => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
    }
}
