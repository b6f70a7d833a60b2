//! Refusal Lens application: the egui GUI and the headless CLI over one worker.

pub mod cli;
pub mod gui;
pub mod heads_cli;
pub mod lens_cli;
pub mod steer_cli;
pub mod worker;
