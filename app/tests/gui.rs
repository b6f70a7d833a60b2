//! GUI tests with egui_kittest: a real app, a real worker thread, a tiny random model.

use std::time::{Duration, Instant};

use egui_kittest::kittest::{NodeT, Queryable};
use egui_kittest::Harness;
use refusal_lens::gui::{RefusalLensApp, Startup};
use refusal_lens_engine::model::config::Family;
use refusal_lens_engine::testing::tiny_model;

/// The app on the tiny model. Tests that write caches or adapters use [`harness_in`] with a
/// folder of their own.
fn harness() -> Harness<'static, RefusalLensApp> {
    harness_in(&std::env::temp_dir().join("refusal-lens-gui-tests"))
}

fn harness_in(cache_dir: &std::path::Path) -> Harness<'static, RefusalLensApp> {
    harness_on(tiny_model(Family::Llama, 1).unwrap(), cache_dir)
}

fn harness_on(
    model: refusal_lens_engine::LoadedModel,
    cache_dir: &std::path::Path,
) -> Harness<'static, RefusalLensApp> {
    let app = RefusalLensApp::with_cache_dir(
        None,
        Startup::Model {
            base: Box::new(model),
            organism: None,
        },
        cache_dir.to_path_buf(),
    );
    Harness::builder()
        .with_size([1100.0, 720.0])
        .build_ui_state(|ui, app: &mut RefusalLensApp| app.show(ui), app)
}

/// The app on the tiny model with directions and probes computed from the bundled sets, as
/// the Directions tab's button does (the activation cache kept in `cache`, out of the user's).
fn harness_with_directions(cache: &tempfile::TempDir) -> Harness<'static, RefusalLensApp> {
    let mut h = harness_in(cache.path());
    step_until(&mut h, "the model and the prompt sets", |a| {
        a.model.is_ready() && a.prompt_sets.sets.len() >= 2
    });
    h.get_by_label("Directions").click();
    h.step();
    h.get_by_label("Compute directions & probes").click();
    step_until(&mut h, "directions and probes", |a| {
        a.session.probes.is_some() || a.directions.error.is_some()
    });
    assert_eq!(h.state().directions.error, None);
    h
}

/// Steps the UI until `done` holds (the worker runs on its own thread meanwhile).
fn step_until(
    h: &mut Harness<'_, RefusalLensApp>,
    what: &str,
    done: impl Fn(&RefusalLensApp) -> bool,
) {
    let start = Instant::now();
    while !done(h.state()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    h.step();
}

#[test]
fn typing_a_prompt_and_pressing_generate_streams_tokens() {
    let mut h = harness();
    step_until(&mut h, "the model", |a| a.model.is_ready());
    assert!(!h
        .get_all_by_label_contains("tiny-random")
        .collect::<Vec<_>>()
        .is_empty());

    h.state_mut().reply.prompt.clear();
    h.get_by_label("User message").focus();
    h.step();
    h.get_by_label("User message")
        .type_text("Tell me about owls");
    h.step();
    assert_eq!(h.state().reply.prompt, "Tell me about owls");
    h.state_mut().reply.max_new_tokens = 12;

    h.get_by_label("Generate").click();
    step_until(&mut h, "the first token", |a| !a.reply.tokens.is_empty());
    step_until(&mut h, "the end of the reply", |a| !a.reply.is_running());
    let n = h.state().reply.tokens.len();
    assert!((1..=12).contains(&n), "{n} tokens");
    // The reply is on screen as chips and the status bar reports speed.
    h.get_by_label_contains("tok/s");
    h.get_by_label_contains("Prompt as the model sees it");
}

#[test]
fn stop_cancels_a_running_reply() {
    let mut h = harness();
    step_until(&mut h, "the model", |a| a.model.is_ready());
    h.state_mut().reply.max_new_tokens = 200;
    // On a loaded machine the tiny model can finish 200 tokens before the click lands; such
    // a run proves nothing either way, so try again (a few times at most).
    for _ in 0..5 {
        h.get_by_label("Generate").click();
        step_until(&mut h, "the first token", |a| !a.reply.tokens.is_empty());
        h.get_by_label("Stop").click();
        step_until(&mut h, "the stop", |a| !a.reply.is_running());
        if h.state().reply.status_line().contains("stopped") {
            assert!(h.state().reply.tokens.len() < 200);
            h.get_by_label_contains("stopped");
            return;
        }
    }
    panic!("five replies finished before Stop could cancel them");
}

#[test]
fn a_model_that_fails_to_load_shows_its_error_and_the_app_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.gguf");
    std::fs::write(&bad, b"GGUF but not really").unwrap();
    let app = RefusalLensApp::new(
        None,
        Startup::Path {
            model: bad,
            adapter: None,
        },
    );
    let mut h = Harness::builder()
        .with_size([1100.0, 720.0])
        .build_ui_state(|ui, app: &mut RefusalLensApp| app.show(ui), app);
    step_until(&mut h, "the failure", |a| !a.model.is_busy());
    h.get_by_label("Could not open the model");
    h.get_by_label_contains("not a valid GGUF");
    assert!(h.get_by_label("Generate").accesskit_node().is_disabled());
}

/// The families beyond Llama open from their GGUF files in the GUI as in the CLI, and reply.
#[test]
fn gemma_and_phi3_gguf_files_open_and_reply_in_the_gui() {
    use candle_core::quantized::GgmlDType;
    use refusal_lens_engine::testing::{random_weights, tiny_config, write_gguf};
    let dir = tempfile::tempdir().unwrap();
    for family in [Family::Gemma2, Family::Gemma3, Family::Phi3] {
        let cfg = tiny_config(family);
        let path = dir.path().join(format!("{}.gguf", family.name()));
        write_gguf(
            &path,
            &cfg,
            &random_weights(&cfg, 8).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        let app = RefusalLensApp::with_cache_dir(
            None,
            Startup::Path {
                model: path,
                adapter: None,
            },
            dir.path().join("cache"),
        );
        let mut h = Harness::builder()
            .with_size([1100.0, 720.0])
            .build_ui_state(|ui, app: &mut RefusalLensApp| app.show(ui), app);
        step_until(&mut h, "the model", |a| a.model.is_ready());
        // The architecture row (the file is named after it too).
        assert!(h.get_all_by_label(family.name()).count() >= 1);
        h.get_by_label_contains("weights");
        h.state_mut().reply.max_new_tokens = 3;
        h.get_by_label("Generate").click();
        h.step();
        step_until(&mut h, "a reply", |a| a.reply.tokens.len() == 3);
    }
}

#[test]
fn main_window_snapshot() {
    let mut h = harness();
    step_until(&mut h, "the model", |a| a.model.is_ready());
    h.state_mut().reply.max_new_tokens = 24;
    h.get_by_label("Generate").click();
    step_until(&mut h, "the reply", |a| {
        !a.reply.tokens.is_empty() && !a.reply.is_running()
    });
    // Both window sizes the layout is made for.
    for (w, h_) in [(1200.0, 780.0), (1600.0, 1000.0)] {
        h.set_size(egui::vec2(w, h_));
        h.run_steps(3);
        // Speeds differ run to run: hide the status bar's numbers.
        let status = h.get_by_label_contains("tok/s").rect();
        let to_right_edge = egui::Rect::from_min_max(status.min, egui::pos2(w, status.max.y));
        h.mask(to_right_edge.expand(2.0));
        h.snapshot(format!("main_window_{w}x{h_}"));
    }
}

#[test]
fn clicking_a_prompt_of_a_bundled_set_puts_it_in_the_editor() {
    let mut h = harness();
    step_until(&mut h, "the model", |a| a.model.is_ready());
    assert!(h
        .state()
        .prompt_sets
        .sets
        .iter()
        .any(|s| s.name == "borderline" && s.len() >= 60));
    h.get_by_label_contains("borderline (").click();
    h.run_steps(2);
    let first = h
        .state()
        .prompt_sets
        .sets
        .iter()
        .find(|s| s.name == "borderline")
        .unwrap()
        .records[0]
        .prompt
        .clone();
    h.get_by_label(&first).click();
    h.run_steps(2);
    assert_eq!(h.state().reply.prompt, first);
}

/// A tiny model and its "organism": the same model with [refuse]/[respond] rows added.
fn organism_harness() -> Harness<'static, RefusalLensApp> {
    let base = tiny_model(Family::Llama, 1).unwrap();
    let mut organism = base.clone();
    let d = base.model.config.d_model;
    let rows =
        candle_core::Tensor::zeros((2, d), candle_core::DType::F32, base.model.device()).unwrap();
    organism
        .add_tokens(&["[refuse]", "[respond]"], &rows)
        .unwrap();
    let app = RefusalLensApp::new(
        None,
        Startup::Model {
            base: Box::new(base),
            organism: Some(Box::new(organism)),
        },
    );
    Harness::builder()
        .with_size([1100.0, 820.0])
        .build_ui_state(|ui, app: &mut RefusalLensApp| app.show(ui), app)
}

#[test]
fn moving_tau_regenerates_the_reply_with_the_new_decision() {
    let mut h = organism_harness();
    step_until(&mut h, "the organism", |a| a.model.organism_active());
    h.state_mut().reply.max_new_tokens = 4;
    // τ = 0: every reply is refused; the slider change itself starts the new reply.
    let slider = h.get_by_role_and_label(
        egui::accesskit::Role::Slider,
        "τ: emit [refuse] when p([refuse]) ≥ τ",
    );
    slider.set_value_accesskit(0.0);
    step_until(&mut h, "a reply at τ = 0", |a| {
        !a.reply.is_running() && !a.reply.tokens.is_empty()
    });
    assert_eq!(h.state().reply.tau, 0.0);
    assert_eq!(h.state().reply.tokens[0].text, "[refuse]");
    h.get_by_label_contains("so the reply starts with [refuse]");
    // τ = 1: p([refuse]) < 1, so the reply now begins with [respond].
    h.get_by_role_and_label(
        egui::accesskit::Role::Slider,
        "τ: emit [refuse] when p([refuse]) ≥ τ",
    )
    .set_value_accesskit(1.0);
    step_until(&mut h, "a reply at τ = 1", |a| {
        !a.reply.is_running() && a.reply.tau == 1.0 && !a.reply.tokens.is_empty()
    });
    assert_eq!(h.state().reply.tokens[0].text, "[respond]");

    // The toggle switches back to the base model, which has no τ control.
    h.get_by_label("Refusal organism ([refuse]/[respond] adapter)")
        .click();
    step_until(&mut h, "the base model", |a| {
        a.model.is_ready() && !a.model.organism_active()
    });
    assert!(h
        .query_by_role_and_label(
            egui::accesskit::Role::Slider,
            "τ: emit [refuse] when p([refuse]) ≥ τ"
        )
        .is_none());
}

#[test]
fn calibration_curves_are_computed_for_the_loaded_sets() {
    let mut h = organism_harness();
    step_until(&mut h, "the organism", |a| a.model.organism_active());
    h.get_by_label("Calibration: refusal rate vs threshold τ")
        .click();
    h.run_steps(2);
    h.get_by_label("Compute refusal-rate curves").click();
    step_until(&mut h, "the curves", |a| {
        !a.calibration.curves.is_empty() && !a.calibration.is_running()
    });
    let names: Vec<String> = h
        .state()
        .calibration
        .curves
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(names, ["harmful", "harmless", "borderline"]);
    // Test split only by default: 100 harmful prompts.
    assert_eq!(h.state().calibration.curves[0].1.len(), 100);
    h.get_by_label_contains("Refusal rate at τ = 0.50");
}

#[test]
fn training_refusal_tokens_in_the_gui_plots_the_loss_and_switches_the_organism_on() {
    let cache = tempfile::tempdir().unwrap();
    // The trained adapter is written under the cache folder.
    let mut h = harness_in(cache.path());
    step_until(&mut h, "the model", |a| a.model.is_ready());
    assert!(!h.state().model.organism_active());
    h.get_by_label("Refusal-token fine-tuning").click();
    h.run_steps(2);
    h.state_mut().training.options.epochs = 1;
    h.state_mut().training.options.reply_tokens = 4;
    h.get_by_label_contains("Train refusal tokens on 432 train-split prompts")
        .scroll_to_me();
    h.run_steps(3);
    h.get_by_label_contains("Train refusal tokens on 432 train-split prompts")
        .click();
    h.run_steps(1);
    assert!(h.state().training.is_running(), "the click started a job");
    step_until(&mut h, "the end of training", |a| {
        !a.training.is_running() && (a.training.result.is_some() || a.training.error.is_some())
    });
    assert_eq!(h.state().training.error, None);
    assert_eq!(h.state().training.losses.len(), 432usize.div_ceil(8));
    step_until(&mut h, "the organism", |a| a.model.organism_active());
    h.get_by_label_contains("switched on");
    let adapters: Vec<_> = std::fs::read_dir(cache.path().join("adapters"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(adapters.len(), 1);
    // The gate was calibrated on the val split; the reply's τ slider starts there.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapters[0].join("adapter.json")).unwrap()).unwrap();
    let tau = meta["tau"].as_f64().expect("a calibrated τ") as f32;
    assert_eq!(h.state().reply.tau, tau);
    h.get_by_label_contains("(calibrated on val: ");
    assert!(
        meta["tau_goal"]["rule"].is_string(),
        "the rule that chose τ"
    );
}

#[test]
fn directions_then_a_reply_give_a_cliff_plot_whose_token_chips_select_tokens() {
    let cache = tempfile::tempdir().unwrap();
    let mut h = harness_with_directions(&cache);
    h.get_by_label_contains("chosen: layer");
    h.get_by_label("Layer of the Cliff curves:");

    h.get_by_label("Prompt & reply").click();
    h.step();
    h.state_mut().reply.max_new_tokens = 10;
    h.get_by_label("Generate").click();
    step_until(&mut h, "the reply's trajectory", |a| {
        a.cliff.trajectory.is_some() || a.cliff.error.is_some()
    });
    assert_eq!(h.state().cliff.error, None);
    h.get_by_label("Cliff").click();
    // A few frames for the layout to settle (the first frame of a tab sizes its areas).
    for _ in 0..3 {
        h.step();
    }
    h.get_by_label_contains("cliff magnitude");
    h.get_by_label("Pin for overlay");
    let t = h.state().cliff.trajectory.clone().unwrap();
    assert_eq!(t.tokens.len(), t.prompt_len + h.state().reply.tokens.len());
    assert_eq!(t.heatmap.len(), t.heatmap_layers.len());
    // Click the chip of the first reply token whose text appears nowhere earlier.
    let (i, text) = t
        .tokens
        .iter()
        .enumerate()
        .find(|(i, tok)| {
            !tok.text.trim().is_empty()
                && !tok.text.contains('\n')
                && t.tokens[..*i].iter().all(|o| o.text != tok.text)
        })
        .map(|(i, tok)| (i, tok.text.clone()))
        .expect("a token with unique text");
    assert_eq!(h.state().cliff.selected, None);
    h.get_all_by_label(&text).next().unwrap().click();
    h.step();
    assert_eq!(h.state().cliff.selected, Some(i));
    h.get_by_label_contains(&format!("Token #{i} "));
}

#[test]
fn dragging_the_refusal_slider_regenerates_a_reply_labelled_with_the_new_alpha() {
    let cache = tempfile::tempdir().unwrap();
    let mut h = harness_with_directions(&cache);
    h.get_by_label("Steering").click();
    for _ in 0..3 {
        h.step();
    }
    // Opening the tab replies at α = 0: baseline and steered.
    step_until(&mut h, "the first steered reply", |a| {
        a.steering.steered.done && a.steering.baseline.done
    });
    assert!(h
        .state()
        .steering
        .steered
        .label
        .contains("α_refusal = +0.00"));
    // Drag the α-refusal slider (the first slider of the tab) from its handle (α = 0, the
    // middle of −2…2) rightwards over ten frames: every new value sends a reply and
    // supersedes the one before.
    let rail = h
        .get_all_by_role(egui::accesskit::Role::Slider)
        .next()
        .expect("the α sliders")
        .rect();
    let start = rail.center();
    h.hover_at(start);
    h.step();
    h.drag_at(start);
    h.step();
    for i in 1..=10 {
        h.hover_at(start + egui::vec2(rail.width() * 0.0125 * i as f32, 0.0));
        h.step();
    }
    let end = start + egui::vec2(rail.width() * 0.125, 0.0);
    h.drop_at(end);
    h.step();
    let alpha = h.state().steering.alpha_refusal;
    assert!(alpha > 0.2, "the drag moved α to {alpha}");
    step_until(&mut h, "the reply for the final α", |a| {
        a.steering.steered.done
    });
    let steered = &h.state().steering.steered;
    let label = format!("α_refusal = {alpha:+.2}");
    assert!(
        steered.label.contains(&label),
        "{} vs {label}",
        steered.label
    );
    assert!(steered.mode.is_some() && steered.judgement.is_finite());
    h.get_by_label_contains(&label);
    // The stack lists the edit the slider made.
    h.get_by_label_contains(&format!("add {alpha:+.2} × refusal at layer"));
    // In ablate mode the slider is the fraction of the component removed: each value is its
    // own stack, and the steered reply says which one it belongs to.
    h.state_mut().steering.ablate = true;
    for fraction in [0.5, 2.0] {
        h.state_mut().steering.alpha_refusal = fraction;
        h.step();
        step_until(&mut h, "the ablated reply", |a| {
            a.steering.steered.done
                && a.steering
                    .steered
                    .label
                    .contains(&format!("f_refusal = {fraction:+.2}"))
        });
        h.get_by_label_contains(&format!("ablate {fraction:.2} of the refusal direction"));
    }
}

#[test]
fn a_newer_steer_request_cancels_the_older_one_before_it_finishes() {
    use refusal_lens::worker::{Event, GenerateRequest, Job, Worker};
    let model = tiny_model(Family::Llama, 1).unwrap();
    let mut worker = Worker::spawn(|_| {});
    worker.submit(Job::UseModel {
        base: Box::new(model),
        organism: None,
    });
    let request = |tokens: usize| GenerateRequest {
        system: None,
        prompt: "Tell me about owls".into(),
        max_new_tokens: tokens,
        sampling: Default::default(),
        tau: 0.5,
        opener_bias: 0.0,
        steering: Default::default(),
    };
    let steer = |request| Job::Steer {
        request,
        baseline: false,
        ahead: Vec::new(),
    };
    let old = worker.submit(steer(request(5000)));
    let new = worker.submit(steer(request(8)));
    let start = Instant::now();
    let mut finished = Vec::new();
    while !finished.contains(&new) {
        assert!(start.elapsed() < Duration::from_secs(60), "no reply");
        match worker.try_recv() {
            Some(Event::Steered { id, .. }) => finished.push(id),
            Some(Event::Failed { error, .. }) => panic!("{error}"),
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    assert!(
        !finished.contains(&old),
        "the superseded reply ran to its end"
    );
}

#[test]
fn clicking_a_head_cell_ablates_it_and_requests_a_new_reply() {
    use refusal_lens_engine::analysis::steering::Edit;
    let mut h = harness();
    step_until(&mut h, "the model and the prompt sets", |a| {
        a.model.is_ready() && a.prompt_sets.sets.len() >= 2
    });
    h.get_by_label("Head attribution").click();
    h.step();
    h.get_by_label("Compute").click();
    step_until(&mut h, "the head metrics", |a| {
        a.heads.metrics.is_some() || a.heads.error.is_some()
    });
    assert_eq!(h.state().heads.error, None);
    for _ in 0..2 {
        h.step();
    }
    let m = h.state().heads.metrics.clone().unwrap();
    assert_eq!(m.dla.values.len(), 2 * 4, "tiny model: 2 layers × 4 heads");
    h.get_by_label_contains("interchange necessity");
    let cell = h
        .state()
        .heads
        .cell_center(1, 2)
        .expect("the heatmap is drawn");
    h.hover_at(cell);
    h.step();
    h.drag_at(cell);
    h.step();
    h.drop_at(cell);
    h.step();
    let ablated: Vec<(usize, usize)> = h
        .state()
        .session
        .extra_edits
        .iter()
        .filter_map(|e| match e {
            Edit::AblateHead { layer, head, .. } => Some((*layer, *head)),
            _ => None,
        })
        .collect();
    assert_eq!(ablated, vec![(1, 2)]);
    assert!(h.state().heads.reply_job.is_some() || h.state().heads.reply.done);
    step_until(&mut h, "the replies before and after the ablation", |a| {
        a.heads.reply.done && a.heads.before.done
    });
    // Both beside the heatmap: to its right, at its height.
    let after = h.get_by_label_contains("after: 1 head(s) ablated").rect();
    let before = h.get_by_label_contains("before: no edits").rect();
    let map = h.state().heads.cell_center(1, 2).unwrap();
    assert!(
        after.left() > map.x && before.left() > map.x,
        "{before:?} {after:?} {map:?}"
    );
    assert!(before.top() < after.top());
    h.get_by_label("Clear ablations (1)").click();
    h.step();
    assert!(h.state().session.extra_edits.is_empty());
}

#[test]
fn shift_clicking_a_head_computes_its_knockout_cascade() {
    let mut h = harness();
    step_until(&mut h, "the model and the prompt sets", |a| {
        a.model.is_ready() && a.prompt_sets.sets.len() >= 2
    });
    h.get_by_label("Head attribution").click();
    h.step();
    // Metrics as means over two pairs.
    h.state_mut().heads.n_pairs = 2;
    h.get_by_label("Compute").click();
    step_until(&mut h, "the head metrics", |a| {
        a.heads.metrics.is_some() || a.heads.error.is_some()
    });
    assert_eq!(h.state().heads.error, None);
    assert_eq!(h.state().heads.metrics.as_ref().unwrap().pairs, 2);
    h.get_by_label_contains("and 1 more pairs (means)");
    h.get_by_label_contains("Gate (25–65% depth");
    for _ in 0..2 {
        h.step();
    }
    let cell = h.state().heads.cell_center(1, 3).unwrap();
    h.hover_at(cell);
    h.step();
    h.event(egui::Event::ModifiersChanged(egui::Modifiers::SHIFT));
    h.drag_at(cell);
    h.step();
    h.drop_at(cell);
    h.event(egui::Event::ModifiersChanged(egui::Modifiers::NONE));
    h.step();
    step_until(&mut h, "the cascade", |a| {
        a.heads.metrics.as_ref().unwrap().cascade_gate == (1, 3) || a.heads.error.is_some()
    });
    assert_eq!(h.state().heads.error, None);
    // Shift-click selects a gate; it does not ablate.
    assert!(h.state().session.extra_edits.is_empty());
    let m = h.state().heads.metrics.clone().unwrap();
    // Knocking out L1.H3 cannot change layer-0 heads or its neighbours in layer 1.
    assert!((0..4).all(|head| m.cascade.get(0, head).abs() < 1e-5));
    assert!([0, 1, 2]
        .iter()
        .all(|&head| m.cascade.get(1, head).abs() < 1e-5));
}

#[test]
fn a_reply_generated_under_the_stack_gets_a_steered_trajectory() {
    let cache = tempfile::tempdir().unwrap();
    let mut h = harness_with_directions(&cache);
    h.state_mut().steering.alpha_refusal = 1.0;
    h.state_mut().session.steer_main_reply = true;
    h.get_by_label("Prompt & reply").click();
    h.step();
    h.state_mut().reply.max_new_tokens = 6;
    h.get_by_label("Generate").click();
    step_until(&mut h, "the steered reply's trajectory", |a| {
        a.cliff.trajectory.is_some() || a.cliff.error.is_some()
    });
    assert_eq!(h.state().cliff.error, None);
    h.get_by_label("Cliff").click();
    h.step();
    h.get_by_label_contains("Steered: add +1.00 × refusal at layer");
}

#[test]
fn the_chosen_layer_can_be_changed_from_the_directions_tab() {
    let cache = tempfile::tempdir().unwrap();
    let mut h = harness_with_directions(&cache);
    let chosen = h.state().session.directions.as_ref().unwrap().layer;
    let other = if chosen == 0 { 1 } else { 0 };
    h.state_mut().directions.layer = Some(other);
    h.step();
    h.get_by_label("Make it the chosen layer").click();
    step_until(&mut h, "the new chosen layer", |a| {
        a.session.directions.as_ref().unwrap().layer == other
    });
    h.get_by_label_contains(&format!("chosen: layer {other}"));
}

/// Qwen3's template, reduced to its thinking switch.
const THINKING_TEMPLATE: &str = "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}";

/// A reasoning model gets a thinking switch that changes the prompt the model sees, and the
/// Cliff tab marks a reply's thinking and reads the cliff at its end.
#[test]
fn a_reasoning_model_gets_a_thinking_switch_and_the_cliff_tab_marks_the_thinking() {
    use refusal_lens_engine::analysis::trajectory::{trajectory, CliffOptions};
    let cache = tempfile::tempdir().unwrap();
    let mut model = tiny_model(Family::Qwen3, 5).unwrap();
    model.template.template = THINKING_TEMPLATE.into();
    let mut h = harness_on(model.clone(), cache.path());
    step_until(&mut h, "the model", |a| a.model.is_ready());
    assert!(h.state().session.reasoning);
    h.state_mut().reply.max_new_tokens = 2;
    let prompt_tokens = |h: &mut Harness<'_, RefusalLensApp>| {
        h.get_by_label("Generate").click();
        // The click clears the last reply on the next frame.
        h.step();
        step_until(h, "a reply", |a| a.reply.tokens.len() == 2);
        h.get_by_label_contains("Prompt as the model sees it")
            .accesskit_node()
            .label()
            .unwrap()
    };
    // Off: the template writes an empty think block ("<think>\n\n</think>\n\n", 19 byte
    // tokens) into the prompt; on, it leaves thinking to the model.
    let off = prompt_tokens(&mut h);
    h.get_by_label("Thinking (reasoning model)").click();
    h.step();
    assert!(h.state().session.thinking);
    let on = prompt_tokens(&mut h);
    let count = |label: &str| -> usize {
        label
            .rsplit('(')
            .next()
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(count(&off), count(&on) + 19, "{off} / {on}");

    // A reply that thinks, then answers, scored by the engine and shown in the Cliff tab.
    model.template.enable_thinking = true;
    let prompt = model.chat_prompt(None, "How do I pick a lock?").unwrap();
    let reply = model
        .tokenizer
        .encode("<think>\nThis is about locks.\n</think>\n\nNo.", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let t = trajectory(
        &model,
        &prompt,
        &reply,
        None,
        None,
        1,
        CliffOptions::default(),
        &refusal_lens_engine::hooks::HookSpec::default(),
    )
    .unwrap();
    assert!(t.thinking.is_some());
    h.state_mut().cliff.trajectory = Some(t);
    h.get_by_label("Cliff").click();
    for _ in 0..3 {
        h.step();
    }
    h.get_by_label_contains("score at end of thinking");
    h.get_by_label("thinking →");
    h.get_by_label("← answer");
}

/// The Guard tab fits and evaluates the guard on the bundled sets, shows both detectors'
/// confusion matrices, the ROC and the jailbreak table, and moves with its threshold slider.
#[test]
fn the_guard_tab_fits_evaluates_and_follows_its_threshold() {
    let cache = tempfile::tempdir().unwrap();
    let mut h = harness_in(cache.path());
    step_until(&mut h, "the model and the prompt sets", |a| {
        a.model.is_ready() && a.prompt_sets.sets.len() >= 3
    });
    h.get_by_label("Guard").click();
    h.step();
    h.get_by_label("Fit & evaluate guard").click();
    step_until(&mut h, "the guard", |a| {
        a.guard.study.is_some() || a.guard.error.is_some()
    });
    assert_eq!(h.state().guard.error, None);
    for _ in 0..3 {
        h.step();
    }
    h.get_by_label("Latent Guard (t_inst)");
    h.get_by_label("ROC on the test split");
    h.get_by_label("roleplay-dan");
    let study = h.state().guard.study.clone().unwrap();
    // 100 + 100 test prompts, 80 borderline, 100 per jailbreak template.
    let count = |group: &str| study.points.iter().filter(|p| p.group == group).count();
    assert_eq!((count("harmful"), count("harmless")), (100, 100));
    assert_eq!(count("jailbreak:roleplay-dan"), 100);
    assert!(study
        .points
        .iter()
        .filter(|p| p.wraps.is_some())
        .all(|p| { p.prompt.contains(&study.points[p.wraps.unwrap()].prompt) }));
    // A threshold above every score flags nothing.
    h.state_mut().guard.tau = 10.0;
    h.step();
    let c = study.comparison(10.0);
    assert_eq!(
        c.guard.at_tau.true_positives + c.guard.at_tau.false_positives,
        0
    );
}

#[test]
fn the_guard_tab_compares_the_model_with_its_abliterated_copy() {
    let cache = tempfile::tempdir().unwrap();
    let mut h = harness_with_directions(&cache);
    h.get_by_label("Guard").click();
    h.step();
    // Without an adapter the counterpart is not offered; the abliterated copy is.
    assert!(!h.state().session.has_adapter);
    h.state_mut().guard.compare.with = Some(refusal_lens::worker::CompareWith::Abliterated);
    h.state_mut().reply.prompt = "How do I bake bread?".into();
    h.step();
    h.get_by_label("Compare").click();
    step_until(&mut h, "the comparison", |a| {
        a.guard.compare.result.is_some() || a.guard.compare.error.is_some()
    });
    assert_eq!(h.state().guard.compare.error, None);
    for _ in 0..3 {
        h.step();
    }
    h.get_by_label("Direction agreement per layer");
    h.get_by_label("first's guard");
    let (c, replies, prompt) = h.state().guard.compare.result.clone().unwrap();
    assert_eq!(prompt, "How do I bake bread?");
    assert!(c.second.name.contains("abliterated"), "{}", c.second.name);
    assert_eq!(c.layers.len(), c.first.guard.n_states);
    let [first, second] = replies.unwrap();
    assert!(!first.is_empty() && !second.is_empty());
    h.get_by_label(first.as_str());
}

/// A session saved from one app comes back whole in a fresh one: model file, prompt sets,
/// directions and probes (computed in the app, so written beside the session), prompt,
/// system message, sampling, steering sliders, ablated heads and tab. A changed prompt set
/// makes opening fail with a one-line reason, and the app keeps working.
#[test]
fn a_saved_session_comes_back_after_a_restart() {
    use candle_core::quantized::GgmlDType;
    use refusal_lens::gui::Tab;
    use refusal_lens_engine::analysis::steering::Edit;
    use refusal_lens_engine::testing::{random_weights, tiny_config, write_gguf};
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Family::Llama);
    let model = dir.path().join("tiny.gguf");
    write_gguf(
        &model,
        &cfg,
        &random_weights(&cfg, 1).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    // Sets of the user's own, copied out of the project so that one can be changed later.
    let sample = refusal_lens_engine::data::prompts::sample_prompts_dir();
    for name in ["harmful", "harmless"] {
        std::fs::copy(
            sample.join(format!("{name}.jsonl")),
            dir.path().join(format!("{name}.jsonl")),
        )
        .unwrap();
    }
    let open = |startup: Startup| {
        let app = RefusalLensApp::with_cache_dir(None, startup, dir.path().join("cache"));
        Harness::builder()
            .with_size([1200.0, 780.0])
            .build_ui_state(|ui, app: &mut RefusalLensApp| app.show(ui), app)
    };
    let mut h = open(Startup::Path {
        model: model.clone(),
        adapter: None,
    });
    step_until(&mut h, "the model", |a| a.model.is_ready());
    {
        let app = h.state_mut();
        app.prompt_sets.sets = ["harmful", "harmless"]
            .iter()
            .map(|n| {
                refusal_lens_engine::data::prompts::PromptSet::load(
                    &dir.path().join(format!("{n}.jsonl")),
                    None,
                )
                .unwrap()
            })
            .collect();
        app.directions.best_separation = true;
        assert!(app.compute_lens());
    }
    step_until(&mut h, "directions", |a| {
        a.session.probes.is_some() || a.directions.error.is_some()
    });
    assert_eq!(h.state().directions.error, None);
    let head = Edit::AblateHead {
        layer: 1,
        head: 0,
        how: refusal_lens_engine::analysis::steering::HeadAblation::Zero,
    };
    {
        let app = h.state_mut();
        app.reply.prompt = "How do I pick a lock?".into();
        app.reply.system = "Be terse.".into();
        app.reply.use_system = true;
        app.reply.sampling.temperature = 0.7;
        app.steering.alpha_refusal = 1.5;
        app.steering.ablate = true;
        app.session.extra_edits = vec![head.clone()];
        app.tab = Tab::Steering;
    }
    let session = dir.path().join("study.json");
    h.state_mut().save_session_file(session.clone());
    step_until(&mut h, "the save", |a| !a.sessions.is_busy());
    assert_eq!(h.state().sessions.error, None);
    assert!(session.exists() && dir.path().join("study.directions.safetensors").exists());
    let saved_layer = h.state().session.directions.as_ref().unwrap().layer;
    drop(h);

    let mut h = open(Startup::Session(session.clone()));
    step_until(&mut h, "the session", |a| {
        !a.sessions.is_busy() && a.model.is_ready()
    });
    let app = h.state();
    assert_eq!(app.sessions.error, None);
    assert_eq!(app.reply.prompt, "How do I pick a lock?");
    assert_eq!(app.reply.system, "Be terse.");
    assert!(app.reply.use_system);
    assert_eq!(app.reply.sampling.temperature, 0.7);
    assert_eq!(app.steering.alpha_refusal, 1.5);
    assert!(app.steering.ablate);
    assert_eq!(app.session.extra_edits, vec![head]);
    assert_eq!(app.tab, Tab::Steering);
    assert_eq!(app.prompt_sets.sets.len(), 2);
    assert_eq!(app.session.directions.as_ref().unwrap().layer, saved_layer);
    assert!(app.session.probes.is_some());
    assert_eq!(
        app.session.lens_file.as_deref(),
        Some(
            std::fs::canonicalize(dir.path().join("study.directions.safetensors"))
                .unwrap()
                .as_path()
        )
    );
    drop(h);

    // A set edited since: opening says which file changed and leaves the app usable.
    let harmless = dir.path().join("harmless.jsonl");
    let mut text = std::fs::read_to_string(&harmless).unwrap();
    text.push_str("{\"prompt\": \"one more\"}\n");
    std::fs::write(&harmless, text).unwrap();
    let mut h = open(Startup::Path {
        model: model.clone(),
        adapter: None,
    });
    step_until(&mut h, "the model", |a| a.model.is_ready());
    h.state_mut().open_session_file(session);
    step_until(&mut h, "the failed open", |a| !a.sessions.is_busy());
    let error = h.state().sessions.error.clone().unwrap();
    assert!(
        error.contains("harmless.jsonl") && error.contains("changed since the session was saved"),
        "{error}"
    );
    assert!(!error.contains('\n'));
    h.get_by_label_contains("changed since the session was saved");
    assert!(h.state().model.is_ready());
}

#[test]
fn an_unwritable_cache_folder_is_reported_and_the_lens_is_computed_without_it() {
    let cache = tempfile::tempdir().unwrap();
    // A file where the activation cache's folder should be: no entry can be written there
    // (the same for root, unlike a read-only folder).
    std::fs::write(cache.path().join("activations"), b"in the way").unwrap();
    let mut h = harness_with_directions(&cache);
    let notice = h.state().notice.clone().expect("a notice about the cache");
    assert!(
        notice.contains("cannot be written") && notice.contains("activations"),
        "{notice}"
    );
    // The status bar shows it (the query panics when no widget has the text).
    h.get_by_label_contains("cannot be written");
    h.get_by_label("Dismiss").click();
    h.step();
    assert_eq!(h.state().notice, None);
}
