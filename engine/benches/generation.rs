//! Prefill and generation on the default model, plain and with one steering vector, and the
//! forward pass with every residual captured. `RAYON_NUM_THREADS=2 cargo bench -p refusal-lens-engine`.

use candle_core::Tensor;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use refusal_lens_engine::hooks::{HookPoint, HookSpec, Intervention, Positions};
use refusal_lens_engine::model::{FastPrecision, ForwardOptions, LogitsAt};
use refusal_lens_engine::run::generate::{generate, GenerateConfig};
use refusal_lens_engine::{default_model_path, LoadedModel};

const PROMPT: &str = "Write a long story about a dragon who learns to fly.";
const NEW_TOKENS: usize = 64;

fn steering(lm: &LoadedModel) -> HookSpec {
    let d = lm.model.config.d_model;
    let v: Vec<f32> = (0..d)
        .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5)
        .collect();
    HookSpec::with_interventions(vec![Intervention::AddVector {
        point: HookPoint::ResidPre(lm.model.config.n_layers / 2),
        vector: Tensor::from_vec(v, d, lm.model.device()).unwrap(),
        scale: 1.0,
        positions: Positions::All,
    }])
}

fn benches(c: &mut Criterion) {
    let path = default_model_path();
    let lm = LoadedModel::load(&path, FastPrecision::Auto)
        .unwrap_or_else(|e| panic!("{e} (run assets/fetch-model.sh)"));
    let prompt = lm.chat_prompt(None, PROMPT).unwrap();
    let tokens = Tensor::new(prompt.ids.as_slice(), lm.model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let m = &lm.model;

    let mut g = c.benchmark_group("prefill");
    g.sample_size(20)
        .throughput(Throughput::Elements(prompt.ids.len() as u64));
    g.bench_function("fast", |b| {
        b.iter(|| {
            m.forward(
                m.generation_weights(),
                &tokens,
                None,
                &HookSpec::default(),
                LogitsAt::Last,
                ForwardOptions::default(),
            )
            .unwrap()
        })
    });
    let captures = HookSpec::capture((0..m.config.n_layers).map(HookPoint::ResidPre));
    g.bench_function("dense_all_resid_captures", |b| {
        b.iter(|| {
            m.forward(
                &m.dense,
                &tokens,
                None,
                &captures,
                LogitsAt::All,
                ForwardOptions::default(),
            )
            .unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("generate_64");
    g.sample_size(10)
        .throughput(Throughput::Elements(NEW_TOKENS as u64));
    for (name, hooks) in [("plain", HookSpec::default()), ("steered", steering(&lm))] {
        let cfg = GenerateConfig {
            max_new_tokens: NEW_TOKENS,
            hooks,
            ..Default::default()
        };
        g.bench_function(name, |b| {
            b.iter(|| generate(&lm, &prompt.ids, &cfg, &|| false, &mut |_| {}).unwrap())
        });
    }
    g.finish();
}

criterion_group!(engine, benches);
criterion_main!(engine);
