//! Tokenizers: from a `tokenizer.json`, or rebuilt from GGUF metadata the way llama.cpp reads
//! it: byte-level BPE (`gpt2`, with the pre-tokenizer split its `pre` names) or SentencePiece
//! (`llama`: scores, byte fallback, `▁` for spaces).

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::{Error, Result};

/// GGUF `tokenizer.ggml.token_type` value for control tokens (`<|im_start|>`, …).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// … and for user-defined added tokens.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// SentencePiece's space symbol.
const SPACE: char = '\u{2581}';

/// What a GGUF file says about its tokenizer.
pub struct GgufVocab<'a> {
    pub model: &'a str,
    pub pre: Option<&'a str>,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub token_types: Vec<i32>,
    /// SentencePiece piece scores (`tokenizer.ggml.scores`); empty for BPE.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece; llama.cpp's default is true).
    pub add_space_prefix: Option<bool>,
    /// `general.architecture`: Gemma's SentencePiece vocabularies need their own reading.
    pub architecture: &'a str,
}

/// Rebuilds the tokenizer a GGUF file describes.
pub fn from_gguf_vocab(v: &GgufVocab<'_>) -> Result<Tokenizer> {
    let mut tokenizer = match v.model {
        "gpt2" => byte_level_bpe(v)?,
        "llama" => sentencepiece(v)?,
        other => {
            return Err(Error::Tokenizer(format!(
                "GGUF tokenizer model `{other}` is not supported (supported: gpt2 byte-level BPE, llama SentencePiece); open the model's HF folder with its tokenizer.json instead"
            )))
        }
    };
    // Control tokens stay whole and are special; user-defined ones (`<think>`) stay whole.
    let added = |kind: i32| -> Vec<AddedToken> {
        v.tokens
            .iter()
            .zip(&v.token_types)
            .filter(|(_, &t)| t == kind)
            .map(|(tok, _)| AddedToken::from(tok.clone(), kind == TOKEN_TYPE_CONTROL))
            .collect()
    };
    tokenizer
        .add_special_tokens(added(TOKEN_TYPE_CONTROL))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    tokenizer
        .add_tokens(added(TOKEN_TYPE_USER_DEFINED))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(tokenizer)
}

/// The split of a `tokenizer.ggml.pre` family, where it is not GPT-2's.
/// The pre-tokenizer splits of llama.cpp's `tokenizer.ggml.pre` families whose regex differs
/// from GPT-2's (the patterns of their tokenizer.json files): Llama 3 (three-digit numbers) …
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// … and Qwen2 (one digit at a time).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
fn pre_split(pre: Option<&str>) -> Option<&'static str> {
    match pre? {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => {
            Some(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

/// Byte-level BPE: GPT-2's byte alphabet and merges, split first by the family's regex (or
/// digit by digit for the `smollm`/`starcoder` families, then GPT-2's regex).
fn byte_level_bpe(v: &GgufVocab<'_>) -> Result<Tokenizer> {
    let mut vocab = Vocab::default();
    for (id, tok) in v.tokens.iter().enumerate() {
        vocab.insert(tok.clone(), id as u32);
    }
    let merges = v
        .merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::Tokenizer(format!("malformed merge rule `{m}`")))
        })
        .collect::<Result<Vec<_>>>()?;
    // Llama 3 takes a split that is itself a token whole, merges or not (llama.cpp's and
    // its tokenizer.json's `ignore_merges`).
    let ignore_merges = pre_split(v.pre).is_some_and(|p| p == LLAMA3_SPLIT);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let splits_digits = matches!(v.pre, Some("smollm" | "starcoder" | "refact"));
    let pre: PreTokenizerWrapper = match pre_split(v.pre) {
        Some(pattern) => {
            let split = Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        None if splits_digits => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        None => ByteLevel::new(false, true, true).into(),
    };
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

/// SentencePiece BPE as llama.cpp runs it: spaces become `▁` (and, with the space prefix, a
/// `▁` starts every text span, also after a special token), pieces merge best score first,
/// and characters outside the vocabulary fall back to byte tokens `<0xAB>`. The merges are
/// the file's, or derived from the vocabulary: every split of a piece into two pieces, ranked
/// by the piece's score (Gemma: by its position in the file, which its scores do not follow).
fn sentencepiece(v: &GgufVocab<'_>) -> Result<Tokenizer> {
    let gemma = v.architecture.starts_with("gemma");
    // Gemma stores its runs of spaces as spaces; the merges spell them with `▁`.
    let tokens: Vec<String> = v
        .tokens
        .iter()
        .map(|t| {
            if gemma && t.chars().count() > 1 && t.chars().all(|c| c == ' ') {
                SPACE.to_string().repeat(t.chars().count())
            } else {
                t.clone()
            }
        })
        .collect();
    let ids: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    let merges = if v.merges.is_empty() {
        let scores: Vec<f32> = if gemma || v.scores.len() != tokens.len() {
            (0..tokens.len()).map(|i| -(i as f32)).collect()
        } else {
            v.scores.clone()
        };
        derived_merges(&tokens, &ids, &scores)
    } else {
        v.merges
            .iter()
            .filter_map(|m| m.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(i as u32);
    }
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true);
    if ids.contains_key("<unk>") {
        builder = builder.unk_token("<unk>".into());
    }
    let bpe = builder
        .build()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let prefix = v.add_space_prefix.unwrap_or(!gemma);
    let space =
        Replace::new(" ", SPACE.to_string()).map_err(|e| Error::Tokenizer(e.to_string()))?;
    let normalizer: NormalizerWrapper = if prefix {
        tokenizers::normalizers::Sequence::new(vec![
            Prepend::new(SPACE.to_string()).into(),
            space.into(),
        ])
        .into()
    } else {
        space.into()
    };
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let unspace = tokenizers::decoders::DecoderWrapper::Replace(
        Replace::new(SPACE.to_string(), " ").map_err(|e| Error::Tokenizer(e.to_string()))?,
    );
    let mut decoders: Vec<DecoderWrapper> = vec![
        unspace,
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Every way to cut a piece into two pieces of the vocabulary, best-scoring piece first
/// (ties: the longer left part, then the longer right part, then vocabulary order).
fn derived_merges(
    tokens: &[String],
    ids: &HashMap<&str, u32>,
    scores: &[f32],
) -> Vec<(String, String)> {
    let mut merges: Vec<(f32, usize, usize, String, String)> = Vec::new();
    for (t, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(u32, u32, usize, String, String)> = t
            .char_indices()
            .skip(1)
            .filter_map(|(cut, _)| {
                let (l, r) = t.split_at(cut);
                Some((
                    *ids.get(l)?,
                    *ids.get(r)?,
                    cut,
                    l.to_string(),
                    r.to_string(),
                ))
            })
            .collect();
        local.sort_by_key(|&(l, r, ..)| (l, r));
        merges.extend(
            local
                .into_iter()
                .map(|(_, _, _, l, r)| (score, l.chars().count(), r.chars().count(), l, r)),
        );
    }
    // A stable sort, descending: equal keys keep vocabulary order.
    merges.sort_by(|a, b| {
        (b.0, b.1, b.2)
            .partial_cmp(&(a.0, a.1, a.2))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    merges.into_iter().map(|(_, _, _, l, r)| (l, r)).collect()
}

pub fn from_file(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(Error::MissingFile {
            path: path.parent().unwrap_or(path).to_path_buf(),
            what: "tokenizer.json".into(),
        });
    }
    Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
}

/// A token's byte range `(start, end)` in the text it came from.
pub type ByteSpan = (usize, usize);

/// Encodes text that already contains the chat template's special tokens (no BOS is added:
/// the template writes it when the model wants one).
pub fn encode_with_offsets(tok: &Tokenizer, text: &str) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
    let enc = tok
        .encode(text, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
}

pub fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))
}

/// Decodes a stream of ids piece by piece, emitting text only once it is complete UTF-8
/// (a multi-byte character can span tokens).
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder {
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = decode(tok, &self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let piece = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(piece)
    }
}
