//! The GUI shell: lays panels out and routes worker events to them. Panels keep their own
//! view state; the model and all computation live on the worker.

mod model_panel;
mod prompt_sets_panel;
mod reply_panel;

use std::path::PathBuf;
use std::time::Duration;

use refusal_lens_engine::{default_model_path, LoadedModel};

use crate::worker::{Event, Worker};
pub use model_panel::{ModelPanel, ModelState};
pub use prompt_sets_panel::PromptSetsPanel;
pub use reply_panel::ReplyPanel;

/// What the app opens at start.
pub enum Startup {
    Path(PathBuf),
    Model(Box<LoadedModel>),
}

pub struct RefusalLensApp {
    worker: Worker,
    pub model: ModelPanel,
    pub prompt_sets: PromptSetsPanel,
    pub reply: ReplyPanel,
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
            Startup::Path(path) => {
                model.state = ModelState::Loading(path.clone());
                worker.load_model(path);
            }
            Startup::Model(m) => worker.send(crate::worker::Job::UseModel(m)),
        }
        RefusalLensApp {
            worker,
            model,
            prompt_sets: PromptSetsPanel::with_bundled_sets(),
            reply: ReplyPanel::default(),
        }
    }

    fn drain_events(&mut self) {
        while let Some(event) = self.worker.try_recv() {
            match event {
                Event::ModelLoading { .. }
                | Event::ModelLoaded { .. }
                | Event::ModelFailed { .. } => self.model.on_event(event),
                other => self.reply.on_event(other),
            }
        }
    }

    /// Draws the whole window into `ui`.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        self.drain_events();
        if let Some(path) = self.model.take_requested_open() {
            self.reply.clear();
            self.worker.load_model(path);
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
        egui::CentralPanel::default().show(ui, |ui| {
            let ready = self.model.is_ready();
            self.reply.ui(ui, &mut self.worker, ready);
        });

        if self.reply.is_running() || self.model.is_busy() || self.prompt_sets.is_busy() {
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
pub fn run(model: Option<PathBuf>) -> anyhow::Result<()> {
    let path = model.unwrap_or_else(default_model_path);
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
                Startup::Path(path),
            )))
        }),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))
}
