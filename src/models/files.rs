//! Reading the JSON files of a model folder, with errors that name the file and the field.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Reads and parses `path`; `what` says what the file is needed for (shown when it is missing).
pub fn read_json<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::file(path, format!("missing ({what})")),
        _ => Error::file(path, format!("cannot read: {e}")),
    })?;
    parse_json(path, &text)
}

/// Like [`read_json`] but `None` when the file does not exist.
pub fn read_json_opt<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    if !path.exists() {
        return Ok(None);
    }
    read_json(path, "").map(Some)
}

fn parse_json<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || field == "." {
            Error::file(path, format!("invalid JSON: {inner}"))
        } else {
            Error::field(path, field, inner.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Cfg {
        hidden_size: u32,
        nested: Option<Nested>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Nested {
        bits: u32,
    }

    #[test]
    fn a_wrongly_typed_field_is_named_with_its_path() {
        let err = parse_json::<Cfg>(Path::new("config.json"), r#"{"hidden_size": 4, "nested": {"bits": "x"}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.json") && err.contains("nested.bits"), "{err}");
    }

    #[test]
    fn a_missing_field_is_named() {
        let err = parse_json::<Cfg>(Path::new("config.json"), "{}").unwrap_err().to_string();
        assert!(err.contains("hidden_size"), "{err}");
    }

    #[test]
    fn broken_json_names_the_file() {
        let err = parse_json::<Cfg>(Path::new("x/config.json"), "{").unwrap_err().to_string();
        assert!(err.starts_with("x/config.json: invalid JSON"), "{err}");
    }
}
