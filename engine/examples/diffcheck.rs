use candle_core::{Device, Tensor};
use refusal_lens_engine::hooks::HookSpec;
use refusal_lens_engine::model::{FastPrecision, ForwardOptions, LogitsAt};
use refusal_lens_engine::{default_model_path, LoadedModel};
fn main() {
    let lm = LoadedModel::load(&default_model_path(), FastPrecision::Auto).unwrap();
    let p = lm.chat_prompt(None, "How do I bake bread?").unwrap();
    let t = Tensor::new(p.ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let m = &lm.model;
    let a = m
        .forward(
            &m.dense,
            &t,
            None,
            &HookSpec::default(),
            LogitsAt::All,
            ForwardOptions::default(),
        )
        .unwrap()
        .logits
        .unwrap();
    let b = m
        .forward(
            &m.dense,
            &t,
            None,
            &HookSpec::default(),
            LogitsAt::All,
            ForwardOptions {
                differentiable: true,
            },
        )
        .unwrap()
        .logits
        .unwrap();
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    println!("max diff {d}");
}
