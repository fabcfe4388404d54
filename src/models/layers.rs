//! Layers shared by the model files: linear (dense or MLX-quantized), embedding tables, RMSNorm,
//! activations and attention masks.

use crate::mlx::{Activation, Array, Dtype, Result};

/// An MLX affine-quantized matrix `[rows, cols]`: `value = scale · q + bias` per group of
/// `group_size` columns, q packed `32 / bits` to a uint32 word, lowest bits first.
pub struct QuantizedWeight {
    pub w: Array,
    pub scales: Array,
    pub biases: Array,
    pub group_size: i32,
    pub bits: i32,
    /// The compute dtype results are returned in (the scales may be wider).
    pub out: Dtype,
}

impl QuantizedWeight {
    /// `x @ dequantize(self)ᵀ`, computed in the scales' dtype, returned in `out`.
    pub fn matmul_t(&self, x: &Array) -> Result<Array> {
        let sd = self.scales.dtype()?;
        let x = if x.dtype()? == sd { x.clone() } else { x.astype(sd)? };
        let y = x.quantized_matmul(&self.w, &self.scales, &self.biases, self.group_size, self.bits)?;
        if sd == self.out { Ok(y) } else { y.astype(self.out) }
    }
}

pub enum Linear {
    /// `w` is the weight as stored, `[out, in]`; `wt` a transposed view of it, `[in, out]`.
    Dense { w: Array, wt: Array, bias: Option<Array> },
    Quantized { q: QuantizedWeight, bias: Option<Array> },
}

impl Linear {
    /// A dense layer of the weight `w` `[out, in]`.
    pub fn dense(w: Array, bias: Option<Array>) -> Result<Linear> {
        Ok(Linear::Dense { wt: w.transpose(&[1, 0])?, w, bias })
    }

    /// The weight's rows `[out, in]` and their transposed view, for a dense layer without a bias
    /// (what a kernel fusing the matmul with what follows it takes).
    pub fn rows(&self) -> Option<(&Array, &Array)> {
        match self {
            Linear::Dense { w, wt, bias: None } => Some((w, wt)),
            _ => None,
        }
    }

    /// `[…, in] → […, out]`.
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let (y, bias) = match self {
            Linear::Dense { wt, bias, .. } => (x.matmul(wt)?, bias),
            Linear::Quantized { q, bias } => (q.matmul_t(x)?, bias),
        };
        match bias {
            Some(b) => y.add(b),
            None => Ok(y),
        }
    }

    fn bias(&self) -> Option<&Array> {
        match self {
            Linear::Dense { bias, .. } | Linear::Quantized { bias, .. } => bias.as_ref(),
        }
    }

    /// One layer computing the outputs of `parts` side by side (`[…, Σ out]`), evaluated; `None`
    /// when they cannot be fused (dense and quantized mixed, other quantizations, bias on some).
    pub fn fuse(parts: &[&Linear]) -> Result<Option<Linear>> {
        let Some(first) = parts.first() else { return Ok(None) };
        let with_bias = parts.iter().filter(|p| p.bias().is_some()).count();
        if with_bias != 0 && with_bias != parts.len() {
            return Ok(None);
        }
        let bias = match with_bias {
            0 => None,
            _ => Some(concat(&parts.iter().map(|p| p.bias().expect("counted")).collect::<Vec<_>>(), 0)?),
        };
        let fused = match first {
            Linear::Dense { .. } => {
                let mut rows = Vec::with_capacity(parts.len());
                for p in parts {
                    match p {
                        Linear::Dense { w, .. } => rows.push(w),
                        Linear::Quantized { .. } => return Ok(None),
                    }
                }
                Linear::dense(concat(&rows, 0)?, bias)?
            }
            Linear::Quantized { q: q0, .. } => {
                let mut qs = Vec::with_capacity(parts.len());
                for p in parts {
                    match p {
                        Linear::Quantized { q, .. } if (q.group_size, q.bits, q.out) == (q0.group_size, q0.bits, q0.out)
                            && q.scales.dtype()? == q0.scales.dtype()? => qs.push(q),
                        _ => return Ok(None),
                    }
                }
                let cat = |f: fn(&QuantizedWeight) -> &Array| concat(&qs.iter().map(|q| f(q)).collect::<Vec<_>>(), 0);
                let q = QuantizedWeight {
                    w: cat(|q| &q.w)?, scales: cat(|q| &q.scales)?, biases: cat(|q| &q.biases)?,
                    group_size: q0.group_size, bits: q0.bits, out: q0.out,
                };
                Linear::Quantized { q, bias }
            }
        };
        fused.eval()?;
        Ok(Some(fused))
    }

    fn eval(&self) -> Result<()> {
        match self {
            Linear::Dense { w, wt, .. } => {
                w.eval()?;
                wt.eval()?;
            }
            Linear::Quantized { q, .. } => {
                for a in [&q.w, &q.scales, &q.biases] {
                    a.eval()?;
                }
            }
        }
        match self.bias() {
            Some(b) => b.eval(),
            None => Ok(()),
        }
    }
}

/// `arrays` joined along `axis`.
fn concat(arrays: &[&Array], axis: i32) -> Result<Array> {
    let (first, rest) = arrays.split_first().expect("at least one array");
    rest.iter().try_fold((*first).clone(), |acc, a| acc.concatenate(a, axis))
}

pub enum Embedding {
    Dense(Array),
    Quantized(QuantizedWeight),
}

impl Embedding {
    /// Token ids `[B, L]` (int32) → `[B, L, hidden]`.
    pub fn forward(&self, ids: &Array) -> Result<Array> {
        match self {
            Embedding::Dense(table) => table.take(ids, 0),
            Embedding::Quantized(q) => {
                // Gather the packed rows first, then dequantize only those.
                let w = q.w.take(ids, 0)?;
                let s = q.scales.take(ids, 0)?;
                let b = q.biases.take(ids, 0)?;
                let rows = Array::dequantize(&w, &s, &b, q.group_size, q.bits)?;
                if rows.dtype()? == q.out { Ok(rows) } else { rows.astype(q.out) }
            }
        }
    }
}

/// RMSNorm over the last axis with a ready-made multiplier (`w` for Qwen3, `1 + w` for Gemma),
/// held in the compute dtype. The output is in the compute dtype too, whatever the input's: the
/// residual stream stays f32 between blocks while matmuls run in the compute dtype.
pub struct RmsNorm {
    pub weight: Array,
    /// `weight` in f32, for f32 inputs (the residual stream): MLX would otherwise convert the
    /// weight at every call.
    weight_f32: Array,
    pub eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Array, eps: f32) -> Result<RmsNorm> {
        let weight_f32 = weight.astype(Dtype::Float32)?;
        weight.eval()?;
        weight_f32.eval()?;
        Ok(RmsNorm { weight, weight_f32, eps })
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        self.apply(x, |x, w| x.rms_norm(w, self.eps))
    }

    /// The norm of each head of `x` `[B, L, H, D]`, then rotary embedding at positions `0..L`
    /// (rotate-half, the first `dims` features): → `[B, H, L, D]` in the compute dtype.
    pub fn forward_rope(&self, x: &Array, dims: i32, base: f32, scale: f32) -> Result<Array> {
        self.apply(x, |x, w| x.head_norm_rope(w, self.eps, dims, base, scale))
    }

    /// The weight to norm `x` with: in f32 for an f32 input (the residual stream), else as held.
    fn weight_for(&self, x: &Array) -> Result<&Array> {
        Ok(if x.dtype()? == Dtype::Float32 { &self.weight_f32 } else { &self.weight })
    }

    /// `norm(x, weight)` with the weight in `x`'s dtype where that is f32, the result in the
    /// compute dtype.
    fn apply(&self, x: &Array, norm: impl FnOnce(&Array, &Array) -> Result<Array>) -> Result<Array> {
        let dt = self.weight.dtype()?;
        let w = self.weight_for(x)?;
        let y = norm(x, w)?;
        if y.dtype()? == dt { Ok(y) } else { y.astype(dt) }
    }

    /// `x + post(y)`, the residual stream `x` (f32) plus a block's output `y` (normed by `post`
    /// first, as Gemma's sandwich norms do), and this norm of that sum in the compute dtype: one
    /// fused kernel on a CUDA device, the same operations as `add` and `forward` elsewhere.
    pub fn residual(&self, x: &Array, y: &Array, post: Option<&RmsNorm>) -> Result<(Array, Array)> {
        let w = self.weight_for(x)?;
        x.residual_rms_norm(y, post.map(|p| (&p.weight, p.eps)), w, self.eps, self.weight.dtype()?)
    }

    /// The stream with its pending output added, and this norm of it in the compute dtype (the
    /// input of the block that follows).
    pub fn resolve(&self, s: &Stream) -> Result<(Array, Array)> {
        match &s.pending {
            None => Ok((s.x.clone(), self.forward(&s.x)?)),
            Some((y, post)) => self.residual(&s.x, y, *post),
        }
    }

    /// [`RmsNorm::resolve`], then `proj` of the norm (with `gate`, `act(gate) · up` of its two
    /// halves): (the stream, the projection). One kernel for a few token rows on a CUDA device
    /// where `proj` is dense without a bias.
    pub fn project(&self, s: &Stream, proj: &Linear, gate: Option<Activation>) -> Result<(Array, Array)> {
        if let Some(rows) = proj.rows() {
            let y = s.pending.as_ref().map(|(y, post)| (y, post.map(|p| (&p.weight, p.eps))));
            return s.x.norm_matmul(y, self.weight_for(&s.x)?, self.eps, self.weight.dtype()?, rows, gate);
        }
        let (x, h) = self.resolve(s)?;
        let p = proj.forward(&h)?;
        Ok((x, match gate {
            Some(act) => p.gated_halves(act)?,
            None => p,
        }))
    }

    /// The norm in f32 whatever the compute dtype (the final norm, before pooling).
    pub fn forward_f32(&self, x: &Array) -> Result<Array> {
        x.astype(Dtype::Float32)?.rms_norm(&self.weight_f32, self.eps)
    }
}

/// The residual stream between blocks: `x` (f32) and the output of the block before, with the
/// norm it takes before it is added (Gemma's sandwich norms), not added yet: the block that
/// follows adds it when it norms its input ([`RmsNorm::resolve`], [`RmsNorm::project`]).
pub struct Stream<'a> {
    pub x: Array,
    pub pending: Option<(Array, Option<&'a RmsNorm>)>,
}

impl Stream<'_> {
    /// `x + post(y)`: the stream with its pending output added.
    pub fn sum(&self) -> Result<Array> {
        match &self.pending {
            None => Ok(self.x.clone()),
            Some((y, None)) => self.x.add(y),
            Some((y, Some(post))) => self.x.add(&post.forward(y)?),
        }
    }
}

/// Which key positions each query position of a right-padded batch may attend to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskKind {
    /// j ≤ i (decoder models such as Qwen3).
    Causal,
    /// Every real token.
    Bidirectional,
    /// Every real token with |i − j| ≤ `radius` (Gemma's sliding layers in bidirectional mode).
    Window { radius: i32 },
    /// j ≤ i and i − j < `window` (Gemma's sliding layers in causal mode).
    CausalWindow { window: i32 },
}

/// A boolean mask `[B, 1, L, L]` for a right-padded batch of `lengths` (each ≥ 1) padded to `len`.
/// Keys past a row's length are masked. A padding query may always see itself so that no row of
/// the softmax is empty (an empty row gives NaN); padding rows are never pooled.
pub fn attention_mask(kind: MaskKind, lengths: &[i32], len: i32) -> Result<Array> {
    let b = lengths.len() as i32;
    let pos = Array::arange(0, len)?;
    let i = pos.reshape(&[len, 1])?;
    let j = pos.reshape(&[1, len])?;
    let lens = Array::from_i32(lengths, &[b, 1, 1, 1])?;
    let key_valid = j.reshape(&[1, 1, 1, len])?.less(&lens)?;
    let allowed = match kind {
        MaskKind::Causal => key_valid.logical_and(&j.less_equal(&i)?)?,
        MaskKind::Bidirectional => key_valid,
        MaskKind::Window { radius } => {
            let dist = i.subtract(&j)?.abs()?;
            let r = Array::scalar(radius as f32, Dtype::Int32)?;
            key_valid.logical_and(&dist.less_equal(&r)?)?
        }
        MaskKind::CausalWindow { window } => {
            let back = i.subtract(&j)?;
            let w = Array::scalar(window as f32, Dtype::Int32)?;
            key_valid.logical_and(&j.less_equal(&i)?)?.logical_and(&back.less(&w)?)?
        }
    };
    allowed.logical_or(&i.equal(&j)?)
}

/// A boolean mask of [`attention_mask`] as the fused attention takes it, made once for every
/// layer: 0 where attending is allowed, −∞ elsewhere, in `dtype`.
pub fn additive_mask(allowed: &Array, dtype: Dtype) -> Result<Array> {
    let zero = Array::scalar(0.0, dtype)?;
    let blocked = Array::scalar(f32::NEG_INFINITY, dtype)?;
    Array::select(allowed, &zero, &blocked)
}

/// A boolean `[B, L, 1]`: true at the real (non-padding) tokens.
pub fn token_mask(lengths: &[i32], len: i32) -> Result<Array> {
    let b = lengths.len() as i32;
    let pos = Array::arange(0, len)?.reshape(&[1, len, 1])?;
    pos.less(&Array::from_i32(lengths, &[b, 1, 1])?)
}
