//! What the panels share, kept current by the shell: the model in use, the lens (directions
//! and probes) and the intervention stack. Panels read it (and the Steering and Heads tabs
//! edit the stack) instead of reaching into each other.

use std::path::PathBuf;
use std::sync::Arc;

use refusal_lens_engine::analysis::directions::Directions;
use refusal_lens_engine::analysis::probe::ProbeSet;
use refusal_lens_engine::analysis::steering::{Edit, Steering};

pub struct Session {
    /// The per-user folder for caches and trained adapters.
    pub cache_dir: PathBuf,
    /// A model is loaded and idle enough to take jobs.
    pub model_ready: bool,
    /// The model in use has refusal tokens (the organism is on).
    pub refusal_tokens: bool,
    /// An adapted model (the organism) is loaded beside the base, in use or not.
    pub has_adapter: bool,
    /// The directions and probes of the model in use …
    pub directions: Option<Arc<Directions>>,
    pub probes: Option<Arc<ProbeSet>>,
    /// … and the file they were loaded from (None: computed in the app).
    pub lens_file: Option<PathBuf>,
    /// The adapter folder loaded beside the model, if any (what a saved session names).
    pub adapter: Option<PathBuf>,
    /// The edits the Steering tab's sliders and switches make (set by it every frame).
    pub controls: Steering,
    /// Edits added elsewhere (head ablations clicked in the heatmap), after the controls.
    pub extra_edits: Vec<Edit>,
    /// Run the main reply (and so its Cliff trajectory) under the stack.
    pub steer_main_reply: bool,
    /// The model in use is a reasoning model (its template knows thinking) …
    pub reasoning: bool,
    /// … and its prompts are rendered with thinking on.
    pub thinking: bool,
}

impl Session {
    pub fn new(cache_dir: PathBuf) -> Session {
        Session {
            cache_dir,
            model_ready: false,
            refusal_tokens: false,
            has_adapter: false,
            directions: None,
            probes: None,
            lens_file: None,
            adapter: None,
            controls: Steering::default(),
            extra_edits: Vec::new(),
            steer_main_reply: false,
            reasoning: false,
            thinking: false,
        }
    }

    /// Where activations collected for directions and probes are cached.
    pub fn activation_cache(&self) -> PathBuf {
        self.cache_dir.join("activations")
    }

    /// The intervention stack: the controls' edits, then the extra edits.
    pub fn stack(&self) -> Steering {
        let mut s = self.controls.clone();
        s.edits.extend(self.extra_edits.iter().cloned());
        s
    }

    /// Forgets what belonged to the previous model.
    pub fn model_changed(&mut self) {
        self.directions = None;
        self.probes = None;
        self.lens_file = None;
    }
}
