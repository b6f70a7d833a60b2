//! The activation cache reads on tiny random models: every decomposition must add back up to
//! the stream it decomposes, exactly as the forward pass computed it.

use candle_core::{IndexOp, Tensor};
use refusal_lens_engine::hooks::{ActivationCache, HookPoint, HookSpec, Intervention};
use refusal_lens_engine::model::config::Family;
use refusal_lens_engine::testing::{dense_run, max_abs_diff, tiny_model};

const IDS: [u32; 9] = [257, 72, 105, 33, 32, 104, 111, 119, 258];

fn sum_of(stack: &Tensor) -> Tensor {
    stack.sum(0).unwrap()
}

#[test]
fn decompose_resid_adds_up_to_the_stream_at_every_layer() {
    for family in [Family::Llama, Family::Qwen2, Family::Gemma2] {
        let m = tiny_model(family, 3).unwrap();
        let cache = ActivationCache::run(&m, &IDS, &[]).unwrap();
        let n = m.model.config.n_layers;
        for layer in 0..n {
            let (parts, labels) = cache.decompose_resid(Some(layer), false).unwrap();
            assert_eq!(labels.len(), 1 + 2 * layer);
            let want = cache.get(HookPoint::ResidPre(layer)).unwrap();
            assert!(
                max_abs_diff(&sum_of(&parts), &want) < 1e-4,
                "{family:?} {layer}"
            );
            let (parts, labels) = cache.decompose_resid(Some(layer), true).unwrap();
            assert_eq!(labels.last().unwrap(), &format!("{layer}_attn_out"));
            let want = cache.get(HookPoint::ResidMid(layer)).unwrap();
            assert!(
                max_abs_diff(&sum_of(&parts), &want) < 1e-4,
                "{family:?} mid {layer}"
            );
        }
        let (parts, labels) = cache.decompose_resid(None, false).unwrap();
        assert_eq!(labels[0], "embed");
        assert_eq!(labels[2 * n], format!("{}_mlp_out", n - 1));
        let last = cache.get(HookPoint::ResidPost(n - 1)).unwrap();
        assert!(max_abs_diff(&sum_of(&parts), &last) < 1e-4);
    }
}

#[test]
fn accumulated_resid_is_the_stream_entering_each_block_then_leaving_the_last() {
    let m = tiny_model(Family::Llama, 3).unwrap();
    let n = m.model.config.n_layers;
    let cache = ActivationCache::run(&m, &IDS, &[]).unwrap();
    let (stack, labels) = cache.accumulated_resid(None, true).unwrap();
    assert_eq!(labels.len(), 2 * n + 1);
    assert_eq!((labels[0].as_str(), labels[1].as_str()), ("0_pre", "0_mid"));
    assert_eq!(labels[2 * n], "final_post");
    for l in 0..n {
        let pre = cache.get(HookPoint::ResidPre(l)).unwrap();
        assert_eq!(max_abs_diff(&stack.i(2 * l).unwrap(), &pre), 0.0);
    }
    let (stack, labels) = cache.accumulated_resid(Some(1), false).unwrap();
    assert_eq!(
        (stack.dim(0).unwrap(), labels),
        (1, vec!["0_pre".to_string()])
    );
    assert!(cache.accumulated_resid(Some(n + 1), false).is_err());
}

#[test]
fn head_results_sum_to_the_attention_output_and_follow_an_ablation() {
    // Gemma: the heads' writes pass through the post-attention norm linearised at the run.
    for family in [Family::Llama, Family::Qwen2, Family::Gemma2, Family::Gemma3] {
        let m = tiny_model(family, 5).unwrap();
        let cfg = m.model.config.clone();
        let cache = ActivationCache::run(&m, &IDS, &[]).unwrap();
        let (heads, labels) = cache.stack_head_results(None).unwrap();
        assert_eq!(labels.len(), cfg.n_layers * cfg.n_heads);
        assert_eq!(labels[cfg.n_heads + 1], "L1H1");
        for l in 0..cfg.n_layers {
            let block = heads.narrow(0, l * cfg.n_heads, cfg.n_heads).unwrap();
            let attn_out = cache.get(HookPoint::AttnOut(l)).unwrap();
            // Plus o_proj's bias, where the family has one.
            let bias = match m.model.dense.blocks[l].o.bias() {
                Some(b) => b.clone(),
                None => {
                    Tensor::zeros(cfg.d_model, candle_core::DType::F32, attn_out.device()).unwrap()
                }
            };
            let total = match m.model.dense.blocks[l].attn_post_norm {
                Some(_) => sum_of(&block),
                None => sum_of(&block).broadcast_add(&bias).unwrap(),
            };
            assert!(
                max_abs_diff(&total, &attn_out) < 1e-4,
                "{family:?} layer {l}"
            );
        }
        // A zero-ablated head writes nothing.
        let knocked = [Intervention::ScaleHead {
            layer: 1,
            head: 2,
            factor: 0.0,
        }];
        let cache = ActivationCache::run(&m, &IDS, &knocked).unwrap();
        let (heads, _) = cache.stack_head_results(Some(2)).unwrap();
        let ablated = heads.i(cfg.n_heads + 2).unwrap();
        assert_eq!(max_abs_diff(&ablated, &ablated.zeros_like().unwrap()), 0.0);
    }
}

#[test]
fn the_final_norm_applied_to_the_decomposition_adds_up_to_the_unembedding_input() {
    let m = tiny_model(Family::Llama, 7).unwrap();
    let cache = ActivationCache::run(&m, &IDS, &[]).unwrap();
    let (parts, _) = cache.decompose_resid(None, false).unwrap();
    let normed = sum_of(&cache.apply_ln_final(&parts).unwrap());
    let (_, captured) = dense_run(&m, &IDS, &HookSpec::default(), &[HookPoint::UnembedIn]);
    let unembed_in = captured[0].unsqueeze(0).unwrap();
    assert!(max_abs_diff(&normed, &unembed_in) < 1e-4);
}
