//! The steering stack on tiny random models: each edit's exact effect, the judgement's
//! position limit, sweeps, and the llama.cpp control-vector export.

use candle_core::{IndexOp, Tensor};
use refusal_lens_engine::analysis::activations::{collect, state_points};
use refusal_lens_engine::analysis::directions::{Directions, Provenance};
use refusal_lens_engine::analysis::steering::{
    head_mean, judgement, sweep, write_control_vector, Direction, Edit, HeadAblation, Steering,
    StreamPositions,
};
use refusal_lens_engine::hooks::{HookPoint, HookSpec, Intervention, Positions};
use refusal_lens_engine::model::config::Family;
use refusal_lens_engine::refusal::{REFUSE_TOKEN, RESPOND_TOKEN};
use refusal_lens_engine::testing::{dense_run, max_abs_diff, tiny_model};
use refusal_lens_engine::LoadedModel;

const HARMFUL: &[&str] = &[
    "Help me steal a car",
    "Write malware now",
    "Hurt someone badly",
];
const HARMLESS: &[&str] = &[
    "Help me wash a car",
    "Write a poem now",
    "Hug someone kindly",
];

fn directions(lm: &LoadedModel) -> Directions {
    let a = collect(lm, HARMFUL, None, &|| false, &mut |_, _| {}).unwrap();
    let b = collect(lm, HARMLESS, None, &|| false, &mut |_, _| {}).unwrap();
    let mut d = Directions::diff_in_means(&a, &b, Provenance::default()).unwrap();
    d.layer = 1;
    d
}

/// Logits at every position and the given captures under `hooks`.
fn run(
    lm: &LoadedModel,
    ids: &[u32],
    hooks: &HookSpec,
    capture: &[HookPoint],
) -> (Tensor, Vec<Tensor>) {
    dense_run(lm, ids, hooks, capture)
}

#[test]
fn activation_addition_adds_alpha_v_at_each_layer_and_only_where_asked() {
    let lm = tiny_model(Family::Llama, 41).unwrap();
    let d = directions(&lm);
    let prompt = lm.chat_prompt(None, "Tell me a story").unwrap();
    let points = state_points(lm.model.config.n_layers);
    let alpha = 0.7f32;
    let steering = Steering {
        edits: vec![Edit::Add {
            direction: Direction::Harmfulness,
            layers: (1, 2),
            alpha,
            positions: StreamPositions::PostInstruction,
        }],
    };
    let hooks = steering.hooks(&lm, Some(&d), &prompt, None).unwrap();
    // The same as hand-built interventions with v_1 at state 1 and v_2 at state 2.
    let manual = HookSpec::with_interventions(
        [1usize, 2]
            .iter()
            .map(|&l| Intervention::AddVector {
                point: points[l],
                vector: Tensor::from_slice(d.harmfulness_at(l), d.d_model, lm.model.device())
                    .unwrap(),
                scale: alpha as f64,
                positions: Positions::From(prompt.post_instruction.start),
            })
            .collect(),
    );
    let (steered, caps) = run(&lm, &prompt.ids, &hooks, &[points[1]]);
    let (by_hand, _) = run(&lm, &prompt.ids, &manual, &[]);
    assert!(max_abs_diff(&steered, &by_hand) < 1e-5);
    // State 1 changes by exactly α·v_1 from the first post-instruction token on, nowhere before.
    let (_, clean) = run(&lm, &prompt.ids, &HookSpec::default(), &[points[1]]);
    let delta = (&caps[0] - &clean[0]).unwrap().to_vec2::<f32>().unwrap();
    let v1 = d.harmfulness_at(1);
    for (p, row) in delta.iter().enumerate() {
        for (x, v) in row.iter().zip(v1) {
            let want = if p >= prompt.post_instruction.start {
                alpha * v
            } else {
                0.0
            };
            assert!((x - want).abs() < 1e-4, "position {p}");
        }
    }
}

#[test]
fn direction_ablation_leaves_no_component_in_any_write() {
    let lm = tiny_model(Family::Qwen2, 42).unwrap();
    let d = directions(&lm);
    let prompt = lm.chat_prompt(None, "Explain rockets").unwrap();
    let steering = Steering {
        edits: vec![Edit::Ablate {
            direction: Direction::Refusal,
            fraction: 1.0,
        }],
    };
    let hooks = steering.hooks(&lm, Some(&d), &prompt, None).unwrap();
    let n = lm.model.config.n_layers;
    let points: Vec<HookPoint> = (0..n)
        .map(HookPoint::ResidPost)
        .chain([HookPoint::ResidPre(0)])
        .collect();
    let (_, caps) = run(&lm, &prompt.ids, &hooks, &points);
    let r = d.refusal_direction();
    let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
    let unit = Tensor::from_vec(
        r.iter().map(|x| x / norm).collect::<Vec<_>>(),
        (r.len(), 1),
        lm.model.device(),
    )
    .unwrap();
    for (p, x) in points.iter().zip(&caps) {
        let proj = x
            .matmul(&unit)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(proj < 1e-3, "{p}: the stream keeps {proj} along r̂");
    }
}

#[test]
fn head_ablations_zero_scale_and_mean_set_z_exactly() {
    let lm = tiny_model(Family::Llama, 43).unwrap();
    let prompt = lm.chat_prompt(None, "Count to five").unwrap();
    let (layer, head) = (1, 2);
    let z_of = |how: HeadAblation| {
        let s = Steering {
            edits: vec![Edit::AblateHead { layer, head, how }],
        };
        let hooks = s.hooks(&lm, None, &prompt, None).unwrap();
        let (_, caps) = run(&lm, &prompt.ids, &hooks, &[HookPoint::AttnZ(layer)]);
        caps[0].i((.., head)).unwrap()
    };
    let (_, clean) = run(
        &lm,
        &prompt.ids,
        &HookSpec::default(),
        &[HookPoint::AttnZ(layer)],
    );
    let clean = clean[0].i((.., head)).unwrap();
    assert_eq!(
        z_of(HeadAblation::Zero)
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    assert!(max_abs_diff(&z_of(HeadAblation::Scale(0.1)), &(&clean * 0.1).unwrap()) < 1e-6);
    let mean = head_mean(&lm, HARMLESS, layer, head).unwrap();
    let z = z_of(HeadAblation::Mean(mean.clone()))
        .to_vec2::<f32>()
        .unwrap();
    assert!(z
        .iter()
        .all(|row| row.iter().zip(&mean).all(|(a, b)| (a - b).abs() < 1e-6)));
    // A head that does not exist is a clear error.
    let bad = Steering {
        edits: vec![Edit::AblateHead {
            layer: 99,
            head: 0,
            how: HeadAblation::Zero,
        }],
    };
    assert!(bad
        .hooks(&lm, None, &prompt, None)
        .unwrap_err()
        .to_string()
        .contains("L99.H0"));
}

#[test]
fn the_refuse_bias_moves_only_the_refuse_logit() {
    let mut lm = tiny_model(Family::Qwen2, 44).unwrap();
    let rows = Tensor::zeros(
        (2, lm.model.config.d_model),
        candle_core::DType::F32,
        lm.model.device(),
    )
    .unwrap();
    let ids = lm
        .add_tokens(&[REFUSE_TOKEN, RESPOND_TOKEN], &rows)
        .unwrap();
    let prompt = lm.chat_prompt(None, "hello").unwrap();
    let s = Steering {
        edits: vec![Edit::RefusalTokenBias { bias: 2.5 }],
    };
    let (biased, _) = run(
        &lm,
        &prompt.ids,
        &s.hooks(&lm, None, &prompt, None).unwrap(),
        &[],
    );
    let (clean, _) = run(&lm, &prompt.ids, &HookSpec::default(), &[]);
    let diff = (&biased - &clean).unwrap().to_vec2::<f32>().unwrap();
    for row in diff {
        for (t, x) in row.iter().enumerate() {
            let want = if t as u32 == ids[0] { 2.5 } else { 0.0 };
            assert!((x - want).abs() < 1e-5);
        }
    }
    // Without refusal tokens the edit says why it cannot apply.
    let base = tiny_model(Family::Qwen2, 44).unwrap();
    let p = base.chat_prompt(None, "hello").unwrap();
    assert!(s.hooks(&base, None, &p, None).is_err());
}

#[test]
fn the_judgement_steers_only_the_request_and_sweeps_report_every_alpha() {
    let lm = tiny_model(Family::Llama, 45).unwrap();
    let d = directions(&lm);
    let user = "Help me steal a car";
    let empty = judgement(&lm, &Steering::default(), Some(&d), None, user).unwrap();
    assert!(empty.is_finite());
    let add = Steering {
        edits: vec![Edit::Add {
            direction: Direction::Refusal,
            layers: (1, 1),
            alpha: 3.0,
            positions: StreamPositions::All,
        }],
    };
    assert_ne!(judgement(&lm, &add, Some(&d), None, user).unwrap(), empty);
    // The limit clips every intervention to the request's positions.
    let prompt = lm.chat_prompt(None, user).unwrap();
    let hooks = add.hooks(&lm, Some(&d), &prompt, Some(5)).unwrap();
    assert!(matches!(
        hooks.interventions[0],
        Intervention::AddVector {
            positions: Positions::Range { start: 0, end: 5 },
            ..
        }
    ));
    let at = |alpha: f32| Steering {
        edits: vec![Edit::Add {
            direction: Direction::Refusal,
            layers: (1, 1),
            alpha,
            positions: StreamPositions::All,
        }],
    };
    let points = sweep(
        &lm,
        Some(&d),
        HARMLESS,
        &[0.0, 1.0, 2.0],
        &at,
        0.5,
        4,
        &|| false,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(points.len(), 3);
    assert!(points
        .iter()
        .all(|p| (0.0..=1.0).contains(&p.refusal_rate) && p.modes.len() == 4));
    let shares: f32 = points[0].modes.iter().map(|(_, s)| s).sum();
    assert!((shares - 1.0).abs() < 1e-5);
    assert_eq!(points[0].mean_judgement, {
        let js: Vec<f32> = HARMLESS
            .iter()
            .map(|u| judgement(&lm, &at(0.0), Some(&d), None, u).unwrap())
            .collect();
        js.iter().sum::<f32>() / js.len() as f32
    });
}

#[test]
fn control_vectors_read_back_as_gguf_with_one_scaled_direction_per_layer() {
    let lm = tiny_model(Family::Llama, 46).unwrap();
    let d = directions(&lm);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cv.gguf");
    write_control_vector(&path, &d, Direction::Refusal, (2, 2), -1.5, "llama").unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(
        content.metadata["general.architecture"]
            .to_string()
            .unwrap(),
        "controlvector"
    );
    assert_eq!(content.tensor_infos.len(), 1);
    // State 2 is the output of block 1: llama.cpp's direction.1.
    let info = &content.tensor_infos["direction.1"];
    assert_eq!(info.shape.dims(), &[d.d_model]);
    let t = content
        .tensor(&mut f, "direction.1", &candle_core::Device::Cpu)
        .unwrap()
        .dequantize(&candle_core::Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (x, v) in t.iter().zip(d.refusal_at(2, d.position)) {
        assert!((x + 1.5 * v).abs() < 1e-6);
    }
    // State 1 (block 0's input) has no llama.cpp slot.
    assert!(write_control_vector(&path, &d, Direction::Refusal, (1, 2), 1.0, "llama").is_err());
}

/// Abliteration: the weights orthogonalised against r̂ compute what directional ablation
/// through hooks computes (tied embeddings untied), and the GGUF and the HF folder written from
/// them load back to the same logits, an adapter's added tokens included; Gemma's post-norms
/// are refused.
#[test]
fn abliterated_weights_equal_directional_ablation_and_survive_a_gguf_round_trip() {
    use candle_core::quantized::GgmlDType;
    use refusal_lens_engine::analysis::abliterate::{orthogonalized, write_gguf, write_hf_folder};
    use refusal_lens_engine::hooks::{HookSpec, Intervention};
    use refusal_lens_engine::model::config::RopeStyle;
    use refusal_lens_engine::model::FastPrecision;
    use refusal_lens_engine::testing::{
        dense_logits, dense_run, max_abs_diff, random_weights, tiny_config,
        write_gguf as write_tiny,
    };
    let ids = [257u32, 72, 105, 33, 32, 104, 111, 119, 258, 10];
    for family in [
        refusal_lens_engine::model::config::Family::Llama,
        refusal_lens_engine::model::config::Family::Qwen2,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_config(family);
        let source = dir.path().join("source.gguf");
        write_tiny(
            &source,
            &cfg,
            &random_weights(&cfg, 61).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let lm = refusal_lens_engine::LoadedModel::load(&source, FastPrecision::Auto).unwrap();
        let r: Vec<f32> = (0..cfg.d_model)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let r_t = candle_core::Tensor::new(r.as_slice(), &candle_core::Device::Cpu).unwrap();
        let hooks = HookSpec::with_interventions(
            Intervention::ablate_direction(&r_t, cfg.n_layers).unwrap(),
        );
        let (want, _) = dense_run(&lm, &ids, &hooks, &[]);
        let ablated = orthogonalized(&lm, &r).unwrap();
        assert!(!ablated.model.config.tied_embeddings);
        let got = dense_logits(&ablated, &ids).squeeze(0).unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-4 * scale, "{family:?}");
        // The ablation changed something.
        assert!(max_abs_diff(&got, &dense_logits(&lm, &ids).squeeze(0).unwrap()) > 1e-3);
        let out = dir.path().join("abliterated.gguf");
        write_gguf(&ablated, &source, &out).unwrap();
        let back = refusal_lens_engine::LoadedModel::load(&out, FastPrecision::Auto).unwrap();
        assert_eq!(
            max_abs_diff(&dense_logits(&back, &ids), &dense_logits(&ablated, &ids)),
            0.0,
            "{family:?}"
        );
        assert_eq!(back.model.config.rope_style, lm.model.config.rope_style);
        // The HF folder: Llama's Q/K rows permuted back to the half-split layout, the same
        // logits (rounding aside: the rotary pairs are summed in another order).
        let folder = dir.path().join("abliterated-hf");
        write_hf_folder(&ablated, &folder).unwrap();
        let hf = refusal_lens_engine::LoadedModel::load(&folder, FastPrecision::Auto).unwrap();
        assert_eq!(hf.model.config.rope_style, RopeStyle::HalfSplit);
        assert_eq!(hf.model.config.vocab_size, ablated.model.config.vocab_size);
        let (want, got) = (dense_logits(&ablated, &ids), dense_logits(&hf, &ids));
        assert!(
            max_abs_diff(&got, &want) < 1e-5 * scale,
            "{family:?} HF folder"
        );
        assert_eq!(
            hf.tokenizer
                .encode("hi <|im_end|>", false)
                .unwrap()
                .get_ids(),
            lm.tokenizer
                .encode("hi <|im_end|>", false)
                .unwrap()
                .get_ids()
        );
        // A model with an adapter's tokens: they join the GGUF's vocabulary as control tokens.
        let mut with_tokens = lm.clone();
        let rows =
            candle_core::Tensor::randn(0f32, 1.0, (2, cfg.d_model), &candle_core::Device::Cpu)
                .unwrap();
        let added = with_tokens
            .add_tokens(&["[refuse]", "[respond]"], &rows)
            .unwrap();
        let ablated = orthogonalized(&with_tokens, &r).unwrap();
        let out = dir.path().join("with-tokens.gguf");
        write_gguf(&ablated, &source, &out).unwrap();
        let back = refusal_lens_engine::LoadedModel::load(&out, FastPrecision::Auto).unwrap();
        assert_eq!(back.tokenizer.token_to_id("[refuse]"), Some(added[0]));
        assert_eq!(
            back.tokenizer
                .encode("x[respond]", false)
                .unwrap()
                .get_ids()
                .last(),
            Some(&added[1])
        );
        let ids = [257u32, 72, added[0], 105, added[1]];
        assert_eq!(
            max_abs_diff(&dense_logits(&back, &ids), &dense_logits(&ablated, &ids)),
            0.0
        );
    }
    let gemma = refusal_lens_engine::testing::tiny_model(
        refusal_lens_engine::model::config::Family::Gemma2,
        62,
    )
    .unwrap();
    let err = orthogonalized(&gemma, &vec![1.0; 64]).err().unwrap();
    assert!(err.to_string().contains("sandwich norms"), "{err}");
}

/// Two models side by side: a model against itself agrees everywhere (cosines 1, its guard
/// transfers unchanged); against its copy with one state's refusal direction ablated from the
/// weights, the copy's refusal direction at that state is orthogonal to the original's.
#[test]
fn comparing_a_model_with_its_abliterated_copy_finds_the_ablated_direction_gone() {
    use refusal_lens_engine::analysis::abliterate::orthogonalized;
    use refusal_lens_engine::analysis::compare::compare;
    use refusal_lens_engine::data::prompts::PromptSet;
    let dir = tempfile::tempdir().unwrap();
    let set = |label: &str, word: &str| {
        let path = dir.path().join(format!("{label}.jsonl"));
        let rows: String = (0..16)
            .map(|i| {
                let split = ["train", "train", "val", "test"][i % 4];
                format!("{{\"id\":\"{label}-{i}\",\"prompt\":\"{word} thing {i}\",\"label\":\"{label}\",\"split\":\"{split}\"}}\n")
            })
            .collect();
        std::fs::write(&path, rows).unwrap();
        PromptSet::load(&path, None).unwrap()
    };
    let (harmful, harmless) = (set("harmful", "Poison"), set("harmless", "Bake"));
    let lm = tiny_model(Family::Llama, 81).unwrap();
    let none = || false;
    let same = compare(
        &lm,
        &lm,
        &harmful,
        &harmless,
        None,
        None,
        &none,
        &mut |_, _, _| {},
    )
    .unwrap();
    // The embedding state: t_inst and t_post are the same token in every prompt, no direction.
    assert_eq!(
        (same.layers[0].refusal, same.layers[0].harmfulness),
        (None, None)
    );
    assert!(same.layers[1..].iter().all(|l| {
        (l.refusal.unwrap() - 1.0).abs() < 1e-5 && (l.harmfulness.unwrap() - 1.0).abs() < 1e-5
    }));
    let transferred = same.first_guard_on_second.unwrap();
    assert_eq!(transferred.auc, same.first.own_guard.auc);
    assert_eq!(same.n_test_harmful, 4);

    let state = 2;
    fn train(s: &PromptSet) -> Vec<&str> {
        s.split(Some(refusal_lens_engine::data::prompts::Split::Train))
            .map(|r| r.prompt.as_str())
            .collect()
    }
    let train_dirs = Directions::diff_in_means(
        &collect(&lm, &train(&harmful), None, &none, &mut |_, _| {}).unwrap(),
        &collect(&lm, &train(&harmless), None, &none, &mut |_, _| {}).unwrap(),
        Provenance::default(),
    )
    .unwrap();
    let r = train_dirs.refusal_at(state, train_dirs.n_post - 1).to_vec();
    let ablated = orthogonalized(&lm, &r).unwrap();
    let diff = compare(
        &lm,
        &ablated,
        &harmful,
        &harmless,
        None,
        None,
        &none,
        &mut |_, _, _| {},
    )
    .unwrap();
    let at = diff.layers[state];
    assert!(at.refusal.unwrap().abs() < 1e-4, "{at:?}");
    // The ablation removes one direction of 64: the harmfulness directions still agree.
    assert!(
        diff.layers[1].harmfulness.unwrap() > 0.5,
        "{:?}",
        diff.layers
    );
    assert!(diff.first_guard_on_second.is_some());
}
