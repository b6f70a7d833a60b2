//! The worker thread: it owns the model, runs jobs one at a time and reports events.
//! The UI (or any other client) only sends [`Job`]s and reads [`Event`]s; it never blocks.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use refusal_lens_engine::generate::{generate, GenerateConfig, Generation, Sampling, TokenStep};
use refusal_lens_engine::loader::ModelCard;
use refusal_lens_engine::model::FastPrecision;
use refusal_lens_engine::LoadedModel;

pub type JobId = u64;

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub system: Option<String>,
    pub prompt: String,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
}

pub enum Job {
    LoadModel {
        path: PathBuf,
    },
    /// Replace the model with one built in memory (tests, fine-tuned models).
    UseModel(Box<LoadedModel>),
    Generate {
        id: JobId,
        request: GenerateRequest,
    },
}

#[derive(Debug, Clone)]
pub enum Event {
    ModelLoading {
        path: PathBuf,
    },
    ModelLoaded {
        card: Box<ModelCard>,
        seconds: f64,
    },
    ModelFailed {
        path: PathBuf,
        error: String,
    },
    /// The prompt as the model sees it: templated token ids and their text.
    Started {
        id: JobId,
        prompt_tokens: Vec<(u32, String)>,
        t_inst: usize,
        t_post: usize,
    },
    Token {
        id: JobId,
        step: TokenStep,
    },
    Finished {
        id: JobId,
        generation: Box<Generation>,
    },
    Failed {
        id: JobId,
        error: String,
    },
}

/// The client side of the worker.
pub struct Worker {
    jobs: Sender<Job>,
    events: Receiver<Event>,
    /// Every job with an id at or below this is cancelled.
    cancel_through: Arc<AtomicU64>,
    next_id: JobId,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the worker thread. `notify` is called after every event (the GUI passes its
    /// repaint request so events show up at once).
    pub fn spawn(notify: impl Fn() + Send + 'static) -> Worker {
        let (jobs, job_rx) = crossbeam_channel::unbounded();
        let (event_tx, events) = crossbeam_channel::unbounded();
        let cancel_through = Arc::new(AtomicU64::new(0));
        let cancel = cancel_through.clone();
        let thread = std::thread::Builder::new()
            .name("refusal-lens-worker".into())
            .spawn(move || run(job_rx, event_tx, cancel, notify))
            .expect("spawning the worker thread");
        Worker {
            jobs,
            events,
            cancel_through,
            next_id: 0,
            thread: Some(thread),
        }
    }

    pub fn send(&self, job: Job) {
        // The worker only stops when this handle drops, so sending cannot fail while we exist.
        let _ = self.jobs.send(job);
    }

    pub fn load_model(&self, path: PathBuf) {
        self.send(Job::LoadModel { path });
    }

    /// Queues a generation, cancelling every earlier one (a newer request supersedes).
    pub fn generate(&mut self, request: GenerateRequest) -> JobId {
        self.next_id += 1;
        let id = self.next_id;
        self.cancel_through.store(id - 1, Ordering::SeqCst);
        self.send(Job::Generate { id, request });
        id
    }

    /// Cancels every job sent so far.
    pub fn cancel_all(&self) {
        self.cancel_through.store(self.next_id, Ordering::SeqCst);
    }

    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// Blocks for the next event (CLI and tests).
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.cancel_all();
        // Closing the job channel ends the worker loop.
        let (closed, _) = crossbeam_channel::unbounded();
        self.jobs = closed;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    jobs: Receiver<Job>,
    events: Sender<Event>,
    cancel_through: Arc<AtomicU64>,
    notify: impl Fn(),
) {
    let mut model: Option<LoadedModel> = None;
    let emit = |e: Event| {
        let _ = events.send(e);
        notify();
    };
    for job in jobs {
        // A panic inside a job (a bug) must not kill the worker: report it and keep serving.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job {
            Job::LoadModel { path } => {
                emit(Event::ModelLoading { path: path.clone() });
                let started = Instant::now();
                match LoadedModel::load(&path, FastPrecision::Auto) {
                    Ok(m) => {
                        let card = Box::new(m.card.clone());
                        model = Some(m);
                        emit(Event::ModelLoaded {
                            card,
                            seconds: started.elapsed().as_secs_f64(),
                        });
                    }
                    Err(e) => emit(Event::ModelFailed {
                        path,
                        error: e.to_string(),
                    }),
                }
            }
            Job::UseModel(m) => {
                let card = Box::new(m.card.clone());
                model = Some(*m);
                emit(Event::ModelLoaded { card, seconds: 0.0 });
            }
            Job::Generate { id, request } => {
                if cancel_through.load(Ordering::SeqCst) >= id {
                    return; // superseded before it started
                }
                let result = match &model {
                    None => Err("no model is loaded".to_string()),
                    Some(m) => run_generate(m, id, &request, &cancel_through, &emit)
                        .map_err(|e| e.to_string()),
                };
                match result {
                    Ok(generation) => emit(Event::Finished {
                        id,
                        generation: Box::new(generation),
                    }),
                    Err(error) => emit(Event::Failed { id, error }),
                }
            }
        }));
        if let Err(panic) = outcome {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            emit(Event::Failed {
                id: 0,
                error: format!("internal error: {msg}"),
            });
        }
    }
}

fn run_generate(
    m: &LoadedModel,
    id: JobId,
    request: &GenerateRequest,
    cancel_through: &AtomicU64,
    emit: &dyn Fn(Event),
) -> refusal_lens_engine::Result<Generation> {
    let prompt = m.chat_prompt(request.system.as_deref(), &request.prompt)?;
    let prompt_tokens = prompt.ids.iter().map(|&t| (t, m.token_text(t))).collect();
    emit(Event::Started {
        id,
        prompt_tokens,
        t_inst: prompt.t_inst,
        t_post: prompt.t_post,
    });
    let cfg = GenerateConfig {
        max_new_tokens: request.max_new_tokens,
        sampling: request.sampling,
        ..Default::default()
    };
    let cancelled = || cancel_through.load(Ordering::SeqCst) >= id;
    generate(m, &prompt.ids, &cfg, &cancelled, &mut |step| {
        emit(Event::Token {
            id,
            step: step.clone(),
        })
    })
}
