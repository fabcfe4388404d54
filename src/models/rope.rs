//! RoPE settings from config.json in both spellings: the classic `rope_theta` (+ `rope_scaling`,
//! + Gemma's `rope_local_base_freq`) and transformers 5's `rope_parameters` (one dict, or one per
//! layer type such as `full_attention` / `sliding_attention`).

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Base frequency and position scale (`1 / factor` for linear scaling) for `fast::rope`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub base: f32,
    pub scale: f32,
}

/// The RoPE of layers of `layer_type` (`None` for models with one kind of layer).
/// `fallback_theta` is the classic top-level key for that layer type (`rope_theta` or
/// `rope_local_base_freq`), `default_theta` what transformers assumes when nothing is given.
pub fn rope_for(
    path: &Path,
    config: &Value,
    layer_type: Option<&str>,
    fallback_theta: &str,
    default_theta: f64,
) -> Result<Rope> {
    if let Some(params) = config.get("rope_parameters").filter(|v| !v.is_null()) {
        let (field, p) = match layer_type.and_then(|t| params.get(t).map(|p| (t, p))) {
            Some((t, p)) => (format!("rope_parameters.{t}"), p),
            None => ("rope_parameters".to_string(), params),
        };
        let theta = p.get("rope_theta").and_then(Value::as_f64).ok_or_else(|| {
            Error::field(path, format!("{field}.rope_theta"), "missing or not a number")
        })?;
        return Ok(Rope { base: theta as f32, scale: scaling(path, &field, p)? });
    }
    let theta = match config.get(fallback_theta) {
        Some(v) => v.as_f64().ok_or_else(|| Error::field(path, fallback_theta, "not a number"))?,
        None => default_theta,
    };
    let scale = match config.get("rope_scaling").filter(|v| !v.is_null()) {
        // Gemma 3 applies `rope_scaling` to its global (full-attention) layers only.
        Some(s) if layer_type != Some("sliding_attention") => scaling(path, "rope_scaling", s)?,
        _ => 1.0,
    };
    Ok(Rope { base: theta as f32, scale })
}

fn scaling(path: &Path, field: &str, p: &Value) -> Result<f32> {
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    match kind {
        "default" => Ok(1.0),
        "linear" => {
            let f = p.get("factor").and_then(Value::as_f64).filter(|f| *f > 0.0).ok_or_else(|| {
                Error::field(path, format!("{field}.factor"), "linear RoPE scaling needs a positive factor")
            })?;
            Ok((1.0 / f) as f32)
        }
        other => Err(Error::field(path, format!("{field}.rope_type"),
            format!("unsupported RoPE type `{other}` (supported: default, linear)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn classic_keys_give_local_and_global_bases() {
        let c = json!({"rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": null});
        let p = Path::new("config.json");
        assert_eq!(rope_for(p, &c, Some("full_attention"), "rope_theta", 1e4).unwrap().base, 1e6);
        assert_eq!(rope_for(p, &c, Some("sliding_attention"), "rope_local_base_freq", 1e4).unwrap().base, 1e4);
    }

    #[test]
    fn per_layer_type_parameters_are_used() {
        let c = json!({"rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}});
        let p = Path::new("config.json");
        assert_eq!(rope_for(p, &c, Some("full_attention"), "rope_theta", 1e4).unwrap(), Rope { base: 1e6, scale: 0.125 });
        assert_eq!(rope_for(p, &c, Some("sliding_attention"), "rope_local_base_freq", 1e4).unwrap(), Rope { base: 1e4, scale: 1.0 });
    }

    #[test]
    fn unsupported_scaling_names_the_field() {
        let c = json!({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}});
        let err = rope_for(Path::new("config.json"), &c, None, "rope_theta", 1e4).unwrap_err().to_string();
        assert!(err.contains("rope_parameters.rope_type") && err.contains("yarn"), "{err}");
    }
}
