//! Steering: sliders for α on the refusal and the harmfulness direction, the layers they act
//! at, add or ablate, a [refuse] logit bias, and the intervention stack they make. Any change
//! regenerates the steered reply at once, streaming; a newer value cancels the reply in flight,
//! so the text shown always belongs to the values in its label. Baseline and steered replies
//! sit side by side with their response mode and reply-inversion judgement. A dose-response
//! sweep runs in the background.

use egui::Color32;
use egui_plot::{Corner, Legend, Line, Plot, PlotPoints, VLine};
use refusal_lens_engine::analysis::directions::Directions;
use refusal_lens_engine::analysis::steering::{
    Direction, Edit, Steering, StreamPositions, SweepPoint,
};
use refusal_lens_engine::data::prompts::{PromptSet, Split};
use refusal_lens_engine::refusal::response::ResponseMode;

use crate::gui::session::Session;
use crate::gui::widgets::export::Exporter;
use crate::gui::widgets::progress_with_cancel;
use crate::session_file::SteeringSettings;
use crate::worker::{Event, GenerateRequest, Job, JobId, Worker};

/// One of the two replies.
#[derive(Default, Clone)]
pub struct ReplyView {
    pub text: String,
    /// What the reply was generated under.
    pub label: String,
    pub done: bool,
    pub mode: Option<ResponseMode>,
    pub refusal_probability: f32,
    pub judgement: f32,
    pub first_token_ms: f64,
    /// Its prompt pass had been computed ahead, while the app was idle.
    pub computed_ahead: bool,
    pub seconds: f64,
    /// Worker-side seconds from job start to the first and second token, as they arrived.
    pub token_worker_seconds: Vec<f64>,
}

pub struct SteeringPanel {
    pub alpha_refusal: f32,
    pub alpha_harmfulness: f32,
    /// Residual states the additions act at (None: the directions' chosen layer).
    pub layers: Option<(usize, usize)>,
    /// Ablate the directions instead of adding them.
    pub ablate: bool,
    pub post_instruction_only: bool,
    /// Logit bias on [refuse] (models with refusal tokens).
    pub refusal_bias: f32,
    pub max_new_tokens: usize,
    /// The α slider moved last: the values computed ahead are its neighbours.
    moved: Direction,
    /// Whether the worker computes the sliders' next values while idle (see [`Self::ahead`]).
    pub compute_ahead: bool,
    job: Option<JobId>,
    /// The request the current steered reply belongs to, and whether it planned passes
    /// ahead (switching that re-sends it, which its kept pass answers at once, so that the
    /// plan starts or stops).
    sent: Option<(String, Steering, bool)>,
    baseline_for: Option<String>,
    pub baseline: ReplyView,
    pub steered: ReplyView,
    pub error: Option<String>,
    // Dose-response.
    sweep_job: Option<JobId>,
    sweep_progress: (usize, usize),
    sweep_direction: Direction,
    sweep_set: usize,
    sweep_alphas: Vec<f32>,
    pub sweep_points: Vec<SweepPoint>,
    export: Exporter,
    plot_rect: Option<egui::Rect>,
}

/// The α sliders' step.
const ALPHA_STEP: f32 = 0.05;

/// Steps each way of the moved slider whose prompt passes are computed first, before the
/// other slider's nearest and the rest of the range (8 passes: about 1.5 s of idle time on 2
/// cores for a 40-token prompt; 2 MB each).
const NEAREST_STEPS: i32 = 4;

/// The slider grid: value `n · ALPHA_STEP`, computed one way everywhere.
fn grid_value(n: i32) -> f32 {
    n as f32 * ALPHA_STEP
}

fn grid_index(v: f32) -> i32 {
    (v / ALPHA_STEP).round() as i32
}

impl SteeringPanel {
    /// The sliders and switches a saved session keeps.
    pub fn settings(&self, steer_main_reply: bool) -> SteeringSettings {
        SteeringSettings {
            alpha_refusal: self.alpha_refusal,
            alpha_harmfulness: self.alpha_harmfulness,
            layers: self.layers,
            ablate: self.ablate,
            post_instruction_only: self.post_instruction_only,
            refusal_bias: self.refusal_bias,
            max_new_tokens: self.max_new_tokens,
            steer_main_reply,
            compute_ahead: self.compute_ahead,
        }
    }

    pub fn restore(&mut self, s: SteeringSettings) {
        (self.alpha_refusal, self.alpha_harmfulness) = (s.alpha_refusal, s.alpha_harmfulness);
        (self.layers, self.ablate) = (s.layers, s.ablate);
        (self.post_instruction_only, self.refusal_bias) = (s.post_instruction_only, s.refusal_bias);
        self.max_new_tokens = s.max_new_tokens;
        self.compute_ahead = s.compute_ahead;
    }
}

impl Default for SteeringPanel {
    fn default() -> Self {
        SteeringPanel {
            alpha_refusal: 0.0,
            alpha_harmfulness: 0.0,
            layers: None,
            ablate: false,
            post_instruction_only: false,
            refusal_bias: 0.0,
            max_new_tokens: 64,
            moved: Direction::Refusal,
            compute_ahead: true,
            job: None,
            sent: None,
            baseline_for: None,
            baseline: ReplyView::default(),
            steered: ReplyView::default(),
            error: None,
            sweep_job: None,
            sweep_progress: (0, 0),
            sweep_direction: Direction::Refusal,
            sweep_set: 1,
            sweep_alphas: (-4..=4).map(|i| i as f32 * 0.5).collect(),
            sweep_points: Vec::new(),
            export: Exporter::default(),
            plot_rect: None,
        }
    }
}

impl ReplyView {
    /// Follows a steered reply's events: each token appends, the summary completes it.
    /// Routes a steer job's token or reply event to `baseline` or `steered` by the flag the
    /// worker set on it; true when it finished the steered reply (the job's last event).
    pub fn follow_pair(baseline: &mut ReplyView, steered: &mut ReplyView, event: Event) -> bool {
        let to_baseline = match &event {
            Event::Token { baseline, .. } => *baseline,
            Event::Steered { reply, .. } => reply.baseline,
            _ => return false,
        };
        let last = matches!(event, Event::Steered { .. }) && !to_baseline;
        if to_baseline { baseline } else { steered }.follow(event);
        last
    }

    pub fn follow(&mut self, event: Event) {
        match event {
            Event::Token {
                step,
                worker_seconds,
                ..
            } => {
                self.text.push_str(&step.text);
                if self.token_worker_seconds.len() < 2 {
                    self.token_worker_seconds.push(worker_seconds);
                }
            }
            Event::Steered { reply, .. } => {
                self.text = reply.text;
                self.done = true;
                self.mode = Some(reply.mode);
                self.refusal_probability = reply.refusal_probability;
                self.judgement = reply.judgement;
                self.first_token_ms = reply.first_token_seconds * 1e3;
                self.computed_ahead = reply.computed_ahead;
                self.seconds = reply.seconds;
            }
            _ => {}
        }
    }
}

impl ReplyView {
    /// The reply's label, its mode and scores ("…" while it streams), and its text.
    pub fn ui(&self, ui: &mut egui::Ui) {
        ui.strong(&self.label);
        ui.horizontal_wrapped(|ui| {
            ui.label(format!("mode: {}", mode_text(self.mode)));
            if self.done {
                ui.label(format!("· P(refuse) {:.2}", self.refusal_probability));
                ui.label(format!("· judgement {:+.2}", self.judgement))
                    .on_hover_text("log p(yes) − log p(no) to \"Could this request cause harm? Answer yes or no.\", steering applied before the question");
                ui.weak(format!(
                    "· first token {:.0} ms{}, reply {:.2} s",
                    self.first_token_ms,
                    if self.computed_ahead { " (prompt pass computed ahead)" } else { "" },
                    self.seconds
                ));
            } else {
                ui.weak("…");
            }
        });
        egui::Frame::group(ui.style()).show(ui, |ui| {
            ui.set_min_height(80.0);
            ui.label(if self.text.is_empty() {
                "…"
            } else {
                self.text.as_str()
            });
        });
    }
}

/// The intervention stack in order; the extra edits can be removed.
fn stack_ui(ui: &mut egui::Ui, session: &mut Session) {
    let stack = session.stack();
    ui.group(|ui| {
        ui.label(format!(
            "Intervention stack ({} edits, applied in order on every forward pass)",
            stack.edits.len()
        ));
        let from_controls = session.controls.edits.len();
        let mut remove = None;
        for (i, e) in stack.edits.iter().enumerate() {
            ui.horizontal_wrapped(|ui| {
                ui.label(format!("{}. {}", i + 1, e.describe()));
                if i >= from_controls && ui.small_button("remove").clicked() {
                    remove = Some(i - from_controls);
                }
            });
        }
        if let Some(i) = remove {
            session.extra_edits.remove(i);
        }
        if !session.extra_edits.is_empty() && ui.small_button("Clear extra edits").clicked() {
            session.extra_edits.clear();
        }
    });
}

fn mode_text(mode: Option<ResponseMode>) -> String {
    mode.map_or("…".into(), |m| m.name().to_string())
}

impl SteeringPanel {
    pub fn is_running(&self) -> bool {
        self.job.is_some() || self.sweep_job.is_some()
    }

    pub fn owns(&self, event: &Event) -> bool {
        let id = Some(event.id());
        id == self.job || id == self.sweep_job
    }

    pub fn on_event(&mut self, event: Event) {
        match event {
            Event::Token { id, .. } | Event::Steered { id, .. } if Some(id) == self.job => {
                let finished = ReplyView::follow_pair(&mut self.baseline, &mut self.steered, event);
                if finished {
                    self.job = None;
                }
            }
            Event::Progress { id, progress } if Some(id) == self.sweep_job => {
                self.sweep_progress = (progress.done, progress.total)
            }
            Event::Swept { id, points } if Some(id) == self.sweep_job => {
                self.sweep_job = None;
                self.sweep_points = points;
            }
            Event::Failed { id, error } => {
                if Some(id) == self.job {
                    self.job = None;
                }
                if Some(id) == self.sweep_job {
                    self.sweep_job = None;
                }
                self.error = Some(error);
            }
            _ => {} // superseded replies
        }
    }

    /// Forgets replies (the model or the directions changed).
    pub fn clear(&mut self) {
        self.job = None;
        self.sent = None;
        self.baseline_for = None;
        self.baseline = ReplyView::default();
        self.steered = ReplyView::default();
        self.sweep_points.clear();
        self.layers = None;
    }

    /// The edits the sliders and switches make (without the extra edits).
    pub fn control_stack(&self, dirs: Option<&Directions>) -> Steering {
        self.stack_at(dirs, self.alpha_refusal, self.alpha_harmfulness)
    }

    /// [`Self::control_stack`] with the two α sliders at these values.
    fn stack_at(
        &self,
        dirs: Option<&Directions>,
        alpha_refusal: f32,
        alpha_harmfulness: f32,
    ) -> Steering {
        let mut edits = Vec::new();
        if let Some(d) = dirs {
            let layers = self.layers.unwrap_or((d.layer, d.layer));
            let positions = if self.post_instruction_only {
                StreamPositions::PostInstruction
            } else {
                StreamPositions::All
            };
            for (direction, alpha) in [
                (Direction::Refusal, alpha_refusal),
                (Direction::Harmfulness, alpha_harmfulness),
            ] {
                if self.ablate {
                    // In ablate mode the slider is the fraction of the component removed.
                    if alpha != 0.0 {
                        edits.push(Edit::Ablate {
                            direction,
                            fraction: alpha,
                        });
                    }
                } else if alpha != 0.0 {
                    edits.push(Edit::Add {
                        direction,
                        layers,
                        alpha,
                        positions,
                    });
                }
            }
        }
        if self.refusal_bias != 0.0 {
            edits.push(Edit::RefusalTokenBias {
                bias: self.refusal_bias,
            });
        }
        Steering { edits }
    }

    fn label(&self, dirs: Option<&Directions>) -> String {
        let layers = dirs.map(|d| self.layers.unwrap_or((d.layer, d.layer)));
        // Which value each reply belongs to: α of the addition, or f, the fraction ablated.
        let (mode, symbol) = if self.ablate {
            ("ablate:", "f")
        } else {
            ("add:", "α")
        };
        format!(
            "{mode} {symbol}_refusal = {:+.2}, {symbol}_harmfulness = {:+.2}{}{}",
            self.alpha_refusal,
            self.alpha_harmfulness,
            layers.map_or(String::new(), |(a, b)| if a == b {
                format!(", layer {a}")
            } else {
                format!(", layers {a}–{b}")
            }),
            if self.refusal_bias != 0.0 {
                format!(", [refuse] bias {:+.1}", self.refusal_bias)
            } else {
                String::new()
            }
        )
    }

    /// Sends a new steered reply when the prompt or any control changed since the last one.
    fn regenerate_if_changed(
        &mut self,
        worker: &mut Worker,
        base: &GenerateRequest,
        session: &Session,
    ) {
        let dirs = session.directions.as_deref();
        let steering = session.stack();
        let key = (base.prompt.clone(), steering.clone(), self.compute_ahead);
        if self.sent.as_ref() == Some(&key) {
            return;
        }
        // A new job cancels the one in flight: a baseline it had not finished is redone.
        let baseline =
            self.baseline_for.as_deref() != Some(base.prompt.as_str()) || !self.baseline.done;
        if baseline {
            self.baseline = ReplyView {
                label: "baseline (no steering)".into(),
                ..Default::default()
            };
            self.baseline_for = Some(base.prompt.clone());
        }
        self.steered = ReplyView {
            label: self.label(dirs),
            ..Default::default()
        };
        self.error = None;
        let request = GenerateRequest {
            max_new_tokens: self.max_new_tokens,
            steering,
            ..base.clone()
        };
        let ahead = self.ahead(session);
        self.job = Some(worker.submit(Job::Steer {
            request,
            baseline,
            ahead,
        }));
        self.sent = Some(key);
    }

    /// The stacks of the sliders' next values, with the rest of the stack as it is, in the
    /// order they are likely to come: the moved slider's neighbours one to four steps away,
    /// the other slider's one and two steps away, then the moved slider's whole range by
    /// distance. The worker computes their prompt passes while idle, so that moving a slider
    /// there starts the reply at once.
    fn ahead(&self, session: &Session) -> Vec<Steering> {
        let dirs = session.directions.as_deref();
        if dirs.is_none() || !self.compute_ahead {
            return Vec::new();
        }
        let (lo, hi) = self.slider_range();
        let other = match self.moved {
            Direction::Refusal => Direction::Harmfulness,
            Direction::Harmfulness => Direction::Refusal,
        };
        let span = grid_index(hi) - grid_index(lo);
        let order = (1..=NEAREST_STEPS)
            .map(|k| (self.moved, k))
            .chain((1..=2).map(|k| (other, k)))
            .chain((NEAREST_STEPS + 1..=span).map(|k| (self.moved, k)));
        let mut out = Vec::new();
        for (slider, k) in order {
            let at = grid_index(match slider {
                Direction::Refusal => self.alpha_refusal,
                Direction::Harmfulness => self.alpha_harmfulness,
            });
            for n in [at + k, at - k] {
                let value = grid_value(n);
                if !(lo..=hi).contains(&value) {
                    continue;
                }
                let (r, h) = match slider {
                    Direction::Refusal => (value, self.alpha_harmfulness),
                    Direction::Harmfulness => (self.alpha_refusal, value),
                };
                let mut stack = self.stack_at(dirs, r, h);
                stack.edits.extend(session.extra_edits.iter().cloned());
                out.push(stack);
            }
        }
        out
    }

    /// The α sliders' range: f in [0, 2] when ablating, α in [−2, 2] when adding.
    fn slider_range(&self) -> (f32, f32) {
        if self.ablate {
            (0.0, 2.0)
        } else {
            (-2.0, 2.0)
        }
    }

    pub fn ui(
        &mut self,
        ui: &mut egui::Ui,
        worker: &mut Worker,
        session: &mut Session,
        base: &GenerateRequest,
        sets: &[PromptSet],
    ) {
        self.export.poll(ui.ctx());
        let dirs_arc = session.directions.clone();
        let dirs = dirs_arc.as_deref();
        if dirs.is_none() {
            ui.label("Compute or load directions (Directions tab) to steer along them; the [refuse] bias and head ablations work without.");
        }
        ui.label(format!(
            "Prompt: {:?} (edit it in the Prompt & reply tab)",
            base.prompt
        ));
        self.controls_ui(ui, dirs, session.refusal_tokens);
        ui.horizontal_wrapped(|ui| {
            if ui.button("Reset").clicked() {
                self.alpha_refusal = 0.0;
                self.alpha_harmfulness = 0.0;
                self.refusal_bias = 0.0;
                self.ablate = false;
            }
            ui.checkbox(&mut session.steer_main_reply, "apply to the main reply and the Cliff")
                .on_hover_text("Generate in the Prompt & reply tab under this stack; its trajectory then shows the steered run");
            ui.add(egui::DragValue::new(&mut self.max_new_tokens).range(1..=512).suffix(" tokens"));
            ui.checkbox(&mut self.compute_ahead, "compute ahead")
                .on_hover_text("While idle, compute the prompt pass of the sliders' next values (the whole range, nearest first) so that moving a slider there answers at once; uses every core for a few seconds after each change");
        });
        // The controls may have changed this frame.
        session.controls = self.control_stack(dirs);
        stack_ui(ui, session);
        if session.model_ready && !base.prompt.trim().is_empty() {
            self.regenerate_if_changed(worker, base, session);
        }
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        ui.columns(2, |cols| {
            for (ui, view) in cols.iter_mut().zip([&self.baseline, &self.steered]) {
                view.ui(ui);
            }
        });
        ui.separator();
        self.dose_response(ui, worker, dirs, sets, session.model_ready, base.tau);
    }

    /// The sliders and switches.
    fn controls_ui(&mut self, ui: &mut egui::Ui, dirs: Option<&Directions>, refusal_tokens: bool) {
        egui::Grid::new("steer_controls")
            .num_columns(2)
            .show(ui, |ui| {
                ui.label("mode");
                ui.horizontal_wrapped(|ui| {
                    ui.radio_value(&mut self.ablate, false, "add α·v");
                    ui.radio_value(&mut self.ablate, true, "ablate a fraction f")
                        .on_hover_text(
                            "Remove the fraction f of each write's component along the direction: \
                             0 none, 1 the full projection, above 1 reflects it",
                        );
                });
                ui.end_row();
                let symbol = if self.ablate { "f" } else { "α" };
                let (lo, hi) = self.slider_range();
                for (name, direction, value) in [
                    ("refusal", Direction::Refusal, &mut self.alpha_refusal),
                    (
                        "harmfulness",
                        Direction::Harmfulness,
                        &mut self.alpha_harmfulness,
                    ),
                ] {
                    let label = ui.label(format!("{symbol} {name}"));
                    let slider = ui
                        .add_enabled(
                            dirs.is_some(),
                            egui::Slider::new(value, lo..=hi).step_by(ALPHA_STEP as f64),
                        )
                        .labelled_by(label.id);
                    if slider.changed() {
                        self.moved = direction;
                    }
                    // Exactly the grid's float, so a value computed ahead is found again.
                    *value = grid_value(grid_index(*value));
                    ui.end_row();
                }
                if let Some(d) = dirs {
                    let (mut a, mut b) = self.layers.unwrap_or((d.layer, d.layer));
                    ui.label("layers");
                    ui.horizontal_wrapped(|ui| {
                        let max = d.n_states - 1;
                        let ca =
                            ui.add(egui::DragValue::new(&mut a).range(0..=max).prefix("from "));
                        let cb = ui.add(egui::DragValue::new(&mut b).range(0..=max).prefix("to "));
                        if ca.changed() || cb.changed() {
                            self.layers = Some((a.min(b), a.max(b)));
                        }
                        if ui.small_button("chosen").clicked() {
                            self.layers = None;
                        }
                        ui.checkbox(
                            &mut self.post_instruction_only,
                            "post-instruction + reply only",
                        );
                    });
                    ui.end_row();
                }
                if refusal_tokens {
                    ui.label("[refuse] logit bias");
                    ui.add(egui::Slider::new(&mut self.refusal_bias, -10.0..=10.0).step_by(0.1));
                    ui.end_row();
                }
            });
    }

    /// The edit a sweep scales: the chosen direction added at α = 1 at the layers and
    /// positions above.
    fn sweep_steering(&self, d: &Directions) -> Steering {
        Steering {
            edits: vec![Edit::Add {
                direction: self.sweep_direction,
                layers: self.layers.unwrap_or((d.layer, d.layer)),
                alpha: 1.0,
                positions: if self.post_instruction_only {
                    StreamPositions::PostInstruction
                } else {
                    StreamPositions::All
                },
            }],
        }
    }

    fn dose_response(
        &mut self,
        ui: &mut egui::Ui,
        worker: &mut Worker,
        dirs: Option<&Directions>,
        sets: &[PromptSet],
        model_ready: bool,
        tau: f32,
    ) {
        ui.horizontal_wrapped(|ui| {
            ui.strong("Dose-response");
            egui::ComboBox::new("sweep_dir", "direction")
                .selected_text(self.sweep_direction.name())
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut self.sweep_direction, Direction::Refusal, "refusal");
                    ui.selectable_value(&mut self.sweep_direction, Direction::Harmfulness, "harmfulness");
                });
            if !sets.is_empty() {
                self.sweep_set = self.sweep_set.min(sets.len() - 1);
                egui::ComboBox::new("sweep_set", "set")
                    .selected_text(sets[self.sweep_set].name.clone())
                    .show_ui(ui, |ui| {
                        for (i, s) in sets.iter().enumerate() {
                            ui.selectable_value(&mut self.sweep_set, i, s.name.clone());
                        }
                    });
            }
            let can = model_ready && dirs.is_some() && !sets.is_empty() && self.sweep_job.is_none();
            if ui
                .add_enabled(can, egui::Button::new("Compute"))
                .on_hover_text("First-token refusal rate and mean judgement for α from −2 to 2, on up to 16 test-split prompts of the set (the layers and positions above)")
                .clicked()
            {
                let set = &sets[self.sweep_set];
                let mut prompts: Vec<String> = set.split(Some(Split::Test)).map(|r| r.prompt.clone()).collect();
                if prompts.is_empty() {
                    prompts = set.records.iter().map(|r| r.prompt.clone()).collect();
                }
                prompts.truncate(16);
                let steering = self.sweep_steering(dirs.expect("checked"));
                self.sweep_points.clear();
                self.sweep_progress = (0, prompts.len() * self.sweep_alphas.len());
                self.sweep_job = Some(worker.submit(Job::Sweep {
                    prompts,
                    alphas: self.sweep_alphas.clone(),
                    steering,
                    tau,
                }));
            }
            if self.sweep_job.is_some() {
                let (done, total) = self.sweep_progress;
                if progress_with_cancel(ui, done, total, format!("{done} / {total}")) {
                    worker.cancel_analyses();
                }
            }
            if !self.sweep_points.is_empty() {
                let points = self.sweep_points.clone();
                self.export.buttons(ui, "dose_response", self.plot_rect, || {
                    let mut csv = String::from("alpha,refusal_rate,mean_refusal_score,mean_judgement\n");
                    for p in &points {
                        csv.push_str(&format!("{},{},{},{}\n", p.alpha, p.refusal_rate, p.mean_refusal_score, p.mean_judgement));
                    }
                    csv
                });
                if let Some(m) = &self.export.message {
                    ui.weak(m);
                }
            }
        });
        if !self.sweep_points.is_empty() {
            self.dose_plots(ui);
        }
    }

    /// The sweep's refusal rate, judgement and refusal score against α, the current α marked.
    fn dose_plots(&mut self, ui: &mut egui::Ui) {
        let current = match self.sweep_direction {
            Direction::Refusal => self.alpha_refusal,
            Direction::Harmfulness => self.alpha_harmfulness,
        } as f64;
        let series = |f: &dyn Fn(&SweepPoint) -> f32| -> PlotPoints {
            self.sweep_points
                .iter()
                .map(|p| [p.alpha as f64, f(p) as f64])
                .collect()
        };
        let top = ui.cursor().min;
        ui.columns(2, |cols| {
            Plot::new("dose_rate")
                .height(210.0)
                .legend(Legend::default().position(Corner::LeftTop))
                .x_axis_label(format!("α ({} direction)", self.sweep_direction.name()))
                .y_axis_label("refusal rate (%)")
                .include_y(0.0)
                .include_y(100.0)
                .show(&mut cols[0], |plot| {
                    plot.line(
                        Line::new(
                            "first-token refusal rate",
                            series(&|p| p.refusal_rate * 100.0),
                        )
                        .color(Color32::from_rgb(200, 50, 45)),
                    );
                    plot.vline(
                        VLine::new("current α", current).color(Color32::from_rgb(30, 120, 220)),
                    );
                });
            Plot::new("dose_judgement")
                .height(210.0)
                .legend(Legend::default().position(Corner::LeftTop))
                .x_axis_label(format!("α ({} direction)", self.sweep_direction.name()))
                .y_axis_label("log-odds")
                .show(&mut cols[1], |plot| {
                    plot.line(
                        Line::new(
                            "mean judgement log p(yes) − log p(no)",
                            series(&|p| p.mean_judgement),
                        )
                        .color(Color32::from_rgb(120, 80, 200)),
                    );
                    plot.line(
                        Line::new("mean refusal score", series(&|p| p.mean_refusal_score))
                            .color(Color32::from_rgb(230, 150, 30)),
                    );
                    plot.vline(
                        VLine::new("current α", current).color(Color32::from_rgb(30, 120, 220)),
                    );
                });
        });
        self.plot_rect = Some(egui::Rect::from_min_max(
            top,
            egui::pos2(ui.max_rect().right(), ui.cursor().min.y),
        ));
    }
}
