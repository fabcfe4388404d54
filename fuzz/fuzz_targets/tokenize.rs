//! Tokenization with every prompt choice, token limit and truncation, on both fixture tokenizers:
//! never a panic; at most `limit` tokens; a cut text is exactly `limit` long and reported as cut;
//! with truncation off an over-long text is refused, not cut; a refusal means it does not fit;
//! a text that fits is the same whatever the limit and truncation side.
#![no_main]

mod fixture;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mlx_embed::error::Error;
use mlx_embed::models::PromptChoice;
use mlx_embed::tokenize::Truncation;

#[derive(Arbitrary, Debug)]
enum Prompt {
    Default,
    None,
    Name(String),
    Known(u8),
    Instruction(String),
}

#[derive(Arbitrary, Debug)]
struct Input {
    model: bool,
    prompt: Prompt,
    text: String,
    max_tokens: Option<u8>,
    truncation: u8,
}

fuzz_target!(|input: Input| {
    let f = &fixture::fixtures()[usize::from(input.model)];
    let info = &f.pre.info;
    let choice = match input.prompt {
        Prompt::Default => PromptChoice::Default,
        Prompt::None => PromptChoice::None,
        Prompt::Name(n) => PromptChoice::Name(n),
        Prompt::Known(k) => match info.prompts.keys().nth(k as usize % info.prompts.len().max(1)) {
            Some(n) => PromptChoice::Name(n.clone()),
            None => PromptChoice::None,
        },
        Prompt::Instruction(t) => PromptChoice::Instruction(t),
    };
    let prompt = match f.pre.prompt(&choice) {
        Ok(p) => p,
        Err(Error::InvalidArgument { field, .. }) => return assert_eq!(field, "prompt_name"),
        Err(other) => panic!("{other:?}"),
    };
    let max_tokens = input.max_tokens.map(|m| usize::from(m).max(1));
    let limit = max_tokens.unwrap_or(info.max_tokens).min(info.max_tokens);
    let truncation = [Truncation::Off, Truncation::Right, Truncation::Left][input.truncation as usize % 3];
    let result = f.pre.tokenize(&prompt, &input.text, max_tokens, truncation);
    let whole = f.pre.tokenize(&prompt, &input.text, Some(usize::MAX), Truncation::Off);
    match (&result, &whole) {
        (Ok(e), _) => {
            assert!(!e.ids.is_empty() && e.ids.len() <= limit, "{} tokens, limit {limit}", e.ids.len());
            if e.truncated {
                assert_ne!(truncation, Truncation::Off);
                assert_eq!(e.ids.len(), limit, "a cut text fills the limit");
            } else if let Ok(w) = &whole {
                assert_eq!(&e.ids, &w.ids, "a text that fits is not changed by the limit");
            }
        }
        (Err(Error::InvalidArgument { field, .. }), Ok(w)) => {
            // Refused only when it does not fit: with truncation off, or when the limit leaves no
            // room for text after the special tokens and the prompt.
            assert!(w.ids.len() > limit, "refused although it fits: {result:?}");
            assert!(truncation == Truncation::Off || field == "max_tokens" || field == "prompt", "{result:?}");
        }
        // No tokens at all, or far too long with truncation off: refused either way.
        (Err(Error::InvalidArgument { .. }), Err(Error::InvalidArgument { .. })) => {}
        (Err(other), _) => panic!("{other:?}"),
    }
});
