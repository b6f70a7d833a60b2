//! The transformer: weights in two precisions and one forward pass with hook points.
//!
//! `dense` holds every weight as f32 (exact analysis, gradients). `fast` holds the same model
//! with its large matrices as Q8_0 (see [`FastPrecision`]): candle's Q8_0 CPU kernel is SIMD
//! while its Q4_1 one is scalar, so re-encoding a Q4_1 GGUF as Q8_0 at load makes generation
//! ~2.5× faster. Activations stay f32 in both, so every hook works on both.

use candle_core::{DType, Device, Tensor, D};

use super::config::{Activation, ModelConfig, RopeStyle};
use super::linear::Linear;
use super::weights::{BlockWeights, Embedding, FastPrecision, KvCache, Weights};
use crate::hooks::{Captures, HookPoint, HookSpec};
use crate::{Error, Result};

/// Which positions get logits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitsAt {
    All,
    Last,
    /// One position per batch row (right-padded batches: each row's last real token).
    /// Logits come out as `[b, 1, vocab]`.
    PerRow(Vec<usize>),
    /// Skip the unembedding (analyses that only read the residual stream).
    None,
}

/// How the forward pass computes.
#[derive(Clone, Copy, Default)]
pub struct ForwardOptions<'a> {
    /// Use ops that candle can differentiate (generic softmax, RoPE and RMSNorm from basic ops)
    /// instead of the fused fast ones. Same values up to float rounding.
    pub differentiable: bool,
    /// Asked before each block: a pass over a large batch takes up to a second on a CPU,
    /// and a cancelled job should stop within a block (`Error::Cancelled`), not a pass.
    pub cancelled: Option<&'a dyn Fn() -> bool>,
}

impl<'a> ForwardOptions<'a> {
    /// The gradient-friendly ops (see [`ForwardOptions::differentiable`]).
    pub fn differentiable() -> Self {
        ForwardOptions {
            differentiable: true,
            cancelled: None,
        }
    }

    /// These options, stopping between blocks once `cancelled` says so.
    pub fn cancellable(self, cancelled: &'a dyn Fn() -> bool) -> Self {
        ForwardOptions {
            cancelled: Some(cancelled),
            ..self
        }
    }
}

impl std::fmt::Debug for ForwardOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardOptions")
            .field("differentiable", &self.differentiable)
            .field("cancellable", &self.cancelled.is_some())
            .finish()
    }
}

pub struct ForwardOutput {
    /// `[b, s, vocab]` (or `[b, 1, vocab]` for [`LogitsAt::Last`]).
    pub logits: Option<Tensor>,
    pub captures: Captures,
}

/// A loaded transformer: its shape, dense weights and (optionally) a fast quantised copy.
/// Cloning shares the weight tensors.
#[derive(Clone)]
pub struct Model {
    pub config: ModelConfig,
    pub dense: Weights,
    pub fast: Option<Weights>,
    /// Rotary inverse frequencies `[1, d_h / 2]` of the global layers …
    rope: Tensor,
    /// … and of the windowed layers where their base differs (Gemma 3).
    local_rope: Option<Tensor>,
    device: Device,
}

impl Model {
    pub fn new(config: ModelConfig, dense: Weights, fast: Option<Weights>) -> Result<Self> {
        config.validate()?;
        let device = dense.embed.device();
        let rope = rope_frequencies(&config, config.rope_theta, true, &device)?;
        let local_rope = config
            .local_rope_theta
            .map(|theta| rope_frequencies(&config, theta, false, &device))
            .transpose()?;
        Ok(Model {
            config,
            dense,
            fast,
            rope,
            local_rope,
            device,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Re-derives the fast path from the dense weights after they changed (a new vocabulary
    /// row, a merged adapter); a model without a fast path keeps none.
    pub fn rebuild_fast(&mut self) -> Result<()> {
        if self.fast.is_some() {
            self.fast = Weights::fast_from(&self.dense, &|_| None, FastPrecision::Q8_0, true)?;
        }
        Ok(())
    }

    /// Appends vocabulary rows `[n, d]`: `input` to the embedding, `output` to the unembedding.
    /// A tied model stays tied when both are the same tensor; otherwise its unembedding
    /// becomes a separate matrix (a copy of the embedding plus the output rows).
    pub fn append_vocabulary(&mut self, input: &Tensor, output: &Tensor) -> Result<()> {
        let input = input.to_dtype(DType::F32)?;
        let output = output.to_dtype(DType::F32)?;
        let (n, d) = input.dims2()?;
        if d != self.config.d_model || output.dims2()? != (n, d) {
            return Err(Error::InvalidInput(format!(
                "new vocabulary rows have shapes {:?} and {:?}, the model's width is {}",
                input.dims(),
                output.dims(),
                self.config.d_model
            )));
        }
        let same = (&input - &output)?.abs()?.sum_all()?.to_scalar::<f32>()? == 0.0;
        let w = &mut self.dense;
        let old_unembed = w.lm_head.dense_weight()?;
        let embed = Tensor::cat(&[&w.embed.dense()?, &input], 0)?;
        w.lm_head = if self.config.tied_embeddings && same {
            Linear::dense_shared(&embed)?
        } else {
            self.config.tied_embeddings = false;
            Linear::dense(&Tensor::cat(&[&old_unembed, &output], 0)?, None)?
        };
        w.embed = Embedding::Dense(embed);
        self.config.vocab_size += n;
        self.rebuild_fast()
    }

    /// This model on `device`: every weight copied there (see [`crate::device`]).
    pub fn to_device(&self, device: &Device) -> Result<Model> {
        Model::new(
            self.config.clone(),
            self.dense.to_device(device)?,
            self.fast
                .as_ref()
                .map(|w| w.to_device(device))
                .transpose()?,
        )
    }

    /// The weights generation uses: the fast path when there is one.
    pub fn generation_weights(&self) -> &Weights {
        self.fast.as_ref().unwrap_or(&self.dense)
    }

    /// One forward pass over `tokens` (`[b, s]`, u32) continuing from `cache` if given.
    pub fn forward(
        &self,
        weights: &Weights,
        tokens: &Tensor,
        cache: Option<&mut KvCache>,
        hooks: &HookSpec,
        logits_at: LogitsAt,
        options: ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        let cfg = &self.config;
        let (b, s) = tokens.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        if offset + s > cfg.context_length {
            return Err(Error::ContextOverflow {
                len: offset + s,
                max: cfg.context_length,
            });
        }
        // The rotary angles of this pass's positions only: a table for the whole context
        // would be sized by a number the model file states (gigabytes for a 10 M context).
        let rows = |inv_freq: &Tensor| -> Result<(Tensor, Tensor)> {
            let positions = Tensor::arange(offset as u32, (offset + s) as u32, &self.device)?
                .to_dtype(DType::F32)?
                .reshape((s, 1))?;
            let angles = positions.broadcast_mul(inv_freq)?;
            Ok((angles.cos()?, angles.sin()?))
        };
        let global = Attend {
            mask: causal_mask(s, offset, None, &self.device)?,
            rope: rows(&self.rope)?,
        };
        // Layers under the window get their own mask (and Gemma 3 its own rotary base).
        let local = match cfg.sliding_window {
            Some(w) => Some(Attend {
                mask: causal_mask(s, offset, Some(w), &self.device)?,
                rope: rows(self.local_rope.as_ref().unwrap_or(&self.rope))?,
            }),
            None => None,
        };
        let mut pass = Pass {
            hooks,
            offset,
            options,
            global,
            local,
            captures: Captures::default(),
        };
        let mut cache = cache;
        let embedded =
            weights
                .embed
                .lookup(&tokens.flatten_all()?)?
                .reshape((b, s, cfg.d_model))?;
        // Gemma scales embeddings by √d (the unembedding, tied or not, is unscaled).
        let embedded = if cfg.scale_embeddings {
            (embedded * (cfg.d_model as f64).sqrt())?
        } else {
            embedded
        };
        let mut x = pass.residual(HookPoint::Embed, embedded)?;
        for (l, block) in weights.blocks.iter().enumerate() {
            if options.cancelled.is_some_and(|cancelled| cancelled()) {
                return Err(Error::Cancelled);
            }
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            x = self.block(&mut pass, l, block, x, layer_cache)?;
        }
        let logits = match logits_at {
            LogitsAt::None
                if !hooks.touches(HookPoint::LnFinal) && !hooks.touches(HookPoint::UnembedIn) =>
            {
                None
            }
            _ => {
                let x = match &logits_at {
                    LogitsAt::Last => x.narrow(1, s - 1, 1)?,
                    LogitsAt::PerRow(rows) => last_per_row(&x, rows)?,
                    _ => x,
                };
                let normed = self.norm(&mut pass, &x, &weights.final_norm, HookPoint::LnFinal)?;
                let normed = pass.residual(HookPoint::UnembedIn, normed)?;
                match logits_at {
                    LogitsAt::None => None,
                    _ => {
                        let logits = weights.lm_head.forward(&normed)?;
                        Some(hooks.logits(softcap(logits, cfg.final_softcap)?)?)
                    }
                }
            }
        };
        Ok(ForwardOutput {
            logits,
            captures: pass.captures,
        })
    }

    /// Block `l`: attention, then the MLP, each reading its norm of the stream and adding
    /// its output back.
    fn block(
        &self,
        pass: &mut Pass,
        l: usize,
        block: &BlockWeights,
        x: Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let cfg = &self.config;
        let x = pass.residual(HookPoint::ResidPre(l), x)?;
        let attn_in = self.norm(pass, &x, &block.attn_norm, HookPoint::Ln1Normalized(l))?;
        let z = self.attention(pass, l, block, &attn_in, cache)?;
        let attn_out = block
            .o
            .forward(&z.reshape((b, s, cfg.n_heads * cfg.head_dim))?)?;
        let attn_out = match &block.attn_post_norm {
            Some(w) => self.norm(pass, &attn_out, w, HookPoint::Ln1PostNormalized(l))?,
            None => attn_out,
        };
        let attn_out = pass.residual(HookPoint::AttnOut(l), attn_out)?;
        let x = pass.residual(HookPoint::ResidMid(l), (x + attn_out)?)?;

        let mlp_in = self.norm(pass, &x, &block.mlp_norm, HookPoint::Ln2Normalized(l))?;
        let [gate, up]: [Tensor; 2] =
            Linear::forward_shared_input(&[&block.gate, &block.up], &mlp_in)?
                .try_into()
                .expect("two projections in, two out");
        let gate = match cfg.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            Activation::GeluTanh => gate.gelu()?,
        };
        let post = (gate * up)?;
        pass.hooks
            .capture_if_wanted(HookPoint::MlpPost(l), &post, &mut pass.captures);
        let mlp_out = block.down.forward(&post)?;
        let mlp_out = match &block.mlp_post_norm {
            Some(w) => self.norm(pass, &mlp_out, w, HookPoint::Ln2PostNormalized(l))?,
            None => mlp_out,
        };
        let mlp_out = pass.residual(HookPoint::MlpOut(l), mlp_out)?;
        pass.residual(HookPoint::ResidPost(l), (x + mlp_out)?)
    }

    fn attention(
        &self,
        pass: &mut Pass,
        layer: usize,
        block: &BlockWeights,
        x: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, s, _) = x.dims3()?;
        let (h, h_kv, dh) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, s, n, dh))?.transpose(1, 2)?.contiguous()?)
        };
        let [q, k, v]: [Tensor; 3] =
            Linear::forward_shared_input(&[&block.q, &block.k, &block.v], x)?
                .try_into()
                .expect("three projections in, three out");
        for (point, t, n) in [
            (HookPoint::AttnQ(layer), &q, h),
            (HookPoint::AttnK(layer), &k, h_kv),
            (HookPoint::AttnV(layer), &v, h_kv),
        ] {
            if pass.hooks.wants(point) {
                pass.captures.push(point, t.reshape((b, s, n, dh))?);
            }
        }
        let attend = match (&pass.local, cfg.is_local(layer)) {
            (Some(local), true) => local,
            _ => &pass.global,
        };
        let (cos, sin) = &attend.rope;
        // Qwen3, Gemma 3: an RMSNorm over each head's query and key, before RoPE.
        let head_norm = |t: Tensor, n: usize, w: &Option<Tensor>| -> Result<Tensor> {
            match w {
                Some(w) => self.rms_norm(&t.reshape((b, s, n, dh))?, w, pass.options),
                None => Ok(t),
            }
        };
        let q = head_norm(q, h, &block.q_norm)?;
        let k = head_norm(k, h_kv, &block.k_norm)?;
        let q = self.rope(&heads(q, h)?, cos, sin, pass.options)?;
        let k = self.rope(&heads(k, h_kv)?, cos, sin, pass.options)?;
        let v = heads(v, h_kv)?;
        let (k, v) = match cache {
            Some(slot) => {
                let kv = match slot.take() {
                    Some((k0, v0)) => (Tensor::cat(&[&k0, &k], 2)?, Tensor::cat(&[&v0, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some(kv.clone());
                kv
            }
            None => (k, v),
        };
        // Grouped-query attention without copying K/V per query head: the n_rep query heads
        // of a group are consecutive, so [b, h, s, d_h] regroups as [b, h_kv, n_rep·s, d_h].
        let n_rep = h / h_kv;
        let t = k.dim(2)?;
        let q = q.reshape((b, h_kv, n_rep * s, dh))?;
        let scores = (q.matmul(&k.t()?)? / cfg.score_divisor())?;
        let scores = softcap(scores, cfg.attn_softcap)?;
        let scores = match &attend.mask {
            Some(m) => scores
                .reshape((b, h_kv, n_rep, s, t))?
                .broadcast_add(m)?
                .reshape((b, h_kv, n_rep * s, t))?,
            None => scores,
        };
        if pass.hooks.wants(HookPoint::AttnScores(layer)) {
            pass.captures
                .push(HookPoint::AttnScores(layer), scores.reshape((b, h, s, t))?);
        }
        let pattern = if pass.options.differentiable {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        if pass.hooks.wants(HookPoint::AttnPattern(layer)) {
            pass.captures.push(
                HookPoint::AttnPattern(layer),
                pattern.reshape((b, h, s, t))?,
            );
        }
        // [b, h, s, d_h] → TransformerLens' hook_z layout [b, s, h, d_h].
        let z = pattern
            .matmul(&v)?
            .reshape((b, h, s, dh))?
            .transpose(1, 2)?
            .contiguous()?;
        pass.hooks.attn_z(layer, z, pass.offset, &mut pass.captures)
    }

    /// RMSNorm with its hook point. When the spec touches `point`, the normalised value
    /// before the weight (TransformerLens' `hook_normalized`) passes through it; otherwise
    /// the fused kernel runs.
    fn norm(
        &self,
        pass: &mut Pass,
        x: &Tensor,
        weight: &Tensor,
        point: HookPoint,
    ) -> Result<Tensor> {
        if !pass.hooks.touches(point) {
            return self.rms_norm(x, weight, pass.options);
        }
        let unit = Tensor::ones(weight.dims(), weight.dtype(), weight.device())?;
        let normalized = self.rms_norm(x, &unit, pass.options)?;
        let normalized = pass.residual(point, normalized)?;
        Ok(normalized.broadcast_mul(weight)?)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, options: ForwardOptions) -> Result<Tensor> {
        let eps = self.config.rms_eps as f32;
        Ok(if options.differentiable {
            candle_nn::ops::rms_norm_slow(x, weight, eps)?
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps)?
        })
    }

    fn rope(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        options: ForwardOptions,
    ) -> Result<Tensor> {
        use candle_nn::rotary_emb as re;
        Ok(match (self.config.rope_style, options.differentiable) {
            (RopeStyle::Interleaved, false) => re::rope_i(x, cos, sin)?,
            (RopeStyle::Interleaved, true) => re::rope_i_slow(x, cos, sin)?,
            (RopeStyle::HalfSplit, false) => re::rope(x, cos, sin)?,
            (RopeStyle::HalfSplit, true) => re::rope_slow(x, cos, sin)?,
        })
    }
}

/// `cap · tanh(x / cap)` (Gemma 2's soft-capping), or `x` unchanged without a cap. Code that
/// forms logits itself from `unembed.hook_in` applies the model's `final_softcap` with it.
pub fn softcap(x: Tensor, cap: Option<f64>) -> Result<Tensor> {
    Ok(match cap {
        Some(cap) => ((x / cap)?.tanh()? * cap)?,
        None => x,
    })
}

/// Rotary inverse frequencies (`[1, head_dim / 2]`) for base `theta`, with the config's
/// frequency scaling if `scaled`.
fn rope_frequencies(
    cfg: &ModelConfig,
    theta: f64,
    scaled: bool,
    device: &Device,
) -> Result<Tensor> {
    let half = cfg.head_dim / 2;
    let scaling = cfg.rope_scaling.as_ref().filter(|_| scaled);
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            let f = 1.0 / theta.powf(2.0 * i as f64 / cfg.head_dim as f64) as f32;
            scaling.map_or(f, |s| s.apply(i, f as f64) as f32)
        })
        .collect();
    Ok(Tensor::from_vec(inv_freq, (1, half), device)?)
}

/// What one forward pass carries from layer to layer besides the stream: the hook spec, the
/// positions it covers, its masks and rotary tables, and what it has captured so far.
struct Pass<'a> {
    hooks: &'a HookSpec,
    /// Absolute position of the first token (the KV cache's length).
    offset: usize,
    options: ForwardOptions<'a>,
    global: Attend,
    /// The windowed layers' mask and rotary tables, when the model has a window.
    local: Option<Attend>,
    captures: Captures,
}

/// How the layers of one kind attend in this pass: their mask and rotary rows.
struct Attend {
    mask: Option<Tensor>,
    rope: (Tensor, Tensor),
}

impl Pass<'_> {
    /// The spec's interventions at a residual-shaped `point`, then its capture.
    fn residual(&mut self, point: HookPoint, x: Tensor) -> Result<Tensor> {
        self.hooks
            .residual(point, x, self.offset, &mut self.captures)
    }
}

/// Each batch row's one position `rows[i]` of `x` (`[b, s, d]` → `[b, 1, d]`): the last real
/// token of right-padded rows.
fn last_per_row(x: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let (b, s, _) = x.dims3()?;
    if rows.len() != b || rows.iter().any(|&p| p >= s) {
        return Err(Error::InvalidInput(format!(
            "logit positions {rows:?} do not fit a batch of {b} × {s}"
        )));
    }
    let picked = rows
        .iter()
        .enumerate()
        .map(|(i, &p)| x.narrow(0, i, 1)?.narrow(1, p, 1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&picked, 0)?)
}

/// Additive causal mask `[s, offset+s]`, `None` for a single query (it sees everything).
fn causal_mask(
    s: usize,
    offset: usize,
    sliding_window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let t = offset + s;
    // A single query sees every cached key, unless a sliding window hides the oldest.
    if s == 1 && sliding_window.is_none_or(|w| t <= w) {
        return Ok(None);
    }
    // Query `offset + i` sees keys `j` with `j ≤ offset + i`, and with a window `w` only the
    // last `w` of them (`offset + i − j < w`).
    let hidden =
        |i: usize, j: usize| j > offset + i || sliding_window.is_some_and(|w| offset + i - j >= w);
    let mask: Vec<f32> = (0..s)
        .flat_map(|i| (0..t).map(move |j| if hidden(i, j) { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Some(Tensor::from_vec(mask, (s, t), device)?))
}
