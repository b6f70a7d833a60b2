use candle_core::{Device, Tensor};
use refusal_lens_engine::hooks::{HookPoint, HookSpec};
use refusal_lens_engine::model::{FastPrecision, ForwardOptions, LogitsAt};
use refusal_lens_engine::{default_model_path, LoadedModel};
use std::time::Instant;

fn time<F: FnMut()>(name: &str, n: usize, mut f: F) {
    f();
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    println!(
        "{name:40} {:8.2} ms",
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    );
}

fn main() {
    let lm = LoadedModel::load(&default_model_path(), FastPrecision::Auto).unwrap();
    let p = lm
        .chat_prompt(None, "Write a long story about a dragon who learns to fly.")
        .unwrap();
    let toks = Tensor::new(p.ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let m = &lm.model;
    let caps = HookSpec::capture((0..30).map(HookPoint::ResidPre));
    if std::env::args().nth(1).as_deref() == Some("decode") {
        let mut cache = refusal_lens_engine::model::KvCache::new(30);
        m.forward(
            m.generation_weights(),
            &toks,
            Some(&mut cache),
            &HookSpec::default(),
            LogitsAt::Last,
            ForwardOptions::default(),
        )
        .unwrap();
        let one = Tensor::new(&[42u32], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        time("decode step", 300, || {
            let mut c = cache.clone();
            m.forward(
                m.generation_weights(),
                &one,
                Some(&mut c),
                &HookSpec::default(),
                LogitsAt::Last,
                ForwardOptions::default(),
            )
            .unwrap();
        });
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("dense") {
        time("dense none", 40, || {
            m.forward(
                &m.dense,
                &toks,
                None,
                &HookSpec::default(),
                LogitsAt::None,
                ForwardOptions::default(),
            )
            .unwrap();
        });
        return;
    }
    time("dense none", 10, || {
        m.forward(
            &m.dense,
            &toks,
            None,
            &HookSpec::default(),
            LogitsAt::None,
            ForwardOptions::default(),
        )
        .unwrap();
    });
    time("dense all logits", 10, || {
        m.forward(
            &m.dense,
            &toks,
            None,
            &HookSpec::default(),
            LogitsAt::All,
            ForwardOptions::default(),
        )
        .unwrap();
    });
    time("dense captures none", 10, || {
        m.forward(
            &m.dense,
            &toks,
            None,
            &caps,
            LogitsAt::None,
            ForwardOptions::default(),
        )
        .unwrap();
    });
    time("fast last", 10, || {
        m.forward(
            m.generation_weights(),
            &toks,
            None,
            &HookSpec::default(),
            LogitsAt::Last,
            ForwardOptions::default(),
        )
        .unwrap();
    });
    let x = Tensor::randn(0f32, 1.0, (42, 576), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 1.0, (1536, 576), &Device::Cpu).unwrap();
    let wt = w.t().unwrap().contiguous().unwrap();
    time("matmul x w.t (strided)", 50, || {
        x.matmul(&w.t().unwrap()).unwrap();
    });
    time("matmul x wt (contig)", 50, || {
        x.matmul(&wt).unwrap();
    });
    let x1 = Tensor::randn(0f32, 1.0, (1, 576), &Device::Cpu).unwrap();
    time("matvec x1 w.t", 200, || {
        x1.matmul(&w.t().unwrap()).unwrap();
    });
    let big = Tensor::randn(0f32, 1.0, (1, 42, 1536), &Device::Cpu).unwrap();
    time("silu 42x1536", 200, || {
        candle_nn::ops::silu(&big).unwrap();
    });
    time("mul 42x1536", 200, || {
        (&big * &big).unwrap();
    });
    // decode step
    let mut cache = refusal_lens_engine::model::KvCache::new(30);
    m.forward(
        m.generation_weights(),
        &toks,
        Some(&mut cache),
        &HookSpec::default(),
        LogitsAt::Last,
        ForwardOptions::default(),
    )
    .unwrap();
    let one = Tensor::new(&[42u32], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    time("fast decode step (cache cloned)", 50, || {
        let mut c = cache.clone();
        m.forward(
            m.generation_weights(),
            &one,
            Some(&mut c),
            &HookSpec::default(),
            LogitsAt::Last,
            ForwardOptions::default(),
        )
        .unwrap();
    });
    time("fast decode step no logits", 50, || {
        let mut c = cache.clone();
        m.forward(
            m.generation_weights(),
            &one,
            Some(&mut c),
            &HookSpec::default(),
            LogitsAt::None,
            ForwardOptions::default(),
        )
        .unwrap();
    });
    let h = m.generation_weights().lm_head.clone();
    let x1 = Tensor::randn(0f32, 1.0, (1, 1, 576), &Device::Cpu).unwrap();
    time("lm_head q8 matvec", 50, || {
        h.forward(&x1).unwrap();
    });
    let q = m.generation_weights().blocks[0].gate.clone();
    time("gate q8 matvec", 200, || {
        q.forward(&x1).unwrap();
    });
}
