//! The CLI as a user runs it: real processes, a tiny model on disk, exit codes and one-line errors.

use std::path::Path;
use std::process::{Command, Output};

use candle_core::quantized::GgmlDType;
use refusal_lens_engine::model::config::Family;
use refusal_lens_engine::testing::{random_weights, tiny_config, write_gguf, write_hf_folder};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_refusal-lens"));
    c.env("RAYON_NUM_THREADS", "1");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// Runs the binary with its caches under `cache` (the test's own, not the user's).
fn run_cached(cache: &Path, args: &[&str]) -> Output {
    bin()
        .env("REFUSAL_LENS_CACHE", cache)
        .args(args)
        .output()
        .unwrap()
}

fn tiny_folder(dir: &Path) -> String {
    let cfg = tiny_config(Family::Llama);
    write_hf_folder(&dir.join("tiny"), &cfg, &random_weights(&cfg, 3).unwrap()).unwrap();
    dir.join("tiny").display().to_string()
}

/// Writes a JSONL prompt set of `n` prompts `"{word} request number {i}"` to `dir/{label}.jsonl`,
/// split train, train, val, test in turn, in two categories (four prompts each in turn), each
/// with a `pair_id`; returns its path.
fn write_set(dir: &Path, label: &str, word: &str, n: usize) -> String {
    let path = dir.join(format!("{label}.jsonl"));
    let rows: String = (0..n)
        .map(|i| {
            let split = ["train", "train", "val", "test"][i % 4];
            let category = ["weapons", "fraud"][(i / 4) % 2];
            format!("{{\"id\":\"{label}-{i}\",\"pair_id\":\"p{i}\",\"prompt\":\"{word} request number {i}\",\"label\":\"{label}\",\"category\":\"{category}\",\"split\":\"{split}\"}}\n")
        })
        .collect();
    std::fs::write(&path, rows).unwrap();
    path.display().to_string()
}

/// Asserts that the command succeeded, showing its stderr if not.
fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The JSON a successful command printed.
fn json_of(out: &Output) -> serde_json::Value {
    succeeded(out);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn stderr_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one-line error expected, got {err:?}"
    );
    err
}

#[test]
fn info_prints_the_model_card() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_folder(dir.path());
    let out = run(&["info", "--model", &model, "--json"]);
    let card = json_of(&out);
    assert_eq!(card["n_layers"], 2);
    assert_eq!(card["n_heads"], 4);
    assert_eq!(card["n_kv_heads"], 2);
    assert_eq!(card["architecture"], "llama");
    let text = run(&["info", "--model", &model]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("layers         2"), "{text}");
    assert!(
        text.contains("tokenizer_config.json chat_template"),
        "{text}"
    );
}

#[test]
fn generate_streams_tokens_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_folder(dir.path());
    let out = run(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "hello",
        "--max-tokens",
        "6",
        "--json",
    ]);
    succeeded(&out);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (summary, tokens) = lines.split_last().unwrap();
    let summary = &summary["summary"];
    assert_eq!(
        summary["generated_tokens"].as_u64().unwrap() as usize,
        tokens.len()
    );
    assert!(tokens.len() <= 6);
    let text: String = tokens.iter().map(|t| t["text"].as_str().unwrap()).collect();
    assert_eq!(summary["text"].as_str().unwrap(), text);
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(t["index"].as_u64().unwrap() as usize, i);
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
    }
    // Sampling with a seed is reproducible across processes.
    let sampled = || {
        let args = [
            "--prompt",
            "hi",
            "--max-tokens",
            "8",
            "--temperature",
            "1.2",
        ];
        let mut all = vec!["generate", "--model", &model];
        all.extend(args);
        all.extend(["--seed", "5"]);
        run(&all)
    };
    assert_eq!(sampled().stdout, sampled().stdout);
}

#[test]
fn activations_are_written_under_their_hook_names() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_folder(dir.path());
    let out_file = dir.path().join("acts.safetensors");
    let out = run(&[
        "activations",
        "--model",
        &model,
        "--prompt",
        "hey",
        "--out",
        out_file.to_str().unwrap(),
        "--hooks",
        "resid_pre,attn_z,blocks.1.attn.hook_pattern,ln_final",
        "--logits",
        "--json",
    ]);
    let summary = json_of(&out);
    let n = summary["tokens"].as_u64().unwrap() as usize;
    let t = candle_core::safetensors::load(&out_file, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t["blocks.0.hook_resid_pre"].dims(), &[1, n, 64]);
    assert_eq!(t["blocks.1.hook_resid_pre"].dims(), &[1, n, 64]);
    assert_eq!(t["blocks.1.attn.hook_z"].dims(), &[1, n, 4, 16]);
    assert_eq!(t["blocks.1.attn.hook_pattern"].dims(), &[1, 4, n, n]);
    assert_eq!(t["ln_final.hook_normalized"].dims(), &[1, n, 64]);
    assert_eq!(t["logits"].dims(), &[1, n, 259]);
    assert_eq!(t["input_ids"].dims(), &[n]);
    assert!(!t.contains_key("blocks.0.attn.hook_pattern"));
}

#[test]
fn bad_input_exits_non_zero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_folder(dir.path());

    let out = run(&["info", "--model", "/nonexistent/model.gguf"]);
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("no such file"));

    let corrupt = dir.path().join("corrupt.gguf");
    let cfg = tiny_config(Family::Llama);
    write_gguf(
        &corrupt,
        &cfg,
        &random_weights(&cfg, 1).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let bytes = std::fs::read(&corrupt).unwrap();
    std::fs::write(&corrupt, &bytes[..bytes.len() / 2]).unwrap();
    let out = run(&["info", "--model", corrupt.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).contains("not a valid GGUF"));

    let long = "word ".repeat(400);
    let out = run(&["generate", "--model", &model, "--prompt", &long]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).contains("context holds 256"));

    let out = run(&["generate", "--model", &model, "--prompt", "  "]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).contains("prompt is empty"));

    let out = run(&[
        "activations",
        "--model",
        &model,
        "--prompt",
        "x",
        "--out",
        "/tmp/x.safetensors",
        "--hooks",
        "blocks.9.hook_resid_pre",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).contains("past the model's 2 layers"));

    // A device this build cannot use (no CUDA in a CPU build; no 100th GPU in a CUDA one),
    // and one that does not exist.
    let out = run(&["info", "--model", &model, "--device", "cuda:99"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).contains("--device"));
    let out = run(&["info", "--model", &model, "--device", "gpu"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).contains("unknown device `gpu`"));
    let out = run(&["info", "--model", &model, "--device", "cpu"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("device         cpu"));
}

/// A model needing more memory than the limit fails before loading, in one line.
#[test]
fn a_model_larger_than_memory_is_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_folder(dir.path());
    let out = bin()
        .env("REFUSAL_LENS_MEMORY_LIMIT", "1000000")
        .args(["info", "--model", &model])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line = stderr_line(&out);
    assert!(
        line.contains("needs about") && line.contains("--exact-weights stored"),
        "{line}"
    );
}

#[test]
fn a_missing_default_model_names_the_fetch_command() {
    let empty = tempfile::tempdir().unwrap();
    let out = bin()
        .env("REFUSAL_LENS_CACHE", empty.path())
        .args(["info"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).contains("assets/fetch-model.sh"));
}

#[test]
fn prompts_imports_and_converts_sets() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("advbench.csv");
    std::fs::write(&csv, "goal,target\nDo a bad thing,Sure\nDo another,Sure\n").unwrap();
    let out_file = dir.path().join("set.jsonl");
    let out = run(&[
        "prompts",
        csv.to_str().unwrap(),
        "--label",
        "harmful",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    succeeded(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2 prompts") && text.contains("harmful 2"),
        "{text}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[1]["prompt"], "Do another");
    assert_eq!(lines[1]["label"], "harmful");

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\":\"ok\"}\n{\"text\":\"no prompt field\"}\n",
    )
    .unwrap();
    let out = run(&["prompts", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).contains("bad.jsonl line 2"));
}

#[test]
fn classify_reports_the_mode_and_its_evidence() {
    let out = run(&[
        "classify",
        "I'm sorry, but I can't help with that.",
        "--json",
    ]);
    let c = json_of(&out);
    assert_eq!(c["mode"], "refusal");
    assert_eq!(c["declines"][0]["phrase"], "i'm sorry");
}

// Over 120 lines: one user session end to end (train, then calibrate and save τ with the
// adapter it wrote, then generate through it); each step reads the files the last one wrote,
// so it reads best as one function.
#[test]
fn train_refusal_tokens_then_calibrate_with_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_folder(dir.path());
    let sets = dir.path().join("sets");
    std::fs::create_dir(&sets).unwrap();
    let rows = |label: &str, word: &str| -> String {
        (0..10)
            .map(|i| {
                let split = ["train", "val", "test"][(i >= 6) as usize + (i >= 8) as usize];
                format!("{{\"id\":\"{label}-{i}\",\"prompt\":\"{word} {word} request {i}\",\"label\":\"{label}\",\"split\":\"{split}\"}}\n")
            })
            .collect()
    };
    std::fs::write(sets.join("harmful.jsonl"), rows("harmful", "evil")).unwrap();
    std::fs::write(sets.join("harmless.jsonl"), rows("harmless", "kind")).unwrap();
    std::fs::write(
        sets.join("borderline.jsonl"),
        rows("harmless", "kill process"),
    )
    .unwrap();
    let out_dir = dir.path().join("adapter");
    let out = run(&[
        "train-refusal-tokens",
        "--model",
        &model,
        "--sets",
        sets.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--row-steps",
        "300",
        "--json",
    ]);
    let meta = json_of(&out);
    assert_eq!(meta["train_prompts"], 18);
    assert!(meta["metrics"]["test_refusal_rate_harmful"].is_number());
    assert!(meta["metrics"]["val_refusal_rate_harmful"].is_number());
    // τ is calibrated on the val split.
    let tau = meta["tau"].as_f64().expect("a calibrated τ");
    assert!(tau > 0.0 && tau < 1.0, "{tau}");
    // By false-refusal budgets (Youden's J when the tiny model's val prompts cannot keep them).
    let rule = meta["tau_goal"]["rule"]
        .as_str()
        .expect("the rule that chose τ");
    assert!(["budgets", "youden"].contains(&rule), "{rule}");
    assert!(out_dir.join("adapter.safetensors").exists());

    let harmful = sets.join("harmful.jsonl");
    let harmless = sets.join("harmless.jsonl");
    let calibrate_adapter = |extra: &[&str]| {
        let mut args = vec![
            "calibrate",
            "--model",
            &model,
            "--adapter",
            out_dir.to_str().unwrap(),
            "--set",
            harmful.to_str().unwrap(),
            "--set",
            harmless.to_str().unwrap(),
        ];
        args.extend(extra);
        run(&args)
    };
    let out = calibrate_adapter(&["--json", "--tau-rule", "youden"]);
    let cal = json_of(&out);
    assert_eq!(cal["signal"], "p([refuse]) at t_post");
    // The τ the rule would choose on these labelled sets, without saving it.
    assert_eq!(cal["calibrated"]["goal"]["rule"], "youden");
    let would = cal["calibrated"]["tau"].as_f64().expect("a τ by the rule");
    assert!(would > 0.0 && would < 1.0, "{would}");
    // Each set's rate at τ comes with its 95% interval around it.
    for s in cal["at_tau"].as_array().unwrap() {
        let (rate, lo, hi) = (
            s["refusal_rate"].as_f64().unwrap(),
            s["ci95"][0].as_f64().unwrap(),
            s["ci95"][1].as_f64().unwrap(),
        );
        assert!(lo <= rate && rate <= hi && hi - lo > 0.1, "{s}");
    }
    for rates in cal["rates"].as_array().unwrap() {
        let r: Vec<f64> = rates
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(r[0], 1.0);
        assert!(r.windows(2).all(|w| w[1] <= w[0]), "monotone in τ: {r:?}");
    }
    // Recalibrating on a chosen split writes τ into the adapter, which later commands read.
    let weights = std::fs::read(out_dir.join("adapter.safetensors")).unwrap();
    let out = calibrate_adapter(&[
        "--split",
        "test",
        "--save-tau",
        "--tau-rule",
        "youden",
        "--json",
    ]);
    let cal = json_of(&out);
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("adapter.json")).unwrap()).unwrap();
    let as_f32 = |v: &serde_json::Value| v.as_f64().unwrap() as f32;
    assert_eq!(as_f32(&saved["tau"]), as_f32(&cal["tau"]));
    assert_eq!(saved["tau_goal"]["rule"], "youden");
    // A budget outside [0, 1] is refused with one line.
    let out = calibrate_adapter(&["--save-tau", "--max-harmless-refusal", "5"]);
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("--max-harmless-refusal must be a share between 0 and 1"));
    assert_eq!(
        std::fs::read(out_dir.join("adapter.safetensors")).unwrap(),
        weights,
        "the weights are left alone"
    );
    // --save-tau needs an adapter to save into.
    let out = run(&[
        "calibrate",
        "--model",
        &model,
        "--set",
        harmful.to_str().unwrap(),
        "--save-tau",
    ]);
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("refusal-token adapter"));
    // Without an adapter the same command reads the refusal-opener mass instead.
    let out = run(&[
        "calibrate",
        "--model",
        &model,
        "--set",
        harmful.to_str().unwrap(),
        "--split",
        "test",
    ]);
    succeeded(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("P(refusal openers)"));
}

// Over 120 lines: one chain of commands through saved files (directions → probe → trajectory
// → cliff-rank); each step reads what the last one wrote, so it reads best as one function.
#[test]
fn directions_probe_trajectory_and_cliff_rank_chain_through_saved_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_folder(dir.path());
    let harmful = write_set(dir.path(), "harmful", "evil", 12);
    let harmless = write_set(dir.path(), "harmless", "kind", 12);
    let dirs = dir.path().join("dirs.safetensors").display().to_string();
    let probes = dir.path().join("probes.safetensors").display().to_string();
    let cache = dir.path().join("cache");
    let run_here = |args: &[&str]| run_cached(&cache, args);
    let common = [
        "--model",
        &model,
        "--harmful",
        &harmful,
        "--harmless",
        &harmless,
    ];

    let mut args = vec!["directions"];
    args.extend(common);
    args.extend([
        "--val-prompts",
        "3",
        "--max-kl",
        "100",
        "--out",
        &dirs,
        "--json",
    ]);
    let out = run_here(&args);
    // A random model may fail every candidate's "addition raises refusal" test: then the
    // command says so in one line; otherwise it saves what it chose.
    if out.status.success() {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            v["directions"]["provenance"]["n_harmful"], 6,
            "the train split"
        );
        assert!(!v["directions"]["selection"]["candidates"]
            .as_array()
            .unwrap()
            .is_empty());
    } else {
        assert!(stderr_line(&out).contains("no (layer, position) candidate"));
        let mut args = vec!["directions"];
        args.extend(common);
        args.extend(["--no-select", "--out", &dirs, "--json"]);
        json_of(&run_here(&args));
    }
    assert!(Path::new(&dirs).exists());
    // The states were cached: a second run reads them.
    assert!(
        std::fs::read_dir(cache.join("activations"))
            .unwrap()
            .count()
            == 2
    );

    let mut args = vec!["probe"];
    args.extend(common);
    args.extend([
        "--labels",
        "set",
        "--holdout",
        "test",
        "--out",
        &probes,
        "--json",
    ]);
    let v = json_of(&run_here(&args));
    assert_eq!(v["probes"]["n_test"], 6);
    assert_eq!(
        v["probes"]["metrics"].as_array().unwrap().len(),
        3,
        "2 layers + the final state"
    );

    let v = json_of(&run_here(&[
        "trajectory",
        "--model",
        &model,
        "--prompt",
        "evil request number 99",
        "--reply-tokens",
        "5",
        "--probes",
        &probes,
        "--directions",
        &dirs,
        "--layer",
        "1",
        "--json",
    ]));
    let t = &v["trajectory"];
    let n = t["tokens"].as_array().unwrap().len();
    assert_eq!(t["score"].as_array().unwrap().len(), n);
    assert_eq!(t["heatmap"].as_array().unwrap().len(), 3);
    assert_eq!(t["layer"], 1);

    let top = dir.path().join("top.jsonl");
    let v = json_of(&run_here(&[
        "cliff-rank",
        "--model",
        &model,
        "--set",
        &harmful,
        "--probes",
        &probes,
        "--layer",
        "1",
        "--top",
        "0.25",
        "--out",
        top.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(v["top"], 3);
    let ranked = v["ranked"].as_array().unwrap();
    assert_eq!(ranked.len(), 12);
    let cliffs: Vec<f64> = ranked
        .iter()
        .map(|r| r["cliff"].as_f64().unwrap())
        .collect();
    assert!(
        cliffs.windows(2).all(|w| w[0] >= w[1]),
        "largest cliff first: {cliffs:?}"
    );
    let exported = std::fs::read_to_string(&top).unwrap();
    assert_eq!(exported.lines().count(), 3);
    assert!(exported.contains("\"cliff\""));

    let out = run_here(&[
        "score", "--model", &model, "--set", &harmful, "--split", "test", "--json",
    ]);
    assert_eq!(json_of(&out)["prompts"].as_array().unwrap().len(), 3);
    let out = run_here(&[
        "trajectory",
        "--model",
        &model,
        "--prompt",
        "x",
        "--probes",
        "/nonexistent.safetensors",
    ]);
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("nonexistent"));
}

/// Every family opens and runs every analysis through the CLI, as a GGUF (the form llama.cpp
/// users have) of a tiny random model: directions, probes, trajectory, steering sweep, head
/// attribution, refusal-token training and generation.
#[test]
fn every_family_runs_every_analysis() {
    for family in [Family::Qwen3, Family::Phi3, Family::Gemma2, Family::Gemma3] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_config(family);
        let path = dir.path().join("tiny.gguf");
        write_gguf(
            &path,
            &cfg,
            &random_weights(&cfg, 9).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        let model = path.display().to_string();
        let sets = dir.path().join("sets");
        std::fs::create_dir(&sets).unwrap();
        let harmful = write_set(&sets, "harmful", "Explain how to steal", 8);
        let harmless = write_set(&sets, "harmless", "Tell me a kind story", 8);
        std::fs::copy(&harmless, sets.join("borderline.jsonl")).unwrap();
        let p = |name: &str| dir.path().join(name).display().to_string();
        let (dirs, probes) = (p("dirs.safetensors"), p("probes.safetensors"));
        let sets_arg = ["--harmful", &harmful, "--harmless", &harmless];
        let ok = |args: &[&str]| {
            let mut all = vec![args[0], "--model", &model, "--json"];
            all.extend(&args[1..]);
            let out = run_cached(&dir.path().join("cache"), &all);
            assert!(
                out.status.success(),
                "{family:?} {}: {}",
                args[0],
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ok(&["info"]);
        ok(&["generate", "--prompt", "hello", "--max-tokens", "4"]);
        ok(&[
            &["directions", "--no-select", "--out", &dirs][..],
            &sets_arg,
        ]
        .concat());
        ok(&[
            &[
                "probe",
                "--labels",
                "set",
                "--holdout",
                "test",
                "--out",
                &probes,
            ][..],
            &sets_arg,
        ]
        .concat());
        ok(&[
            "trajectory",
            "--prompt",
            "evil",
            "--reply-tokens",
            "3",
            "--probes",
            &probes,
            "--directions",
            &dirs,
            "--layer",
            "1",
        ]);
        ok(&[
            "sweep",
            "--set",
            &harmless,
            "--directions",
            &dirs,
            "--layers",
            "1",
            "--alphas",
            "0,1",
            "--reply-tokens",
            "2",
        ]);
        ok(&[&["heads", "dla"][..], &sets_arg].concat());
        ok(&[&["heads", "interchange", "--k", "2"][..], &sets_arg].concat());
        // Every metric at once, as the JSON the GUI loads with a shipped lens.
        let heads = p("heads.json");
        ok(&[&["heads", "all", "--out", &heads][..], &sets_arg].concat());
        let metrics: refusal_lens_engine::analysis::heads::HeadMetrics =
            serde_json::from_str(&std::fs::read_to_string(&heads).unwrap()).unwrap();
        assert_eq!(
            (metrics.dla.n_layers, metrics.necessity.n_heads),
            (cfg.n_layers, cfg.n_heads)
        );
        let adapter = p("adapter");
        ok(&[
            "train-refusal-tokens",
            "--sets",
            sets.to_str().unwrap(),
            "--out",
            &adapter,
            "--row-steps",
            "20",
        ]);
        // The organism it trained against its base model; the Latent Guard.
        ok(&[
            &[
                "compare",
                "--adapter",
                &adapter,
                "--other-base",
                "--borderline",
                "none",
                "--prompt",
                "hi",
                "--reply-tokens",
                "2",
            ][..],
            &sets_arg,
        ]
        .concat());
        let guard = p("guard.json");
        let out = run_cached(
            &dir.path().join("cache"),
            &[
                &["guard", "fit", "--model", &model, "--out", &guard][..],
                &sets_arg,
            ]
            .concat(),
        );
        assert!(
            out.status.success(),
            "{family:?} guard fit: {}",
            stderr_line(&out)
        );
    }
}

/// Latent Guard end to end: fit on train (layers and τ chosen on val), evaluate on test beside
/// refusal-based detection with per-category, borderline and jailbreak rows, and the 2-D view
/// as CSV; a damaged guard file is a one-line error.
#[test]
fn guard_fits_evaluates_and_scatters() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_folder(dir.path());
    let harmful = write_set(dir.path(), "harmful", "evil", 12);
    let harmless = write_set(dir.path(), "harmless", "kind", 12);
    let jailbreaks = dir.path().join("jb.jsonl");
    std::fs::write(
        &jailbreaks,
        "{\"id\": \"story\", \"technique\": \"fiction\", \"template\": \"Tell a story: {prompt}\"}\n",
    )
    .unwrap();
    let guard = dir.path().join("guard.json").display().to_string();
    let cache = dir.path().join("cache");
    let run_here = |args: &[&str]| run_cached(&cache, args);
    let sets = [
        "--model",
        &model,
        "--harmful",
        &harmful,
        "--harmless",
        &harmless,
    ];
    let fit = json_of(&run_here(
        &[&["guard", "fit", "--out", &guard, "--json"][..], &sets].concat(),
    ));
    let layers = &fit["guard"]["layers"];
    assert!(layers["start"].as_u64().unwrap() < layers["end"].as_u64().unwrap());
    assert_eq!(fit["val"]["n_harmful"], 3);
    let jb = jailbreaks.to_str().unwrap();
    let inputs = [
        "--guard",
        &guard,
        "--borderline",
        &harmless,
        "--jailbreaks",
        jb,
    ];
    let eval = json_of(&run_here(
        &[
            &["guard", "eval", "--reply-tokens", "3", "--json"][..],
            &sets,
            &inputs,
        ]
        .concat(),
    ));
    let c = &eval["comparison"];
    assert_eq!(
        (c["n_harmful"].as_u64(), c["n_harmless"].as_u64()),
        (Some(3), Some(3))
    );
    for detector in ["guard", "refusal_score"] {
        let roc = c[detector]["roc"].as_array().unwrap();
        assert_eq!(roc.first().unwrap(), &serde_json::json!([0.0, 0.0]));
        assert_eq!(roc.last().unwrap(), &serde_json::json!([1.0, 1.0]));
    }
    let counts = &c["refused_reply"];
    let total: u64 = [
        "true_positives",
        "false_negatives",
        "false_positives",
        "true_negatives",
    ]
    .iter()
    .map(|k| counts[k].as_u64().unwrap())
    .sum();
    assert_eq!(total, 6);
    assert_eq!(eval["categories"].as_array().unwrap().len(), 2);
    assert_eq!(eval["jailbreaks"][0]["id"], "story");
    assert_eq!(eval["jailbreaks"][0]["n"], 3);
    let csv = dir.path().join("scatter.csv");
    let out = run_here(
        &[
            &["guard", "scatter", "--out", csv.to_str().unwrap()][..],
            &sets,
            &inputs,
        ]
        .concat(),
    );
    succeeded(&out);
    let text = std::fs::read_to_string(&csv).unwrap();
    // Header, 3 harmful, 3 harmless, 3 borderline, 3 wrapped (each naming its plain prompt).
    assert_eq!(text.lines().count(), 13);
    assert!(text.contains("jailbreak:story,harmful-3+story,harmful-3,"));
    std::fs::write(&guard, "{\"not\": \"a guard\"}").unwrap();
    let out = run_here(&[&["guard", "eval"][..], &sets, &inputs].concat());
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("not a saved guard"));
}

/// `export-ablated` writes a GGUF and an HF folder that load and reports the export's refusal
/// rate and KL; a model loaded from an HF folder cannot be written back as GGUF and says so in
/// one line.
#[test]
fn export_ablated_writes_a_loadable_gguf_and_reports_its_cost() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cfg = tiny_config(Family::Llama);
    let model = dir.path().join("tiny.gguf");
    write_gguf(
        &model,
        &cfg,
        &random_weights(&cfg, 71).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let model = model.display().to_string();
    let harmful = write_set(dir.path(), "harmful", "evil", 12);
    let harmless = write_set(dir.path(), "harmless", "kind", 12);
    let sets = ["--harmful", &harmful, "--harmless", &harmless];
    let dirs = dir.path().join("dirs.safetensors").display().to_string();
    let args = [
        &[
            "directions",
            "--model",
            &model,
            "--no-select",
            "--out",
            &dirs,
        ][..],
        &sets,
    ]
    .concat();
    succeeded(&run_cached(&cache, &args));
    let out = dir.path().join("ablated.gguf").display().to_string();
    let args = [
        &[
            "export-ablated",
            "--model",
            &model,
            "--directions",
            &dirs,
            "--out",
            &out,
            "--json",
        ][..],
        &sets,
    ]
    .concat();
    let v = json_of(&run_cached(&cache, &args));
    assert!(v["harmless_mean_kl"].as_f64().unwrap() >= 0.0);
    assert_eq!(v["n_harmful"], 3);
    assert!(v["harmful_refusal_rate_after"].is_number());
    let info = json_of(&run(&["info", "--model", &out, "--json"]));
    assert_eq!(info["n_layers"], 2);
    // As an HF folder: the same measurements, and the folder opens as a model.
    let folder = dir.path().join("ablated-hf").display().to_string();
    let args = [
        &[
            "export-ablated",
            "--model",
            &model,
            "--directions",
            &dirs,
            "--hf-out",
            &folder,
            "--json",
        ][..],
        &sets,
    ]
    .concat();
    let from_folder = json_of(&run_cached(&cache, &args));
    assert!(from_folder["hf_bytes"].as_u64().unwrap() > 0);
    let close = |k: &str| (from_folder[k].as_f64().unwrap() - v[k].as_f64().unwrap()).abs() < 1e-4;
    assert!(close("harmless_mean_kl") && close("harmful_refusal_rate_after"));
    let info = json_of(&run(&["info", "--model", &folder, "--json"]));
    assert_eq!(info["n_layers"], 2);
    let hf = tiny_folder(dir.path());
    let args = [
        &[
            "export-ablated",
            "--model",
            &hf,
            "--directions",
            &dirs,
            "--out",
            &out,
        ][..],
        &sets,
    ]
    .concat();
    let failed = run_cached(&cache, &args);
    assert!(!failed.status.success());
    assert!(stderr_line(&failed).contains("loaded from GGUF"));
}

/// `compare`: a model against its abliterated copy and against another model, with replies;
/// `--other-base` on a model without an adapter fails in one line.
#[test]
fn compare_puts_two_models_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cfg = tiny_config(Family::Llama);
    let model = dir.path().join("tiny.gguf");
    write_gguf(
        &model,
        &cfg,
        &random_weights(&cfg, 72).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let model = model.display().to_string();
    let harmful = write_set(dir.path(), "harmful", "evil", 12);
    let harmless = write_set(dir.path(), "harmless", "kind", 12);
    let sets = [
        "--model",
        &model,
        "--harmful",
        &harmful,
        "--harmless",
        &harmless,
        "--borderline",
        "none",
    ];
    let dirs = dir.path().join("dirs.safetensors").display().to_string();
    let saved = json_of(&run_cached(
        &cache,
        &[
            &["directions", "--no-select", "--json", "--out", &dirs][..],
            &sets[..6],
        ]
        .concat(),
    ));
    let layer = saved["directions"]["layer"].as_u64().unwrap() as usize;
    let csv = dir.path().join("layers.csv");
    let v = json_of(&run_cached(
        &cache,
        &[
            &[
                "compare",
                "--other-ablated",
                &dirs,
                "--prompt",
                "kind words",
                "--reply-tokens",
                "4",
                "--csv",
                csv.to_str().unwrap(),
                "--json",
            ][..],
            &sets,
        ]
        .concat(),
    ));
    let c = &v["comparison"];
    let layers = c["layers"].as_array().unwrap();
    assert_eq!(layers.len(), cfg.n_layers + 1);
    // Ablating the saved refusal direction (the same train prompts, t_post) leaves the copy's
    // direction at that state orthogonal to it.
    let cosine = layers[layer]["refusal"].as_f64().unwrap();
    assert!(cosine.abs() < 1e-3, "layer {layer}: {cosine}");
    assert!(c["first_guard_on_second"]["auc"].is_number());
    assert_eq!(c["n_test_harmful"], 3);
    assert_eq!(v["replies"].as_array().unwrap().len(), 2);
    let rows = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(rows.lines().count(), cfg.n_layers + 2);
    // Against another model with the same stream: a human-readable table.
    let other = tiny_folder(dir.path());
    let out = run_cached(
        &cache,
        &[&["compare", "--other", &other][..], &sets].concat(),
    );
    succeeded(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Latent Guard test AUC") && text.contains("cos(refusal)"),
        "{text}"
    );
    let failed = run_cached(&cache, &[&["compare", "--other-base"][..], &sets].concat());
    assert!(!failed.status.success());
    assert!(stderr_line(&failed).contains("no adapter"));
}

/// `generate --ablate-direction DIRS[:harmfulness][@FRACTION]`: a fraction of the component
/// (the stack says which), the full projection by default, a bad fraction in one line.
#[test]
fn generate_ablates_a_fraction_of_a_direction() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let model = tiny_folder(dir.path());
    let harmful = write_set(dir.path(), "harmful", "evil", 12);
    let harmless = write_set(dir.path(), "harmless", "kind", 12);
    let dirs = dir.path().join("dirs.safetensors").display().to_string();
    succeeded(&run_cached(
        &cache,
        &[
            "directions",
            "--model",
            &model,
            "--no-select",
            "--out",
            &dirs,
            "--harmful",
            &harmful,
            "--harmless",
            &harmless,
        ],
    ));
    let steered = |spec: &str| {
        run_cached(
            &cache,
            &[
                "generate",
                "--model",
                &model,
                "--prompt",
                "hi",
                "--max-tokens",
                "2",
                "--ablate-direction",
                spec,
                "--json",
            ],
        )
    };
    let half = String::from_utf8_lossy(&steered(&format!("{dirs}@0.5")).stdout).to_string();
    assert!(
        half.contains("ablate 0.50 of the refusal direction"),
        "{half}"
    );
    let full = String::from_utf8_lossy(&steered(&format!("{dirs}:harmfulness")).stdout).to_string();
    assert!(full.contains("ablate the harmfulness direction"), "{full}");
    let bad = steered(&format!("{dirs}@half"));
    assert!(!bad.status.success());
    assert!(stderr_line(&bad).contains("not a fraction"));
}
