//! The transformer: weights in two precisions and one forward pass with hook points.
//!
//! `dense` holds every weight as f32 (exact analysis, gradients). `fast` holds the same model
//! with its large matrices as Q8_0 (see [`FastPrecision`]): candle's Q8_0 CPU kernel is SIMD
//! while its Q4_1 one is scalar, so re-encoding a Q4_1 GGUF as Q8_0 at load makes generation
//! ~2.5× faster. Activations stay f32 in both, so every hook works on both.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

use crate::config::{ModelConfig, RopeStyle};
use crate::hooks::{Captures, HookPoint, HookSpec};
use crate::{Error, Result};

/// A weight matrix `W` (`[out, in]`, `y = x·Wᵀ + b`) with an optional bias, dense f32 or
/// quantised.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Stored transposed, `[in, out]`: laid out this way the matmul reads it without
    /// repacking, ~30% faster than multiplying by a transposed view of `[out, in]`.
    Dense {
        weight_t: Tensor,
        bias: Option<Tensor>,
    },
    /// `padded_in ≥ in`: the stored rows are zero-padded so that candle's repacked VNNI kernels
    /// apply (they need the input size to be a multiple of 256); inputs are padded to match.
    Quantized {
        weight: Arc<QMatMul>,
        bias: Option<Tensor>,
        in_features: usize,
        padded_in: usize,
    },
    /// A dense weight that backpropagation treats as a constant: gradients flow to the input
    /// only. candle's matmul backward also computes the weight's gradient (as costly as the
    /// forward) even when nothing needs it; training wraps every base weight in this.
    Frozen {
        weight_t: Tensor,
        bias: Option<Tensor>,
    },
    /// A low-rank adapter on a frozen base: `y = base(x) + scale · (x·Aᵀ)·Bᵀ`, `A` `[r, in]`,
    /// `B` `[out, r]` (training; merged into the base for inference).
    LoRA {
        base: Box<Linear>,
        a: Tensor,
        b: Tensor,
        scale: f64,
    },
}

impl Linear {
    /// From a weight in the checkpoint layout `[out, in]`.
    pub fn dense(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Linear::Dense {
            weight_t: weight.t()?.contiguous()?,
            bias,
        })
    }

    /// Shares `weight` (`[out, in]`) without copying: a tied unembedding reads the embedding.
    pub fn dense_shared(weight: &Tensor) -> Result<Self> {
        Ok(Linear::Dense {
            weight_t: weight.t()?,
            bias: None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (y, bias) = match self {
            Linear::LoRA { base, a, b, scale } => {
                let delta = x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
                return Ok((base.forward(x)? + (delta * *scale)?)?);
            }
            Linear::Frozen { weight_t, bias } => (
                x.contiguous()?.apply_op1(FrozenMatmul {
                    weight_t: weight_t.clone(),
                })?,
                bias,
            ),
            Linear::Dense { weight_t, bias } => {
                let y = match x.dims() {
                    [b, s, i] => x
                        .reshape((b * s, *i))?
                        .matmul(weight_t)?
                        .reshape((*b, *s, ()))?,
                    _ => x.matmul(weight_t)?,
                };
                (y, bias)
            }
            Linear::Quantized {
                weight,
                bias,
                in_features,
                padded_in,
            } => {
                let x = if padded_in > in_features {
                    x.pad_with_zeros(D::Minus1, 0, padded_in - in_features)?
                } else {
                    x.clone()
                };
                (weight.forward(&x)?, bias)
            }
        };
        Ok(match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// `[l.forward(x) for l in linears]`, as one fused quantised GEMV (one activation
    /// quantisation, one parallel region) when candle supports it for these weights.
    pub fn forward_shared_input(linears: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        if let Some(outs) = Self::try_fused(linears, x)? {
            return Ok(outs);
        }
        linears.iter().map(|l| l.forward(x)).collect()
    }

    fn try_fused(linears: &[&Linear], x: &Tensor) -> Result<Option<Vec<Tensor>>> {
        let mut qtensors = Vec::with_capacity(linears.len());
        let mut pad = None;
        for l in linears {
            let Linear::Quantized {
                weight,
                in_features,
                padded_in,
                ..
            } = l
            else {
                return Ok(None);
            };
            let QMatMul::QTensor(q) = weight.as_ref() else {
                return Ok(None);
            };
            if pad.is_some_and(|p| p != (*in_features, *padded_in)) {
                return Ok(None);
            }
            pad = Some((*in_features, *padded_in));
            qtensors.push(q.as_ref());
        }
        let Some((in_features, padded_in)) = pad else {
            return Ok(None);
        };
        let x = x
            .pad_with_zeros(D::Minus1, 0, padded_in - in_features)?
            .contiguous()?;
        let Some(outs) = QTensor::gemv_fused_shared_lhs(&qtensors, &x)? else {
            return Ok(None);
        };
        let outs = outs
            .into_iter()
            .zip(linears)
            .map(|(y, l)| {
                Ok(match l.bias() {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(outs))
    }

    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Linear::Dense { bias, .. }
            | Linear::Quantized { bias, .. }
            | Linear::Frozen { bias, .. } => bias.as_ref(),
            Linear::LoRA { base, .. } => base.bias(),
        }
    }

    /// `(out, in)` without touching the data.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Linear::Dense { weight_t, .. } | Linear::Frozen { weight_t, .. } => {
                let (i, o) = weight_t.dims2()?;
                Ok((o, i))
            }
            Linear::Quantized {
                weight,
                in_features,
                ..
            } => {
                let (out, _) = match weight.as_ref() {
                    QMatMul::QTensor(q) => q.shape().dims2()?,
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims2()?,
                };
                Ok((out, *in_features))
            }
            Linear::LoRA { base, .. } => base.dims(),
        }
    }

    /// The same weight as a [`Linear::Frozen`]: its backward pass forms only the input
    /// gradient (for gradients with respect to activations, not weights).
    pub fn frozen(&self) -> Result<Linear> {
        Ok(match self {
            Linear::Dense { weight_t, bias } | Linear::Frozen { weight_t, bias } => {
                Linear::Frozen {
                    weight_t: weight_t.clone(),
                    bias: bias.clone(),
                }
            }
            other => Linear::Frozen {
                weight_t: other.dense_weight()?.t()?,
                bias: other.bias().cloned(),
            },
        })
    }

    /// Rows `ids` of the weight (`[n, in]`, f32), without densifying the whole matrix when it
    /// is stored dense (the unembedding has 49k rows; analyses need a handful).
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let idx = Tensor::new(ids, &Device::Cpu)?;
        Ok(match self {
            Linear::Dense { weight_t, .. } | Linear::Frozen { weight_t, .. } => {
                let idx = idx.to_device(weight_t.device())?;
                let w = weight_t.t()?; // [out, in]; contiguous for a tied embedding
                if w.is_contiguous() {
                    w.index_select(&idx, 0)?
                } else {
                    weight_t
                        .contiguous()?
                        .index_select(&idx, 1)?
                        .t()?
                        .contiguous()?
                }
            }
            other => {
                let w = other.dense_weight()?;
                w.index_select(&idx.to_device(w.device())?, 0)?
            }
        })
    }

    /// The weight as a contiguous dense f32 `[out, in]` tensor (a copy).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match self {
            Linear::Dense { weight_t, .. } | Linear::Frozen { weight_t, .. } => {
                Ok(weight_t.t()?.contiguous()?)
            }
            Linear::Quantized {
                weight,
                in_features,
                ..
            } => {
                let w = match weight.as_ref() {
                    QMatMul::QTensor(q) => q.dequantize(&Device::Cpu)?,
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
                };
                Ok(w.narrow(1, 0, *in_features)?.contiguous()?)
            }
            Linear::LoRA { base, a, b, scale } => {
                Ok((base.dense_weight()? + (b.matmul(a)? * *scale)?)?)
            }
        }
    }
}

/// `x · W_t` with a backward pass that returns only the input's gradient `g · W_tᵀ`.
struct FrozenMatmul {
    weight_t: Tensor,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (k, n) = self.weight_t.dims2()?;
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("frozen-matmul: f32 input expected")
        };
        let Some((lo, hi)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-matmul: contiguous input expected")
        };
        let m = layout.shape().elem_count() / k;
        let y = Tensor::from_slice(&data[lo..hi], (m, k), &Device::Cpu)?.matmul(&self.weight_t)?;
        let mut dims = layout.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((
            candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?),
            candle_core::Shape::from(dims),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (k, n) = self.weight_t.dims2()?;
        let mut dims = grad.dims().to_vec();
        let m = grad.elem_count() / n;
        let g = grad.reshape((m, n))?.matmul(&self.weight_t.t()?)?;
        if let Some(last) = dims.last_mut() {
            *last = k;
        }
        Ok(Some(g.reshape(dims)?))
    }
}

/// The weights of one block.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    pub attn_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub mlp_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// A full set of weights in one precision.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Token embeddings `[vocab, d]`, always f32 for exact lookups.
    pub embed: Tensor,
    pub blocks: Vec<BlockWeights>,
    pub final_norm: Tensor,
    /// Unembedding `[vocab, d]` (shares `embed` when the model ties them).
    pub lm_head: Linear,
}

/// Which quantisation the fast generation path uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FastPrecision {
    /// Q8_0 for quantised checkpoints (re-encoding Q4/Q5 blocks, keeping Q8/K-quants), f32 for
    /// float checkpoints so their generation stays exact.
    Auto,
    /// Every projection as Q8_0.
    Q8_0,
    /// No quantised path: generation runs on the dense f32 weights.
    F32,
}

impl Weights {
    /// Builds the fast path from dense weights and, for quantised checkpoints, the original
    /// quantised tensors (by the same role names).
    pub(crate) fn fast_from(
        dense: &Weights,
        originals: &dyn Fn(&str) -> Option<Arc<QTensor>>,
        precision: FastPrecision,
        checkpoint_is_quantized: bool,
    ) -> Result<Option<Weights>> {
        let quantize = match precision {
            FastPrecision::F32 => return Ok(None),
            FastPrecision::Auto => checkpoint_is_quantized,
            FastPrecision::Q8_0 => true,
        };
        if !quantize {
            return Ok(None);
        }
        let requant = |name: &str, lin: &Linear| -> Result<Linear> {
            if matches!(lin, Linear::Quantized { .. }) {
                return Ok(lin.clone());
            }
            let (out, in_features) = lin.dims()?;
            let padded_in = padded_input(out, in_features);
            let keep = originals(name)
                .filter(|q| keeps_fast_kernel(q.dtype()) && padded_in == in_features);
            let q = match keep {
                Some(q) => q,
                None if in_features % GgmlDType::Q8_0.block_size() == 0 => {
                    let w = lin
                        .dense_weight()?
                        .pad_with_zeros(1, 0, padded_in - in_features)?;
                    Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?)
                }
                None => return Ok(lin.clone()),
            };
            let weight = Arc::new(QMatMul::from_arc(q)?);
            Ok(Linear::Quantized {
                weight,
                bias: lin.bias().cloned(),
                in_features,
                padded_in,
            })
        };
        let blocks = dense
            .blocks
            .iter()
            .enumerate()
            .map(|(l, b)| {
                let n = |part: &str| format!("blk.{l}.{part}");
                Ok(BlockWeights {
                    attn_norm: b.attn_norm.clone(),
                    q: requant(&n("attn_q"), &b.q)?,
                    k: requant(&n("attn_k"), &b.k)?,
                    v: requant(&n("attn_v"), &b.v)?,
                    o: requant(&n("attn_output"), &b.o)?,
                    mlp_norm: b.mlp_norm.clone(),
                    gate: requant(&n("ffn_gate"), &b.gate)?,
                    up: requant(&n("ffn_up"), &b.up)?,
                    down: requant(&n("ffn_down"), &b.down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Weights {
            embed: dense.embed.clone(),
            blocks,
            final_norm: dense.final_norm.clone(),
            lm_head: requant("output", &dense.lm_head)?,
        }))
    }
}

/// The input size to store a Q8_0 `[out, in]` weight with. candle 0.11's x86 VNNI kernels
/// (repacked 16-row tiles) need `in` to be a multiple of 256 and `out` of 16; elsewhere it
/// falls back to a kernel ~4× slower (SmolLM2's width 576: 44 µs vs 10 µs for a 1536-row
/// matrix). Zero-padding the input to the next multiple of 256 costs a third more bytes and
/// wins that back several times over where the VNNI kernels run.
fn padded_input(out: usize, in_features: usize) -> usize {
    const REPACK_K: usize = 256;
    const REPACK_N: usize = 16;
    let vnni = matches!(
        KernelTier::detect(),
        KernelTier::Avx512Vnni | KernelTier::AvxVnni
    );
    if vnni && out.is_multiple_of(REPACK_N) && !in_features.is_multiple_of(REPACK_K) {
        in_features.div_ceil(REPACK_K) * REPACK_K
    } else {
        in_features
    }
}

/// The set of quantised CPU kernels the fast path runs on this machine (candle picks its x86
/// tier at run time). Only generation after the first reply token uses them: everything the
/// project records runs on the dense f32 path, which computes the same on every x86-64 CPU up
/// to float rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KernelTier {
    Avx512Vnni,
    AvxVnni,
    Avx2,
    /// No x86 SIMD tier (other architectures, or x86 without AVX2 + FMA).
    Generic,
}

impl KernelTier {
    /// Setting this variable to `1` makes candle (and the engine's row padding, which only
    /// pays off with VNNI) use the AVX2 tier on a VNNI CPU: how an AVX-512 machine runs
    /// what an AVX2-only one does. It is read once per process, before the first
    /// quantised matmul.
    pub const FORCE_AVX2_ENV: &'static str = "MISTRALRS_FORCE_AVX2";

    /// The tier candle 0.11 selects (mirrors `candle_core::quantized::repack_x86::level`).
    pub fn detect() -> KernelTier {
        #[cfg(target_arch = "x86_64")]
        {
            let forced_avx2 = std::env::var(Self::FORCE_AVX2_ENV).as_deref() == Ok("1");
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if !forced_avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vnni")
            {
                KernelTier::Avx512Vnni
            } else if !forced_avx2 && is_x86_feature_detected!("avxvnni") && avx2 {
                KernelTier::AvxVnni
            } else if avx2 {
                KernelTier::Avx2
            } else {
                KernelTier::Generic
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        KernelTier::Generic
    }

    pub fn describe(self) -> &'static str {
        match self {
            KernelTier::Avx512Vnni => "AVX-512 VNNI",
            KernelTier::AvxVnni => "AVX-VNNI",
            KernelTier::Avx2 => "AVX2",
            KernelTier::Generic => "generic",
        }
    }
}

/// Quantised types whose candle CPU kernels are SIMD and accurate enough to keep as they are.
fn keeps_fast_kernel(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(dtype, Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K | Q8K)
}

/// Key/value cache of every layer, `[b, h_kv, t, d_h]` each. Cloning is cheap (tensors are
/// shared), so a prompt prefix can be computed once and reused.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![None; n_layers],
        }
    }

    /// The same cache repeated for a batch of `b` rows (a shared prompt prefix for a
    /// right-padded batch of continuations).
    pub fn repeat_batch(&self, b: usize) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|(k, v)| -> Result<(Tensor, Tensor)> {
                        Ok((k.repeat((b, 1, 1, 1))?, v.repeat((b, 1, 1, 1))?))
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { layers })
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Weights {
    /// Every linear layer frozen (see [`Linear::frozen`]); the tensors are shared.
    pub fn frozen(&self) -> Result<Weights> {
        let blocks = self
            .blocks
            .iter()
            .map(|b| -> Result<BlockWeights> {
                let mut b = b.clone();
                for lin in [
                    &mut b.q,
                    &mut b.k,
                    &mut b.v,
                    &mut b.o,
                    &mut b.gate,
                    &mut b.up,
                    &mut b.down,
                ] {
                    *lin = lin.frozen()?;
                }
                Ok(b)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Weights {
            embed: self.embed.clone(),
            blocks,
            final_norm: self.final_norm.clone(),
            lm_head: self.lm_head.frozen()?,
        })
    }
}

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ForwardOptions {
    /// Use ops that candle can differentiate (generic softmax, RoPE and RMSNorm from basic ops)
    /// instead of the fused fast ones. Same values up to float rounding.
    pub differentiable: bool,
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
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

impl Model {
    pub fn new(config: ModelConfig, dense: Weights, fast: Option<Weights>) -> Result<Self> {
        config.validate()?;
        let device = dense.embed.device().clone();
        let (cos, sin) = rope_tables(&config, &device)?;
        Ok(Model {
            config,
            dense,
            fast,
            cos,
            sin,
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
        w.embed = Tensor::cat(&[&w.embed, &input], 0)?;
        w.lm_head = if self.config.tied_embeddings && same {
            Linear::dense_shared(&w.embed)?
        } else {
            self.config.tied_embeddings = false;
            Linear::dense(&Tensor::cat(&[&old_unembed, &output], 0)?, None)?
        };
        self.config.vocab_size += n;
        self.rebuild_fast()
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
        options: ForwardOptions,
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
        let mut captures = Captures::default();
        let mask = causal_mask(s, offset, &self.device)?;
        let cos = self.cos.narrow(0, offset, s)?;
        let sin = self.sin.narrow(0, offset, s)?;
        let mut cache = cache;

        let embedded =
            weights
                .embed
                .embedding(&tokens.flatten_all()?)?
                .reshape((b, s, cfg.d_model))?;
        let mut x = hooks.residual(HookPoint::Embed, embedded, offset, &mut captures)?;

        for (l, block) in weights.blocks.iter().enumerate() {
            x = hooks.residual(HookPoint::ResidPre(l), x, offset, &mut captures)?;
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            let attn_in = self.rms_norm(&x, &block.attn_norm, options)?;
            let z = self.attention(
                l,
                block,
                &attn_in,
                layer_cache,
                mask.as_ref(),
                (&cos, &sin),
                hooks,
                offset,
                &mut captures,
                options,
            )?;
            let attn_out = block
                .o
                .forward(&z.reshape((b, s, cfg.n_heads * cfg.head_dim))?)?;
            let attn_out =
                hooks.residual(HookPoint::AttnOut(l), attn_out, offset, &mut captures)?;
            x = hooks.residual(
                HookPoint::ResidMid(l),
                (x + attn_out)?,
                offset,
                &mut captures,
            )?;

            let mlp_in = self.rms_norm(&x, &block.mlp_norm, options)?;
            let [gate, up]: [Tensor; 2] =
                Linear::forward_shared_input(&[&block.gate, &block.up], &mlp_in)?
                    .try_into()
                    .expect("two projections in, two out");
            let mlp_out = block.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)?;
            let mlp_out = hooks.residual(HookPoint::MlpOut(l), mlp_out, offset, &mut captures)?;
            x = hooks.residual(
                HookPoint::ResidPost(l),
                (x + mlp_out)?,
                offset,
                &mut captures,
            )?;
        }

        let logits = match logits_at {
            LogitsAt::None if !hooks.wants(HookPoint::LnFinal) => None,
            _ => {
                let x = match &logits_at {
                    LogitsAt::Last => x.narrow(1, s - 1, 1)?,
                    LogitsAt::PerRow(rows) => {
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
                        Tensor::cat(&picked, 0)?
                    }
                    _ => x,
                };
                let normed = self.rms_norm(&x, &weights.final_norm, options)?;
                let normed = hooks.residual(HookPoint::LnFinal, normed, offset, &mut captures)?;
                match logits_at {
                    LogitsAt::None => None,
                    _ => Some(hooks.logits(weights.lm_head.forward(&normed)?)?),
                }
            }
        };
        Ok(ForwardOutput { logits, captures })
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        block: &BlockWeights,
        x: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mask: Option<&Tensor>,
        (cos, sin): (&Tensor, &Tensor),
        hooks: &HookSpec,
        offset: usize,
        captures: &mut Captures,
        options: ForwardOptions,
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
        let q = self.rope(&heads(q, h)?, cos, sin, options)?;
        let k = self.rope(&heads(k, h_kv)?, cos, sin, options)?;
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
        let scores = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?;
        let scores = match mask {
            Some(m) => scores
                .reshape((b, h_kv, n_rep, s, t))?
                .broadcast_add(m)?
                .reshape((b, h_kv, n_rep * s, t))?,
            None => scores,
        };
        let pattern = if options.differentiable {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        if hooks.wants(HookPoint::AttnPattern(layer)) {
            captures.push(
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
        hooks.attn_z(layer, z, offset, captures)
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

fn rope_tables(cfg: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64) as f32)
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let positions = Tensor::arange(0u32, cfg.context_length as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((cfg.context_length, 1))?;
    let angles = positions.broadcast_mul(&inv_freq)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// Additive causal mask `[s, offset+s]`, `None` for a single query (it sees everything).
fn causal_mask(s: usize, offset: usize, device: &Device) -> Result<Option<Tensor>> {
    if s == 1 {
        return Ok(None);
    }
    let t = offset + s;
    let mask: Vec<f32> = (0..s)
        .flat_map(|i| {
            (0..t).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(mask, (s, t), device)?))
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
