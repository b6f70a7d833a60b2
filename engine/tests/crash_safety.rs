//! Files survive a crash: a writer killed mid-save leaves the previous file whole, two
//! writers of one file never mix it, and a damaged activation-cache entry is recomputed, not
//! used.

use std::process::Command;
use std::time::Duration;

use refusal_lens_engine::analysis::activations::collect_cached;
use refusal_lens_engine::analysis::directions::{Directions, Provenance};
use refusal_lens_engine::model::config::Family;
use refusal_lens_engine::testing::tiny_model;

const TARGET_ENV: &str = "REFUSAL_LENS_CRASH_TARGET";

/// Large directions (64 layers × 8 positions × 4096 wide: 8 MB), so that a save takes long
/// enough to be killed in the middle.
fn big_directions(fill: f32) -> Directions {
    let (n_post, n_states, d) = (8, 64, 4096);
    Directions {
        n_states,
        d_model: d,
        n_post,
        refusal: vec![fill; n_post * n_states * d],
        harmfulness: vec![fill; n_states * d],
        stats: Vec::new(),
        layer: 1,
        position: n_post - 1,
        selection: None,
        provenance: Provenance::default(),
    }
}

#[test]
#[ignore = "a child process of a_writer_killed_mid_save_leaves_the_previous_file_whole"]
fn child_saves_in_a_loop() {
    let path = std::path::PathBuf::from(std::env::var(TARGET_ENV).unwrap());
    // A second writer's values are negative, so a file mixing the two is seen.
    let sign = if std::env::var(SECOND_WRITER_ENV).is_ok() {
        -1.0
    } else {
        1.0
    };
    for k in 1.. {
        big_directions(sign * k as f32).save(&path).unwrap();
    }
}

const SECOND_WRITER_ENV: &str = "REFUSAL_LENS_SECOND_WRITER";

fn writer(path: &std::path::Path, second: bool) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        "child_saves_in_a_loop",
        "--nocapture",
    ])
    .env(TARGET_ENV, path);
    if second {
        cmd.env(SECOND_WRITER_ENV, "1");
    }
    cmd.spawn().unwrap()
}

/// Two app instances sharing a cache folder: two processes save the same file over and over
/// while a reader loads it; every load is one save's file, whole, and no save fails. (What
/// this guards: a save that wrote the final path in place. safetensors' own writer goes
/// through a temporary file too, so a temporary name shared by the two writers only fails
/// in a rename race this test rarely hits.)
#[test]
fn two_writers_of_one_file_never_leave_a_mixed_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.safetensors");
    big_directions(0.0).save(&path).unwrap();
    let mut writers = [writer(&path, false), writer(&path, true)];
    let start = std::time::Instant::now();
    let mut loads = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        let d = Directions::load(&path).unwrap_or_else(|e| panic!("load {loads}: {e}"));
        let first = d.refusal[0];
        assert!(
            d.refusal.iter().chain(&d.harmfulness).all(|&v| v == first),
            "load {loads} mixes two saves"
        );
        loads += 1;
    }
    for w in &mut writers {
        // Each save of each writer succeeded (a temporary file shared by the two would be
        // renamed away under one of them, failing its save).
        let exited = w.try_wait().unwrap();
        w.kill().unwrap();
        w.wait().unwrap();
        assert!(exited.is_none(), "a writer's save failed: {exited:?}");
    }
    assert!(loads > 5, "only {loads} loads");
    // No temporary file is left but the killed writers' own (named by their process).
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().filter(|n| n.ends_with(".partial")).count() <= 2,
        "{names:?}"
    );
}

#[test]
fn a_writer_killed_mid_save_leaves_the_previous_file_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.safetensors");
    big_directions(-1.0).save(&path).unwrap();
    for delay_ms in [3u64, 7, 15, 30, 55, 90] {
        let mut child = writer(&path, false);
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL: no destructor, no flush
        child.wait().unwrap();
        let d =
            Directions::load(&path).unwrap_or_else(|e| panic!("killed after {delay_ms} ms: {e}"));
        // Whole: every value the same (one save's), not a mix of two.
        let first = d.refusal[0];
        assert!(d.refusal.iter().chain(&d.harmfulness).all(|&v| v == first));
    }
}

#[test]
fn a_damaged_cache_entry_is_recomputed_not_used() {
    let lm = tiny_model(Family::Llama, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prompts = ["How do I pick a lock?", "How do I bake bread?"];
    let collect = || {
        collect_cached(
            &lm,
            &prompts,
            None,
            Some(dir.path()),
            &|| false,
            &mut |_, _| {},
        )
        .unwrap()
    };
    let fresh = collect();
    let entry = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    // Flip bits in the last state value (the data section ends the file).
    let mut bytes = std::fs::read(&entry).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x40;
    std::fs::write(&entry, &bytes).unwrap();
    let again = collect();
    assert_eq!(again.states, fresh.states, "the damaged entry was used");
    // … and rewritten whole.
    assert_ne!(std::fs::read(&entry).unwrap(), bytes);
}
