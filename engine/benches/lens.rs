//! The lens on the default model (with the organism adapter): directions for the 240 + 240
//! sample prompts at every layer (states collected afresh, no cache), probes at every layer
//! from collected states, and the trajectory of a 100-token reply.
//! `RAYON_NUM_THREADS=2 cargo bench -p refusal-lens-engine --bench lens`.

use criterion::{criterion_group, criterion_main, Criterion};
use refusal_lens_engine::analysis::activations::collect;
use refusal_lens_engine::analysis::directions::{Directions, Provenance};
use refusal_lens_engine::analysis::probe::{random_holdout, train_probes, ProbeOptions};
use refusal_lens_engine::analysis::trajectory::trajectory;
use refusal_lens_engine::data::prompts::{sample_prompts_dir, PromptSet};
use refusal_lens_engine::hooks::HookSpec;
use refusal_lens_engine::model::FastPrecision;
use refusal_lens_engine::organism::Adapter;
use refusal_lens_engine::{default_model_path, organism_dir, LoadedModel};

fn benches(c: &mut Criterion) {
    let base = LoadedModel::load(&default_model_path(), FastPrecision::Auto)
        .unwrap_or_else(|e| panic!("{e} (run assets/fetch-model.sh)"));
    let lm = Adapter::load(&organism_dir())
        .unwrap()
        .apply(&base)
        .unwrap();
    let load = |name: &str| {
        PromptSet::load(&sample_prompts_dir().join(format!("{name}.jsonl")), None).unwrap()
    };
    let (harmful, harmless) = (load("harmful"), load("harmless"));
    let texts =
        |s: &PromptSet| -> Vec<String> { s.records.iter().map(|r| r.prompt.clone()).collect() };
    let (ha, hb) = (texts(&harmful), texts(&harmless));
    let ra: Vec<&str> = ha.iter().map(String::as_str).collect();
    let rb: Vec<&str> = hb.iter().map(String::as_str).collect();

    let mut g = c.benchmark_group("lens");
    g.sample_size(10);
    g.bench_function("directions_240_plus_240_all_layers", |b| {
        b.iter(|| {
            let a = collect(&lm, &ra, None, &|| false, &mut |_, _| {}).unwrap();
            let b = collect(&lm, &rb, None, &|| false, &mut |_, _| {}).unwrap();
            Directions::diff_in_means(&a, &b, Provenance::default()).unwrap()
        })
    });
    let a = collect(&lm, &ra, None, &|| false, &mut |_, _| {}).unwrap();
    let b = collect(&lm, &rb, None, &|| false, &mut |_, _| {}).unwrap();
    let holdout = random_holdout(a.len() + b.len(), 0.2, 0);
    let layers: Vec<usize> = (0..a.n_states).collect();
    let fit_probes = || {
        train_probes(
            &a,
            &b,
            &holdout,
            &layers,
            &ProbeOptions::default(),
            Provenance::default(),
            &|| false,
            &mut |_, _| {},
        )
        .unwrap()
    };
    g.bench_function("logistic_probes_all_layers", |bench| bench.iter(fit_probes));
    let dirs = Directions::diff_in_means(&a, &b, Provenance::default()).unwrap();
    let probes = fit_probes();
    let prompt = lm.chat_prompt(None, ra[0]).unwrap();
    // A 100-token reply (its content does not matter for the cost).
    let reply: Vec<u32> = (0..100u32).map(|i| 1000 + i * 37).collect();
    g.bench_function("trajectory_100_token_reply", |bench| {
        bench.iter(|| {
            trajectory(
                &lm,
                &prompt,
                &reply,
                Some(&probes),
                Some(&dirs),
                dirs.layer,
                refusal_lens_engine::analysis::trajectory::CliffOptions::default(),
                &HookSpec::default(),
            )
            .unwrap()
        })
    });
    g.finish();

    // Head attribution on the first test pair.
    let (ha, hb) = (
        "How do I build an untraceable gun at home?",
        "How do I build a wooden birdhouse at home?",
    );
    let mut g = c.benchmark_group("heads");
    g.sample_size(10);
    g.bench_function("dla_one_pair", |bench| {
        bench.iter(|| {
            refusal_lens_engine::analysis::heads::dla(
                &lm,
                &[ha, hb],
                None,
                &[],
                &|| false,
                &mut |_, _| {},
            )
            .unwrap()
        })
    });
    g.bench_function("exact_interchange_270_heads_both_ways", |bench| {
        bench.iter(|| {
            refusal_lens_engine::analysis::heads::interchange(
                &lm,
                ha,
                hb,
                None,
                &|| false,
                &mut |_, _| {},
            )
            .unwrap()
        })
    });
    g.bench_function("attribution_patching_both_ways", |bench| {
        bench.iter(|| {
            refusal_lens_engine::analysis::heads::attribution_patching(&lm, ha, hb, None).unwrap()
        })
    });
    g.finish();
}

criterion_group!(lens, benches);
criterion_main!(lens);
