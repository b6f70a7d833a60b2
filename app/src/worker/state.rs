//! What the worker holds between jobs: the models and the lens (directions and probes) of
//! the model in use.

use std::sync::Arc;

use candle_core::Device;

use refusal_lens_engine::analysis::directions::Directions;
use refusal_lens_engine::analysis::probe::ProbeSet;
use refusal_lens_engine::{Error, LoadedModel, Result};

use super::protocol::{Event, JobId, OrganismInfo};

/// The directions and probes of the model in use (dropped when the model changes).
#[derive(Default)]
pub(super) struct Lens {
    pub directions: Option<Arc<Directions>>,
    pub probes: Option<Arc<ProbeSet>>,
}

/// The models the worker holds: the base, optionally an adapted one, and which is in use.
pub(super) struct State {
    pub base: Option<LoadedModel>,
    pub organism: Option<(LoadedModel, OrganismInfo)>,
    pub use_organism: bool,
    pub lens: Lens,
    /// SHA-256 of the base model's file, once computed (it picks the shipped lens).
    pub model_sha256: Option<String>,
    /// Where models run (they load on the CPU, then move here).
    pub device: Device,
}

impl Default for State {
    fn default() -> State {
        State {
            base: None,
            organism: None,
            use_organism: false,
            lens: Lens::default(),
            model_sha256: None,
            device: Device::Cpu,
        }
    }
}

impl State {
    /// The model in use, or the error every job that needs one reports.
    pub fn active(&self) -> Result<&LoadedModel> {
        match (&self.organism, self.use_organism) {
            (Some((m, _)), true) => Ok(m),
            _ => self
                .base
                .as_ref()
                .ok_or_else(|| Error::InvalidInput("no model is loaded".into())),
        }
    }

    /// The other of base and organism: the model in use with its adapter taken off or put on.
    pub fn counterpart(&self) -> Result<&LoadedModel> {
        match (&self.organism, &self.base, self.use_organism) {
            (Some(_), Some(base), true) => Ok(base),
            (Some((organism, _)), _, false) => Ok(organism),
            _ => Err(Error::InvalidInput(
                "no adapter is loaded: load the organism or an adapter, or compare with a model file".into(),
            )),
        }
    }

    /// The directions of the model in use, or the error jobs that need them report.
    pub fn directions(&self) -> Result<&Arc<Directions>> {
        self.lens
            .directions
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("compute or load directions first".into()))
    }

    /// The event that announces the model in use.
    pub fn loaded_event(&self, id: JobId, load_seconds: Option<f64>) -> Option<Event> {
        let active = self.active().ok()?;
        let mut card = active.card.clone();
        // The template in use decides (it may have been set after the card was made).
        card.reasoning = active.template.supports_thinking();
        Some(Event::ModelLoaded {
            id,
            card: Box::new(card),
            load_seconds,
            organism: self.organism.as_ref().map(|(_, info)| info.clone()),
            organism_active: self.use_organism && self.organism.is_some(),
        })
    }
}
