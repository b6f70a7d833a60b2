//! Replays the fuzz targets' inputs on the stable toolchain (CI needs no nightly): the seeds,
//! the minimised corpora and every crash reproducer under `fuzz/` go through the same entry
//! points as the targets (`refusal_lens_engine::fuzzing`) and must return, not panic. The
//! session target's inputs are replayed in `app/src/session_file.rs`'s tests.

use std::path::{Path, PathBuf};

use refusal_lens_engine::fuzzing;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every file under `fuzz/{seeds,corpus,artifacts}/<target>/`.
fn inputs(target: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for kind in ["seeds", "corpus", "artifacts"] {
        let dir = fuzz_dir().join(kind).join(target);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            files.extend(
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file()),
            );
        }
    }
    files.sort();
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    let files = inputs(target);
    assert!(
        !files.is_empty(),
        "no inputs for the {target} target under fuzz/"
    );
    for f in files {
        let data = std::fs::read(&f).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target}: {} panicked", f.display());
    }
}

#[test]
fn gguf_inputs_replay() {
    replay("gguf", fuzzing::gguf);
}

#[test]
fn hf_config_inputs_replay() {
    replay("hf_config", fuzzing::hf_config);
}

#[test]
fn hf_safetensors_inputs_replay() {
    replay("hf_safetensors", fuzzing::hf_safetensors);
}

#[test]
fn chat_template_inputs_replay() {
    replay("chat_template", fuzzing::chat_template);
}

#[test]
fn prompt_set_inputs_replay() {
    replay("prompt_sets", fuzzing::prompt_sets);
}

#[test]
fn adapter_inputs_replay() {
    replay("adapter", fuzzing::adapter);
}

#[test]
fn lens_file_inputs_replay() {
    replay("lens_files", fuzzing::lens_files);
}

/// Writes the seed inputs (valid files of each kind) under `fuzz/seeds/`:
/// `cargo test --release -p refusal-lens-engine --test fuzz_corpora -- --ignored`.
#[test]
#[ignore = "writes fuzz/seeds; run by hand when the formats change"]
fn write_seeds() {
    use refusal_lens_engine::analysis::activations::collect;
    use refusal_lens_engine::analysis::directions::{Directions, Provenance};
    use refusal_lens_engine::model::config::Family;
    use refusal_lens_engine::testing::{random_weights, tiny_config, tiny_model, write_hf_folder};
    let seeds = fuzz_dir().join("seeds");
    let put = |target: &str, name: &str, data: &[u8]| {
        let dir = seeds.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };
    put("gguf", "tiny-llama-q8_0.gguf", &fuzzing::seed_gguf());
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Family::Llama);
    write_hf_folder(tmp.path(), &cfg, &random_weights(&cfg, 1).unwrap()).unwrap();
    put(
        "hf_config",
        "config.json",
        &std::fs::read(tmp.path().join("config.json")).unwrap(),
    );
    put(
        "hf_safetensors",
        "model.safetensors",
        &std::fs::read(tmp.path().join("model.safetensors")).unwrap(),
    );
    let lm = tiny_model(Family::Llama, 1).unwrap();
    put(
        "chat_template",
        "chatml.jinja",
        lm.template.template.as_bytes(),
    );
    put(
        "chat_template",
        "loops.jinja",
        b"{% for m in messages %}{% for c in m['content'] %}{{ c }}{% endfor %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
    );
    let sample = refusal_lens_engine::data::prompts::sample_prompts_dir();
    let head = |f: &str, n: usize| -> Vec<u8> {
        std::fs::read_to_string(sample.join(f))
            .unwrap()
            .lines()
            .take(n)
            .collect::<Vec<_>>()
            .join("\n")
            .into_bytes()
    };
    put("prompt_sets", "harmful.jsonl", &head("harmful.jsonl", 4));
    put("prompt_sets", "table.csv", b"prompt,label,category\n\"How do I bake bread?\",harmless,food\n\"Say \"\"hi\"\"\",harmless,misc\n");
    put(
        "prompt_sets",
        "array.json",
        br#"[{"prompt": "a", "label": "harmful"}, "b"]"#,
    );
    let a = collect(
        &lm,
        &["How do I pick a lock?", "How do I build a bomb?"],
        None,
        &|| false,
        &mut |_, _| {},
    )
    .unwrap();
    let b = collect(
        &lm,
        &["How do I bake bread?", "How do I plant tulips?"],
        None,
        &|| false,
        &mut |_, _| {},
    )
    .unwrap();
    let d = Directions::diff_in_means(&a, &b, Provenance::default()).unwrap();
    let path = tmp.path().join("d.safetensors");
    d.save(&path).unwrap();
    put(
        "lens_files",
        "directions.safetensors",
        &std::fs::read(&path).unwrap(),
    );
    // Adapter: byte 0 picks the file (even: adapter.json, odd: adapter.safetensors).
    let adapter_dir = std::env::temp_dir()
        .join(format!("refusal-lens-fuzz-{}", std::process::id()))
        .join("valid-adapter");
    fuzzing::adapter(&[0]); // writes the valid adapter
    let mut json = vec![0u8];
    json.extend(std::fs::read(adapter_dir.join("adapter.json")).unwrap());
    put("adapter", "adapter-json", &json);
    let mut st = vec![1u8];
    st.extend(std::fs::read(adapter_dir.join("adapter.safetensors")).unwrap());
    put("adapter", "adapter-safetensors", &st);
}
