//! Hook points (TransformerLens names), the hook spec threaded through the forward pass (what
//! to capture and what to change), and the activation cache read back from it. An empty spec
//! costs a few branch checks per layer.

pub mod cache;
mod point;

pub use cache::ActivationCache;
pub use point::HookPoint;

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which absolute positions (counting from the start of the sequence, KV cache included) an
/// intervention touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Positions {
    #[default]
    All,
    /// Every position from this one on, e.g. post-instruction + generated tokens.
    From(usize),
    /// Positions `start..end`.
    Range { start: usize, end: usize },
}

impl Positions {
    /// The selected absolute positions as a half-open range.
    fn bounds(self) -> (usize, usize) {
        match self {
            Positions::All => (0, usize::MAX),
            Positions::From(p) => (p, usize::MAX),
            Positions::Range { start, end } => (start, end.max(start)),
        }
    }
}

/// What replaces a head's `z` under [`Intervention::SetHead`].
#[derive(Debug, Clone)]
pub enum HeadValue {
    /// One `[d_h]` vector at every position (mean ablation).
    Broadcast(Tensor),
    /// Rows `[n, d_h]` for absolute positions `start..start+n` (interchange with a cached run,
    /// aligned as the caller chose); positions outside are left alone.
    PerPosition { start: usize, rows: Tensor },
}

/// A change made during the forward pass. All are applied on every forward pass, prompt and
/// generated tokens alike.
#[derive(Debug, Clone)]
pub enum Intervention {
    /// `x ← x + scale·v` at a residual-shaped point.
    AddVector {
        point: HookPoint,
        vector: Tensor,
        scale: f64,
        positions: Positions,
    },
    /// `x ← x − f·(x·r̂) r̂` at a residual-shaped point; `unit` must have norm 1. `f` is the
    /// fraction of the component removed: 1 projects it out, 0 leaves `x`, 2 reflects it.
    ProjectOut {
        point: HookPoint,
        unit: Tensor,
        fraction: f64,
        positions: Positions,
    },
    /// `z_{l,h} ← factor · z_{l,h}`. Factor 0 is zero ablation; because `z = A·V` is linear in
    /// the attention weights, this equals scaling the head's attention weights by `factor`.
    ScaleHead {
        layer: usize,
        head: usize,
        factor: f64,
    },
    /// Replace `z_{l,h}` (mean ablation, or patching from a cached run).
    SetHead {
        layer: usize,
        head: usize,
        value: HeadValue,
    },
    /// `logits[t] += bias` for each listed token.
    LogitBias { token_ids: Vec<u32>, bias: f32 },
    /// `z_l ← z_l + delta` (`delta` shaped like `z`, `[b, s, h, d_h]`, for the positions of
    /// this pass). With `delta` a zero `Var`, the backward pass yields `∂metric/∂z_l`
    /// (attribution patching).
    AddToZ { layer: usize, delta: Tensor },
    /// Batch row `r` gets head `heads[r]`'s `z` replaced by `values[r]` (`[n, d_h]`) at
    /// absolute positions `start..start+n`: one batched pass patches a different head in
    /// every row (interchange and ablation scans).
    PatchHeadPerRow {
        layer: usize,
        start: usize,
        heads: Vec<usize>,
        values: Vec<Tensor>,
    },
}

impl Intervention {
    /// The same intervention with its positions (where it has any) mapped by `f`.
    pub fn map_positions(self, f: impl Fn(Positions) -> Positions) -> Intervention {
        match self {
            Intervention::AddVector {
                point,
                vector,
                scale,
                positions,
            } => Intervention::AddVector {
                point,
                vector,
                scale,
                positions: f(positions),
            },
            Intervention::ProjectOut {
                point,
                unit,
                fraction,
                positions,
            } => Intervention::ProjectOut {
                point,
                unit,
                fraction,
                positions: f(positions),
            },
            other => other,
        }
    }

    /// Directional ablation as docs/methods.md defines it: project `r̂` out of every write into the
    /// residual stream (the embedding, every attention output and every MLP output).
    pub fn ablate_direction(direction: &Tensor, n_layers: usize) -> Result<Vec<Intervention>> {
        Self::ablate_fraction(direction, n_layers, 1.0)
    }

    /// Directional ablation of a fraction `f` of the component along `r̂` from every write:
    /// 0 changes nothing, 1 is [`Intervention::ablate_direction`], above 1 reflects it.
    pub fn ablate_fraction(
        direction: &Tensor,
        n_layers: usize,
        fraction: f64,
    ) -> Result<Vec<Intervention>> {
        let direction = direction.to_dtype(DType::F32)?.flatten_all()?;
        let norm = direction.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        if !norm.is_finite() || norm == 0.0 {
            return Err(Error::InvalidInput("cannot ablate a zero direction".into()));
        }
        let unit = (direction / norm as f64)?;
        let points = std::iter::once(HookPoint::Embed)
            .chain((0..n_layers).flat_map(|l| [HookPoint::AttnOut(l), HookPoint::MlpOut(l)]));
        Ok(points
            .map(|point| Intervention::ProjectOut {
                point,
                unit: unit.clone(),
                fraction,
                positions: Positions::All,
            })
            .collect())
    }
}

/// What to capture and what to change in one forward pass.
#[derive(Debug, Clone, Default)]
pub struct HookSpec {
    pub capture: BTreeSet<HookPoint>,
    pub interventions: Vec<Intervention>,
}

impl HookSpec {
    pub fn capture(points: impl IntoIterator<Item = HookPoint>) -> Self {
        HookSpec {
            capture: points.into_iter().collect(),
            interventions: Vec::new(),
        }
    }

    pub fn with_interventions(interventions: Vec<Intervention>) -> Self {
        HookSpec {
            capture: BTreeSet::new(),
            interventions,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.capture.is_empty() && self.interventions.is_empty()
    }

    /// Applies every residual-shaped intervention at `point` to `x` (`[b, s, d]`, absolute
    /// positions `offset..offset+s`), then captures it if asked.
    pub(crate) fn residual(
        &self,
        point: HookPoint,
        mut x: Tensor,
        offset: usize,
        captures: &mut Captures,
    ) -> Result<Tensor> {
        for intervention in &self.interventions {
            x = match intervention {
                Intervention::AddVector {
                    point: p,
                    vector,
                    scale,
                    positions,
                } if *p == point => {
                    let delta = (vector.to_dtype(x.dtype())?.flatten_all()? * *scale)?;
                    on_positions(&x, offset, *positions, |part| {
                        Ok(part.broadcast_add(&delta)?)
                    })?
                }
                Intervention::ProjectOut {
                    point: p,
                    unit,
                    fraction,
                    positions,
                } if *p == point => {
                    let unit = unit.to_dtype(x.dtype())?.flatten_all()?;
                    on_positions(&x, offset, *positions, |part| {
                        project_out(part, &unit, *fraction)
                    })?
                }
                _ => x,
            };
        }
        self.capture_if_wanted(point, &x, captures);
        Ok(x)
    }

    /// Applies head interventions of `layer` to `z` (`[b, s, h, d_h]`) and captures it.
    pub(crate) fn attn_z(
        &self,
        layer: usize,
        mut z: Tensor,
        offset: usize,
        captures: &mut Captures,
    ) -> Result<Tensor> {
        for intervention in &self.interventions {
            z = match intervention {
                Intervention::ScaleHead {
                    layer: l,
                    head,
                    factor,
                } if *l == layer => map_head(&z, *head, |zh| Ok((zh * *factor)?))?,
                Intervention::SetHead {
                    layer: l,
                    head,
                    value,
                } if *l == layer => map_head(&z, *head, |zh| set_head(zh, value, offset))?,
                Intervention::AddToZ { layer: l, delta } if *l == layer => {
                    z.broadcast_add(delta)?
                }
                Intervention::PatchHeadPerRow {
                    layer: l,
                    start,
                    heads,
                    values,
                } if *l == layer => {
                    let b = z.dim(0)?;
                    if heads.len() != b || values.len() != b {
                        return Err(Error::InvalidInput(format!(
                            "{} per-row head patches for a batch of {b}",
                            heads.len()
                        )));
                    }
                    let rows = (0..b)
                        .map(|r| {
                            let value = HeadValue::PerPosition {
                                start: *start,
                                rows: values[r].clone(),
                            };
                            map_head(&z.narrow(0, r, 1)?, heads[r], |zh| {
                                set_head(zh, &value, offset)
                            })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::cat(&rows, 0)?
                }
                _ => z,
            };
        }
        self.capture_if_wanted(HookPoint::AttnZ(layer), &z, captures);
        Ok(z)
    }

    pub(crate) fn logits(&self, mut logits: Tensor) -> Result<Tensor> {
        for intervention in &self.interventions {
            if let Intervention::LogitBias { token_ids, bias } = intervention {
                let vocab = logits.dim(D::Minus1)?;
                let mut row = vec![0f32; vocab];
                for &t in token_ids {
                    if let Some(slot) = row.get_mut(t as usize) {
                        *slot += *bias;
                    }
                }
                let row =
                    Tensor::from_vec(row, vocab, logits.device())?.to_dtype(logits.dtype())?;
                logits = logits.broadcast_add(&row)?;
            }
        }
        Ok(logits)
    }

    pub(crate) fn wants(&self, point: HookPoint) -> bool {
        self.capture.contains(&point)
    }

    /// True when the spec captures `point` or changes the activation there.
    pub(crate) fn touches(&self, point: HookPoint) -> bool {
        self.wants(point)
            || self.interventions.iter().any(|i| match i {
                Intervention::AddVector { point: p, .. }
                | Intervention::ProjectOut { point: p, .. } => *p == point,
                _ => false,
            })
    }

    pub(crate) fn capture_if_wanted(&self, point: HookPoint, x: &Tensor, captures: &mut Captures) {
        if self.wants(point) {
            captures.push(point, x.clone());
        }
    }
}

/// `y − (y·u) u` along the last dimension.
fn project_out(y: &Tensor, unit: &Tensor, fraction: f64) -> Result<Tensor> {
    let coeff = (y.broadcast_mul(unit)?.sum_keepdim(D::Minus1)? * fraction)?;
    Ok((y - coeff.broadcast_mul(unit)?)?)
}

/// Runs `f` on the positions (dim 1) of `x` selected by `positions`, leaving the others alone.
fn on_positions(
    x: &Tensor,
    offset: usize,
    positions: Positions,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let seq = x.dim(1)?;
    let (start, end) = positions.bounds();
    let first = start.saturating_sub(offset).min(seq);
    let last = end.saturating_sub(offset).min(seq);
    if first >= last {
        return Ok(x.clone());
    }
    if first == 0 && last == seq {
        return f(x);
    }
    let mut parts = Vec::with_capacity(3);
    if first > 0 {
        parts.push(x.narrow(1, 0, first)?);
    }
    parts.push(f(&x.narrow(1, first, last - first)?)?);
    if last < seq {
        parts.push(x.narrow(1, last, seq - last)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// Rebuilds `z` (`[b, s, h, d_h]`) with head `head` replaced by `f(z[:, :, head])`.
fn map_head(z: &Tensor, head: usize, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let n_heads = z.dim(2)?;
    if head >= n_heads {
        return Err(Error::InvalidInput(format!(
            "head {head} does not exist ({n_heads} heads)"
        )));
    }
    let changed = f(&z.narrow(2, head, 1)?)?;
    let mut parts = Vec::with_capacity(3);
    if head > 0 {
        parts.push(z.narrow(2, 0, head)?);
    }
    parts.push(changed);
    if head + 1 < n_heads {
        parts.push(z.narrow(2, head + 1, n_heads - head - 1)?);
    }
    Ok(Tensor::cat(&parts, 2)?)
}

/// `zh` is `[b, s, 1, d_h]` at absolute positions `offset..offset+s`.
fn set_head(zh: &Tensor, value: &HeadValue, offset: usize) -> Result<Tensor> {
    let (b, s, _, dh) = zh.dims4()?;
    match value {
        HeadValue::Broadcast(v) => Ok(v
            .to_dtype(zh.dtype())?
            .reshape((1, 1, 1, dh))?
            .broadcast_as((b, s, 1, dh))?
            .contiguous()?),
        HeadValue::PerPosition { start, rows } => {
            let n = rows.dim(0)?;
            // Overlap of [offset, offset+s) with [start, start+n).
            let lo = offset.max(*start);
            let hi = (offset + s).min(start + n);
            if lo >= hi {
                return Ok(zh.clone());
            }
            let patch = rows
                .to_dtype(zh.dtype())?
                .narrow(0, lo - start, hi - lo)?
                .reshape((1, hi - lo, 1, dh))?
                .broadcast_as((b, hi - lo, 1, dh))?;
            let mut parts = Vec::with_capacity(3);
            if lo > offset {
                parts.push(zh.narrow(1, 0, lo - offset)?);
            }
            parts.push(patch.contiguous()?);
            if hi < offset + s {
                parts.push(zh.narrow(1, hi - offset, offset + s - hi)?);
            }
            Ok(Tensor::cat(&parts, 1)?)
        }
    }
}

/// Captured activations by hook point. A point captured over several forward passes (prompt,
/// then one generated token at a time) is concatenated along the position axis on read.
#[derive(Debug, Default, Clone)]
pub struct Captures {
    parts: BTreeMap<HookPoint, Vec<Tensor>>,
}

impl Captures {
    /// Adds an activation at `point` (after any captured before, along the positions).
    pub fn push(&mut self, point: HookPoint, x: Tensor) {
        self.parts.entry(point).or_default().push(x);
    }

    pub fn points(&self) -> impl Iterator<Item = HookPoint> + '_ {
        self.parts.keys().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The activation at `point`, all captured positions together.
    pub fn get(&self, point: HookPoint) -> Result<Option<Tensor>> {
        let Some(parts) = self.parts.get(&point) else {
            return Ok(None);
        };
        if parts.len() == 1 {
            return Ok(Some(parts[0].clone()));
        }
        // Patterns and scores grow along the key axis too; they are only concatenable per
        // query row.
        if point.has_key_axis() {
            return Err(Error::InvalidInput(format!(
                "{point} was captured over several cached forward passes; capture it in one pass"
            )));
        }
        Ok(Some(Tensor::cat(parts, 1)?))
    }

    /// Every capture as `(name, tensor)` pairs, ready to save.
    pub fn named(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for point in self.points() {
            if let Some(t) = self.get(point)? {
                out.push((point.to_string(), t));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_out_removes_the_component_and_keeps_the_rest() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[[[3f32, 4.0, 5.0]]], &dev).unwrap();
        let u = Tensor::new(&[0f32, 1.0, 0.0], &dev).unwrap();
        let y = |f: f64| {
            project_out(&x, &u, f)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(y(1.0), vec![3.0, 0.0, 5.0]);
        // A fraction removes that much of the component; 2 reflects it.
        assert_eq!(y(0.0), vec![3.0, 4.0, 5.0]);
        assert_eq!(y(0.25), vec![3.0, 3.0, 5.0]);
        assert_eq!(y(2.0), vec![3.0, -4.0, 5.0]);
    }

    #[test]
    fn positions_select_absolute_positions_across_chunks() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::zeros((1, 4, 2), DType::F32, &dev).unwrap();
        let add = |t: &Tensor| Ok((t + 1.0)?);
        // Chunk covers positions 10..14, intervention starts at 12.
        let y = on_positions(&x, 10, Positions::From(12), add).unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, vec![0., 0., 0., 0., 1., 1., 1., 1.]);
        let y = on_positions(&x, 20, Positions::From(12), add).unwrap();
        assert_eq!(y.sum_all().unwrap().to_scalar::<f32>().unwrap(), 8.0);
        let y = on_positions(&x, 0, Positions::From(12), add).unwrap();
        assert_eq!(y.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        // A range in the middle of the chunk: positions 11 and 12 of 10..14.
        let y = on_positions(&x, 10, Positions::Range { start: 11, end: 13 }, add).unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, vec![0., 0., 1., 1., 1., 1., 0., 0.]);
    }

    #[test]
    fn set_head_patches_only_overlapping_positions() {
        let dev = candle_core::Device::Cpu;
        let zh = Tensor::zeros((1, 3, 1, 2), DType::F32, &dev).unwrap();
        let rows = Tensor::new(&[[1f32, 1.0], [2.0, 2.0], [3.0, 3.0]], &dev).unwrap();
        // Chunk at positions 5..8; rows for 6..9 → positions 6 and 7 patched with rows 0, 1.
        let y = set_head(&zh, &HeadValue::PerPosition { start: 6, rows }, 5).unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, vec![0., 0., 1., 1., 2., 2.]);
    }
}
