//! Analyses: small modules that read (and edit) the hooked forward pass.

pub mod abliterate;
pub mod activations;
pub mod compare;
pub mod directions;
pub mod guard;
pub mod heads;
pub mod lens;
pub mod probe;
pub mod steering;
pub mod trajectory;
