//! [`LoadedModel`]: a model ready to use, with its tokenizer, chat template and card.

use std::path::Path;

use super::chat::{ChatPrompt, ChatTemplate};
use super::loader::{Checkpoint, ModelCard};
use super::{BlockWeights, ExactWeights, FastPrecision, Model, Weights};
use crate::hooks::HookSpec;
use crate::{default_model_path, Error, Result, FETCH_COMMAND};

/// A model ready to use: weights, tokenizer, chat template and card. Cloning shares weights.
#[derive(Clone)]
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: tokenizers::Tokenizer,
    pub template: ChatTemplate,
    /// Tokens that end a reply (EOS and end-of-turn tokens).
    pub stop_ids: Vec<u32>,
    pub card: ModelCard,
    /// The blocks that write a reply once a refusal gate has chosen `[respond]`: a
    /// refusal-token adapter sets the base model's, so the adapter only decides and the answer
    /// is the base model's own (the 135M organism's adapted blocks open about one harmless
    /// answer in nine with a refusal). `None`: the model writes every reply itself.
    pub respond_blocks: Option<RespondBlocks>,
}

/// Transformer blocks for the reply after `[respond]` (see [`LoadedModel::respond_blocks`]);
/// the vocabulary (embedding, unembedding) stays the model's own.
#[derive(Clone, Debug)]
pub struct RespondBlocks {
    pub dense: Vec<BlockWeights>,
    /// For the fast path, when the model has one.
    pub fast: Option<Vec<BlockWeights>>,
}

impl LoadedModel {
    /// The refusal gate's threshold τ: calibrated for this model's refusal tokens if its
    /// adapter says so, else `crate::refusal::DEFAULT_TAU`.
    pub fn refusal_tau(&self) -> f32 {
        self.card.gate_tau()
    }

    /// The weights that write the reply after `[respond]`, exact and for generation (the
    /// fast path when there is one), when [`LoadedModel::respond_blocks`] is set.
    pub fn respond_weights(&self) -> Option<(Weights, Weights)> {
        let blocks = self.respond_blocks.as_ref()?;
        let with = |w: &Weights, blocks: &[BlockWeights]| Weights {
            embed: w.embed.clone(),
            blocks: blocks.to_vec(),
            final_norm: w.final_norm.clone(),
            lm_head: w.lm_head.clone(),
        };
        let dense = with(&self.model.dense, &blocks.dense);
        let generation = match (&self.model.fast, &blocks.fast) {
            (Some(fast), Some(fast_blocks)) => with(fast, fast_blocks),
            _ => dense.clone(),
        };
        Some((dense, generation))
    }

    /// Loads a GGUF file or an HF safetensors folder.
    pub fn load(path: &Path, precision: FastPrecision) -> Result<Self> {
        Self::load_with(path, precision, ExactWeights::Auto)
    }

    /// [`LoadedModel::load`] with the exact path's weights held as `exact` says (f32, or as
    /// stored and dequantised per matrix on use).
    pub fn load_with(path: &Path, precision: FastPrecision, exact: ExactWeights) -> Result<Self> {
        if path == default_model_path() && !path.exists() {
            return Err(Error::DefaultModelMissing {
                path: path.to_path_buf(),
                fetch: FETCH_COMMAND,
            });
        }
        Self::from_checkpoint(Checkpoint::load_with(path, exact)?, precision)
    }

    pub fn from_checkpoint(ck: Checkpoint, precision: FastPrecision) -> Result<Self> {
        let (model, tokenizer, template, mut stop_ids, card) = ck.into_model(precision)?;
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(LoadedModel {
            model,
            tokenizer,
            template,
            stop_ids,
            card,
            respond_blocks: None,
        })
    }

    /// This model on `device`: itself when it is there already, else [`Self::to_device`].
    pub fn into_device(self, device: &candle_core::Device) -> Result<LoadedModel> {
        if self.model.device().same_device(device) {
            return Ok(self);
        }
        self.to_device(device)
    }

    /// This model on `device` (weights copied; see [`crate::device`]).
    pub fn to_device(&self, device: &candle_core::Device) -> Result<LoadedModel> {
        let blocks = |b: &[BlockWeights]| -> Result<Vec<BlockWeights>> {
            b.iter().map(|b| b.to_device(device)).collect()
        };
        let respond_blocks = match &self.respond_blocks {
            Some(r) => Some(RespondBlocks {
                dense: blocks(&r.dense)?,
                fast: r.fast.as_deref().map(blocks).transpose()?,
            }),
            None => None,
        };
        let mut card = self.card.clone();
        card.device = crate::device::device_name(device);
        Ok(LoadedModel {
            model: self.model.to_device(device)?,
            tokenizer: self.tokenizer.clone(),
            template: self.template.clone(),
            stop_ids: self.stop_ids.clone(),
            card,
            respond_blocks,
        })
    }

    /// Renders the chat prompt for `user` (and an optional system message) and finds its
    /// positions; fails if it does not fit the context.
    pub fn chat_prompt(&self, system: Option<&str>, user: &str) -> Result<ChatPrompt> {
        let prompt = self.template.prompt(&self.tokenizer, system, user)?;
        let max = self.model.config.context_length;
        if prompt.ids.len() >= max {
            return Err(Error::ContextOverflow {
                len: prompt.ids.len(),
                max,
            });
        }
        Ok(prompt)
    }

    /// Adds special tokens with their embedding (and, untied, unembedding) rows `[n, d]`;
    /// returns their ids. Existing tokens keep their ids and logits.
    pub fn add_tokens(&mut self, names: &[&str], rows: &candle_core::Tensor) -> Result<Vec<u32>> {
        self.add_tokens_untied(names, rows, rows)
    }

    /// Like [`LoadedModel::add_tokens`] with separate input (embedding) and output
    /// (unembedding) rows.
    pub fn add_tokens_untied(
        &mut self,
        names: &[&str],
        input: &candle_core::Tensor,
        output: &candle_core::Tensor,
    ) -> Result<Vec<u32>> {
        let first = self.model.config.vocab_size as u32;
        if names
            .iter()
            .any(|n| self.tokenizer.token_to_id(n).is_some())
        {
            return Err(Error::InvalidInput(format!(
                "the vocabulary already has one of {names:?}"
            )));
        }
        let added: Vec<tokenizers::AddedToken> = names
            .iter()
            .map(|n| tokenizers::AddedToken::from(n.to_string(), true))
            .collect();
        self.tokenizer
            .add_special_tokens(added)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let ids: Vec<u32> = names
            .iter()
            .filter_map(|n| self.tokenizer.token_to_id(n))
            .collect();
        if ids != (first..first + names.len() as u32).collect::<Vec<_>>() {
            return Err(Error::Tokenizer(format!(
                "new tokens got ids {ids:?}, expected them after the {first} existing ones"
            )));
        }
        self.model.append_vocabulary(input, output)?;
        self.card.vocab_size = self.model.config.vocab_size;
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        super::tokenizer::decode(&self.tokenizer, ids)
    }

    /// A behavioural fingerprint: SHA-256 of the shape and of the exact logits on a fixed
    /// token sequence. Any change to the weights (an adapter, another file) changes it, so
    /// cached activations and saved directions can be matched to the model that made them.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let cfg = &self.model.config;
        let n = 8.min(cfg.vocab_size);
        let ids: Vec<u32> = (0..n as u32)
            .map(|i| (i * 7919 + 11) % cfg.vocab_size as u32)
            .collect();
        let t = candle_core::Tensor::new(ids.as_slice(), self.model.device())?.unsqueeze(0)?;
        let logits = self
            .model
            .forward(
                &self.model.dense,
                &t,
                None,
                &HookSpec::default(),
                super::LogitsAt::All,
                super::ForwardOptions::default(),
            )?
            .logits
            .expect("LogitsAt::All yields logits")
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut h = Sha256::new();
        h.update(format!("{cfg:?}").as_bytes());
        for v in logits {
            h.update(v.to_le_bytes());
        }
        Ok(format!("{:x}", h.finalize()))
    }

    /// The text of one token (byte-level pieces decoded). A piece that is part of a
    /// multi-byte character, which decodes to U+FFFD alone, shows as the vocabulary spells it
    /// (`<0xE2>`, or GPT-2's byte characters) so every token stays distinguishable.
    pub fn token_text(&self, id: u32) -> String {
        match self.decode(&[id]) {
            Ok(text) if !text.contains('\u{FFFD}') => text,
            _ => self
                .tokenizer
                .id_to_token(id)
                .unwrap_or_else(|| format!("<{id}>")),
        }
    }
}
