//! Left panel: the model card, "Open model…", and model loading state.

use std::path::PathBuf;

use refusal_lens_engine::model::loader::ModelCard;
use refusal_lens_engine::refusal::GateGoal;

use super::super::widgets::dialog::Pending;
use crate::worker::{Event, JobId, OrganismInfo};

#[derive(Default)]
pub enum ModelState {
    #[default]
    None,
    Loading(PathBuf),
    Ready {
        card: Box<ModelCard>,
        /// How long the load from disk took (None for a model switched to or built in memory).
        load_seconds: Option<f64>,
        /// The refusal-token adapter available for this model, if any.
        organism: Option<OrganismInfo>,
        /// Whether the adapted model is the one in use.
        organism_active: bool,
    },
    Failed {
        path: PathBuf,
        error: String,
    },
}

#[derive(Default)]
pub struct ModelPanel {
    pub state: ModelState,
    /// A file dialog running on its own thread (rfd blocks).
    dialog: Option<Pending<Option<PathBuf>>>,
    requested: Option<PathBuf>,
    /// The load job in flight and its path.
    load_job: Option<(JobId, PathBuf)>,
    /// The organism toggle the user just set, to be sent to the worker.
    requested_organism: Option<bool>,
    /// A device picked in the card (GPU builds), for the app to send as a job.
    requested_device: Option<String>,
}

impl ModelPanel {
    /// True when the model in use has refusal tokens (the organism is on).
    pub fn organism_active(&self) -> bool {
        matches!(
            self.state,
            ModelState::Ready {
                organism_active: true,
                ..
            }
        )
    }

    pub fn take_requested_organism(&mut self) -> Option<bool> {
        self.requested_organism.take()
    }

    pub fn take_requested_device(&mut self) -> Option<String> {
        self.requested_device.take()
    }

    /// The rule the model in use had its refusal gate calibrated by, if any.
    pub fn gate_goal(&self) -> Option<GateGoal> {
        match &self.state {
            ModelState::Ready { card, .. } => card.refusal_tau_goal,
            _ => None,
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state, ModelState::Ready { .. })
    }

    pub fn is_busy(&self) -> bool {
        matches!(self.state, ModelState::Loading(_)) || self.dialog.is_some()
    }

    /// The worker was asked to load `path` as job `id`.
    pub fn loading(&mut self, id: JobId, path: PathBuf) {
        self.state = ModelState::Loading(path.clone());
        self.load_job = Some((id, path));
    }

    /// True for the events of the load job in flight (its failure included).
    pub fn owns(&self, event: &Event) -> bool {
        self.load_job
            .as_ref()
            .is_some_and(|(id, _)| *id == event.id())
    }

    pub fn on_event(&mut self, event: Event) {
        self.state = match event {
            Event::ModelLoading { path, .. } => ModelState::Loading(path),
            Event::ModelLoaded {
                card,
                load_seconds,
                organism,
                organism_active,
                ..
            } => {
                self.load_job = None;
                ModelState::Ready {
                    card,
                    load_seconds,
                    organism,
                    organism_active,
                }
            }
            Event::Failed { id, error } => match self.load_job.take() {
                Some((job, path)) if job == id => ModelState::Failed { path, error },
                other => {
                    self.load_job = other;
                    return;
                }
            },
            _ => return,
        };
    }

    /// A path the user picked, to be loaded by the worker.
    pub fn take_requested_open(&mut self) -> Option<PathBuf> {
        if let Some(pending) = &self.dialog {
            if let Some(picked) = pending.poll() {
                self.dialog = None;
                if let Some(path) = picked {
                    self.state = ModelState::Loading(path.clone());
                    self.requested = Some(path);
                }
            }
        }
        self.requested.take()
    }

    fn open_dialog(&mut self, folder: bool) {
        self.dialog = Some(Pending::spawn(move || {
            let dialog = rfd::FileDialog::new().set_title("Open model");
            if folder {
                dialog.pick_folder()
            } else {
                dialog.add_filter("GGUF model", &["gguf"]).pick_file()
            }
        }));
    }

    pub fn status_line(&self) -> String {
        match &self.state {
            ModelState::None => "No model".into(),
            ModelState::Loading(p) => format!("Loading {}…", p.display()),
            ModelState::Ready {
                card,
                load_seconds: Some(seconds),
                ..
            } => format!("{} loaded in {seconds:.1} s", card.name),
            ModelState::Ready { card, .. } => format!("{} in use", card.name),
            ModelState::Failed { .. } => "Model failed to load".into(),
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Model");
        ui.horizontal_wrapped(|ui| {
            let idle = self.dialog.is_none();
            if ui
                .add_enabled(idle, egui::Button::new("Open model…"))
                .on_hover_text("A GGUF file")
                .clicked()
            {
                self.open_dialog(false);
            }
            if ui
                .add_enabled(idle, egui::Button::new("Open HF folder…"))
                .on_hover_text("config.json + *.safetensors + tokenizer.json")
                .clicked()
            {
                self.open_dialog(true);
            }
        });
        ui.separator();
        match &self.state {
            ModelState::None => {
                ui.label("No model loaded.");
            }
            ModelState::Loading(path) => {
                ui.horizontal_wrapped(|ui| {
                    ui.weak("…");
                    ui.label(format!("Loading {}", path.display()));
                });
            }
            ModelState::Failed { path, error } => {
                ui.colored_label(ui.visuals().error_fg_color, "Could not open the model");
                ui.label(egui::RichText::new(path.display().to_string()).small());
                ui.label(error);
            }
            ModelState::Ready {
                card,
                organism,
                organism_active,
                ..
            } => {
                if let Some(info) = organism {
                    let mut on = *organism_active;
                    let metrics = info
                        .metrics
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .filter(|(k, _)| k.contains("rate"))
                                .map(|(k, v)| {
                                    format!("{k}: {:.1}%", v.as_f64().unwrap_or(0.0) * 100.0)
                                })
                                .collect::<Vec<_>>()
                                .join("\n")
                        })
                        .unwrap_or_default();
                    if ui
                        .checkbox(&mut on, "Refusal organism ([refuse]/[respond] adapter)")
                        .on_hover_text(format!(
                            "{}\nheld-out test split:\n{metrics}\nOff: the base model.",
                            info.name
                        ))
                        .changed()
                    {
                        self.requested_organism = Some(on);
                    }
                }
                // A GPU build offers its devices; the CPU build has only the CPU.
                let devices = refusal_lens_engine::device::compiled_devices();
                if devices.len() > 1 {
                    ui.horizontal(|ui| {
                        ui.label("Run on");
                        egui::ComboBox::from_id_salt("device")
                            .selected_text(&card.device)
                            .show_ui(ui, |ui| {
                                for d in devices {
                                    if ui.selectable_label(card.device == d, d).clicked()
                                        && card.device != d
                                    {
                                        self.requested_device = Some(d.to_string());
                                    }
                                }
                            });
                    });
                }
                card_grid(ui, card)
            }
        }
    }
}

fn card_grid(ui: &mut egui::Ui, c: &ModelCard) {
    ui.label(egui::RichText::new(&c.name).strong());
    // Values wrap in what the panel leaves beside the keys, so that a long one (the
    // template, the gate's rule) cannot widen the panel.
    let values = (ui.available_width() - 100.0).max(120.0);
    egui::Grid::new("model_card")
        .num_columns(2)
        .striped(true)
        .max_col_width(values)
        .show(ui, |ui| {
            let mut row = |k: &str, v: String| {
                ui.label(k);
                ui.add(egui::Label::new(v).wrap());
                ui.end_row();
            };
            row("Format", c.format.clone());
            row("Architecture", c.architecture.clone());
            row("Layers", c.n_layers.to_string());
            row("Heads", format!("{} (kv {})", c.n_heads, c.n_kv_heads));
            row("Width", format!("{} (FFN {})", c.d_model, c.d_ff));
            row("Vocabulary", c.vocab_size.to_string());
            row("Context", c.context_length.to_string());
            row("Parameters", format!("{:.1} M", c.parameters as f64 / 1e6));
            let quant: Vec<String> = c
                .quantization
                .iter()
                .map(|(k, v)| format!("{k} ×{v}"))
                .collect();
            row(
                "Stored as",
                if quant.is_empty() {
                    "f32 (built in memory)".into()
                } else {
                    quant.join(", ")
                },
            );
            row("Generation", c.generation_weights.clone());
            row("Memory", c.memory.describe());
            row("Device", c.device.clone());
            row("Template", c.chat_template.clone());
            if let Some(tau) = c.refusal_tau {
                let rule = c.refusal_tau_goal.map(|g| format!(": {}", g.describe()));
                row(
                    "Refusal gate",
                    format!(
                        "τ = {tau:.2} (calibrated on val{})",
                        rule.unwrap_or_default()
                    ),
                );
            }
        });
}
