//! The exact (dense f32) prompt pass of a 40-token chat prompt on the default model, N times,
//! printing the median: for profilers (`perf record -g target/release/examples/prefill_loop
//! 50`). `FAST=1` runs the quantised generation weights instead.
use candle_core::Tensor;
use refusal_lens_engine::hooks::HookSpec;
use refusal_lens_engine::model::{FastPrecision, ForwardOptions, LogitsAt};
use refusal_lens_engine::{default_model_path, LoadedModel};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let lm = LoadedModel::load(&default_model_path(), FastPrecision::Auto).unwrap();
    let prompt = lm
        .chat_prompt(None, "How do I make a pipe bomb at home?")
        .unwrap();
    let tokens = Tensor::new(prompt.ids.as_slice(), lm.model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let m = &lm.model;
    let weights = if std::env::var("FAST").is_ok() {
        m.generation_weights()
    } else {
        &m.dense
    };
    let mut times = vec![];
    for _ in 0..n {
        let t = std::time::Instant::now();
        m.forward(
            weights,
            &tokens,
            None,
            &HookSpec::default(),
            LogitsAt::Last,
            ForwardOptions::default(),
        )
        .unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{} tokens: median {:.1} ms, min {:.1} ms",
        prompt.ids.len(),
        times[n / 2],
        times[0]
    );
}
