//! Text → token ids with the model's own `tokenizer.json` (the `tokenizers` crate, as the reference
//! uses): prompt prefixes, special tokens, the `<|endoftext|>` Qwen3-Embedding pools on (appended
//! here when the tokenizer's post-processor does not), and truncation that keeps special tokens.
//! Thread-safe: tokenization runs off the MLX thread.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection};

use crate::error::{Error, Result};

/// What to do with a text longer than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Truncation {
    /// Fail with the token count and the limit.
    Off,
    /// Keep the beginning.
    #[default]
    Right,
    /// Keep the end.
    Left,
}

/// Bytes per token no real token exceeds; texts longer than `max_tokens` times this are cut by
/// bytes before tokenizing.
const MAX_BYTES_PER_TOKEN: usize = 256;

/// The largest char boundary at or before `i`.
fn char_floor(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Token ids of one text, and whether it was cut to the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub truncated: bool,
}

pub struct TextTokenizer {
    inner: Tokenizer,
    /// A token to append after the post-processor (Qwen3's `<|endoftext|>` when it is missing).
    append: Option<u32>,
    /// Special tokens the post-processor adds to one sequence.
    added: usize,
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json`. `eos_token` names a token every sequence must end with
    /// (appended unless the post-processor already adds it).
    pub fn load(dir: &Path, eos_token: Option<&str>) -> Result<TextTokenizer> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::file(&path, "missing (the model's tokenizer)"));
        }
        let mut inner = Tokenizer::from_file(&path).map_err(|e| Error::file(&path, format!("cannot load tokenizer: {e}")))?;
        // Length limits and padding are ours to apply.
        inner.with_truncation(None).map_err(|e| Error::file(&path, e.to_string()))?;
        inner.with_padding(None);
        let added = inner.get_post_processor().map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
        let mut tok = TextTokenizer { inner, append: None, added };
        if let Some(eos) = eos_token {
            let id = tok.inner.token_to_id(eos).ok_or_else(|| {
                Error::file(&path, format!("has no `{eos}` token, which this architecture pools on"))
            })?;
            let probe = tok.encode_raw("a")?;
            if probe.last() != Some(&id) {
                tok.append = Some(id);
                tok.added += 1;
            }
        }
        Ok(tok)
    }

    /// Whether `load` found it had to append the end token itself.
    pub fn appends_eos(&self) -> bool {
        self.append.is_some()
    }

    fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `prompt + text` with special tokens, at most `max_tokens` long. Truncation
    /// cuts the text, never the prompt or the special tokens.
    pub fn encode(&self, prompt: &str, text: &str, max_tokens: usize, truncation: Truncation) -> Result<Encoded> {
        // A text far beyond the limit is cut by bytes first (no token is that long), so a huge
        // input costs no more to tokenize than one near the limit.
        let budget = max_tokens.saturating_mul(MAX_BYTES_PER_TOKEN);
        let (text, cut_by_bytes) = if text.len() <= budget {
            (text, false)
        } else {
            match truncation {
                Truncation::Off => return Err(Error::invalid("text", format!(
                    "{} bytes are far more than the limit of {max_tokens} tokens and truncation is off", text.len()))),
                Truncation::Right => (&text[..char_floor(text, budget)], true),
                Truncation::Left => (&text[char_floor(text, text.len() - budget)..], true),
            }
        };
        let encode = |s: &str| self.inner.encode(s, false).map_err(|e| Error::Tokenizer(e.to_string()));
        let mut enc = encode(&format!("{prompt}{text}"))?;
        let total = enc.len() + self.added;
        let truncated = cut_by_bytes || total > max_tokens;
        if total > max_tokens {
            if max_tokens <= self.added {
                return Err(Error::invalid("max_tokens", format!("{max_tokens} leaves no room for text")));
            }
            let keep = max_tokens - self.added;
            match truncation {
                Truncation::Off => {
                    return Err(Error::invalid("text", format!(
                        "{total} tokens exceed the limit of {max_tokens} and truncation is off")))
                }
                Truncation::Right => enc.truncate(keep, 0, TruncationDirection::Right),
                Truncation::Left => {
                    // Keep the prompt's tokens at the front and the end of the text after them.
                    let p = if prompt.is_empty() { 0 } else { encode(prompt)?.len() };
                    if p >= keep {
                        return Err(Error::invalid("prompt", format!(
                            "the prompt alone has {p} tokens, leaving no room for text within {max_tokens}")));
                    }
                    let mut tail = enc.clone();
                    tail.truncate(keep - p, 0, TruncationDirection::Left);
                    tail.take_overflowing();
                    enc.truncate(p, 0, TruncationDirection::Right);
                    enc.take_overflowing();
                    enc.merge_with(tail, false);
                }
            }
            enc.take_overflowing();
        }
        let enc = self.inner.post_process(enc, None, true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        ids.extend(self.append);
        Ok(Encoded { ids, truncated })
    }

    /// Tokens the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The text of token `id`, if the tokenizer has it.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}
