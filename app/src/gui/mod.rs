//! The GUI shell: lays panels out and routes worker events to them. Panels keep their own
//! view state; the model and all computation live on the worker.

mod calibration_panel;
mod cliff_panel;
mod colors;
mod directions_panel;
mod export;
mod heads_panel;
mod model_panel;
mod prompt_sets_panel;
mod reply_panel;
mod steering_panel;
mod training_panel;

use std::path::PathBuf;
use std::time::Duration;

use refusal_lens_engine::{default_model_path, LoadedModel};

use crate::worker::{Event, Worker};
pub use calibration_panel::CalibrationPanel;
pub use cliff_panel::CliffPanel;
pub use directions_panel::DirectionsPanel;
pub use heads_panel::HeadsPanel;
pub use model_panel::{ModelPanel, ModelState};
pub use prompt_sets_panel::PromptSetsPanel;
pub use reply_panel::ReplyPanel;
pub use steering_panel::SteeringPanel;
pub use training_panel::TrainingPanel;

/// A job's progress bar (`done / total`, with `text`) and its Cancel button; true when
/// Cancel was clicked.
pub(crate) fn progress_with_cancel(
    ui: &mut egui::Ui,
    done: usize,
    total: usize,
    text: String,
) -> bool {
    ui.add(
        egui::ProgressBar::new(done as f32 / total.max(1) as f32)
            .desired_width(220.0)
            .text(text),
    );
    ui.button("Cancel").clicked()
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
}

/// What the app opens at start.
pub enum Startup {
    /// A model file or folder, and the refusal-token adapter to apply on top (if any).
    Path {
        model: PathBuf,
        adapter: Option<PathBuf>,
    },
    /// Models built in memory (tests): the base and, optionally, its organism.
    Model {
        base: Box<LoadedModel>,
        organism: Option<Box<LoadedModel>>,
    },
}

pub struct RefusalLensApp {
    worker: Worker,
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
    pub tab: Tab,
}

impl RefusalLensApp {
    /// `ctx` (when given) is repainted whenever the worker reports something.
    pub fn new(ctx: Option<egui::Context>, startup: Startup) -> Self {
        let worker = Worker::spawn(move || {
            if let Some(ctx) = &ctx {
                // Coalesce bursts of token events into at most ~30 frames/s: repainting on
                // every token would take CPU from generation on software renderers.
                ctx.request_repaint_after(Duration::from_millis(33));
            }
        });
        let mut model = ModelPanel::default();
        match startup {
            Startup::Path {
                model: path,
                adapter,
            } => {
                model.state = ModelState::Loading(path.clone());
                worker.load_model(path, adapter);
            }
            Startup::Model { base, organism } => {
                worker.send(crate::worker::Job::UseModel { base, organism })
            }
        }
        RefusalLensApp {
            worker,
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
            tab: Tab::default(),
        }
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
                self.directions.start(&mut self.worker, &a, &b);
                true
            }
            _ => false,
        }
    }

    fn drain_events(&mut self) {
        while let Some(event) = self.worker.try_recv() {
            match event {
                Event::ModelLoaded { ref card, .. } => {
                    // The gate starts at the model's calibrated τ.
                    self.reply.tau = card.gate_tau();
                    // Directions and probes belong to one model: the worker drops them too.
                    self.directions.clear();
                    self.cliff.clear();
                    self.steering.clear();
                    self.heads.clear();
                    self.model.on_event(event)
                }
                Event::ModelLoading { .. } | Event::ModelFailed { .. } => {
                    self.model.on_event(event)
                }
                other if self.cliff.owns(&other) => self.cliff.on_event(other),
                other if self.steering.owns(&other) => self.steering.on_event(other),
                other if self.heads.owns(&other) => self.heads.on_event(other),
                Event::LensReady { .. } => {
                    // New directions: steered replies made with the old ones are stale.
                    self.steering.clear();
                    self.directions.on_event(event)
                }
                other if self.directions.owns(&other) => self.directions.on_event(other),
                other if self.calibration.owns(&other) => self.calibration.on_event(&other),
                other if self.training.owns(&other) => self.training.on_event(&other),
                other => self.reply.on_event(other),
            }
        }
    }

    /// Draws the whole window into `ui`.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        self.drain_events();
        if let Some(on) = self.model.take_requested_organism() {
            self.worker.send(crate::worker::Job::UseOrganism(on));
        }
        if let Some(path) = self.model.take_requested_open() {
            self.reply.clear();
            self.worker.load_model(path, None);
        }

        egui::Panel::bottom("status").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.label(self.model.status_line());
                ui.separator();
                ui.label(self.reply.status_line());
            });
        });
        egui::Panel::left("model")
            .resizable(true)
            .default_size(300.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| {
                    self.model.ui(ui);
                    ui.separator();
                    if let Some(prompt) = self.prompt_sets.ui(ui) {
                        self.reply.prompt = prompt;
                    }
                });
            });
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
                    let ready = self.model.is_ready();
                    let header =
                        egui::CollapsingHeader::new("Calibration: refusal rate vs threshold τ")
                            .open(Some(self.bottom_open[0]))
                            .show(ui, |ui| {
                                self.calibration.ui(
                                    ui,
                                    &mut self.worker,
                                    &self.prompt_sets.sets,
                                    ready,
                                    self.reply.tau,
                                    self.model.gate_goal(),
                                );
                            });
                    if header.header_response.clicked() {
                        self.bottom_open[0] ^= true;
                    }
                    let header = egui::CollapsingHeader::new("Refusal-token fine-tuning")
                        .open(Some(self.bottom_open[1]))
                        .show(ui, |ui| {
                            self.training
                                .ui(ui, &mut self.worker, &self.prompt_sets.sets, ready);
                        });
                    if header.header_response.clicked() {
                        self.bottom_open[1] ^= true;
                    }
                });
            });
        // The main reply runs under the steering stack when the Steering panel says so.
        self.reply.steering = if self.steering.apply_to_reply {
            self.steering.stack(self.directions.directions.as_deref())
        } else {
            Default::default()
        };
        // A finished reply (or new directions / another layer) gets its trajectory scored.
        let finished = self.reply.take_finished();
        let rescore = self.directions.take_changed();
        if self.directions.directions.is_some() {
            let request =
                finished.or_else(|| rescore.then(|| self.reply.last_finished()).flatten());
            if let Some((request, reply)) = request {
                let layer = self.directions.curve_layer();
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

        egui::CentralPanel::default().show(ui, |ui| {
            let ready = self.model.is_ready();
            ui.horizontal(|ui| {
                ui.selectable_value(&mut self.tab, Tab::Reply, "Prompt & reply");
                ui.selectable_value(&mut self.tab, Tab::Cliff, "Cliff");
                ui.selectable_value(&mut self.tab, Tab::Directions, "Directions");
                ui.selectable_value(&mut self.tab, Tab::Steering, "Steering");
                ui.selectable_value(&mut self.tab, Tab::Heads, "Head attribution");
            });
            ui.separator();
            egui::ScrollArea::vertical()
                .id_salt("central")
                .show(ui, |ui| match self.tab {
                    Tab::Reply => {
                        let refusal_tokens = self.model.organism_active();
                        self.reply.ui(ui, &mut self.worker, ready, refusal_tokens);
                    }
                    Tab::Cliff => self.cliff.ui(ui),
                    Tab::Directions => {
                        self.directions
                            .ui(ui, &mut self.worker, &self.prompt_sets.sets, ready)
                    }
                    Tab::Steering => {
                        let base = self.reply.request();
                        let refusal_tokens = self.model.organism_active();
                        self.steering.ui(
                            ui,
                            &mut self.worker,
                            &base,
                            self.directions.directions.as_deref(),
                            &self.prompt_sets.sets,
                            ready,
                            refusal_tokens,
                        )
                    }
                    Tab::Heads => {
                        let base = self.reply.request();
                        let controls = self
                            .steering
                            .control_stack(self.directions.directions.as_deref());
                        let stack = move |extra: &[refusal_lens_engine::analysis::steering::Edit]| {
                            let mut s = controls.clone();
                            s.edits.extend(extra.iter().cloned());
                            s
                        };
                        self.heads.ui(
                            ui,
                            &mut self.worker,
                            &self.prompt_sets.sets,
                            &mut self.steering.extra,
                            stack,
                            &base,
                            ready,
                        )
                    }
                });
        });

        if self.reply.is_running()
            || self.model.is_busy()
            || self.prompt_sets.is_busy()
            || self.calibration.is_running()
            || self.training.is_running()
            || self.directions.is_running()
            || self.cliff.is_running()
            || self.steering.is_running()
            || self.heads.is_running()
        {
            ui.ctx().request_repaint_after(Duration::from_millis(50));
        }
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
    let path = choice.model.unwrap_or_else(default_model_path);
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
            Ok(Box::new(RefusalLensApp::new(
                Some(cc.egui_ctx.clone()),
                Startup::Path {
                    model: path,
                    adapter,
                },
            )))
        }),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))
}
