//! The panels: each keeps its own view state, sends jobs and draws their results.

pub mod calibration;
pub mod cliff;
pub mod compare;
pub mod directions;
pub mod guard;
pub mod heads;
pub mod model;
pub mod prompt_sets;
pub mod reply;
pub mod steering;
pub mod training;

pub use calibration::CalibrationPanel;
pub use cliff::CliffPanel;
pub use directions::DirectionsPanel;
pub use guard::GuardPanel;
pub use heads::HeadsPanel;
pub use model::{ModelPanel, ModelState};
pub use prompt_sets::PromptSetsPanel;
pub use reply::ReplyPanel;
pub use steering::SteeringPanel;
pub use training::TrainingPanel;
