//! Residual-stream states of a whole prompt set at the positions the analyses read (t_inst
//! and the last prompt positions up to t_post), at every layer, from one forward pass per
//! prompt. Directions, probes and layer choices all read these, so trying another layer or
//! position costs no new forward pass; sets are also cached on disk by model fingerprint.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::tensorfile::{self, Array};
use crate::hooks::{HookPoint, HookSpec};
use crate::refusal::RefusalSignal;
use crate::run::batch::for_each_prompt;
use crate::{Error, LoadedModel, Result};

/// Probes read at least this many final prompt positions ("mean of the last 3").
const MIN_TAIL: usize = 3;
/// Bump when the cache layout changes.
const CACHE_VERSION: u32 = 2;

/// The residual states an analysis can read: `x_l` entering each block (`resid_pre`), then
/// the stream after the last block (`x_L`). Index `l` of every per-layer array means this.
pub fn state_points(n_layers: usize) -> Vec<HookPoint> {
    (0..n_layers)
        .map(HookPoint::ResidPre)
        .chain(n_layers.checked_sub(1).map(HookPoint::ResidPost))
        .collect()
}

/// The TransformerLens name of residual state `l`.
pub fn state_name(l: usize, n_layers: usize) -> String {
    state_points(n_layers)
        .get(l)
        .map_or_else(|| format!("state {l}"), |p| p.to_string())
}

/// What a probe reads from one prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Feature {
    /// The state at t_post.
    #[default]
    TPost,
    /// The mean of the states at the last three prompt positions.
    MeanLast3,
}

impl std::str::FromStr for Feature {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "t-post" | "t_post" => Ok(Feature::TPost),
            "last3" | "mean-last3" => Ok(Feature::MeanLast3),
            _ => Err(Error::InvalidInput(format!(
                "unknown probe feature `{s}` (use t-post or last3)"
            ))),
        }
    }
}

/// States of `n` prompts: for each, t_inst and the last `n_tail` prompt positions (ending
/// at t_post), at each of `n_states` residual states.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetActivations {
    pub n_states: usize,
    pub d_model: usize,
    pub n_tail: usize,
    /// How many of the tail positions are post-instruction template tokens (t_post included).
    pub n_post: usize,
    /// `[n, 1 + n_tail, n_states, d]`: role 0 is t_inst, role `1 + j` is tail position `j`.
    #[serde(skip)]
    pub states: Vec<f32>,
    /// The model's refusal probability at t_post (`p([refuse])` or `P(R)`).
    pub refusal_probability: Vec<f32>,
}

impl SetActivations {
    pub fn len(&self) -> usize {
        self.refusal_probability.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn roles(&self) -> usize {
        1 + self.n_tail
    }

    fn row(&self, prompt: usize, role: usize, layer: usize) -> &[f32] {
        let d = self.d_model;
        let start = ((prompt * self.roles() + role) * self.n_states + layer) * d;
        &self.states[start..start + d]
    }

    /// `x_layer[t_inst]` of one prompt.
    pub fn t_inst(&self, prompt: usize, layer: usize) -> &[f32] {
        self.row(prompt, 0, layer)
    }

    /// The state `back` positions before t_post (0 is t_post itself).
    pub fn before_t_post(&self, prompt: usize, back: usize, layer: usize) -> &[f32] {
        assert!(
            back < self.n_tail,
            "only {} tail positions kept",
            self.n_tail
        );
        self.row(prompt, self.n_tail - back, layer)
    }

    /// The probe input of one prompt at `layer`.
    pub fn feature(&self, prompt: usize, layer: usize, feature: Feature) -> Vec<f32> {
        match feature {
            Feature::TPost => self.before_t_post(prompt, 0, layer).to_vec(),
            Feature::MeanLast3 => {
                let mut mean = vec![0.0f32; self.d_model];
                for back in 0..MIN_TAIL {
                    for (m, v) in mean.iter_mut().zip(self.before_t_post(prompt, back, layer)) {
                        *m += v / MIN_TAIL as f32;
                    }
                }
                mean
            }
        }
    }

    /// The prompts where `keep` is true, in order.
    pub fn select(&self, keep: &[bool]) -> SetActivations {
        let block = self.roles() * self.n_states * self.d_model;
        let mut out = SetActivations {
            states: Vec::new(),
            refusal_probability: Vec::new(),
            ..self.clone_shape()
        };
        for (i, _) in keep
            .iter()
            .enumerate()
            .filter(|(_, k)| **k)
            .take(self.len())
        {
            out.states
                .extend_from_slice(&self.states[i * block..(i + 1) * block]);
            out.refusal_probability.push(self.refusal_probability[i]);
        }
        out
    }

    fn clone_shape(&self) -> SetActivations {
        SetActivations {
            n_states: self.n_states,
            d_model: self.d_model,
            n_tail: self.n_tail,
            n_post: self.n_post,
            states: Vec::new(),
            refusal_probability: Vec::new(),
        }
    }
}

/// Runs every prompt (rendered with the model's chat template) once, keeping the states at
/// t_inst and the prompt's last positions at every layer, and the refusal probability at t_post.
pub fn collect(
    lm: &LoadedModel,
    prompts: &[&str],
    system: Option<&str>,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SetActivations> {
    if prompts.is_empty() {
        return Err(Error::InvalidInput("the prompt set is empty".into()));
    }
    let chats = prompts
        .iter()
        .map(|p| lm.chat_prompt(system, p))
        .collect::<Result<Vec<_>>>()?;
    let n_post = chats
        .iter()
        .map(|c| c.post_instruction.len())
        .min()
        .unwrap_or(0);
    if n_post == 0 {
        return Err(Error::InvalidInput(
            "the chat template leaves no post-instruction token".into(),
        ));
    }
    let n_tail = n_post.max(MIN_TAIL);
    if let Some(c) = chats.iter().find(|c| c.t_post + 1 < n_tail) {
        return Err(Error::InvalidInput(format!(
            "the prompt `{}` is shorter than {n_tail} tokens",
            c.text
        )));
    }
    // Keep every position we read out of the shared prefix, so each prompt's own pass has it.
    let max_shared = chats
        .iter()
        .map(|c| c.t_inst.min(c.t_post + 1 - n_tail))
        .min()
        .unwrap_or(0);

    let cfg = &lm.model.config;
    let points = state_points(cfg.n_layers);
    let signal = RefusalSignal::for_model(lm)?;
    let ids: Vec<Vec<u32>> = chats.iter().map(|c| c.ids.clone()).collect();
    let mut out = SetActivations {
        n_states: points.len(),
        d_model: cfg.d_model,
        n_tail,
        n_post,
        states: Vec::with_capacity(prompts.len() * (1 + n_tail) * points.len() * cfg.d_model),
        refusal_probability: Vec::with_capacity(prompts.len()),
    };
    let mut rows = vec![Vec::new(); points.len()];
    for_each_prompt(
        lm,
        &lm.model.dense,
        &ids,
        max_shared,
        &HookSpec::capture(points.iter().copied().chain([HookPoint::UnembedIn])),
        cancelled,
        progress,
        &mut |pass| {
            let (c, offset) = (&chats[pass.index], pass.offset);
            let wanted: Vec<u32> = std::iter::once(c.t_inst)
                .chain(c.t_post + 1 - n_tail..=c.t_post)
                .map(|p| (p - offset) as u32)
                .collect();
            let wanted = Tensor::new(wanted.as_slice(), lm.model.device())?;
            for (point, rows) in points.iter().zip(rows.iter_mut()) {
                let x = pass.capture(*point)?;
                *rows = x.index_select(&wanted, 0)?.to_vec2::<f32>()?;
            }
            for role in 0..=n_tail {
                for rows in &rows {
                    out.states.extend_from_slice(&rows[role]);
                }
            }
            let logits = pass.last_logits()?;
            let logprobs =
                candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?.to_vec1::<f32>()?;
            out.refusal_probability.push(signal.probability(&logprobs));
            Ok(())
        },
    )?;
    Ok(out)
}

/// Where [`collect_cached`] keeps sets: `<cache_dir>/activations`.
pub fn default_cache_dir() -> PathBuf {
    crate::cache_dir().join("activations")
}

/// Whether `dir` can hold cache entries: it is created if missing, and a probe file is
/// written, renamed and removed there. The error is one line for the user (a read-only or
/// full disk, a file in the way); callers then work without the cache, which only costs time.
pub fn check_cache_dir(dir: &Path) -> std::result::Result<(), String> {
    let unusable = |e: std::io::Error| {
        format!(
            "the activation cache folder {} cannot be written ({e}); working without the cache",
            dir.display()
        )
    };
    std::fs::create_dir_all(dir).map_err(unusable)?;
    let probe = dir.join(format!(".write-check-{}", std::process::id()));
    let renamed = probe.with_extension("done");
    let result = std::fs::write(&probe, [0u8; 4096])
        .and_then(|()| std::fs::rename(&probe, &renamed))
        .and_then(|()| std::fs::remove_file(&renamed));
    let _ = std::fs::remove_file(&probe);
    result.map_err(unusable)
}

#[derive(Serialize, Deserialize)]
struct CacheMeta {
    version: u32,
    key: String,
    set: SetActivations,
    /// SHA-256 of the states' bytes: a damaged entry is recomputed, never used.
    states_sha256: String,
}

fn states_sha256(states: &[f32]) -> String {
    let mut h = Sha256::new();
    for v in states {
        h.update(v.to_le_bytes());
    }
    format!("{:x}", h.finalize())
}

/// [`collect`], reading the result from `cache` when the same model (by fingerprint), system
/// prompt and prompts were collected before, and writing it there otherwise.
pub fn collect_cached(
    lm: &LoadedModel,
    prompts: &[&str],
    system: Option<&str>,
    cache: Option<&Path>,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SetActivations> {
    let Some(dir) = cache else {
        return collect(lm, prompts, system, cancelled, progress);
    };
    let mut h = Sha256::new();
    h.update(format!("v{CACHE_VERSION}\0{}\0", lm.fingerprint()?));
    h.update(system.unwrap_or("\u{1}default"));
    for p in prompts {
        h.update([0u8]);
        h.update(p.as_bytes());
    }
    let key = format!("{:x}", h.finalize());
    let path = dir.join(format!("{}.safetensors", &key[..32]));
    if let Ok((mut arrays, meta)) = tensorfile::load::<CacheMeta>(&path) {
        if meta.version == CACHE_VERSION && meta.key == key {
            let s = &meta.set;
            let shape = [s.len(), 1 + s.n_tail, s.n_states, s.d_model];
            if let Ok(states) = tensorfile::take(&mut arrays, &path, "states", &shape) {
                if states_sha256(&states) == meta.states_sha256 {
                    progress(prompts.len(), prompts.len());
                    return Ok(SetActivations { states, ..meta.set });
                }
            }
        }
    }
    let set = collect(lm, prompts, system, cancelled, progress)?;
    let shape = vec![set.len(), 1 + set.n_tail, set.n_states, set.d_model];
    let meta = CacheMeta {
        version: CACHE_VERSION,
        key,
        set: set.clone_shape_with_probabilities(),
        states_sha256: states_sha256(&set.states),
    };
    // A cache that cannot be written only costs time next run ([`check_cache_dir`] tells the
    // user up front when the folder is unusable; a disk that fills up during a run is silent).
    let _ = tensorfile::save(
        &path,
        &[Array::new("states", shape, set.states.clone())],
        &meta,
    );
    Ok(set)
}

impl SetActivations {
    fn clone_shape_with_probabilities(&self) -> SetActivations {
        SetActivations {
            refusal_probability: self.refusal_probability.clone(),
            ..self.clone_shape()
        }
    }
}

#[cfg(test)]
mod cache_dir_tests {
    use super::check_cache_dir;

    #[test]
    fn a_writable_folder_passes_and_a_blocked_one_says_why_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("cache");
        check_cache_dir(&ok).unwrap();
        assert_eq!(
            std::fs::read_dir(&ok).unwrap().count(),
            0,
            "no probe left behind"
        );
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = check_cache_dir(&file.join("cache")).unwrap_err();
        assert!(
            err.contains("cannot be written") && !err.contains('\n'),
            "{err}"
        );
        #[cfg(unix)]
        if !is_root() {
            use std::os::unix::fs::PermissionsExt;
            let ro = dir.path().join("read-only");
            std::fs::create_dir(&ro).unwrap();
            std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
            assert!(check_cache_dir(&ro).is_err());
        }
    }

    /// Root writes into read-only folders, so that case is only checked for other users.
    #[cfg(unix)]
    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false)
    }
}
