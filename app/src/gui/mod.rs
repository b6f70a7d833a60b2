//! The GUI shell: lays panels out, keeps the [`Session`] they share current, and routes
//! worker events to the panel whose job they belong to. Panels keep their own view state;
//! the model and all computation live on the worker.

pub mod panels;
pub mod session;
pub mod sessions;
pub mod widgets;

use std::path::PathBuf;
use std::time::Duration;

use refusal_lens_engine::{default_model_path, LoadedModel};

use crate::worker::{Event, Job, Worker};
pub use panels::*;
pub use session::Session;
pub use sessions::SessionsPanel;

/// A collapsible section whose open state the shell keeps (an open one gets room).
fn section(ui: &mut egui::Ui, title: &str, open: &mut bool, body: impl FnOnce(&mut egui::Ui)) {
    let header = egui::CollapsingHeader::new(title)
        .open(Some(*open))
        .show(ui, body);
    if header.header_response.clicked() {
        *open ^= true;
    }
}

/// The views of the central area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tab {
    #[default]
    Reply,
    Cliff,
    Directions,
    Steering,
    Heads,
    Guard,
}

impl Tab {
    pub const ALL: [Tab; 6] = [
        Tab::Reply,
        Tab::Cliff,
        Tab::Directions,
        Tab::Steering,
        Tab::Heads,
        Tab::Guard,
    ];

    /// The tab bar's label (also what a session file records).
    pub fn name(self) -> &'static str {
        match self {
            Tab::Reply => "Prompt & reply",
            Tab::Cliff => "Cliff",
            Tab::Directions => "Directions",
            Tab::Steering => "Steering",
            Tab::Heads => "Head attribution",
            Tab::Guard => "Guard",
        }
    }

    pub fn from_name(name: &str) -> Option<Tab> {
        Tab::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// What the app opens at start.
pub enum Startup {
    /// A model file or folder, and the refusal-token adapter to apply on top (if any).
    Path {
        model: PathBuf,
        adapter: Option<PathBuf>,
    },
    /// A saved session (model, adapter, lens and settings).
    Session(PathBuf),
    /// Models built in memory (tests): the base and, optionally, its organism.
    Model {
        base: Box<LoadedModel>,
        organism: Option<Box<LoadedModel>>,
    },
}

pub struct RefusalLensApp {
    worker: Worker,
    /// The model in use, the lens and the intervention stack, shared by the panels.
    pub session: Session,
    pub model: ModelPanel,
    pub prompt_sets: PromptSetsPanel,
    pub reply: ReplyPanel,
    pub calibration: CalibrationPanel,
    pub training: TrainingPanel,
    /// Which of the bottom sections (calibration, fine-tuning) are open: an open one gets room
    /// for its plot however small the panel was left.
    bottom_open: [bool; 2],
    pub cliff: CliffPanel,
    pub directions: DirectionsPanel,
    pub steering: SteeringPanel,
    pub heads: HeadsPanel,
    pub guard: GuardPanel,
    pub sessions: SessionsPanel,
    pub tab: Tab,
    /// The last notice from a job that went on regardless (an unusable cache folder), shown
    /// in the status bar until dismissed.
    pub notice: Option<String>,
}

impl RefusalLensApp {
    /// `ctx` (when given) is repainted whenever the worker reports something.
    pub fn new(ctx: Option<egui::Context>, startup: Startup) -> Self {
        Self::with_cache_dir(ctx, startup, refusal_lens_engine::cache_dir())
    }

    /// [`RefusalLensApp::new`] keeping caches and trained adapters under `cache_dir`.
    pub fn with_cache_dir(
        ctx: Option<egui::Context>,
        startup: Startup,
        cache_dir: PathBuf,
    ) -> Self {
        let mut worker = Worker::spawn(move |event| {
            if let Some(ctx) = &ctx {
                // The UI repaints when something arrives, never on a timer: tokens coalesce
                // into at most ~30 frames/s, progress into 4 (each frame costs CPU the job
                // needs, ~100 ms of it under software rendering). A reply's first token,
                // which the user is waiting for, shows at once.
                let after = match event {
                    Event::Progress { .. } => 250,
                    Event::Token { step, .. } if step.index == 0 => 0,
                    _ => 33,
                };
                ctx.request_repaint_after(Duration::from_millis(after));
            }
        });
        let mut model = ModelPanel::default();
        let mut session = Session::new(cache_dir.clone());
        let session_file = match &startup {
            Startup::Session(path) => Some(path.clone()),
            _ => None,
        };
        match startup {
            Startup::Path {
                model: path,
                adapter,
            } => {
                session.adapter = adapter.clone();
                let id = worker.submit(Job::LoadModel {
                    path: path.clone(),
                    adapter,
                });
                model.loading(id, path);
            }
            Startup::Model { base, organism } => {
                worker.submit(Job::UseModel { base, organism });
            }
            Startup::Session(_) => {}
        }
        let mut app = RefusalLensApp {
            worker,
            sessions: SessionsPanel::new(&cache_dir),
            session,
            model,
            prompt_sets: PromptSetsPanel::with_bundled_sets(),
            reply: ReplyPanel::default(),
            calibration: CalibrationPanel::new(),
            bottom_open: [false; 2],
            training: TrainingPanel::default(),
            cliff: CliffPanel::default(),
            directions: DirectionsPanel::default(),
            steering: SteeringPanel::default(),
            heads: HeadsPanel::default(),
            guard: GuardPanel::default(),
            tab: Tab::default(),
            notice: None,
        };
        if let Some(path) = session_file {
            app.open_session_file(path);
        }
        app
    }

    /// Computes directions and probes from the loaded sets named harmful and harmless (what
    /// the Directions tab's button does with its default choice).
    pub fn compute_lens(&mut self) -> bool {
        let find = |name: &str| {
            self.prompt_sets
                .sets
                .iter()
                .find(|s| s.name == name)
                .cloned()
        };
        match (find("harmful"), find("harmless")) {
            (Some(a), Some(b)) => {
                self.directions
                    .start(&mut self.worker, &a, &b, self.session.activation_cache());
                true
            }
            _ => false,
        }
    }

    /// Runs the models on `device` (`cpu`, `cuda:N`, `metal:N`) from now on.
    pub fn use_device(&mut self, device: &str) {
        self.worker.submit(Job::UseDevice(device.to_string()));
    }

    fn drain_events(&mut self) {
        while let Some(event) = self.worker.try_recv() {
            let id = event.id();
            // A job's end: a chain of jobs (a session being restored) waits for it, not for
            // its first result (a model load also sends the shipped lens after the model).
            let finished = matches!(event, Event::Done { .. } | Event::Failed { .. });
            let failure = match &event {
                Event::Failed { error, .. } => Some(error.clone()),
                _ => None,
            };
            match event {
                Event::ModelLoaded {
                    ref card,
                    ref organism,
                    organism_active,
                    load_seconds,
                    ..
                } => {
                    // The gate starts at the model's calibrated τ.
                    self.reply.tau = card.gate_tau();
                    self.session.refusal_tokens = organism_active;
                    self.session.has_adapter = organism.is_some();
                    self.session.reasoning = card.reasoning;
                    if load_seconds.is_some() {
                        // A newly loaded model renders without thinking until asked.
                        self.session.thinking = false;
                    }
                    // Directions and probes belong to one model: the worker drops them too.
                    self.session.model_changed();
                    self.directions.clear();
                    self.cliff.clear();
                    self.steering.clear();
                    self.heads.clear();
                    self.guard.clear();
                    self.model.on_event(event)
                }
                Event::LensReady {
                    ref directions,
                    ref probes,
                    ref file,
                    ..
                } => {
                    self.session.directions = Some(directions.clone());
                    self.session.probes = probes.clone();
                    self.session.lens_file = file.clone();
                    // New directions: steered replies made with the old ones are stale.
                    self.steering.clear();
                    self.directions.on_event(event)
                }
                // Head metrics shipped with the app arrive with the model, owned by no job.
                Event::HeadsReady { id, metrics } if !self.heads.owns_id(id) => {
                    self.heads.metrics.get_or_insert(*metrics);
                }
                Event::Notice { text, .. } => self.notice = Some(text),
                other if self.model.owns(&other) => self.model.on_event(other),
                other if self.cliff.owns(&other) => self.cliff.on_event(other),
                other if self.steering.owns(&other) => self.steering.on_event(other),
                other if self.heads.owns(&other) => self.heads.on_event(other),
                other if self.guard.owns(&other) => self.guard.on_event(other),
                other if self.directions.owns(&other) => self.directions.on_event(other),
                other if self.calibration.owns(&other) => self.calibration.on_event(&other),
                other if self.training.owns(&other) => self.training.on_event(&other),
                other if self.reply.owns(&other) => self.reply.on_event(other),
                Event::Failed { error, .. } => self.reply.show_error(error),
                _ => {} // events of superseded or forgotten jobs
            }
            self.after_event(id, finished, failure.as_deref());
        }
        self.session.model_ready = self.model.is_ready();
    }

    /// Draws the whole window into `ui`.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        self.drain_events();
        if let Some(on) = self.model.take_requested_organism() {
            self.worker.submit(Job::UseOrganism(on));
        }
        if let Some(device) = self.model.take_requested_device() {
            self.use_device(&device);
        }
        if let Some(path) = self.model.take_requested_open() {
            self.reply.clear();
            self.session.adapter = None;
            let id = self.worker.submit(Job::LoadModel {
                path: path.clone(),
                adapter: None,
            });
            self.model.loading(id, path);
        }
        egui::Panel::bottom("status").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.label(self.model.status_line());
                ui.separator();
                ui.label(self.reply.status_line());
                if let Some(notice) = &self.notice {
                    ui.separator();
                    ui.colored_label(ui.visuals().warn_fg_color, notice);
                    if ui.small_button("Dismiss").clicked() {
                        self.notice = None;
                    }
                }
            });
        });
        egui::Panel::left("model")
            .resizable(true)
            .default_size(300.0)
            .min_size(220.0)
            .max_size(480.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| {
                    self.sessions_ui(ui);
                    ui.separator();
                    self.model.ui(ui);
                    ui.separator();
                    if let Some(prompt) = self.prompt_sets.ui(ui) {
                        self.reply.prompt = prompt;
                    }
                });
            });
        self.bottom_sections(ui);
        // The sliders' edits hold whichever tab is shown; the main reply runs under the
        // intervention stack when the Steering tab says so.
        self.session.controls = self
            .steering
            .control_stack(self.session.directions.as_deref());
        self.reply.steering = if self.session.steer_main_reply {
            self.session.stack()
        } else {
            Default::default()
        };
        self.request_trajectory();
        egui::CentralPanel::default().show(ui, |ui| self.central(ui));
        // Worker events repaint by themselves; answers from other threads (file dialogs,
        // session files) are polled.
        if self.waits_off_worker() {
            ui.ctx().request_repaint_after(Duration::from_millis(100));
        }
    }

    /// Calibration and fine-tuning, each in a collapsible section.
    fn bottom_sections(&mut self, ui: &mut egui::Ui) {
        let room = if self.bottom_open.contains(&true) {
            ui.available_height() * 0.5
        } else {
            0.0
        };
        egui::Panel::bottom("calibration")
            .resizable(true)
            .min_size(room)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| {
                    let ready = self.session.model_ready;
                    let (tau, goal) = (self.reply.tau, self.model.gate_goal());
                    let (worker, sets) = (&mut self.worker, &self.prompt_sets.sets);
                    let title = "Calibration: refusal rate vs threshold τ";
                    section(ui, title, &mut self.bottom_open[0], |ui| {
                        self.calibration.ui(ui, worker, sets, ready, tau, goal)
                    });
                    section(
                        ui,
                        "Refusal-token fine-tuning",
                        &mut self.bottom_open[1],
                        |ui| {
                            let cache_dir = &self.session.cache_dir;
                            self.training.ui(ui, worker, sets, ready, cache_dir)
                        },
                    );
                });
            });
    }

    /// A finished reply (or new directions, or another layer) gets its trajectory scored.
    fn request_trajectory(&mut self) {
        let finished = self.reply.take_finished();
        let rescore = self.directions.take_changed();
        if self.session.directions.is_none() {
            return;
        }
        let request = finished.or_else(|| rescore.then(|| self.reply.last_finished()).flatten());
        if let Some((request, reply)) = request {
            let layer = self.directions.curve_layer(&self.session);
            self.cliff.request(
                &mut self.worker,
                request.system,
                request.prompt,
                reply,
                request.steering,
                layer,
            );
        }
    }

    /// The tabs and the chosen tab's panel.
    fn central(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            for tab in Tab::ALL {
                ui.selectable_value(&mut self.tab, tab, tab.name());
            }
        });
        ui.separator();
        let session = &mut self.session;
        let sets = &self.prompt_sets.sets;
        let worker = &mut self.worker;
        egui::ScrollArea::vertical()
            .id_salt("central")
            .show(ui, |ui| match self.tab {
                Tab::Reply => self.reply.ui(ui, worker, session),
                Tab::Cliff => self.cliff.ui(ui),
                Tab::Directions => self.directions.ui(ui, worker, session, sets),
                Tab::Steering => {
                    let base = self.reply.request();
                    self.steering.ui(ui, worker, session, &base, sets)
                }
                Tab::Heads => {
                    let base = self.reply.request();
                    self.heads.ui(ui, worker, session, sets, &base)
                }
                Tab::Guard => self.guard.ui(ui, worker, session, sets, &self.reply.prompt),
            });
        // A point clicked in the Guard tab's 2-D view becomes the prompt to study.
        if let Some(prompt) = self.guard.take_clicked() {
            self.reply.prompt = prompt;
            self.tab = Tab::Reply;
        }
    }

    /// True while an answer is awaited from a thread other than the worker's (a file dialog,
    /// a session being read or written).
    fn waits_off_worker(&self) -> bool {
        widgets::dialog::any_waiting()
    }

    /// True while anything is in flight.
    pub fn is_busy(&self) -> bool {
        self.reply.is_running()
            || self.model.is_busy()
            || self.prompt_sets.is_busy()
            || self.calibration.is_running()
            || self.training.is_running()
            || self.directions.is_running()
            || self.cliff.is_running()
            || self.steering.is_running()
            || self.heads.is_running()
            || self.guard.is_running()
            || self.sessions.is_busy()
    }
}

impl eframe::App for RefusalLensApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }
}

/// Opens the main window on `model` (default: the cached default model).
pub fn run(choice: crate::cli::ModelChoice) -> anyhow::Result<()> {
    let adapter = choice.adapter_dir();
    let startup = match choice.session_path {
        Some(session) => Startup::Session(session),
        None => Startup::Path {
            model: choice.model.unwrap_or_else(default_model_path),
            adapter,
        },
    };
    // A device this build or machine lacks fails here, before a window opens.
    let device = choice.device.clone();
    refusal_lens_engine::device::parse_device(&device)?;
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Refusal Lens")
            .with_inner_size([1200.0, 780.0])
            .with_min_inner_size([640.0, 420.0]),
        ..Default::default()
    };
    eframe::run_native(
        "Refusal Lens",
        options,
        Box::new(move |cc| {
            let mut app = RefusalLensApp::new(Some(cc.egui_ctx.clone()), startup);
            if device != "cpu" {
                app.use_device(&device);
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))
}
