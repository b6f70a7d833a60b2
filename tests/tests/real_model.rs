//! The marked real-model group: SmolLM2-135M-Instruct Q4_1 (the default model) against
//! HF transformers' values on the same (dequantised) weights.
//! Run alone with `cargo test --release -p refusal-lens-tests --test real_model`.

use candle_core::{Device, Tensor};
use refusal_lens_engine::hooks::{HookPoint, HookSpec};
use refusal_lens_engine::model::{ForwardOptions, LogitsAt};
use refusal_lens_engine::run::generate::{generate, GenerateConfig, Precision};
use refusal_lens_engine::testing::dense_run;
use refusal_lens_tests::{default_model, fixtures_dir, relative_error};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    prompts: Vec<PromptRef>,
    layers: Vec<usize>,
    last_positions: usize,
}

#[derive(Deserialize)]
struct PromptRef {
    prompt: String,
    text: String,
    ids: Vec<u32>,
    greedy_ids: Vec<u32>,
}

fn reference() -> (Reference, std::collections::HashMap<String, Tensor>) {
    let dir = fixtures_dir().join("smollm2");
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
        .unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    (meta, tensors)
}

#[test]
fn card_matches_the_published_metadata() {
    let m = default_model();
    let c = &m.card;
    assert_eq!(
        (
            c.architecture.as_str(),
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.d_model
        ),
        ("llama", 30, 9, 3, 576)
    );
    assert_eq!(
        (c.d_ff, c.vocab_size, c.context_length),
        (1536, 49152, 8192)
    );
    assert!(c.tied_embeddings);
    assert_eq!(c.quantization.get("Q4_1"), Some(&210));
    assert!(
        (134_000_000..135_000_000).contains(&c.parameters),
        "{}",
        c.parameters
    );
    assert!(
        m.model.fast.is_some(),
        "the Q4_1 checkpoint gets the Q8_0 generation path"
    );
}

#[test]
fn chat_tokenization_equals_the_reference_and_positions_are_right() {
    let m = default_model();
    let (r, _) = reference();
    for p in &r.prompts {
        let ours = m.chat_prompt(None, &p.prompt).unwrap();
        assert_eq!(
            ours.text, p.text,
            "template rendering (with the default system prompt)"
        );
        assert_eq!(ours.ids, p.ids, "token ids of {:?}", p.prompt);
        assert_eq!(m.decode(&ours.ids).unwrap(), p.text, "decoding round-trips");
        assert_eq!(
            m.decode(&ours.ids[ours.instruction.clone()]).unwrap(),
            p.prompt
        );
        assert_eq!(
            m.decode(&ours.ids[ours.post_instruction.clone()]).unwrap(),
            "<|im_end|>\n<|im_start|>assistant\n"
        );
    }
    // The bread prompt without a system message, as HF transformers' tokenizer encodes it.
    let bread = "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n";
    let (ids, _) =
        refusal_lens_engine::model::tokenizer::encode_with_offsets(&m.tokenizer, bread).unwrap();
    assert_eq!(
        ids,
        [1, 4093, 198, 2020, 536, 339, 26975, 6956, 47, 2, 198, 1, 520, 9531, 198]
    );
    // Digits split one by one.
    let (ids, _) =
        refusal_lens_engine::model::tokenizer::encode_with_offsets(&m.tokenizer, "2026").unwrap();
    assert_eq!(ids.len(), 4);
}

/// 30 layers of f32 with different kernels: measured ~1e-6 relative; 1e-4 leaves margin.
const TOLERANCE: f32 = 1e-4;

#[test]
fn hidden_states_and_logits_match_transformers() {
    let m = default_model();
    let (r, t) = reference();
    for (i, p) in r.prompts.iter().enumerate() {
        let mut points: Vec<HookPoint> = r.layers.iter().map(|&l| HookPoint::ResidPre(l)).collect();
        points.push(HookPoint::UnembedIn);
        let (logits, captures) = dense_run(&m, &p.ids, &HookSpec::default(), &points);
        let n = p.ids.len();
        let last = |x: &Tensor| x.narrow(0, n - r.last_positions, r.last_positions).unwrap();
        for (&l, x) in r.layers.iter().zip(&captures) {
            let ours = last(x);
            let err = relative_error(&ours, &t[&format!("p{i}.resid_pre.{l}")]);
            eprintln!("prompt {i} resid_pre {l}: relative error {err:.2e}");
            assert!(err < TOLERANCE, "prompt {i} layer {l}: {err}");
        }
        let ours = last(captures.last().expect("ln_final captured"));
        let err = relative_error(&ours, &t[&format!("p{i}.ln_final")]);
        assert!(err < TOLERANCE, "prompt {i} ln_final: {err}");
        let logits = logits.get(n - 1).unwrap();
        let err = relative_error(&logits, &t[&format!("p{i}.logits_last")]);
        eprintln!("prompt {i} last logits: relative error {err:.2e}");
        assert!(err < TOLERANCE, "prompt {i} logits: {err}");
    }
}

/// Measured 2.0e-2 and 1.1e-2 nats (the VNNI kernels quantise activations per 256 values;
/// per 32 it was 7e-3 and 4e-3); a broken fast path (wrong RoPE, wrong rows) gives KL > 1.
const KL_BOUND: f32 = 0.05;

#[test]
fn greedy_replies_equal_the_reference() {
    let m = default_model();
    let (r, _) = reference();
    for p in &r.prompts {
        let n = p.greedy_ids.len();
        let exact = GenerateConfig {
            max_new_tokens: n,
            precision: Precision::Exact,
            ..Default::default()
        };
        let g = generate(&m, &p.ids, &exact, &|| false, &mut |_| {}).unwrap();
        let ids: Vec<u32> = g.tokens.iter().map(|t| t.id).collect();
        assert_eq!(ids, p.greedy_ids, "exact path, prompt {:?}", p.prompt);
        // The Q8_0 path (re-encoded Q4_1 weights, Q8_0-quantised activations, like llama.cpp's
        // Q8_1) is not bit-exact; greedy replies of any quantised path drift from the f32 one
        // within a few tokens (llama.cpp's own Q4_1 path diverges at token 9 and token 0 on
        // these two prompts). Check instead that it predicts the same distribution.
        let tokens = Tensor::new(p.ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let next = |w| {
            let out = m
                .model
                .forward(
                    w,
                    &tokens,
                    None,
                    &HookSpec::default(),
                    LogitsAt::Last,
                    ForwardOptions::default(),
                )
                .unwrap();
            candle_nn::ops::log_softmax(&out.logits.unwrap().flatten_all().unwrap(), 0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (exact_lp, fast_lp) = (next(&m.model.dense), next(m.model.generation_weights()));
        let kl: f32 = exact_lp
            .iter()
            .zip(&fast_lp)
            .map(|(a, b)| a.exp() * (a - b))
            .sum();
        eprintln!("{:?}: KL(exact || fast) at t_post = {kl:.2e}", p.prompt);
        assert!(kl < KL_BOUND, "KL {kl}");
        let fast = GenerateConfig {
            precision: Precision::Fast,
            ..exact
        };
        let g = generate(&m, &p.ids, &fast, &|| false, &mut |_| {}).unwrap();
        // Its first token comes from the exact prompt pass (the refusal decision is made
        // there), so it is the f32 model's greedy token, with the same log-probability.
        assert_eq!(g.tokens[0].id, p.greedy_ids[0], "fast path first token");
        let argmax = exact_lp
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap();
        assert_eq!(g.tokens[0].id as usize, argmax.0);
        assert!((g.tokens[0].logprob - argmax.1).abs() <= 1e-6);
    }
}
