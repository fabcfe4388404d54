//! Qwen3 (`model_type: qwen3`): the text encoder of Qwen3-Embedding-0.6B/4B/8B and of mlx-lm
//! conversions of it (bf16, 4/8-bit). Matches transformers' `Qwen3Model`: causal attention with
//! grouped KV heads, per-head q/k RMSNorm before RoPE, SiLU-gated MLP, plain `w·x` RMSNorms.
//! Returns the final-norm hidden states; pooling (last token) happens in `embedder`.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::mlx::{Array, Dtype};
use crate::models::attention::{Activation, Attention, AttentionShape, GatedMlp};
use crate::models::layers::{additive_mask, attention_mask, Embedding, MaskKind, RmsNorm, Stream};
use crate::models::rope::rope_for;
use crate::models::weights::Weights;
use crate::models::{check_positive, Encoder, EncoderDims};

/// The fields of config.json this model reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub hidden_size: i32,
    pub num_hidden_layers: i32,
    pub num_attention_heads: i32,
    pub num_key_value_heads: i32,
    pub head_dim: Option<i32>,
    pub intermediate_size: i32,
    pub rms_norm_eps: f32,
    pub vocab_size: i32,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: i32,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_max_positions() -> i32 {
    32768
}
fn default_act() -> String {
    "silu".into()
}

struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: GatedMlp,
}

pub struct Qwen3 {
    pub config: Config,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
}

fn norm(w: &mut Weights, module: &str, dim: i32, eps: f32) -> Result<RmsNorm> {
    Ok(RmsNorm::new(w.tensor(&format!("{module}.weight"), &[dim])?, eps)?)
}

impl Qwen3 {
    pub fn load(config_path: &Path, raw: &serde_json::Value, w: &mut Weights) -> Result<Qwen3> {
        let c: Config = serde_path_to_error::deserialize(raw)
            .map_err(|e| Error::field(config_path, e.path().to_string(), e.into_inner().to_string()))?;
        let head_dim = c.head_dim.unwrap_or(if c.num_attention_heads > 0 { c.hidden_size / c.num_attention_heads } else { 0 });
        check_positive(config_path, &[
            ("hidden_size", c.hidden_size), ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads), ("num_key_value_heads", c.num_key_value_heads),
            ("head_dim", head_dim), ("intermediate_size", c.intermediate_size), ("vocab_size", c.vocab_size),
        ])?;
        if c.num_attention_heads % c.num_key_value_heads != 0 {
            return Err(Error::field(config_path, "num_key_value_heads",
                format!("{} does not divide num_attention_heads {}", c.num_key_value_heads, c.num_attention_heads)));
        }
        if c.hidden_act != "silu" {
            return Err(Error::field(config_path, "hidden_act", format!("unsupported `{}` (Qwen3 uses silu)", c.hidden_act)));
        }
        let rope = rope_for(config_path, raw, None, "rope_theta", 10000.0)?;
        let shape = AttentionShape {
            hidden: c.hidden_size, heads: c.num_attention_heads, kv_heads: c.num_key_value_heads,
            head_dim, bias: c.attention_bias, causal: true,
        };
        let eps = c.rms_norm_eps;
        let head_norm = move |w: &mut Weights, m: &str, d: i32| norm(w, m, d, eps);
        let mut layers = Vec::with_capacity(c.num_hidden_layers as usize);
        for i in 0..c.num_hidden_layers {
            let p = format!("layers.{i}");
            layers.push(Layer {
                input_norm: norm(w, &format!("{p}.input_layernorm"), c.hidden_size, eps)?,
                attn: Attention::load(w, &format!("{p}.self_attn"), shape, (head_dim as f32).powf(-0.5),
                    (rope.base, rope.scale), &head_norm)?,
                post_norm: norm(w, &format!("{p}.post_attention_layernorm"), c.hidden_size, eps)?,
                mlp: GatedMlp::load(w, &format!("{p}.mlp"), c.hidden_size, c.intermediate_size, Activation::Silu)?,
            });
        }
        Ok(Qwen3 {
            embed: w.embedding("embed_tokens", c.vocab_size, c.hidden_size)?,
            norm: norm(w, "norm", c.hidden_size, eps)?,
            layers,
            config: c,
        })
    }
}

impl Encoder for Qwen3 {
    fn masks(&self, lengths: &[i32], len: i32) -> Result<Vec<Array>> {
        let allowed = attention_mask(MaskKind::Causal, lengths, len)?;
        Ok(vec![additive_mask(&allowed, self.norm.weight.dtype()?)?])
    }

    fn encode(&self, ids: &Array, masks: &[Array]) -> Result<Array> {
        let mask = &masks[0];
        let dims = ids.shape();
        let (b, l) = (dims[0], dims[1]);
        // 1. Embed: [B, L] → [B·L, hidden] (token rows; matmuls take them as they are); the
        //    residual stream is kept in f32.
        let x = self.embed.forward(&ids.reshape(&[b * l])?)?.astype(Dtype::Float32)?;
        // 2. Pre-norm blocks: x += attn(norm(x)); x += mlp(norm(x)); each residual add done by
        //    the block that norms the sum.
        let mut s = Stream { x, pending: None };
        for layer in &self.layers {
            let (x, a) = layer.attn.forward(&layer.input_norm, &s, (b, l), mask)?;
            let (x, m) = layer.mlp.forward(&layer.post_norm, &Stream { x, pending: Some((a, None)) })?;
            s = Stream { x, pending: Some((m, None)) };
        }
        let x = s.sum()?;
        // 3. Final norm, in f32 for pooling: [B, L, hidden].
        Ok(self.norm.forward_f32(&x)?.reshape(&[b, l, self.config.hidden_size])?)
    }

    fn dims(&self) -> EncoderDims {
        let c = &self.config;
        EncoderDims { hidden: c.hidden_size, vocab: c.vocab_size, max_positions: c.max_position_embeddings }
    }
}
