//! Live-steering latency on the default model + organism. First the real app, driven
//! headless by egui_kittest as a user would drive it (shipped directions, Steering tab,
//! ablation slider moved): slider move → first steered token on screen, split into the
//! frame that sends the job, queueing, the prompt pass that yields the first token, the
//! first decode step and the frame that paints it; and a GUI job timed against the same
//! engine call made directly (as the CLI makes it). Then the worker alone: a scripted
//! slider drag (α 0 → 1 in 20 steps, one every 30 ms), single slider changes at rest, and
//! the UI's own per-frame cost while a steered reply streams.
//! `cargo bench -p refusal-lens --bench steering_latency [-- app]` (threads as in the app
//! unless RAYON_NUM_THREADS is set; `app`: the first part only).

use std::time::{Duration, Instant};

use refusal_lens::gui::{RefusalLensApp, Startup, Tab};
use refusal_lens::worker::{Event, GenerateRequest, Job, JobId, Worker};
use refusal_lens_engine::analysis::steering::{Direction, Edit, Steering, StreamPositions};
use refusal_lens_engine::data::prompts::{sample_prompts_dir, PromptSet};
use refusal_lens_engine::{default_model_path, organism_dir};

fn wait(worker: &Worker, what: &str, mut done: impl FnMut(&Event) -> bool) {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "timed out: {what}"
        );
        match worker.try_recv() {
            Some(Event::Failed { error, .. }) => panic!("{what}: {error}"),
            Some(e) if done(&e) => return,
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn request(alpha: f32, layer: usize, tokens: usize) -> GenerateRequest {
    GenerateRequest {
        system: None,
        prompt: "How do I bake bread at home?".into(),
        max_new_tokens: tokens,
        sampling: Default::default(),
        tau: 0.5,
        opener_bias: 0.0,
        steering: Steering {
            edits: vec![Edit::Add {
                direction: Direction::Refusal,
                layers: (layer, layer),
                alpha,
                positions: StreamPositions::All,
            }],
        },
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // Threads as the GUI runs them.
    refusal_lens::pin_thread_count(true);
    slider_to_first_token_in_the_app();
    // `cargo bench --bench steering_latency -- app`: the app's latency only.
    if std::env::args().any(|a| a == "app") {
        return;
    }
    gui_job_against_direct_call();
    let mut worker = Worker::spawn(|_| {});
    worker.submit(Job::LoadModel {
        path: default_model_path(),
        adapter: Some(organism_dir()),
    });
    wait(&worker, "the model", |e| {
        matches!(e, Event::ModelLoaded { .. })
    });
    let load =
        |n: &str| PromptSet::load(&sample_prompts_dir().join(format!("{n}.jsonl")), None).unwrap();
    worker.submit(Job::BuildLens {
        harmful: Box::new(load("harmful")),
        harmless: Box::new(load("harmless")),
        options: refusal_lens_engine::analysis::lens::DirectionOptions {
            select: false,
            ..Default::default()
        },
        activation_cache: refusal_lens_engine::analysis::activations::default_cache_dir(),
    });
    let mut layer = 0;
    wait(&worker, "directions", |e| match e {
        Event::LensReady { directions, .. } => {
            layer = directions.layer;
            true
        }
        _ => false,
    });

    // Warm up (first-call allocations) with the baseline.
    let id = worker.submit(Job::Steer {
        request: request(0.0, layer, 8),
        baseline: true,
        ahead: Vec::new(),
    });
    wait(
        &worker,
        "warm-up",
        |e| matches!(e, Event::Steered { id: i, reply } if *i == id && !reply.baseline),
    );

    scripted_drag(&mut worker, layer);
    changes_at_rest(&mut worker, layer);
    drop(worker);
    ui_frame_cost();
}

/// 1. A scripted drag: α 0 → 1 in 20 steps, one every 30 ms.
fn scripted_drag(worker: &mut Worker, layer: usize) {
    let mut sent: Vec<(JobId, Instant)> = Vec::new();
    let mut first_token: Vec<f64> = Vec::new();
    let drag_start = Instant::now();
    let steps = 20;
    let mut next_step = 0;
    let (final_first, final_total) = loop {
        if next_step <= steps
            && drag_start.elapsed() >= Duration::from_millis(30 * next_step as u64)
        {
            let alpha = next_step as f32 / steps as f32;
            let steer = Job::Steer {
                request: request(alpha, layer, 64),
                baseline: false,
                ahead: Vec::new(),
            };
            sent.push((worker.submit(steer), Instant::now()));
            next_step += 1;
        }
        match worker.try_recv() {
            Some(Event::Token {
                id,
                baseline: false,
                step,
                ..
            }) if step.index == 0 => {
                if let Some((_, t)) = sent.iter().find(|(i, _)| *i == id) {
                    first_token.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            Some(Event::Steered { id, reply }) if !reply.baseline => {
                if sent.last().is_some_and(|(i, _)| *i == id) && next_step > steps {
                    break (reply.first_token_seconds * 1e3, reply.seconds);
                }
            }
            Some(Event::Failed { error, .. }) => panic!("{error}"),
            Some(_) => {}
            None => std::thread::sleep(Duration::from_micros(200)),
        }
    };
    println!(
        "scripted drag: {} slider values in {:.0} ms",
        steps + 1,
        30.0 * steps as f64
    );
    println!(
        "  values that produced a first steered token: {} of {}; latency to it: median {:.0} ms, max {:.0} ms",
        first_token.len(),
        steps + 1,
        median(first_token.clone()),
        first_token.iter().copied().fold(0.0, f64::max)
    );
    println!("  final value: first token {final_first:.0} ms, full 64-token reply + judgement {final_total:.2} s");
}

/// 2. Single slider changes at rest.
fn changes_at_rest(worker: &mut Worker, layer: usize) {
    let mut at_rest = Vec::new();
    let mut full = Vec::new();
    for k in 0..5 {
        let id = worker.submit(Job::Steer {
            request: request(0.25 + 0.1 * k as f32, layer, 64),
            baseline: false,
            ahead: Vec::new(),
        });
        let mut ft = 0.0;
        let mut total = 0.0;
        wait(worker, "a steered reply", |e| match e {
            Event::Steered { id: i, reply } if *i == id && !reply.baseline => {
                ft = reply.first_token_seconds;
                total = reply.seconds;
                true
            }
            _ => false,
        });
        at_rest.push(ft * 1e3);
        full.push(total);
    }
    println!(
        "single change at rest: first steered token median {:.0} ms; 64-token reply + judgement median {:.2} s",
        median(at_rest),
        median(full)
    );
}

/// 3. The UI's per-frame cost (layout + tessellation, no GPU) while a steered reply streams.
fn ui_frame_cost() {
    let app = RefusalLensApp::new(
        None,
        Startup::Path {
            model: default_model_path(),
            adapter: Some(organism_dir()),
        },
    );
    let ctx = egui::Context::default();
    let mut app = app;
    let frame = |ctx: &egui::Context, app: &mut RefusalLensApp| {
        let input = egui::RawInput {
            screen_rect: Some(egui::Rect::from_min_size(
                egui::Pos2::ZERO,
                egui::vec2(1200.0, 780.0),
            )),
            ..Default::default()
        };
        let out = ctx.run_ui(input, |ui| app.show(ui));
        ctx.tessellate(out.shapes, out.pixels_per_point);
    };
    let start = Instant::now();
    let mut requested = false;
    while !(app.model.is_ready() && app.session.probes.is_some()) {
        frame(&ctx, &mut app);
        if app.model.is_ready() && !requested {
            requested = app.compute_lens();
        }
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the app never got directions"
        );
    }
    app.tab = Tab::Steering;
    app.steering.alpha_refusal = 0.5;
    let mut times = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let t = Instant::now();
        frame(&ctx, &mut app);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(16));
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!(
        "UI frame while regenerating: mean {:.2} ms, max {:.2} ms of CPU per frame ({} frames) → {:.0} frames/s possible",
        mean,
        times.iter().copied().fold(0.0, f64::max),
        times.len(),
        1e3 / mean
    );
}

/// The real app under egui_kittest (layout and tessellation each frame, no GPU): the
/// ablation slider moved to a new value, then frames stepped until the steered column shows
/// its first token.
fn slider_to_first_token_in_the_app() {
    use egui_kittest::Harness;
    let startup = || Startup::Path {
        model: default_model_path(),
        adapter: Some(organism_dir()),
    };
    let mut h = Harness::builder()
        .with_size([1200.0, 780.0])
        .build_ui_state(
            |ui, app: &mut RefusalLensApp| app.show(ui),
            // Replaced below, once the harness's context exists.
            RefusalLensApp::new(
                None,
                Startup::Model {
                    base: Box::new(
                        refusal_lens_engine::testing::tiny_model(
                            refusal_lens_engine::model::config::Family::Llama,
                            0,
                        )
                        .unwrap(),
                    ),
                    organism: None,
                },
            ),
        );
    // The app as eframe runs it: its worker asks the harness's context for repaints, and a
    // frame runs only when one is due (`wait_for_repaint`).
    let (repaints, requests) = crossbeam_channel::unbounded();
    h.ctx.set_request_repaint_callback(move |info| {
        let _ = repaints.send(Instant::now() + info.delay);
    });
    *h.state_mut() = RefusalLensApp::new(Some(h.ctx.clone()), startup());
    let step_until = |h: &mut Harness<'_, RefusalLensApp>,
                      what: &str,
                      done: &dyn Fn(&RefusalLensApp) -> bool| {
        let start = Instant::now();
        while !done(h.state()) {
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "timed out: {what}"
            );
            h.step();
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    step_until(&mut h, "the model and its shipped lens", &|a| {
        a.model.is_ready() && a.session.probes.is_some()
    });
    {
        let a = h.state_mut();
        a.reply.prompt = "How do I make a pipe bomb at home?".into();
        a.tab = Tab::Steering;
        a.steering.ablate = true;
    }
    step_until(&mut h, "the baseline", &|a| {
        a.steering.baseline.done && a.steering.steered.done
    });
    // Cold: each move jumps at least 10 steps (beyond what is computed ahead) to a value not
    // seen before, right after the last reply. Warm: each move is 1–3 steps from a value the
    // user rested on for 6 s.
    let cold = vec![0.5, 1.0, 1.5, 2.0, 0.25, 0.75, 1.25, 1.75, 0.1, 0.6];
    let warm: Vec<f32> = (0..10)
        .scan(0.6f32, |v, k| {
            *v += [0.05, -0.10, 0.15][k % 3];
            Some(*v)
        })
        .collect();
    for (name, values, pause) in [
        ("cold: a jump of 10+ steps, nothing computed ahead", cold, 0),
        ("warm: 1–3 steps after a 6 s rest", warm, 6000),
    ] {
        app_moves(
            &mut h,
            &requests,
            name,
            &values,
            Duration::from_millis(pause),
        );
    }
}

/// Sleeps until the app asked for a repaint and its delay has passed (what eframe does
/// between frames), then returns.
fn wait_for_repaint(requests: &crossbeam_channel::Receiver<Instant>) {
    let due = requests
        .recv_timeout(Duration::from_secs(300))
        .expect("the app asked for no repaint");
    // A sooner request may have followed.
    let due = requests.try_iter().fold(due, Instant::min);
    if let Some(wait) = due.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
}

/// Moves the ablation slider to each of `values` after `pause`, and prints the median split
/// of slider move → first steered token on screen.
fn app_moves(
    h: &mut egui_kittest::Harness<'_, RefusalLensApp>,
    requests: &crossbeam_channel::Receiver<Instant>,
    name: &str,
    values: &[f32],
    pause: Duration,
) {
    // Frames only when the app asks for them, so the UI takes no core from the worker.
    let step_until = |h: &mut egui_kittest::Harness<'_, RefusalLensApp>,
                      _what: &str,
                      done: &dyn Fn(&RefusalLensApp) -> bool| {
        while !done(h.state()) {
            wait_for_repaint(requests);
            h.step();
        }
    };
    let (mut send, mut queue, mut prefill, mut decode, mut paint, mut total) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut ahead = 0;
    for &value in values {
        // The app is idle: nothing repaints, the worker computes ahead.
        std::thread::sleep(pause);
        // Repaints requested before the move are stale.
        requests.try_iter().for_each(drop);
        h.state_mut().steering.alpha_refusal = value;
        let moved = Instant::now();
        h.step(); // the frame that sees the new value and sends the job
        let sent = moved.elapsed().as_secs_f64();
        // Frames, when the app asks for them, until the first steered token is in the view …
        let (frame_start, frame_cost) = loop {
            wait_for_repaint(requests);
            let frame = Instant::now();
            h.step();
            if !h.state().steering.steered.text.is_empty() {
                break (frame, frame.elapsed().as_secs_f64());
            }
        };
        let until_paint_frame = frame_start.duration_since(moved).as_secs_f64();
        let on_screen = until_paint_frame + frame_cost;
        // … and the second token, for the decode step.
        step_until(h, "the second token", &|a| {
            a.steering.steered.token_worker_seconds.len() >= 2 || a.steering.steered.done
        });
        let times = h.state().steering.steered.token_worker_seconds.clone();
        let first = times[0];
        send.push(sent * 1e3);
        paint.push(frame_cost * 1e3);
        // Queueing (the worker finishing or cancelling the previous job) and the repaint's
        // wake-up: what is left of the wait once the worker's own time is taken out.
        queue.push(((until_paint_frame - sent - first).max(0.0)) * 1e3);
        prefill.push(first * 1e3);
        if times.len() >= 2 {
            decode.push((times[1] - times[0]) * 1e3);
        }
        total.push(on_screen * 1e3);
        step_until(h, "the reply", &|a| a.steering.steered.done);
        ahead += h.state().steering.steered.computed_ahead as usize;
    }
    println!(
        "slider move → first steered token on screen (real app, kittest, 1200×780, {name}; median of {}; prompt pass computed ahead for {ahead}):",
        values.len()
    );
    println!(
        "  total {:.0} ms = send frame {:.1} + queueing and wake-up {:.1} + worker to the first token {:.0} (the prompt pass, unless computed ahead) + frame that paints it {:.1} ms (layout + tessellation, no rasterisation); next token {:.0} ms later",
        median(total),
        median(send),
        median(queue),
        median(prefill),
        median(paint),
        median(decode),
    );
}

/// A GUI job against the same engine call made directly, as the CLI makes it: directions and
/// probes from the sample sets (no disk cache, no layer selection).
fn gui_job_against_direct_call() {
    use refusal_lens_engine::analysis::lens::{self, DirectionOptions, ProbeJob};
    use refusal_lens_engine::model::FastPrecision;
    use refusal_lens_engine::organism::Adapter;
    let load =
        |n: &str| PromptSet::load(&sample_prompts_dir().join(format!("{n}.jsonl")), None).unwrap();
    let (harmful, harmless) = (load("harmful"), load("harmless"));
    let options = DirectionOptions {
        select: false,
        ..Default::default()
    };
    // GUI: the worker, threads as the app sets them for an analysis.
    let cache = std::env::temp_dir().join(format!("refusal-lens-bench-{}", std::process::id()));
    let mut worker = Worker::spawn(|_| {});
    worker.submit(Job::LoadModel {
        path: default_model_path(),
        adapter: Some(organism_dir()),
    });
    wait(&worker, "the model", |e| {
        matches!(e, Event::ModelLoaded { .. })
    });
    let start = Instant::now();
    worker.submit(Job::BuildLens {
        harmful: Box::new(harmful.clone()),
        harmless: Box::new(harmless.clone()),
        options: options.clone(),
        activation_cache: cache.join("gui"),
    });
    wait(&worker, "the lens", |e| {
        matches!(e, Event::LensReady { file: None, .. })
    });
    let gui = start.elapsed().as_secs_f64();
    drop(worker);
    // Direct: what `refusal-lens directions --no-select` + `probe` run, every core.
    refusal_lens::set_kernel_threads(false);
    let base =
        refusal_lens_engine::LoadedModel::load(&default_model_path(), FastPrecision::Auto).unwrap();
    let lm = Adapter::load(&organism_dir())
        .unwrap()
        .apply(&base)
        .unwrap();
    let start = Instant::now();
    let states = lens::collect_pair(
        &lm,
        &harmful,
        &harmless,
        None,
        Some(&cache.join("cli")),
        &|| false,
        &mut |_, _, _| {},
    )
    .unwrap();
    lens::directions_from_states(
        &lm,
        &harmful,
        &harmless,
        &states,
        &options,
        &|| false,
        &mut |_, _, _| {},
    )
    .unwrap();
    lens::probes_from_states(
        &lm,
        &harmful,
        &harmless,
        &states,
        &ProbeJob::default(),
        &|| false,
        &mut |_, _, _| {},
    )
    .unwrap();
    let direct = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&cache);
    println!(
        "directions + probes from 600 prompts (no cache): GUI worker {gui:.1} s, direct engine call {direct:.1} s, ratio {:.2}",
        gui / direct
    );
}
