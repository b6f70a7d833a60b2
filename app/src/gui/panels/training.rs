//! Refusal-token training as a GUI job: options, progress, a live loss plot, cancel. The
//! trained adapter is saved and switched on when the job ends.

use std::path::PathBuf;

use egui_plot::{Legend, Line, Plot, PlotPoints};
use refusal_lens_engine::data::prompts::{PromptSet, Split};
use refusal_lens_engine::organism::TrainOptions;
use refusal_lens_engine::refusal::GateGoal;

use crate::worker::{Event, Job, JobId, Progress, Worker};

#[derive(Default)]
pub struct TrainingPanel {
    pub options: TrainOptions,
    /// How the gate's τ is calibrated on the val split after training.
    pub goal: GateGoal,
    job: Option<JobId>,
    progress: Option<Progress>,
    /// LoRA-phase loss per optimiser step.
    pub losses: Vec<f32>,
    pub result: Option<String>,
    pub error: Option<String>,
}

impl TrainingPanel {
    pub fn is_running(&self) -> bool {
        self.job.is_some()
    }

    /// Its job's events, except the model switch a finished training run announces (the
    /// shell handles that one).
    pub fn owns(&self, event: &Event) -> bool {
        Some(event.id()) == self.job && !matches!(event, Event::ModelLoaded { .. })
    }

    pub fn on_event(&mut self, event: &Event) {
        match event {
            Event::Progress { progress, .. } => {
                if progress.phase == "training LoRA" {
                    if let Some(l) = progress.loss {
                        self.losses.push(l);
                    }
                }
                self.progress = Some(progress.clone());
            }
            Event::Trained { out, seconds, .. } => {
                self.job = None;
                self.result = Some(format!(
                    "Trained in {seconds:.0} s; saved to {} and switched on.",
                    out.display()
                ));
            }
            Event::Failed { error, .. } => {
                self.job = None;
                self.error = Some(error.clone());
            }
            _ => {}
        }
    }

    pub fn ui(
        &mut self,
        ui: &mut egui::Ui,
        worker: &mut Worker,
        sets: &[PromptSet],
        base_ready: bool,
        cache_dir: &std::path::Path,
    ) {
        let split = |split| -> Vec<_> {
            sets.iter()
                .flat_map(|s| s.split(Some(split)).cloned())
                .filter(|r| r.label.is_some())
                .collect()
        };
        let (train, val) = (split(Split::Train), split(Split::Val));
        self.options_ui(ui);
        self.goal_ui(ui);
        ui.horizontal_wrapped(|ui| {
            let can = base_ready && self.job.is_none() && !train.is_empty();
            if ui
                .add_enabled(can, egui::Button::new(format!("Train refusal tokens on {} train-split prompts", train.len())))
                .on_hover_text("[refuse] for harmful, [respond] + the model's own reply for harmless; LoRA on q, k, v, o. The gate's τ is then calibrated on the val split.")
                .clicked()
            {
                let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                let out: PathBuf = cache_dir.join("adapters").join(format!("refusal-tokens-{stamp}"));
                self.losses.clear();
                self.result = None;
                self.error = None;
                self.progress = None;
                self.job = Some(worker.submit(Job::Train {
                    train,
                    val,
                    options: self.options.clone(),
                    goal: self.goal,
                    out,
                }));
            }
            if self.job.is_some() && ui.button("Cancel").clicked() {
                worker.cancel_all();
            }
        });
        self.status_ui(ui);
    }

    /// The training options.
    fn options_ui(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            let o = &mut self.options;
            ui.add(
                egui::DragValue::new(&mut o.epochs)
                    .range(0..=10)
                    .prefix("epochs "),
            );
            ui.add(
                egui::DragValue::new(&mut o.rank)
                    .range(1..=64)
                    .prefix("rank "),
            );
            ui.add(
                egui::DragValue::new(&mut o.lr)
                    .range(1e-5..=1e-2)
                    .speed(1e-4)
                    .prefix("lr "),
            );
            ui.add(
                egui::DragValue::new(&mut o.first_token_weight)
                    .range(1.0..=50.0)
                    .prefix("first-token weight "),
            );
            ui.checkbox(&mut o.balance_classes, "balance classes")
                .on_hover_text("[refuse] and [respond] examples weigh the same in total");
            ui.add(
                egui::DragValue::new(&mut o.decision_smoothing)
                    .range(0.0..=0.45)
                    .speed(0.01)
                    .prefix("decision smoothing "),
            )
            .on_hover_text("Label smoothing ε of the first token: keeps p([refuse]) graded");
            ui.add(egui::DragValue::new(&mut o.seed).prefix("seed "));
        });
    }

    /// The rule the gate's τ is calibrated by on the val split.
    fn goal_ui(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            ui.label("τ on val:");
            let budgets = GateGoal::default();
            ui.selectable_value(&mut self.goal, GateGoal::Youden, "Youden's J")
                .on_hover_text("Harmful refusal rate minus that of all harmless prompts");
            if ui
                .selectable_label(
                    matches!(self.goal, GateGoal::Budgets { .. }),
                    "false-refusal budgets",
                )
                .on_hover_text("As many harmful prompts refused as the budgets allow")
                .clicked()
                && self.goal == GateGoal::Youden
            {
                self.goal = budgets;
            }
            if let GateGoal::Budgets {
                harmless,
                borderline,
            } = &mut self.goal
            {
                for (value, name) in [(harmless, "harmless"), (borderline, "borderline")] {
                    let mut percent = *value * 100.0;
                    ui.add(
                        egui::DragValue::new(&mut percent)
                            .range(0.0..=100.0)
                            .speed(0.5)
                            .prefix(format!("≤ {name} "))
                            .suffix(" %"),
                    );
                    *value = percent / 100.0;
                }
            }
        });
    }

    /// Progress, the result or the error, and the live loss plot.
    fn status_ui(&self, ui: &mut egui::Ui) {
        if let Some(p) = &self.progress {
            if self.job.is_some() {
                let text = match (p.loss, p.tokens_per_second) {
                    (Some(l), Some(t)) => format!(
                        "{}: {}/{} · loss {l:.3} · {t:.0} tok/s",
                        p.phase, p.done, p.total
                    ),
                    _ => format!("{}: {}/{}", p.phase, p.done, p.total),
                };
                ui.add(egui::ProgressBar::new(p.done as f32 / p.total.max(1) as f32).text(text));
            }
        }
        if let Some(r) = &self.result {
            ui.label(r);
        }
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        if !self.losses.is_empty() {
            Plot::new("training_loss")
                .height(160.0)
                .legend(Legend::default())
                .x_axis_label("optimiser step")
                .y_axis_label("loss (nats / weighted token)")
                .include_y(0.0)
                .show(ui, |plot| {
                    let points: PlotPoints = self
                        .losses
                        .iter()
                        .enumerate()
                        .map(|(i, l)| [i as f64 + 1.0, *l as f64])
                        .collect();
                    plot.line(Line::new("LoRA loss", points));
                });
        }
    }
}
