//! The same workbench on another device: a model moved there computes what it computes on
//! the CPU. Moving to the CPU itself must change nothing at all (checked on every run: it
//! exercises the copy of every weight kind, dense, stored and quantised). Against a GPU, the
//! parity tests run when one is there: `REFUSAL_LENS_TEST_DEVICE=cuda:0` (or `metal:0`), or
//! by default the first device of a `--features cuda`/`metal` build; otherwise they print why
//! they skip.

use candle_core::{Device, Tensor};
use refusal_lens_engine::device::{compiled_devices, device_name, parse_device};
use refusal_lens_engine::hooks::{HookPoint, HookSpec};
use refusal_lens_engine::model::config::Family;
use refusal_lens_engine::run::generate::{generate, GenerateConfig};
use refusal_lens_engine::testing::{dense_run, max_abs_diff, tiny_model};
use refusal_lens_engine::LoadedModel;
use refusal_lens_tests::{default_model, relative_error};

const FAMILIES: [Family; 6] = [
    Family::Llama,
    Family::Qwen2,
    Family::Qwen3,
    Family::Phi3,
    Family::Gemma2,
    Family::Gemma3,
];

/// f32 on a GPU sums in other orders (and cuBLAS picks its own algorithms): the error
/// relative to the tensor's scale stays around 1e-6 per layer; 1e-3 leaves room for 30 layers
/// of a quantised model whose activations reach the hundreds.
const GPU_TOLERANCE: f32 = 1e-3;

/// The device the parity tests compare against, or why there is none.
fn test_device() -> Result<Device, String> {
    let spec = match std::env::var("REFUSAL_LENS_TEST_DEVICE") {
        Ok(spec) => spec,
        Err(_) => match compiled_devices().get(1) {
            Some(gpu) => gpu.to_string(),
            None => {
                return Err("a CPU-only build (build with --features cuda or metal, \
                            or set REFUSAL_LENS_TEST_DEVICE)"
                    .into())
            }
        },
    };
    parse_device(&spec).map_err(|e| e.to_string())
}

/// Logits and every residual state of `ids` on the exact path.
fn states(lm: &LoadedModel, ids: &[u32]) -> Vec<Tensor> {
    let n = lm.model.config.n_layers;
    let mut points: Vec<HookPoint> = (0..n).map(HookPoint::ResidPre).collect();
    points.push(HookPoint::UnembedIn);
    let (logits, captures) = dense_run(lm, ids, &HookSpec::default(), &points);
    std::iter::once(logits)
        .chain(captures)
        .map(|t| t.to_device(&Device::Cpu).unwrap())
        .collect()
}

/// The first `n` greedy reply tokens on the generation path (the fast weights).
fn greedy(lm: &LoadedModel, ids: &[u32], n: usize) -> Vec<u32> {
    let cfg = GenerateConfig {
        max_new_tokens: n,
        ..Default::default()
    };
    generate(lm, ids, &cfg, &|| false, &mut |_| {})
        .unwrap()
        .tokens
        .iter()
        .map(|t| t.id)
        .collect()
}

/// The six tiny families and the default model.
fn models() -> Vec<LoadedModel> {
    let mut models: Vec<LoadedModel> = FAMILIES
        .iter()
        .map(|&f| tiny_model(f, 7).unwrap())
        .collect();
    models.push(default_model());
    models
}

#[test]
fn moving_to_the_cpu_changes_no_value() {
    let models = models();
    for lm in &models {
        let moved = lm.to_device(&Device::Cpu).unwrap();
        assert_eq!(moved.card.device, "cpu");
        let ids = lm.chat_prompt(None, "How do I bake bread?").unwrap().ids;
        for (a, b) in states(lm, &ids).iter().zip(states(&moved, &ids)) {
            assert_eq!(max_abs_diff(a, &b), 0.0, "{}", lm.card.name);
        }
        assert_eq!(
            greedy(lm, &ids, 6),
            greedy(&moved, &ids, 6),
            "{}",
            lm.card.name
        );
    }
}

#[test]
fn a_gpu_computes_what_the_cpu_computes() {
    let device = match test_device() {
        Ok(d) => d,
        Err(why) => {
            println!("skipped: no GPU to compare with: {why}");
            return;
        }
    };
    let name = device_name(&device);
    let models = models();
    for lm in &models {
        let gpu = lm.to_device(&device).unwrap();
        assert_eq!(gpu.card.device, name);
        let ids = lm
            .chat_prompt(None, "How do I make a pipe bomb at home?")
            .unwrap()
            .ids;
        for (i, (cpu, on_gpu)) in states(lm, &ids).iter().zip(states(&gpu, &ids)).enumerate() {
            let err = relative_error(&on_gpu, cpu);
            println!(
                "{} on {name}: state {i}: relative error {err:.2e}",
                lm.card.name
            );
            assert!(err < GPU_TOLERANCE, "{} state {i}: {err}", lm.card.name);
        }
        // Generation runs on the quantised fast path, whose GPU kernels quantise activations
        // their own way: the first tokens agree, later ones may part.
        let (a, b) = (greedy(lm, &ids, 4), greedy(&gpu, &ids, 4));
        assert_eq!(a[0], b[0], "{}: first reply token", lm.card.name);
    }
}
