//! Engine errors. Every variant renders as one line a user can act on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid GGUF model: {reason}")]
    CorruptModel { path: PathBuf, reason: String },
    #[error(
        "unsupported model architecture `{0}` (supported: llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3)"
    )]
    UnsupportedArchitecture(String),
    #[error("{path} holds {type_name} tensors, which this build cannot read; re-quantise the model with llama.cpp to Q4_K_M (llama-quantize MODEL-F16.gguf OUT.gguf Q4_K_M)")]
    UnsupportedTensorType { path: PathBuf, type_name: String },
    #[error("{path} needs about {need_gb:.1} GB of memory ({plan}) but {available_gb:.1} GB is available; close other programs, open a smaller quantisation, or keep the exact weights stored (--exact-weights stored)")]
    TooLarge {
        path: PathBuf,
        need_gb: f64,
        available_gb: f64,
        plan: String,
    },
    #[error(
        "the default model is not at {path}; fetch it with `{fetch}` (from the repository root)"
    )]
    DefaultModelMissing { path: PathBuf, fetch: &'static str },
    #[error("{path} is missing {what}")]
    MissingFile { path: PathBuf, what: String },
    #[error("model metadata: {0}")]
    Metadata(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("the prompt has {len} tokens but the model's context holds {max}")]
    ContextOverflow { len: usize, max: usize },
    #[error("invalid hook point `{0}` (expected e.g. blocks.3.hook_resid_pre, blocks.3.attn.hook_z, ln_final.hook_normalized)")]
    InvalidHookPoint(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("cancelled")]
    Cancelled,
    #[error("tensor computation failed: {}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// candle's message without the backtrace it attaches when `RUST_BACKTRACE` is set, so every
/// error stays one line.
pub(crate) fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}
