//! Gemma 3 text (`model_type: gemma3_text`): the encoder of EmbeddingGemma-300m. Matches
//! transformers' `Gemma3TextModel` with `use_bidirectional_attention: true` (and the causal
//! variant when false): embeddings scaled by √hidden in the compute dtype, every RMSNorm
//! multiplies by (1 + w) computed in f32, four norms per layer plus per-head q/k norms, attention
//! scale `query_pre_attn_scalar^-0.5`, per-layer sliding or full attention from `layer_types`
//! (sliding, bidirectional: |i − j| ≤ W/2), local vs global RoPE bases, GeGLU (tanh) MLP.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::mlx::{Array, Dtype};
use crate::models::attention::{Activation, Attention, AttentionShape, GatedMlp};
use crate::models::layers::{additive_mask, attention_mask, Embedding, MaskKind, RmsNorm, Stream};
use crate::models::rope::rope_for;
use crate::models::weights::Weights;
use crate::models::{check_positive, Encoder, EncoderDims};

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub hidden_size: i32,
    pub num_hidden_layers: i32,
    pub num_attention_heads: i32,
    pub num_key_value_heads: i32,
    #[serde(default = "d256")]
    pub head_dim: i32,
    pub intermediate_size: i32,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f32,
    pub vocab_size: i32,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: i32,
    #[serde(default = "d256f")]
    pub query_pre_attn_scalar: f32,
    #[serde(default = "d_window")]
    pub sliding_window: i32,
    pub layer_types: Option<Vec<String>>,
    /// Older configs: every n-th layer is full attention (transformers' rule when `layer_types`
    /// is absent).
    pub sliding_window_pattern: Option<i32>,
    #[serde(default)]
    pub use_bidirectional_attention: bool,
    #[serde(default)]
    pub attention_bias: bool,
    pub hidden_activation: Option<String>,
    pub hidden_act: Option<String>,
    pub attn_logit_softcapping: Option<f32>,
}

fn d256() -> i32 { 256 }
fn d256f() -> f32 { 256.0 }
fn d_eps() -> f32 { 1e-6 }
fn d_max_pos() -> i32 { 131072 }
fn d_window() -> i32 { 4096 }

struct Layer {
    sliding: bool,
    input_norm: RmsNorm,
    attn: Attention,
    post_attn_norm: RmsNorm,
    pre_ff_norm: RmsNorm,
    mlp: GatedMlp,
    post_ff_norm: RmsNorm,
}

pub struct Gemma3 {
    pub config: Config,
    embed: Embedding,
    embed_scale: Array,
    layers: Vec<Layer>,
    norm: RmsNorm,
}

/// A Gemma norm: multiplier `1 + w`, formed in f32, then cast to the compute dtype.
fn norm(w: &mut Weights, module: &str, dim: i32, eps: f32) -> Result<RmsNorm> {
    let raw = w.tensor_as(&format!("{module}.weight"), &[dim], Dtype::Float32)?;
    let weight = raw.add(&Array::scalar(1.0, Dtype::Float32)?)?.astype(w.compute_dtype())?;
    Ok(RmsNorm::new(weight, eps)?)
}

impl Gemma3 {
    pub fn load(config_path: &Path, raw: &serde_json::Value, w: &mut Weights) -> Result<Gemma3> {
        let c: Config = serde_path_to_error::deserialize(raw)
            .map_err(|e| Error::field(config_path, e.path().to_string(), e.into_inner().to_string()))?;
        check_positive(config_path, &[
            ("hidden_size", c.hidden_size), ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads), ("num_key_value_heads", c.num_key_value_heads),
            ("head_dim", c.head_dim), ("intermediate_size", c.intermediate_size), ("vocab_size", c.vocab_size),
            ("sliding_window", c.sliding_window),
        ])?;
        if c.num_attention_heads % c.num_key_value_heads != 0 {
            return Err(Error::field(config_path, "num_key_value_heads",
                format!("{} does not divide num_attention_heads {}", c.num_key_value_heads, c.num_attention_heads)));
        }
        if !(c.query_pre_attn_scalar > 0.0) {
            return Err(Error::field(config_path, "query_pre_attn_scalar", "must be positive"));
        }
        let act = c.hidden_activation.as_deref().or(c.hidden_act.as_deref()).unwrap_or("gelu_pytorch_tanh");
        if act != "gelu_pytorch_tanh" {
            let field = if c.hidden_activation.is_some() { "hidden_activation" } else { "hidden_act" };
            return Err(Error::field(config_path, field, format!("unsupported `{act}` (Gemma 3 uses gelu_pytorch_tanh)")));
        }
        if c.attn_logit_softcapping.is_some() {
            return Err(Error::field(config_path, "attn_logit_softcapping", "attention logit soft-capping is not supported"));
        }
        let layer_types = layer_types(config_path, &c)?;
        let shape = AttentionShape {
            hidden: c.hidden_size, heads: c.num_attention_heads, kv_heads: c.num_key_value_heads,
            // Its masks differ between layers (sliding windows; bidirectional in embedding
            // checkpoints): each layer reads its own.
            head_dim: c.head_dim, bias: c.attention_bias, causal: false,
        };
        let eps = c.rms_norm_eps;
        let head_norm = move |w: &mut Weights, m: &str, d: i32| norm(w, m, d, eps);
        let scale = c.query_pre_attn_scalar.powf(-0.5);
        let h = c.hidden_size;
        let mut layers = Vec::with_capacity(c.num_hidden_layers as usize);
        for (i, sliding) in layer_types.into_iter().enumerate() {
            let rope = if sliding {
                rope_for(config_path, raw, Some("sliding_attention"), "rope_local_base_freq", 10000.0)?
            } else {
                rope_for(config_path, raw, Some("full_attention"), "rope_theta", 1_000_000.0)?
            };
            let p = format!("layers.{i}");
            layers.push(Layer {
                sliding,
                input_norm: norm(w, &format!("{p}.input_layernorm"), h, eps)?,
                attn: Attention::load(w, &format!("{p}.self_attn"), shape, scale, (rope.base, rope.scale), &head_norm)?,
                post_attn_norm: norm(w, &format!("{p}.post_attention_layernorm"), h, eps)?,
                pre_ff_norm: norm(w, &format!("{p}.pre_feedforward_layernorm"), h, eps)?,
                mlp: GatedMlp::load(w, &format!("{p}.mlp"), h, c.intermediate_size, Activation::GeluTanh)?,
                post_ff_norm: norm(w, &format!("{p}.post_feedforward_layernorm"), h, eps)?,
            });
        }
        Ok(Gemma3 {
            embed: w.embedding("embed_tokens", c.vocab_size, h)?,
            // √hidden rounded to the compute dtype, as the reference multiplies in the weights' dtype.
            embed_scale: Array::scalar((h as f32).sqrt(), w.compute_dtype())?,
            norm: norm(w, "norm", h, eps)?,
            layers,
            config: c,
        })
    }

    fn mask_kind(&self, sliding: bool) -> MaskKind {
        let w = self.config.sliding_window;
        match (sliding, self.config.use_bidirectional_attention) {
            (false, true) => MaskKind::Bidirectional,
            (false, false) => MaskKind::Causal,
            (true, true) => MaskKind::Window { radius: w / 2 },
            (true, false) => MaskKind::CausalWindow { window: w },
        }
    }
}

/// One flag per layer: sliding (true) or full attention, from `layer_types`.
fn layer_types(path: &Path, c: &Config) -> Result<Vec<bool>> {
    let n = c.num_hidden_layers as usize;
    match &c.layer_types {
        Some(types) => {
            if types.len() != n {
                return Err(Error::field(path, "layer_types",
                    format!("{} entries for {} layers (num_hidden_layers)", types.len(), n)));
            }
            types.iter().enumerate().map(|(i, t)| match t.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                other => Err(Error::field(path, format!("layer_types[{i}]"),
                    format!("unknown layer type `{other}` (expected sliding_attention or full_attention)"))),
            }).collect()
        }
        None => {
            let pattern = c.sliding_window_pattern.unwrap_or(6).max(1) as usize;
            Ok((0..n).map(|i| (i + 1) % pattern != 0).collect())
        }
    }
}

impl Encoder for Gemma3 {
    /// Full-attention mask, then the sliding-window one.
    fn masks(&self, lengths: &[i32], len: i32) -> Result<Vec<Array>> {
        let dtype = self.norm.weight.dtype()?;
        Ok(vec![
            additive_mask(&attention_mask(self.mask_kind(false), lengths, len)?, dtype)?,
            additive_mask(&attention_mask(self.mask_kind(true), lengths, len)?, dtype)?,
        ])
    }

    fn encode(&self, ids: &Array, masks: &[Array]) -> Result<Array> {
        let (full, local) = (&masks[0], &masks[1]);
        let dims = ids.shape();
        let (b, l) = (dims[0], dims[1]);
        // 1. Scaled embeddings: [B, L] → [B·L, hidden] (token rows; matmuls take them as they
        //    are); the residual stream is kept in f32.
        let x = self.embed.forward(&ids.reshape(&[b * l])?)?.multiply(&self.embed_scale)?.astype(Dtype::Float32)?;
        // 2. Sandwich-norm blocks: x += post_norm(block(pre_norm(x))); each residual add done by
        //    the block that norms the sum.
        let mut s = Stream { x, pending: None };
        for layer in &self.layers {
            let mask = if layer.sliding { local } else { full };
            let (x, a) = layer.attn.forward(&layer.input_norm, &s, (b, l), mask)?;
            let (x, m) = layer.mlp.forward(&layer.pre_ff_norm, &Stream { x, pending: Some((a, Some(&layer.post_attn_norm))) })?;
            s = Stream { x, pending: Some((m, Some(&layer.post_ff_norm))) };
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
