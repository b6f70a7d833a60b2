//! Tokenizers rebuilt from GGUF metadata against the reference: llama.cpp's vocabulary test
//! files, whose expected ids were written by each model's own HF tokenizer, on its corpus of
//! awkward strings (runs of spaces, tabs and newlines, digits, emoji, accents, Cyrillic, CJK,
//! byte fallback). SentencePiece (Llama 2 `llama-spm`, Phi-3) and byte-level BPE with each
//! family's pre-tokenizer split (Llama 3 `llama-bpe`, Qwen2, GPT-2, StarCoder, Refact,
//! DeepSeek). Fetched by tests/reference/fetch-vocabs.sh.

use std::path::PathBuf;

use refusal_lens_engine::model::loader::gguf_tokenizer;

fn vocab_dir() -> PathBuf {
    refusal_lens_engine::cache_dir().join("vocab")
}

/// `(text, expected ids)` of a vocabulary's test files.
fn cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let read = |ext: &str| {
        let path = vocab_dir().join(format!("ggml-vocab-{name}.gguf.{ext}"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; fetch it with tests/reference/fetch-vocabs.sh",
                path.display()
            )
        })
    };
    let inputs = read("inp");
    let mut texts: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
    // The file ends with the separator: the last piece is empty.
    texts.pop();
    let outputs = read("out");
    let ids: Vec<Vec<u32>> = outputs
        .lines()
        .map(|l| l.split_whitespace().map(|n| n.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), ids.len(), "{name}: inputs and outputs");
    texts.into_iter().map(String::from).zip(ids).collect()
}

fn check(name: &str) {
    let path = vocab_dir().join(format!("ggml-vocab-{name}.gguf"));
    let tok = gguf_tokenizer(&path).unwrap();
    let mut wrong = Vec::new();
    let all = cases(name);
    for (text, want) in &all {
        let got = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        if &got != want {
            wrong.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{name}: {} of {} differ:\n{}",
        wrong.len(),
        all.len(),
        wrong.join("\n")
    );
}

#[test]
fn sentencepiece_llama_matches_its_reference() {
    check("llama-spm");
}

#[test]
fn sentencepiece_phi3_matches_its_reference() {
    check("phi-3");
}

#[test]
fn llama3_bpe_matches_its_reference() {
    check("llama-bpe");
}

#[test]
fn qwen2_bpe_matches_its_reference() {
    check("qwen2");
}

#[test]
fn gpt2_starcoder_and_refact_bpe_match_their_references() {
    for name in ["gpt-2", "starcoder", "refact"] {
        check(name);
    }
}
