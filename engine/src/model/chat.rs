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
    /// Passed to the template as `enable_thinking` (Qwen3's switch; templates without one
    /// ignore it, and R1-distill templates always open a thinking span).
    pub enable_thinking: bool,
}

/// The markers reasoning models put around their thinking text.
pub const THINK_OPEN: &str = "<think>";
pub const THINK_CLOSE: &str = "</think>";

/// Where the thinking text is in a token sequence (prompt + reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThinkingSpan {
    /// The token that completes `<think>`.
    pub open: usize,
    /// The token where `</think>` starts; None while the model is still thinking.
    pub close: Option<usize>,
}

impl ThinkingSpan {
    /// The thinking text's tokens (between the markers) of a sequence of `len` tokens.
    pub fn tokens(&self, len: usize) -> Range<usize> {
        (self.open + 1).min(len)..self.close.unwrap_or(len)
    }

    /// Finds the first `<think>` … `</think>` span starting at or after token `from` in a
    /// sequence given as each token's text (markers split over several tokens are found
    /// too).
    pub fn find(token_texts: &[String], from: usize) -> Option<ThinkingSpan> {
        let mut text = String::new();
        let mut ends = Vec::with_capacity(token_texts.len()); // byte end of each token
        for t in token_texts {
            text.push_str(t);
            ends.push(text.len());
        }
        let start = if from == 0 {
            0
        } else {
            ends[from.min(ends.len()) - 1]
        };
        let token_at = |byte: usize| ends.partition_point(|&e| e <= byte);
        let open_at = start + text[start..].find(THINK_OPEN)?;
        let open = token_at(open_at + THINK_OPEN.len() - 1);
        let after = ends[open];
        let close = text[after..].find(THINK_CLOSE).map(|i| token_at(after + i));
        Some(ThinkingSpan { open, close })
    }
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

/// Instructions a chat template may run for one render.
pub const TEMPLATE_FUEL: u64 = 2_000_000;
/// Bytes a chat template may write for one render (the user's text counts).
pub const TEMPLATE_MAX_BYTES: usize = 8 << 20;

/// The rendered text, refused past [`TEMPLATE_MAX_BYTES`].
#[derive(Default)]
struct CappedText {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for CappedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > TEMPLATE_MAX_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("template output too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A marker no template changes and no user types, used to find where the user's text lands.
const MARKER: &str = "\u{E000}refusal-lens-user-text\u{E001}";

impl ChatTemplate {
    /// True when the template knows reasoning: a thinking switch or `<think>` markers.
    pub fn supports_thinking(&self) -> bool {
        self.template.contains("enable_thinking") || self.template.contains(THINK_OPEN)
    }

    fn environment(&self) -> Result<Environment<'_>> {
        let mut env = Environment::new();
        // A chat template comes with a downloaded model: untrusted code. Fuel bounds the
        // instructions it may run (real templates render two messages in a few thousand).
        env.set_fuel(Some(TEMPLATE_FUEL));
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
        let mut out = CappedText::default();
        env.get_template("chat")
            .and_then(|t| {
                t.render_captured_to(
                    context! {
                        messages => messages,
                        add_generation_prompt => true,
                        enable_thinking => self.enable_thinking,
                        bos_token => self.bos_token,
                        eos_token => self.eos_token,
                    },
                    &mut out,
                )
                .map(|_| ())
            })
            .map_err(|e| match out.overflowed {
                true => Error::Template(format!(
                    "the template writes more than {TEMPLATE_MAX_BYTES} bytes for one prompt"
                )),
                false => Error::Template(format!("rendering failed: {e}")),
            })?;
        String::from_utf8(out.bytes)
            .map_err(|_| Error::Template("the template wrote invalid UTF-8".into()))
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

#[cfg(test)]
mod hostile_template_tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate {
            source: TemplateSource::TokenizerConfig,
            template: source.into(),
            bos_token: String::new(),
            eos_token: String::new(),
            enable_thinking: false,
        }
    }

    /// An untrusted template cannot loop or write without bound: fuel stops a loop of 10¹⁰
    /// steps, the output cap a template that writes megabytes per step; both in well under a
    /// second, as one-line errors.
    #[test]
    fn hostile_templates_stop_with_a_reason() {
        let start = std::time::Instant::now();
        let loops = template(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        );
        let e = loops.render(None, "hi").unwrap_err().to_string();
        assert!(e.contains("fuel") || e.contains("range"), "{e}");
        let big = template("{% for i in range(10000) %}{{ messages[0]['content'] }}{% endfor %}");
        let e = big
            .render(None, &"y".repeat(1 << 20))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than"), "{e}");
        assert!(start.elapsed().as_secs_f64() < 5.0);
        // A real template still renders.
        assert!(template("{{ messages[0]['content'] }}")
            .render(None, "hi")
            .is_ok());
    }
}
