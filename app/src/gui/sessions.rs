//! Save session / Open session / recent sessions (`crate::session_file`): the shell gathers
//! what the panels hold into a session file and gives it back to them. Hashing the model
//! and writing files run off the UI thread; opening is a chain of worker jobs (load the
//! model, switch the adapter, load the lens), after whose last one the panels' settings are
//! restored, so that no model-change reset undoes them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use refusal_lens_engine::analysis::directions::Directions;
use refusal_lens_engine::analysis::lens::probes_path;
use refusal_lens_engine::analysis::probe::ProbeSet;
use refusal_lens_engine::data::prompts::PromptSet;

use super::widgets::dialog::Pending;
use super::{ModelState, RefusalLensApp, Tab};
use crate::session_file::{
    FileRef, LensRef, ModelRef, RecentSessions, ReplySettings, SessionFile, SteeringSettings,
    FORMAT, VERSION,
};
use crate::worker::{Job, JobId};

/// The lens in use: directions, probes, and the file they came from (None: computed here).
type LensToSave = (Arc<Directions>, Option<Arc<ProbeSet>>, Option<PathBuf>);

/// What the shell hands to the saving thread: settings, and the lens to write beside the
/// session when it did not come from a file.
struct SaveRequest {
    model: PathBuf,
    adapter: Option<PathBuf>,
    adapter_active: bool,
    sets: Vec<PathBuf>,
    lens: Option<LensToSave>,
    curve_layer: Option<usize>,
    reply: ReplySettings,
    steering: SteeringSettings,
    head_edits: Vec<refusal_lens_engine::analysis::steering::Edit>,
    tab: Tab,
}

enum Io {
    PickSave(Pending<Option<PathBuf>>, Box<SaveRequest>),
    PickOpen(Pending<Option<PathBuf>>),
    Saving(Pending<anyhow::Result<PathBuf>>),
    Opening(Pending<anyhow::Result<(PathBuf, SessionFile, Vec<PromptSet>)>>),
}

/// A session being restored: the settings wait for the worker's last job of the chain.
struct Restore {
    last_job: JobId,
    session: SessionFile,
}

pub struct SessionsPanel {
    io: Option<Io>,
    restore: Option<Restore>,
    recent: RecentSessions,
    pub message: Option<String>,
    pub error: Option<String>,
}

impl SessionsPanel {
    pub fn new(cache_dir: &Path) -> SessionsPanel {
        SessionsPanel {
            io: None,
            restore: None,
            recent: RecentSessions::new(cache_dir),
            message: None,
            error: None,
        }
    }

    pub fn is_busy(&self) -> bool {
        self.io.is_some() || self.restore.is_some()
    }
}

fn save_session(path: PathBuf, r: SaveRequest) -> anyhow::Result<PathBuf> {
    // A lens computed in the app is written beside the session; one from a file is referred to.
    let lens = match r.lens {
        None => None,
        Some((directions, probes, file)) => {
            let file = match file {
                Some(f) => f,
                None => {
                    let f = path.with_extension("directions.safetensors");
                    directions.save(&f)?;
                    if let Some(p) = &probes {
                        p.save(&probes_path(&f))?;
                    }
                    f
                }
            };
            let probes_file = probes_path(&file);
            Some(LensRef {
                directions: FileRef::of(&file)?,
                probes: probes_file
                    .exists()
                    .then(|| FileRef::of(&probes_file))
                    .transpose()?,
                curve_layer: r.curve_layer,
            })
        }
    };
    let session = SessionFile {
        format: FORMAT.into(),
        version: VERSION,
        model: ModelRef {
            file: FileRef::of(&r.model)?,
            adapter: r.adapter.as_deref().map(FileRef::of).transpose()?,
            adapter_active: r.adapter_active,
        },
        sets: r
            .sets
            .iter()
            .map(|p| FileRef::of(p))
            .collect::<anyhow::Result<_>>()?,
        lens,
        reply: r.reply,
        steering: r.steering,
        head_edits: r.head_edits,
        tab: r.tab.name().into(),
    };
    session.save(&path)?;
    Ok(path)
}

fn open_session(path: PathBuf) -> anyhow::Result<(PathBuf, SessionFile, Vec<PromptSet>)> {
    let session = SessionFile::open(&path)?;
    let sets = session
        .sets
        .iter()
        .map(|s| PromptSet::load(&s.path, None))
        .collect::<refusal_lens_engine::Result<_>>()?;
    Ok((path, session, sets))
}

impl RefusalLensApp {
    /// The Session row of the left panel: Open…, Save…, Recent.
    pub(super) fn sessions_ui(&mut self, ui: &mut egui::Ui) {
        self.poll_sessions();
        ui.horizontal_wrapped(|ui| {
            ui.strong("Session");
            let idle = self.sessions.io.is_none();
            if ui
                .add_enabled(idle, egui::Button::new("Open…"))
                .on_hover_text("Model, adapter, prompt, sets, directions, steering, ablated heads and view from a session file")
                .clicked()
            {
                self.sessions.io = Some(Io::PickOpen(Pending::spawn(|| {
                    rfd::FileDialog::new()
                        .add_filter("Refusal Lens session", &["json"])
                        .pick_file()
                })));
            }
            let can_save = idle && self.model.is_ready();
            if ui
                .add_enabled(can_save, egui::Button::new("Save…"))
                .on_hover_text("One JSON file; files it refers to are checked by SHA-256 when opened")
                .clicked()
            {
                match self.save_request() {
                    Ok(request) => {
                        let pick = Pending::spawn(|| {
                            rfd::FileDialog::new()
                                .add_filter("Refusal Lens session", &["json"])
                                .set_file_name("session.json")
                                .save_file()
                        });
                        self.sessions.io = Some(Io::PickSave(pick, Box::new(request)));
                    }
                    Err(e) => self.sessions.error = Some(e),
                }
            }
            let recent = self.sessions.recent.list();
            ui.add_enabled_ui(idle && !recent.is_empty(), |ui| {
                ui.menu_button("Recent", |ui| {
                    for path in recent {
                        if ui.button(path.display().to_string()).clicked() {
                            self.open_session_file(path);
                            ui.close();
                        }
                    }
                });
            });
        });
        if self.sessions.is_busy() {
            ui.horizontal_wrapped(|ui| {
                ui.weak("…");
                ui.weak("session…");
            });
        }
        if let Some(e) = &self.sessions.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        } else if let Some(m) = &self.sessions.message {
            ui.weak(m);
        }
    }

    /// Saves the session to `path` (what Save… does once a file is picked).
    pub fn save_session_file(&mut self, path: PathBuf) {
        match self.save_request() {
            Ok(request) => {
                self.sessions.io = Some(Io::Saving(Pending::spawn(move || {
                    save_session(path, request)
                })))
            }
            Err(e) => self.sessions.error = Some(e),
        }
    }

    /// Opens the session at `path` (what Open… and Recent do).
    pub fn open_session_file(&mut self, path: PathBuf) {
        self.sessions.error = None;
        self.sessions.message = Some(format!("opening {}", path.display()));
        self.sessions.io = Some(Io::Opening(Pending::spawn(move || open_session(path))));
    }

    fn save_request(&self) -> Result<SaveRequest, String> {
        let ModelState::Ready { card, organism, .. } = &self.model.state else {
            return Err("load a model first".into());
        };
        if !card.path.exists() {
            return Err(
                "a model built in memory cannot be saved in a session; open a model file".into(),
            );
        }
        let adapter = self.session.adapter.clone().filter(|_| organism.is_some());
        Ok(SaveRequest {
            model: card.path.clone(),
            adapter,
            adapter_active: self.session.refusal_tokens,
            sets: self
                .prompt_sets
                .sets
                .iter()
                .map(|s| s.path.clone())
                .filter(|p| p.is_file())
                .collect(),
            lens: self.session.directions.clone().map(|d| {
                (
                    d,
                    self.session.probes.clone(),
                    self.session.lens_file.clone(),
                )
            }),
            curve_layer: self.directions.layer,
            reply: self.reply.settings(),
            steering: self.steering.settings(self.session.steer_main_reply),
            head_edits: self.session.extra_edits.clone(),
            tab: self.tab,
        })
    }

    fn poll_sessions(&mut self) {
        let Some(io) = self.sessions.io.take() else {
            return;
        };
        self.sessions.io = match io {
            Io::PickSave(pick, request) => match pick.poll() {
                None => Some(Io::PickSave(pick, request)),
                Some(None) => None,
                Some(Some(path)) => Some(Io::Saving(Pending::spawn(move || {
                    save_session(path, *request)
                }))),
            },
            Io::PickOpen(pick) => match pick.poll() {
                None => Some(Io::PickOpen(pick)),
                Some(None) => None,
                Some(Some(path)) => {
                    self.open_session_file(path);
                    self.sessions.io.take()
                }
            },
            Io::Saving(pending) => match pending.poll() {
                None => Some(Io::Saving(pending)),
                Some(Ok(path)) => {
                    self.sessions.recent.add(&path);
                    self.sessions.error = None;
                    self.sessions.message = Some(format!("saved {}", path.display()));
                    None
                }
                Some(Err(e)) => {
                    self.sessions.error = Some(format!("cannot save the session: {e:#}"));
                    None
                }
            },
            Io::Opening(pending) => match pending.poll() {
                None => Some(Io::Opening(pending)),
                Some(Ok((path, session, sets))) => {
                    self.sessions.recent.add(&path);
                    self.start_restore(session, sets);
                    self.sessions.message = Some(format!("opened {}", path.display()));
                    None
                }
                Some(Err(e)) => {
                    self.sessions.message = None;
                    self.sessions.error = Some(format!("cannot open the session: {e:#}"));
                    None
                }
            },
        };
    }

    /// Sends the chain of jobs that brings the session's model and lens back.
    fn start_restore(&mut self, session: SessionFile, sets: Vec<PromptSet>) {
        self.prompt_sets.sets = sets;
        self.reply.clear();
        let path = session.model.file.path.clone();
        let mut last = self.worker.submit(Job::LoadModel {
            path: path.clone(),
            adapter: session.model.adapter.as_ref().map(|a| a.path.clone()),
        });
        self.model.loading(last, path);
        self.session.adapter = session.model.adapter.as_ref().map(|a| a.path.clone());
        if session.model.adapter.is_some() && !session.model.adapter_active {
            last = self.worker.submit(Job::UseOrganism(false));
        }
        if let Some(lens) = &session.lens {
            last = self
                .worker
                .submit(Job::LoadLens(lens.directions.path.clone()));
        }
        self.sessions.restore = Some(Restore {
            last_job: last,
            session,
        });
    }

    /// Called with each worker event after the shell handled it: the last job of a restore
    /// chain puts the panels' settings back. `finished`: the event ends its job (not progress);
    /// `failure`: the job's error, if it failed.
    pub(super) fn after_event(&mut self, id: JobId, finished: bool, failure: Option<&str>) {
        if !finished
            || self
                .sessions
                .restore
                .as_ref()
                .is_none_or(|r| r.last_job != id)
        {
            return;
        }
        let Some(Restore { session, .. }) = self.sessions.restore.take() else {
            return;
        };
        if let Some(error) = failure {
            self.sessions.message = None;
            self.sessions.error = Some(format!("cannot open the session: {error}"));
            return;
        }
        self.reply.restore(session.reply);
        self.session.steer_main_reply = session.steering.steer_main_reply;
        self.steering.restore(session.steering);
        self.session.extra_edits = session.head_edits;
        self.directions.layer = session.lens.and_then(|l| l.curve_layer);
        self.tab = Tab::from_name(&session.tab).unwrap_or_default();
    }
}
