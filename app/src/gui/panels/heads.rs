//! Heads: the layers × heads heatmap of one metric for a harmful/harmless pair (DLA
//! difference, interchange necessity or sufficiency, ablation effect), on a diverging colour
//! scale centred on zero. Hover a cell for the head's name and every metric; click it to
//! toggle the head's ablation: it joins the intervention stack (the Steering tab lists it) and
//! the reply to the current prompt and its refusal score are regenerated at once.

use egui::{Color32, Rect, Sense, Stroke, Vec2};
use refusal_lens_engine::analysis::steering::{Edit, HeadAblation};
use refusal_lens_engine::data::prompts::{PromptSet, Split};

use refusal_lens_engine::analysis::heads::HeadMetrics;

use super::steering::ReplyView;
use crate::gui::session::Session;
use crate::gui::widgets::colors::score_color;
use crate::gui::widgets::export::Exporter;
use crate::gui::widgets::progress_with_cancel;
use crate::worker::{Event, GenerateRequest, Job, JobId, Worker};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Metric {
    #[default]
    Dla,
    Necessity,
    Sufficiency,
    Attribution,
    Ablation,
    Cipher,
    Cascade,
}

impl Metric {
    const ALL: [Metric; 7] = [
        Metric::Dla,
        Metric::Necessity,
        Metric::Sufficiency,
        Metric::Attribution,
        Metric::Ablation,
        Metric::Cipher,
        Metric::Cascade,
    ];

    fn name(self) -> &'static str {
        match self {
            Metric::Dla => "DLA (harmful − harmless)",
            Metric::Necessity => "interchange necessity",
            Metric::Sufficiency => "interchange sufficiency",
            Metric::Attribution => "attribution patching (necessity estimate)",
            Metric::Ablation => "zero-ablation effect on refusal score",
            Metric::Cipher => "cipher contrast (DLA plain − Caesar)",
            Metric::Cascade => "knockout cascade (DLA change, gate zeroed)",
        }
    }

    fn of(self, m: &HeadMetrics, l: usize, h: usize) -> f32 {
        match self {
            Metric::Dla => m.dla.get(l, h),
            Metric::Necessity => m.necessity.get(l, h),
            Metric::Sufficiency => m.sufficiency.get(l, h),
            Metric::Attribution => m.attribution.get(l, h),
            Metric::Ablation => m.ablation.get(l, h),
            Metric::Cipher => m.cipher.as_ref().map_or(0.0, |c| c.get(l, h)),
            Metric::Cascade => m.cascade.get(l, h),
        }
    }
}

/// The heatmap's diverging scale with its numeric ends.
fn heatmap_legend(ui: &mut egui::Ui, metric: &str, scale: f32) {
    ui.horizontal_wrapped(|ui| {
        ui.label(format!("{metric}:"));
        ui.label(format!("{:+.3}", -scale));
        let (r, _) = ui.allocate_exact_size(Vec2::new(160.0, 14.0), Sense::hover());
        for i in 0..40 {
            let t = (i as f32 + 0.5) / 40.0;
            let cell = Rect::from_min_max(
                egui::pos2(r.left() + r.width() * i as f32 / 40.0, r.top()),
                egui::pos2(r.left() + r.width() * (i + 1) as f32 / 40.0, r.bottom()),
            );
            ui.painter()
                .rect_filled(cell, 0.0, diverging((t * 2.0 - 1.0) * scale, scale));
        }
        ui.label(format!("{:+.3}", scale));
        ui.weak("· crossed cell = ablated · click a cell to toggle");
    });
}

/// Marks an ablated head's cell: a cross and a blue outline.
fn cross_out(painter: &egui::Painter, c: Rect) {
    let s = Stroke::new(2.0, Color32::BLACK);
    painter.line_segment(
        [
            c.left_top() + Vec2::splat(2.0),
            c.right_bottom() - Vec2::splat(2.0),
        ],
        s,
    );
    painter.line_segment(
        [
            c.right_top() + Vec2::new(-2.0, 2.0),
            c.left_bottom() + Vec2::new(2.0, -2.0),
        ],
        s,
    );
    painter.rect_stroke(
        c,
        0.0,
        Stroke::new(1.5, Color32::from_rgb(30, 120, 220)),
        egui::StrokeKind::Inside,
    );
}

/// Blue (negative) – white (0) – red (positive), `v / scale` clamped to ±1.
fn diverging(v: f32, scale: f32) -> Color32 {
    score_color(0.5 + 0.5 * (v / scale.max(1e-9)).clamp(-1.0, 1.0))
}

const HEATMAP_AXIS: f32 = 30.0;
const HEATMAP_CELL_H: f32 = 14.0;
/// The heatmap never grows wider than this, so the replies fit beside it.
const HEATMAP_MAX_WIDTH: f32 = 420.0;

#[derive(Default)]
pub struct HeadsPanel {
    pub metric: Metric,
    pair: usize,
    /// Average over this many pairs, from the chosen one on.
    pub n_pairs: usize,
    job: Option<JobId>,
    progress: (String, usize, usize),
    pub metrics: Option<HeadMetrics>,
    pub error: Option<String>,
    /// Percent of heads "ablate top k%" takes.
    top_percent: f32,
    /// The reply regenerated under the stack after an ablation change …
    pub reply_job: Option<JobId>,
    pub reply: ReplyView,
    /// … beside the reply with no edits (regenerated when the prompt changes).
    pub before: ReplyView,
    before_for: Option<String>,
    /// Set when a click changed the ablations: regenerate the reply.
    changed: bool,
    /// A shift-clicked head to compute the knockout cascade of.
    gate_request: Option<(usize, usize)>,
    export: Exporter,
    heatmap_rect: Option<Rect>,
}

impl HeadsPanel {
    pub fn is_running(&self) -> bool {
        self.job.is_some() || self.reply_job.is_some()
    }

    pub fn owns(&self, event: &Event) -> bool {
        self.owns_id(event.id())
    }

    pub fn owns_id(&self, id: JobId) -> bool {
        Some(id) == self.job || Some(id) == self.reply_job
    }

    pub fn on_event(&mut self, event: Event) {
        match event {
            Event::Progress { progress, .. } => {
                self.progress = (progress.phase, progress.done, progress.total)
            }
            Event::HeadsReady { metrics, .. } => {
                self.job = None;
                self.metrics = Some(*metrics);
            }
            Event::Cascade { gate, cascade, .. } => {
                self.job = None;
                if let Some(m) = &mut self.metrics {
                    m.cascade = cascade;
                    m.cascade_gate = gate;
                }
                self.metric = Metric::Cascade;
            }
            Event::Token { .. } | Event::Steered { .. } => {
                let finished = ReplyView::follow_pair(&mut self.before, &mut self.reply, event);
                if finished {
                    self.reply_job = None;
                }
            }
            Event::Failed { id, error } => {
                if Some(id) == self.job {
                    self.job = None;
                }
                if Some(id) == self.reply_job {
                    self.reply_job = None;
                }
                self.error = Some(error);
            }
            _ => {}
        }
    }

    pub fn clear(&mut self) {
        self.metrics = None;
        self.job = None;
        self.reply_job = None;
        self.reply = ReplyView::default();
        self.before = ReplyView::default();
        self.before_for = None;
    }

    /// Where cell `(l, h)` was drawn last frame (for scripted clicks).
    pub fn cell_center(&self, l: usize, h: usize) -> Option<egui::Pos2> {
        let rect = self.heatmap_rect?;
        let m = self.metrics.as_ref()?;
        let grid = Rect::from_min_max(
            rect.min + Vec2::new(HEATMAP_AXIS, 0.0),
            rect.max - Vec2::new(0.0, 18.0),
        );
        let cw = grid.width() / m.dla.n_heads as f32;
        Some(egui::pos2(
            grid.left() + (h as f32 + 0.5) * cw,
            grid.bottom() - (l as f32 + 0.5) * HEATMAP_CELL_H,
        ))
    }

    fn ablated(extra: &[Edit], l: usize, h: usize) -> Option<usize> {
        extra.iter().position(
            |e| matches!(e, Edit::AblateHead { layer, head, .. } if *layer == l && *head == h),
        )
    }

    /// Toggles the zero ablation of head `(l, h)` in the stack's extra edits.
    pub fn toggle(&mut self, extra: &mut Vec<Edit>, l: usize, h: usize) {
        match Self::ablated(extra, l, h) {
            Some(i) => {
                extra.remove(i);
            }
            None => extra.push(Edit::AblateHead {
                layer: l,
                head: h,
                how: HeadAblation::Zero,
            }),
        }
        self.changed = true;
    }

    pub fn ui(
        &mut self,
        ui: &mut egui::Ui,
        worker: &mut Worker,
        session: &mut Session,
        sets: &[PromptSet],
        base: &GenerateRequest,
    ) {
        self.export.poll(ui.ctx());
        self.pair_controls(ui, worker, sets, session.model_ready);
        let Some(m) = self.metrics.clone() else {
            return;
        };
        if self.top_percent < 1.0 {
            self.top_percent = 3.0; // the published "top ~3%"
        }
        ui.horizontal_wrapped(|ui| {
            ui.label("metric:");
            for metric in Metric::ALL {
                ui.selectable_value(&mut self.metric, metric, metric.name());
            }
        });
        summary(ui, &m, self.metric);
        self.ablation_controls(ui, &m, &mut session.extra_edits);
        // The heatmap and, beside it, what a click does to the current prompt's reply.
        ui.columns(2, |cols| {
            self.heatmap(&mut cols[0], &m, &mut session.extra_edits);
            if !self.reply.label.is_empty() {
                let ui = &mut cols[1];
                ui.label(format!("Prompt: {:?}", base.prompt));
                self.before.ui(ui);
                ui.separator();
                self.reply.ui(ui);
            }
        });
        if let Some(gate) = self.gate_request.take() {
            if self.job.is_none() {
                self.progress = ("knockout cascade".into(), 0, 1);
                self.job = Some(worker.submit(Job::Cascade {
                    harmful: m.harmful.clone(),
                    gate,
                }));
            }
        }
        if std::mem::take(&mut self.changed)
            && session.model_ready
            && !base.prompt.trim().is_empty()
        {
            let n = session
                .extra_edits
                .iter()
                .filter(|e| matches!(e, Edit::AblateHead { .. }))
                .count();
            self.reply = ReplyView {
                label: format!("after: {n} head(s) ablated (and the rest of the stack)"),
                ..Default::default()
            };
            // A click cancels the job in flight: a "before" it had not finished is redone.
            let before =
                self.before_for.as_deref() != Some(base.prompt.as_str()) || !self.before.done;
            if before {
                self.before = ReplyView {
                    label: "before: no edits".into(),
                    ..Default::default()
                };
                self.before_for = Some(base.prompt.clone());
            }
            let request = GenerateRequest {
                steering: session.stack(),
                max_new_tokens: 48,
                ..base.clone()
            };
            self.reply_job = Some(worker.submit(Job::Steer {
                request,
                baseline: before,
                // A head click is a jump, not a step along a slider.
                ahead: Vec::new(),
            }));
        }
    }

    /// The pair picker, Compute and the job's progress.
    fn pair_controls(
        &mut self,
        ui: &mut egui::Ui,
        worker: &mut Worker,
        sets: &[PromptSet],
        model_ready: bool,
    ) {
        let find = |name: &str| sets.iter().find(|s| s.name == name);
        let pairs = match (find("harmful"), find("harmless")) {
            (Some(a), Some(b)) => a.pairs_with(b, Split::Test),
            _ => Vec::new(),
        };
        ui.horizontal_wrapped(|ui| {
            if pairs.is_empty() {
                ui.label("Load the harmful and harmless sample sets (with pair ids) to pick a pair.");
                return;
            }
            self.pair = self.pair.min(pairs.len() - 1);
            egui::ComboBox::new("heads_pair", "pair")
                .width(360.0)
                .selected_text(pairs[self.pair].0.clone())
                .show_ui(ui, |ui| {
                    for (i, (a, _)) in pairs.iter().enumerate() {
                        ui.selectable_value(&mut self.pair, i, a.clone());
                    }
                });
            ui.add(
                egui::DragValue::new(&mut self.n_pairs)
                    .range(1..=pairs.len().min(20))
                    .prefix("mean over ")
                    .suffix(" pair(s)"),
            )
            .on_hover_text("Average every metric over this many test pairs, from the chosen one on (about 10 s per pair)");
            let can = model_ready && self.job.is_none();
            if ui
                .add_enabled(can, egui::Button::new("Compute"))
                .on_hover_text("DLA, exact interchange both ways and zero ablation for every head (about 10 s on 2 cores)")
                .clicked()
            {
                self.error = None;
                self.progress = ("starting".into(), 0, 1);
                let chosen: Vec<(String, String)> =
                    pairs.iter().skip(self.pair).take(self.n_pairs.max(1)).cloned().collect();
                self.job = Some(worker.submit(Job::Heads { pairs: chosen }));
            }
            if self.job.is_some() {
                let (phase, done, total) = &self.progress;
                if progress_with_cancel(ui, *done, *total, format!("{phase}: {done} / {total}")) {
                    worker.cancel_analyses();
                }
            }
        });
        if !pairs.is_empty() {
            ui.weak(format!("harmless twin: {}", pairs[self.pair].1));
        }
    }

    /// "Ablate top k%" of the metric shown, and clearing the ablations.
    fn ablation_controls(&mut self, ui: &mut egui::Ui, m: &HeadMetrics, extra: &mut Vec<Edit>) {
        ui.horizontal_wrapped(|ui| {
            ui.add(
                egui::Slider::new(&mut self.top_percent, 1.0..=20.0)
                    .suffix(" %")
                    .text("top"),
            );
            if ui
                .button("Ablate top k%")
                .on_hover_text("Zero-ablate the heads with the largest values of this metric")
                .clicked()
            {
                let n = ((m.dla.values.len() as f32 * self.top_percent / 100.0).round() as usize)
                    .max(1);
                let mut ranked: Vec<(usize, usize, f32)> = (0..m.dla.n_layers)
                    .flat_map(|l| (0..m.dla.n_heads).map(move |h| (l, h)))
                    .map(|(l, h)| (l, h, self.metric.of(m, l, h)))
                    .collect();
                ranked.sort_by(|a, b| b.2.total_cmp(&a.2));
                for (l, h, _) in ranked.into_iter().take(n) {
                    if Self::ablated(extra, l, h).is_none() {
                        self.toggle(extra, l, h);
                    }
                }
            }
            let n_ablated = extra
                .iter()
                .filter(|e| matches!(e, Edit::AblateHead { .. }))
                .count();
            if ui
                .add_enabled(
                    n_ablated > 0,
                    egui::Button::new(format!("Clear ablations ({n_ablated})")),
                )
                .clicked()
            {
                extra.retain(|e| !matches!(e, Edit::AblateHead { .. }));
                self.changed = true;
            }
            let csv = || heads_csv(m);
            self.export.buttons(ui, "heads", self.heatmap_rect, csv);
            if let Some(msg) = &self.export.message {
                ui.weak(msg);
            }
        });
    }

    fn heatmap(&mut self, ui: &mut egui::Ui, m: &HeadMetrics, extra: &mut Vec<Edit>) {
        let (rows, cols) = (m.dla.n_layers, m.dla.n_heads);
        let value = |l: usize, h: usize| self.metric.of(m, l, h);
        let scale = (0..rows)
            .flat_map(|l| (0..cols).map(move |h| (l, h)))
            .map(|(l, h)| value(l, h).abs())
            .fold(0.0f32, f32::max);
        heatmap_legend(ui, self.metric.name(), scale);
        let (axis, cell_h) = (HEATMAP_AXIS, HEATMAP_CELL_H);
        let size = Vec2::new(
            ui.available_width().min(HEATMAP_MAX_WIDTH),
            rows as f32 * cell_h + 18.0,
        );
        let (rect, response) = ui.allocate_exact_size(size, Sense::click());
        self.heatmap_rect = Some(rect);
        let grid = Rect::from_min_max(
            rect.min + Vec2::new(axis, 0.0),
            rect.max - Vec2::new(0.0, 18.0),
        );
        let cw = grid.width() / cols as f32;
        let cell = |l: usize, h: usize| {
            // Layer 0 at the bottom.
            Rect::from_min_size(
                egui::pos2(
                    grid.left() + h as f32 * cw,
                    grid.bottom() - (l + 1) as f32 * cell_h,
                ),
                Vec2::new(cw, cell_h),
            )
        };
        let painter = ui.painter_at(rect);
        let ink = ui.visuals().text_color();
        let font = egui::FontId::proportional(10.0);
        for l in 0..rows {
            for h in 0..cols {
                let c = cell(l, h);
                painter.rect_filled(c.shrink(0.5), 0.0, diverging(value(l, h), scale));
                if Self::ablated(extra, l, h).is_some() {
                    cross_out(&painter, c);
                }
            }
            if l % 5 == 0 || l + 1 == rows {
                painter.text(
                    egui::pos2(grid.left() - 3.0, cell(l, 0).center().y),
                    egui::Align2::RIGHT_CENTER,
                    format!("L{l}"),
                    font.clone(),
                    ink,
                );
            }
        }
        for h in 0..cols {
            painter.text(
                egui::pos2(cell(0, h).center().x, grid.bottom() + 2.0),
                egui::Align2::CENTER_TOP,
                format!("H{h}"),
                font.clone(),
                ink,
            );
        }
        let hit = |pos: egui::Pos2| {
            grid.contains(pos).then(|| {
                let h = (((pos.x - grid.left()) / cw) as usize).min(cols - 1);
                let l = (((grid.bottom() - pos.y) / cell_h) as usize).min(rows - 1);
                (l, h)
            })
        };
        if let Some((l, h)) = response.hover_pos().and_then(hit) {
            let [dla, necessity, sufficiency, attribution, ablation, cipher, cascade] =
                head_values(m, l, h);
            response.clone().on_hover_text(format!(
                "L{l}.H{h}\nDLA {dla:+.4}\nnecessity {necessity:+.4}\nsufficiency {sufficiency:+.4}\nattribution estimate {attribution:+.4}\nzero-ablation Δ refusal score {ablation:+.4}\ncipher contrast {cipher:+.4}\ncascade (gate L{}.H{}) {cascade:+.4}{}",
                m.cascade_gate.0,
                m.cascade_gate.1,
                if Self::ablated(extra, l, h).is_some() { "\n(ablated)" } else { "" }
            ));
        }
        if response.clicked() {
            if let Some((l, h)) = response.interact_pointer_pos().and_then(hit) {
                if ui.input(|i| i.modifiers.shift) {
                    self.gate_request = Some((l, h));
                } else {
                    self.toggle(extra, l, h);
                }
            }
        }
        if m.cascade_gate.0 < rows {
            let c = cell(m.cascade_gate.0, m.cascade_gate.1);
            painter.rect_stroke(
                c,
                0.0,
                Stroke::new(2.0, Color32::from_rgb(40, 140, 60)),
                egui::StrokeKind::Inside,
            );
        }
    }
}

/// Head (l, h) under every metric, in the order of the CSV columns: DLA, necessity,
/// sufficiency, attribution, zero-ablation Δ, cipher contrast (NaN when it failed), cascade.
fn head_values(m: &HeadMetrics, l: usize, h: usize) -> [f32; 7] {
    [
        m.dla.get(l, h),
        m.necessity.get(l, h),
        m.sufficiency.get(l, h),
        m.attribution.get(l, h),
        m.ablation.get(l, h),
        m.cipher.as_ref().map_or(f32::NAN, |c| c.get(l, h)),
        m.cascade.get(l, h),
    ]
}

/// Which pair(s), the clean scores, attribution quality, and the routing found.
fn summary(ui: &mut egui::Ui, m: &HeadMetrics, metric: Metric) {
    if let (Metric::Cipher, Err(e)) = (metric, &m.cipher) {
        ui.colored_label(
            ui.visuals().warn_fg_color,
            format!("No cipher contrast: {e}"),
        );
    }
    ui.label(format!(
            "{:?} vs {:?}{}: clean refusal score {:.2} vs {:.2} · attribution vs exact necessity r = {:.3} · computed in {:.1} s",
            m.harmful,
            m.harmless,
            if m.pairs > 1 { format!(" and {} more pairs (means)", m.pairs - 1) } else { String::new() },
            m.clean_harmful,
            m.clean_harmless,
            m.attribution_r,
            m.seconds
        ));
    let r = &m.routing;
    let amps: Vec<String> = r
        .amplifiers
        .iter()
        .map(|(l, h, c, d)| format!("L{l}.H{h} ({c:+.2} to {:+.2})", c + d))
        .collect();
    ui.label(format!(
            "Gate (25–65% depth, high necessity, small DLA): L{}.H{} (necessity {:.3}, DLA {:+.3}) · amplifiers losing ≥ 25% of their DLA without it: {} · cascade shown for L{}.H{} (green outline; shift-click a cell to knock out another gate)",
            r.gate.0,
            r.gate.1,
            r.gate_necessity,
            r.gate_dla,
            if amps.is_empty() { "none".to_string() } else { amps.join(", ") },
            m.cascade_gate.0,
            m.cascade_gate.1
        ));
}

fn heads_csv(m: &HeadMetrics) -> String {
    let mut out = String::from(
        "layer,head,dla,necessity,sufficiency,attribution_necessity,zero_ablation_delta,cipher_contrast,cascade\n",
    );
    for l in 0..m.dla.n_layers {
        for h in 0..m.dla.n_heads {
            let values: Vec<String> = head_values(m, l, h).map(|v| v.to_string()).into();
            out.push_str(&format!("{l},{h},{}\n", values.join(",")));
        }
    }
    out
}
