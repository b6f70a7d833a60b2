//! Hook points: the named places in the forward pass, printed and parsed with
//! TransformerLens' names so captures read like a notebook.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A named place in the forward pass. Shapes: `b` batch, `s` positions (`t` key positions,
/// the cache included), `d` width, `h` query heads, `h_kv` key/value heads, `d_h` head size,
/// `d_mlp` the MLP's hidden width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum HookPoint {
    /// `hook_embed`: token embeddings, the first write into the residual stream. `[b, s, d]`
    Embed,
    /// `blocks.{l}.hook_resid_pre`: the residual stream entering block `l`. `[b, s, d]`
    ResidPre(usize),
    /// `blocks.{l}.ln1.hook_normalized`: the attention's input norm before its weight, as in
    /// TransformerLens: `x / rms(x)`. `[b, s, d]`
    Ln1Normalized(usize),
    /// `blocks.{l}.attn.hook_q`: queries as projected, before RoPE (and before Qwen3's
    /// per-head norm). `[b, s, h, d_h]`
    AttnQ(usize),
    /// `blocks.{l}.attn.hook_k`: keys before RoPE, one per key/value head. `[b, s, h_kv, d_h]`
    AttnK(usize),
    /// `blocks.{l}.attn.hook_v`: values, one per key/value head. `[b, s, h_kv, d_h]`
    AttnV(usize),
    /// `blocks.{l}.attn.hook_attn_scores`: scaled, masked scores before the softmax (−∞ where
    /// the causal mask hides a key). `[b, h, s, t]`
    AttnScores(usize),
    /// `blocks.{l}.attn.hook_pattern`: attention probabilities. `[b, h, s, t]`
    AttnPattern(usize),
    /// `blocks.{l}.attn.hook_z`: per-head attention output before `o_proj`. `[b, s, h, d_h]`
    AttnZ(usize),
    /// `blocks.{l}.ln1_post.hook_normalized`: the attention output's own norm before its
    /// weight, on families with sandwich norms (Gemma 2/3; TransformerLens' name). `[b, s, d]`
    Ln1PostNormalized(usize),
    /// `blocks.{l}.hook_attn_out`: the attention block's write into the stream (after the
    /// post-attention norm where the family has one). `[b, s, d]`
    AttnOut(usize),
    /// `blocks.{l}.hook_resid_mid`: the stream between attention and MLP. `[b, s, d]`
    ResidMid(usize),
    /// `blocks.{l}.ln2.hook_normalized`: the MLP's input norm before its weight. `[b, s, d]`
    Ln2Normalized(usize),
    /// `blocks.{l}.mlp.hook_post`: the gated activation `silu(gate) ⊙ up`, input to the down
    /// projection. `[b, s, d_mlp]`
    MlpPost(usize),
    /// `blocks.{l}.ln2_post.hook_normalized`: the MLP output's own norm before its weight
    /// (Gemma 2/3). `[b, s, d]`
    Ln2PostNormalized(usize),
    /// `blocks.{l}.hook_mlp_out`: the MLP's write into the stream (after the post-MLP norm
    /// where the family has one). `[b, s, d]`
    MlpOut(usize),
    /// `blocks.{l}.hook_resid_post`: the stream leaving block `l`. `[b, s, d]`
    ResidPost(usize),
    /// `ln_final.hook_normalized`: the final norm before its weight, as in TransformerLens
    /// (`x / rms(x)`). `[b, s, d]`
    LnFinal,
    /// `unembed.hook_in`: the final norm's output, weight applied: what the unembedding
    /// multiplies (TransformerLens has no name for it; with its weights folded it equals
    /// `ln_final.hook_normalized`). `[b, s, d]`
    UnembedIn,
}

/// Makes a per-layer point for a layer.
type PerLayer = fn(usize) -> HookPoint;

/// The per-layer kinds, by the short names `--hooks` takes.
const KINDS: &[(&str, PerLayer)] = &[
    ("resid_pre", HookPoint::ResidPre),
    ("ln1", HookPoint::Ln1Normalized),
    ("q", HookPoint::AttnQ),
    ("k", HookPoint::AttnK),
    ("v", HookPoint::AttnV),
    ("attn_scores", HookPoint::AttnScores),
    ("attn_pattern", HookPoint::AttnPattern),
    ("pattern", HookPoint::AttnPattern),
    ("attn_z", HookPoint::AttnZ),
    ("z", HookPoint::AttnZ),
    ("ln1_post", HookPoint::Ln1PostNormalized),
    ("attn_out", HookPoint::AttnOut),
    ("resid_mid", HookPoint::ResidMid),
    ("ln2", HookPoint::Ln2Normalized),
    ("mlp_post", HookPoint::MlpPost),
    ("ln2_post", HookPoint::Ln2PostNormalized),
    ("mlp_out", HookPoint::MlpOut),
    ("resid_post", HookPoint::ResidPost),
];

impl HookPoint {
    pub fn layer(self) -> Option<usize> {
        use HookPoint::*;
        match self {
            ResidPre(l) | Ln1Normalized(l) | AttnQ(l) | AttnK(l) | AttnV(l) | AttnScores(l)
            | AttnPattern(l) | AttnZ(l) | Ln1PostNormalized(l) | AttnOut(l) | ResidMid(l)
            | Ln2Normalized(l) | MlpPost(l) | Ln2PostNormalized(l) | MlpOut(l) | ResidPost(l) => {
                Some(l)
            }
            Embed | LnFinal | UnembedIn => None,
        }
    }

    /// True for points shaped like the residual stream `[b, s, d]` (where vectors can be
    /// added and directions projected out).
    pub fn is_residual_shaped(self) -> bool {
        use HookPoint::*;
        !matches!(
            self,
            AttnQ(_) | AttnK(_) | AttnV(_) | AttnScores(_) | AttnPattern(_) | AttnZ(_) | MlpPost(_)
        )
    }

    /// True for points whose key axis grows with the KV cache (`[b, h, s, t]`): captures over
    /// several cached passes cannot be concatenated.
    pub fn has_key_axis(self) -> bool {
        matches!(self, HookPoint::AttnScores(_) | HookPoint::AttnPattern(_))
    }

    fn from_kind(kind: &str, layer: usize) -> Option<Self> {
        KINDS
            .iter()
            .find(|(name, _)| *name == kind)
            .map(|(_, make)| make(layer))
    }

    /// Expands a user list like `resid_pre,attn_z,blocks.3.hook_mlp_out,ln_final` into points:
    /// a bare kind means that kind at every layer.
    pub fn parse_list(list: &str, n_layers: usize) -> Result<BTreeSet<HookPoint>> {
        let mut points = BTreeSet::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let kind = item.strip_prefix("hook_").unwrap_or(item);
            if HookPoint::from_kind(kind, 0).is_some() {
                points.extend((0..n_layers).filter_map(|l| HookPoint::from_kind(kind, l)));
                continue;
            }
            let point = match kind {
                "embed" => HookPoint::Embed,
                "ln_final" => HookPoint::LnFinal,
                "unembed_in" => HookPoint::UnembedIn,
                _ => item.parse()?,
            };
            if point.layer().is_some_and(|l| l >= n_layers) {
                return Err(Error::InvalidInput(format!(
                    "hook point {item} names a layer past the model's {n_layers} layers"
                )));
            }
            points.insert(point);
        }
        Ok(points)
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use HookPoint::*;
        match *self {
            Embed => write!(f, "hook_embed"),
            ResidPre(l) => write!(f, "blocks.{l}.hook_resid_pre"),
            Ln1Normalized(l) => write!(f, "blocks.{l}.ln1.hook_normalized"),
            AttnQ(l) => write!(f, "blocks.{l}.attn.hook_q"),
            AttnK(l) => write!(f, "blocks.{l}.attn.hook_k"),
            AttnV(l) => write!(f, "blocks.{l}.attn.hook_v"),
            AttnScores(l) => write!(f, "blocks.{l}.attn.hook_attn_scores"),
            AttnPattern(l) => write!(f, "blocks.{l}.attn.hook_pattern"),
            AttnZ(l) => write!(f, "blocks.{l}.attn.hook_z"),
            Ln1PostNormalized(l) => write!(f, "blocks.{l}.ln1_post.hook_normalized"),
            AttnOut(l) => write!(f, "blocks.{l}.hook_attn_out"),
            ResidMid(l) => write!(f, "blocks.{l}.hook_resid_mid"),
            Ln2Normalized(l) => write!(f, "blocks.{l}.ln2.hook_normalized"),
            MlpPost(l) => write!(f, "blocks.{l}.mlp.hook_post"),
            Ln2PostNormalized(l) => write!(f, "blocks.{l}.ln2_post.hook_normalized"),
            MlpOut(l) => write!(f, "blocks.{l}.hook_mlp_out"),
            ResidPost(l) => write!(f, "blocks.{l}.hook_resid_post"),
            LnFinal => write!(f, "ln_final.hook_normalized"),
            UnembedIn => write!(f, "unembed.hook_in"),
        }
    }
}

impl FromStr for HookPoint {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let invalid = || Error::InvalidHookPoint(s.to_string());
        match s {
            "hook_embed" => return Ok(HookPoint::Embed),
            "ln_final.hook_normalized" => return Ok(HookPoint::LnFinal),
            "unembed.hook_in" => return Ok(HookPoint::UnembedIn),
            _ => {}
        }
        let rest = s.strip_prefix("blocks.").ok_or_else(invalid)?;
        let (layer, name) = rest.split_once('.').ok_or_else(invalid)?;
        let layer: usize = layer.parse().map_err(|_| invalid())?;
        let kind = match name {
            "hook_resid_pre" => "resid_pre",
            "ln1.hook_normalized" => "ln1",
            "attn.hook_q" => "q",
            "attn.hook_k" => "k",
            "attn.hook_v" => "v",
            "attn.hook_attn_scores" => "attn_scores",
            "attn.hook_pattern" => "attn_pattern",
            "attn.hook_z" => "attn_z",
            "ln1_post.hook_normalized" => "ln1_post",
            "hook_attn_out" => "attn_out",
            "hook_resid_mid" => "resid_mid",
            "ln2.hook_normalized" => "ln2",
            "mlp.hook_post" => "mlp_post",
            "ln2_post.hook_normalized" => "ln2_post",
            "hook_mlp_out" => "mlp_out",
            "hook_resid_post" => "resid_post",
            _ => return Err(invalid()),
        };
        HookPoint::from_kind(kind, layer).ok_or_else(invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let per_layer = KINDS.iter().map(|(_, make)| make(3));
        for p in per_layer.chain([HookPoint::Embed, HookPoint::LnFinal, HookPoint::UnembedIn]) {
            assert_eq!(p.to_string().parse::<HookPoint>().unwrap(), p, "{p}");
        }
        assert!("blocks.x.hook_resid_pre".parse::<HookPoint>().is_err());
        assert!("blocks.1.hook_z".parse::<HookPoint>().is_err());
        assert!("blocks.1.attn.hook_resid_pre".parse::<HookPoint>().is_err());
        assert!("blocks.1.ln1.hook_scale".parse::<HookPoint>().is_err());
    }

    #[test]
    fn lists_expand_kinds_to_every_layer() {
        let pts = HookPoint::parse_list("resid_pre, blocks.1.attn.hook_z,ln_final,q", 3).unwrap();
        let want: BTreeSet<_> = [
            HookPoint::ResidPre(0),
            HookPoint::ResidPre(1),
            HookPoint::ResidPre(2),
            HookPoint::AttnQ(0),
            HookPoint::AttnQ(1),
            HookPoint::AttnQ(2),
            HookPoint::AttnZ(1),
            HookPoint::LnFinal,
        ]
        .into_iter()
        .collect();
        assert_eq!(pts, want);
        assert!(HookPoint::parse_list("blocks.3.hook_resid_pre", 3).is_err());
        assert!(HookPoint::parse_list("nonsense", 3).is_err());
    }
}
