//! Steering from the command line: the intervention flags of `generate` and `sweep`, the
//! dose-response `sweep`, and `control-vector` (export for llama.cpp).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use refusal_lens_engine::analysis::directions::Directions;
use refusal_lens_engine::analysis::steering::{
    head_mean, sweep, write_control_vector, Direction, Edit, HeadAblation, Steering,
    StreamPositions,
};
use refusal_lens_engine::data::prompts::{sample_prompts_dir, PromptSet, Split};
use refusal_lens_engine::refusal::response::ResponseMode;
use refusal_lens_engine::LoadedModel;

/// Interventions applied on every forward pass (prompt and generated tokens).
#[derive(Args, Debug, Clone, Default)]
pub struct SteerArgs {
    /// Activation addition: DIRS.safetensors:LAYER:ALPHA[:harmfulness] (LAYER may be a range
    /// A-B; the refusal direction unless `harmfulness`). Repeatable.
    #[arg(long = "steer", allow_hyphen_values = true)]
    pub steer: Vec<String>,
    /// Directional ablation: DIRS.safetensors[:harmfulness][@FRACTION] (the fraction of the
    /// component removed: 1, the default, projects it out; 0.5 halves it; 2 reflects it).
    /// Repeatable.
    #[arg(long = "ablate-direction")]
    pub ablate_direction: Vec<String>,
    /// Head ablation: L.H[:zero|:scale=F|:mean] (mean over the sample harmless prompts).
    /// Repeatable.
    #[arg(long = "ablate-head")]
    pub ablate_head: Vec<String>,
    /// Add steering vectors only at post-instruction and generated positions.
    #[arg(long)]
    pub post_instruction_only: bool,
}

fn parse_direction(s: Option<&str>) -> Result<Direction> {
    match s {
        None | Some("refusal") => Ok(Direction::Refusal),
        Some("harmfulness") => Ok(Direction::Harmfulness),
        Some(o) => bail!("unknown direction `{o}` (use refusal or harmfulness)"),
    }
}

/// `A` or `A-B`.
pub fn parse_layers(s: &str) -> Result<(usize, usize)> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let (a, b) = (
        a.trim()
            .parse::<usize>()
            .with_context(|| format!("bad layer `{s}`"))?,
        b.trim()
            .parse::<usize>()
            .with_context(|| format!("bad layer `{s}`"))?,
    );
    if a > b {
        bail!("layer range `{s}` is reversed");
    }
    Ok((a, b))
}

/// Loads `path` once and checks every flag names the same file.
struct DirsFile {
    path: Option<PathBuf>,
    dirs: Option<Directions>,
}

impl DirsFile {
    fn get(&mut self, path: &str, lm: &LoadedModel) -> Result<()> {
        let p = PathBuf::from(path);
        match &self.path {
            Some(old) if *old != p => bail!(
                "all steering flags must use one directions file ({} vs {})",
                old.display(),
                p.display()
            ),
            Some(_) => Ok(()),
            None => {
                let d = Directions::load(&p)?;
                d.check_fits(lm)?;
                self.path = Some(p);
                self.dirs = Some(d);
                Ok(())
            }
        }
    }
}

impl SteerArgs {
    pub fn is_empty(&self) -> bool {
        self.steer.is_empty() && self.ablate_direction.is_empty() && self.ablate_head.is_empty()
    }

    /// The edits and the directions file they use.
    pub fn build(&self, lm: &LoadedModel) -> Result<(Steering, Option<Directions>)> {
        let mut file = DirsFile {
            path: None,
            dirs: None,
        };
        let mut edits = Vec::new();
        let positions = if self.post_instruction_only {
            StreamPositions::PostInstruction
        } else {
            StreamPositions::All
        };
        for s in &self.steer {
            // FILE:LAYER:ALPHA[:DIRECTION], read from the right (the path may hold ':').
            let bad =
                || anyhow::anyhow!("--steer expects DIRS:LAYER:ALPHA[:harmfulness], got `{s}`");
            let (rest, dir) = match s.rsplit_once(':') {
                Some((r, d)) if d == "refusal" || d == "harmfulness" => (r, Some(d)),
                _ => (s.as_str(), None),
            };
            let (rest, alpha) = rest.rsplit_once(':').ok_or_else(bad)?;
            let (path, layer) = rest.rsplit_once(':').ok_or_else(bad)?;
            file.get(path, lm)?;
            edits.push(Edit::Add {
                direction: parse_direction(dir)?,
                layers: parse_layers(layer)?,
                alpha: alpha.parse().with_context(|| format!("bad α in `{s}`"))?,
                positions,
            });
        }
        for s in &self.ablate_direction {
            let (s, fraction) = match s.rsplit_once('@') {
                Some((rest, f)) => (
                    rest,
                    f.parse::<f32>()
                        .ok()
                        .filter(|f| f.is_finite())
                        .with_context(|| format!("--ablate-direction: `{f}` is not a fraction"))?,
                ),
                None => (s.as_str(), 1.0),
            };
            let (path, dir) = match s.rsplit_once(':') {
                Some((p, d)) if d == "refusal" || d == "harmfulness" => (p, Some(d)),
                _ => (s, None),
            };
            file.get(path, lm)?;
            edits.push(Edit::Ablate {
                direction: parse_direction(dir)?,
                fraction,
            });
        }
        for s in &self.ablate_head {
            let (head, how) = s.split_once(':').unwrap_or((s, "zero"));
            let (l, h) = head
                .trim_start_matches('L')
                .split_once('.')
                .with_context(|| format!("--ablate-head expects L.H, got `{s}`"))?;
            let layer: usize = l.parse().with_context(|| format!("bad layer in `{s}`"))?;
            let head: usize = h
                .trim_start_matches('H')
                .parse()
                .with_context(|| format!("bad head in `{s}`"))?;
            let how = match how {
                "zero" => HeadAblation::Zero,
                "mean" => {
                    let set = PromptSet::load(&sample_prompts_dir().join("harmless.jsonl"), None)?;
                    let prompts: Vec<&str> = set
                        .split(Some(Split::Train))
                        .take(32)
                        .map(|r| r.prompt.as_str())
                        .collect();
                    HeadAblation::Mean(head_mean(lm, &prompts, layer, head)?)
                }
                other => match other.strip_prefix("scale=") {
                    Some(f) => HeadAblation::Scale(
                        f.parse().with_context(|| format!("bad factor in `{s}`"))?,
                    ),
                    None => bail!("head ablation `{other}`: use zero, mean or scale=F"),
                },
            };
            edits.push(Edit::AblateHead { layer, head, how });
        }
        Ok((Steering { edits }, file.dirs))
    }
}

/// A direction from a saved directions file and the layers it acts at.
#[derive(Args, Debug)]
pub struct DirectionChoice {
    /// Directions saved by `refusal-lens directions --out`.
    #[arg(long)]
    pub directions: PathBuf,
    /// refusal or harmfulness.
    #[arg(long, default_value = "refusal")]
    pub direction: String,
    /// Layer or range A-B (default: the directions' chosen layer).
    #[arg(long)]
    pub layers: Option<String>,
}

impl DirectionChoice {
    /// The directions (checked against `lm`), the direction and the layer range.
    fn load(&self, lm: &LoadedModel) -> Result<(Directions, Direction, (usize, usize))> {
        let dirs = Directions::load(&self.directions)?;
        dirs.check_fits(lm)?;
        let direction = parse_direction(Some(self.direction.as_str()))?;
        let layers = match &self.layers {
            Some(l) => parse_layers(l)?,
            None => (dirs.layer, dirs.layer),
        };
        Ok((dirs, direction, layers))
    }
}

#[derive(Args, Debug)]
pub struct SweepArgs {
    /// Prompts to steer.
    #[arg(long, default_value = "sample_prompts/harmless.jsonl")]
    pub set: PathBuf,
    /// Only this split of the set.
    #[arg(long, default_value = "test")]
    pub split: Option<String>,
    /// At most this many prompts.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Which direction, from which file, at which layers (a single layer with negative α is
    /// detection-layer modulation).
    #[command(flatten)]
    pub steer_along: DirectionChoice,
    /// Comma-separated α values.
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "-1,-0.5,0,0.5,1"
    )]
    pub alphas: Vec<f32>,
    /// Also measure with the direction ablated (a row labelled "ablate").
    #[arg(long)]
    pub with_ablation: bool,
    /// Greedy reply tokens per prompt for the response-mode mix (1: first token only).
    #[arg(long, default_value_t = 24)]
    pub reply_tokens: usize,
    /// Edits applied under every α (e.g. --ablate-head 27.2).
    #[command(flatten)]
    pub base: SteerArgs,
    /// Refusal threshold τ: with refusal tokens, emit [refuse] when p([refuse]) ≥ τ (default: the
    /// adapter's τ calibrated on val, else 0.5).
    #[arg(long)]
    pub tau: Option<f32>,
    #[arg(long)]
    pub json: bool,
}

pub fn run_sweep(lm: &LoadedModel, a: SweepArgs) -> Result<()> {
    let (dirs, direction, layers) = a.steer_along.load(lm)?;
    let set = PromptSet::load(&a.set, None)?;
    let split = a.split.as_deref().map(str::parse::<Split>).transpose()?;
    let mut prompts: Vec<&str> = set.split(split).map(|r| r.prompt.as_str()).collect();
    if prompts.is_empty() {
        prompts = set.records.iter().map(|r| r.prompt.as_str()).collect();
    }
    prompts.truncate(a.limit.unwrap_or(usize::MAX));
    let positions = if a.base.post_instruction_only {
        StreamPositions::PostInstruction
    } else {
        StreamPositions::All
    };
    let (base, base_dirs) = a.base.build(lm)?;
    if base_dirs.is_some() {
        bail!("--steer/--ablate-direction under a sweep would use a second directions file; use --ablate-head only");
    }
    let steering_at = |alpha: f32| {
        let mut edits = base.edits.clone();
        edits.push(Edit::Add {
            direction,
            layers,
            alpha,
            positions,
        });
        Steering { edits }
    };
    let tau = a.tau.unwrap_or(lm.refusal_tau());
    let started = std::time::Instant::now();
    let mut bar = super::lens::progress_bar(a.json);
    let mut points = sweep(
        lm,
        Some(&dirs),
        &prompts,
        &a.alphas,
        &steering_at,
        tau,
        a.reply_tokens,
        &|| false,
        &mut |d, t| bar("sweeping α", d, t),
    )?;
    let mut labels: Vec<String> = a.alphas.iter().map(|x| format!("{x:+.2}")).collect();
    if a.with_ablation {
        let ablate = |_: f32| {
            let mut edits = base.edits.clone();
            edits.push(Edit::Ablate {
                direction,
                fraction: 1.0,
            });
            Steering { edits }
        };
        let mut bar = super::lens::progress_bar(a.json);
        points.extend(sweep(
            lm,
            Some(&dirs),
            &prompts,
            &[f32::NAN],
            &ablate,
            tau,
            a.reply_tokens,
            &|| false,
            &mut |d, t| bar("ablating", d, t),
        )?);
        labels.push("ablate".into());
    }
    let seconds = started.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"set": a.set, "prompts": prompts.len(), "direction": direction.name(),
                "layers": layers, "labels": labels, "points": points, "seconds": seconds})
        );
        return Ok(());
    }
    println!(
        "{} prompts of {}; {} direction at layers {}–{}; refusal = first-token p ≥ τ = {}",
        prompts.len(),
        a.set.display(),
        direction.name(),
        layers.0,
        layers.1,
        tau
    );
    print!(
        "{:>7} {:>9} {:>11} {:>10}",
        "α", "refused", "mean score", "judgement"
    );
    let with_modes = points.iter().any(|p| !p.modes.is_empty());
    if with_modes {
        for m in ResponseMode::ALL {
            print!(" {:>12}", m.name());
        }
    }
    println!();
    for (label, p) in labels.iter().zip(&points) {
        print!(
            "{label:>7} {:>8.1}% {:>11.2} {:>10.2}",
            p.refusal_rate * 100.0,
            p.mean_refusal_score,
            p.mean_judgement
        );
        for (_, share) in &p.modes {
            print!(" {:>11.0}%", share * 100.0);
        }
        println!();
    }
    println!(
        "judgement = log p(yes) − log p(no) to \"{}\", steering before the question",
        refusal_lens_engine::analysis::steering::JUDGEMENT_QUESTION
    );
    eprintln!("[{seconds:.1} s]");
    Ok(())
}

#[derive(Args, Debug)]
pub struct ControlVectorArgs {
    /// Which direction, from which file, at which residual states (llama.cpp's layer N output
    /// is state N+1, so states ≥ 2).
    #[command(flatten)]
    pub export: DirectionChoice,
    /// Scale baked into the vectors (llama.cpp applies its own scale on top).
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub alpha: f32,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn control_vector(lm: &LoadedModel, a: ControlVectorArgs) -> Result<()> {
    let (dirs, direction, layers) = a.export.load(lm)?;
    write_control_vector(
        &a.out,
        &dirs,
        direction,
        layers,
        a.alpha,
        &lm.card.architecture,
    )?;
    println!(
        "wrote {} ({} direction, states {}–{} → llama.cpp direction.{}–{}, α {})",
        a.out.display(),
        direction.name(),
        layers.0,
        layers.1,
        layers.0 - 1,
        layers.1 - 1,
        a.alpha
    );
    Ok(())
}
