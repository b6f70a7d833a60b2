//! The weights of a model in one precision, the fast quantised copy built from them, the CPU
//! kernel tier that copy runs on, and the key/value cache.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};

use super::linear::Linear;
use crate::Result;

/// The weights of one block.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    pub attn_norm: Tensor,
    /// Per-head RMSNorm weights `[d_h]` on queries and keys (Qwen3), applied before RoPE.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// Norm of the attention output before it joins the stream (Gemma's sandwich norms).
    pub attn_post_norm: Option<Tensor>,
    pub mlp_norm: Tensor,
    /// Norm of the MLP output before it joins the stream (Gemma).
    pub mlp_post_norm: Option<Tensor>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl BlockWeights {
    pub fn to_device(&self, device: &Device) -> Result<BlockWeights> {
        let t = |t: &Tensor| t.to_device(device);
        let opt = |o: &Option<Tensor>| o.as_ref().map(t).transpose();
        Ok(BlockWeights {
            attn_norm: t(&self.attn_norm)?,
            q_norm: opt(&self.q_norm)?,
            k_norm: opt(&self.k_norm)?,
            q: self.q.to_device(device)?,
            k: self.k.to_device(device)?,
            v: self.v.to_device(device)?,
            o: self.o.to_device(device)?,
            attn_post_norm: opt(&self.attn_post_norm)?,
            mlp_norm: t(&self.mlp_norm)?,
            mlp_post_norm: opt(&self.mlp_post_norm)?,
            gate: self.gate.to_device(device)?,
            up: self.up.to_device(device)?,
            down: self.down.to_device(device)?,
        })
    }
}

/// Token embeddings `[vocab, d]`: f32, or the checkpoint's tensor with only the looked-up
/// rows dequantised (exact either way).
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Stored(Arc<QTensor>),
}

impl Embedding {
    /// The rows of `ids` (a flat u32 tensor), `[n, d]` f32.
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Dense(t) => t.embedding(ids)?,
            Embedding::Stored(q) => q.embedding(ids)?,
        })
    }

    /// The whole matrix as f32 (shared for a dense embedding, a copy for a stored one).
    pub fn dense(&self) -> Result<Tensor> {
        Ok(match self {
            Embedding::Dense(t) => t.clone(),
            Embedding::Stored(q) => q.dequantize(&q.device())?,
        })
    }

    pub fn to_device(&self, device: &Device) -> Result<Embedding> {
        Ok(match self {
            Embedding::Dense(t) => Embedding::Dense(t.to_device(device)?),
            Embedding::Stored(q) => {
                Embedding::Stored(Arc::new(super::linear::qtensor_to_device(q, device)?))
            }
        })
    }

    /// `(vocab, d)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Embedding::Dense(t) => t.dims2()?,
            Embedding::Stored(q) => q.shape().dims2()?,
        })
    }

    pub fn device(&self) -> Device {
        match self {
            Embedding::Dense(t) => t.device().clone(),
            Embedding::Stored(q) => q.device(),
        }
    }

    /// The unembedding of a model that ties it to this embedding, sharing the tensor.
    pub fn tied_unembedding(&self) -> Result<Linear> {
        match self {
            Embedding::Dense(t) => Linear::dense_shared(t),
            Embedding::Stored(q) => Ok(Linear::Stored {
                weight: q.clone(),
                bias: None,
            }),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.elem_count() * 4,
            Embedding::Stored(q) => q.storage_size_in_bytes(),
        }
    }
}

/// Where the exact path's weights live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum ExactWeights {
    /// f32 when that copy takes at most [`ExactWeights::AUTO_F32_LIMIT`] bytes, else stored.
    #[default]
    Auto,
    /// Every matrix as f32: fastest analyses, 4 bytes per parameter.
    F32,
    /// Matrices as the checkpoint stores them, dequantised per matrix on use.
    Stored,
}

impl ExactWeights {
    /// 2 GiB: a ~500M-parameter model keeps an f32 copy; a 1B one (5 GB of f32) does not.
    pub const AUTO_F32_LIMIT: usize = 2 << 30;

    /// True when weights of `f32_bytes` as f32 should stay stored.
    pub fn keeps_stored(self, f32_bytes: usize) -> bool {
        match self {
            ExactWeights::Auto => f32_bytes > Self::AUTO_F32_LIMIT,
            ExactWeights::F32 => false,
            ExactWeights::Stored => true,
        }
    }

    pub fn parse(s: &str) -> Option<ExactWeights> {
        match s {
            "auto" => Some(ExactWeights::Auto),
            "f32" => Some(ExactWeights::F32),
            "stored" => Some(ExactWeights::Stored),
            _ => None,
        }
    }
}

/// A full set of weights in one precision.
#[derive(Debug, Clone)]
pub struct Weights {
    pub embed: Embedding,
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
    /// Every weight on `device` (a copy).
    pub fn to_device(&self, device: &Device) -> Result<Weights> {
        Ok(Weights {
            embed: self.embed.to_device(device)?,
            blocks: self
                .blocks
                .iter()
                .map(|b| b.to_device(device))
                .collect::<Result<_>>()?,
            final_norm: self.final_norm.to_device(device)?,
            lm_head: self.lm_head.to_device(device)?,
        })
    }

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
            // A stored weight is its own original: kept as it is, it costs no memory.
            let original = match lin {
                Linear::Stored { weight, .. } => Some(weight.clone()),
                _ => originals(name),
            };
            let keep =
                original.filter(|q| keeps_fast_kernel(q.dtype()) && padded_in == in_features);
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
                    q_norm: b.q_norm.clone(),
                    k_norm: b.k_norm.clone(),
                    q: requant(&n("attn_q"), &b.q)?,
                    k: requant(&n("attn_k"), &b.k)?,
                    v: requant(&n("attn_v"), &b.v)?,
                    o: requant(&n("attn_output"), &b.o)?,
                    attn_post_norm: b.attn_post_norm.clone(),
                    mlp_norm: b.mlp_norm.clone(),
                    mlp_post_norm: b.mlp_post_norm.clone(),
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
pub(crate) fn keeps_fast_kernel(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(dtype, Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K | Q8K)
}

/// Key/value cache of every layer, `[b, h_kv, t, d_h]` each. Cloning is cheap (tensors are
/// shared), so a prompt prefix can be computed once and reused.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
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

    /// Elements held, keys and values of every layer.
    pub fn elem_count(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| k.elem_count() + v.elem_count())
            .sum()
    }
}

impl Weights {
    /// Bytes these weights hold (a tied unembedding counted once).
    pub fn bytes(&self, tied: bool) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                let norms = [&b.q_norm, &b.k_norm, &b.attn_post_norm, &b.mlp_post_norm]
                    .into_iter()
                    .flatten()
                    .chain([&b.attn_norm, &b.mlp_norm])
                    .map(|t| t.elem_count() * 4)
                    .sum::<usize>();
                let linears = [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]
                    .iter()
                    .map(|l| l.bytes())
                    .sum::<usize>();
                norms + linears
            })
            .sum();
        let head = if tied { 0 } else { self.lm_head.bytes() };
        self.embed.bytes() + blocks + head + self.final_norm.elem_count() * 4
    }

    /// Bytes of these (fast-path) weights not shared with `dense`: a stored tensor the fast
    /// path kept as it is costs nothing twice.
    pub fn extra_bytes_over(&self, dense: &Weights) -> usize {
        let unique = |fast: &Linear, exact: &Linear| match (fast, exact) {
            (Linear::Quantized { weight, .. }, Linear::Stored { weight: stored, .. }) => {
                match weight.as_ref() {
                    QMatMul::QTensor(q) if Arc::ptr_eq(q, stored) => 0,
                    _ => fast.bytes(),
                }
            }
            _ if std::ptr::eq(fast, exact) => 0,
            _ => fast.bytes(),
        };
        let blocks: usize = self
            .blocks
            .iter()
            .zip(&dense.blocks)
            .map(|(f, d)| {
                [
                    (&f.q, &d.q),
                    (&f.k, &d.k),
                    (&f.v, &d.v),
                    (&f.o, &d.o),
                    (&f.gate, &d.gate),
                    (&f.up, &d.up),
                    (&f.down, &d.down),
                ]
                .iter()
                .map(|(f, d)| unique(f, d))
                .sum::<usize>()
            })
            .sum();
        blocks + unique(&self.lm_head, &dense.lm_head)
    }

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
