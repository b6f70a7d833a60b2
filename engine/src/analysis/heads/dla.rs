//! Direct logit attribution: every head's, MLP's and the embedding's write at t_post onto the
//! refusal-vs-compliance logit direction.

use candle_core::{IndexOp, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::hooks::{HookPoint, HookSpec, Intervention};
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
    let (n_layers, n_heads, dh, d) = (cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.d_model);
    let dev = lm.model.device().clone();
    let u = Tensor::from_vec(logit_direction(lm)?, d, &dev)?;
    let gain_u = (lm
        .model
        .dense
        .final_norm
        .to_dtype(candle_core::DType::F32)?
        * &u)?;
    // W_O^T (g ⊙ u) per layer, [H, d_h]: a head's DLA is z · this / rms.
    let read: Vec<Tensor> = lm
        .model
        .dense
        .blocks
        .iter()
        .map(|b| -> Result<Tensor> {
            let w_o = b.o.dense_weight()?; // [d, H·d_h]
            Ok(gain_u.unsqueeze(0)?.matmul(&w_o)?.reshape((n_heads, dh))?)
        })
        .collect::<Result<_>>()?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| lm.chat_prompt(system, p).map(|c| c.ids))
        .collect::<Result<_>>()?;
    let mut points: Vec<HookPoint> = vec![
        HookPoint::Embed,
        HookPoint::ResidPost(n_layers - 1),
        HookPoint::LnFinal,
    ];
    points.extend((0..n_layers).flat_map(|l| [HookPoint::AttnZ(l), HookPoint::MlpOut(l)]));
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
            let t = pass.len - 1;
            let at = |p: HookPoint| -> Result<Tensor> { Ok(pass.capture(p)?.i(t)?) };
            let x_l = at(HookPoint::ResidPost(n_layers - 1))?;
            let rms = (x_l.sqr()?.mean_all()?.to_scalar::<f32>()? + eps).sqrt();
            let dot = |x: &Tensor| -> Result<f32> {
                Ok((x * &gain_u)?.sum_all()?.to_scalar::<f32>()? / rms)
            };
            let mut heads = HeadMap::zeros(n_layers, n_heads);
            let mut mlp = Vec::with_capacity(n_layers);
            for (l, r) in read.iter().enumerate() {
                let z = at(HookPoint::AttnZ(l))?; // [H, d_h]
                let per_head = (z * r)?.sum(D::Minus1)?.to_vec1::<f32>()?;
                for (h, v) in per_head.into_iter().enumerate() {
                    heads.set(l, h, v / rms);
                }
                mlp.push(dot(&at(HookPoint::MlpOut(l))?)?);
            }
            let logit_difference = (pass.last_normalized()? * &u)?
                .sum_all()?
                .to_scalar::<f32>()?;
            out.push(Dla {
                heads,
                embed: dot(&at(HookPoint::Embed)?)?,
                mlp,
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
