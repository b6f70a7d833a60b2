//! Chat templates (the model's own Jinja template, rendered with minijinja) and the token
//! positions docs/methods.md defines: instruction tokens, t_inst, post-instruction tokens, t_post.

use std::ops::Range;

use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::model::tokenizer::{encode_with_offsets, ByteSpan};
use crate::{Error, Result};

/// Where the template came from (shown on the model card).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TemplateSource {
    Gguf,
    TokenizerConfig,
    /// The model ships none; plain ChatML is used.
    FallbackChatMl,
}

impl std::fmt::Display for TemplateSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TemplateSource::Gguf => "GGUF tokenizer.chat_template",
            TemplateSource::TokenizerConfig => "tokenizer_config.json chat_template",
            TemplateSource::FallbackChatMl => "built-in ChatML (the model ships no template)",
        })
    }
}

pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub source: TemplateSource,
    pub template: String,
    pub bos_token: String,
    pub eos_token: String,
}

/// A rendered chat prompt, tokenized, with its positions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatPrompt {
    pub text: String,
    pub ids: Vec<u32>,
    /// Byte offsets of each token in `text`.
    pub offsets: Vec<ByteSpan>,
    /// Byte range of the user's text in `text`.
    pub user_span: Range<usize>,
    /// Token indices of the user's text.
    pub instruction: Range<usize>,
    /// Last token of the user's text.
    pub t_inst: usize,
    /// Template tokens after the user's text, up to the end of the prompt.
    pub post_instruction: Range<usize>,
    /// Last prompt token: its logits give the first reply token.
    pub t_post: usize,
}

/// A marker no template changes and no user types, used to find where the user's text lands.
const MARKER: &str = "\u{E000}refusal-lens-user-text\u{E001}";

impl ChatTemplate {
    fn environment(&self) -> Result<Environment<'_>> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it to stamp a date into the system prompt; a fixed date keeps
            // analyses reproducible.
            fmt.replace("%Y", "2026")
                .replace("%m", "01")
                .replace("%d", "01")
                .replace("%B", "January")
                .replace("%b", "Jan")
        });
        env.add_template("chat", &self.template)
            .map_err(|e| Error::Template(format!("cannot parse the model's template: {e}")))?;
        Ok(env)
    }

    /// Renders `[system?, user]` with the generation prompt appended.
    pub fn render(&self, system: Option<&str>, user: &str) -> Result<String> {
        let env = self.environment()?;
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(context! { role => "system", content => system });
        }
        messages.push(context! { role => "user", content => user });
        env.get_template("chat")
            .and_then(|t| {
                t.render(context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => self.bos_token,
                    eos_token => self.eos_token,
                })
            })
            .map_err(|e| Error::Template(format!("rendering failed: {e}")))
    }

    /// Renders and tokenizes a prompt and locates its positions from character offsets.
    pub fn prompt(&self, tok: &Tokenizer, system: Option<&str>, user: &str) -> Result<ChatPrompt> {
        if user.trim().is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        // Render once with a marker to learn the text before and after the user's message,
        // then find the real message between them.
        let marked = self.render(system, MARKER)?;
        let (before, after) = marked.split_once(MARKER).ok_or_else(|| {
            Error::Template("the template does not copy the user's message verbatim".into())
        })?;
        let text = self.render(system, user)?;
        if !text.starts_with(before)
            || !text.ends_with(after)
            || text.len() < before.len() + after.len()
        {
            return Err(Error::Template(
                "the template transforms the user's message; cannot locate it in the prompt".into(),
            ));
        }
        let user_span = before.len()..text.len() - after.len();
        let (ids, offsets) = encode_with_offsets(tok, &text)?;
        let overlaps = |&(s, e): &(usize, usize)| s < user_span.end && e > user_span.start;
        let first = offsets.iter().position(overlaps);
        let last = offsets.iter().rposition(overlaps);
        let (Some(first), Some(last)) = (first, last) else {
            return Err(Error::Template("no token covers the user's message".into()));
        };
        let t_post = ids.len() - 1;
        if last >= t_post {
            return Err(Error::Template(
                "the template adds nothing after the user's message; t_post would equal t_inst"
                    .into(),
            ));
        }
        Ok(ChatPrompt {
            text,
            ids,
            offsets,
            user_span,
            instruction: first..last + 1,
            t_inst: last,
            post_instruction: last + 1..t_post + 1,
            t_post,
        })
    }
}
