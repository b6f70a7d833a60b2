//! Refusal-token fine-tuning (Jain et al., "Refusal Tokens", arXiv:2412.06748): teach a model to begin each reply with
//! `[refuse]` or `[respond]`, then calibrate the threshold on `p([refuse])` at inference.
//!
//! Two phases (docs/methods.md, "Refusal tokens"):
//! 1. the two new vocabulary rows, fitted as a probe inside the unembedding on the final
//!    normalised state at t_post (cross-entropy over the whole vocabulary; `fit_token_rows`);
//! 2. LoRA on q, k, v, o of every layer plus the rows, with AdamW on the f32 forward pass and
//!    candle autograd: harmful → `[refuse]` + a refusal reply, harmless and borderline →
//!    `[respond]` + the base model's own greedy reply (self-distillation keeps its behaviour).
//!    Loss on reply tokens only, the first reply token weighted ×10 (without it the decision is
//!    ~1/40 of the loss).

mod adapter;
mod examples;
mod row_fit;
mod training;

pub use adapter::*;
pub use examples::trained_refusals;
pub use row_fit::*;
pub use training::*;
