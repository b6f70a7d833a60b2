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
