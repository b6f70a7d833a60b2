//! Tokenizers: from a `tokenizer.json`, or rebuilt from GGUF metadata (byte-level BPE).

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::{Error, Result};

/// GGUF `tokenizer.ggml.token_type` value for control tokens (`<|im_start|>`, …).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// … and for user-defined added tokens.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// What a GGUF file says about its tokenizer.
pub struct GgufVocab<'a> {
    pub model: &'a str,
    pub pre: Option<&'a str>,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub token_types: Vec<i32>,
}

/// Rebuilds a byte-level BPE tokenizer from GGUF metadata, the way llama.cpp reads it:
/// the pre-tokenizer splits digits one by one for the `smollm`/`starcoder` families, then applies
/// GPT-2 byte-level splitting; control tokens stay single ids.
pub fn from_gguf_vocab(v: &GgufVocab<'_>) -> Result<Tokenizer> {
    if v.model != "gpt2" {
        return Err(Error::Tokenizer(format!(
            "GGUF tokenizer model `{}` is not supported (only byte-level BPE, `gpt2`); open the model's HF folder with its tokenizer.json instead",
            v.model
        )));
    }
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
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let splits_digits = matches!(v.pre, Some("smollm" | "starcoder" | "refact"));
    let pre: PreTokenizerWrapper = if splits_digits {
        Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
    } else {
        byte_level.into()
    };
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = v
        .tokens
        .iter()
        .zip(&v.token_types)
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
        .map(|(tok, &t)| AddedToken::from(tok.clone(), t == TOKEN_TYPE_CONTROL))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(tokenizer)
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
