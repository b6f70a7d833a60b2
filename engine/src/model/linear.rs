//! Weight matrices: dense f32, kept as stored and dequantised on use, or quantised for the
//! fast path, with the fused and frozen variants training and generation need.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

use crate::Result;

/// A weight matrix `W` (`[out, in]`, `y = x·Wᵀ + b`) with an optional bias, dense f32 or
/// quantised.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Dense f32 in panels of [`PANEL`] outputs, `[out / PANEL, in, PANEL]`: the layout the
    /// exact kernel (`super::matmul`) streams from memory in order. How the exact path holds
    /// its CPU matrices whose output size is a multiple of [`PANEL`]; a constant (its backward
    /// pass forms only the input's gradient, as [`Linear::Frozen`]'s does).
    Packed {
        panels: Tensor,
        bias: Option<Tensor>,
    },
    /// Stored transposed, `[in, out]`: laid out this way the matmul reads it without
    /// repacking. Measured on a 42-token prompt with this model's shapes (2 threads): 1.35×
    /// (576 → 1536), 2.5× (576 → 576) and 3.4× (1536 → 576) faster than multiplying by a
    /// transposed view of `[out, in]`.
    Dense {
        weight_t: Tensor,
        bias: Option<Tensor>,
    },
    /// The checkpoint's own tensor (quantised, f16 or bf16), dequantised to f32 for each
    /// product: the same f32 math as [`Linear::Dense`] on the file's dequantised weights,
    /// without holding 4 bytes per parameter (how models too large for an f32 copy run
    /// exactly).
    Stored {
        weight: Arc<QTensor>,
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
    /// From a weight in the checkpoint layout `[out, in]`: [`Linear::Packed`] on the CPU when
    /// the output size allows, else [`Linear::Dense`].
    pub fn dense(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out, in_features) = weight.dims2()?;
        if weight.device().is_cpu()
            && weight.dtype() == DType::F32
            && out.is_multiple_of(PANEL)
            && !weight.track_op()
        {
            let panels = weight
                .reshape((out / PANEL, PANEL, in_features))?
                .transpose(1, 2)?
                .contiguous()?;
            return Ok(Linear::Packed { panels, bias });
        }
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
            // The frozen product is a CPU kernel; elsewhere a plain product of a detached
            // weight gives the same values (and gradients for the input, at the cost of the
            // weight's gradient too).
            Linear::Frozen { weight_t, bias } if !weight_t.device().is_cpu() => {
                (x.broadcast_matmul(&weight_t.detach())?, bias)
            }
            Linear::Frozen { weight_t, bias } => (
                frozen_product(x, FrozenWeight::Rows(weight_t.clone()))?,
                bias,
            ),
            Linear::Packed { panels, bias } => (
                frozen_product(x, FrozenWeight::Panels(panels.clone()))?,
                bias,
            ),
            // A constant weight on the CPU (every exact pass): the exact kernel. A weight
            // being trained (it tracks gradients) or on a GPU: candle's product.
            Linear::Dense { weight_t, bias }
                if weight_t.device().is_cpu() && !weight_t.track_op() =>
            {
                (
                    frozen_product(x, FrozenWeight::Rows(weight_t.clone()))?,
                    bias,
                )
            }
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
            Linear::Stored { weight, bias } => {
                (stored_matmul(weight, x, STORED_SLICE_ELEMENTS)?, bias)
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
            | Linear::Packed { bias, .. }
            | Linear::Stored { bias, .. }
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
            Linear::Packed { panels, .. } => {
                let (p, i, _) = panels.dims3()?;
                Ok((p * PANEL, i))
            }
            Linear::Stored { weight, .. } => Ok(weight.shape().dims2()?),
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
            Linear::Packed { .. } => self.clone(),
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
            // Row `o` is column `o % PANEL` of panel `o / PANEL`.
            Linear::Packed { panels, .. } => {
                let rows = ids
                    .iter()
                    .map(|&o| {
                        let o = o as usize;
                        panels.get(o / PANEL)?.narrow(1, o % PANEL, 1)?.squeeze(1)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::stack(&rows, 0)?
            }
            // Only the asked rows are dequantised.
            Linear::Stored { weight, .. } => weight.embedding(&idx)?,
            other => {
                let w = other.dense_weight()?;
                w.index_select(&idx.to_device(w.device())?, 0)?
            }
        })
    }

    /// Bytes this weight holds (shared tensors counted in full).
    pub fn bytes(&self) -> usize {
        let f32_bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let bias = self.bias().map_or(0, f32_bytes);
        bias + match self {
            Linear::Dense { weight_t, .. } | Linear::Frozen { weight_t, .. } => f32_bytes(weight_t),
            Linear::Packed { panels, .. } => f32_bytes(panels),
            Linear::Stored { weight, .. } => weight.storage_size_in_bytes(),
            Linear::Quantized { weight, .. } => match weight.as_ref() {
                QMatMul::QTensor(q) => q.storage_size_in_bytes(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => f32_bytes(t),
            },
            Linear::LoRA { base, a, b, .. } => base.bytes() + f32_bytes(a) + f32_bytes(b),
        }
    }

    /// The weight transposed, `[in, out]`, dense f32: the stored tensor itself for dense
    /// weights (no copy), else a copy.
    pub fn dense_weight_t(&self) -> Result<Tensor> {
        match self {
            Linear::Dense { weight_t, .. } | Linear::Frozen { weight_t, .. } => {
                Ok(weight_t.clone())
            }
            Linear::Packed { panels, .. } => unpack(panels),
            _ => Ok(self.dense_weight()?.t()?.contiguous()?),
        }
    }

    /// The weight as a contiguous dense f32 `[out, in]` tensor (a copy).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match self {
            Linear::Dense { weight_t, .. } | Linear::Frozen { weight_t, .. } => {
                Ok(weight_t.t()?.contiguous()?)
            }
            Linear::Packed { panels, .. } => Ok(unpack(panels)?.t()?.contiguous()?),
            Linear::Quantized {
                weight,
                in_features,
                ..
            } => {
                let w = match weight.as_ref() {
                    QMatMul::QTensor(q) => q.dequantize(&q.device())?,
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
                };
                Ok(w.narrow(1, 0, *in_features)?.contiguous()?)
            }
            Linear::Stored { weight, .. } => Ok(weight.dequantize(&weight.device())?),
            Linear::LoRA { base, a, b, scale } => {
                Ok((base.dense_weight()? + (b.matmul(a)? * *scale)?)?)
            }
        }
    }

    /// This weight on `device` (a copy). Quantised weights stay quantised: candle has CUDA and
    /// Metal kernels for the GGUF block types.
    pub fn to_device(&self, device: &Device) -> Result<Linear> {
        let moved = |t: &Tensor| t.to_device(device);
        let bias = |b: &Option<Tensor>| b.as_ref().map(moved).transpose();
        Ok(match self {
            Linear::Dense { weight_t, bias: b } => Linear::Dense {
                weight_t: moved(weight_t)?,
                bias: bias(b)?,
            },
            Linear::Frozen { weight_t, bias: b } => Linear::Frozen {
                weight_t: moved(weight_t)?,
                bias: bias(b)?,
            },
            // The panels are the CPU kernel's layout; a GPU multiplies the plain one.
            Linear::Packed { panels, bias: b } if !device.is_cpu() => Linear::Dense {
                weight_t: moved(&unpack(panels)?)?,
                bias: bias(b)?,
            },
            Linear::Packed { .. } => self.clone(),
            Linear::Stored { weight, bias: b } => Linear::Stored {
                weight: Arc::new(qtensor_to_device(weight, device)?),
                bias: bias(b)?,
            },
            Linear::Quantized {
                weight,
                bias: b,
                in_features,
                padded_in,
            } => Linear::Quantized {
                weight: Arc::new(match weight.as_ref() {
                    QMatMul::QTensor(q) => {
                        QMatMul::from_arc(Arc::new(qtensor_to_device(q, device)?))?
                    }
                    QMatMul::Tensor(t) => QMatMul::Tensor(moved(t)?),
                    QMatMul::TensorF16(t) => QMatMul::TensorF16(moved(t)?),
                }),
                bias: bias(b)?,
                in_features: *in_features,
                padded_in: *padded_in,
            },
            Linear::LoRA { base, a, b, scale } => Linear::LoRA {
                base: Box::new(base.to_device(device)?),
                a: moved(a)?,
                b: moved(b)?,
                scale: *scale,
            },
        })
    }
}

/// A quantised tensor's blocks copied to `device` as they are (no requantisation).
pub(crate) fn qtensor_to_device(q: &QTensor, device: &Device) -> Result<QTensor> {
    let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
    Ok(QTensor::new(storage, q.shape().clone())?)
}

/// f32 elements dequantised at a time by a stored weight's product: a 128k-token unembedding
/// (half a billion parameters, 2 GB as f32) passes in 64 MB slices instead of all at once.
const STORED_SLICE_ELEMENTS: usize = 1 << 24;

/// `x · Wᵀ` for a stored `W` `[out, in]`: dequantised a slice of rows at a time (each output
/// is the same dot product either way), read through a transposed view (no second copy).
fn stored_matmul(weight: &QTensor, x: &Tensor, slice_elements: usize) -> Result<Tensor> {
    let (out, in_features) = weight.shape().dims2()?;
    let product = |start: usize, n: usize| -> Result<Tensor> {
        let w_t = dequantize_rows(weight, start, n)?.t()?;
        if w_t.device().is_cpu() {
            // Laid out `[in, out]`, the slice goes through the exact kernel: each output is
            // the same in-order sum as `Linear::Dense` computes, bit for bit.
            return frozen_product(x, FrozenWeight::Rows(w_t.contiguous()?));
        }
        Ok(match x.dims() {
            [b, s, i] => x
                .reshape((b * s, *i))?
                .matmul(&w_t)?
                .reshape((*b, *s, ()))?,
            _ => x.matmul(&w_t)?,
        })
    };
    let rows = (slice_elements / in_features.max(1)).max(1);
    if out <= rows {
        return product(0, out);
    }
    let slices = (0..out)
        .step_by(rows)
        .map(|start| product(start, rows.min(out - start)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&slices, D::Minus1)?)
}

/// Rows `start .. start + n` of `w` as f32, dequantised on every core at once (candle
/// dequantises on one thread, and dequantising dominates a stored model's prompt pass); each
/// thread copies only its own rows' blocks.
fn dequantize_rows(w: &QTensor, start: usize, n: usize) -> Result<Tensor> {
    let (rows, _) = w.shape().dims2()?;
    if !w.device().is_cpu() {
        // A GPU dequantises in parallel itself.
        return Ok(w.dequantize(&w.device())?.narrow(0, start, n)?);
    }
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |t| t.get()))
        .clamp(1, n.max(1));
    if start == 0 && n == rows && (threads == 1 || n < 2 * threads) {
        return Ok(w.dequantize(&Device::Cpu)?);
    }
    let per = if n < 2 * threads {
        n
    } else {
        n.div_ceil(threads)
    };
    let parts = std::thread::scope(|scope| {
        let handles: Vec<_> = (start..start + n)
            .step_by(per)
            .map(|from| {
                let count = per.min(start + n - from);
                scope.spawn(move || -> Result<Tensor> {
                    Ok(crate::model::loader::split_rows(w, from, count)?
                        .dequantize(&Device::Cpu)?)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a dequantising thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(match parts.len() {
        1 => parts.into_iter().next().expect("one part"),
        _ => Tensor::cat(&parts, 0)?,
    })
}

/// Outputs per panel of [`Linear::Packed`].
pub const PANEL: usize = super::matmul::PANEL;

/// `[in, out]` from panels `[out / PANEL, in, PANEL]` (a copy).
fn unpack(panels: &Tensor) -> Result<Tensor> {
    let (p, in_features, _) = panels.dims3()?;
    Ok(panels
        .transpose(0, 1)?
        .contiguous()?
        .reshape((in_features, p * PANEL))?)
}

/// `x · W_t` on the CPU through [`FrozenMatmul`].
fn frozen_product(x: &Tensor, weight: FrozenWeight) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(FrozenMatmul { weight })?)
}

/// The weight of a [`FrozenMatmul`].
enum FrozenWeight {
    /// `W_t`, `[in, out]`.
    Rows(Tensor),
    /// `W_t` in panels, `[out / PANEL, in, PANEL]`.
    Panels(Tensor),
}

/// `x · W_t` with a backward pass that returns only the input's gradient `g · W_tᵀ`. Forward,
/// a contiguous f32 weight goes through the exact kernel (`super::matmul`: every output summed
/// in input order, the same bits on every CPU); any other through candle's product.
struct FrozenMatmul {
    weight: FrozenWeight,
}

/// `f` of the contiguous f32 data of a CPU tensor.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*storage else {
        candle_core::bail!("frozen-matmul: f32 CPU weight expected")
    };
    let Some((lo, hi)) = layout.contiguous_offsets() else {
        candle_core::bail!("frozen-matmul: contiguous weight expected")
    };
    Ok(f(&data[lo..hi]))
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
        let (k, n) = match &self.weight {
            FrozenWeight::Rows(w) => w.dims2()?,
            FrozenWeight::Panels(p) => {
                let (panels, k, _) = p.dims3()?;
                (k, panels * PANEL)
            }
        };
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("frozen-matmul: f32 input expected")
        };
        let Some((lo, hi)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-matmul: contiguous input expected")
        };
        let m = layout.shape().elem_count() / k;
        let mut dims = layout.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        let x = &data[lo..hi];
        let mut y = vec![0f32; m * n];
        match &self.weight {
            FrozenWeight::Panels(p) => {
                with_cpu_f32(p, |w| super::matmul::matmul_panels(x, w, &mut y, m, k, n))?
            }
            FrozenWeight::Rows(w) if w.is_contiguous() && w.dtype() == DType::F32 => {
                with_cpu_f32(w, |w| super::matmul::matmul(x, w, &mut y, m, k, n))?
            }
            FrozenWeight::Rows(w) => {
                y = Tensor::from_slice(x, (m, k), &Device::Cpu)?
                    .matmul(w)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
            }
        }
        Ok((
            candle_core::CpuStorage::F32(y),
            candle_core::Shape::from(dims),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let weight_t = match &self.weight {
            FrozenWeight::Rows(w) => w.clone(),
            // A training pass unpacks each weight once per backward product.
            FrozenWeight::Panels(p) => {
                unpack(p).map_err(|e| candle_core::Error::Msg(e.to_string()))?
            }
        };
        let (k, n) = weight_t.dims2()?;
        let mut dims = grad.dims().to_vec();
        let m = grad.elem_count() / n;
        let g = grad.reshape((m, n))?.matmul(&weight_t.t()?)?;
        if let Some(last) = dims.last_mut() {
            *last = k;
        }
        Ok(Some(g.reshape(dims)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// A weight packed in panels reads back as it was (whole, by rows, transposed) and
    /// multiplies as the row-major layout does, bit for bit; its input gradient is `g · W`.
    #[test]
    fn packed_weights_read_back_and_multiply_as_row_major_ones() {
        let w = Tensor::randn(0f32, 1.0, (2 * PANEL, 48), &Device::Cpu).unwrap();
        let packed = Linear::dense(&w, None).unwrap();
        assert!(matches!(packed, Linear::Packed { .. }));
        assert_eq!(packed.dims().unwrap(), (2 * PANEL, 48));
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bits(&packed.dense_weight().unwrap()), bits(&w));
        assert_eq!(
            bits(&packed.dense_weight_t().unwrap()),
            bits(&w.t().unwrap())
        );
        let ids = [0, 63, 64, 127];
        let idx = Tensor::new(&ids, &Device::Cpu).unwrap();
        assert_eq!(
            bits(&packed.rows(&ids).unwrap()),
            bits(&w.index_select(&idx, 0).unwrap())
        );
        let rows = Linear::Dense {
            weight_t: w.t().unwrap().contiguous().unwrap(),
            bias: None,
        };
        let x = candle_core::Var::randn(0f32, 1.0, (2, 5, 48), &Device::Cpu).unwrap();
        let (a, b) = (packed.forward(&x).unwrap(), rows.forward(&x).unwrap());
        assert_eq!(bits(&a), bits(&b));
        let grads = a.sum_all().unwrap().backward().unwrap();
        let g = grads.get(&x).expect("the input's gradient");
        let want = Tensor::ones((2, 5, 2 * PANEL), DType::F32, &Device::Cpu)
            .unwrap()
            .broadcast_matmul(&w)
            .unwrap();
        let diff = (g - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    }

    /// A stored weight multiplied a slice of rows at a time gives the whole product, bit for
    /// bit (each output is the same in-order sum), and the product of its dense copy.
    #[test]
    fn sliced_stored_products_equal_the_whole_product() {
        let w = Tensor::randn(0f32, 1.0, (70, 64), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &Device::Cpu).unwrap();
        let whole = stored_matmul(&q, &x, usize::MAX).unwrap();
        for slice in [64, 640, 64 * 33] {
            let sliced = stored_matmul(&q, &x, slice).unwrap();
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(bits(&sliced), bits(&whole), "slices of {slice}");
        }
        assert_eq!(whole.dims(), &[2, 3, 70]);
        let dense = Linear::dense(&q.dequantize(&Device::Cpu).unwrap(), None).unwrap();
        let y = dense.forward(&x).unwrap();
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bits(&y), bits(&whole));
    }
}
