//! Head attribution (docs/methods.md, "Head attribution"): direct logit attribution of every
//! head onto the refusal-vs-compliance logit direction, exact interchange (necessity and
//! sufficiency) between a harmful and a harmless prompt, attribution patching, the effect of
//! ablating each head, the knockout cascade and the gate/amplifier finder, the cipher
//! contrast and the suppression scan. Scans batch one layer's heads into one forward pass,
//! each batch row patching a different head ([`Intervention::PatchHeadPerRow`]).

mod cipher;
mod dla;
mod metrics;
mod patching;
mod routing;

pub use cipher::*;
pub use dla::*;
pub use metrics::*;
pub use patching::*;
pub use routing::*;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::hooks::Intervention;
use crate::refusal::{opener_ids, RefusalSignal};
use crate::{Error, LoadedModel, Result};

/// First tokens of compliant replies, the other end of the logit direction for models
/// without refusal tokens.
pub const COMPLIANCE_OPENERS: &[&str] = &[
    "Sure",
    "Here",
    "Certainly",
    "Of course",
    "To",
    "The",
    "Yes",
    "Step",
    "First",
];

/// One value per head, layers × heads, row-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadMap {
    pub n_layers: usize,
    pub n_heads: usize,
    pub values: Vec<f32>,
}

impl HeadMap {
    pub fn zeros(n_layers: usize, n_heads: usize) -> Self {
        HeadMap {
            n_layers,
            n_heads,
            values: vec![0.0; n_layers * n_heads],
        }
    }

    pub fn get(&self, layer: usize, head: usize) -> f32 {
        self.values[layer * self.n_heads + head]
    }

    fn set(&mut self, layer: usize, head: usize, v: f32) {
        self.values[layer * self.n_heads + head] = v;
    }

    /// `(layer, head, value)` sorted by value, largest first.
    pub fn ranked(&self) -> Vec<(usize, usize, f32)> {
        let mut all: Vec<_> = (0..self.n_layers)
            .flat_map(|l| (0..self.n_heads).map(move |h| (l, h)))
            .map(|(l, h)| (l, h, self.get(l, h)))
            .collect();
        all.sort_by(|a, b| b.2.total_cmp(&a.2));
        all
    }

    /// The element-wise mean of several maps of one shape.
    pub fn mean(maps: &[HeadMap]) -> Result<HeadMap> {
        let first = maps
            .first()
            .ok_or_else(|| Error::InvalidInput("no maps to average".into()))?;
        let mut m = HeadMap::zeros(first.n_layers, first.n_heads);
        for x in maps {
            m.add_scaled(x, 1.0 / maps.len() as f32);
        }
        Ok(m)
    }

    fn add_scaled(&mut self, other: &HeadMap, scale: f32) {
        for (a, b) in self.values.iter_mut().zip(&other.values) {
            *a += b * scale;
        }
    }
}

/// `u`: the unembedding direction whose dot product with the final normalised state is the
/// refusal-vs-compliance logit difference: `W_U[refuse] − W_U[respond]` on a model with
/// refusal tokens, else the mean row of the refusal openers minus that of the compliance
/// openers.
pub fn logit_direction(lm: &LoadedModel) -> Result<Vec<f32>> {
    let w = &lm.model.dense.lm_head;
    let mean_row = |ids: &[u32]| -> Result<Tensor> { Ok(w.rows(ids)?.mean(0)?) };
    let u = match RefusalSignal::for_model(lm)? {
        RefusalSignal::Tokens { refuse, respond } => {
            (mean_row(&[refuse])? - mean_row(&[respond])?)?
        }
        RefusalSignal::Openers(r) => {
            let c = opener_ids(lm, COMPLIANCE_OPENERS)?;
            let c: Vec<u32> = c.into_iter().filter(|i| !r.contains(i)).collect();
            (mean_row(&r)? - mean_row(&c)?)?
        }
    };
    Ok(u.to_vec1()?)
}

/// Pearson correlation of two head maps.
pub fn correlation(a: &HeadMap, b: &HeadMap) -> f32 {
    let n = a.values.len() as f64;
    let ma = a.values.iter().map(|&x| x as f64).sum::<f64>() / n;
    let mb = b.values.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.values.iter().zip(&b.values) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    (sab / (saa.sqrt() * sbb.sqrt()).max(1e-30)) as f32
}

/// Scale-ablation interventions for heads.
pub fn scale_heads(heads: &[(usize, usize)], factor: f32) -> Vec<Intervention> {
    heads
        .iter()
        .map(|&(layer, head)| Intervention::ScaleHead {
            layer,
            head,
            factor: factor as f64,
        })
        .collect()
}
