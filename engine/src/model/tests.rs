//! Exact checks of the forward pass and every intervention on tiny random models.

use candle_core::{DType, IndexOp, Tensor, D};

use crate::hooks::{HeadValue, HookPoint, HookSpec, Intervention, Positions};
use crate::model::config::Family;
use crate::model::{FastPrecision, ForwardOptions, KvCache, LogitsAt, Weights};
use crate::testing::max_abs_diff;
use crate::testing::{random_weights, tiny_config, tiny_model};
use crate::LoadedModel;

const IDS: [u32; 10] = [257, 72, 105, 33, 32, 104, 111, 119, 258, 10];

fn tokens(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn run(m: &LoadedModel, spec: &HookSpec) -> crate::model::ForwardOutput {
    m.model
        .forward(
            &m.model.dense,
            &tokens(&IDS),
            None,
            spec,
            LogitsAt::All,
            ForwardOptions::default(),
        )
        .unwrap()
}

fn all_points(n_layers: usize) -> HookSpec {
    let mut points = vec![HookPoint::Embed, HookPoint::LnFinal];
    for l in 0..n_layers {
        points.extend([
            HookPoint::ResidPre(l),
            HookPoint::AttnPattern(l),
            HookPoint::AttnZ(l),
            HookPoint::AttnOut(l),
            HookPoint::ResidMid(l),
            HookPoint::MlpOut(l),
            HookPoint::ResidPost(l),
        ]);
    }
    HookSpec::capture(points)
}

/// One tiny model of every family, and a Mistral-style one with a sliding window of 3 keys
/// (shorter than the test sequence, so cached decoding must hide the oldest keys; Gemma's
/// local layers have the same window).
fn every_family() -> [LoadedModel; 7] {
    let mut windowed = tiny_config(Family::Llama);
    windowed.sliding_window = Some(3);
    [
        tiny_model(Family::Llama, 1).unwrap(),
        tiny_model(Family::Qwen2, 2).unwrap(),
        tiny_model(Family::Qwen3, 3).unwrap(),
        crate::testing::tiny_model_with(windowed, 4).unwrap(),
        tiny_model(Family::Phi3, 5).unwrap(),
        tiny_model(Family::Gemma2, 6).unwrap(),
        tiny_model(Family::Gemma3, 7).unwrap(),
    ]
}

#[test]
fn kv_cached_forward_equals_full_recomputation() {
    for m in every_family() {
        let full = run(&m, &HookSpec::default()).logits.unwrap();
        let mut cache = KvCache::new(m.model.config.n_layers);
        // Prefill 4 tokens, then one at a time.
        let mut rows = Vec::new();
        let first = m
            .model
            .forward(
                &m.model.dense,
                &tokens(&IDS[..4]),
                Some(&mut cache),
                &HookSpec::default(),
                LogitsAt::All,
                ForwardOptions::default(),
            )
            .unwrap();
        rows.push(first.logits.unwrap());
        for &id in &IDS[4..] {
            let out = m
                .model
                .forward(
                    &m.model.dense,
                    &tokens(&[id]),
                    Some(&mut cache),
                    &HookSpec::default(),
                    LogitsAt::All,
                    ForwardOptions::default(),
                )
                .unwrap();
            rows.push(out.logits.unwrap());
        }
        assert_eq!(cache.len(), IDS.len());
        let cached = Tensor::cat(&rows, 1).unwrap();
        assert!(
            max_abs_diff(&full, &cached) < 1e-4,
            "{}",
            max_abs_diff(&full, &cached)
        );
    }
}

#[test]
fn capturing_changes_nothing_and_hooks_are_consistent() {
    for m in every_family() {
        let plain = run(&m, &HookSpec::default());
        let spec = all_points(m.model.config.n_layers);
        let hooked = run(&m, &spec);
        // Capturing is read-only: bit-identical logits.
        assert_eq!(
            max_abs_diff(&plain.logits.unwrap(), hooked.logits.as_ref().unwrap()),
            0.0
        );
        let c = &hooked.captures;
        let get = |p| c.get(p).unwrap().unwrap();
        let n = m.model.config.n_layers;
        assert_eq!(c.points().count(), 2 + 7 * n);
        for l in 0..n {
            // resid_mid = resid_pre + attn_out; resid_post = resid_mid + mlp_out.
            let mid = (get(HookPoint::ResidPre(l)) + get(HookPoint::AttnOut(l))).unwrap();
            assert!(max_abs_diff(&mid, &get(HookPoint::ResidMid(l))) < 1e-6);
            let post = (get(HookPoint::ResidMid(l)) + get(HookPoint::MlpOut(l))).unwrap();
            assert!(max_abs_diff(&post, &get(HookPoint::ResidPost(l))) < 1e-6);
            if l + 1 < n {
                assert_eq!(
                    max_abs_diff(
                        &get(HookPoint::ResidPost(l)),
                        &get(HookPoint::ResidPre(l + 1))
                    ),
                    0.0
                );
            }
            // Patterns are causal distributions.
            let pat = get(HookPoint::AttnPattern(l));
            assert_eq!(pat.dims(), &[1, 4, IDS.len(), IDS.len()]);
            let sums = pat
                .sum(D::Minus1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
            let above = pat.i((0, 0, 2, 3)).unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(above, 0.0, "position 2 must not see position 3");
            // attn_out is o_proj of hook_z (through Gemma's post-attention norm).
            let z = get(HookPoint::AttnZ(l));
            assert_eq!(z.dims(), &[1, IDS.len(), 4, 16]);
            let block = &m.model.dense.blocks[l];
            let o = block
                .o
                .forward(&z.reshape((1, IDS.len(), 64)).unwrap())
                .unwrap();
            let eps = m.model.config.rms_eps as f32;
            let o = match &block.attn_post_norm {
                Some(w) => candle_nn::ops::rms_norm(&o, w, eps).unwrap(),
                None => o,
            };
            assert!(max_abs_diff(&o, &get(HookPoint::AttnOut(l))) < 1e-5);
        }
        assert_eq!(get(HookPoint::ResidPre(0)).dims(), &[1, IDS.len(), 64]);
        assert_eq!(
            max_abs_diff(&get(HookPoint::Embed), &get(HookPoint::ResidPre(0))),
            0.0
        );
        // Embedding row of the first token (× √d for Gemma).
        let scale = if m.model.config.scale_embeddings {
            8.0
        } else {
            1.0
        };
        let row = (m
            .model
            .dense
            .embed
            .dense()
            .unwrap()
            .i(IDS[0] as usize)
            .unwrap()
            * scale)
            .unwrap();
        assert_eq!(
            max_abs_diff(&get(HookPoint::Embed).i((0, 0)).unwrap(), &row),
            0.0
        );
    }
}

#[test]
fn identity_interventions_change_nothing() {
    let m = tiny_model(Family::Llama, 3).unwrap();
    let plain = run(&m, &HookSpec::default()).logits.unwrap();
    let v = Tensor::ones(64, DType::F32, m.model.device()).unwrap();
    let spec = HookSpec::with_interventions(vec![
        Intervention::AddVector {
            point: HookPoint::ResidPre(1),
            vector: v,
            scale: 0.0,
            positions: Positions::All,
        },
        Intervention::ScaleHead {
            layer: 0,
            head: 2,
            factor: 1.0,
        },
        Intervention::LogitBias {
            token_ids: vec![5],
            bias: 0.0,
        },
    ]);
    assert_eq!(max_abs_diff(&plain, &run(&m, &spec).logits.unwrap()), 0.0);
}

#[test]
fn add_vector_adds_exactly_at_selected_positions() {
    let m = tiny_model(Family::Qwen2, 4).unwrap();
    let l = 1;
    let base = run(&m, &HookSpec::capture([HookPoint::ResidPost(l)]))
        .captures
        .get(HookPoint::ResidPost(l))
        .unwrap()
        .unwrap();
    let v = Tensor::arange(0f32, 64.0, m.model.device()).unwrap();
    let mut spec = HookSpec::with_interventions(vec![Intervention::AddVector {
        point: HookPoint::ResidPost(l),
        vector: v.clone(),
        scale: 0.5,
        positions: Positions::From(6),
    }]);
    spec.capture.insert(HookPoint::ResidPost(l));
    let got = run(&m, &spec)
        .captures
        .get(HookPoint::ResidPost(l))
        .unwrap()
        .unwrap();
    let diff = (got - &base).unwrap();
    assert_eq!(
        diff.i((0, ..6))
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let want = (v * 0.5)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .broadcast_as((4, 64))
        .unwrap();
    assert!(max_abs_diff(&diff.i((0, 6..)).unwrap(), &want) < 1e-4);
}

#[test]
fn directional_ablation_removes_the_direction_from_every_write() {
    for m in every_family() {
        let n = m.model.config.n_layers;
        let dir = Tensor::arange(0f32, 64.0, m.model.device())
            .unwrap()
            .sin()
            .unwrap();
        let unit = (&dir
            / dir
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64)
            .unwrap();
        let mut spec =
            HookSpec::with_interventions(Intervention::ablate_direction(&dir, n).unwrap());
        spec.capture = all_points(n).capture;
        let out = run(&m, &spec);
        let c = &out.captures;
        for p in c
            .points()
            .filter(|p| p.is_residual_shaped() && *p != HookPoint::LnFinal)
        {
            let x = c.get(p).unwrap().unwrap();
            let proj = x
                .broadcast_mul(&unit)
                .unwrap()
                .sum(D::Minus1)
                .unwrap()
                .abs()
                .unwrap()
                .max_keepdim(D::Minus1)
                .unwrap();
            let worst = proj
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(worst < 1e-4, "{p}: component {worst}");
        }
        // It really changed the model.
        assert!(
            max_abs_diff(
                &run(&m, &HookSpec::default()).logits.unwrap(),
                out.logits.as_ref().unwrap()
            ) > 1e-3
        );
    }
}

#[test]
fn zeroing_a_head_removes_exactly_its_output() {
    let m = tiny_model(Family::Llama, 5).unwrap();
    let (l, h, dh) = (0, 1, 16);
    let spec = HookSpec::capture([HookPoint::AttnZ(l), HookPoint::AttnOut(l)]);
    let base = run(&m, &spec).captures;
    let mut ablate = HookSpec::with_interventions(vec![Intervention::ScaleHead {
        layer: l,
        head: h,
        factor: 0.0,
    }]);
    ablate.capture = spec.capture.clone();
    let got = run(&m, &ablate).captures;
    let z0 = base.get(HookPoint::AttnZ(l)).unwrap().unwrap();
    let z1 = got.get(HookPoint::AttnZ(l)).unwrap().unwrap();
    assert_eq!(
        z1.i((.., .., h))
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    for other in [0, 2, 3] {
        assert_eq!(
            max_abs_diff(
                &z0.i((.., .., other)).unwrap(),
                &z1.i((.., .., other)).unwrap()
            ),
            0.0
        );
    }
    // attn_out falls by the head's write o_h = z_h · W_O[:, h·d_h..(h+1)·d_h]ᵀ.
    let w_o = m.model.dense.blocks[l]
        .o
        .dense_weight()
        .unwrap()
        .narrow(1, h * dh, dh)
        .unwrap();
    let o_h = z0.i((0, .., h)).unwrap().matmul(&w_o.t().unwrap()).unwrap();
    let drop = (base.get(HookPoint::AttnOut(l)).unwrap().unwrap()
        - got.get(HookPoint::AttnOut(l)).unwrap().unwrap())
    .unwrap();
    assert!(max_abs_diff(&drop.i(0).unwrap(), &o_h) < 1e-5);
}

#[test]
fn head_patching_sets_z_and_self_patching_changes_nothing() {
    let m = tiny_model(Family::Qwen2, 6).unwrap();
    let (l, h) = (1, 3);
    let spec = HookSpec::capture([HookPoint::AttnZ(l)]);
    let base = run(&m, &spec);
    let z = base.captures.get(HookPoint::AttnZ(l)).unwrap().unwrap();
    // Self-patching: identical logits.
    let own = z.i((0, .., h)).unwrap();
    let selfp = HookSpec::with_interventions(vec![Intervention::SetHead {
        layer: l,
        head: h,
        value: HeadValue::PerPosition {
            start: 0,
            rows: own,
        },
    }]);
    assert!(
        max_abs_diff(
            base.logits.as_ref().unwrap(),
            &run(&m, &selfp).logits.unwrap()
        ) < 1e-6
    );
    // Patching the last 3 positions with constants.
    let rows = Tensor::full(7f32, (3, 16), m.model.device()).unwrap();
    let mut patch = HookSpec::with_interventions(vec![Intervention::SetHead {
        layer: l,
        head: h,
        value: HeadValue::PerPosition {
            start: IDS.len() - 3,
            rows,
        },
    }]);
    patch.capture = spec.capture.clone();
    let got = run(&m, &patch)
        .captures
        .get(HookPoint::AttnZ(l))
        .unwrap()
        .unwrap();
    let zh = got.i((0, .., h)).unwrap().to_vec2::<f32>().unwrap();
    assert!(zh[IDS.len() - 3..].iter().flatten().all(|&x| x == 7.0));
    let before = z.i((0, ..IDS.len() - 3, h)).unwrap();
    assert_eq!(
        max_abs_diff(&before, &got.i((0, ..IDS.len() - 3, h)).unwrap()),
        0.0
    );
    // Mean ablation broadcasts one vector.
    let mean = z.i((0, .., h)).unwrap().mean(0).unwrap();
    let mut mean_spec = HookSpec::with_interventions(vec![Intervention::SetHead {
        layer: l,
        head: h,
        value: HeadValue::Broadcast(mean.clone()),
    }]);
    mean_spec.capture = spec.capture;
    let got = run(&m, &mean_spec)
        .captures
        .get(HookPoint::AttnZ(l))
        .unwrap()
        .unwrap();
    let want = mean
        .unsqueeze(0)
        .unwrap()
        .broadcast_as((IDS.len(), 16))
        .unwrap();
    assert_eq!(max_abs_diff(&got.i((0, .., h)).unwrap(), &want), 0.0);
}

#[test]
fn logit_bias_shifts_exactly_the_listed_tokens() {
    let m = tiny_model(Family::Llama, 7).unwrap();
    let plain = run(&m, &HookSpec::default()).logits.unwrap();
    let spec = HookSpec::with_interventions(vec![Intervention::LogitBias {
        token_ids: vec![3, 200],
        bias: 2.5,
    }]);
    let diff = (run(&m, &spec).logits.unwrap() - plain)
        .unwrap()
        .i((0, 4))
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (t, d) in diff.iter().enumerate() {
        let want = if t == 3 || t == 200 { 2.5 } else { 0.0 };
        assert!((d - want).abs() < 1e-5, "token {t}: {d}");
    }
}

#[test]
fn differentiable_ops_agree_with_fused_ops() {
    for m in every_family() {
        let fast = run(&m, &HookSpec::default()).logits.unwrap();
        let slow = m
            .model
            .forward(
                &m.model.dense,
                &tokens(&IDS),
                None,
                &HookSpec::default(),
                LogitsAt::All,
                ForwardOptions::differentiable(),
            )
            .unwrap();
        assert!(max_abs_diff(&fast, slow.logits.as_ref().unwrap()) < 1e-4);
    }
}

#[test]
fn q8_fast_path_stays_close_to_dense() {
    let cfg = tiny_config(Family::Llama);
    let dense = random_weights(&cfg, 8).unwrap();
    let fast = Weights::fast_from(&dense, &|_| None, FastPrecision::Q8_0, false)
        .unwrap()
        .unwrap();
    let m = tiny_model(Family::Llama, 8).unwrap();
    let a = m
        .model
        .forward(
            &dense,
            &tokens(&IDS),
            None,
            &HookSpec::default(),
            LogitsAt::All,
            ForwardOptions::default(),
        )
        .unwrap()
        .logits
        .unwrap();
    let b = m
        .model
        .forward(
            &fast,
            &tokens(&IDS),
            None,
            &HookSpec::default(),
            LogitsAt::All,
            ForwardOptions::default(),
        )
        .unwrap()
        .logits
        .unwrap();
    let scale = a
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let err = max_abs_diff(&a, &b);
    assert!(err > 0.0, "the fast path must actually be quantised");
    assert!(
        err < 0.05 * scale,
        "Q8_0 error {err} vs logit scale {scale}"
    );
}

#[test]
fn context_overflow_is_an_error() {
    let m = tiny_model(Family::Llama, 9).unwrap();
    let long = vec![65u32; m.model.config.context_length + 1];
    let err = m.model.forward(
        &m.model.dense,
        &tokens(&long),
        None,
        &HookSpec::default(),
        LogitsAt::Last,
        ForwardOptions::default(),
    );
    assert!(matches!(err, Err(crate::Error::ContextOverflow { .. })));
}
