//! The model: loading checkpoints (GGUF, HF folders), tokenizer and chat template, weights in
//! two precisions, and the one forward pass with hook points that everything shares.

pub mod chat;
pub mod config;
mod forward;
mod linear;
mod loaded;
pub mod loader;
pub mod matmul;
pub mod tokenizer;
pub(crate) mod weights;

pub use forward::{softcap, ForwardOptions, ForwardOutput, LogitsAt, Model};
pub use linear::Linear;
pub use loaded::{LoadedModel, RespondBlocks};
pub use weights::{
    BlockWeights, Embedding, ExactWeights, FastPrecision, KernelTier, KvCache, Weights,
};

#[cfg(test)]
mod tests;
