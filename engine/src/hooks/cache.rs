//! [`ActivationCache`]: one forward pass's activations by hook point, read back the way
//! TransformerLens' `ActivationCache` reads them: the residual stream decomposed into the
//! writes that make it, accumulated layer by layer, and every head's own write.

use candle_core::{DType, Tensor, D};

use super::{Captures, HookPoint, HookSpec, Intervention};
use crate::model::{ForwardOptions, LogitsAt, Model};
use crate::{Error, LoadedModel, Result};

/// Activations of one forward pass and the model that made them (its weights are shared, not
/// copied). Every tensor is `[b, s, …]` as captured.
pub struct ActivationCache {
    captures: Captures,
    model: Model,
}

/// Stacked components `[n, b, s, d]` and their names, in order.
pub type Stack = (Tensor, Vec<String>);

impl ActivationCache {
    /// The points [`ActivationCache::run`] captures: every residual-stream state and write,
    /// every head's `z`.
    pub fn all_points(n_layers: usize) -> Vec<HookPoint> {
        let mut points = vec![HookPoint::Embed];
        for l in 0..n_layers {
            points.extend([
                HookPoint::ResidPre(l),
                HookPoint::AttnZ(l),
                HookPoint::AttnOut(l),
                HookPoint::ResidMid(l),
                HookPoint::MlpOut(l),
                HookPoint::ResidPost(l),
            ]);
        }
        points
    }

    /// Runs one token sequence through the exact (f32) weights with `interventions`, caching
    /// [`ActivationCache::all_points`] (TransformerLens' `run_with_cache`).
    pub fn run(lm: &LoadedModel, ids: &[u32], interventions: &[Intervention]) -> Result<Self> {
        let m = &lm.model;
        let mut hooks = HookSpec::capture(Self::all_points(m.config.n_layers));
        hooks.interventions = interventions.to_vec();
        let tokens = Tensor::new(ids, m.device())?.unsqueeze(0)?;
        let out = m.forward(
            &m.dense,
            &tokens,
            None,
            &hooks,
            LogitsAt::None,
            ForwardOptions::default(),
        )?;
        Ok(Self::new(m, out.captures))
    }

    pub fn new(model: &Model, captures: Captures) -> Self {
        ActivationCache {
            captures,
            model: model.clone(),
        }
    }

    /// The activation at `point`; an error names it when it was not captured.
    pub fn get(&self, point: HookPoint) -> Result<Tensor> {
        self.captures
            .get(point)?
            .ok_or_else(|| Error::InvalidInput(format!("{point} was not captured")))
    }

    fn n_layers(&self) -> usize {
        self.model.config.n_layers
    }

    /// Layers `0..layer` (every layer for None), checked against the model.
    fn up_to(&self, layer: Option<usize>) -> Result<usize> {
        let n = self.n_layers();
        match layer {
            Some(l) if l > n => Err(Error::InvalidInput(format!(
                "layer {l} is past the model's {n} layers"
            ))),
            Some(l) => Ok(l),
            None => Ok(n),
        }
    }

    /// The residual stream entering each block before `layer` (`"{l}_pre"`, and with
    /// `incl_mid` also `"{l}_mid"` between its attention and MLP), then, for `None` (every
    /// layer), the stream leaving the last block (`"final_post"`).
    pub fn accumulated_resid(&self, layer: Option<usize>, incl_mid: bool) -> Result<Stack> {
        let mut parts = Vec::new();
        let mut labels = Vec::new();
        for l in 0..self.up_to(layer)? {
            parts.push(self.get(HookPoint::ResidPre(l))?);
            labels.push(format!("{l}_pre"));
            if incl_mid {
                parts.push(self.get(HookPoint::ResidMid(l))?);
                labels.push(format!("{l}_mid"));
            }
        }
        if layer.is_none() {
            parts.push(self.get(HookPoint::ResidPost(self.n_layers() - 1))?);
            labels.push("final_post".into());
        }
        stack(parts, labels)
    }

    /// The writes whose sum is the residual stream entering block `layer` (after the last
    /// block for None): the embedding (`"embed"`), then each earlier block's attention and
    /// MLP output (`"{l}_attn_out"`, `"{l}_mlp_out"`); with `mlp_input`, also block `layer`'s
    /// attention output (the stream entering its MLP).
    pub fn decompose_resid(&self, layer: Option<usize>, mlp_input: bool) -> Result<Stack> {
        let up_to = self.up_to(layer)?;
        let mut parts = vec![self.get(HookPoint::Embed)?];
        let mut labels = vec!["embed".to_string()];
        for l in 0..up_to {
            parts.push(self.get(HookPoint::AttnOut(l))?);
            labels.push(format!("{l}_attn_out"));
            parts.push(self.get(HookPoint::MlpOut(l))?);
            labels.push(format!("{l}_mlp_out"));
        }
        if mlp_input && up_to < self.n_layers() {
            parts.push(self.get(HookPoint::AttnOut(up_to))?);
            labels.push(format!("{up_to}_attn_out"));
        }
        stack(parts, labels)
    }

    /// Every head's own write into the residual stream, `z_{l,h} · W_O[l][h]`, for the blocks
    /// before `layer` (every block for None), labelled `"L{l}H{h}"`. The heads of a block sum
    /// to its attention output (which also holds `o_proj`'s bias, if any); with Gemma's
    /// post-attention norm, each write passes through that norm linearised at this run.
    pub fn stack_head_results(&self, layer: Option<usize>) -> Result<Stack> {
        let cfg = &self.model.config;
        let (h, dh) = (cfg.n_heads, cfg.head_dim);
        let mut parts = Vec::new();
        let mut labels = Vec::new();
        for l in 0..self.up_to(layer)? {
            let z = self.get(HookPoint::AttnZ(l))?; // [b, s, h, d_h]
            let (b, s, _, _) = z.dims4()?;
            let d = self.model.config.d_model;
            // All heads of the block in one batched matmul: [h, b·s, d_h] × [h, d_h, d].
            let z = z.reshape((b * s, h, dh))?.transpose(0, 1)?.contiguous()?;
            // W_Oᵀ as stored, [h·d_h, d]: head h's rows are its d_h × d slice.
            let w = self.model.dense.blocks[l]
                .o
                .dense_weight_t()?
                .reshape((h, dh, d))?;
            let per_head = z.matmul(&w)?.reshape((h, b, s, d))?;
            let per_head = match &self.model.dense.blocks[l].attn_post_norm {
                Some(weight) => self.through_post_norm(l, &per_head, weight)?,
                None => per_head,
            };
            for head in 0..h {
                parts.push(per_head.get(head)?);
                labels.push(format!("L{l}H{head}"));
            }
        }
        stack(parts, labels)
    }

    /// Heads' writes `[h, b, s, d]` through block `l`'s post-attention norm (Gemma) as the
    /// norm treated their sum in this run: divided by the RMS of the attention output before
    /// the norm (the heads' sum plus `o_proj`'s bias) and multiplied by the weight, so the
    /// heads still add up to `hook_attn_out`.
    fn through_post_norm(&self, l: usize, per_head: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let mut total = per_head.sum(0)?;
        if let Some(bias) = self.model.dense.blocks[l].o.bias() {
            total = total.broadcast_add(bias)?;
        }
        let eps = self.model.config.rms_eps;
        let rms = ((total.sqr()?.mean_keepdim(D::Minus1)? + eps)?).sqrt()?; // [b, s, 1]
        Ok(per_head.broadcast_div(&rms)?.broadcast_mul(weight)?)
    }

    /// The final norm applied to each component of a stack `[n, b, s, d]` as the norm treated
    /// the whole residual stream of this run: divided by the stream's RMS at each position
    /// (from `blocks.{L−1}.hook_resid_post`) and multiplied by the norm's weight. The
    /// components then add up to `unembed.hook_in`, and their dot products with an
    /// unembedding direction to that direction's logit (direct logit attribution).
    /// TransformerLens' `apply_ln_to_stack` does the same with the weight folded away.
    pub fn apply_ln_final(&self, stack: &Tensor) -> Result<Tensor> {
        let x = self.get(HookPoint::ResidPost(self.n_layers() - 1))?;
        let eps = self.model.config.rms_eps;
        let rms = ((x.sqr()?.mean_keepdim(D::Minus1)? + eps)?).sqrt()?; // [b, s, 1]
        let weight = self.model.dense.final_norm.to_dtype(DType::F32)?;
        Ok(stack.broadcast_div(&rms)?.broadcast_mul(&weight)?)
    }
}

fn stack(parts: Vec<Tensor>, labels: Vec<String>) -> Result<Stack> {
    if parts.is_empty() {
        return Err(Error::InvalidInput("nothing to stack".into()));
    }
    Ok((Tensor::stack(&parts, 0)?, labels))
}
