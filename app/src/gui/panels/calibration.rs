//! Calibration (docs/methods.md, "Refusal tokens"): refusal rate vs threshold τ for the loaded prompt
//! sets, computed on the worker, with the reply panel's current τ marked.

use egui_plot::{HLine, Legend, Line, Plot, PlotPoints, VLine};
use refusal_lens_engine::data::prompts::{PromptSet, Split};
use refusal_lens_engine::refusal::{refusal_rate, refusals_at, GateGoal};

use crate::gui::widgets::progress_with_cancel;
use crate::worker::{Event, Job, JobId, Worker};

#[derive(Default)]
pub struct CalibrationPanel {
    job: Option<JobId>,
    progress: (usize, usize),
    signal: String,
    /// First-token refusal probabilities per set.
    pub curves: Vec<(String, Vec<f32>)>,
    error: Option<String>,
    /// Use only the test split of sets that have one.
    pub test_split_only: bool,
}

impl CalibrationPanel {
    pub fn new() -> Self {
        CalibrationPanel {
            test_split_only: true,
            ..Default::default()
        }
    }

    pub fn is_running(&self) -> bool {
        self.job.is_some()
    }

    pub fn on_event(&mut self, event: &Event) {
        match event {
            Event::Progress { id, progress } if Some(*id) == self.job => {
                self.progress = (progress.done, progress.total)
            }
            Event::Calibrated { id, signal, sets } if Some(*id) == self.job => {
                self.job = None;
                self.signal = signal.clone();
                self.curves = sets.clone();
            }
            Event::Failed { id, error } if Some(*id) == self.job => {
                self.job = None;
                self.error = Some(error.clone());
            }
            _ => {}
        }
    }

    /// Does this event belong to a calibration job?
    pub fn owns(&self, event: &Event) -> bool {
        Some(event.id()) == self.job
    }

    pub fn ui(
        &mut self,
        ui: &mut egui::Ui,
        worker: &mut Worker,
        sets: &[PromptSet],
        model_ready: bool,
        tau: f32,
        goal: Option<GateGoal>,
    ) {
        ui.horizontal_wrapped(|ui| {
            let can = model_ready && !sets.is_empty() && self.job.is_none();
            if ui
                .add_enabled(can, egui::Button::new("Compute refusal-rate curves"))
                .on_hover_text("One forward pass per prompt of every loaded set")
                .clicked()
            {
                let split = self.test_split_only.then_some(Split::Test);
                let chosen = sets
                    .iter()
                    .map(|s| {
                        let in_split: Vec<String> =
                            s.split(split).map(|r| r.prompt.clone()).collect();
                        let prompts = if in_split.is_empty() {
                            s.records.iter().map(|r| r.prompt.clone()).collect()
                        } else {
                            in_split
                        };
                        (s.name.clone(), prompts)
                    })
                    .collect();
                self.error = None;
                self.progress = (0, 0);
                self.job = Some(worker.submit(Job::Calibrate { sets: chosen }));
            }
            ui.checkbox(&mut self.test_split_only, "test split only");
            if self.job.is_some() {
                let (done, total) = self.progress;
                if progress_with_cancel(ui, done, total, format!("{done} / {total} prompts")) {
                    worker.cancel_all();
                }
            }
        });
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        if self.curves.is_empty() {
            return;
        }
        let summary: Vec<String> = self
            .curves
            .iter()
            .map(|(n, ps)| {
                let r = refusals_at(ps, tau);
                format!(
                    "{n} {:.0}% ({}/{}, 95% CI {:.0}–{:.0}%)",
                    refusal_rate(ps, tau) * 100.0,
                    r.refused,
                    r.prompts,
                    r.interval.0 * 100.0,
                    r.interval.1 * 100.0
                )
            })
            .collect();
        ui.label(format!(
            "Refusal rate at τ = {tau:.2}: {}   (signal: {})",
            summary.join(" · "),
            self.signal
        ));
        Plot::new("calibration")
            .height(220.0)
            .legend(Legend::default())
            .x_axis_label("threshold τ")
            .y_axis_label("refusal rate (%)")
            .include_x(0.0)
            .include_x(1.0)
            .include_y(0.0)
            .include_y(100.0)
            .show(ui, |plot| {
                for (name, ps) in &self.curves {
                    let points: PlotPoints = (0..=100)
                        .map(|i| {
                            let t = i as f32 / 100.0;
                            [t as f64, refusal_rate(ps, t) as f64 * 100.0]
                        })
                        .collect();
                    plot.line(Line::new(name.clone(), points));
                }
                plot.vline(VLine::new("current τ", tau as f64));
                // The false-refusal budgets the gate's τ was calibrated for (on val).
                if let Some(GateGoal::Budgets {
                    harmless,
                    borderline,
                }) = goal
                {
                    for (name, share) in [("harmless", harmless), ("borderline", borderline)] {
                        let percent = share as f64 * 100.0;
                        plot.hline(
                            HLine::new(format!("{name} budget ≤ {percent:.0}%"), percent)
                                .style(egui_plot::LineStyle::dashed_loose()),
                        );
                    }
                }
            });
    }
}
