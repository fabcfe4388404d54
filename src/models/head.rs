//! The sentence-transformers head of a model folder: `modules.json`, `1_Pooling/config.json`,
//! `2_Dense`/`3_Dense` (linear layers after pooling), `Normalize`, and the prompts in
//! `config_sentence_transformers.json`. Folders without these files (mlx-lm conversions) get the
//! head their architecture implies.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::mlx::{Array, Dtype};
use crate::models::files::{read_json, read_json_opt};
use crate::models::layers::{token_mask, Linear};
use crate::models::weights::Weights;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    LastToken,
    Cls,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::LastToken => "last_token",
            Pooling::Cls => "cls",
        }
    }

    /// `[B, L, H]` hidden states of a right-padded batch → `[B, H]` in f32, over real tokens only.
    pub fn apply(self, hidden: &Array, lengths: &[i32]) -> Result<Array> {
        let dims = hidden.shape();
        let (b, l, h) = (dims[0], dims[1], dims[2]);
        let x = hidden.astype(Dtype::Float32)?;
        Ok(match self {
            Pooling::Cls => x.slice(&[0, 0, 0], &[b, 1, h])?.reshape(&[b, h])?,
            Pooling::LastToken => {
                let last: Vec<i32> = lengths.iter().map(|n| n - 1).collect();
                let idx = Array::from_i32(&last, &[b, 1, 1])?;
                x.take_along_axis(&idx, 1)?.reshape(&[b, h])?
            }
            Pooling::Mean => {
                // select, not multiply: a NaN in a padding row must not leak into the sum.
                let keep = token_mask(lengths, l)?;
                let zero = Array::scalar(0.0, Dtype::Float32)?;
                let sum = Array::select(&keep, &x, &zero)?.sum_axis(1, false)?;
                let counts: Vec<f32> = lengths.iter().map(|&n| n as f32).collect();
                sum.divide(&Array::from_f32(&counts, &[b, 1])?)?
            }
        })
    }
}

/// A sentence-transformers `Dense` module, run in f32.
pub struct Dense {
    linear: Linear,
    tanh: bool,
    pub out_features: i32,
}

impl Dense {
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let y = self.linear.forward(x)?;
        Ok(if self.tanh { y.tanh()? } else { y })
    }
}

/// What runs after the encoder.
pub struct Head {
    pub pooling: Pooling,
    pub dense: Vec<Dense>,
    pub normalize: bool,
    /// Where the head came from, for the log.
    pub source: String,
}

impl Head {
    /// Hidden states `[B, L, H]` → pooled and projected `[B, D]` f32.
    pub fn forward(&self, hidden: &Array, lengths: &[i32]) -> Result<Array> {
        let mut x = self.pooling.apply(hidden, lengths)?;
        for d in &self.dense {
            x = d.forward(&x)?;
        }
        Ok(x)
    }

    pub fn output_dim(&self, hidden: i32) -> i32 {
        self.dense.last().map_or(hidden, |d| d.out_features)
    }
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    #[serde(default = "yes")]
    include_prompt: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct DenseConfig {
    in_features: i32,
    out_features: i32,
    #[serde(default = "yes")]
    bias: bool,
    #[serde(default = "tanh_name")]
    activation_function: String,
}

fn tanh_name() -> String {
    "torch.nn.modules.activation.Tanh".into()
}

/// Reads `modules.json` and the modules it lists; `None` when the folder has no modules.json.
pub fn load_head(dir: &Path, hidden: i32) -> Result<Option<Head>> {
    let modules_path = dir.join("modules.json");
    let Some(modules) = read_json_opt::<Vec<ModuleEntry>>(&modules_path)? else {
        return Ok(None);
    };
    let mut pooling = None;
    let mut dense = Vec::new();
    let mut normalize = false;
    let mut width = hidden;
    for (i, m) in modules.iter().enumerate() {
        let kind = m.kind.rsplit('.').next().unwrap_or(&m.kind);
        match kind {
            "Transformer" => {}
            "Pooling" => pooling = Some(load_pooling(&dir.join(&m.path).join("config.json"))?),
            "Dense" => {
                let d = load_dense(&dir.join(&m.path), width)?;
                width = d.out_features;
                dense.push(d);
            }
            "Normalize" => normalize = true,
            _ => {
                return Err(Error::field(&modules_path, format!("[{i}].type"),
                    format!("unsupported module `{}` (supported: Transformer, Pooling, Dense, Normalize)", m.kind)))
            }
        }
    }
    let pooling = pooling.ok_or_else(|| Error::file(&modules_path, "lists no Pooling module"))?;
    Ok(Some(Head { pooling, dense, normalize, source: "modules.json".into() }))
}

fn load_pooling(path: &Path) -> Result<Pooling> {
    let c: PoolingConfig = read_json(path, "the Pooling module's settings")?;
    if !c.include_prompt {
        return Err(Error::field(path, "include_prompt", "false is not supported (prompt tokens are always pooled)"));
    }
    let unsupported = [
        ("pooling_mode_max_tokens", c.pooling_mode_max_tokens),
        ("pooling_mode_mean_sqrt_len_tokens", c.pooling_mode_mean_sqrt_len_tokens),
        ("pooling_mode_weightedmean_tokens", c.pooling_mode_weightedmean_tokens),
    ];
    if let Some((field, _)) = unsupported.iter().find(|(_, on)| *on) {
        return Err(Error::field(path, *field, "unsupported pooling mode (supported: mean, lasttoken, cls)"));
    }
    match (c.pooling_mode_mean_tokens, c.pooling_mode_lasttoken, c.pooling_mode_cls_token) {
        (true, false, false) => Ok(Pooling::Mean),
        (false, true, false) => Ok(Pooling::LastToken),
        (false, false, true) => Ok(Pooling::Cls),
        _ => Err(Error::field(path, "pooling_mode_*", "exactly one of mean_tokens, lasttoken, cls_token must be true")),
    }
}

fn load_dense(dir: &Path, width: i32) -> Result<Dense> {
    let cfg_path = dir.join("config.json");
    let c: DenseConfig = read_json(&cfg_path, "the Dense module's settings")?;
    if c.in_features != width {
        return Err(Error::field(&cfg_path, "in_features", format!("{} but the previous module outputs {width}", c.in_features)));
    }
    let tanh = match c.activation_function.rsplit('.').next().unwrap_or("") {
        "Identity" => false,
        "Tanh" => true,
        _ => return Err(Error::field(&cfg_path, "activation_function",
            format!("unsupported `{}` (supported: Identity, Tanh)", c.activation_function))),
    };
    let mut w = Weights::open(dir, Dtype::Float32, false)?;
    let linear = w.linear("linear", c.in_features, c.out_features, c.bias)?;
    Ok(Dense { linear, tanh, out_features: c.out_features })
}

/// Prompts from `config_sentence_transformers.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Prompts {
    #[serde(default)]
    pub prompts: BTreeMap<String, String>,
    #[serde(default)]
    pub default_prompt_name: Option<String>,
}

pub fn load_prompts(dir: &Path) -> Result<Prompts> {
    let path = dir.join("config_sentence_transformers.json");
    let p: Prompts = read_json_opt(&path)?.unwrap_or_default();
    if let Some(name) = &p.default_prompt_name {
        if !p.prompts.contains_key(name) {
            return Err(Error::field(&path, "default_prompt_name", format!("`{name}` is not one of the prompts")));
        }
    }
    Ok(p)
}

/// `max_seq_length` from `sentence_bert_config.json`, when present.
pub fn max_seq_length(dir: &Path) -> Result<Option<i32>> {
    #[derive(Deserialize)]
    struct Sbert {
        max_seq_length: Option<i32>,
    }
    Ok(read_json_opt::<Sbert>(&dir.join("sentence_bert_config.json"))?.and_then(|s| s.max_seq_length))
}
