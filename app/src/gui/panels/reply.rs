//! Prompt & reply: the prompt editor, Generate / Stop, and the reply as token chips.

use refusal_lens_engine::run::generate::{Generation, Sampling, StopReason, TokenStep};

use refusal_lens_engine::analysis::steering::Steering;

use crate::gui::session::Session;
use crate::gui::widgets::colors::{probability_color, probability_legend};
use crate::session_file::ReplySettings;
use crate::worker::{Event, GenerateRequest, Job, JobId, Worker};

pub struct ReplyPanel {
    pub prompt: String,
    pub system: String,
    pub use_system: bool,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Refusal threshold τ for models with refusal tokens.
    pub tau: f32,
    /// Logit bias on the refusal openers for models without them.
    pub opener_bias: f32,
    job: Option<JobId>,
    running: bool,
    prompt_tokens: Vec<(u32, String)>,
    t_inst: usize,
    t_post: usize,
    pub tokens: Vec<TokenStep>,
    finished: Option<Generation>,
    error: Option<String>,
    /// The request in flight (the editor and the steering may change meanwhile).
    requested: Option<GenerateRequest>,
    /// Interventions applied to this reply (set by the Steering panel when it applies).
    pub steering: Steering,
    /// A reply finished and its trajectory has not been asked for yet.
    trajectory_due: bool,
}

impl ReplyPanel {
    /// The settings a saved session keeps.
    pub fn settings(&self) -> ReplySettings {
        ReplySettings {
            prompt: self.prompt.clone(),
            system: self.system.clone(),
            use_system: self.use_system,
            max_new_tokens: self.max_new_tokens,
            sampling: self.sampling,
            tau: self.tau,
            opener_bias: self.opener_bias,
        }
    }

    pub fn restore(&mut self, s: ReplySettings) {
        (self.prompt, self.system, self.use_system) = (s.prompt, s.system, s.use_system);
        (self.max_new_tokens, self.sampling) = (s.max_new_tokens, s.sampling);
        (self.tau, self.opener_bias) = (s.tau, s.opener_bias);
    }
}

impl Default for ReplyPanel {
    fn default() -> Self {
        ReplyPanel {
            prompt: "How do I bake bread?".into(),
            system: String::new(),
            use_system: false,
            max_new_tokens: 128,
            sampling: Sampling::default(),
            tau: refusal_lens_engine::refusal::DEFAULT_TAU,
            opener_bias: 0.0,
            job: None,
            running: false,
            prompt_tokens: Vec::new(),
            t_inst: 0,
            t_post: 0,
            tokens: Vec::new(),
            finished: None,
            error: None,
            requested: None,
            steering: Steering::default(),
            trajectory_due: false,
        }
    }
}

impl ReplyPanel {
    pub fn is_running(&self) -> bool {
        self.running
    }

    pub fn clear(&mut self) {
        self.job = None;
        self.running = false;
        self.prompt_tokens.clear();
        self.tokens.clear();
        self.finished = None;
        self.error = None;
    }

    pub fn owns(&self, event: &Event) -> bool {
        Some(event.id()) == self.job
    }

    pub fn on_event(&mut self, event: Event) {
        let current = |id: JobId| self.job == Some(id);
        match event {
            Event::Prompt {
                id,
                prompt_tokens,
                t_inst,
                t_post,
            } if current(id) => {
                self.prompt_tokens = prompt_tokens;
                self.t_inst = t_inst;
                self.t_post = t_post;
            }
            Event::Token { id, step, .. } if current(id) => self.tokens.push(step),
            Event::Finished { id, generation } if current(id) => {
                self.running = false;
                self.finished = Some(*generation);
                self.trajectory_due = true;
            }
            Event::Failed { id, error } if current(id) => {
                self.running = false;
                self.error = Some(error);
            }
            _ => {} // events of superseded jobs
        }
    }

    /// Shows the failure of a job no panel follows (e.g. a panel cleared by a model change).
    pub fn show_error(&mut self, error: String) {
        self.error = Some(error);
    }

    /// Once per finished reply: its request and reply token ids.
    pub fn take_finished(&mut self) -> Option<(GenerateRequest, Vec<u32>)> {
        if !std::mem::take(&mut self.trajectory_due) {
            return None;
        }
        self.last_finished()
    }

    /// The last finished request and reply, for re-scoring (e.g. at another layer).
    pub fn last_finished(&self) -> Option<(GenerateRequest, Vec<u32>)> {
        self.finished.as_ref()?;
        let request = self.requested.clone()?;
        Some((request, self.tokens.iter().map(|t| t.id).collect()))
    }

    pub fn status_line(&self) -> String {
        if let Some(e) = &self.error {
            return format!("Error: {e}");
        }
        match (&self.finished, self.running) {
            (_, true) => format!("Generating… {} tokens", self.tokens.len()),
            (Some(g), _) => format!(
                "{} tokens · {:.1} tok/s generation · {:.0} tok/s prefill ({} prompt tokens) · {}",
                g.tokens.len(),
                g.decode_tokens_per_second(),
                g.prefill_tokens_per_second(),
                g.prompt_tokens,
                match g.stop {
                    StopReason::EndOfTurn => "end of turn",
                    StopReason::MaxTokens => "max tokens",
                    StopReason::ContextFull => "context full",
                    StopReason::Cancelled => "stopped",
                }
            ),
            (None, false) => "Ready".into(),
        }
    }

    /// A request for the current editor contents and settings.
    pub fn request(&self) -> GenerateRequest {
        GenerateRequest {
            system: self.use_system.then(|| self.system.clone()),
            prompt: self.prompt.clone(),
            max_new_tokens: self.max_new_tokens,
            sampling: self.sampling,
            tau: self.tau,
            opener_bias: self.opener_bias,
            steering: self.steering.clone(),
        }
    }

    fn start(&mut self, worker: &mut Worker) {
        self.clear();
        let request = self.request();
        self.requested = Some(request.clone());
        self.job = Some(worker.submit(Job::Generate(request)));
        self.running = true;
    }

    /// The τ control shows when the model in use has `[refuse]`/`[respond]`, the thinking
    /// switch when it is a reasoning model.
    pub fn ui(&mut self, ui: &mut egui::Ui, worker: &mut Worker, session: &mut Session) {
        let (model_ready, refusal_tokens) = (session.model_ready, session.refusal_tokens);
        self.editor(ui);
        if session.reasoning {
            let r = ui
                .checkbox(&mut session.thinking, "Thinking (reasoning model)")
                .on_hover_text(
                    "Render the prompt with the template's thinking on (enable_thinking): the \
                     reply starts with a <think> … </think> span, which the Cliff tab shades \
                     and reads the cliff at the end of.",
                );
            if r.changed() {
                worker.submit(Job::SetThinking(session.thinking));
            }
        }
        self.refusal_control(ui, worker, model_ready, refusal_tokens);
        self.run_controls(ui, worker, model_ready);
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        ui.separator();
        self.prompt_tokens_view(ui);
        self.reply_view(ui);
    }

    /// The user message, the system message and the decoding settings.
    fn editor(&mut self, ui: &mut egui::Ui) {
        ui.heading("Prompt");
        let label = ui.label("User message");
        ui.add(
            egui::TextEdit::multiline(&mut self.prompt)
                .desired_rows(3)
                .desired_width(f32::INFINITY)
                .hint_text("Type a user message…"),
        )
        .labelled_by(label.id);
        ui.horizontal_wrapped(|ui| {
            ui.checkbox(&mut self.use_system, "System message");
            if self.use_system {
                ui.add(egui::TextEdit::singleline(&mut self.system).desired_width(400.0));
            } else {
                ui.weak("(template default)");
            }
        });
        ui.horizontal_wrapped(|ui| {
            ui.add(egui::Slider::new(&mut self.max_new_tokens, 1..=512).text("max tokens"));
            ui.add(
                egui::Slider::new(&mut self.sampling.temperature, 0.0..=2.0).text("temperature"),
            );
            ui.add_enabled(
                self.sampling.temperature > 0.0,
                egui::Slider::new(&mut self.sampling.top_p, 0.05..=1.0).text("top-p"),
            );
            ui.add_enabled(
                self.sampling.temperature > 0.0,
                egui::DragValue::new(&mut self.sampling.seed).prefix("seed "),
            );
        });
    }

    /// τ for a model with refusal tokens, the refusal-opener bias for one without; the reply
    /// follows either live.
    fn refusal_control(
        &mut self,
        ui: &mut egui::Ui,
        worker: &mut Worker,
        model_ready: bool,
        refusal_tokens: bool,
    ) {
        if !refusal_tokens {
            ui.horizontal_wrapped(|ui| {
                let slider = egui::Slider::new(&mut self.opener_bias, -10.0..=10.0).step_by(0.1).text("refusal-opener bias b (first reply token)");
                // The reply follows the bias live, as it follows τ with refusal tokens.
                if ui.add(slider).on_hover_text("Adds b to the logits of the refusal openers (I, Sorry, As, Unfortunately, …) at the first reply position").changed()
                    && model_ready
                    && !self.prompt.trim().is_empty()
                {
                    self.start(worker);
                }
            });
        }
        if refusal_tokens {
            ui.horizontal_wrapped(|ui| {
                let slider = egui::Slider::new(&mut self.tau, 0.0..=1.0)
                    .step_by(0.01)
                    .text("τ: emit [refuse] when p([refuse]) ≥ τ");
                let moved = ui.add(slider).changed();
                // The reply follows the threshold live: a newer τ supersedes the reply in flight.
                if moved && model_ready && !self.prompt.trim().is_empty() {
                    self.start(worker);
                }
                if let Some(p) = self.finished.as_ref().and_then(|g| g.refusal_probability) {
                    ui.label(format!(
                        "p([refuse]) = {p:.3}, so the reply starts with {}",
                        if p >= self.tau {
                            "[refuse]"
                        } else {
                            "[respond]"
                        }
                    ));
                }
            });
        }
    }

    /// Generate, Stop and the reply's progress.
    fn run_controls(&mut self, ui: &mut egui::Ui, worker: &mut Worker, model_ready: bool) {
        ui.horizontal_wrapped(|ui| {
            let can_start = model_ready && !self.prompt.trim().is_empty();
            if ui
                .add_enabled(can_start, egui::Button::new("Generate"))
                .clicked()
            {
                self.start(worker);
            }
            if ui
                .add_enabled(self.running, egui::Button::new("Stop"))
                .clicked()
            {
                worker.cancel_all();
            }
            if self.running {
                let frac = self.tokens.len() as f32 / self.max_new_tokens.max(1) as f32;
                ui.add(
                    egui::ProgressBar::new(frac)
                        .desired_width(200.0)
                        .text(format!(
                            "{} / {} tokens",
                            self.tokens.len(),
                            self.max_new_tokens
                        )),
                );
            }
        });
    }

    /// The templated prompt as token chips, t_inst and t_post marked.
    fn prompt_tokens_view(&self, ui: &mut egui::Ui) {
        if !self.prompt_tokens.is_empty() {
            egui::CollapsingHeader::new(format!(
                "Prompt as the model sees it ({} tokens)",
                self.prompt_tokens.len()
            ))
            .default_open(false)
            .show(ui, |ui| {
                ui.horizontal_wrapped(|ui| {
                    ui.spacing_mut().item_spacing = egui::vec2(2.0, 2.0);
                    for (i, (id, text)) in self.prompt_tokens.iter().enumerate() {
                        let role = if i == self.t_inst {
                            " · t_inst (last instruction token)"
                        } else if i == self.t_post {
                            " · t_post (last prompt token)"
                        } else {
                            ""
                        };
                        let fill = if role.is_empty() {
                            ui.visuals().faint_bg_color
                        } else {
                            egui::Color32::from_rgb(70, 90, 150)
                        };
                        chip(ui, text, fill).on_hover_text(format!("position {i} · id {id}{role}"));
                    }
                });
            });
        }
    }

    /// The finished reply's response mode and the reply as token chips.
    fn reply_view(&self, ui: &mut egui::Ui) {
        if let (Some(g), false) = (&self.finished, self.running) {
            let c = refusal_lens_engine::refusal::response::classify(&g.text);
            ui.horizontal_wrapped(|ui| {
                ui.label("Response mode:");
                let list = |ms: &[refusal_lens_engine::refusal::response::Match]| {
                    ms.iter()
                        .map(|m| m.phrase.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                ui.strong(c.mode.name()).on_hover_text(format!(
                    "declines: [{}]\nhelp offers: [{}]\nhedges: [{}]\nwords: {}",
                    list(&c.declines),
                    list(&c.help_offers),
                    list(&c.hedges),
                    c.words
                ));
                ui.weak(format!("({})", c.reason));
            });
        }
        ui.horizontal_wrapped(|ui| {
            ui.heading("Reply");
            ui.weak("chip colour: probability of the chosen token");
            probability_legend(ui);
        });
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                ui.horizontal_wrapped(|ui| {
                    ui.spacing_mut().item_spacing = egui::vec2(2.0, 2.0);
                    for step in &self.tokens {
                        let p = step.logprob.exp();
                        chip(ui, &step.text, probability_color(p)).on_hover_text(format!(
                            "reply token {} · id {} · logprob {:.3} · p {:.3}",
                            step.index, step.id, step.logprob, p
                        ));
                    }
                });
            });
    }
}

/// One token as a coloured chip (a single widget, so wrapped rows break between chips);
/// whitespace is made visible.
fn chip(ui: &mut egui::Ui, text: &str, fill: egui::Color32) -> egui::Response {
    // U+FFFD (bytes that are not UTF-8, which a model can emit) has no glyph in egui's fonts.
    let shown = text
        .replace('\n', "↵")
        .replace('\t', "→")
        .replace('\u{FFFD}', "¿");
    let shown = if shown.is_empty() {
        "∅".to_string()
    } else if shown.trim().is_empty() {
        "␣".repeat(shown.chars().count())
    } else {
        shown
    };
    let text_colour = if fill.r() as u32 + fill.g() as u32 + fill.b() as u32 > 380 {
        egui::Color32::BLACK
    } else {
        egui::Color32::WHITE
    };
    let galley = ui.painter().layout_no_wrap(
        shown.clone(),
        egui::TextStyle::Monospace.resolve(ui.style()),
        text_colour,
    );
    let padding = egui::vec2(3.0, 1.0);
    let (rect, response) =
        ui.allocate_exact_size(galley.size() + 2.0 * padding, egui::Sense::hover());
    if ui.is_rect_visible(rect) {
        ui.painter().rect_filled(rect, 3.0, fill);
        ui.painter().galley(rect.min + padding, galley, text_colour);
    }
    response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Label, true, &shown));
    response
}
