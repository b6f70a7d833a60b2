//! Two models side by side (docs/methods.md, "Comparing two models"), in the Guard tab: the
//! model in use against itself with its adapter taken off or put on, against its abliterated
//! copy, or against another model file. Per layer the cosine of their refusal and harmfulness
//! directions; each model's Latent Guard on its own and on the other's test prompts; their
//! refusal rates; their replies to the current prompt.

use std::path::PathBuf;

use egui::Color32;
use egui_plot::{HLine, Legend, Line, Plot, PlotPoints};
use refusal_lens_engine::analysis::compare::Comparison;
use refusal_lens_engine::analysis::guard::DetectorReport;
use refusal_lens_engine::data::prompts::PromptSet;

use crate::gui::session::Session;
use crate::gui::widgets::dialog::Pending;
use crate::gui::widgets::export::Exporter;
use crate::gui::widgets::{progress_with_cancel, short};
use crate::worker::{CompareWith, Event, Job, JobId, Worker};

/// Reply tokens per model for the side-by-side replies.
const REPLY_TOKENS: usize = 48;

#[derive(Default)]
pub struct ComparePanel {
    job: Option<JobId>,
    progress: (String, usize, usize),
    pub error: Option<String>,
    /// Which second model the next comparison uses.
    pub with: Option<CompareWith>,
    /// A model file picked for the comparison.
    dialog: Option<Pending<Option<PathBuf>>>,
    /// The comparison, both replies and the prompt they answer.
    pub result: Option<(Comparison, Option<[String; 2]>, String)>,
    /// The prompt the running job's replies answer.
    pending_prompt: String,
    export: Exporter,
    plot_rect: Option<egui::Rect>,
}

impl ComparePanel {
    pub fn owns(&self, event: &Event) -> bool {
        Some(event.id()) == self.job
    }

    /// A comparison runs or the file dialog is open (its answer is polled each frame).
    pub fn is_running(&self) -> bool {
        self.job.is_some() || self.dialog.is_some()
    }

    pub fn on_event(&mut self, event: Event) {
        match event {
            Event::Progress { progress, .. } => {
                self.progress = (progress.phase, progress.done, progress.total)
            }
            Event::Compared {
                comparison,
                replies,
                ..
            } => {
                self.job = None;
                let prompt = std::mem::take(&mut self.pending_prompt);
                self.result = Some((*comparison, replies, prompt));
            }
            Event::Failed { error, .. } => {
                self.job = None;
                self.error = Some(error);
            }
            _ => {}
        }
    }

    pub fn clear(&mut self) {
        self.job = None;
        self.result = None;
    }

    fn describe(with: &CompareWith) -> String {
        match with {
            CompareWith::Counterpart => "the model with its adapter off / on".into(),
            CompareWith::Abliterated => "its abliterated copy".into(),
            CompareWith::File(p) => p
                .file_name()
                .map_or(p.display().to_string(), |n| n.to_string_lossy().into()),
        }
    }

    pub fn ui(
        &mut self,
        ui: &mut egui::Ui,
        worker: &mut Worker,
        session: &Session,
        sets: &[PromptSet],
        prompt: &str,
    ) {
        self.export.poll(ui.ctx());
        if let Some(pending) = &self.dialog {
            if let Some(picked) = pending.poll() {
                self.dialog = None;
                if let Some(path) = picked {
                    self.with = Some(CompareWith::File(path));
                }
            }
        }
        ui.label(
            "The model in use (first) against a second model on the same sets: how their refusal \
             and harmfulness directions line up layer by layer, whether each one's guard reads the \
             other's harmfulness (does it survive fine-tuning or abliteration?), how often each \
             refuses, and both replies to the prompt of the Prompt & reply tab.",
        );
        ui.horizontal_wrapped(|ui| {
            let current = self.with.as_ref().map_or("choose…".into(), Self::describe);
            egui::ComboBox::new("compare_with", "second model")
                .selected_text(current)
                .show_ui(ui, |ui| {
                    ui.add_enabled_ui(session.has_adapter, |ui| {
                        ui.selectable_value(
                            &mut self.with,
                            Some(CompareWith::Counterpart),
                            "the model with its adapter off / on",
                        )
                        .on_disabled_hover_text("load a model with an adapter (the organism)");
                    });
                    ui.add_enabled_ui(session.directions.is_some(), |ui| {
                        ui.selectable_value(
                            &mut self.with,
                            Some(CompareWith::Abliterated),
                            "its abliterated copy (the refusal direction ablated from the weights)",
                        )
                        .on_disabled_hover_text("build directions in the Directions tab first");
                    });
                });
            if ui
                .add_enabled(self.dialog.is_none(), egui::Button::new("Model file…"))
                .clicked()
            {
                self.dialog = Some(Pending::spawn(|| {
                    rfd::FileDialog::new()
                        .set_title("Second model (GGUF)")
                        .add_filter("GGUF model", &["gguf"])
                        .pick_file()
                }));
            }
            let find = |name: &str| sets.iter().find(|s| s.name == name);
            let (harmful, harmless) = (find("harmful"), find("harmless"));
            if self.job.is_none() {
                let can = session.model_ready
                    && harmful.is_some()
                    && harmless.is_some()
                    && self.with.is_some();
                if ui
                    .add_enabled(can, egui::Button::new("Compare"))
                    .on_hover_text(
                        "Reads both models' states on the sets' train, val and test splits \
                         (the activation cache keeps them)",
                    )
                    .clicked()
                {
                    if let (Some(h), Some(l), Some(with)) = (harmful, harmless, self.with.clone()) {
                        self.error = None;
                        self.progress = (String::new(), 0, 0);
                        self.job = Some(worker.submit(Job::Compare {
                            with,
                            harmful: Box::new(h.clone()),
                            harmless: Box::new(l.clone()),
                            borderline: find("borderline").map(|b| Box::new(b.clone())),
                            activation_cache: session.cache_dir.join("activations"),
                            prompt: (!prompt.trim().is_empty()).then(|| prompt.to_string()),
                            reply_tokens: REPLY_TOKENS,
                        }));
                        self.pending_prompt = prompt.to_string();
                    }
                }
            } else {
                let (phase, done, total) = &self.progress;
                if progress_with_cancel(ui, *done, *total, phase.clone()) {
                    worker.cancel_analyses();
                }
            }
        });
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        let Some((c, replies, prompt)) = self.result.take() else {
            return;
        };
        self.results(ui, &c, replies.as_ref(), &prompt);
        self.result = Some((c, replies, prompt));
    }

    fn results(
        &mut self,
        ui: &mut egui::Ui,
        c: &Comparison,
        replies: Option<&[String; 2]>,
        prompt: &str,
    ) {
        ui.label(format!(
            "first: {}   ·   second: {}   ·   test split: {} harmful, {} harmless prompts",
            c.first.name, c.second.name, c.n_test_harmful, c.n_test_harmless
        ));
        ui.columns(2, |cols| {
            rates_and_guards(&mut cols[0], c);
            self.cosine_plot(&mut cols[1], c);
        });
        if let Some([a, b]) = replies {
            ui.strong(format!("Replies to \"{}\"", short(prompt, 80)));
            ui.columns(2, |cols| {
                for (col, (who, text)) in cols
                    .iter_mut()
                    .zip([(&c.first.name, a), (&c.second.name, b)])
                {
                    col.weak(who.as_str());
                    col.label(text.as_str());
                }
            });
        }
    }

    fn cosine_plot(&mut self, ui: &mut egui::Ui, c: &Comparison) {
        ui.horizontal_wrapped(|ui| {
            ui.strong("Direction agreement per layer");
            let csv = || c.layers_csv();
            self.export
                .buttons(ui, "compare_layers", self.plot_rect, csv);
        });
        if c.layers.is_empty() {
            ui.weak("The two residual streams differ in shape: no per-layer cosines.");
            return;
        }
        let line =
            |f: fn(&refusal_lens_engine::analysis::compare::LayerAgreement) -> Option<f32>| {
                c.layers
                    .iter()
                    .filter_map(|l| f(l).map(|v| [l.layer as f64, v as f64]))
                    .collect::<PlotPoints>()
            };
        let response = Plot::new("compare_cosines")
            .height(220.0)
            .legend(Legend::default().position(egui_plot::Corner::LeftBottom))
            .x_axis_label("residual state (layer)")
            .y_axis_label("cosine, first vs second")
            .include_y(-1.0)
            .include_y(1.0)
            .show(ui, |plot| {
                plot.line(
                    Line::new("refusal direction (t_post)", line(|l| l.refusal))
                        .color(Color32::from_rgb(200, 50, 45))
                        .width(2.0),
                );
                plot.line(
                    Line::new("harmfulness direction (t_inst)", line(|l| l.harmfulness))
                        .color(Color32::from_rgb(150, 110, 210))
                        .width(2.0),
                );
                plot.hline(HLine::new("", 0.0).color(Color32::GRAY).width(0.5));
            });
        self.plot_rect = Some(response.response.rect);
    }
}

fn rates_and_guards(ui: &mut egui::Ui, c: &Comparison) {
    let pct = |v: Option<f32>| v.map_or("—".into(), |r| format!("{:.0}%", 100.0 * r));
    ui.strong("Refusal rate on the test split (first reply token, at each gate's τ)");
    egui::Grid::new("compare_rates")
        .striped(true)
        .show(ui, |ui| {
            ui.label("");
            ui.label("first");
            ui.label("second");
            ui.end_row();
            for (name, a, b) in [
                (
                    "harmful",
                    Some(c.first.harmful_refusal_rate),
                    Some(c.second.harmful_refusal_rate),
                ),
                (
                    "harmless",
                    Some(c.first.harmless_refusal_rate),
                    Some(c.second.harmless_refusal_rate),
                ),
                (
                    "borderline",
                    c.first.borderline_refusal_rate,
                    c.second.borderline_refusal_rate,
                ),
            ] {
                ui.label(name);
                ui.label(pct(a));
                ui.label(pct(b));
                ui.end_row();
            }
            ui.label("gate τ");
            ui.label(format!("{:.2}", c.first.tau));
            ui.label(format!("{:.2}", c.second.tau));
            ui.end_row();
        });
    ui.add_space(6.0);
    ui.strong("Latent Guard test AUC (row: whose guard; column: whose states)");
    let auc = |r: Option<&DetectorReport>| {
        r.and_then(|r| r.auc)
            .map_or("n/a".into(), |a| format!("{a:.3}"))
    };
    egui::Grid::new("compare_guards")
        .striped(true)
        .show(ui, |ui| {
            ui.label("");
            ui.label("first's states");
            ui.label("second's states");
            ui.end_row();
            ui.label("first's guard");
            ui.label(auc(Some(&c.first.own_guard)));
            ui.label(auc(c.first_guard_on_second.as_ref()));
            ui.end_row();
            ui.label("second's guard");
            ui.label(auc(c.second_guard_on_first.as_ref()));
            ui.label(auc(Some(&c.second.own_guard)));
            ui.end_row();
        });
}
