//! Running the model: generation (one reply, or many batched) and the batched prompt runner
//! every analysis of prompts' states uses.

pub mod batch;
pub mod generate;
