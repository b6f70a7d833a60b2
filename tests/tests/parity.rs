//! Reference parity on tiny random checkpoints: logits, every hidden state and every per-layer
//! hook point must match HF transformers (fixtures written by tests/reference/make_fixtures.py).

use candle_core::{Device, Tensor};
use refusal_lens_engine::hooks::{HookPoint, HookSpec};
use refusal_lens_engine::model::FastPrecision;
use refusal_lens_engine::testing::dense_run;
use refusal_lens_engine::LoadedModel;
use refusal_lens_tests::{fixtures_dir, relative_error};

/// f32 through 2 layers with different summation orders: errors are ~1e-6 relative.
const TOLERANCE: f32 = 1e-4;

/// A tiny checkpoint, transformers' outputs on it (`expected.json`) and the input ids.
fn fixture(name: &str) -> (LoadedModel, serde_json::Value, Vec<u32>) {
    let dir = fixtures_dir().join(name);
    let m = LoadedModel::load(&dir, FastPrecision::Auto).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(expected["input_ids"].clone()).unwrap();
    (m, expected, ids)
}

fn check(name: &str) {
    let (m, expected, ids) = fixture(name);
    let n = m.model.config.n_layers;
    let mut points: Vec<HookPoint> = (0..n).map(HookPoint::ResidPre).collect();
    points.push(HookPoint::UnembedIn);
    let (logits, captures) = dense_run(&m, &ids, &HookSpec::default(), &points);
    let err = relative_error(&logits, &as_tensor(&expected["logits"]));
    assert!(err < TOLERANCE, "{name} logits: relative error {err}");
    for (l, (point, ours)) in points.iter().zip(&captures).enumerate() {
        let err = relative_error(ours, &as_tensor(&expected["hidden_states"][l]));
        assert!(err < TOLERANCE, "{name} {point}: relative error {err}");
    }
}

/// Every tensor of `hooks.safetensors` (named by TransformerLens' hook names) against our
/// capture of that point, all captured in one pass whose logits must still match.
fn check_hooks(name: &str) {
    let dir = fixtures_dir().join(name);
    let m = LoadedModel::load(&dir, FastPrecision::Auto).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(expected["input_ids"].clone()).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("hooks.safetensors"), &Device::Cpu).unwrap();
    let mut named: Vec<(HookPoint, Tensor)> = reference
        .into_iter()
        .map(|(n, t)| (n.parse::<HookPoint>().unwrap(), t.squeeze(0).unwrap()))
        .collect();
    named.sort_by_key(|(p, _)| *p);
    let n = m.model.config.n_layers;
    // Every kind of per-layer point at every layer, and ln_final.
    assert_eq!(named.len(), 11 * n + 1, "{name}: hook fixtures");
    let points: Vec<HookPoint> = named.iter().map(|(p, _)| *p).collect();
    let (logits, captures) = dense_run(&m, &ids, &HookSpec::default(), &points);
    let err = relative_error(&logits, &as_tensor(&expected["logits"]));
    assert!(
        err < TOLERANCE,
        "{name} logits with every hook captured: {err}"
    );
    for ((point, theirs), ours) in named.iter().zip(&captures) {
        assert_eq!(ours.dims(), theirs.dims(), "{name} {point}");
        // Masked scores are −∞ here and a large negative number in the fixture.
        let ours = ours.clamp(-1e30f32, f32::INFINITY).unwrap();
        let err = relative_error(&ours, theirs);
        assert!(err < TOLERANCE, "{name} {point}: relative error {err}");
    }
}

fn as_tensor(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<f32>> = serde_json::from_value(v.clone()).unwrap();
    Tensor::new(rows, &Device::Cpu).unwrap()
}

#[test]
fn tiny_llama_matches_transformers() {
    check("tiny_llama");
}

/// Llama 3.1's rotary scaling, read from the newer `rope_parameters` form of config.json.
#[test]
fn tiny_llama3_with_rope_scaling_matches_transformers() {
    check("tiny_llama3");
}

/// Qwen3: no q/k/v biases, an RMSNorm on every head's query and key before RoPE.
#[test]
fn tiny_qwen3_with_head_norms_matches_transformers() {
    check("tiny_qwen3");
}

/// Mistral: every query sees only the last 4 keys.
#[test]
fn tiny_mistral_with_a_sliding_window_matches_transformers() {
    check("tiny_mistral");
}

/// Phi-3: fused qkv_proj and gate_up_proj, split at load.
#[test]
fn tiny_phi3_with_fused_projections_matches_transformers() {
    check("tiny_phi3");
}

/// Gemma 2: GeGLU, `(1 + w)` sandwich norms, embeddings × √d, attention scores and logits
/// soft-capped (caps of 5 and 3, low enough to bend), scores scaled by
/// `query_pre_attn_scalar` = 24 ≠ d_h, local and global layers alternating.
#[test]
fn tiny_gemma2_matches_transformers() {
    check("tiny_gemma2");
}

/// Gemma 3: per-head q/k norms, five windowed layers of six with their own rotary base, the
/// global layer's rotary linearly scaled.
#[test]
fn tiny_gemma3_matches_transformers() {
    check("tiny_gemma3");
}

#[test]
fn every_hook_point_of_tiny_llama_matches_transformers() {
    check_hooks("tiny_llama");
}

#[test]
fn every_hook_point_of_tiny_qwen2_matches_transformers() {
    check_hooks("tiny_qwen2");
}

#[test]
fn tiny_qwen2_with_biases_matches_transformers() {
    check("tiny_qwen2");
}
