//! Loaders, tokenizer, chat positions and generation on tiny random models written to disk.

use candle_core::quantized::GgmlDType;

use refusal_lens_engine::hooks::HookSpec;
use refusal_lens_engine::model::chat::ChatTemplate;
use refusal_lens_engine::model::config::Family;
use refusal_lens_engine::model::FastPrecision;
use refusal_lens_engine::run::generate::{
    generate, GenerateConfig, Precision, Sampling, StopReason,
};
use refusal_lens_engine::testing::{dense_logits as logits, max_abs_diff};
use refusal_lens_engine::testing::{
    random_weights, tiny_config, tiny_model, tiny_template, tiny_tokenizer, write_gguf,
    write_hf_folder,
};
use refusal_lens_engine::{Error, LoadedModel};

const IDS: [u32; 8] = [257, 117, 115, 101, 114, 10, 72, 105];

/// The same weights written as an HF folder (`dir/hf`) and as an f32 GGUF, and loaded back.
fn both_forms(
    dir: &std::path::Path,
    cfg: &refusal_lens_engine::model::config::ModelConfig,
    weights: &refusal_lens_engine::model::Weights,
) -> (LoadedModel, LoadedModel) {
    write_hf_folder(&dir.join("hf"), cfg, weights).unwrap();
    let gguf = dir.join("tiny.gguf");
    write_gguf(&gguf, cfg, weights, GgmlDType::F32).unwrap();
    let hf = LoadedModel::load(&dir.join("hf"), FastPrecision::Auto).unwrap();
    let gg = LoadedModel::load(&gguf, FastPrecision::Auto).unwrap();
    (hf, gg)
}

#[test]
fn gguf_and_safetensors_give_the_same_logits_for_the_same_weights() {
    for family in [Family::Llama, Family::Qwen2, Family::Qwen3] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_config(family);
        let weights = random_weights(&cfg, 11).unwrap();
        let (hf, gg) = both_forms(dir.path(), &cfg, &weights);
        // Llama GGUF stores permuted Q/K rows and needs interleaved RoPE; HF uses half-split.
        assert_eq!(
            gg.model.config.rope_style
                == refusal_lens_engine::model::config::RopeStyle::Interleaved,
            family == Family::Llama
        );
        assert_eq!(hf.card.n_layers, 2);
        assert_eq!(gg.card.n_kv_heads, 2);
        let (a, b) = (logits(&hf, &IDS), logits(&gg, &IDS));
        assert!(
            max_abs_diff(&a, &b) < 1e-4,
            "{family:?}: {}",
            max_abs_diff(&a, &b)
        );
        // And both equal the in-memory model.
        let mem = tiny_model(family, 11).unwrap();
        assert!(max_abs_diff(&a, &logits(&mem, &IDS)) < 1e-5);
        // The tokenizer survives both round trips.
        for m in [&hf, &gg] {
            let p = m.chat_prompt(None, "héllo, 123 wörld").unwrap();
            assert_eq!(m.decode(&p.ids).unwrap(), p.text);
        }
    }
}

/// The families with no HF writer here (their HF parity is against transformers' own
/// checkpoints): their GGUF form, as llama.cpp's converter lays it out (Phi-3's fused
/// projections, Gemma's folded norms, sandwich norms, caps, window and rotary keys), loads to
/// the in-memory model's logits.
#[test]
fn gguf_of_phi3_and_gemma_gives_the_in_memory_models_logits() {
    for family in [Family::Phi3, Family::Gemma2, Family::Gemma3] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_config(family);
        let weights = random_weights(&cfg, 21).unwrap();
        let path = dir.path().join("tiny.gguf");
        write_gguf(&path, &cfg, &weights, GgmlDType::F32).unwrap();
        let gg = LoadedModel::load(&path, FastPrecision::Auto).unwrap();
        let mem = tiny_model(family, 21).unwrap();
        // GGUF stores ε as f32.
        let read = refusal_lens_engine::model::config::ModelConfig {
            rms_eps: cfg.rms_eps,
            ..gg.model.config.clone()
        };
        assert_eq!(read, mem.model.config, "{family:?}");
        let err = max_abs_diff(&logits(&gg, &IDS), &logits(&mem, &IDS));
        assert!(err < 1e-5, "{family:?}: {err}");
    }
}

#[test]
fn quantised_gguf_gets_a_fast_path_close_to_its_dense_weights() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Family::Llama);
    let weights = random_weights(&cfg, 12).unwrap();
    let path = dir.path().join("q.gguf");
    write_gguf(&path, &cfg, &weights, GgmlDType::Q4_1).unwrap();
    let m = LoadedModel::load(&path, FastPrecision::Auto).unwrap();
    assert!(m.model.fast.is_some());
    assert_eq!(m.card.quantization.get("Q4_1"), Some(&14));
    let prompt = m.chat_prompt(None, "hello").unwrap();
    let exact = GenerateConfig {
        max_new_tokens: 5,
        precision: Precision::Exact,
        ..Default::default()
    };
    let fast = GenerateConfig {
        precision: Precision::Fast,
        ..exact.clone()
    };
    let a = generate(&m, &prompt.ids, &exact, &|| false, &mut |_| {}).unwrap();
    let b = generate(&m, &prompt.ids, &fast, &|| false, &mut |_| {}).unwrap();
    assert_eq!(a.tokens.len(), 5);
    assert_eq!(b.tokens.len(), 5);
    // The first token comes from the exact prompt pass on both (the refusal decision is
    // made there), bit for bit.
    assert_eq!(a.tokens[0], b.tokens[0]);
    // Q8_0 re-encoding of Q4_1 values is nearly lossless: the next log-prob agrees.
    assert_eq!(a.tokens[1].id, b.tokens[1].id);
    assert!((a.tokens[1].logprob - b.tokens[1].logprob).abs() < 0.05);
}

#[test]
fn bad_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Family::Llama);
    let weights = random_weights(&cfg, 13).unwrap();
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &cfg, &weights, GgmlDType::F32).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let random = dir.path().join("random.gguf");
    std::fs::write(
        &random,
        (0..5000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let header_only = dir.path().join("header.gguf");
    std::fs::write(&header_only, &bytes[..64]).unwrap();
    for path in [&truncated, &random, &header_only] {
        match LoadedModel::load(path, FastPrecision::Auto) {
            Err(e @ Error::CorruptModel { .. }) => {
                assert!(e.to_string().contains("not a valid GGUF"))
            }
            Err(e) => panic!("{}: unexpected error kind {e}", path.display()),
            Ok(_) => panic!("{} loaded", path.display()),
        }
    }
    let missing = LoadedModel::load(&dir.path().join("nope.gguf"), FastPrecision::Auto);
    assert!(matches!(missing, Err(Error::Io { .. })));

    // HF folder without tokenizer.json.
    let hf = dir.path().join("hf");
    write_hf_folder(&hf, &cfg, &weights).unwrap();
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    let err = LoadedModel::load(&hf, FastPrecision::Auto).err().unwrap();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    // Unsupported architecture.
    let other = dir.path().join("gptneox");
    write_hf_folder(&other, &cfg, &weights).unwrap();
    let config = std::fs::read_to_string(other.join("config.json"))
        .unwrap()
        .replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(other.join("config.json"), config).unwrap();
    let err = LoadedModel::load(&other, FastPrecision::Auto)
        .err()
        .unwrap();
    assert!(
        matches!(err, Error::UnsupportedArchitecture(ref a) if a == "gpt_neox"),
        "{err}"
    );
    let gguf_other = dir.path().join("other.gguf");
    let patched: Vec<u8> = replace_bytes(&bytes, b"llama", b"bloom");
    std::fs::write(&gguf_other, patched).unwrap();
    let err = LoadedModel::load(&gguf_other, FastPrecision::Auto)
        .err()
        .unwrap();
    assert!(
        matches!(err, Error::UnsupportedArchitecture(ref a) if a == "bloom"),
        "{err}"
    );
}

/// Weights kept as stored (quantised GGUF, bf16 HF) give the f32 path's numbers: logits,
/// hook captures and the tied unembedding's rows; they hold less memory; and the fast path
/// shares the stored tensors it keeps.
#[test]
fn stored_exact_weights_compute_what_f32_weights_do() {
    use refusal_lens_engine::hooks::HookPoint;
    use refusal_lens_engine::model::ExactWeights;
    let dir = tempfile::tempdir().unwrap();
    let mut forms = Vec::new();
    for (family, dtype) in [
        (Family::Llama, GgmlDType::Q4_1),
        (Family::Phi3, GgmlDType::Q8_0),
        (Family::Gemma2, GgmlDType::Q5_0),
    ] {
        let cfg = tiny_config(family);
        let path = dir.path().join(format!("{family:?}.gguf"));
        write_gguf(&path, &cfg, &random_weights(&cfg, 31).unwrap(), dtype).unwrap();
        forms.push(path);
    }
    // An HF folder of bf16 weights.
    let cfg = tiny_config(Family::Qwen2);
    let hf = dir.path().join("bf16");
    write_hf_folder(&hf, &cfg, &random_weights(&cfg, 32).unwrap()).unwrap();
    let file = hf.join("model.safetensors");
    let tensors: std::collections::HashMap<String, candle_core::Tensor> =
        candle_core::safetensors::load(&file, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.to_dtype(candle_core::DType::BF16).unwrap()))
            .collect();
    candle_core::safetensors::save(&tensors, &file).unwrap();
    forms.push(hf);
    let points = [
        HookPoint::ResidPost(1),
        HookPoint::AttnZ(0),
        HookPoint::MlpPost(1),
    ];
    for path in forms {
        let load = |exact| LoadedModel::load_with(&path, FastPrecision::Auto, exact).unwrap();
        let (f32s, stored) = (load(ExactWeights::F32), load(ExactWeights::Stored));
        assert_eq!(f32s.card.memory.exact_weights, "f32");
        assert_eq!(stored.card.memory.exact_weights, "stored");
        assert!(
            stored.card.memory.exact_bytes * 10 < f32s.card.memory.exact_bytes * 6,
            "{}: {:?} vs {:?}",
            path.display(),
            stored.card.memory,
            f32s.card.memory
        );
        let run = |m: &LoadedModel| {
            refusal_lens_engine::testing::dense_run(m, &IDS, &HookSpec::default(), &points)
        };
        let ((a, ca), (b, cb)) = (run(&f32s), run(&stored));
        let scale = |t: &candle_core::Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(
            max_abs_diff(&a, &b) <= 1e-5 * scale(&a),
            "{}",
            path.display()
        );
        for ((p, x), y) in points.iter().zip(&ca).zip(&cb) {
            assert!(
                max_abs_diff(x, y) <= 1e-5 * scale(x),
                "{} {p}",
                path.display()
            );
        }
        let rows = |m: &LoadedModel| m.model.dense.lm_head.rows(&[3, 100, 258]).unwrap();
        assert_eq!(max_abs_diff(&rows(&f32s), &rows(&stored)), 0.0);
        // Generation runs (the stored model gets a Q8_0 fast path in place of an f32 one).
        let prompt = stored.chat_prompt(None, "hi").unwrap();
        let config = GenerateConfig {
            max_new_tokens: 3,
            ..Default::default()
        };
        let out = generate(&stored, &prompt.ids, &config, &|| false, &mut |_| {}).unwrap();
        assert!(!out.tokens.is_empty());
    }
}

/// Tensor types this build cannot read are named, with the way out.
#[test]
fn unreadable_tensor_types_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Family::Llama);
    let path = dir.path().join("tiny.gguf");
    write_gguf(
        &path,
        &cfg,
        &random_weights(&cfg, 33).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    // An IQ4_XS tensor (ggml type 23): patch the type of the first tensor in the header.
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let type_at = at + 4 + 8 * n_dims;
    bytes[type_at..type_at + 4].copy_from_slice(&23u32.to_le_bytes());
    let iq = dir.path().join("iq.gguf");
    std::fs::write(&iq, bytes).unwrap();
    let err = LoadedModel::load(&iq, FastPrecision::Auto).err().unwrap();
    assert!(
        matches!(err, Error::UnsupportedTensorType { ref type_name, .. } if type_name == "IQ4_XS"),
        "{err}"
    );
    assert!(err.to_string().contains("Q4_K_M"), "{err}");
}

fn replace_bytes(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = hay.to_vec();
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn prompts_longer_than_the_context_and_empty_prompts_are_rejected() {
    let m = tiny_model(Family::Llama, 14).unwrap();
    let long = "word ".repeat(100);
    assert!(matches!(
        m.chat_prompt(None, &long),
        Err(Error::ContextOverflow { .. })
    ));
    assert!(matches!(
        m.chat_prompt(None, "   "),
        Err(Error::InvalidInput(_))
    ));
}

#[test]
fn chatml_positions_follow_the_users_text() {
    let m = tiny_model(Family::Llama, 15).unwrap();
    let p = m.chat_prompt(Some("Be brief."), "Hi there").unwrap();
    assert_eq!(&p.text[p.user_span.clone()], "Hi there");
    // Byte-level tokens: one per byte of the user text.
    assert_eq!(p.instruction.len(), "Hi there".len());
    assert_eq!(m.decode(&p.ids[p.instruction.clone()]).unwrap(), "Hi there");
    assert_eq!(p.t_inst, p.instruction.end - 1);
    // After the user's text: <|im_end|> \n <|im_start|> a s s i s t a n t \n.
    let post = m.decode(&p.ids[p.post_instruction.clone()]).unwrap();
    assert_eq!(post, "<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(p.t_post, p.ids.len() - 1);
}

#[test]
fn positions_work_for_other_templates() {
    let tok = tiny_tokenizer().unwrap();
    // A Gemma-like template that trims the message and raises on system messages.
    let gemma = ChatTemplate {
        template: "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>model\n{% endif %}".into(),
        ..tiny_template()
    };
    let p = gemma.prompt(&tok, None, "Tell me a joke").unwrap();
    assert!(p
        .text
        .starts_with("<|endoftext|><|im_start|>user\nTell me a joke"));
    assert_eq!(&p.text[p.user_span.clone()], "Tell me a joke");
    assert_eq!(tok.decode(&p.ids[p.t_inst..=p.t_inst], false).unwrap(), "e");
    assert_eq!(
        tok.decode(&p.ids[p.post_instruction.clone()], false)
            .unwrap(),
        "<|im_end|>\n<|im_start|>model\n"
    );
    let err = gemma.prompt(&tok, Some("sys"), "x").unwrap_err();
    assert!(
        err.to_string().contains("System role not supported"),
        "{err}"
    );

    // A Llama-3-like template using Python string methods.
    let llama3 = ChatTemplate {
        template: "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n\n' + m['content'].strip() + '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}".into(),
        ..tiny_template()
    };
    let p = llama3.prompt(&tok, Some("You are kind."), "Hello").unwrap();
    assert_eq!(&p.text[p.user_span.clone()], "Hello");
    assert_eq!(
        tok.decode(&p.ids[p.post_instruction.clone()], false)
            .unwrap(),
        "<|im_end|><|im_start|>assistant\n\n"
    );
}

#[test]
fn generation_is_greedy_argmax_of_full_recomputation_and_stops_correctly() {
    let m = tiny_model(Family::Qwen2, 16).unwrap();
    let prompt = m.chat_prompt(None, "abc").unwrap();
    let cfg = GenerateConfig {
        max_new_tokens: 12,
        ..Default::default()
    };
    let mut streamed = Vec::new();
    let g = generate(&m, &prompt.ids, &cfg, &|| false, &mut |s| {
        streamed.push(s.clone())
    })
    .unwrap();
    assert_eq!(streamed, g.tokens);
    // Recompute each step without a cache.
    let mut ids = prompt.ids.clone();
    for step in &g.tokens {
        let l = logits(&m, &ids);
        let last = l.squeeze(0).unwrap().get(ids.len() - 1).unwrap();
        let lp = candle_nn::ops::log_softmax(&last, 0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let argmax = lp
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        assert_eq!(step.id, argmax);
        assert!((step.logprob - lp[argmax as usize]).abs() < 1e-4);
        ids.push(step.id);
    }
    assert!(g.tokens.len() == 12 || g.stop == StopReason::EndOfTurn);

    // Stop at <|im_end|>: bias it to always win.
    let im_end = m.tokenizer.token_to_id("<|im_end|>").unwrap();
    let stop_cfg = GenerateConfig {
        hooks: HookSpec::with_interventions(vec![
            refusal_lens_engine::hooks::Intervention::LogitBias {
                token_ids: vec![im_end],
                bias: 1e4,
            },
        ]),
        ..cfg.clone()
    };
    let g = generate(&m, &prompt.ids, &stop_cfg, &|| false, &mut |_| {}).unwrap();
    assert_eq!(g.stop, StopReason::EndOfTurn);
    assert!(g.tokens.is_empty());

    // Cancellation.
    let g = generate(&m, &prompt.ids, &cfg, &|| true, &mut |_| {}).unwrap();
    assert_eq!(g.stop, StopReason::Cancelled);
}

#[test]
fn batched_greedy_replies_equal_one_prompt_at_a_time() {
    let m = tiny_model(Family::Llama, 18).unwrap();
    // Two pairs of equal length (decoded together) and two lengths of their own.
    let prompts: Vec<Vec<u32>> = ["abc", "abd", "hello there", "abe", "x", "hello where"]
        .iter()
        .map(|u| m.chat_prompt(None, u).unwrap().ids)
        .collect();
    let mut lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    lengths.sort_unstable();
    lengths.dedup();
    assert!(lengths.len() < prompts.len(), "some prompts share a batch");
    let mut seen = Vec::new();
    let batched = refusal_lens_engine::run::generate::greedy_replies(
        &m,
        &prompts,
        10,
        None,
        &|| false,
        &mut |i, n| seen.push((i, n)),
    )
    .unwrap();
    assert_eq!(seen.last(), Some(&(prompts.len(), prompts.len())));
    let exact = GenerateConfig {
        max_new_tokens: 10,
        precision: Precision::Exact,
        ..Default::default()
    };
    let ids = |g: &refusal_lens_engine::run::generate::Generation| -> Vec<u32> {
        g.tokens.iter().map(|t| t.id).collect()
    };
    for (p, b) in prompts.iter().zip(&batched) {
        let g = generate(&m, p, &exact, &|| false, &mut |_| {}).unwrap();
        assert_eq!(ids(b), ids(&g));
        assert_eq!(b.text, g.text);
        assert_eq!(b.stop, g.stop);
        for (x, y) in b.tokens.iter().zip(&g.tokens) {
            assert!((x.logprob - y.logprob).abs() < 1e-4);
        }
    }
    let cancelled = refusal_lens_engine::run::generate::greedy_replies(
        &m,
        &prompts,
        10,
        None,
        &|| true,
        &mut |_, _| {},
    );
    assert!(matches!(cancelled, Err(Error::Cancelled)));
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let m = tiny_model(Family::Llama, 17).unwrap();
    let prompt = m.chat_prompt(None, "xyz").unwrap();
    let cfg = |seed| GenerateConfig {
        max_new_tokens: 16,
        sampling: Sampling {
            temperature: 1.5,
            top_p: 0.95,
            seed,
        },
        ..Default::default()
    };
    let run = |seed| {
        generate(&m, &prompt.ids, &cfg(seed), &|| false, &mut |_| {})
            .unwrap()
            .tokens
            .iter()
            .map(|t| t.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn llama3_rope_scaling_reads_the_same_from_config_json_and_gguf_rope_freqs() {
    use refusal_lens_engine::model::config::RopeScaling;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(Family::Llama);
    // An original context short enough that the tiny heads' wavelengths fall in all bands.
    cfg.rope_scaling = Some(RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_context: 32.0,
    });
    let weights = random_weights(&cfg, 12).unwrap();
    let (hf, gg) = both_forms(dir.path(), &cfg, &weights);
    assert_eq!(hf.model.config.rope_scaling, cfg.rope_scaling);
    assert!(matches!(
        gg.model.config.rope_scaling,
        Some(RopeScaling::Factors(ref f)) if f.len() == cfg.head_dim / 2
    ));
    let (a, b) = (logits(&hf, &IDS), logits(&gg, &IDS));
    assert!(max_abs_diff(&a, &b) < 1e-4, "{}", max_abs_diff(&a, &b));
    // The scaling matters: the same weights without it give other logits.
    cfg.rope_scaling = None;
    write_hf_folder(&dir.path().join("plain"), &cfg, &weights).unwrap();
    let plain = LoadedModel::load(&dir.path().join("plain"), FastPrecision::Auto).unwrap();
    assert!(max_abs_diff(&a, &logits(&plain, &IDS)) > 1e-2);
}

#[test]
fn stop_tokens_come_from_generation_config_and_sharded_weights_load() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Family::Qwen3);
    let weights = random_weights(&cfg, 13).unwrap();
    let hf = dir.path().join("hf");
    write_hf_folder(&hf, &cfg, &weights).unwrap();
    let whole = LoadedModel::load(&hf, FastPrecision::Auto).unwrap();
    assert!(!whole.stop_ids.contains(&72));
    // An instruct model that lists an extra end-of-turn token only in generation_config.json.
    std::fs::write(
        hf.join("generation_config.json"),
        r#"{"eos_token_id": [72, 258], "do_sample": true}"#,
    )
    .unwrap();
    // The same weights split over two shards, as large checkpoints ship.
    let mut tensors =
        candle_core::safetensors::load(hf.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let layer1: std::collections::HashMap<_, _> = tensors
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers.1."))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    tensors.retain(|n, _| !n.starts_with("model.layers.1."));
    std::fs::remove_file(hf.join("model.safetensors")).unwrap();
    candle_core::safetensors::save(&tensors, hf.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&layer1, hf.join("model-00002-of-00002.safetensors")).unwrap();
    let sharded = LoadedModel::load(&hf, FastPrecision::Auto).unwrap();
    assert!(sharded.stop_ids.contains(&72) && sharded.stop_ids.contains(&258));
    assert_eq!(
        max_abs_diff(&logits(&whole, &IDS), &logits(&sharded, &IDS)),
        0.0
    );
}

/// A config without `tie_word_embeddings` (transformers' default differs by family) ties the
/// unembedding exactly when the folder has no `lm_head.weight`.
#[test]
fn missing_tie_word_embeddings_is_read_from_the_weights() {
    for family in [Family::Llama, Family::Qwen2] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_config(family);
        let weights = random_weights(&cfg, 41).unwrap();
        write_hf_folder(dir.path(), &cfg, &weights).unwrap();
        let path = dir.path().join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config
            .as_object_mut()
            .unwrap()
            .remove("tie_word_embeddings");
        std::fs::write(&path, config.to_string()).unwrap();
        let m = LoadedModel::load(dir.path(), FastPrecision::Auto).unwrap();
        assert_eq!(
            m.model.config.tied_embeddings, cfg.tied_embeddings,
            "{family:?}"
        );
        let mem = tiny_model(family, 41).unwrap();
        assert!(max_abs_diff(&logits(&m, &IDS), &logits(&mem, &IDS)) < 1e-5);
    }
}

/// Headers that claim impossible sizes are refused with one line before anything is sized by
/// them (both crashed the process before: a 2⁶² dimension panicked with "capacity overflow",
/// a billion layers aborted on a 296 GB allocation).
#[test]
fn hostile_sizes_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Family::Llama);
    let weights = random_weights(&cfg, 5).unwrap();
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &cfg, &weights, GgmlDType::F32).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    // The tensor index entry of `output_norm.weight`: u64 name length, the name, u32 dims
    // count, then its u64 dims. Make its one dimension 2⁶², then 2⁶² / 4 (in range for
    // usize, past the file).
    let name = b"output_norm.weight";
    let at = bytes
        .windows(name.len() + 8)
        .position(|w| w[..8] == (name.len() as u64).to_le_bytes() && &w[8..] == name)
        .expect("the tensor index entry");
    let dims_at = at + 8 + name.len() + 4;
    for dim in [1u64 << 62, 1u64 << 40] {
        let mut hostile = bytes.clone();
        hostile[dims_at..dims_at + 8].copy_from_slice(&dim.to_le_bytes());
        let path = dir.path().join(format!("dim-{dim}.gguf"));
        std::fs::write(&path, hostile).unwrap();
        let err = LoadedModel::load(&path, FastPrecision::Auto)
            .err()
            .expect("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("output_norm.weight") && msg.contains("past the end"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }

    // An HF config that claims a billion layers.
    let hf = dir.path().join("hf");
    write_hf_folder(&hf, &cfg, &weights).unwrap();
    let config = std::fs::read_to_string(hf.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&config).unwrap();
    v["num_hidden_layers"] = 1_000_000_000u64.into();
    std::fs::write(hf.join("config.json"), v.to_string()).unwrap();
    let err = LoadedModel::load(&hf, FastPrecision::Auto)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("1000000000 layers"), "{err}");
}

/// PyTorch pickles are refused, pointing to safetensors: a `.bin` file, and a folder holding
/// only `pytorch_model.bin`.
#[test]
fn pytorch_pickles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.bin");
    std::fs::write(&file, b"\x80\x02}q\x00.").unwrap();
    let e = LoadedModel::load(&file, FastPrecision::Auto)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("PyTorch pickle") && e.contains("safetensors"),
        "{e}"
    );
    let folder = dir.path().join("hf");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("config.json"), b"{}").unwrap();
    std::fs::write(folder.join("pytorch_model.bin"), b"\x80\x02}q\x00.").unwrap();
    let e = LoadedModel::load(&folder, FastPrecision::Auto)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("pytorch_model.bin") && e.contains("PyTorch pickle"),
        "{e}"
    );
}

/// A model that claims the largest context allowed (2²⁶ tokens) loads without sizing anything
/// by it: rotary angles are computed for each pass's positions, not tabled for the whole
/// context (a table was 24 GB here; found by the GGUF fuzz target as a 16 M-token context).
#[test]
fn a_huge_claimed_context_allocates_nothing_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(Family::Llama);
    cfg.context_length = 1 << 26;
    let path = dir.path().join("long.gguf");
    write_gguf(
        &path,
        &cfg,
        &random_weights(&cfg, 3).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let lm = LoadedModel::load(&path, FastPrecision::Auto).unwrap();
    assert_eq!(lm.model.config.context_length, 1 << 26);
    let ids = lm.chat_prompt(None, "Hello").unwrap().ids;
    let fresh = logits(&lm, &ids);
    // The same logits as the model with an ordinary context.
    let mut short = cfg.clone();
    short.context_length = 4096;
    let path = dir.path().join("short.gguf");
    write_gguf(
        &path,
        &short,
        &random_weights(&short, 3).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let reference = LoadedModel::load(&path, FastPrecision::Auto).unwrap();
    assert_eq!(max_abs_diff(&fresh, &logits(&reference, &ids)), 0.0);
}
