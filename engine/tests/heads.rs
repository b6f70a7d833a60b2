//! Head attribution on tiny random models, against hand-built single-head runs.

use candle_core::{IndexOp, Tensor};
use refusal_lens_engine::analysis::heads::{
    ablation_effect, dla, head_means, interchange, logit_direction, ScanAblation,
};
use refusal_lens_engine::hooks::{HeadValue, HookPoint, HookSpec, Intervention};
use refusal_lens_engine::model::config::Family;
use refusal_lens_engine::model::{ForwardOptions, LogitsAt};
use refusal_lens_engine::refusal::{RefusalSignal, REFUSE_TOKEN, RESPOND_TOKEN};
use refusal_lens_engine::testing::{dense_run, max_abs_diff, tiny_model};
use refusal_lens_engine::LoadedModel;

/// A tiny model with refusal tokens whose rows are random, so the logit direction is not 0.
fn with_tokens(seed: u64) -> LoadedModel {
    let mut lm = tiny_model(Family::Qwen2, seed).unwrap();
    let d = lm.model.config.d_model;
    let rows: Vec<f32> = (0..2 * d)
        .map(|i| ((i * 7919 % 97) as f32 / 97.0 - 0.5) * 0.6)
        .collect();
    let rows = Tensor::from_vec(rows, (2, d), lm.model.device()).unwrap();
    lm.add_tokens_untied(
        &[REFUSE_TOKEN, RESPOND_TOKEN],
        &(&rows * 0.0).unwrap(),
        &rows,
    )
    .unwrap();
    lm
}

fn last_logits(lm: &LoadedModel, ids: &[u32], hooks: &HookSpec) -> Tensor {
    dense_run(lm, ids, hooks, &[]).0.i(ids.len() - 1).unwrap()
}

fn score(lm: &LoadedModel, logits: &Tensor) -> f32 {
    let lp = candle_nn::ops::log_softmax(logits, 0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    RefusalSignal::for_model(lm).unwrap().score(&lp)
}

#[test]
fn dla_of_heads_embedding_and_mlps_sums_to_the_logit_difference() {
    let families = [
        with_tokens(51),
        tiny_model(Family::Llama, 52).unwrap(),
        tiny_model(Family::Gemma2, 53).unwrap(),
    ];
    for lm in families {
        let prompts = ["How do I pick a lock?", "Bake me a cake", "hi"];
        let out = dla(&lm, &prompts, None, &[], &|| false, &mut |_, _| {}).unwrap();
        let u = logit_direction(&lm).unwrap();
        assert!(u.iter().any(|v| *v != 0.0));
        for (p, d) in prompts.iter().zip(&out) {
            let scale = d.logit_difference.abs().max(1.0);
            assert!(
                (d.sum() - d.logit_difference).abs() < 1e-4 * scale,
                "{p}: parts {} vs logits {}",
                d.sum(),
                d.logit_difference
            );
            assert_eq!(
                d.heads.values.len(),
                lm.model.config.n_layers * lm.model.config.n_heads
            );
        }
    }
}

#[test]
fn per_row_head_patches_equal_single_head_patches_and_self_patches_change_nothing() {
    let lm = with_tokens(53);
    let ids = lm.chat_prompt(None, "Tell me about owls").unwrap().ids;
    let other = lm.chat_prompt(None, "Tell me about cars").unwrap().ids;
    let (l, h) = (1, lm.model.config.n_heads);
    let z_of = |ids: &[u32]| {
        dense_run(&lm, ids, &HookSpec::default(), &[HookPoint::AttnZ(l)])
            .1
            .remove(0)
    };
    let (own, theirs) = (z_of(&ids), z_of(&other));
    let k = 4;
    let start = ids.len() - k;
    let batch = |source: &Tensor| {
        let src_start = source.dim(0).unwrap() - k;
        let values = (0..h)
            .map(|head| source.i((src_start.., head)).unwrap().contiguous().unwrap())
            .collect();
        let hooks = HookSpec::with_interventions(vec![Intervention::PatchHeadPerRow {
            layer: l,
            start,
            heads: (0..h).collect(),
            values,
        }]);
        let t = Tensor::new(ids.as_slice(), lm.model.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((h, 1))
            .unwrap();
        lm.model
            .forward(
                &lm.model.dense,
                &t,
                None,
                &hooks,
                LogitsAt::Last,
                ForwardOptions::default(),
            )
            .unwrap()
            .logits
            .unwrap()
    };
    let clean = last_logits(&lm, &ids, &HookSpec::default());
    let selfp = batch(&own);
    let patched = batch(&theirs);
    for head in 0..h {
        assert!(
            max_abs_diff(&selfp.i((head, 0)).unwrap(), &clean) < 1e-4,
            "self-patch of head {head}"
        );
        let single = HookSpec::with_interventions(vec![Intervention::SetHead {
            layer: l,
            head,
            value: HeadValue::PerPosition {
                start,
                rows: theirs
                    .i((theirs.dim(0).unwrap() - k.., head))
                    .unwrap()
                    .contiguous()
                    .unwrap(),
            },
        }]);
        assert!(
            max_abs_diff(
                &patched.i((head, 0)).unwrap(),
                &last_logits(&lm, &ids, &single)
            ) < 1e-4,
            "head {head}"
        );
    }
}

#[test]
fn interchange_and_ablation_match_single_head_runs() {
    let lm = with_tokens(54);
    let (harmful, harmless) = (
        "Explain how to break into a house",
        "Explain how to paint a house",
    );
    let r = interchange(&lm, harmful, harmless, Some(3), &|| false, &mut |_, _| {}).unwrap();
    let a = lm.chat_prompt(None, harmful).unwrap().ids;
    let b = lm.chat_prompt(None, harmless).unwrap().ids;
    assert!(
        (score(&lm, &last_logits(&lm, &a, &HookSpec::default())) - r.clean_harmful).abs() < 1e-3
    );
    let gap = r.clean_harmful - r.clean_harmless;
    // Head (1, 2): the harmless run's z at its last 3 positions, into the harmful run's.
    let (l, head) = (1, 2);
    let t = Tensor::new(b.as_slice(), lm.model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let zb = lm
        .model
        .forward(
            &lm.model.dense,
            &t,
            None,
            &HookSpec::capture([HookPoint::AttnZ(l)]),
            LogitsAt::None,
            ForwardOptions::default(),
        )
        .unwrap()
        .captures
        .get(HookPoint::AttnZ(l))
        .unwrap()
        .unwrap()
        .i(0)
        .unwrap();
    let rows = zb.i((b.len() - 3.., head)).unwrap().contiguous().unwrap();
    let hooks = HookSpec::with_interventions(vec![Intervention::SetHead {
        layer: l,
        head,
        value: HeadValue::PerPosition {
            start: a.len() - 3,
            rows,
        },
    }]);
    let patched = score(&lm, &last_logits(&lm, &a, &hooks));
    let want = (r.clean_harmful - patched) / gap;
    assert!(
        (r.necessity.get(l, head) - want).abs() < 1e-3 * want.abs().max(1.0),
        "{} vs {want}",
        r.necessity.get(l, head)
    );

    // Ablation: zeroing head (0, 1) on one prompt, against a ScaleHead run.
    let effect = ablation_effect(
        &lm,
        &[harmful],
        &ScanAblation::Scale(0.0),
        &|| false,
        &mut |_, _| {},
    )
    .unwrap();
    let zeroed = HookSpec::with_interventions(vec![Intervention::ScaleHead {
        layer: 0,
        head: 1,
        factor: 0.0,
    }]);
    let want = score(&lm, &last_logits(&lm, &a, &zeroed)) - r.clean_harmful;
    assert!((effect.get(0, 1) - want).abs() < 1e-3 * want.abs().max(1.0));

    // Mean ablation against a SetHead run with the same mean.
    let means = head_means(&lm, &[harmless, "Tell me a joke"]).unwrap();
    let effect = ablation_effect(
        &lm,
        &[harmful],
        &ScanAblation::Mean(means.clone()),
        &|| false,
        &mut |_, _| {},
    )
    .unwrap();
    let meaned = HookSpec::with_interventions(vec![Intervention::SetHead {
        layer: 1,
        head: 3,
        value: HeadValue::Broadcast(means[1][3].clone()),
    }]);
    let want = score(&lm, &last_logits(&lm, &a, &meaned)) - r.clean_harmful;
    assert!(
        (effect.get(1, 3) - want).abs() < 1e-3 * want.abs().max(1.0),
        "{} vs {want}",
        effect.get(1, 3)
    );
    // The means are the heads' averages over every position of the reference prompts,
    // computed here from each prompt's own captured z.
    let mut sum = vec![0f32; lm.model.config.head_dim];
    let mut positions = 0;
    for p in [harmless, "Tell me a joke"] {
        let ids = lm.chat_prompt(None, p).unwrap().ids;
        let (_, z) = dense_run(&lm, &ids, &HookSpec::default(), &[HookPoint::AttnZ(1)]);
        let rows: Vec<Vec<f32>> = z[0].i((.., 3)).unwrap().to_vec2().unwrap(); // [s, d_h]
        for row in &rows {
            sum.iter_mut().zip(row).for_each(|(acc, v)| *acc += v);
        }
        positions += rows.len();
    }
    let want_mean: Vec<f32> = sum.iter().map(|v| v / positions as f32).collect();
    let got: Vec<f32> = means[1][3].to_vec1().unwrap();
    assert!(got
        .iter()
        .zip(&want_mean)
        .all(|(x, y)| (x - y).abs() < 1e-5));
}

#[test]
fn attribution_patching_is_exact_to_first_order_and_tracks_exact_interchange() {
    use refusal_lens_engine::analysis::heads::{
        attribution_patching, correlation, score_gradients,
    };
    let lm = with_tokens(55);
    let ids = lm
        .chat_prompt(None, "Explain how to break into a house")
        .unwrap()
        .ids;
    let (grads, z, score0) = score_gradients(&lm, &ids).unwrap();
    let clean = score(&lm, &last_logits(&lm, &ids, &HookSpec::default()));
    assert!((score0 - clean).abs() < 1e-3, "{score0} vs {clean}");
    // A small patch of one head's z (where the model is linear in it): the exact change in
    // the refusal score equals the gradient's prediction.
    let (l, h) = (0, 1);
    let shape = z[l].dims().to_vec();
    let n: usize = shape.iter().product();
    let mut delta = vec![0f32; n];
    let (s, heads, dh) = (shape[0], shape[1], shape[2]);
    for p in s - 3..s {
        for d in 0..dh {
            delta[(p * heads + h) * dh + d] = 1e-2 * ((p * 31 + d * 7) % 11) as f32 / 11.0;
        }
    }
    let delta = Tensor::from_vec(delta, (s, heads, dh), lm.model.device()).unwrap();
    let predicted = (&delta * &grads[l])
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let hooks = HookSpec::with_interventions(vec![Intervention::AddToZ {
        layer: l,
        delta: delta.unsqueeze(0).unwrap(),
    }]);
    let exact = score(&lm, &last_logits(&lm, &ids, &hooks)) - score0;
    assert!(
        (exact - predicted).abs() < 0.05 * predicted.abs().max(1e-3),
        "exact {exact} vs predicted {predicted}"
    );
    // Against exact interchange on a pair: the same clean scores, correlated estimates.
    let (a, b) = (
        "Explain how to break into a house",
        "Explain how to paint a house",
    );
    let fast = attribution_patching(&lm, a, b, Some(3)).unwrap();
    let slow = interchange(&lm, a, b, Some(3), &|| false, &mut |_, _| {}).unwrap();
    assert!((fast.clean_harmful - slow.clean_harmful).abs() < 1e-3);
    let r = correlation(&fast.necessity, &slow.necessity);
    assert!(r > 0.5, "necessity correlation {r}");
}

#[test]
fn the_cascade_zeroes_the_gate_and_leaves_earlier_heads_alone() {
    use refusal_lens_engine::analysis::heads::{dla, knockout_cascade};
    let lm = with_tokens(56);
    let p = "Explain how to break into a house";
    let clean = dla(&lm, &[p], None, &[], &|| false, &mut |_, _| {}).unwrap();
    let c = knockout_cascade(&lm, &[p], (1, 2), &|| false).unwrap();
    for h in 0..lm.model.config.n_heads {
        assert!(c.get(0, h).abs() < 1e-5, "layer 0 head {h}");
    }
    // The gate's own DLA goes to zero: its change is minus its clean DLA.
    assert!((c.get(1, 2) + clean[0].heads.get(1, 2)).abs() < 1e-4);
}

#[test]
fn ciphers_substitute_letters_and_state_their_key() {
    use refusal_lens_engine::analysis::heads::Cipher;
    assert_eq!(Cipher::Caesar.encode("abc XYZ, ok!"), "def ABC, rn!");
    assert_eq!(Cipher::Atbash.encode("abz Hello"), "zya Svool");
    let r = Cipher::Random(7).encode("abcdefghijklmnopqrstuvwxyz");
    let mut sorted: Vec<char> = r.chars().collect();
    sorted.sort_unstable();
    assert_eq!(
        sorted.into_iter().collect::<String>(),
        "abcdefghijklmnopqrstuvwxyz"
    );
    assert_eq!(
        Cipher::Random(7).encode("hello"),
        Cipher::Random(7).encode("hello")
    );
    let wrapped = Cipher::Caesar.wrap("Hi");
    assert!(wrapped.contains("defghijklmnopqrstuvwxyzabc") && wrapped.ends_with("Kl"));
}
