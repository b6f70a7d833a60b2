//! Same numbers on every CPU (part of the real-model group): everything the project records is
//! computed on the dense f32 path, which runs the same code on every x86-64 CPU with AVX2 +
//! FMA. The quantised fast path does not: candle picks VNNI or AVX2 kernels at run time, and
//! they quantise activations differently. This test runs the same computations in two child
//! processes, one on this CPU's own kernel tier and one forced to the AVX2 tier (what an
//! AVX2-only machine runs), and asserts that the recorded quantities are bit-identical.
//! Run alone with `cargo test --release -p refusal-lens-tests --test portable`.

use std::collections::BTreeMap;
use std::process::Command;

use candle_core::{IndexOp, Tensor};
use refusal_lens_engine::data::prompts::{sample_prompts_dir, PromptSet, Split};
use refusal_lens_engine::hooks::{HookPoint, HookSpec};
use refusal_lens_engine::model::{ForwardOptions, KernelTier, LogitsAt};
use refusal_lens_engine::organism::Adapter;
use refusal_lens_engine::organism_dir;
use refusal_lens_engine::refusal::{first_token_probabilities, RefusalGate};
use refusal_lens_engine::run::generate::{generate, GenerateConfig};
use refusal_lens_tests::default_model;

const OUT_ENV: &str = "REFUSAL_LENS_PORTABLE_OUT";

/// f32 values as their bit patterns, so that the comparison is exact.
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// What a child process computes: (name → bit patterns) for the recorded quantities, and
/// the fast path's reply log-probabilities, which may depend on the tier.
#[derive(serde::Serialize, serde::Deserialize)]
struct Numbers {
    tier: KernelTier,
    exact: BTreeMap<String, Vec<u32>>,
    fast_logprobs: Vec<Vec<u32>>,
}

#[test]
#[ignore = "a child process of recorded_numbers_do_not_depend_on_the_kernel_tier"]
fn child_computes_the_recorded_numbers() {
    let Ok(out) = std::env::var(OUT_ENV) else {
        return;
    };
    let base = default_model();
    let organism = Adapter::load(&organism_dir())
        .unwrap()
        .apply(&base)
        .unwrap();
    let prompts: Vec<String> = ["harmful", "harmless", "borderline"]
        .iter()
        .flat_map(|n| {
            let set =
                PromptSet::load(&sample_prompts_dir().join(format!("{n}.jsonl")), None).unwrap();
            set.split(Some(Split::Val))
                .take(8)
                .map(|r| r.prompt.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let mut exact = BTreeMap::new();
    // The gate's input (refusal rates, calibration) on the organism, P(R) on the base model.
    for (name, lm) in [("organism", &organism), ("base", &base)] {
        let p = first_token_probabilities(lm, &refs, &|| false, &mut |_, _| {}).unwrap();
        exact.insert(format!("{name}.first_token_probabilities"), bits(&p));
    }
    // Residual states at t_post (directions, probes, trajectories read these).
    let layers = [0, 10, 20, organism.model.config.n_layers - 1];
    for (i, p) in refs.iter().take(4).enumerate() {
        let chat = organism.chat_prompt(None, p).unwrap();
        let t = Tensor::new(chat.ids.as_slice(), organism.model.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let spec = HookSpec::capture(layers.iter().map(|&l| HookPoint::ResidPost(l)));
        let out = organism
            .model
            .forward(
                &organism.model.dense,
                &t,
                None,
                &spec,
                LogitsAt::None,
                ForwardOptions::default(),
            )
            .unwrap();
        for &l in &layers {
            let x = out.captures.get(HookPoint::ResidPost(l)).unwrap().unwrap();
            let v = x.i((0, chat.t_post)).unwrap().to_vec1::<f32>().unwrap();
            exact.insert(format!("prompt{i}.resid_post.{l}.t_post"), bits(&v));
        }
    }
    // Generation on the default (fast) precision: the gate's p([refuse]) and the first
    // token come from the exact prompt pass, and after `[respond]` the first answer token
    // from the respond blocks' exact pass; later tokens from the quantised kernels.
    let mut fast_logprobs = Vec::new();
    // Two harmful prompts and two harmless ones (answered after `[respond]`).
    for i in [0, 1, 8, 9] {
        let ids = organism.chat_prompt(None, refs[i]).unwrap().ids;
        let cfg = GenerateConfig {
            max_new_tokens: 6,
            refusal_gate: RefusalGate::for_model(&organism, organism.refusal_tau()),
            ..Default::default()
        };
        let g = generate(&organism, &ids, &cfg, &|| false, &mut |_| {}).unwrap();
        let first = &g.tokens[0];
        exact.insert(
            format!("reply{i}.gate"),
            vec![g.refusal_probability.unwrap().to_bits(), first.id],
        );
        let respond = RefusalGate::for_model(&organism, 0.5).unwrap().respond;
        let from_fast = if first.id == respond {
            let answer = &g.tokens[1];
            exact.insert(
                format!("reply{i}.first_answer_token"),
                vec![answer.logprob.to_bits(), answer.id],
            );
            2
        } else {
            1
        };
        fast_logprobs.push(bits(
            &g.tokens[from_fast..]
                .iter()
                .map(|t| t.logprob)
                .collect::<Vec<_>>(),
        ));
    }
    let numbers = Numbers {
        tier: KernelTier::detect(),
        exact,
        fast_logprobs,
    };
    std::fs::write(out, serde_json::to_string(&numbers).unwrap()).unwrap();
}

fn numbers_on(force_avx2: bool, dir: &std::path::Path) -> Numbers {
    let out = dir.join(format!("numbers-{force_avx2}.json"));
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args([
            "--exact",
            "child_computes_the_recorded_numbers",
            "--ignored",
            "--test-threads=1",
        ])
        .env(OUT_ENV, &out)
        .env_remove(KernelTier::FORCE_AVX2_ENV);
    if force_avx2 {
        child.env(KernelTier::FORCE_AVX2_ENV, "1");
    }
    let status = child.status().unwrap();
    assert!(status.success(), "child process failed ({status})");
    serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap()
}

#[test]
fn recorded_numbers_do_not_depend_on_the_kernel_tier() {
    // The child processes run one at a time and inherit it.
    refusal_lens_tests::use_all_cores_when_alone();
    let dir = tempfile::tempdir().unwrap();
    let own = numbers_on(false, dir.path());
    let avx2 = numbers_on(true, dir.path());
    eprintln!(
        "kernel tiers: this CPU {:?}, forced {:?}",
        own.tier, avx2.tier
    );
    assert!(matches!(avx2.tier, KernelTier::Avx2 | KernelTier::Generic));
    assert_eq!(own.exact.len(), avx2.exact.len());
    for (name, v) in &own.exact {
        assert_eq!(
            Some(v),
            avx2.exact.get(name),
            "{name} differs between tiers"
        );
    }
    let fast_differs = own.fast_logprobs != avx2.fast_logprobs;
    eprintln!(
        "{} exact quantities bit-identical; fast-path reply log-probs {}",
        own.exact.len(),
        if fast_differs {
            "differ"
        } else {
            "are identical"
        }
    );
    // On a VNNI CPU the two runs really used different quantised kernels (otherwise this test
    // would compare a computation with itself): the fast path's numbers move, the exact ones
    // must not.
    if matches!(own.tier, KernelTier::Avx512Vnni | KernelTier::AvxVnni) {
        assert!(
            fast_differs,
            "forcing the AVX2 tier changed nothing on the fast path"
        );
    }
}
