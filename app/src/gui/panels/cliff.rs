//! Cliff: the refusal trajectory of the current prompt + reply. Token chips coloured by the
//! probe's P(refuse), the score-vs-token plot (probe score and both direction projections)
//! with t_inst, t_post and the prompt/reply boundary marked, the selected token's scores
//! per layer, and the layers × positions heatmap. Pinned trajectories overlay the plot.

use egui::{Color32, Rect, Sense, Stroke, Vec2};
use egui_plot::{HoverPosition, Legend, Line, Plot, PlotPoints, VLine};
use refusal_lens_engine::analysis::steering::Steering;
use refusal_lens_engine::analysis::trajectory::{Segment, Trajectory};

use crate::gui::widgets::colors::{legend, score_color, text_on};
use crate::gui::widgets::export::Exporter;
use crate::gui::widgets::short;
use crate::worker::{Event, Job, JobId, Worker};

#[derive(Default)]
pub struct CliffPanel {
    job: Option<JobId>,
    pub trajectory: Option<Trajectory>,
    /// The prompt the trajectory belongs to (for the overlay legend).
    label: String,
    pinned: Vec<(String, Trajectory)>,
    /// With overlays, align every curve at the end of its reply.
    align_end: bool,
    /// Plot the system prompt and template header too (else from the user's text on).
    whole_prompt: bool,
    pub selected: Option<usize>,
    pub error: Option<String>,
    /// The interventions the current trajectory ran under (empty: none).
    steered: String,
    plot_rect: Option<Rect>,
    heatmap_rect: Option<Rect>,
    export: Exporter,
}

/// The first position the plots show: the user's text, or (whole prompt) everything after
/// the first token, whose residual norm is orders of magnitude larger than the rest (an
/// attention sink) and would flatten every curve.
/// The colour of a reasoning model's thinking text (plot band, chip labels).
const THINKING: Color32 = Color32::from_rgb(150, 110, 210);

/// Where the segment band lies below the scores (plot units).
const SEGMENT_BAND: [f64; 2] = [-0.1, -0.04];

fn segment_color(segment: Segment) -> Color32 {
    match segment {
        Segment::System => Color32::from_gray(140),
        Segment::User => Color32::from_rgb(30, 120, 220),
        Segment::Template => Color32::from_rgb(230, 150, 30),
        Segment::Thinking => THINKING,
        Segment::Reply => Color32::from_rgb(40, 140, 60),
    }
}

fn first_shown(t: &Trajectory, whole_prompt: bool) -> usize {
    let first = if whole_prompt { 1 } else { t.instruction_start };
    first.min(t.tokens.len().saturating_sub(1))
}

/// The curve chips and the cliff read: the probe score, else the refusal projection.
fn main_curve(t: &Trajectory) -> Option<&Vec<f32>> {
    t.score.as_ref().or(t.refusal.as_ref())
}

impl CliffPanel {
    pub fn is_running(&self) -> bool {
        self.job.is_some()
    }

    /// Asks the worker for the trajectory of `prompt` + `reply` at `layer`.
    pub fn request(
        &mut self,
        worker: &mut Worker,
        system: Option<String>,
        prompt: String,
        reply: Vec<u32>,
        steering: Steering,
        layer: Option<usize>,
    ) {
        self.label = short(&prompt, 40);
        if !steering.is_empty() {
            self.label.push_str(" (steered)");
        }
        self.steered = steering
            .edits
            .iter()
            .map(|e| e.describe())
            .collect::<Vec<_>>()
            .join("; ");
        self.error = None;
        self.job = Some(worker.submit(Job::Trajectory {
            system,
            prompt,
            reply,
            steering,
            layer,
        }));
    }

    pub fn owns(&self, event: &Event) -> bool {
        Some(event.id()) == self.job
    }

    pub fn on_event(&mut self, event: Event) {
        match event {
            Event::Trajectory { trajectory, .. } => {
                self.job = None;
                if self.selected.is_some_and(|s| s >= trajectory.tokens.len()) {
                    self.selected = None;
                }
                self.trajectory = Some(*trajectory);
            }
            Event::Failed { error, .. } => {
                self.job = None;
                self.error = Some(error);
            }
            _ => {}
        }
    }

    /// Forgets everything (a new model or new directions).
    pub fn clear(&mut self) {
        self.trajectory = None;
        self.pinned.clear();
        self.selected = None;
        self.job = None;
    }

    pub fn ui(&mut self, ui: &mut egui::Ui) {
        self.export.poll(ui.ctx());
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        let Some(t) = self.trajectory.clone() else {
            ui.label(if self.job.is_some() {
                "Scoring every token…"
            } else {
                "Compute or load directions (Directions tab), then generate a reply: its \
                 trajectory appears here."
            });
            return;
        };
        self.header(ui, &t);
        if !self.steered.is_empty() {
            ui.colored_label(
                Color32::from_rgb(230, 150, 30),
                format!("Steered: {}", self.steered),
            );
        }
        self.chips(ui, &t);
        self.plot(ui, &t);
        ui.columns(2, |cols| {
            self.per_layer(&mut cols[0], &t);
            self.heatmap(&mut cols[1], &t);
        });
    }

    fn header(&mut self, ui: &mut egui::Ui, t: &Trajectory) {
        ui.horizontal_wrapped(|ui| {
            let at_thinking = t.cliff_window.end != t.t_post + 1;
            ui.strong(format!(
                "Layer {} · cliff magnitude {} (k = {}) · score at {} {}",
                t.layer,
                t.cliff.map_or("—".into(), |c| format!("{c:.3}")),
                t.cliff_k,
                if at_thinking { "end of thinking" } else { "t_post" },
                t.final_score.map_or("—".into(), |c| format!("{c:.3}")),
            ))
            .on_hover_text(
                "Cliff magnitude: over the window from the first instruction token to t_post \
                 (for a reasoning model's reply: to the last thinking token before </think>), \
                 the highest score before the final k tokens minus the mean of the final k.",
            );
            if self.job.is_some() {
                ui.weak("scoring…");
            }
            if ui
                .button("Pin for overlay")
                .on_hover_text("Keep this trajectory on the plot while you try other prompts")
                .clicked()
            {
                self.pinned.push((self.label.clone(), t.clone()));
            }
            ui.checkbox(&mut self.whole_prompt, "whole prompt")
                .on_hover_text("Also plot the system prompt and chat header (the first token, an attention sink, is never plotted)");
            if !self.pinned.is_empty() {
                ui.checkbox(&mut self.align_end, "align at end of reply");
                if ui
                    .button(format!("Clear {} pinned", self.pinned.len()))
                    .clicked()
                {
                    self.pinned.clear();
                }
            }
            let csv = || trajectory_csv(t);
            self.export.buttons(ui, "trajectory", self.plot_rect, csv);
            if let Some(m) = &self.export.message {
                ui.weak(m);
            }
        });
    }

    fn chips(&mut self, ui: &mut egui::Ui, t: &Trajectory) {
        let curve = main_curve(t);
        legend(
            ui,
            if t.score.is_some() {
                "probe P(refuse):"
            } else {
                "refusal projection:"
            },
        );
        egui::ScrollArea::vertical()
            .id_salt("cliff_chips")
            .max_height(120.0)
            .show(ui, |ui| {
                ui.horizontal_wrapped(|ui| {
                    ui.spacing_mut().item_spacing = Vec2::new(1.0, 2.0);
                    let thinking = t.thinking.map(|s| s.tokens(t.tokens.len()));
                    for (i, tok) in t.tokens.iter().enumerate() {
                        if i == t.prompt_len {
                            ui.separator();
                        }
                        if thinking.as_ref().is_some_and(|r| r.start == i) {
                            ui.label(
                                egui::RichText::new("thinking →")
                                    .color(THINKING)
                                    .monospace(),
                            );
                        }
                        if thinking.as_ref().is_some_and(|r| r.end == i && i > r.start) {
                            ui.label(egui::RichText::new("← answer").color(THINKING).monospace());
                        }
                        let p = curve.map_or(f32::NAN, |c| c[i]);
                        let shown = tok.text.replace('\n', "↵").replace('\u{FFFD}', "¿");
                        let mut text = egui::RichText::new(if shown.is_empty() {
                            "(empty)".into()
                        } else {
                            shown
                        })
                        .monospace()
                        .color(text_on(p))
                        .background_color(score_color(p));
                        if thinking.as_ref().is_some_and(|r| r.contains(&i)) {
                            text = text.italics();
                        }
                        if self.selected == Some(i) {
                            text = text.underline().strong();
                        }
                        let r = ui
                            .add(egui::Label::new(text).sense(Sense::click()))
                            .on_hover_text(token_tooltip(t, i));
                        if r.clicked() {
                            self.selected = Some(i);
                        }
                    }
                });
            });
    }

    fn plot(&mut self, ui: &mut egui::Ui, t: &Trajectory) {
        let aligned = self.align_end && !self.pinned.is_empty();
        let shift = |tr: &Trajectory| {
            if aligned {
                -((tr.tokens.len() - 1) as f64)
            } else {
                0.0
            }
        };
        let whole = self.whole_prompt;
        let series = |v: &[f32], tr: &Trajectory, dx: f64| -> PlotPoints {
            v.iter()
                .enumerate()
                .skip(first_shown(tr, whole))
                .map(|(i, y)| [i as f64 + dx, *y as f64])
                .collect()
        };
        let dx = shift(t);
        let tokens = t.tokens.clone();
        let response = Plot::new("cliff_plot")
            .height(260.0)
            .legend(Legend::default().position(egui_plot::Corner::LeftBottom))
            .x_axis_label(if aligned {
                "token position relative to the end of the reply"
            } else {
                "token position"
            })
            .y_axis_label("score")
            .include_y(SEGMENT_BAND[0])
            .include_y(1.0)
            .label_formatter(move |pos| match pos {
                HoverPosition::NearDataPoint {
                    plot_name,
                    position,
                    ..
                } if plot_name.starts_with("pinned") => Some(format!(
                    "{plot_name}\nposition {:.0}\n{:.3}",
                    position.x, position.y
                )),
                HoverPosition::NearDataPoint {
                    plot_name,
                    position,
                    ..
                } => {
                    let i = (position.x - dx).round() as usize;
                    let text = tokens
                        .get(i)
                        .map_or(String::new(), |t| format!("{:?}", t.text));
                    Some(format!("{plot_name}\n#{i} {text}\n{:.3}", position.y))
                }
                HoverPosition::Elsewhere { .. } => None,
            })
            .show(ui, |plot| {
                if let Some(s) = &t.score {
                    plot.line(
                        Line::new("probe P(refuse)", series(s, t, dx))
                            .color(Color32::from_rgb(200, 50, 45))
                            .width(2.0),
                    );
                }
                if let Some(r) = &t.refusal {
                    plot.line(
                        Line::new(
                            "refusal projection (0 = harmless mean, 1 = harmful)",
                            series(r, t, dx),
                        )
                        .color(Color32::from_rgb(230, 150, 30)),
                    );
                }
                if let Some(h) = &t.harmfulness {
                    plot.line(
                        Line::new("harmfulness projection (same scale)", series(h, t, dx))
                            .color(Color32::from_rgb(120, 80, 200)),
                    );
                }
                for (name, p) in &self.pinned {
                    if let Some(c) = main_curve(p) {
                        plot.line(
                            Line::new(format!("pinned: {name}"), series(c, p, shift(p))).width(1.0),
                        );
                    }
                }
                // The thinking text of a reasoning model's reply, shaded.
                if let Some(span) = t.thinking {
                    let r = span.tokens(t.tokens.len());
                    if r.end > r.start {
                        let (x0, x1) = (r.start as f64 - 0.5 + dx, r.end as f64 - 0.5 + dx);
                        plot.polygon(
                            egui_plot::Polygon::new(
                                "thinking",
                                PlotPoints::new(vec![[x0, 0.0], [x1, 0.0], [x1, 1.0], [x0, 1.0]]),
                            )
                            .fill_color(THINKING.gamma_multiply(0.15))
                            .stroke(egui::Stroke::NONE),
                        );
                    }
                }
                // The segments along the bottom of the x axis: where the system message,
                // the user's text, the template, the thinking and the reply lie.
                let first = first_shown(t, whole);
                for (segment, r) in t.segments() {
                    let (start, end) = (r.start.max(first), r.end);
                    if end <= start {
                        continue;
                    }
                    let (x0, x1) = (start as f64 - 0.5 + dx, end as f64 - 0.5 + dx);
                    let [y0, y1] = SEGMENT_BAND;
                    let color = segment_color(segment);
                    plot.polygon(
                        egui_plot::Polygon::new(
                            "",
                            PlotPoints::new(vec![[x0, y0], [x1, y0], [x1, y1], [x0, y1]]),
                        )
                        .fill_color(color.gamma_multiply(0.6))
                        .stroke(egui::Stroke::NONE),
                    );
                    plot.text(
                        egui_plot::Text::new("", egui_plot::PlotPoint::new(x0, y0), segment.name())
                            .color(color)
                            .anchor(egui::Align2::LEFT_TOP),
                    );
                }
                // Position markers are labelled in the plot, not the legend, which keeps the
                // legend to the curves.
                let grey = Color32::from_gray(150);
                let green = Color32::from_rgb(40, 140, 60);
                let blue = Color32::from_rgb(30, 120, 220);
                let mut marks = vec![
                    ("t_inst", t.t_inst as f64 + dx, grey),
                    ("t_post", t.t_post as f64 + dx, grey),
                    ("reply", t.prompt_len as f64 - 0.5 + dx, green),
                ];
                if t.cliff_window.end != t.t_post + 1 {
                    let end = (t.cliff_window.end - 1) as f64 + dx;
                    marks.push(("end of thinking", end, THINKING));
                }
                if let Some(s) = self.selected {
                    marks.push(("selected", s as f64 + dx, blue));
                }
                let bounds = plot.plot_bounds();
                let (top, step) = (bounds.max()[1], (bounds.max()[1] - bounds.min()[1]) * 0.07);
                // Stagger the labels: the markers are often one token apart.
                for (k, (label, x, color)) in marks.into_iter().enumerate() {
                    let y = top - step * k as f64;
                    plot.vline(VLine::new("", x).color(color));
                    // The end of thinking is the last token before the answer: label it to
                    // its left so the text stays inside the plot.
                    let anchor = if label == "end of thinking" {
                        egui::Align2::RIGHT_TOP
                    } else {
                        egui::Align2::LEFT_TOP
                    };
                    plot.text(
                        egui_plot::Text::new("", egui_plot::PlotPoint::new(x, y), label)
                            .color(color)
                            .anchor(anchor),
                    );
                }
            });
        self.plot_rect = Some(response.response.rect);
    }

    fn per_layer(&mut self, ui: &mut egui::Ui, t: &Trajectory) {
        let Some(sel) = self.selected else {
            ui.label("Click a token to see its probe score at every layer.");
            return;
        };
        let text = t.tokens.get(sel).map_or(String::new(), |x| x.text.clone());
        ui.label(format!("Token #{sel} {text:?}: probe P(refuse) by layer"));
        if t.heatmap.is_empty() {
            ui.label("No probes loaded.");
            return;
        }
        let points: PlotPoints = t
            .heatmap_layers
            .iter()
            .zip(&t.heatmap)
            .map(|(l, row)| [*l as f64, row[sel] as f64])
            .collect();
        Plot::new("cliff_per_layer")
            .height(180.0)
            .x_axis_label("layer (residual state)")
            .y_axis_label("P(refuse)")
            .include_y(0.0)
            .include_y(1.0)
            .show(ui, |plot| {
                plot.line(
                    Line::new("probe P(refuse)", points).color(Color32::from_rgb(200, 50, 45)),
                );
                plot.vline(VLine::new("curve layer", t.layer as f64));
            });
    }

    fn heatmap(&mut self, ui: &mut egui::Ui, t: &Trajectory) {
        ui.label("Probe P(refuse): layers × positions (click a cell to select its token)");
        if t.heatmap.is_empty() {
            ui.label("No probes loaded.");
            return;
        }
        let rows = t.heatmap.len();
        let first = first_shown(t, self.whole_prompt);
        let cols = t.tokens.len() - first;
        let axis = 28.0;
        let size = Vec2::new(ui.available_width().max(120.0), 180.0);
        let (rect, response) = ui.allocate_exact_size(size, Sense::click());
        self.heatmap_rect = Some(rect);
        let grid = Rect::from_min_max(
            rect.min + Vec2::new(axis, 0.0),
            rect.max - Vec2::new(0.0, 16.0),
        );
        let painter = ui.painter_at(rect);
        let (cw, ch) = (grid.width() / cols as f32, grid.height() / rows as f32);
        // Layer 0 at the bottom, like the per-layer plots.
        let cell = |r: usize, c: usize| {
            Rect::from_min_size(
                egui::pos2(
                    grid.left() + c as f32 * cw,
                    grid.bottom() - (r + 1) as f32 * ch,
                ),
                Vec2::new(cw.max(1.0), ch.max(1.0)),
            )
        };
        for (r, row) in t.heatmap.iter().enumerate() {
            for (c, p) in row[first..].iter().enumerate() {
                painter.rect_filled(cell(r, c), 0.0, score_color(*p));
            }
        }
        let stroke = Stroke::new(1.5, Color32::from_rgb(40, 140, 60));
        let x_boundary = grid.left() + (t.prompt_len - first) as f32 * cw;
        painter.line_segment(
            [
                egui::pos2(x_boundary, grid.top()),
                egui::pos2(x_boundary, grid.bottom()),
            ],
            stroke,
        );
        if let Some(s) = self.selected.filter(|s| *s >= first).map(|s| s - first) {
            let col = Rect::from_min_max(
                egui::pos2(grid.left() + s as f32 * cw, grid.top()),
                egui::pos2(grid.left() + (s + 1) as f32 * cw, grid.bottom()),
            );
            painter.rect_stroke(
                col,
                0.0,
                Stroke::new(2.0, Color32::from_rgb(30, 120, 220)),
                egui::StrokeKind::Outside,
            );
        }
        let font = egui::FontId::proportional(10.0);
        let ink = ui.visuals().text_color();
        for (r, l) in t.heatmap_layers.iter().enumerate() {
            if r % 5 == 0 || r + 1 == rows {
                painter.text(
                    egui::pos2(grid.left() - 3.0, cell(r, 0).center().y),
                    egui::Align2::RIGHT_CENTER,
                    l.to_string(),
                    font.clone(),
                    ink,
                );
            }
        }
        painter.text(
            rect.left_top(),
            egui::Align2::LEFT_TOP,
            "layer",
            font.clone(),
            ink,
        );
        painter.text(
            egui::pos2(grid.center().x, rect.bottom()),
            egui::Align2::CENTER_BOTTOM,
            format!(
                "token position ({first}–{}), reply after the green line",
                t.tokens.len() - 1
            ),
            font,
            ink,
        );
        let hit = |pos: egui::Pos2| {
            grid.contains(pos).then(|| {
                let c = first + (((pos.x - grid.left()) / cw) as usize).min(cols - 1);
                let r = (((grid.bottom() - pos.y) / ch) as usize).min(rows - 1);
                (r, c)
            })
        };
        if let Some((r, c)) = response.hover_pos().and_then(hit) {
            response.clone().on_hover_text(format!(
                "layer {} · #{c} {:?} · P(refuse) {:.3}",
                t.heatmap_layers[r], t.tokens[c].text, t.heatmap[r][c]
            ));
        }
        if response.clicked() {
            if let Some((_, c)) = response.interact_pointer_pos().and_then(hit) {
                self.selected = Some(c);
            }
        }
    }
}

fn token_tooltip(t: &Trajectory, i: usize) -> String {
    let v = |x: &Option<Vec<f32>>| x.as_ref().map_or("—".into(), |v| format!("{:.3}", v[i]));
    format!(
        "#{i} {:?} (id {})\nprobe P(refuse) {}\nrefusal projection {}\nharmfulness projection {}{}",
        t.tokens[i].text,
        t.tokens[i].id,
        v(&t.score),
        v(&t.refusal),
        v(&t.harmfulness),
        if i == t.t_inst {
            "\nt_inst"
        } else if i == t.t_post {
            "\nt_post"
        } else if t
            .thinking
            .is_some_and(|s| s.tokens(t.tokens.len()).contains(&i))
        {
            "\nthinking"
        } else {
            ""
        }
    )
}

fn trajectory_csv(t: &Trajectory) -> String {
    let mut out = String::from(
        "position,token_id,token,segment,in_reply,in_thinking,probe_p_refuse,refusal_projection,harmfulness_projection",
    );
    for l in &t.heatmap_layers {
        out.push_str(&format!(",probe_layer_{l}"));
    }
    out.push('\n');
    let v = |x: &Option<Vec<f32>>, i: usize| x.as_ref().map_or(String::new(), |v| v[i].to_string());
    let thinking = t.thinking.map(|s| s.tokens(t.tokens.len()));
    let segments = t.segments();
    for (i, tok) in t.tokens.iter().enumerate() {
        out.push_str(&format!(
            "{i},{},\"{}\",{},{},{},{},{},{}",
            tok.id,
            tok.text.replace('"', "\"\""),
            segments
                .iter()
                .find(|(_, r)| r.contains(&i))
                .map_or("", |(s, _)| s.name()),
            i >= t.prompt_len,
            thinking.as_ref().is_some_and(|r| r.contains(&i)),
            v(&t.score, i),
            v(&t.refusal, i),
            v(&t.harmfulness, i)
        ));
        for row in &t.heatmap {
            out.push_str(&format!(",{}", row[i]));
        }
        out.push('\n');
    }
    out
}
