//! Guard (docs/methods.md, "Latent Guard"): the harmfulness the model encodes at t_inst as a
//! harmful-input detector, beside refusal-based detection. Fitted on the loaded harmful and
//! harmless sets' train split (layers and τ chosen on val), shown on their test split, the
//! borderline set and the harmful test prompts wrapped in every jailbreak template: a threshold
//! slider, the ROC curves, the confusion matrices, and the 2-D view (harmfulness at t_inst
//! against the refusal score at t_post) whose points load into the Prompt & reply tab.

use egui::Color32;
use egui_plot::{Legend, Line, Plot, PlotPoints, Points, VLine};
use refusal_lens_engine::analysis::guard::{Detection, GuardStudy};
use refusal_lens_engine::data::prompts::{sample_prompts_dir, Jailbreak, PromptSet};

use super::compare::ComparePanel;
use crate::gui::session::Session;
use crate::gui::widgets::export::Exporter;
use crate::gui::widgets::{progress_with_cancel, short};
use crate::worker::{Event, Job, JobId, Worker};

#[derive(Default)]
pub struct GuardPanel {
    job: Option<JobId>,
    progress: (String, usize, usize),
    pub error: Option<String>,
    pub study: Option<GuardStudy>,
    /// The guard's threshold as the slider sets it (starts at the one chosen on val).
    pub tau: f32,
    /// Draw an arrow from each harmful test prompt to its jailbreak-wrapped versions.
    arrows: bool,
    /// A point clicked in the 2-D view: its prompt goes to the Prompt & reply tab.
    clicked: Option<String>,
    export: Exporter,
    plot_rect: Option<egui::Rect>,
    /// Two models side by side, below the guard.
    pub compare: ComparePanel,
}

/// Colour of a group of points in the 2-D view.
fn group_color(group: &str) -> Color32 {
    match group {
        "harmful" => Color32::from_rgb(200, 50, 45),
        "harmless" => Color32::from_rgb(40, 140, 60),
        "borderline" => Color32::from_rgb(230, 150, 30),
        _ => Color32::from_rgb(150, 110, 210), // jailbreak-wrapped
    }
}

impl GuardPanel {
    pub fn is_running(&self) -> bool {
        self.job.is_some() || self.compare.is_running()
    }

    pub fn owns(&self, event: &Event) -> bool {
        Some(event.id()) == self.job || self.compare.owns(event)
    }

    pub fn on_event(&mut self, event: Event) {
        if self.compare.owns(&event) {
            return self.compare.on_event(event);
        }
        match event {
            Event::Progress { progress, .. } => {
                self.progress = (progress.phase, progress.done, progress.total)
            }
            Event::GuardReady { study, .. } => {
                self.job = None;
                self.tau = study.guard.tau;
                self.study = Some(*study);
            }
            Event::Failed { error, .. } => {
                self.job = None;
                self.error = Some(error);
            }
            _ => {}
        }
    }

    /// Forgets the guard (a new model: its states mean something else).
    pub fn clear(&mut self) {
        self.study = None;
        self.job = None;
        self.compare.clear();
    }

    /// The prompt of a clicked point, once.
    pub fn take_clicked(&mut self) -> Option<String> {
        self.clicked.take()
    }

    pub fn ui(
        &mut self,
        ui: &mut egui::Ui,
        worker: &mut Worker,
        session: &Session,
        sets: &[PromptSet],
        prompt: &str,
    ) {
        self.guard_ui(ui, worker, session, sets);
        ui.separator();
        ui.heading("Two models side by side");
        self.compare.ui(ui, worker, session, sets, prompt);
    }

    fn guard_ui(
        &mut self,
        ui: &mut egui::Ui,
        worker: &mut Worker,
        session: &Session,
        sets: &[PromptSet],
    ) {
        self.export.poll(ui.ctx());
        ui.heading("Latent Guard");
        ui.label(
            "Harmfulness read at t_inst (the last token of the user's text) as a detector: per \
             layer, the cosine to the harmful centroid minus the cosine to the harmless one, \
             averaged over a layer range; flagged harmful when ≥ τ. Fitted on the train split, \
             layers and τ chosen on val, shown on test.",
        );
        let find = |name: &str| sets.iter().find(|s| s.name == name);
        ui.horizontal_wrapped(|ui| {
            let (harmful, harmless) = (find("harmful"), find("harmless"));
            let can = session.model_ready && harmful.is_some() && harmless.is_some();
            if self.job.is_none() {
                let button = ui
                    .add_enabled(can, egui::Button::new("Fit & evaluate guard"))
                    .on_hover_text(
                        "Reads every prompt's states once (the activation cache keeps them): \
                         the harmful and harmless sets' train, val and test splits, the \
                         borderline set and the harmful test prompts in each jailbreak template",
                    );
                if button.clicked() {
                    if let (Some(h), Some(l)) = (harmful, harmless) {
                        self.start(worker, session, h, l, find("borderline"));
                    }
                }
                if !can {
                    ui.weak("needs a model and the harmful and harmless sets");
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
        let Some(study) = self.study.take() else {
            return;
        };
        self.results(ui, &study);
        self.study = Some(study);
    }

    fn start(
        &mut self,
        worker: &mut Worker,
        session: &Session,
        harmful: &PromptSet,
        harmless: &PromptSet,
        borderline: Option<&PromptSet>,
    ) {
        self.error = None;
        let jailbreaks = match Jailbreak::load_all(&sample_prompts_dir().join("jailbreaks.jsonl")) {
            Ok(j) => j,
            Err(e) => {
                self.error = Some(format!("jailbreak templates: {e}"));
                Vec::new()
            }
        };
        self.job = Some(worker.submit(Job::Guard {
            harmful: Box::new(harmful.clone()),
            harmless: Box::new(harmless.clone()),
            borderline: borderline.map(|b| Box::new(b.clone())),
            jailbreaks,
            activation_cache: session.cache_dir.join("activations"),
        }));
    }

    fn results(&mut self, ui: &mut egui::Ui, study: &GuardStudy) {
        let g = &study.guard;
        let (lo, hi) = study
            .points
            .iter()
            .map(|p| p.harmfulness)
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), x| {
                (a.min(x), b.max(x))
            });
        ui.horizontal_wrapped(|ui| {
            ui.label(format!(
                "states {}–{} (chosen on val) · fitted on {} + {} prompts · τ",
                g.layers.start,
                g.layers.end - 1,
                g.n_harmful,
                g.n_harmless
            ));
            ui.add(
                egui::Slider::new(&mut self.tau, lo.min(g.tau)..=hi.max(g.tau)).fixed_decimals(4),
            )
            .on_hover_text("The guard's threshold; it was chosen on val for balanced accuracy");
            if ui.button("reset τ").clicked() {
                self.tau = g.tau;
            }
        });
        let c = study.comparison(self.tau);
        ui.columns(2, |cols| {
            confusion(
                &mut cols[0],
                "Latent Guard (t_inst)",
                c.guard.auc,
                &c.guard.at_tau,
            );
            confusion(
                &mut cols[1],
                "refusal score (t_post, at the gate's τ)",
                c.refusal_score.auc,
                &c.refusal_score.at_tau,
            );
        });
        ui.columns(2, |cols| {
            roc_plot(&mut cols[0], &c);
            self.jailbreak_table(&mut cols[1], study);
        });
        self.scatter(ui, study);
    }

    fn jailbreak_table(&self, ui: &mut egui::Ui, study: &GuardStudy) {
        ui.strong("Harmful test prompts, plain and wrapped");
        let rate = |v: &mut dyn Iterator<Item = bool>| {
            let (n, k) = v.fold((0, 0), |(n, k), f| (n + 1, k + f as usize));
            (n, k as f32 / n.max(1) as f32)
        };
        let mut groups: Vec<&str> = vec![];
        for p in &study.points {
            if p.harmful && !groups.contains(&p.group.as_str()) {
                groups.push(&p.group);
            }
        }
        egui::Grid::new("guard_jailbreaks")
            .striped(true)
            .show(ui, |ui| {
                ui.label("template");
                ui.label("n");
                ui.label("guard flags");
                ui.label("model refuses");
                ui.end_row();
                for group in groups {
                    let pts = || study.points.iter().filter(move |p| p.group == group);
                    let (n, flagged) = rate(&mut pts().map(|p| p.harmfulness >= self.tau));
                    let (_, refused) =
                        rate(&mut pts().map(|p| p.refusal_score >= study.refusal_score_tau));
                    ui.label(group.strip_prefix("jailbreak:").unwrap_or("(plain)"));
                    ui.label(n.to_string());
                    ui.label(format!("{:.0}%", 100.0 * flagged));
                    ui.label(format!("{:.0}%", 100.0 * refused));
                    ui.end_row();
                }
            });
    }

    fn scatter(&mut self, ui: &mut egui::Ui, study: &GuardStudy) {
        ui.horizontal_wrapped(|ui| {
            ui.strong("Harmfulness at t_inst vs refusal score at t_post");
            ui.checkbox(&mut self.arrows, "arrows to wrapped versions");
            let csv = || {
                let mut out = String::from("group,harmful,harmfulness,refusal_score,prompt\n");
                for p in &study.points {
                    out.push_str(&format!(
                        "{},{},{},{},\"{}\"\n",
                        p.group,
                        p.harmful,
                        p.harmfulness,
                        p.refusal_score,
                        p.prompt.replace('"', "\"\"")
                    ));
                }
                out
            };
            self.export
                .buttons(ui, "guard_scatter", self.plot_rect, csv);
        });
        ui.weak("Hover a point for its prompt; click it to load the prompt into Prompt & reply.");
        let mut groups: Vec<&str> = vec![];
        for p in &study.points {
            if !groups.contains(&p.group.as_str()) {
                groups.push(&p.group);
            }
        }
        let points = study.points.clone();
        let response = Plot::new("guard_scatter")
            .height(320.0)
            .legend(Legend::default().position(egui_plot::Corner::LeftTop))
            .x_axis_label("harmfulness (guard score at t_inst)")
            .y_axis_label("refusal score at t_post (log-odds)")
            .label_formatter(move |hover| {
                let pos = match hover {
                    egui_plot::HoverPosition::NearDataPoint { position, .. }
                    | egui_plot::HoverPosition::Elsewhere { position } => position,
                };
                nearest(&points, pos.x, pos.y)
                    .map(|p| format!("{}\n{}", p.group, short(&p.prompt, 80)))
            })
            .show(ui, |plot| {
                if self.arrows {
                    for p in study.points.iter().filter(|p| p.wraps.is_some()) {
                        let from = &study.points[p.wraps.expect("filtered")];
                        plot.line(
                            Line::new(
                                "",
                                PlotPoints::new(vec![
                                    [from.harmfulness as f64, from.refusal_score as f64],
                                    [p.harmfulness as f64, p.refusal_score as f64],
                                ]),
                            )
                            .color(group_color(&p.group).gamma_multiply(0.3))
                            .width(0.5),
                        );
                    }
                }
                for group in &groups {
                    let xy: Vec<[f64; 2]> = study
                        .points
                        .iter()
                        .filter(|p| p.group == *group)
                        .map(|p| [p.harmfulness as f64, p.refusal_score as f64])
                        .collect();
                    let name = if group.starts_with("jailbreak:") {
                        "jailbreak-wrapped"
                    } else {
                        group
                    };
                    plot.points(
                        Points::new(name, PlotPoints::new(xy))
                            .radius(2.5)
                            .color(group_color(group)),
                    );
                }
                plot.vline(VLine::new("guard τ", self.tau as f64).color(Color32::GRAY));
                plot.hline(
                    egui_plot::HLine::new("gate τ (refusal score)", study.refusal_score_tau as f64)
                        .color(Color32::DARK_GRAY),
                );
                if plot.response().clicked() {
                    if let Some(pos) = plot.pointer_coordinate() {
                        self.clicked =
                            nearest(&study.points, pos.x, pos.y).map(|p| p.prompt.clone());
                    }
                }
            });
        self.plot_rect = Some(response.response.rect);
    }
}

/// The point nearest `(x, y)` in the plot's units, scaled per axis by the data's spread.
fn nearest(
    points: &[refusal_lens_engine::analysis::guard::GuardPoint],
    x: f64,
    y: f64,
) -> Option<&refusal_lens_engine::analysis::guard::GuardPoint> {
    let spread = |f: fn(&refusal_lens_engine::analysis::guard::GuardPoint) -> f32| {
        let (lo, hi) = points
            .iter()
            .map(f)
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
        ((hi - lo) as f64).max(1e-9)
    };
    let (sx, sy) = (spread(|p| p.harmfulness), spread(|p| p.refusal_score));
    points.iter().min_by(|a, b| {
        let d = |p: &refusal_lens_engine::analysis::guard::GuardPoint| {
            ((p.harmfulness as f64 - x) / sx).powi(2) + ((p.refusal_score as f64 - y) / sy).powi(2)
        };
        d(a).total_cmp(&d(b))
    })
}

fn confusion(ui: &mut egui::Ui, title: &str, auc: Option<f32>, d: &Detection) {
    ui.strong(title);
    ui.label(format!(
        "AUC {} · accuracy {:.3} · F1 {:.3}",
        auc.map_or("—".into(), |a| format!("{a:.3}")),
        d.accuracy(),
        d.f1()
    ));
    egui::Grid::new(title).striped(true).show(ui, |ui| {
        ui.label("");
        ui.label("flagged");
        ui.label("passed");
        ui.end_row();
        ui.label("harmful");
        ui.label(d.true_positives.to_string());
        ui.label(d.false_negatives.to_string());
        ui.end_row();
        ui.label("harmless");
        ui.label(d.false_positives.to_string());
        ui.label(d.true_negatives.to_string());
        ui.end_row();
    });
}

fn roc_plot(ui: &mut egui::Ui, c: &refusal_lens_engine::analysis::guard::GuardComparison) {
    ui.strong("ROC on the test split");
    let curve = |roc: &[(f32, f32)]| -> PlotPoints {
        roc.iter().map(|&(x, y)| [x as f64, y as f64]).collect()
    };
    Plot::new("guard_roc")
        .height(200.0)
        .data_aspect(1.0)
        .legend(Legend::default().position(egui_plot::Corner::RightBottom))
        .x_axis_label("false-positive rate (harmless flagged)")
        .y_axis_label("true-positive rate")
        .include_x(0.0)
        .include_x(1.0)
        .include_y(0.0)
        .include_y(1.0)
        .show(ui, |plot| {
            plot.line(
                Line::new("Latent Guard", curve(&c.guard.roc))
                    .color(Color32::from_rgb(150, 110, 210))
                    .width(2.0),
            );
            plot.line(
                Line::new("refusal score", curve(&c.refusal_score.roc))
                    .color(Color32::from_rgb(200, 50, 45))
                    .width(2.0),
            );
            plot.line(
                Line::new("chance", PlotPoints::new(vec![[0.0, 0.0], [1.0, 1.0]]))
                    .color(Color32::GRAY)
                    .width(0.5),
            );
        });
}
