//! Self-attention and gated MLP blocks shared by Qwen3 and Gemma3: projections, per-head q/k
//! RMSNorm, rotary embedding (rotate-half convention), fused attention with a boolean mask.

use crate::error::Result;
use crate::mlx::Array;
pub use crate::mlx::Activation;
use crate::models::layers::{Linear, RmsNorm};
use crate::models::weights::Weights;

/// Shapes of one attention block.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub hidden: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub head_dim: i32,
    pub bias: bool,
}

pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    shape: AttentionShape,
    /// Multiplier of q·kᵀ.
    scale: f32,
    rope_base: f32,
    rope_scale: f32,
}

impl Attention {
    /// Loads `{prefix}.{q,k,v,o}_proj` and `{prefix}.{q,k}_norm`; `norm` builds a norm's
    /// multiplier from its stored weight (`w` or `1 + w`).
    pub fn load(
        w: &mut Weights,
        prefix: &str,
        s: AttentionShape,
        scale: f32,
        rope: (f32, f32),
        norm: &dyn Fn(&mut Weights, &str, i32) -> Result<RmsNorm>,
    ) -> Result<Attention> {
        let q_dim = s.heads * s.head_dim;
        let kv_dim = s.kv_heads * s.head_dim;
        Ok(Attention {
            q_proj: w.linear(&format!("{prefix}.q_proj"), s.hidden, q_dim, s.bias)?,
            k_proj: w.linear(&format!("{prefix}.k_proj"), s.hidden, kv_dim, s.bias)?,
            v_proj: w.linear(&format!("{prefix}.v_proj"), s.hidden, kv_dim, s.bias)?,
            o_proj: w.linear(&format!("{prefix}.o_proj"), q_dim, s.hidden, s.bias)?,
            q_norm: norm(w, &format!("{prefix}.q_norm"), s.head_dim)?,
            k_norm: norm(w, &format!("{prefix}.k_norm"), s.head_dim)?,
            shape: s,
            scale,
            rope_base: rope.0,
            rope_scale: rope.1,
        })
    }

    /// The `B·L` token rows `[B·L, hidden]` of a batch of `b` rows of `l` tokens → `[B·L, hidden]`;
    /// `mask` is additive, `[B, 1, L, L]` (see [`additive_mask`](crate::models::layers::additive_mask)).
    pub fn forward(&self, x: &Array, (b, l): (i32, i32), mask: &Array) -> Result<Array> {
        let s = self.shape;
        // 1. Project, split heads: [B·L, H·D] → [B, L, H, D].
        let split = |proj: &Linear, n: i32| proj.forward(x)?.reshape(&[b, l, n, s.head_dim]);
        // 2. q and k: norm each head, rotary positions 0..L (batches are right-padded, so every
        //    row starts at 0) → [B, H, L, D]; v → [B, H, L, D].
        let rotate = |t: Array, norm: &RmsNorm| norm.forward_rope(&t, s.head_dim, self.rope_base, self.rope_scale);
        let q = rotate(split(&self.q_proj, s.heads)?, &self.q_norm)?;
        let k = rotate(split(&self.k_proj, s.kv_heads)?, &self.k_norm)?;
        let v = split(&self.v_proj, s.kv_heads)?.transpose(&[0, 2, 1, 3])?;
        // 3. Attention [B, H, L, D] (grouped KV heads broadcast), merge heads → [B·L, H·D].
        let a = Array::attention(&q, &k, &v, self.scale, mask)?;
        let a = a.transpose(&[0, 2, 1, 3])?.reshape(&[b * l, s.heads * s.head_dim])?;
        Ok(self.o_proj.forward(&a)?)
    }
}

/// `down(act(gate(x)) · up(x))`.
pub struct GatedMlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    act: Activation,
}

impl GatedMlp {
    pub fn load(w: &mut Weights, prefix: &str, hidden: i32, inter: i32, act: Activation) -> Result<GatedMlp> {
        Ok(GatedMlp {
            gate: w.linear(&format!("{prefix}.gate_proj"), hidden, inter, false)?,
            up: w.linear(&format!("{prefix}.up_proj"), hidden, inter, false)?,
            down: w.linear(&format!("{prefix}.down_proj"), inter, hidden, false)?,
            act,
        })
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        let g = self.gate.forward(x)?.gated(&self.up.forward(x)?, self.act)?;
        Ok(self.down.forward(&g)?)
    }
}
