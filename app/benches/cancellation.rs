//! Cancellation latency of each long job kind on the default model + organism: the job is
//! submitted, left to run for 1.5 s, then cancelled (`Worker::cancel_all`, what Stop and the
//! Cancel buttons do); the latency is the time from the cancel to the worker answering the
//! next job (a no-op switch to the model already in use). Target: ≤ 100 ms.
//! `cargo bench -p refusal-lens --bench cancellation`

use std::time::{Duration, Instant};

use refusal_lens::worker::{CompareWith, Event, GenerateRequest, Job, Worker};
use refusal_lens_engine::analysis::lens::DirectionOptions;
use refusal_lens_engine::analysis::steering::{Direction, Edit, Steering, StreamPositions};
use refusal_lens_engine::data::prompts::{sample_prompts_dir, PromptSet, Split};
use refusal_lens_engine::{default_model_path, organism_dir};

fn wait(worker: &Worker, what: &str, done: impl Fn(&Event) -> bool) {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(900),
            "timed out: {what}"
        );
        match worker.try_recv() {
            Some(e) if done(&e) => return,
            Some(_) => {}
            None => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}

fn main() {
    refusal_lens::pin_thread_count(true);
    let mut worker = Worker::spawn(|_| {});
    worker.submit(Job::LoadModel {
        path: default_model_path(),
        adapter: Some(organism_dir()),
    });
    // The model, then its shipped lens.
    wait(&worker, "the model and lens", |e| {
        matches!(e, Event::LensReady { .. })
    });
    let load =
        |n: &str| PromptSet::load(&sample_prompts_dir().join(format!("{n}.jsonl")), None).unwrap();
    let (harmful, harmless) = (load("harmful"), load("harmless"));
    let pairs = harmful.pairs_with(&harmless, Split::Test);
    let request = |tokens| GenerateRequest {
        system: None,
        prompt: "Write a long story about a dragon who learns to fly.".into(),
        max_new_tokens: tokens,
        sampling: Default::default(),
        tau: 0.5,
        opener_bias: 0.0,
        steering: Steering {
            edits: vec![Edit::Add {
                direction: Direction::Refusal,
                layers: (10, 10),
                alpha: 0.5,
                positions: StreamPositions::All,
            }],
        },
    };
    let fresh_cache =
        || std::env::temp_dir().join(format!("refusal-lens-cancel-{}", std::process::id()));
    let prompts: Vec<String> = harmful
        .records
        .iter()
        .take(64)
        .map(|r| r.prompt.clone())
        .collect();
    type MakeJob = Box<dyn Fn() -> Job>;
    let jobs: Vec<(&str, MakeJob)> = vec![
        ("Generate", Box::new(move || Job::Generate(request(4000)))),
        (
            "Steer",
            Box::new(move || Job::Steer {
                request: request(4000),
                baseline: true,
                ahead: Vec::new(),
            }),
        ),
        (
            "Sweep",
            Box::new({
                let prompts = prompts.clone();
                move || Job::Sweep {
                    prompts: prompts.clone(),
                    alphas: vec![0.0, 0.5, 1.0],
                    steering: request(1).steering,
                    tau: 0.5,
                }
            }),
        ),
        (
            "Calibrate",
            Box::new({
                let prompts = prompts.clone();
                move || Job::Calibrate {
                    sets: vec![("harmful".into(), prompts.clone())],
                }
            }),
        ),
        (
            "BuildLens",
            Box::new({
                let (a, b) = (harmful.clone(), harmless.clone());
                move || Job::BuildLens {
                    harmful: Box::new(a.clone()),
                    harmless: Box::new(b.clone()),
                    options: DirectionOptions::default(),
                    activation_cache: fresh_cache(),
                }
            }),
        ),
        (
            "Heads",
            Box::new(move || Job::Heads {
                pairs: pairs.clone(),
            }),
        ),
        (
            "Guard",
            Box::new({
                let (a, b) = (harmful.clone(), harmless.clone());
                move || Job::Guard {
                    harmful: Box::new(a.clone()),
                    harmless: Box::new(b.clone()),
                    borderline: None,
                    jailbreaks: Vec::new(),
                    activation_cache: fresh_cache(),
                }
            }),
        ),
        (
            "Compare",
            Box::new({
                let (a, b) = (harmful.clone(), harmless.clone());
                move || Job::Compare {
                    with: CompareWith::Counterpart,
                    harmful: Box::new(a.clone()),
                    harmless: Box::new(b.clone()),
                    borderline: None,
                    activation_cache: fresh_cache(),
                    prompt: None,
                    reply_tokens: 8,
                }
            }),
        ),
    ];
    // The answer to the next job alone, with nothing to cancel.
    let start = Instant::now();
    let probe = worker.submit(Job::UseOrganism(true));
    wait(&worker, "the probe job", |e| e.id() == probe);
    println!(
        "the next job alone (nothing to cancel): {:.0} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    println!(
        "cancellation latency (cancel → the worker answers the next job), after 1.5 s of each job:"
    );
    for (kind, job) in &jobs {
        let id = worker.submit(job());
        std::thread::sleep(Duration::from_millis(1500));
        let cancelled_at = Instant::now();
        worker.cancel_all();
        let probe = worker.submit(Job::UseOrganism(true));
        wait(&worker, "the next job", |e| e.id() == probe);
        let ms = cancelled_at.elapsed().as_secs_f64() * 1e3;
        println!(
            "  {kind:<10} {ms:>7.0} ms{}",
            if ms <= 100.0 { "" } else { "   (over 100 ms)" }
        );
        let _ = id;
    }
    let _ = std::fs::remove_dir_all(fresh_cache());
}
