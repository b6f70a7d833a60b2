//! Faults in the worker: every job kind, given input it must refuse, ends in one `Failed`
//! event with a one-line reason, and the worker then serves the next job.

use std::time::{Duration, Instant};

use refusal_lens::worker::{CompareWith, Event, GenerateRequest, Job, JobId, Worker};
use refusal_lens_engine::analysis::lens::DirectionOptions;
use refusal_lens_engine::analysis::steering::{Direction, Edit, Steering, StreamPositions};
use refusal_lens_engine::data::prompts::PromptSet;
use refusal_lens_engine::model::config::Family;
use refusal_lens_engine::testing::tiny_model;

fn request(prompt: &str, tokens: usize) -> GenerateRequest {
    GenerateRequest {
        system: None,
        prompt: prompt.into(),
        max_new_tokens: tokens,
        sampling: Default::default(),
        tau: 0.5,
        opener_bias: 0.0,
        steering: Default::default(),
    }
}

/// The events of job `id` until it ends (a Failed event, or `done`).
fn outcome(worker: &Worker, id: JobId, done: impl Fn(&Event) -> bool) -> Result<(), String> {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "job {id:?} never ended"
        );
        match worker.try_recv() {
            Some(Event::Failed { id: i, error }) if i == id => return Err(error),
            Some(e) if e.id() == id && done(&e) => return Ok(()),
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

#[test]
fn every_job_kind_fails_cleanly_and_the_worker_serves_the_next_job() {
    let mut worker = Worker::spawn(|_| {});
    worker.submit(Job::UseModel {
        base: Box::new(tiny_model(Family::Llama, 1).unwrap()),
        organism: None,
    });
    let empty_set = || {
        Box::new(PromptSet {
            name: "empty".into(),
            path: "empty.jsonl".into(),
            records: Vec::new(),
        })
    };
    let needs_directions = Steering {
        edits: vec![Edit::Add {
            direction: Direction::Refusal,
            layers: (1, 1),
            alpha: 1.0,
            positions: StreamPositions::All,
        }],
    };
    let cache = std::env::temp_dir().join("refusal-lens-worker-faults");
    let bad_jobs: Vec<(&str, Job)> = vec![
        (
            "LoadModel",
            Job::LoadModel {
                path: "/nonexistent/model.gguf".into(),
                adapter: None,
            },
        ),
        // No CUDA in a CPU-only build; no 100th GPU in a CUDA one.
        ("UseDevice", Job::UseDevice("cuda:99".into())),
        ("Generate", Job::Generate(request("   ", 4))),
        (
            "Steer",
            Job::Steer {
                request: request("", 4),
                baseline: true,
                ahead: Vec::new(),
            },
        ),
        (
            "Sweep",
            Job::Sweep {
                prompts: vec!["hi".into()],
                alphas: vec![1.0],
                steering: needs_directions.clone(),
                tau: 0.5,
            },
        ),
        (
            "Trajectory",
            Job::Trajectory {
                system: None,
                prompt: "hi".into(),
                reply: vec![],
                steering: needs_directions,
                layer: None,
            },
        ),
        (
            "Calibrate",
            Job::Calibrate {
                sets: vec![("x".into(), vec!["".into()])],
            },
        ),
        (
            "Train",
            Job::Train {
                train: Vec::new(),
                val: Vec::new(),
                options: Default::default(),
                goal: Default::default(),
                out: cache.join("adapter"),
            },
        ),
        (
            "BuildLens",
            Job::BuildLens {
                harmful: empty_set(),
                harmless: empty_set(),
                options: DirectionOptions::default(),
                activation_cache: cache.clone(),
            },
        ),
        ("ChooseLayer", Job::ChooseLayer(999)),
        ("SaveLens", Job::SaveLens(cache.join("d.safetensors"))),
        (
            "LoadLens",
            Job::LoadLens("/nonexistent/d.safetensors".into()),
        ),
        ("Heads", Job::Heads { pairs: Vec::new() }),
        (
            "Cascade",
            Job::Cascade {
                harmful: String::new(),
                gate: (99, 99),
            },
        ),
        (
            "Guard",
            Job::Guard {
                harmful: empty_set(),
                harmless: empty_set(),
                borderline: None,
                jailbreaks: Vec::new(),
                activation_cache: cache.clone(),
            },
        ),
        (
            "Compare",
            Job::Compare {
                with: CompareWith::Counterpart,
                harmful: empty_set(),
                harmless: empty_set(),
                borderline: None,
                activation_cache: cache.clone(),
                prompt: None,
                reply_tokens: 4,
            },
        ),
    ];
    for (kind, job) in bad_jobs {
        let id = worker.submit(job);
        let error = outcome(&worker, id, |_| false).expect_err(kind);
        assert!(
            !error.is_empty() && !error.contains('\n'),
            "{kind}: {error:?}"
        );
        // The worker is still there and serves a reply.
        let next = worker.submit(Job::Generate(request("Tell me about owls", 3)));
        outcome(&worker, next, |e| matches!(e, Event::Finished { .. }))
            .unwrap_or_else(|e| panic!("after a failed {kind}: {e}"));
    }
}

#[test]
fn use_device_moves_the_loaded_models_and_says_where_they_run() {
    let mut worker = Worker::spawn(|_| {});
    worker.submit(Job::UseModel {
        base: Box::new(tiny_model(Family::Llama, 1).unwrap()),
        organism: None,
    });
    let id = worker.submit(Job::UseDevice("cpu".into()));
    let start = Instant::now();
    let card = loop {
        assert!(start.elapsed() < Duration::from_secs(60), "no ModelLoaded");
        match worker.try_recv() {
            Some(Event::ModelLoaded { id: i, card, .. }) if i == id => break card,
            Some(Event::Failed { error, .. }) => panic!("{error}"),
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    assert_eq!(card.device, "cpu");
    // The moved model still answers.
    let next = worker.submit(Job::Generate(request("Tell me about owls", 3)));
    outcome(&worker, next, |e| matches!(e, Event::Finished { .. })).unwrap();
}

/// The steered reply of job `id`: (text, P(refuse), computed ahead).
fn steered(worker: &Worker, id: JobId) -> (String, f32, bool) {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no steered reply"
        );
        match worker.try_recv() {
            Some(Event::Steered { id: i, reply }) if i == id && !reply.baseline => {
                return (reply.text, reply.refusal_probability, reply.computed_ahead)
            }
            Some(Event::Failed { error, .. }) => panic!("{error}"),
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// While idle after a steer job the worker computes the prompt passes of the stacks it was
/// given; a reply under one of them starts from its kept pass and is the reply computed
/// afresh; a job that may change the model or the directions drops what was kept.
#[test]
fn prompt_passes_computed_ahead_give_the_same_reply_and_are_dropped_with_the_model() {
    use refusal_lens_engine::analysis::steering::HeadAblation;
    let model = || Box::new(tiny_model(Family::Llama, 3).unwrap());
    let stack = |head: usize| Steering {
        edits: vec![Edit::AblateHead {
            layer: 0,
            head,
            how: HeadAblation::Zero,
        }],
    };
    let steer = |steering: Steering, ahead: Vec<Steering>| Job::Steer {
        request: GenerateRequest {
            steering,
            ..request("Tell me about owls", 6)
        },
        baseline: false,
        ahead,
    };
    // Fresh replies, nothing kept.
    let mut fresh = Worker::spawn(|_| {});
    fresh.submit(Job::UseModel {
        base: model(),
        organism: None,
    });
    let want: Vec<(String, f32, bool)> = (0..2)
        .map(|head| {
            let id = fresh.submit(steer(stack(head), Vec::new()));
            steered(&fresh, id)
        })
        .collect();
    assert!(want.iter().all(|w| !w.2));

    let mut worker = Worker::spawn(|_| {});
    worker.submit(Job::UseModel {
        base: model(),
        organism: None,
    });
    let id = worker.submit(steer(Steering::default(), vec![stack(0), stack(1)]));
    assert!(!steered(&worker, id).2);
    // A tiny model's pass takes milliseconds.
    std::thread::sleep(Duration::from_secs(2));
    let id = worker.submit(steer(stack(0), Vec::new()));
    let got = steered(&worker, id);
    assert!(got.2, "head 0's pass was computed ahead");
    assert_eq!((&got.0, got.1), (&want[0].0, want[0].1));
    worker.submit(Job::UseModel {
        base: model(),
        organism: None,
    });
    let id = worker.submit(steer(stack(1), Vec::new()));
    let got = steered(&worker, id);
    assert!(!got.2, "a new model drops the kept passes");
    assert_eq!((&got.0, got.1), (&want[1].0, want[1].1));
}
