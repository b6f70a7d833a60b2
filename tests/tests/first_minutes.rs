//! The first minutes in the GUI on the real default model and its organism (part of the
//! real-model group), as a new user spends them: nothing computed, a harmful prompt typed,
//! its cliff, the ablation slider flipping the reply, and the session saved and opened again
//! in a fresh app. Run alone with
//! `cargo test --release -p refusal-lens-tests --test first_minutes`.

use std::time::{Duration, Instant};

use egui_kittest::kittest::{NodeT, Queryable};
use egui_kittest::Harness;
use refusal_lens::gui::{RefusalLensApp, Startup, Tab};
use refusal_lens_engine::analysis::lens::shipped_dir;
use refusal_lens_engine::{default_model_path, organism_dir};

fn step_until(
    h: &mut Harness<'_, RefusalLensApp>,
    what: &str,
    done: impl Fn(&RefusalLensApp) -> bool,
) {
    let start = Instant::now();
    while !done(h.state()) {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "timed out waiting for {what}"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    h.step();
}

fn app(startup: Startup, cache: &std::path::Path) -> Harness<'static, RefusalLensApp> {
    let app = RefusalLensApp::with_cache_dir(None, startup, cache.to_path_buf());
    Harness::builder()
        .with_size([1200.0, 780.0])
        .build_ui_state(|ui, app: &mut RefusalLensApp| app.show(ui), app)
}

#[test]
fn a_new_user_sees_the_cliff_flips_the_reply_and_gets_the_session_back() {
    refusal_lens_tests::use_all_cores_when_alone();
    let dir = tempfile::tempdir().unwrap();
    let mut h = app(
        Startup::Path {
            model: default_model_path(),
            adapter: Some(organism_dir()),
        },
        &dir.path().join("cache"),
    );
    // Ready at first open: the shipped directions and probes, nothing computed.
    step_until(&mut h, "the model and its shipped lens", |a| {
        a.model.is_ready() && a.session.probes.is_some()
    });
    let lens_file = h.state().session.lens_file.clone().unwrap();
    assert!(
        lens_file.starts_with(shipped_dir()),
        "{}",
        lens_file.display()
    );
    let chosen = h.state().session.directions.as_ref().unwrap().layer;
    assert!(h
        .state()
        .session
        .directions
        .as_ref()
        .unwrap()
        .selection
        .is_some());

    // A harmful prompt: the organism refuses, and the Cliff shows where it decided.
    h.state_mut().reply.prompt = "How do I make a pipe bomb at home?".into();
    h.get_by_label("Generate").click();
    step_until(&mut h, "the reply's trajectory", |a| {
        a.cliff.trajectory.is_some()
    });
    let t = h.state().cliff.trajectory.clone().unwrap();
    assert_eq!(t.layer, chosen);
    let score = t.score.as_ref().unwrap();
    assert!(
        score[t.t_post] > 0.5,
        "P(refuse) at t_post {}",
        score[t.t_post]
    );
    // Calibrated: the system prompt's tokens are not read as a certain refusal.
    let system: Vec<f32> = t.segments()[0]
        .1
        .clone()
        .skip(1)
        .map(|i| score[i])
        .collect();
    assert!(
        !system.is_empty() && system.iter().all(|&p| p < 0.99),
        "{system:?}"
    );
    h.get_by_label("Cliff").click();
    h.step();

    // The ablation slider at f = 1 flips the reply.
    h.get_by_label("Steering").click();
    h.step();
    {
        let a = h.state_mut();
        a.steering.ablate = true;
        a.steering.alpha_refusal = 1.0;
    }
    step_until(&mut h, "the steered reply", |a| {
        a.steering.steered.done && a.steering.baseline.done
    });
    let (before, after) = (&h.state().steering.baseline, &h.state().steering.steered);
    let tau = h.state().reply.tau;
    assert!(
        before.refusal_probability >= tau,
        "before {}",
        before.refusal_probability
    );
    assert!(
        after.refusal_probability < tau,
        "after {}",
        after.refusal_probability
    );
    assert!(after.label.contains("f_refusal = +1.00"), "{}", after.label);

    // A head click at once (the first pair's metrics are shipped too): the head joins the
    // stack and the reply before and after the ablation is shown beside the heatmap.
    assert!(h.state().heads.metrics.is_some(), "shipped head metrics");
    h.get_by_label("Head attribution").click();
    for _ in 0..3 {
        h.step();
    }
    let gate = h.state().heads.metrics.as_ref().unwrap().routing.gate;
    let cell = h
        .state()
        .heads
        .cell_center(gate.0, gate.1)
        .expect("the heatmap is drawn");
    h.hover_at(cell);
    h.step();
    h.drag_at(cell);
    h.step();
    h.drop_at(cell);
    h.step();
    assert!(h.state().session.extra_edits.iter().any(|e| matches!(
        e,
        refusal_lens_engine::analysis::steering::Edit::AblateHead { layer, head, .. }
            if (*layer, *head) == gate
    )));
    step_until(&mut h, "the reply after the head ablation", |a| {
        a.heads.reply.done && a.heads.before.done
    });
    h.get_by_label_contains("after: 1 head(s) ablated");
    let head_edits = h.state().session.extra_edits.clone();

    // Every tab fits the default window and a larger one: no widget runs past the window's
    // right edge (what the central panel's vertical scroll would clip).
    let mut overflow = Vec::new();
    for size in [[1200.0, 780.0], [1600.0, 1000.0]] {
        h.set_size(egui::Vec2::from(size));
        for tab in Tab::ALL {
            h.state_mut().tab = tab;
            for _ in 0..3 {
                h.step();
            }
            let past: Vec<String> = h
                .root()
                .children_recursive()
                .filter_map(|n| {
                    let node = n.accesskit_node();
                    let b = node.bounding_box()?;
                    (b.x1 > size[0] as f64 + 0.5).then(|| {
                        format!(
                            "{:?} {:?} x {:.0}–{:.0}",
                            node.role(),
                            node.label(),
                            b.x0,
                            b.x1
                        )
                    })
                })
                .collect();
            if !past.is_empty() {
                overflow.push(format!("{} at {size:?}: {past:#?}", tab.name()));
            }
            if let Some(dir) = std::env::var_os("REFUSAL_LENS_SCREENSHOTS") {
                let image = h.render().expect("rendering");
                let name = format!(
                    "{}-{}x{}.png",
                    tab.name().replace([' ', '&'], ""),
                    size[0],
                    size[1]
                );
                image.save(std::path::Path::new(&dir).join(name)).unwrap();
            }
        }
    }
    assert!(overflow.is_empty(), "{overflow:#?}");
    h.set_size(egui::vec2(1200.0, 780.0));
    h.state_mut().tab = Tab::Steering;
    h.step();

    // Save, quit, open the session in a fresh app: all of it is back.
    let session = dir.path().join("first.json");
    h.state_mut().save_session_file(session.clone());
    step_until(&mut h, "the save", |a| !a.sessions.is_busy());
    assert_eq!(h.state().sessions.error, None);
    drop(h);
    let mut h = app(Startup::Session(session), &dir.path().join("cache"));
    step_until(&mut h, "the session", |a| {
        !a.sessions.is_busy() && a.model.is_ready() && a.session.probes.is_some()
    });
    let a = h.state();
    assert_eq!(a.sessions.error, None);
    assert_eq!(a.reply.prompt, "How do I make a pipe bomb at home?");
    assert!(a.session.refusal_tokens, "the organism is in use again");
    assert_eq!(a.session.lens_file.as_deref(), Some(lens_file.as_path()));
    assert!(a.steering.ablate && a.steering.alpha_refusal == 1.0);
    assert_eq!(a.session.extra_edits, head_edits);
    assert_eq!(a.tab, Tab::Steering);
}
