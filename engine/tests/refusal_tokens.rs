//! Refusal tokens on tiny random models: vocabulary extension, the calibrated gate, training
//! and adapters.

use candle_core::{DType, IndexOp, Tensor};
use refusal_lens_engine::hooks::{HookSpec, Intervention};
use refusal_lens_engine::model::config::Family;
use refusal_lens_engine::organism::{train_refusal_tokens, Adapter, TrainOptions};
use refusal_lens_engine::refusal::{calibrate_gate, first_token_probabilities, RefusalGate};
use refusal_lens_engine::run::generate::{generate, GenerateConfig};

use refusal_lens_engine::data::prompts::{Label, PromptRecord};
use refusal_lens_engine::refusal::{GateGoal, RefusalSignal, REFUSE_TOKEN, RESPOND_TOKEN};
use refusal_lens_engine::testing::dense_logits as logits;
use refusal_lens_engine::testing::{max_abs_diff, tiny_model};
use refusal_lens_engine::LoadedModel;

fn rows(m: &LoadedModel, seed: f64) -> Tensor {
    let d = m.model.config.d_model;
    Tensor::arange(0f32, 2.0 * d as f32, m.model.device())
        .unwrap()
        .affine(0.01, seed)
        .unwrap()
        .sin()
        .unwrap()
        .reshape((2, d))
        .unwrap()
}

#[test]
fn extending_the_vocabulary_keeps_old_tokens_and_their_logits() {
    for family in [Family::Llama, Family::Qwen2] {
        let base = tiny_model(family, 21).unwrap();
        let ids = [257u32, 72, 105, 258, 10];
        let before = logits(&base, &ids);
        let mut m = base.clone();
        let new = m
            .add_tokens(&[REFUSE_TOKEN, RESPOND_TOKEN], &rows(&base, 0.3))
            .unwrap();
        assert_eq!(new, vec![259, 260]);
        assert_eq!(m.model.config.vocab_size, 261);
        let after = logits(&m, &ids);
        let old = after.narrow(2, 0, 259).unwrap();
        let diff = max_abs_diff(&old, &before);
        assert!(diff < 1e-5, "{family:?}: old logits moved by {diff}");
        // The new tokens are single ids, round-trip, and their logit is h · row.
        let enc = m.tokenizer.encode("[refuse] hi", false).unwrap();
        assert_eq!(enc.get_ids()[0], 259);
        assert_eq!(m.decode(&[260]).unwrap(), "[respond]");
        assert!(after
            .i((0, 4, 259))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .is_finite());
        // The base model is untouched.
        assert_eq!(base.model.config.vocab_size, 259);
        assert!(base.tokenizer.token_to_id(REFUSE_TOKEN).is_none());
        assert!(
            m.add_tokens(&[REFUSE_TOKEN], &rows(&base, 0.1).narrow(0, 0, 1).unwrap())
                .is_err(),
            "no duplicates"
        );
    }
}

#[test]
fn the_gate_emits_refusal_tokens_only_first_and_by_threshold() {
    let mut m = tiny_model(Family::Llama, 22).unwrap();
    m.add_tokens(&[REFUSE_TOKEN, RESPOND_TOKEN], &rows(&m, 0.7))
        .unwrap();
    let prompt = m.chat_prompt(None, "hello").unwrap();
    let (refuse, respond) = (259, 260);
    // Bias both tokens up so only the gate's ban keeps them out after the first position.
    let hooks = HookSpec::with_interventions(vec![Intervention::LogitBias {
        token_ids: vec![refuse, respond],
        bias: 50.0,
    }]);
    for (tau, want) in [(0.0, refuse), (1.01, respond)] {
        let cfg = GenerateConfig {
            max_new_tokens: 6,
            hooks: hooks.clone(),
            refusal_gate: RefusalGate::for_model(&m, tau),
            ..Default::default()
        };
        let g = generate(&m, &prompt.ids, &cfg, &|| false, &mut |_| {}).unwrap();
        assert_eq!(g.tokens[0].id, want, "tau {tau}");
        assert!(g.tokens[1..]
            .iter()
            .all(|t| t.id != refuse && t.id != respond));
        let p = g.refusal_probability.unwrap();
        assert!((0.0..=1.0).contains(&p));
    }
    // The probability the gate reads is the calibration signal.
    assert!(matches!(
        RefusalSignal::for_model(&m).unwrap(),
        RefusalSignal::Tokens {
            refuse: 259,
            respond: 260
        }
    ));
    let p = first_token_probabilities(&m, &["hello"], &|| false, &mut |_, _| {}).unwrap()[0];
    let cfg = GenerateConfig {
        max_new_tokens: 1,
        refusal_gate: RefusalGate::for_model(&m, 0.5),
        ..Default::default()
    };
    let g = generate(&m, &prompt.ids, &cfg, &|| false, &mut |_| {}).unwrap();
    assert!((g.refusal_probability.unwrap() - p).abs() < 1e-5);
}

fn record(prompt: &str, label: Label) -> PromptRecord {
    PromptRecord {
        id: prompt.into(),
        prompt: prompt.into(),
        label: Some(label),
        category: None,
        pair_id: None,
        split: None,
    }
}

#[test]
fn training_separates_the_training_prompts_and_adapters_round_trip() {
    let base = tiny_model(Family::Qwen2, 23).unwrap();
    let train: Vec<PromptRecord> = (0..12)
        .map(|i| {
            record(
                &format!(
                    "{} number {i}",
                    if i % 2 == 0 {
                        "bad bad bad"
                    } else {
                        "nice day"
                    }
                ),
                if i % 2 == 0 {
                    Label::Harmful
                } else {
                    Label::Harmless
                },
            )
        })
        .collect();
    let opts = TrainOptions {
        row_steps: 400,
        row_lr: 0.05,
        epochs: 0,
        ..Default::default()
    };
    let mut phases = Vec::new();
    let adapter = train_refusal_tokens(&base, &train, &opts, &|| false, &mut |p| {
        phases.push(p.phase.clone())
    })
    .unwrap();
    assert!(phases.iter().any(|p| p.contains("fitting")));
    let losses = &adapter.meta.losses;
    assert!(
        losses.last().unwrap() < &(losses[0] * 0.5),
        "loss {} → {}",
        losses[0],
        losses.last().unwrap()
    );
    let organism = adapter.apply(&base).unwrap();
    let prompts: Vec<&str> = train.iter().map(|r| r.prompt.as_str()).collect();
    let ps = first_token_probabilities(&organism, &prompts, &|| false, &mut |_, _| {}).unwrap();
    for (r, p) in train.iter().zip(&ps) {
        assert_eq!(
            *p >= 0.5,
            r.label == Some(Label::Harmful),
            "{}: {p}",
            r.prompt
        );
    }
    // Calibrated on the (here: training) prompts, τ separates them as well, and the adapter
    // carries it to the model it is applied to.
    let goal = GateGoal::default();
    let calibrated_tau = calibrate_gate(&organism, &train, goal, &|| false)
        .unwrap()
        .unwrap();
    // Separable prompts keep any budget, so the budgets chose τ.
    assert_eq!(calibrated_tau.goal, goal);
    let tau = calibrated_tau.tau;
    assert_eq!(
        calibrate_gate(&organism, &train[..1], goal, &|| false).unwrap(),
        None
    );
    for (r, p) in train.iter().zip(&ps) {
        assert_eq!(*p >= tau, r.label == Some(Label::Harmful), "τ {tau}: {p}");
    }
    assert_eq!(organism.refusal_tau(), 0.5, "uncalibrated");
    let mut adapter = adapter;
    let calibrated = adapter
        .apply_calibrated(&base, &train, goal, &|| false)
        .unwrap();
    assert_eq!(
        (
            adapter.meta.tau,
            adapter.meta.tau_goal,
            calibrated.refusal_tau()
        ),
        (Some(tau), Some(goal), tau)
    );
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path()).unwrap();
    let again = Adapter::load(dir.path()).unwrap();
    assert_eq!(
        (again.meta.tau, again.meta.tau_goal),
        (Some(tau), Some(goal))
    );
    assert_eq!(again.apply(&base).unwrap().refusal_tau(), tau);
    assert_eq!(again.meta.tokens, vec!["[refuse]", "[respond]"]);
    let diff = max_abs_diff(&again.rows.to_dtype(DType::F32).unwrap(), &adapter.rows);
    assert_eq!(diff, 0.0);
    // Retraining on the same data with the same seed gives the same rows.
    let twice = train_refusal_tokens(&base, &train, &opts, &|| false, &mut |_| {}).unwrap();
    assert_eq!(twice.meta.data_sha256, adapter.meta.data_sha256);
    let diff = max_abs_diff(&twice.rows, &adapter.rows);
    assert_eq!(diff, 0.0);
    // Training twice on a model that already has the tokens is refused.
    assert!(train_refusal_tokens(&organism, &train, &opts, &|| false, &mut |_| {}).is_err());
}

#[test]
fn lora_training_lowers_the_loss_and_its_merge_is_what_was_trained() {
    let base = tiny_model(Family::Llama, 24).unwrap();
    let train: Vec<PromptRecord> = (0..8)
        .map(|i| {
            record(
                &format!("{} {i}", if i % 2 == 0 { "bad" } else { "good" }),
                if i % 2 == 0 {
                    Label::Harmful
                } else {
                    Label::Harmless
                },
            )
        })
        .collect();
    let opts = TrainOptions {
        row_steps: 50,
        epochs: 6,
        batch: 4,
        lr: 5e-3,
        warmup_steps: 2,
        reply_tokens: 6,
        ..Default::default()
    };
    let mut phases = std::collections::BTreeSet::new();
    let adapter = train_refusal_tokens(&base, &train, &opts, &|| false, &mut |p| {
        phases.insert(p.phase.clone());
    })
    .unwrap();
    assert!(
        phases.contains("training LoRA") && phases.contains("writing training replies"),
        "{phases:?}"
    );
    let l = &adapter.meta.lora_losses;
    assert_eq!(l.len(), 12);
    let (first, last) = (
        l[..2].iter().sum::<f32>(),
        l[l.len() - 2..].iter().sum::<f32>(),
    );
    assert!(last < first * 0.8, "LoRA loss {l:?}");
    assert_eq!(
        adapter.lora.len(),
        2 * 4 * 2,
        "A and B for q, k, v, o in 2 layers"
    );
    // B starts at zero, so a trained B is non-zero.
    let b = &adapter.lora["blocks.1.attn.v.lora_b"];
    assert!(
        b.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    // Saved and reloaded, the adapter merges into the same model.
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path()).unwrap();
    let reloaded = Adapter::load(dir.path()).unwrap();
    for (k, v) in &adapter.lora {
        let d = max_abs_diff(v, &reloaded.lora[k]);
        assert_eq!(d, 0.0, "{k}");
    }
    let d = max_abs_diff(&adapter.rows, &reloaded.rows);
    assert_eq!(d, 0.0, "rows");
    let (a, b) = (
        adapter.apply(&base).unwrap(),
        reloaded.apply(&base).unwrap(),
    );
    let ids = [257u32, 98, 97, 100, 258, 10, 259];
    let diff = max_abs_diff(&logits(&a, &ids), &logits(&b, &ids));
    assert_eq!(diff, 0.0);
    // The merge changed q/k/v/o: the organism differs from the base on old tokens too.
    let moved = max_abs_diff(
        &logits(&a, &ids[..6]).narrow(2, 0, 259).unwrap(),
        &logits(&base, &ids[..6]),
    );
    assert!(moved > 0.0);
}

#[test]
fn the_opener_bias_moves_only_the_first_reply_token() {
    let m = tiny_model(Family::Qwen2, 25).unwrap();
    let prompt = m.chat_prompt(None, "hello there").unwrap();
    let exact = refusal_lens_engine::run::generate::Precision::Exact;
    let cfg = GenerateConfig {
        max_new_tokens: 6,
        precision: exact,
        first_token_bias: Some((vec![65], 100.0)),
        ..Default::default()
    };
    let biased = generate(&m, &prompt.ids, &cfg, &|| false, &mut |_| {}).unwrap();
    assert_eq!(biased.tokens[0].id, 65);
    // The rest is the unbiased continuation of prompt + that token.
    let mut ids = prompt.ids.clone();
    ids.push(65);
    let plain = GenerateConfig {
        max_new_tokens: 5,
        precision: exact,
        ..Default::default()
    };
    let rest = generate(&m, &ids, &plain, &|| false, &mut |_| {}).unwrap();
    let got: Vec<u32> = biased.tokens[1..].iter().map(|t| t.id).collect();
    let want: Vec<u32> = rest.tokens.iter().map(|t| t.id).collect();
    assert_eq!(got, want);
}

/// With respond blocks (an adapter's base model), a `[respond]` reply is the respond blocks'
/// own reply to the bare prompt and a `[refuse]` reply continues on the model's blocks, in
/// `generate` and in the batched `greedy_replies` alike.
#[test]
fn after_respond_the_respond_blocks_write_the_answer() {
    use refusal_lens_engine::model::RespondBlocks;
    use refusal_lens_engine::run::generate::{greedy_replies, Precision};
    let other = tiny_model(Family::Llama, 24).unwrap();
    let mut m = tiny_model(Family::Llama, 23).unwrap();
    m.add_tokens(&[REFUSE_TOKEN, RESPOND_TOKEN], &rows(&m, 0.3))
        .unwrap();
    m.respond_blocks = Some(RespondBlocks {
        dense: other.model.dense.blocks.clone(),
        fast: None,
    });
    // The other blocks with this model's vocabulary: what writes the answers.
    let mut writer = m.clone();
    writer.model.dense.blocks = other.model.dense.blocks.clone();
    writer.respond_blocks = None;
    let prompts = ["hello", "how are you", "tell me", "a b c d"];
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| m.chat_prompt(None, p).unwrap().ids)
        .collect();
    for tau in [0.0, 1.01] {
        let gate = RefusalGate::for_model(&m, tau);
        let batched = greedy_replies(&m, &ids, 6, gate, &|| false, &mut |_, _| {}).unwrap();
        for (prompt, g) in ids.iter().zip(&batched) {
            let cfg = GenerateConfig {
                max_new_tokens: 6,
                precision: Precision::Exact,
                refusal_gate: gate,
                ..Default::default()
            };
            let one = generate(&m, prompt, &cfg, &|| false, &mut |_| {}).unwrap();
            let tokens = |g: &refusal_lens_engine::run::generate::Generation| {
                g.tokens.iter().map(|t| t.id).collect::<Vec<_>>()
            };
            assert_eq!(tokens(&one), tokens(g), "tau {tau}");
            let rest = &tokens(g)[1..];
            // The continuation without a gate token, from the bare prompt (respond) or after
            // the [refuse] token (refuse), on the weights that write it.
            let (model, context) = if tau > 1.0 {
                (&writer, prompt.clone())
            } else {
                (&m, [prompt.as_slice(), &[259]].concat())
            };
            let cfg = GenerateConfig {
                max_new_tokens: 5,
                precision: Precision::Exact,
                hooks: HookSpec::with_interventions(vec![Intervention::LogitBias {
                    token_ids: vec![259, 260],
                    bias: -1e9,
                }]),
                ..Default::default()
            };
            let own = generate(model, &context, &cfg, &|| false, &mut |_| {}).unwrap();
            assert_eq!(rest, tokens(&own).as_slice(), "tau {tau}");
        }
        let want = if tau > 1.0 { 260 } else { 259 };
        assert!(batched.iter().all(|g| g.tokens[0].id == want));
    }
}

/// A store of prompt passes that counts what it was asked for and handed.
#[derive(Default)]
struct Kept {
    passes: std::collections::HashMap<
        refusal_lens_engine::run::generate::PassKind,
        refusal_lens_engine::run::generate::PromptPass,
    >,
    hits: usize,
    puts: usize,
}

impl refusal_lens_engine::run::generate::PromptPasses for Kept {
    fn get(
        &mut self,
        kind: refusal_lens_engine::run::generate::PassKind,
    ) -> Option<refusal_lens_engine::run::generate::PromptPass> {
        let p = self.passes.get(&kind).cloned();
        self.hits += p.is_some() as usize;
        p
    }
    fn put(
        &mut self,
        kind: refusal_lens_engine::run::generate::PassKind,
        pass: &refusal_lens_engine::run::generate::PromptPass,
    ) {
        self.puts += 1;
        self.passes.insert(kind, pass.clone());
    }
}

/// A reply that reuses its prompt passes (the model's and, after `[respond]`, the respond
/// blocks') is the reply that computes them: same tokens, log-probabilities and `P(R)`, with
/// steering hooks and sampling; and later replies leave the kept passes as they were.
#[test]
fn a_reply_from_kept_prompt_passes_is_the_reply_that_computes_them() {
    use refusal_lens_engine::model::RespondBlocks;
    use refusal_lens_engine::run::generate::{generate_with, Sampling};
    let other = tiny_model(Family::Llama, 26).unwrap();
    let mut m = tiny_model(Family::Llama, 25).unwrap();
    m.add_tokens(&[REFUSE_TOKEN, RESPOND_TOKEN], &rows(&m, 0.5))
        .unwrap();
    m.respond_blocks = Some(RespondBlocks {
        dense: other.model.dense.blocks.clone(),
        fast: None,
    });
    let prompt = m.chat_prompt(None, "how are you").unwrap();
    let d = m.model.config.d_model;
    let steer = HookSpec::with_interventions(vec![Intervention::AddVector {
        point: refusal_lens_engine::hooks::HookPoint::ResidPre(1),
        vector: Tensor::ones(d, DType::F32, m.model.device()).unwrap(),
        scale: 0.3,
        positions: refusal_lens_engine::hooks::Positions::All,
    }]);
    for (tau, passes_wanted) in [(0.0, 1), (1.01, 2)] {
        let cfg = GenerateConfig {
            max_new_tokens: 7,
            hooks: steer.clone(),
            sampling: Sampling {
                temperature: 0.8,
                top_p: 0.9,
                seed: 3,
            },
            refusal_gate: RefusalGate::for_model(&m, tau),
            ..Default::default()
        };
        let fresh = generate(&m, &prompt.ids, &cfg, &|| false, &mut |_| {}).unwrap();
        let mut kept = Kept::default();
        let first =
            generate_with(&m, &prompt.ids, &cfg, &mut kept, &|| false, &mut |_| {}).unwrap();
        assert_eq!((kept.hits, kept.puts), (0, passes_wanted), "tau {tau}");
        for _ in 0..2 {
            let again =
                generate_with(&m, &prompt.ids, &cfg, &mut kept, &|| false, &mut |_| {}).unwrap();
            for g in [&first, &again] {
                assert_eq!(g.tokens, fresh.tokens, "tau {tau}");
                assert_eq!(g.refusal_probability, fresh.refusal_probability);
            }
        }
        assert_eq!((kept.hits, kept.puts), (2 * passes_wanted, passes_wanted));
    }
}
