//! Self-attention and gated MLP blocks shared by Qwen3 and Gemma3: projections, per-head q/k
//! RMSNorm, rotary embedding (rotate-half convention), fused attention with a boolean mask.

use crate::error::Result;
use crate::mlx::Array;
pub use crate::mlx::Activation;
use crate::models::layers::{Linear, RmsNorm, Stream};
use crate::models::weights::Weights;

/// Shapes of one attention block.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub hidden: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub head_dim: i32,
    pub bias: bool,
    /// The mask passed to [`Attention::forward`] is always
    /// [`MaskKind::Causal`](crate::models::layers::MaskKind) (decoder models): large batches on a
    /// CUDA device may then use cuDNN's causal mode instead of reading it.
    pub causal: bool,
}

/// The q, k and v projections: three matmuls, or one whose output holds the three side by side.
enum Qkv {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

pub struct Attention {
    qkv: Qkv,
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
        let q = w.linear(&format!("{prefix}.q_proj"), s.hidden, q_dim, s.bias)?;
        let k = w.linear(&format!("{prefix}.k_proj"), s.hidden, kv_dim, s.bias)?;
        let v = w.linear(&format!("{prefix}.v_proj"), s.hidden, kv_dim, s.bias)?;
        let fused = if w.fuses_projections() { Linear::fuse(&[&q, &k, &v])? } else { None };
        Ok(Attention {
            qkv: match fused {
                Some(f) => Qkv::Fused(f),
                None => Qkv::Separate { q, k, v },
            },
            o_proj: w.linear(&format!("{prefix}.o_proj"), q_dim, s.hidden, s.bias)?,
            q_norm: norm(w, &format!("{prefix}.q_norm"), s.head_dim)?,
            k_norm: norm(w, &format!("{prefix}.k_norm"), s.head_dim)?,
            shape: s,
            scale,
            rope_base: rope.0,
            rope_scale: rope.1,
        })
    }

    /// The stream `s` normed by `norm` (`[B·L, hidden]` token rows of a batch of `b` rows of `l`
    /// tokens) through the block: (the stream with its pending output added, the block's output
    /// `[B·L, hidden]`). `mask` is additive, `[B, 1, L, L]` (see
    /// [`additive_mask`](crate::models::layers::additive_mask)).
    pub fn forward(&self, norm: &RmsNorm, s: &Stream, (b, l): (i32, i32), mask: &Array) -> Result<(Array, Array)> {
        let sh = self.shape;
        // 1. Project, split heads: [B·L, H·D] → [B, L, H, D].
        // 2. q and k: norm each head, rotary positions 0..L (batches are right-padded, so every
        //    row starts at 0) → [B, H, L, D]; v → [B, H, L, D].
        // 3. Attention [B, H, L, D] (grouped KV heads broadcast), merge heads → [B·L, H·D].
        let attend = |qkv: Array| qkv.qkv_attention(
            &self.q_norm.weight, &self.k_norm.weight, self.q_norm.eps, (b, l), (sh.heads, sh.kv_heads, sh.head_dim),
            sh.head_dim, (self.rope_base, self.rope_scale), self.scale, mask, sh.causal,
        );
        let (x, a) = match &self.qkv {
            Qkv::Fused(proj) => {
                let (x, qkv) = norm.project(s, proj, None)?;
                (x, attend(qkv)?)
            }
            Qkv::Separate { q, k, v } => {
                let (x, h) = norm.resolve(s)?;
                let split = |proj: &Linear, n: i32| proj.forward(&h)?.reshape(&[b, l, n, sh.head_dim]);
                let rotate = |t: Array, norm: &RmsNorm| norm.forward_rope(&t, sh.head_dim, self.rope_base, self.rope_scale);
                let (q, k, v) = (
                    rotate(split(q, sh.heads)?, &self.q_norm)?,
                    rotate(split(k, sh.kv_heads)?, &self.k_norm)?,
                    split(v, sh.kv_heads)?.transpose(&[0, 2, 1, 3])?,
                );
                let a = Array::attention(&q, &k, &v, self.scale, mask)?;
                (x, a.transpose(&[0, 2, 1, 3])?.reshape(&[b * l, sh.heads * sh.head_dim])?)
            }
        };
        Ok((x, self.o_proj.forward(&a)?))
    }
}

/// The gate and up projections: two matmuls, or one whose output holds both side by side.
enum GateUp {
    Separate { gate: Linear, up: Linear },
    Fused(Linear),
}

/// `down(act(gate(x)) · up(x))`.
pub struct GatedMlp {
    gate_up: GateUp,
    down: Linear,
    act: Activation,
}

impl GatedMlp {
    pub fn load(w: &mut Weights, prefix: &str, hidden: i32, inter: i32, act: Activation) -> Result<GatedMlp> {
        let gate = w.linear(&format!("{prefix}.gate_proj"), hidden, inter, false)?;
        let up = w.linear(&format!("{prefix}.up_proj"), hidden, inter, false)?;
        let fused = if w.fuses_projections() { Linear::fuse(&[&gate, &up])? } else { None };
        Ok(GatedMlp {
            gate_up: match fused {
                Some(f) => GateUp::Fused(f),
                None => GateUp::Separate { gate, up },
            },
            down: w.linear(&format!("{prefix}.down_proj"), inter, hidden, false)?,
            act,
        })
    }

    /// The stream `s` normed by `norm` through the block: (the stream with its pending output
    /// added, the block's output).
    pub fn forward(&self, norm: &RmsNorm, s: &Stream) -> Result<(Array, Array)> {
        let (x, g) = match &self.gate_up {
            // On a CUDA device one kernel for a few token rows: the norm, the projection and
            // the activation.
            GateUp::Fused(proj) => norm.project(s, proj, Some(self.act))?,
            GateUp::Separate { gate, up } => {
                let (x, h) = norm.resolve(s)?;
                (x, gate.forward(&h)?.gated(&up.forward(&h)?, self.act)?)
            }
        };
        Ok((x, self.down.forward(&g)?))
    }
}
