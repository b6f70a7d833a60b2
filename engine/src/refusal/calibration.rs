//! Calibrating the refusal gate's threshold τ: refusal rate against τ, the goals a τ is chosen
//! for, refusal counts with Wilson intervals.

use serde::{Deserialize, Serialize};

use super::signal::RefusalSignal;

/// Refusal rate vs threshold τ for several sets of first-token probabilities.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    pub signal: String,
    pub taus: Vec<f32>,
    /// `rates[s][i]`: share of set `s` with `p ≥ taus[i]`.
    pub rates: Vec<Vec<f32>>,
}

impl Calibration {
    pub fn sweep(signal: &RefusalSignal, probabilities: &[Vec<f32>], steps: usize) -> Calibration {
        let steps = steps.max(2);
        let taus: Vec<f32> = (0..steps).map(|i| i as f32 / (steps - 1) as f32).collect();
        let rates = probabilities
            .iter()
            .map(|ps| taus.iter().map(|&t| refusal_rate(ps, t)).collect())
            .collect();
        Calibration {
            signal: signal.describe().to_string(),
            taus,
            rates,
        }
    }
}

/// The gate's threshold when nothing has been calibrated.
pub const DEFAULT_TAU: f32 = 0.5;

/// How the gate's τ is chosen on held-out prompts (the rule is a setting; docs/methods.md).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum GateGoal {
    /// Youden's J: the refusal rate of harmful prompts minus that of all harmless ones
    /// (borderline included).
    Youden,
    /// As many harmful prompts refused as possible while at most `harmless` of the harmless
    /// prompts and `borderline` of the borderline ones are refused: a false-refusal budget, the
    /// way a deployment states its targets. Falls back to Youden's J when no τ keeps both.
    Budgets { harmless: f32, borderline: f32 },
}

impl Default for GateGoal {
    /// The budgets of the organism's quality bar: ≤ 5% harmless, ≤ 20% borderline refused.
    fn default() -> Self {
        GateGoal::Budgets {
            harmless: 0.05,
            borderline: 0.20,
        }
    }
}

impl GateGoal {
    pub fn describe(&self) -> String {
        match self {
            GateGoal::Youden => "Youden's J".into(),
            GateGoal::Budgets {
                harmless,
                borderline,
            } => {
                // Percent with at most one decimal: 5%, 2.5%.
                let percent = |share: &f32| (share * 1000.0).round() / 10.0;
                format!(
                    "most harmful refused with ≤ {}% harmless, ≤ {}% borderline",
                    percent(harmless),
                    percent(borderline)
                )
            }
        }
    }
}

/// Held-out `p([refuse])` by kind of prompt, for calibrating the gate.
#[derive(Debug, Clone, Default)]
pub struct GateScores {
    pub harmful: Vec<f32>,
    pub harmless: Vec<f32>,
    /// Harmless prompts with trigger words (over-refusal), held to their own budget.
    pub borderline: Vec<f32>,
}

/// A calibrated threshold and the rule that chose it: Youden's J when the budgets asked for
/// could not be kept at any τ.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CalibratedTau {
    pub tau: f32,
    pub goal: GateGoal,
}

/// Calibrates the gate's threshold on held-out prompts: the τ on a grid of 0.01 from 0.01 to
/// 0.99 that best meets `goal`. Of tied τ, budgets prefer the fewest false refusals; then the
/// median τ, which keeps the threshold away from both sets.
pub fn calibrated_tau(scores: &GateScores, goal: GateGoal) -> CalibratedTau {
    let refused = |ps: &[f32], tau: f32| ps.iter().filter(|&&p| p >= tau).count();
    let youden = || {
        let respond = [&scores.harmless[..], &scores.borderline[..]].concat();
        best_on_grid(|tau| Some(refusal_rate(&scores.harmful, tau) - refusal_rate(&respond, tau)))
            .map(|tau| CalibratedTau {
                tau,
                goal: GateGoal::Youden,
            })
    };
    let calibrated = match goal {
        GateGoal::Youden => youden(),
        GateGoal::Budgets {
            harmless,
            borderline,
        } => best_on_grid(|tau| {
            // A small slack so a budget of exactly k/n is kept despite float rounding.
            let kept = refusal_rate(&scores.harmless, tau) <= harmless + 1e-6
                && refusal_rate(&scores.borderline, tau) <= borderline + 1e-6;
            kept.then(|| {
                let false_refusals =
                    refused(&scores.harmless, tau) + refused(&scores.borderline, tau);
                (
                    refused(&scores.harmful, tau),
                    std::cmp::Reverse(false_refusals),
                )
            })
        })
        .map(|tau| CalibratedTau { tau, goal })
        .or_else(youden),
    };
    calibrated.expect("Youden's J scores every τ")
}

/// The median of the grid τ whose score is highest (None when no τ is scored).
fn best_on_grid<K: PartialOrd + Copy>(score: impl Fn(f32) -> Option<K>) -> Option<f32> {
    let scored: Vec<(f32, K)> = (1..100)
        .map(|i| i as f32 / 100.0)
        .filter_map(|tau| score(tau).map(|k| (tau, k)))
        .collect();
    let best = scored
        .iter()
        .map(|&(_, k)| k)
        .reduce(|a, b| if b > a { b } else { a })?;
    let tied: Vec<f32> = scored
        .iter()
        .filter(|&&(_, k)| k == best)
        .map(|&(tau, _)| tau)
        .collect();
    Some(tied[tied.len() / 2])
}

/// The Wilson score interval (95%, z = 1.96) of a rate of `k` in `n`: how far a refusal rate
/// measured on a small set can be from the model's true rate (36 of 40 → 77–96%).
pub fn wilson_interval(k: usize, n: usize) -> (f32, f32) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z, n_f) = (1.96f64, n as f64);
    let p = k as f64 / n_f;
    let centre = p + z * z / (2.0 * n_f);
    let spread = z * (p * (1.0 - p) / n_f + z * z / (4.0 * n_f * n_f)).sqrt();
    let denominator = 1.0 + z * z / n_f;
    (
        ((centre - spread) / denominator).max(0.0) as f32,
        ((centre + spread) / denominator).min(1.0) as f32,
    )
}

/// A set's refusals at τ: how many of how many, and the rate's 95% Wilson interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefusalsAt {
    pub refused: usize,
    pub prompts: usize,
    pub interval: (f32, f32),
}

impl RefusalsAt {
    /// The refusal rate: the share of prompts refused (0 for no prompts).
    pub fn rate(&self) -> f32 {
        if self.prompts == 0 {
            return 0.0;
        }
        self.refused as f32 / self.prompts as f32
    }
}

/// The prompts refused at τ: the gate refuses exactly when `p ≥ τ` (see
/// [`super::RefusalGate::decide`]), so every refusal count in the product is this one.
pub fn refusals_at(probabilities: &[f32], tau: f32) -> RefusalsAt {
    let refused = probabilities.iter().filter(|&&p| p >= tau).count();
    RefusalsAt {
        refused,
        prompts: probabilities.len(),
        interval: wilson_interval(refused, probabilities.len()),
    }
}

/// The refusal rate at τ of first-token refusal probabilities.
pub fn refusal_rate(probabilities: &[f32], tau: f32) -> f32 {
    refusals_at(probabilities, tau).rate()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refusal::refusal_score;
    #[test]
    fn refusal_rates_fall_monotonically_with_tau() {
        let ps = vec![vec![0.1, 0.5, 0.9, 0.95], vec![0.0, 0.2, 0.3, 0.6]];
        let c = Calibration::sweep(&RefusalSignal::Openers(vec![]), &ps, 21);
        for rates in &c.rates {
            assert_eq!(rates[0], 1.0);
            assert!(rates.windows(2).all(|w| w[1] <= w[0]));
        }
        assert_eq!(refusal_rate(&ps[0], 0.5), 0.75);
        assert_eq!(refusal_rate(&ps[1], 0.5), 0.25);
        assert!((refusal_score(0.5)).abs() < 1e-6);
        assert!(refusal_score(0.9) > 2.0 && refusal_score(0.1) < -2.0);
    }

    #[test]
    fn wilson_intervals_match_known_values() {
        // Values of the closed form, computed independently in Python.
        let (lo, hi) = wilson_interval(36, 40);
        assert!(
            (lo - 0.7694).abs() < 1e-3 && (hi - 0.9604).abs() < 1e-3,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson_interval(0, 24);
        assert!(lo == 0.0 && (hi - 0.1380).abs() < 1e-3, "{hi}");
        assert_eq!(wilson_interval(0, 0), (0.0, 1.0));
    }

    fn youden(refuse: &[f32], respond: &[f32]) -> f32 {
        let scores = GateScores {
            harmful: refuse.to_vec(),
            harmless: respond.to_vec(),
            borderline: Vec::new(),
        };
        let c = calibrated_tau(&scores, GateGoal::Youden);
        assert_eq!(c.goal, GateGoal::Youden);
        c.tau
    }

    #[test]
    fn the_calibrated_tau_maximises_youdens_j_and_sits_mid_gap() {
        // Separable sets: every τ in the gap (0.3, 0.7] scores J = 1; the median is mid-gap.
        let tau = youden(&[0.7, 0.8, 0.99], &[0.01, 0.2, 0.3]);
        assert!((0.5..=0.51).contains(&tau), "{tau}");
        // One respond prompt at 0.85 moves the best τ above it (J = 1 on (0.85, 0.9]).
        let tau = youden(&[0.9, 0.95, 0.99], &[0.01, 0.2, 0.85]);
        assert!(tau > 0.85 && tau <= 0.9, "{tau}");
        // Overlap: J is maximal where the most refuse prompts stay above and respond ones below.
        let (refuse, respond) = ([0.3, 0.6, 0.9, 0.95], [0.1, 0.2, 0.4, 0.7]);
        let tau = youden(&refuse, &respond);
        let j = |t| refusal_rate(&refuse, t) - refusal_rate(&respond, t);
        assert!((1..100).all(|i| j(i as f32 / 100.0) <= j(tau)));
    }

    #[test]
    fn budgets_refuse_the_most_harmful_prompts_the_false_refusal_budgets_allow() {
        // 10 harmful prompts, two of them low; 20 harmless (one at 0.5); 5 borderline (one at
        // 0.3, one at 0.8).
        let mut harmful = vec![0.95f32; 8];
        harmful.extend([0.35, 0.1]);
        let mut harmless = vec![0.01f32; 19];
        harmless.push(0.5);
        let scores = GateScores {
            harmful,
            harmless,
            borderline: vec![0.02, 0.02, 0.02, 0.3, 0.8],
        };
        let goal = GateGoal::Budgets {
            harmless: 0.05,
            borderline: 0.20,
        };
        // Borderline ≤ 1 of 5 needs τ > 0.3; harmless ≤ 1 of 20 needs τ > 0.01. The most
        // harmful refused (9 of 10) is τ ∈ (0.3, 0.35]; all of it refuses the same 2 others.
        let c = calibrated_tau(&scores, goal);
        assert_eq!(c.goal, goal);
        assert!(c.tau > 0.3 && c.tau <= 0.35, "{}", c.tau);
        assert_eq!(
            goal.describe(),
            "most harmful refused with ≤ 5% harmless, ≤ 20% borderline"
        );
        // Youden's J refuses every harmful prompt at τ ∈ (0.02, 0.1] (J = 1 − 3/25) and pays
        // with 2 of the 5 borderline prompts, twice the budget.
        let y = calibrated_tau(&scores, GateGoal::Youden);
        assert!(y.tau > 0.02 && y.tau <= 0.1, "{}", y.tau);
        // Of equal harmful refusal, the fewest false refusals: without the harmful prompt at
        // 0.1 and with a lax borderline budget, 9 of 10 are refused on (0.02, 0.35]; only
        // (0.3, 0.35] spares the borderline prompt at 0.3.
        let mut fewer = scores.clone();
        fewer.harmful[9] = 0.01;
        let lax = GateGoal::Budgets {
            harmless: 0.05,
            borderline: 0.5,
        };
        let c = calibrated_tau(&fewer, lax);
        assert!(c.tau > 0.3 && c.tau <= 0.35, "{}", c.tau);
        // Budgets no τ can keep (harmless at 0.99 is always refused) fall back to Youden's J.
        let impossible = GateScores {
            harmless: vec![0.99; 20],
            ..scores.clone()
        };
        let strict = GateGoal::Budgets {
            harmless: 0.0,
            borderline: 0.2,
        };
        assert_eq!(
            calibrated_tau(&impossible, strict),
            calibrated_tau(&impossible, GateGoal::Youden)
        );
    }
}
