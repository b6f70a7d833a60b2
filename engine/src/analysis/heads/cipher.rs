//! The cipher contrast: DLA of plain harmful prompts minus that of their cipher versions.

use serde::{Deserialize, Serialize};

use crate::{Error, LoadedModel, Result};

use super::{dla, dla_difference, HeadMap};

/// In-context substitution ciphers for the cipher contrast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cipher {
    /// Shift letters by 3.
    Caesar,
    /// a↔z, b↔y, …
    Atbash,
    /// A random letter permutation from this seed.
    Random(u64),
}

impl Cipher {
    fn key(self) -> Vec<char> {
        let alphabet: Vec<char> = ('a'..='z').collect();
        match self {
            Cipher::Caesar => alphabet
                .iter()
                .map(|&c| (((c as u8 - b'a' + 3) % 26) + b'a') as char)
                .collect(),
            Cipher::Atbash => alphabet.iter().rev().copied().collect(),
            Cipher::Random(seed) => {
                use rand::seq::SliceRandom;
                use rand::SeedableRng;
                let mut k = alphabet.clone();
                k.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
                k
            }
        }
    }

    /// `text` with every letter substituted (case kept).
    pub fn encode(self, text: &str) -> String {
        let key = self.key();
        text.chars()
            .map(|c| {
                if c.is_ascii_lowercase() {
                    key[(c as u8 - b'a') as usize]
                } else if c.is_ascii_uppercase() {
                    key[(c.to_ascii_lowercase() as u8 - b'a') as usize].to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    }

    /// The user message: the key stated, then the encoded request.
    pub fn wrap(self, text: &str) -> String {
        let key: String = self.key().into_iter().collect();
        format!(
            "The message below is written in a substitution cipher. Plain letters abcdefghijklmnopqrstuvwxyz map to cipher letters {key}. Decode it and answer it.\n\n{}",
            self.encode(text)
        )
    }
}

impl std::str::FromStr for Cipher {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "caesar" => Ok(Cipher::Caesar),
            "atbash" => Ok(Cipher::Atbash),
            "random" => Ok(Cipher::Random(0)),
            _ => Err(Error::InvalidInput(format!(
                "unknown cipher `{s}` (use caesar, atbash or random)"
            ))),
        }
    }
}

/// Cipher contrast: mean DLA of the plain prompts minus that of their cipher versions.
pub fn cipher_contrast(
    lm: &LoadedModel,
    prompts: &[&str],
    cipher: Cipher,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<HeadMap> {
    let wrapped: Vec<String> = prompts.iter().map(|p| cipher.wrap(p)).collect();
    let wrapped: Vec<&str> = wrapped.iter().map(String::as_str).collect();
    let plain = dla(lm, prompts, None, &[], cancelled, progress)?;
    let coded = dla(lm, &wrapped, None, &[], cancelled, progress)?;
    dla_difference(&plain, &coded)
}
