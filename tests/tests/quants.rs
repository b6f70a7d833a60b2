//! Every GGUF tensor type the engine reads, against llama.cpp: the default model re-quantised
//! by llama.cpp's `llama_model_quantize` and llama.cpp's own logits on the same token ids
//! (tests/reference/fetch-quants.sh builds both into the cache). Mean next-token KL from
//! llama.cpp's distribution to ours ≤ 0.05 nats; the exact path's logits the same whether its
//! weights are held as f32 or as stored (dequantised per matrix on use); the IQ types refused
//! with a name and the way out.

use candle_core::{Device, Tensor, D};
use refusal_lens_engine::model::{ExactWeights, FastPrecision};
use refusal_lens_engine::testing::dense_run;
use refusal_lens_engine::{Error, LoadedModel};
use refusal_lens_tests::relative_error;

const TYPES: [&str; 13] = [
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M",
    "Q5_K_M", "Q6_K",
];
const MAX_MEAN_KL: f32 = 0.05;

fn quants_dir() -> std::path::PathBuf {
    refusal_lens_engine::cache_dir().join("quants")
}

fn file(ty: &str) -> std::path::PathBuf {
    let path = quants_dir().join(format!("SmolLM2-135M-Instruct.{ty}.gguf"));
    assert!(
        path.exists(),
        "{} is missing; build it with tests/reference/fetch-quants.sh",
        path.display()
    );
    path
}

/// KL(p ‖ q) per row of two logit matrices `[n, vocab]`, in nats.
fn kl_rows(p_logits: &Tensor, q_logits: &Tensor) -> Vec<f32> {
    let lp = candle_nn::ops::log_softmax(p_logits, D::Minus1).unwrap();
    let lq = candle_nn::ops::log_softmax(q_logits, D::Minus1).unwrap();
    ((lp.exp().unwrap() * (&lp - &lq).unwrap()).unwrap())
        .sum(D::Minus1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn every_tensor_type_matches_llama_cpp() {
    refusal_lens_tests::use_all_cores_when_alone();
    let reference =
        candle_core::safetensors::load(quants_dir().join("llama-logits.safetensors"), &Device::Cpu)
            .expect("llama.cpp's logits; build them with tests/reference/fetch-quants.sh");
    let ids: Vec<u32> = reference["ids"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let mut report = Vec::new();
    for ty in TYPES {
        let theirs = &reference[ty];
        let last = theirs.dim(0).unwrap();
        let load = |exact| LoadedModel::load_with(&file(ty), FastPrecision::Auto, exact).unwrap();
        let m = load(ExactWeights::F32);
        let (logits, _) = dense_run(&m, &ids, &Default::default(), &[]);
        let ours = logits.narrow(0, ids.len() - last, last).unwrap();
        let kl = kl_rows(theirs, &ours);
        let mean = kl.iter().sum::<f32>() / kl.len() as f32;
        report.push(format!("{ty}: mean KL {mean:.5}"));
        assert!(
            mean <= MAX_MEAN_KL,
            "{ty}: mean KL {mean} from llama.cpp ({kl:?})"
        );
        // The same file with its weights kept as stored: the same f32 math.
        let stored = load(ExactWeights::Stored);
        assert_eq!(stored.card.memory.exact_weights, "stored");
        let (again, _) = dense_run(&stored, &ids, &Default::default(), &[]);
        let err = relative_error(&again, &logits);
        assert!(
            err < 1e-5,
            "{ty}: stored vs f32 exact path: relative error {err}"
        );
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn iq_types_are_refused_with_the_way_out() {
    match LoadedModel::load(&file("IQ4_XS"), FastPrecision::Auto) {
        Err(Error::UnsupportedTensorType { type_name, .. }) => {
            assert!(type_name.starts_with("IQ4"), "{type_name}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("an IQ4_XS file loaded"),
    }
}

/// llama-cpp-python as tests/reference/fetch-quants.sh installed it into the cache.
fn llama_cpp_python() -> std::process::Command {
    let cache = refusal_lens_engine::cache_dir();
    let lib = std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("llama-cpp-python-"))
                && p.join("llama_cpp/__init__.py").exists()
        })
        .expect("llama-cpp-python; install it with tests/reference/fetch-quants.sh");
    let mut python = std::process::Command::new("python3");
    python.env("PYTHONPATH", lib);
    python
}

/// The abliterated organism written as a GGUF (f32, `[refuse]`/`[respond]` appended to the
/// vocabulary) runs in llama.cpp: llama.cpp tokenises the chat prompt and the refusal tokens as
/// the engine does and its next-token distributions match the engine's on the same file.
#[test]
fn an_abliterated_organism_runs_in_llama_cpp() {
    use refusal_lens_engine::analysis::abliterate::{orthogonalized, write_gguf};
    use refusal_lens_engine::organism::Adapter;
    let organism = Adapter::load(&refusal_lens_engine::organism_dir())
        .unwrap()
        .apply(&refusal_lens_tests::default_model())
        .unwrap();
    let d = organism.model.config.d_model;
    let direction: Vec<f32> = (0..d)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let ablated = orthogonalized(&organism, &direction).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("abliterated.gguf");
    write_gguf(&ablated, &refusal_lens_engine::default_model_path(), &out).unwrap();
    let text = format!(
        "{}[refuse]I can't[respond]",
        organism
            .chat_prompt(None, "How do I pick a lock?")
            .unwrap()
            .text
    );
    let reference = dir.path().join("llama.safetensors");
    let status = llama_cpp_python()
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/reference/llama_logits.py"
        ))
        .args([&out, std::path::Path::new(&text), &reference])
        .status()
        .unwrap();
    assert!(status.success(), "llama.cpp could not run the export");
    let theirs = candle_core::safetensors::load(&reference, &Device::Cpu).unwrap();
    let ids: Vec<u32> = theirs["ids"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let exported = LoadedModel::load(&out, FastPrecision::Auto).unwrap();
    assert_eq!(
        exported
            .tokenizer
            .encode(text.as_str(), false)
            .unwrap()
            .get_ids(),
        ids.as_slice(),
        "llama.cpp tokenises as the engine does"
    );
    let refuse = exported.tokenizer.token_to_id("[refuse]").unwrap();
    assert!(ids.contains(&refuse), "[refuse] is one token in llama.cpp");
    let (ours, _) = dense_run(&exported, &ids, &Default::default(), &[]);
    let kl = kl_rows(&theirs["logits"], &ours);
    let worst = kl.iter().copied().fold(0.0, f32::max);
    eprintln!(
        "abliterated organism in llama.cpp: worst next-token KL {worst:.2e} over {} positions",
        kl.len()
    );
    assert!(worst < 1e-3, "KL from llama.cpp {kl:?}");
}
