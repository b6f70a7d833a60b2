//! Directions: compute (or load) the refusal and harmfulness directions and the refusal
//! probes from two prompt sets, then read them layer by layer: separation, norm, the
//! refusal-vs-harmfulness cosine and probe AUC, with the chosen layer marked and changeable.

use std::path::PathBuf;

use egui::Color32;
use egui_plot::{Corner, Legend, Line, Plot, PlotPoints, Points, VLine};
use refusal_lens_engine::analysis::directions::Directions;
use refusal_lens_engine::analysis::lens::{self, DirectionOptions};
use refusal_lens_engine::analysis::probe::{CalibrationMetrics, LayerMetrics, ProbeSet};
use refusal_lens_engine::data::prompts::{Label, PromptSet};

use crate::gui::session::Session;
use crate::gui::widgets::dialog::Pending;
use crate::gui::widgets::export::Exporter;
use crate::gui::widgets::progress_with_cancel;
use crate::worker::{Event, Job, JobId, Worker};

#[derive(Default)]
pub struct DirectionsPanel {
    job: Option<JobId>,
    /// The last save, load or layer choice sent.
    file_job: Option<JobId>,
    progress: (String, usize, usize),
    /// The layer the Cliff curves read (None: the directions' chosen layer).
    pub layer: Option<usize>,
    /// Take the best-separating layer instead of choosing one by ablation on the val split
    /// (faster; the choice by ablation is what steers, so it is the default).
    pub best_separation: bool,
    /// Use only refused harmful and answered harmless prompts.
    pub filter_by_behaviour: bool,
    /// Indices into the loaded prompt sets (chosen by label/name until the user picks).
    harmful: Option<usize>,
    harmless: Option<usize>,
    pub error: Option<String>,
    message: Option<String>,
    dialog: Option<(Pending<Option<PathBuf>>, bool)>,
    /// Set when new directions arrive or the layer changes: the Cliff needs a new trajectory.
    changed: bool,
    export: Exporter,
    plot_rect: Option<egui::Rect>,
}

/// The index of the set whose records carry `label` (else of the set named like it).
fn default_set(sets: &[PromptSet], label: Label, name: &str) -> usize {
    sets.iter()
        .position(|s| s.name == name)
        .or_else(|| {
            sets.iter()
                .position(|s| s.records.iter().all(|r| r.label == Some(label)))
        })
        .unwrap_or(0)
}

impl DirectionsPanel {
    pub fn is_running(&self) -> bool {
        self.job.is_some()
    }

    /// The layer the trajectory curves should read.
    pub fn curve_layer(&self, session: &Session) -> Option<usize> {
        self.layer.or(session.directions.as_ref().map(|d| d.layer))
    }

    /// True once after new directions or a new layer.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    pub fn owns(&self, event: &Event) -> bool {
        let id = Some(event.id());
        id == self.job || id == self.file_job
    }

    pub fn on_event(&mut self, event: Event) {
        match event {
            Event::Progress { progress, .. } => {
                self.progress = (progress.phase, progress.done, progress.total)
            }
            Event::LensReady {
                id,
                directions,
                probes,
                build_seconds,
                file,
            } => {
                if Some(id) == self.job {
                    self.job = None;
                }
                self.message = Some(if let Some(seconds) = build_seconds {
                    format!(
                        "{} directions over {} layers{} in {seconds:.1} s",
                        if directions.selection.is_some() {
                            "selected"
                        } else {
                            "computed"
                        },
                        directions.n_states,
                        if probes.is_some() { " + probes" } else { "" }
                    )
                } else if let Some(file) = file {
                    let shipped = file.starts_with(lens::shipped_dir());
                    format!(
                        "{} {}",
                        if shipped {
                            "shipped with the app:"
                        } else {
                            "loaded"
                        },
                        file.file_name().unwrap_or_default().to_string_lossy()
                    )
                } else {
                    format!("directions ready (chosen layer {})", directions.layer)
                });
                self.layer = None;
                self.changed = true;
            }
            Event::LensSaved { path, .. } => {
                self.message = Some(format!("saved {}", path.display()))
            }
            Event::Failed { id, error } => {
                if Some(id) == self.job {
                    self.job = None;
                }
                self.error = Some(error);
            }
            _ => {}
        }
    }

    /// Forgets the directions (the model changed).
    pub fn clear(&mut self) {
        self.layer = None;
        self.job = None;
    }

    /// Starts computing directions and probes from two sets.
    pub fn start(
        &mut self,
        worker: &mut Worker,
        harmful: &PromptSet,
        harmless: &PromptSet,
        activation_cache: PathBuf,
    ) {
        self.error = None;
        self.progress = ("starting".into(), 0, 1);
        let options = DirectionOptions {
            select: !self.best_separation,
            filter_by_behaviour: self.filter_by_behaviour,
            ..Default::default()
        };
        self.job = Some(worker.submit(Job::BuildLens {
            harmful: Box::new(harmful.clone()),
            harmless: Box::new(harmless.clone()),
            options,
            activation_cache,
        }));
    }

    fn poll_dialog(&mut self, worker: &mut Worker) {
        if let Some((pending, save)) = &self.dialog {
            if let Some(picked) = pending.poll() {
                let save = *save;
                self.dialog = None;
                if let Some(path) = picked {
                    self.file_job = Some(worker.submit(if save {
                        Job::SaveLens(path)
                    } else {
                        Job::LoadLens(path)
                    }));
                }
            }
        }
    }

    fn open_dialog(&mut self, save: bool) {
        let pending = Pending::spawn(move || {
            let d = rfd::FileDialog::new().add_filter("Directions (safetensors)", &["safetensors"]);
            if save {
                d.set_file_name("directions.safetensors").save_file()
            } else {
                d.pick_file()
            }
        });
        self.dialog = Some((pending, save));
    }

    pub fn ui(
        &mut self,
        ui: &mut egui::Ui,
        worker: &mut Worker,
        session: &Session,
        sets: &[PromptSet],
    ) {
        self.poll_dialog(worker);
        self.export.poll(ui.ctx());
        let model_ready = session.model_ready;
        if sets.is_empty() {
            ui.label(
                "Load a harmful and a harmless prompt set (left panel) to compute directions.",
            );
        } else {
            let (mut harmful, mut harmless) = match (self.harmful, self.harmless) {
                (Some(a), Some(b)) if a < sets.len() && b < sets.len() => (a, b),
                _ => (
                    default_set(sets, Label::Harmful, "harmful"),
                    default_set(sets, Label::Harmless, "harmless"),
                ),
            };
            ui.horizontal_wrapped(|ui| {
                let pick = |ui: &mut egui::Ui, id: &str, idx: &mut usize| {
                    egui::ComboBox::from_id_salt(id)
                        .selected_text(sets[*idx].name.clone())
                        .show_ui(ui, |ui| {
                            for (i, s) in sets.iter().enumerate() {
                                ui.selectable_value(idx, i, format!("{} ({})", s.name, s.len()));
                            }
                        });
                };
                ui.label("harmful:");
                pick(ui, "dir_harmful", &mut harmful);
                ui.label("harmless:");
                pick(ui, "dir_harmless", &mut harmless);
                ui.checkbox(&mut self.filter_by_behaviour, "only refused / answered")
                    .on_hover_text("Keep harmful prompts the model refuses and harmless ones it answers (refusal score above / below 0), as the published pipelines do");
                let mut select = !self.best_separation;
                ui.checkbox(&mut select, "choose layer by ablation")
                    .on_hover_text(
                        "Layer selection (docs/methods.md): ablate each candidate on val prompts, \
                         drop the last 20% of layers and candidates with KL > 0.1 or no effect \
                         when added (minutes: the shipped directions were chosen this way). \
                         Off: the best-separating layer.",
                    );
                self.best_separation = !select;
                let can = model_ready && self.job.is_none() && harmful != harmless;
                if ui
                    .add_enabled(can, egui::Button::new("Compute directions & probes"))
                    .on_hover_text("Diff-in-means on the train split; logistic probes at every layer (80/20 holdout, L2 and temperature chosen on a quarter of the training prompts)")
                    .clicked()
                {
                    self.start(worker, &sets[harmful], &sets[harmless], session.activation_cache());
                }
            });
            (self.harmful, self.harmless) = (Some(harmful), Some(harmless));
        }
        if self.job.is_some() {
            ui.horizontal_wrapped(|ui| {
                let (phase, done, total) = &self.progress;
                if progress_with_cancel(ui, *done, *total, format!("{phase}: {done} / {total}")) {
                    worker.cancel_analyses();
                }
            });
        }
        ui.horizontal_wrapped(|ui| {
            if ui
                .add_enabled(session.directions.is_some(), egui::Button::new("Save…"))
                .on_hover_text("Directions as safetensors with metadata; probes beside them (.probes.safetensors)")
                .clicked()
            {
                self.open_dialog(true);
            }
            if ui.add_enabled(model_ready, egui::Button::new("Load…")).clicked() {
                self.open_dialog(false);
            }
            if let Some(m) = &self.message {
                ui.weak(m);
            }
        });
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        let Some(d) = session.directions.clone() else {
            return;
        };
        self.summary(ui, worker, &d, session.probes.as_deref());
        self.plots(ui, &d, session.probes.as_deref());
    }

    fn summary(
        &mut self,
        ui: &mut egui::Ui,
        worker: &mut Worker,
        d: &Directions,
        probes: Option<&ProbeSet>,
    ) {
        let p = &d.provenance;
        ui.label(format!(
            "{} harmful vs {} harmless prompts{} · chosen: layer {}, position t_post-{}{}",
            p.n_harmful,
            p.n_harmless,
            if p.filtered_by_behaviour {
                " (filtered by behaviour)"
            } else {
                ""
            },
            d.layer,
            d.n_post - 1 - d.position,
            match &d.selection {
                Some(s) => format!(
                    " (by ablation on {}+{} val prompts; {} candidates)",
                    s.n_harmful,
                    s.n_harmless,
                    s.candidates.len()
                ),
                None => " (best separation; no ablation selection)".into(),
            }
        ));
        ui.horizontal_wrapped(|ui| {
            let mut layer = self.layer.unwrap_or(d.layer);
            ui.label("Layer of the Cliff curves:");
            if ui
                .add(egui::Slider::new(&mut layer, 0..=d.n_states - 1))
                .changed()
            {
                self.layer = Some(layer);
                self.changed = true;
            }
            if ui.button("Reset to chosen").clicked() {
                self.layer = None;
                self.changed = true;
            }
            if ui
                .add_enabled(
                    self.layer.is_some_and(|l| l != d.layer),
                    egui::Button::new("Make it the chosen layer"),
                )
                .on_hover_text("Steering, saving and every later trajectory use the chosen layer")
                .clicked()
            {
                if let Some(layer) = self.layer {
                    self.file_job = Some(worker.submit(Job::ChooseLayer(layer)));
                }
            }
            let csv = || directions_csv(d, probes);
            self.export.buttons(ui, "directions", self.plot_rect, csv);
            if let Some(m) = &self.export.message {
                ui.weak(m);
            }
        });
    }

    fn plots(&mut self, ui: &mut egui::Ui, d: &Directions, probes: Option<&ProbeSet>) {
        let chosen = d.layer as f64;
        let current = Some(self.layer.unwrap_or(d.layer) as f64);
        let per_layer = |f: &dyn Fn(usize) -> f32| -> PlotPoints {
            (0..d.n_states).map(|l| [l as f64, f(l) as f64]).collect()
        };
        let red = Color32::from_rgb(200, 50, 45);
        let purple = Color32::from_rgb(120, 80, 200);
        let marks = |plot: &mut egui_plot::PlotUi| {
            plot.vline(VLine::new("chosen layer", chosen).color(Color32::from_rgb(40, 140, 60)));
            if let Some(c) = current.filter(|c| *c != chosen) {
                plot.vline(VLine::new("curve layer", c).color(Color32::from_rgb(30, 120, 220)));
            }
        };
        let top = ui.cursor().min;
        ui.columns(2, |cols| {
            Plot::new("dir_separation")
                .height(190.0)
                .legend(Legend::default().position(Corner::LeftTop))
                .x_axis_label("layer (residual state)")
                .y_axis_label("separation (gap / pooled std)")
                .show(&mut cols[0], |plot| {
                    plot.line(
                        Line::new(
                            "refusal (t_post)",
                            per_layer(&|l| d.stats[l].refusal_separation),
                        )
                        .color(red),
                    );
                    plot.line(
                        Line::new(
                            "harmfulness (t_inst)",
                            per_layer(&|l| d.stats[l].harmfulness_separation),
                        )
                        .color(purple),
                    );
                    marks(plot);
                });
            Plot::new("dir_norm")
                .height(190.0)
                .legend(Legend::default().position(Corner::LeftTop))
                .x_axis_label("layer (residual state)")
                .y_axis_label("direction norm (residual units)")
                .show(&mut cols[1], |plot| {
                    plot.line(
                        Line::new("norm of refusal", per_layer(&|l| d.stats[l].refusal_norm))
                            .color(red),
                    );
                    plot.line(
                        Line::new(
                            "norm of harmfulness",
                            per_layer(&|l| d.stats[l].harmfulness_norm),
                        )
                        .color(purple),
                    );
                    marks(plot);
                });
        });
        ui.columns(2, |cols| {
            Plot::new("dir_cosine")
                .height(190.0)
                .legend(Legend::default().position(Corner::LeftTop))
                .x_axis_label("layer (residual state)")
                .y_axis_label("cosine")
                .include_y(0.0)
                .include_y(1.0)
                .show(&mut cols[0], |plot| {
                    plot.line(Line::new(
                        "cos(refusal, harmfulness)",
                        per_layer(&|l| d.stats[l].cosine),
                    ));
                    marks(plot);
                });
            Plot::new("dir_probe_auc")
                .height(190.0)
                .legend(Legend::default().position(Corner::LeftTop))
                .x_axis_label("layer (residual state)")
                .y_axis_label("held-out AUC / accuracy")
                .include_y(0.5)
                .include_y(1.0)
                .show(&mut cols[1], |plot| {
                    if let Some(p) = probes {
                        let auc: PlotPoints = p
                            .metrics
                            .iter()
                            .filter_map(|m| Some([m.layer as f64, m.test_auc? as f64]))
                            .collect();
                        let acc: PlotPoints = p
                            .metrics
                            .iter()
                            .map(|m| [m.layer as f64, m.test_accuracy as f64])
                            .collect();
                        plot.line(Line::new("probe AUC", auc).color(red));
                        plot.line(
                            Line::new("probe accuracy", acc).color(Color32::from_rgb(30, 120, 220)),
                        );
                    }
                    marks(plot);
                });
        });
        if let Some(p) = probes {
            self.calibration_plots(ui, p, self.layer.unwrap_or(d.layer), &marks);
        }
        let bottom = ui.cursor().min;
        self.plot_rect = Some(egui::Rect::from_min_max(
            top,
            egui::pos2(ui.max_rect().right(), bottom.y),
        ));
    }
}

impl DirectionsPanel {
    /// The probes' held-out log-loss per layer, raw and calibrated, and the reliability
    /// diagram of the curve layer's probe: how far `P(refuse)` can be read as a probability.
    fn calibration_plots(
        &self,
        ui: &mut egui::Ui,
        p: &ProbeSet,
        layer: usize,
        marks: &dyn Fn(&mut egui_plot::PlotUi),
    ) {
        let grey = Color32::from_gray(150);
        let blue = Color32::from_rgb(30, 120, 220);
        let orange = Color32::from_rgb(230, 130, 30);
        ui.columns(2, |cols| {
            Plot::new("dir_probe_logloss")
                .height(190.0)
                .legend(Legend::default().position(Corner::RightTop))
                .x_axis_label("layer (residual state)")
                .y_axis_label("held-out log-loss (nats)")
                .include_y(0.0)
                .show(&mut cols[0], |plot| {
                    let per_layer = |f: &dyn Fn(&LayerMetrics) -> f32| -> PlotPoints {
                        p.metrics
                            .iter()
                            .map(|m| [m.layer as f64, f(m) as f64])
                            .collect()
                    };
                    plot.line(
                        Line::new("raw probe", per_layer(&|m| m.test_uncalibrated.log_loss))
                            .color(orange),
                    );
                    plot.line(
                        Line::new(
                            format!("calibrated ({:?})", p.options.calibration),
                            per_layer(&|m| m.test_calibrated.log_loss),
                        )
                        .color(blue),
                    );
                    marks(plot);
                });
            let m = p.metrics.iter().find(|m| m.layer == layer);
            Plot::new("dir_reliability")
                .height(190.0)
                .legend(Legend::default().position(Corner::LeftTop))
                .x_axis_label(format!("predicted P(refuse), layer {layer}"))
                .y_axis_label("observed fraction refusing")
                .include_x(0.0)
                .include_x(1.0)
                .include_y(0.0)
                .include_y(1.0)
                .data_aspect(1.0)
                .show(&mut cols[1], |plot| {
                    plot.line(
                        Line::new("perfect calibration", vec![[0.0, 0.0], [1.0, 1.0]])
                            .color(grey)
                            .style(egui_plot::LineStyle::dashed_loose()),
                    );
                    let Some(m) = m else { return };
                    let bins = |c: &CalibrationMetrics| -> PlotPoints {
                        c.reliability
                            .iter()
                            .map(|b| [b.mean_predicted as f64, b.fraction_refusing as f64])
                            .collect()
                    };
                    for (name, c, color) in [
                        ("raw", &m.test_uncalibrated, orange),
                        ("calibrated", &m.test_calibrated, blue),
                    ] {
                        let label = format!("{name}: ECE {:.3}, log-loss {:.3}", c.ece, c.log_loss);
                        plot.line(Line::new(label.clone(), bins(c)).color(color));
                        plot.points(Points::new(label, bins(c)).color(color).radius(3.0));
                    }
                });
        });
        ui.weak(format!(
            "Probes trained on {} prompts, L2 and calibration chosen on {} held back, scored on {} held out (10 equal-width bins).",
            p.n_train, p.n_val, p.n_test
        ));
    }
}

fn directions_csv(d: &Directions, probes: Option<&ProbeSet>) -> String {
    let mut out = String::from(
        "layer,refusal_norm,refusal_separation,harmfulness_norm,harmfulness_separation,cosine,probe_test_auc,probe_test_accuracy,probe_test_log_loss,probe_test_ece,probe_test_log_loss_raw,probe_test_ece_raw,chosen\n",
    );
    for s in &d.stats {
        let m = probes.and_then(|p| p.metrics.iter().find(|m| m.layer == s.layer));
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            s.layer,
            s.refusal_norm,
            s.refusal_separation,
            s.harmfulness_norm,
            s.harmfulness_separation,
            s.cosine,
            m.and_then(|m| m.test_auc)
                .map_or(String::new(), |a| a.to_string()),
            m.map_or(String::new(), |m| m.test_accuracy.to_string()),
            m.map_or(String::new(), |m| m.test_calibrated.log_loss.to_string()),
            m.map_or(String::new(), |m| m.test_calibrated.ece.to_string()),
            m.map_or(String::new(), |m| m.test_uncalibrated.log_loss.to_string()),
            m.map_or(String::new(), |m| m.test_uncalibrated.ece.to_string()),
            s.layer == d.layer
        ));
    }
    out
}
