//! Model commands: the card, a streamed reply, captured activations, and the speed bench.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::Args;
use refusal_lens_engine::hooks::{HookPoint, HookSpec};
use refusal_lens_engine::model::{ForwardOptions, LogitsAt};
use refusal_lens_engine::refusal::response::classify as classify_reply;
use refusal_lens_engine::refusal::{opener_bias, RefusalGate};
use refusal_lens_engine::run::generate::{generate, GenerateConfig, Precision, Sampling};
use refusal_lens_engine::LoadedModel;

use super::spinner;

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The user message.
    #[arg(long)]
    pub prompt: String,
    /// A system message (default: the template's own default, if any).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Every reply token on the dense f32 weights (the analysis path); by default only the
    /// prompt pass and so the first reply token are, and later tokens use the fast Q8_0 path.
    #[arg(long)]
    pub exact: bool,
    /// Refusal threshold τ: with refusal tokens, emit [refuse] when p([refuse]) ≥ τ (default: the
    /// adapter's τ calibrated on val, else 0.5).
    #[arg(long)]
    pub tau: Option<f32>,
    /// Without refusal tokens: logit bias on the refusal openers at the first reply token.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub opener_bias: f32,
    #[command(flatten)]
    pub steer: super::steer::SteerArgs,
    /// Print one JSON object per token, then a summary object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ActivationsArgs {
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub system: Option<String>,
    /// Output safetensors file; tensors are named by hook point.
    #[arg(long)]
    pub out: PathBuf,
    /// Hook points: kinds (resid_pre, ln1, q, k, v, attn_scores, attn_pattern, attn_z,
    /// attn_out, resid_mid, ln2, mlp_post, mlp_out, resid_post: every layer), `embed`,
    /// `ln_final`, `unembed_in`, or full names like blocks.3.hook_resid_pre.
    #[arg(long, default_value = "resid_pre,ln_final")]
    pub hooks: String,
    /// Also store the logits at every position as `logits`.
    #[arg(long)]
    pub logits: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(
        long,
        default_value = "Write a long story about a dragon who learns to fly."
    )]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Repetitions per measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn info(lm: &LoadedModel, a: InfoArgs) -> Result<()> {
    let c = &lm.card;
    if a.json {
        println!("{}", serde_json::to_string_pretty(c)?);
        return Ok(());
    }
    let quant: Vec<String> = c
        .quantization
        .iter()
        .map(|(k, v)| format!("{k} ×{v}"))
        .collect();
    println!("model          {}", c.name);
    println!("path           {}", c.path.display());
    println!("format         {}", c.format);
    println!("architecture   {}", c.architecture);
    println!("layers         {}", c.n_layers);
    println!("heads          {} (kv heads {})", c.n_heads, c.n_kv_heads);
    println!("width          {} (FFN {})", c.d_model, c.d_ff);
    println!("vocabulary     {}", c.vocab_size);
    println!("context        {}", c.context_length);
    println!(
        "parameters     {:.1} M{}",
        c.parameters as f64 / 1e6,
        if c.tied_embeddings {
            " (tied embeddings)"
        } else {
            ""
        }
    );
    println!("quantisation   {}", quant.join(", "));
    println!("generation     {}", c.generation_weights);
    println!("memory         {}", c.memory.describe());
    println!("device         {}", c.device);
    println!("chat template  {}", c.chat_template);
    Ok(())
}

pub fn reply(lm: &LoadedModel, a: GenerateArgs) -> Result<()> {
    let prompt = lm.chat_prompt(a.system.as_deref(), &a.prompt)?;
    let (steering, dirs) = a.steer.build(lm)?;
    let judgement = if steering.is_empty() {
        None
    } else {
        Some(refusal_lens_engine::analysis::steering::judgement(
            lm,
            &steering,
            dirs.as_ref(),
            a.system.as_deref(),
            &a.prompt,
        )?)
    };
    let cfg = GenerateConfig {
        max_new_tokens: a.max_tokens,
        sampling: Sampling {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
        },
        hooks: steering.hooks(lm, dirs.as_ref(), &prompt, None)?,
        refusal_gate: RefusalGate::for_model(lm, a.tau.unwrap_or(lm.refusal_tau())),
        first_token_bias: opener_bias(lm, a.opener_bias)?,
        refusal_signal: Some(refusal_lens_engine::refusal::RefusalSignal::for_model(lm)?),
        precision: if a.exact {
            Precision::Exact
        } else {
            Precision::Fast
        },
    };
    let json = a.json;
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let g = generate(lm, &prompt.ids, &cfg, &|| false, &mut |step| {
        let r = if json {
            serde_json::to_string(step)
                .map_err(std::io::Error::other)
                .and_then(|s| writeln!(stdout, "{s}"))
        } else {
            write!(stdout, "{}", step.text).and_then(|_| stdout.flush())
        };
        if let Err(e) = r {
            write_err.get_or_insert(e);
        }
    })?;
    if let Some(e) = write_err {
        bail!("cannot write the reply: {e}");
    }
    let mode = classify_reply(&g.text);
    let summary = serde_json::json!({
        "summary": {
            "refusal_probability": g.refusal_probability,
            "steering": steering.edits.iter().map(|e| e.describe()).collect::<Vec<_>>(),
            "judgement": judgement,
            "response_mode": mode.mode,
            "response_mode_reason": mode.reason,
            "prompt_tokens": g.prompt_tokens,
            "generated_tokens": g.tokens.len(),
            "stop": g.stop,
            "prefill_seconds": g.prefill_seconds,
            "decode_seconds": g.decode_seconds,
            "prefill_tokens_per_second": g.prefill_tokens_per_second(),
            "decode_tokens_per_second": g.decode_tokens_per_second(),
            "text": g.text,
        }
    });
    if json {
        writeln!(stdout, "{summary}")?;
    } else {
        writeln!(stdout)?;
        if !steering.is_empty() {
            let edits: Vec<String> = steering.edits.iter().map(|e| e.describe()).collect();
            eprintln!(
                "[steering: {}; judgement log p(yes) − log p(no) = {:.2}]",
                edits.join(", "),
                judgement.unwrap_or(f32::NAN)
            );
        }
        eprintln!(
            "[{} prompt tokens, {} generated, {:.0} tok/s prefill, {:.1} tok/s generation, stop: {:?}; response mode: {} ({})]",
            g.prompt_tokens, g.tokens.len(), g.prefill_tokens_per_second(), g.decode_tokens_per_second(), g.stop, mode.mode.name(), mode.reason
        );
    }
    Ok(())
}

pub fn activations(lm: &LoadedModel, a: ActivationsArgs) -> Result<()> {
    let points = HookPoint::parse_list(&a.hooks, lm.model.config.n_layers)?;
    if points.is_empty() {
        bail!("--hooks names no hook point");
    }
    let prompt = lm.chat_prompt(a.system.as_deref(), &a.prompt)?;
    let pb = spinner(
        format!("forward pass over {} tokens", prompt.ids.len()),
        a.json,
    );
    let started = Instant::now();
    let tokens = Tensor::new(prompt.ids.as_slice(), lm.model.device())?.unsqueeze(0)?;
    let spec = HookSpec::capture(points);
    let logits_at = if a.logits {
        LogitsAt::All
    } else {
        LogitsAt::None
    };
    let out = lm.model.forward(
        &lm.model.dense,
        &tokens,
        None,
        &spec,
        logits_at,
        ForwardOptions::default(),
    )?;
    let mut named = out.captures.named()?;
    if let Some(logits) = out.logits {
        named.push(("logits".into(), logits));
    }
    named.push((
        "input_ids".into(),
        Tensor::new(prompt.ids.as_slice(), lm.model.device())?,
    ));
    let map: std::collections::HashMap<String, Tensor> = named.iter().cloned().collect();
    candle_core::safetensors::save(&map, &a.out)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let summary = serde_json::json!({
        "out": a.out,
        "tokens": prompt.ids.len(),
        "t_inst": prompt.t_inst,
        "t_post": prompt.t_post,
        "tensors": named.iter().map(|(n, t)| serde_json::json!({"name": n, "shape": t.dims()})).collect::<Vec<_>>(),
        "seconds": started.elapsed().as_secs_f64(),
    });
    if a.json {
        println!("{summary}");
    } else {
        println!(
            "wrote {} tensors for {} tokens to {} (t_inst = {}, t_post = {})",
            named.len(),
            prompt.ids.len(),
            a.out.display(),
            prompt.t_inst,
            prompt.t_post
        );
    }
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

pub fn bench(lm: &LoadedModel, a: BenchArgs) -> Result<()> {
    use refusal_lens_engine::hooks::{Intervention, Positions};
    let repeats = a.repeats.max(1);
    let prompt = lm.chat_prompt(None, &a.prompt)?;
    let n = prompt.ids.len();
    let tokens = Tensor::new(prompt.ids.as_slice(), lm.model.device())?.unsqueeze(0)?;
    let model = &lm.model;
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let start = Instant::now();
        f()?;
        Ok(start.elapsed().as_secs_f64())
    };
    // Generation's prompt pass, which runs on the exact weights (generate::Precision::Fast).
    let prefill_once = || -> Result<()> {
        model.forward(
            &model.dense,
            &tokens,
            None,
            &HookSpec::default(),
            LogitsAt::Last,
            ForwardOptions::default(),
        )?;
        Ok(())
    };
    // Warm-up (page in weights, allocate).
    prefill_once()?;

    let mut prefill = Vec::new();
    let mut captures = Vec::new();
    let all_resid = HookSpec::capture((0..model.config.n_layers).map(HookPoint::ResidPre));
    for _ in 0..repeats {
        prefill.push(n as f64 / time(&mut || prefill_once())?);
        captures.push(
            n as f64
                / time(&mut || {
                    model.forward(
                        &model.dense,
                        &tokens,
                        None,
                        &all_resid,
                        LogitsAt::All,
                        ForwardOptions::default(),
                    )?;
                    Ok(())
                })?,
        );
    }
    // A steering vector at the middle layer, as the Steering panel adds one.
    let d = model.config.d_model;
    let v: Vec<f32> = (0..d)
        .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5)
        .collect();
    let steer = HookSpec::with_interventions(vec![Intervention::AddVector {
        point: HookPoint::ResidPre(model.config.n_layers / 2),
        vector: Tensor::from_vec(v, d, model.device())?,
        scale: 1.0,
        positions: Positions::All,
    }]);
    let decode = |hooks: &HookSpec| -> Result<(f64, usize)> {
        let mut rates = Vec::new();
        let mut produced = 0;
        for _ in 0..repeats {
            let cfg = GenerateConfig {
                max_new_tokens: a.max_tokens,
                hooks: hooks.clone(),
                ..Default::default()
            };
            let g = generate(lm, &prompt.ids, &cfg, &|| false, &mut |_| {})?;
            produced = g.tokens.len();
            rates.push(g.decode_tokens_per_second());
        }
        Ok((median(rates), produced))
    };
    let (plain, plain_n) = decode(&HookSpec::default())?;
    let (steered, steered_n) = decode(&steer)?;
    let report = serde_json::json!({
        "model": lm.card.name,
        "prompt_tokens": n,
        "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()),
        "kernels": refusal_lens_engine::model::KernelTier::detect().describe(),
        "prefill_tokens_per_second": median(prefill),
        "generation_tokens_per_second": plain,
        "generated_tokens": plain_n,
        "steered_generation_tokens_per_second": steered,
        "steered_generated_tokens": steered_n,
        "forward_all_resid_captures_tokens_per_second": median(captures),
    });
    if a.json {
        println!("{report}");
    } else {
        println!("prompt tokens                  {n}");
        println!("fast-path kernels              {}", report["kernels"]);
        println!(
            "prefill                        {:.0} tok/s",
            report["prefill_tokens_per_second"].as_f64().unwrap_or(0.0)
        );
        println!("generation                     {plain:.1} tok/s ({plain_n} tokens)");
        println!("steered generation             {steered:.1} tok/s ({steered_n} tokens)");
        println!(
            "forward + all resid captures   {:.0} tok/s",
            report["forward_all_resid_captures_tokens_per_second"]
                .as_f64()
                .unwrap_or(0.0)
        );
    }
    Ok(())
}
