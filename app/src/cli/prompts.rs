//! Prompt-set commands that need no model: summarise or convert a set, classify a reply.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use refusal_lens_engine::data::prompts::{Label, PromptSet};
use refusal_lens_engine::refusal::response::classify as classify_reply;

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

pub fn prompts(a: PromptsArgs) -> Result<()> {
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

pub fn classify(a: ClassifyArgs) -> Result<()> {
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
