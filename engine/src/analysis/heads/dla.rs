//! Direct logit attribution: every head's, MLP's and the embedding's write at t_post onto the
//! refusal-vs-compliance logit direction.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::hooks::cache::Stack;
use crate::hooks::{ActivationCache, HookPoint, HookSpec, Intervention};
use crate::{Error, LoadedModel, Result};

use super::{logit_direction, HeadMap};

/// Direct logit attribution at t_post of one prompt: every head's write, the embedding and
/// every MLP write, each dotted with `g ⊙ u / rms(x_L)` (the final RMSNorm linearised at this
/// run). They sum to the logit difference the model computes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dla {
    pub heads: HeadMap,
    pub embed: f32,
    pub mlp: Vec<f32>,
    /// The logit difference from the model's own logits.
    pub logit_difference: f32,
    /// `rms(x_L)` at t_post, the linearisation point.
    pub rms: f32,
}

impl Dla {
    /// Heads + embedding + MLPs.
    pub fn sum(&self) -> f32 {
        self.heads.values.iter().sum::<f32>() + self.embed + self.mlp.iter().sum::<f32>()
    }
}

/// DLA of each prompt (chat-templated), from one batched pass per 16 prompts, with
/// `interventions` applied (e.g. a knocked-out gate head; the norm is linearised at that run).
pub fn dla(
    lm: &LoadedModel,
    prompts: &[&str],
    system: Option<&str>,
    interventions: &[Intervention],
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Dla>> {
    let cfg = &lm.model.config;
    let (n_layers, n_heads, d) = (cfg.n_layers, cfg.n_heads, cfg.d_model);
    let u = Tensor::from_vec(logit_direction(lm)?, (d, 1), lm.model.device())?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| lm.chat_prompt(system, p).map(|c| c.ids))
        .collect::<Result<_>>()?;
    let mut points = vec![
        HookPoint::Embed,
        HookPoint::ResidPost(n_layers - 1),
        HookPoint::UnembedIn,
    ];
    points.extend((0..n_layers).flat_map(|l| {
        [
            HookPoint::AttnZ(l),
            HookPoint::AttnOut(l),
            HookPoint::MlpOut(l),
        ]
    }));
    let eps = cfg.rms_eps as f32;
    let mut out = Vec::with_capacity(prompts.len());
    let mut hooks = HookSpec::capture(points);
    hooks.interventions = interventions.to_vec();
    crate::run::batch::for_each_prompt(
        lm,
        &lm.model.dense,
        &ids,
        usize::MAX,
        &hooks,
        cancelled,
        progress,
        &mut |pass| {
            // The cache of t_post: each write's DLA is its share of the final norm's output
            // (the norm linearised at this run) dotted with u.
            let cache = ActivationCache::new(&lm.model, pass.captures_at(pass.len - 1)?);
            let onto_u = |(stack, _): Stack| -> Result<Vec<f32>> {
                let n = stack.dim(0)?;
                let normed = cache.apply_ln_final(&stack)?.reshape((n, d))?;
                Ok(normed.matmul(&u)?.flatten_all()?.to_vec1::<f32>()?)
            };
            let mut heads = HeadMap::zeros(n_layers, n_heads);
            heads.values = onto_u(cache.stack_head_results(None)?)?;
            // embed, then each block's attention and MLP output.
            let writes = onto_u(cache.decompose_resid(None, false)?)?;
            let x_l = cache.get(HookPoint::ResidPost(n_layers - 1))?;
            let rms = (x_l.sqr()?.mean_all()?.to_scalar::<f32>()? + eps).sqrt();
            let logit_difference = pass
                .last_unembed_in()?
                .unsqueeze(0)?
                .matmul(&u)?
                .flatten_all()?
                .to_vec1::<f32>()?[0];
            out.push(Dla {
                heads,
                embed: writes[0],
                mlp: (0..n_layers).map(|l| writes[2 + 2 * l]).collect(),
                logit_difference,
                rms,
            });
            Ok(())
        },
    )?;
    Ok(out)
}

/// Mean DLA of the harmful prompts minus that of the harmless ones.
pub fn dla_difference(dla_harmful: &[Dla], dla_harmless: &[Dla]) -> Result<HeadMap> {
    let first = dla_harmful
        .first()
        .or(dla_harmless.first())
        .ok_or_else(|| Error::InvalidInput("no prompts".into()))?;
    let mut m = HeadMap::zeros(first.heads.n_layers, first.heads.n_heads);
    for x in dla_harmful {
        m.add_scaled(&x.heads, 1.0 / dla_harmful.len() as f32);
    }
    for x in dla_harmless {
        m.add_scaled(&x.heads, -1.0 / dla_harmless.len() as f32);
    }
    Ok(m)
}
