//! Refusal as the product reads it: the signal at the first reply position and its score,
//! the gate of a model with refusal tokens and its calibration, and response modes.

pub mod calibration;
pub mod gate;
pub mod response;
pub mod signal;

pub use calibration::*;
pub use gate::*;
pub use signal::*;
