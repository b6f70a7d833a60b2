//! Fitting the refusal tokens' output rows as a probe inside the unembedding.

use candle_core::{DType, Tensor};

use crate::Result;

/// The fitted rows `[2, d]` and the loss at every step.
pub struct RowFit {
    pub rows: Tensor,
    pub losses: Vec<f32>,
}

/// Fits the output rows of the refusal tokens as a probe inside the unembedding: for each
/// training prompt, cross-entropy of its target token (`0` = `[refuse]`, `1` = `[respond]`)
/// over the whole vocabulary, where the base vocabulary enters through its log-sum-exp.
/// Needs only the final normalised states at t_post (`unembed.hook_in`), so it trains in well
/// under a second. `final_softcap` is the model's cap on logits (Gemma 2), which the new rows'
/// logits pass through like every other.
pub fn fit_token_rows(
    normalized: &Tensor,
    base_lse: &Tensor,
    targets: &[u32],
    init: &Tensor,
    final_softcap: Option<f64>,
    steps: usize,
    lr: f64,
) -> Result<RowFit> {
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    let dev = normalized.device();
    let n = targets.len();
    let rows = candle_core::Var::from_tensor(&init.to_dtype(DType::F32)?)?;
    // Balance the two classes so the threshold sits in the middle by default.
    let n_refuse = targets.iter().filter(|&&t| t == 0).count().max(1) as f32;
    let n_respond = (n as f32 - n_refuse).max(1.0);
    let weights: Vec<f32> = targets
        .iter()
        .map(|&t| {
            if t == 0 {
                0.5 / n_refuse
            } else {
                0.5 / n_respond
            }
        })
        .collect();
    let weights = Tensor::from_vec(weights, n, dev)?;
    let onehot: Vec<f32> = targets
        .iter()
        .flat_map(|&t| if t == 0 { [1.0, 0.0] } else { [0.0, 1.0] })
        .collect();
    let onehot = Tensor::from_vec(onehot, (n, 2), dev)?;
    let base = base_lse.reshape((n, 1))?;
    let mut opt = AdamW::new(
        vec![rows.clone()],
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let scores = normalized.matmul(&rows.as_tensor().t()?)?; // [n, 2]
        let scores = crate::model::softcap(scores, final_softcap)?;
        let all = Tensor::cat(&[&base, &scores], 1)?; // [n, 3]
        let lse = all.log_sum_exp(1)?;
        let picked = (&scores * &onehot)?.sum(1)?;
        let loss = ((lse - picked)? * &weights)?.sum_all()?;
        opt.backward_step(&loss)?;
        losses.push(loss.to_scalar::<f32>()?);
    }
    Ok(RowFit {
        rows: rows.as_tensor().detach(),
        losses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    #[test]
    fn token_rows_learn_a_separable_rule() {
        // States whose first coordinate says "refuse"; a base vocabulary with lse 0.
        let dev = Device::Cpu;
        let n = 40;
        let mut h = Vec::new();
        let mut targets = Vec::new();
        for i in 0..n {
            let refuse = i % 2 == 0;
            h.extend([
                if refuse { 1.0f32 } else { -1.0 },
                (i as f32 * 0.37).sin(),
                0.5,
            ]);
            targets.push(if refuse { 0 } else { 1 });
        }
        let h = Tensor::from_vec(h, (n, 3), &dev).unwrap();
        let lse = Tensor::zeros(n, DType::F32, &dev).unwrap();
        let init = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let fit = fit_token_rows(&h, &lse, &targets, &init, None, 300, 0.05).unwrap();
        assert!(
            fit.losses.last().unwrap() < &(fit.losses[0] * 0.2),
            "{:?}",
            (fit.losses[0], fit.losses.last())
        );
        let scores = h
            .matmul(&fit.rows.t().unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (s, t) in scores.iter().zip(&targets) {
            let refuse_wins = s[0] > s[1] && s[0] > 0.0;
            assert_eq!(refuse_wins, *t == 0);
        }
    }
}
