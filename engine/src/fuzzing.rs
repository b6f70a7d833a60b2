//! Entry points of the fuzz targets (`fuzz/`), shared with the stable test that replays their
//! corpora on every `tests/run.sh` (`engine/tests/fuzz_corpora.rs`). Each takes untrusted
//! bytes the way a user's file would arrive and must end in `Ok` or a clean `Err`: never a
//! panic, an abort, an unbounded allocation or a hang.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::analysis::directions::Directions;
use crate::analysis::probe::ProbeSet;
use crate::data::prompts::PromptSet;
use crate::model::chat::{ChatTemplate, TemplateSource};
use crate::model::config::Family;
use crate::model::FastPrecision;
use crate::organism::{Adapter, AdapterMeta, TrainOptions, ADAPTER_FILE, META_FILE};
use crate::testing::{random_weights, tiny_config, tiny_model, write_gguf, write_hf_folder};
use crate::LoadedModel;

/// A folder of this process's own for the files a target writes.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("refusal-lens-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        dir
    })
}

fn write(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, data).expect("writing a scratch file");
    path
}

/// A model file: GGUF header, metadata, tensor index and data.
pub fn gguf(data: &[u8]) {
    let path = write("model.gguf", data);
    let _ = LoadedModel::load(&path, FastPrecision::Auto);
}

/// An HF folder whose `config.json` is `data` (beside a valid tokenizer and weights).
pub fn hf_config(data: &[u8]) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = scratch().join("hf");
        let cfg = tiny_config(Family::Llama);
        write_hf_folder(&dir, &cfg, &random_weights(&cfg, 1).unwrap()).unwrap();
        dir
    });
    std::fs::write(dir.join("config.json"), data).unwrap();
    let _ = LoadedModel::load(dir, FastPrecision::Auto);
}

/// An HF folder whose `model.safetensors` is `data` (header, index and data).
pub fn hf_safetensors(data: &[u8]) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = scratch().join("hf-weights");
        let cfg = tiny_config(Family::Llama);
        write_hf_folder(&dir, &cfg, &random_weights(&cfg, 1).unwrap()).unwrap();
        dir
    });
    std::fs::write(dir.join("model.safetensors"), data).unwrap();
    let _ = LoadedModel::load(dir, FastPrecision::Auto);
}

/// An untrusted chat template rendering a system message and a prompt.
pub fn chat_template(data: &[u8]) {
    let template = ChatTemplate {
        source: TemplateSource::TokenizerConfig,
        template: String::from_utf8_lossy(data).into_owned(),
        bos_token: "<s>".into(),
        eos_token: "</s>".into(),
        enable_thinking: false,
    };
    let _ = template.render(Some("Be brief."), "How do I bake bread?");
}

/// A prompt set in each of the formats the importers read.
pub fn prompt_sets(data: &[u8]) {
    for ext in ["jsonl", "json", "csv", "tsv", "txt"] {
        let path = write(&format!("set.{ext}"), data);
        let _ = PromptSet::load(&path, None);
    }
}

/// A refusal-token adapter folder: the first byte picks which file is `data[1..]`
/// (`adapter.json`, else `adapter.safetensors`); the other is a valid one. Loaded and applied
/// to a tiny model.
pub fn adapter(data: &[u8]) {
    static VALID: OnceLock<(LoadedModel, Vec<u8>, Vec<u8>)> = OnceLock::new();
    let (model, meta, tensors) = VALID.get_or_init(|| {
        let model = tiny_model(Family::Llama, 1).unwrap();
        let dir = scratch().join("valid-adapter");
        valid_adapter(&model).save(&dir).unwrap();
        let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
        (model, read(META_FILE), read(ADAPTER_FILE))
    });
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch().join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    let (json, st): (&[u8], &[u8]) = if which % 2 == 0 {
        (rest, tensors)
    } else {
        (meta, rest)
    };
    std::fs::write(dir.join(META_FILE), json).unwrap();
    std::fs::write(dir.join(ADAPTER_FILE), st).unwrap();
    if let Ok(a) = Adapter::load(&dir) {
        let _ = a.apply(model);
    }
}

/// A directions or probes file (safetensors with JSON metadata).
pub fn lens_files(data: &[u8]) {
    let path = write("lens.safetensors", data);
    let _ = Directions::load(&path);
    let _ = ProbeSet::load(&path);
}

/// A valid tiny GGUF, the seed the GGUF target mutates (structure-aware: its mutations are
/// mostly of a valid header, metadata and index).
pub fn seed_gguf() -> Vec<u8> {
    let cfg = tiny_config(Family::Llama);
    let path = scratch().join("seed.gguf");
    write_gguf(
        &path,
        &cfg,
        &random_weights(&cfg, 1).unwrap(),
        candle_core::quantized::GgmlDType::Q8_0,
    )
    .unwrap();
    std::fs::read(path).unwrap()
}

/// An untrained two-token adapter for `model` (zero rows, no LoRA).
fn valid_adapter(model: &LoadedModel) -> Adapter {
    let d = model.model.config.d_model;
    Adapter {
        rows: candle_core::Tensor::zeros(
            (2, d),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
        input_rows: None,
        lora: Default::default(),
        meta: AdapterMeta {
            tokens: vec!["[refuse]".into(), "[respond]".into()],
            base_model: model.card.name.clone(),
            base_model_sha256: String::new(),
            data_sha256: String::new(),
            train_prompts: 0,
            options: TrainOptions::default(),
            losses: Vec::new(),
            lora_losses: Vec::new(),
            lora_tokens_per_second: 0.0,
            seconds: 0.0,
            metrics: serde_json::Value::Null,
            tau: None,
            tau_goal: None,
            created_by: "fuzzing".into(),
        },
    }
}
