//! Request validation and conversion, pure (no MLX, no I/O): prompt selection, Matryoshka sizes,
//! user-supplied vector checks, output finishing and encoding. Errors name the request field.

use crate::config::{ModelConfig, TruncationChoice};
use crate::error::{Error, Result};
use crate::grpc::pb;
use crate::models::{finish, ModelInfo, Preprocessor, PromptChoice};
use crate::tokenize::{Encoded, Truncation};

/// Per-request limits from the config.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_items: usize,
    pub max_text_bytes: usize,
}

/// An Embed request, checked: its texts to tokenize (with their item index), the answers of its
/// vector items, and how to prompt, cut and encode.
#[derive(Debug)]
pub struct PreparedEmbed {
    pub texts: Vec<(usize, String)>,
    /// One slot per item; vector items are answered already.
    pub out: Vec<Option<pb::Embedding>>,
    pub prompt: String,
    pub truncation: Truncation,
    pub encoding: pb::Encoding,
    pub dims: usize,
    pub normalize: bool,
}

/// Checks an Embed request for model `pre` (configured as `cfg`) and converts it; every error
/// names the field at fault. (`model` is resolved by the caller.)
pub fn prepare_embed(req: pb::EmbedRequest, pre: &Preprocessor, cfg: &ModelConfig, limits: &RequestLimits) -> Result<PreparedEmbed> {
    let info = &pre.info;
    if req.items.is_empty() {
        return Err(Error::invalid("items", "at least one item is needed"));
    }
    if req.items.len() > limits.max_items {
        return Err(Error::invalid("items", format!("{} items exceed the limit of {}", req.items.len(), limits.max_items)));
    }
    check_length("instruction", &req.instruction, limits.max_text_bytes)?;
    let (prompt, truncation) = text_options(pre, cfg, req.input_type, &req.prompt_name, &req.instruction, req.truncation)?;
    let encoding = pb::Encoding::try_from(req.encoding)
        .map_err(|_| Error::invalid("encoding", format!("unknown value {}", req.encoding)))?;
    let dims = dimensions(req.dimensions, info, cfg)?;
    let normalize = req.normalize.unwrap_or(info.normalize);
    let full = info.dimensions as usize;

    // Split the items: texts go to the model, vectors are checked here.
    let mut texts = Vec::new();
    let mut out: Vec<Option<pb::Embedding>> = vec![None; req.items.len()];
    for (i, item) in req.items.into_iter().enumerate() {
        match item.input {
            Some(pb::item::Input::Text(t)) => {
                check_text(&format!("items[{i}].text"), &t, limits.max_text_bytes)?;
                texts.push((i, t));
            }
            Some(pb::item::Input::Vector(v)) => {
                let v = user_vector(i, v.values, full, dims, normalize)?;
                out[i] = Some(encode(v, encoding, 0, false));
            }
            None => return Err(Error::invalid(format!("items[{i}]"), "set either text or vector")),
        }
    }
    Ok(PreparedEmbed { texts, out, prompt, truncation, encoding, dims, normalize })
}

/// The prompt text and truncation a request selects (Embed and Tokenize share the options).
pub fn text_options(pre: &Preprocessor, cfg: &ModelConfig, input_type: i32, prompt_name: &str, instruction: &str, truncation: i32) -> Result<(String, Truncation)> {
    let choice = prompt_choice(input_type, prompt_name, instruction, &pre.info, cfg)?;
    Ok((pre.prompt(&choice)?, self::truncation(truncation, cfg)?))
}

/// Token ids of each text (after `prompt`); an error names the item.
pub fn tokenize_texts(pre: &Preprocessor, prompt: &str, texts: &[(usize, String)], max_tokens: Option<usize>, truncation: Truncation) -> Result<Vec<Encoded>> {
    texts.iter().map(|(i, t)| {
        pre.tokenize(prompt, t, max_tokens, truncation).map_err(|e| match e {
            Error::InvalidArgument { message, .. } => Error::invalid(format!("items[{i}].text"), message),
            other => other,
        })
    }).collect()
}

/// Refuses a text to embed or tokenize that is empty or longer than `max_bytes`. Empty is refused
/// whatever the prompt and special tokens would add: the vector of an empty text is never what a
/// caller meant to store (a blank chunk, a missing field), and Tokenize must show what Embed
/// would take.
pub fn check_text(field: &str, text: &str, max_bytes: usize) -> Result<()> {
    if text.is_empty() {
        return Err(Error::invalid(field, "empty text"));
    }
    check_length(field, text, max_bytes)
}

/// Refuses a text (or instruction) longer than `max_bytes`.
pub fn check_length(field: &str, text: &str, max_bytes: usize) -> Result<()> {
    if text.len() > max_bytes {
        return Err(Error::invalid(field, format!("{} bytes exceed the limit of {max_bytes} (limits.max_text_bytes)", text.len())));
    }
    Ok(())
}

/// The prompt a request selects: at most one of `input_type`, `prompt_name` and `instruction`.
pub fn prompt_choice(input_type: i32, prompt_name: &str, instruction: &str, info: &ModelInfo, cfg: &ModelConfig) -> Result<PromptChoice> {
    let input = pb::InputType::try_from(input_type)
        .map_err(|_| Error::invalid("input_type", format!("unknown value {input_type}")))?;
    let given = [input != pb::InputType::Unspecified, !prompt_name.is_empty(), !instruction.is_empty()];
    if given.iter().filter(|g| **g).count() > 1 {
        let field = if given[0] && given[1] { "prompt_name" } else { "instruction" };
        return Err(Error::invalid(field, "give at most one of input_type, prompt_name and instruction"));
    }
    Ok(match input {
        pb::InputType::Query => {
            if !info.prompts.contains_key("query") {
                return Err(Error::invalid("input_type", "this model has no `query` prompt"));
            }
            PromptChoice::Name("query".into())
        }
        pb::InputType::Document if info.prompts.contains_key("document") => PromptChoice::Name("document".into()),
        pb::InputType::Document => PromptChoice::None,
        pb::InputType::Unspecified if !prompt_name.is_empty() => PromptChoice::Name(prompt_name.to_string()),
        pb::InputType::Unspecified if !instruction.is_empty() => PromptChoice::Instruction(instruction.to_string()),
        pb::InputType::Unspecified => match &cfg.default_prompt {
            Some(name) => PromptChoice::Name(name.clone()),
            None => PromptChoice::Default,
        },
    })
}

/// The truncation a request asks for, or the model's configured default.
pub fn truncation(value: i32, cfg: &ModelConfig) -> Result<Truncation> {
    Ok(match pb::Truncation::try_from(value).map_err(|_| Error::invalid("truncation", format!("unknown value {value}")))? {
        pb::Truncation::None => Truncation::Off,
        pb::Truncation::End => Truncation::Right,
        pb::Truncation::Start => Truncation::Left,
        pb::Truncation::Unspecified => match cfg.truncation {
            TruncationChoice::End => Truncation::Right,
            TruncationChoice::Start => Truncation::Left,
            TruncationChoice::None => Truncation::Off,
        },
    })
}

/// Sizes a model's vectors may be cut to: the config's list, else the model's own.
pub fn allowed_dimensions(info: &ModelInfo, cfg: &ModelConfig) -> Vec<u32> {
    match &cfg.allowed_dimensions {
        Some(list) => list.iter().copied().filter(|&d| i64::from(d) <= i64::from(info.dimensions)).collect(),
        None => info.allowed_dimensions.iter().map(|&d| d as u32).collect(),
    }
}

/// The output size a request asks for (`None`: the model's full size).
pub fn dimensions(requested: Option<u32>, info: &ModelInfo, cfg: &ModelConfig) -> Result<usize> {
    let full = info.dimensions as usize;
    match requested {
        None => Ok(full),
        Some(d) if d as usize == full || allowed_dimensions(info, cfg).contains(&d) => Ok(d as usize),
        Some(d) => {
            let allowed = allowed_dimensions(info, cfg);
            let list = match (allowed.first(), allowed.last()) {
                (Some(hi), Some(lo)) if allowed.len() > 8 => format!("{lo} to {hi}"),
                _ => allowed.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
            };
            Err(Error::invalid("dimensions", format!("{d} is not allowed for this model (allowed: {list})")))
        }
    }
}

/// Checks a user-supplied vector (item `index`) and makes it the output vector: its length must be
/// the model's full size (then it is cut like a computed one) or the requested size.
pub fn user_vector(index: usize, values: Vec<f32>, full: usize, dims: usize, normalize: bool) -> Result<Vec<f32>> {
    let field = format!("items[{index}].vector.values");
    if values.len() != full && values.len() != dims {
        let want = if dims == full { format!("{full}") } else { format!("{full} (the model's size) or {dims} (the requested dimensions)") };
        return Err(Error::invalid(field, format!("has {} values, expected {want}", values.len())));
    }
    if let Some(j) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!("{field}[{j}]"), format!("{} is not a finite number", values[j])));
    }
    let cut = dims.min(values.len());
    let which = if cut == values.len() { "its norm".to_string() } else { format!("the norm of its first {cut} values") };
    let norm = l2_norm(&values[..cut]);
    let v = finish(values, dims, normalize);
    // Judged on `finish`'s own result: a norm it cannot divide by (zero, or all values subnormal)
    // leaves a vector far from unit length, which would silently score near 0 against everything.
    if normalize && (l2_norm(&v) - 1.0).abs() > 1e-3 {
        return Err(Error::invalid(format!("items[{index}].vector"), format!(
            "cannot be normalized: {which} is {norm:e}; send it with normalize: false to have it back as is")));
    }
    Ok(v)
}

fn l2_norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

/// Puts a vector into the response in the requested encoding.
pub fn encode(v: Vec<f32>, encoding: pb::Encoding, token_count: u32, truncated: bool) -> pb::Embedding {
    match encoding {
        pb::Encoding::Float => pb::Embedding { values: v, packed: vec![], token_count, truncated },
        pb::Encoding::PackedF32Le => {
            let packed = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            pb::Embedding { values: vec![], packed, token_count, truncated }
        }
    }
}

/// The client's deadline from a `grpc-timeout` value (`<digits><H|M|S|m|u|n>`), if valid.
pub fn grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_every_unit_and_refuse_junk() {
        use std::time::Duration;
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("150m"), Some(Duration::from_millis(150)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for junk in ["", "S", "12", "1x", "123456789S", "-1S"] {
            assert_eq!(grpc_timeout(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn a_user_vector_of_the_wrong_length_names_the_item() {
        let err = user_vector(3, vec![1.0; 5], 8, 8, true).unwrap_err().to_string();
        assert!(err.starts_with("items[3].vector.values:") && err.contains("has 5 values, expected 8"), "{err}");
    }

    #[test]
    fn a_non_finite_value_names_its_position() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let err = user_vector(0, vec![1.0, bad, 0.0], 3, 3, false).unwrap_err().to_string();
            assert!(err.starts_with("items[0].vector.values[1]:"), "{err}");
        }
    }

    #[test]
    fn a_full_size_user_vector_is_cut_and_normalized_like_a_computed_one() {
        let v = user_vector(0, vec![3.0, 4.0, 100.0, 100.0], 4, 2, true).unwrap();
        assert_eq!(v, finish(vec![3.0, 4.0], 2, true));
        // Already at the requested size: only normalized.
        assert_eq!(user_vector(0, vec![3.0, 4.0], 4, 2, true).unwrap(), v);
        // Not normalized when asked not to.
        assert_eq!(user_vector(0, vec![3.0, 4.0, 1.0, 1.0], 4, 4, false).unwrap(), vec![3.0, 4.0, 1.0, 1.0]);
    }

    #[test]
    fn a_vector_too_small_to_normalize_is_refused_naming_the_item_unless_normalize_is_off() {
        for tiny in [0.0, 1e-40, f32::MIN_POSITIVE] {
            let err = user_vector(2, vec![tiny; 8], 8, 8, true).unwrap_err();
            assert!(matches!(&err, Error::InvalidArgument { field, message } if field == "items[2].vector" && message.contains("cannot be normalized")), "{err}");
            assert_eq!(user_vector(2, vec![tiny; 8], 8, 8, false).unwrap(), vec![tiny; 8]);
        }
        // Only the values kept by the cut count.
        let err = user_vector(0, vec![0.0, 0.0, 5.0, 5.0], 4, 2, true).unwrap_err().to_string();
        assert!(err.contains("first 2 values"), "{err}");
        let err = user_vector(0, vec![0.0, 0.0], 4, 2, true).unwrap_err().to_string();
        assert!(err.contains("its norm is 0"), "{err}");
        // Small but normal norms are fine.
        let v = user_vector(0, vec![3e-10, 4e-10], 2, 2, true).unwrap();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn packed_encoding_is_little_endian_f32() {
        let e = encode(vec![1.0, -2.5], pb::Encoding::PackedF32Le, 3, false);
        assert!(e.values.is_empty());
        assert_eq!(e.packed, [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat());
    }
}
