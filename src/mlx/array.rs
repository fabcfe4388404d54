//! [`Array`]: an owned handle to an `mlx::core::array` (a lazy graph node), and the operations the
//! models use. Operations build the graph; [`Array::eval`] or a copy to the host runs it.

use std::marker::PhantomData;
use std::pin::Pin;

use cxx::UniquePtr;

use super::ffi::ffi;
use super::{Activation, Dtype, MlxError, Result};

/// An MLX array. Cheap to clone (MLX arrays share their buffers). `!Send` and `!Sync`: MLX state
/// must stay on one thread.
///
/// ```compile_fail
/// fn needs_send<T: Send>(_: T) {}
/// needs_send(mlx_embed::mlx::Array::from_f32(&[1.0], &[1]).unwrap());
/// ```
pub struct Array {
    raw: UniquePtr<ffi::array>,
    _not_send: PhantomData<*const ()>,
}

fn wrap(r: std::result::Result<UniquePtr<ffi::array>, cxx::Exception>) -> Result<Array> {
    let raw = r?;
    if raw.is_null() {
        return Err(MlxError("bridge returned a null array".into()));
    }
    Ok(Array { raw, _not_send: PhantomData })
}

macro_rules! binary {
    ($($(#[$doc:meta])* $name:ident => $ffi:ident),* $(,)?) => {$(
        $(#[$doc])*
        pub fn $name(&self, other: &Array) -> Result<Array> {
            wrap(ffi::$ffi(self.r(), other.r()))
        }
    )*};
}

macro_rules! unary {
    ($($name:ident),* $(,)?) => {$(
        pub fn $name(&self) -> Result<Array> {
            wrap(ffi::$name(self.r()))
        }
    )*};
}

impl Array {
    fn r(&self) -> &ffi::array {
        // Non-null by construction (`wrap` checks).
        self.raw.as_ref().expect("Array is never null")
    }

    pub fn from_f32(data: &[f32], shape: &[i32]) -> Result<Array> {
        check_len(data.len(), shape)?;
        wrap(ffi::from_f32(data, shape))
    }

    pub fn from_i32(data: &[i32], shape: &[i32]) -> Result<Array> {
        check_len(data.len(), shape)?;
        wrap(ffi::from_i32(data, shape))
    }

    /// A 0-d array holding `value` converted to `dtype`.
    pub fn scalar(value: f32, dtype: Dtype) -> Result<Array> {
        wrap(ffi::scalar(value, dtype))
    }

    /// `[start, stop)` as int32.
    pub fn arange(start: i32, stop: i32) -> Result<Array> {
        wrap(ffi::arange(start, stop))
    }

    pub fn shape(&self) -> Vec<i32> {
        ffi::shape(self.r())
    }

    pub fn dtype(&self) -> Result<Dtype> {
        Ok(ffi::dtype(self.r())?)
    }

    /// Runs the graph up to this array.
    pub fn eval(&self) -> Result<()> {
        Ok(ffi::eval(self.r())?)
    }

    /// Starts computing the graph up to this array and returns at once; a later `eval` or copy
    /// waits for it. Lets the host prepare the next batch while the device works.
    pub fn async_eval(&self) -> Result<()> {
        Ok(ffi::async_eval(self.r())?)
    }

    /// Whether the array's computation is done (an array never submitted is not, unless it
    /// holds data from the host).
    pub fn is_available(&self) -> bool {
        ffi::is_available(self.r())
    }

    /// The array as f32 in row-major order: the form [`Array::to_f32_vec`] copies out without
    /// adding an operation after the array is submitted.
    pub fn for_host(&self) -> Result<Array> {
        wrap(ffi::for_host(self.r()))
    }

    /// The operations still to run for this array, by name (one entry per graph node).
    pub fn pending_ops(&self) -> Vec<String> {
        ffi::pending_ops(self.r())
    }

    /// Evaluates and copies the elements out (row-major), converted to f32. An array already
    /// submitted ([`Array::async_eval`]) is waited for alone; the conversion, when one is
    /// needed, runs after it and after everything submitted since.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(ffi::to_f32_vec(self.r())?)
    }

    /// Evaluates and copies the elements out (row-major), converted to i32.
    pub fn to_i32_vec(&self) -> Result<Vec<i32>> {
        Ok(ffi::to_i32_vec(self.r())?)
    }

    pub fn astype(&self, dtype: Dtype) -> Result<Array> {
        wrap(ffi::astype(self.r(), dtype))
    }

    pub fn reshape(&self, shape: &[i32]) -> Result<Array> {
        wrap(ffi::reshape(self.r(), shape))
    }

    pub fn transpose(&self, axes: &[i32]) -> Result<Array> {
        wrap(ffi::transpose(self.r(), axes))
    }

    pub fn expand_dims(&self, axis: i32) -> Result<Array> {
        wrap(ffi::expand_dims(self.r(), axis))
    }

    /// `self[start[0]..stop[0], start[1]..stop[1], …]`.
    pub fn slice(&self, start: &[i32], stop: &[i32]) -> Result<Array> {
        wrap(ffi::slice(self.r(), start, stop))
    }

    /// Rows (along `axis`) picked by an integer index array.
    pub fn take(&self, indices: &Array, axis: i32) -> Result<Array> {
        wrap(ffi::take(self.r(), indices.r(), axis))
    }

    /// `self` and `other` joined along `axis`.
    pub fn concatenate(&self, other: &Array, axis: i32) -> Result<Array> {
        wrap(ffi::concatenate(self.r(), other.r(), axis))
    }

    pub fn take_along_axis(&self, indices: &Array, axis: i32) -> Result<Array> {
        wrap(ffi::take_along_axis(self.r(), indices.r(), axis))
    }

    binary! {
        add => add,
        subtract => subtract,
        multiply => multiply,
        divide => divide,
        maximum => maximum,
        /// Batched matrix product (`@`).
        matmul => matmul,
        less => less,
        less_equal => less_equal,
        equal => equal,
        logical_and => logical_and,
        logical_or => logical_or,
    }

    unary!(abs, sqrt, rsqrt, square, tanh, sigmoid);

    /// Elementwise `cond ? x : y` (broadcasting).
    pub fn select(cond: &Array, x: &Array, y: &Array) -> Result<Array> {
        wrap(ffi::where_(cond.r(), x.r(), y.r()))
    }

    pub fn sum_axis(&self, axis: i32, keepdims: bool) -> Result<Array> {
        wrap(ffi::sum_axis(self.r(), axis, keepdims))
    }

    /// Fused RMSNorm over the last axis: `x / rms(x) * weight`.
    pub fn rms_norm(&self, weight: &Array, eps: f32) -> Result<Array> {
        wrap(ffi::rms_norm(self.r(), weight.r(), eps))
    }

    /// Fused rotary embedding over the last axis of `[B, H, L, D]`, positions `offset..offset+L`.
    pub fn rope(&self, dims: i32, traditional: bool, base: f32, scale: f32, offset: i32) -> Result<Array> {
        wrap(ffi::rope(self.r(), dims, traditional, base, scale, offset))
    }

    /// Per-head RMSNorm, then rotary embedding at positions `0..L`: `[B, L, H, D]` (heads split
    /// from token rows) → `[B, H, L, D]`. Equal to `rms_norm`, a transpose and `rope`, which is
    /// what it runs except on the CPU in f32 (one fused pass there).
    pub fn head_norm_rope(&self, weight: &Array, eps: f32, dims: i32, base: f32, scale: f32) -> Result<Array> {
        wrap(ffi::head_norm_rope(self.r(), weight.r(), eps, dims, base, scale))
    }

    /// `act(self) · up` (the gate of a gated MLP), elementwise.
    pub fn gated(&self, up: &Array, act: Activation) -> Result<Array> {
        wrap(ffi::gated_activation(self.r(), up.r(), act))
    }

    /// The heads of a fused q/k/v projection `[B·L, (H + 2·Hkv)·D]` of a batch of `b` rows of `l`
    /// tokens: q and k heads normed by `qw` / `kw` then rotated as in
    /// [`Array::head_norm_rope`], all three as `[B, heads, L, D]`. One fused kernel on a CUDA
    /// device; slices, `head_norm_rope` and a transpose elsewhere.
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_heads(&self, qw: &Array, kw: &Array, eps: f32, (b, l): (i32, i32), (heads, kv_heads, head_dim): (i32, i32, i32),
        dims: i32, base: f32, scale: f32) -> Result<(Array, Array, Array)> {
        let out = ffi::qkv_heads(self.r(), qw.r(), kw.r(), eps, b, l, heads, kv_heads, head_dim, dims, base, scale)?;
        let mut v = unlist(&out)?;
        match (v.pop(), v.pop(), v.pop()) {
            (Some(v), Some(k), Some(q)) => Ok((q, k, v)),
            _ => Err(MlxError("qkv_heads returned fewer than three arrays".into())),
        }
    }

    /// Attention over the heads of a fused q/k/v projection (as [`Array::qkv_heads`] makes them,
    /// then [`Array::attention`] with `attn_scale` and the additive `mask` `[B, 1, L, L]`), heads
    /// merged into token rows: `[B·L, H·D]`. One fused kernel for short sequences on a CUDA device.
    /// `causal`: `mask` is [`MaskKind::Causal`](crate::models::layers::MaskKind) of a
    /// right-padded batch; where cuDNN attends (large batches on a CUDA device) its causal mode
    /// then replaces the mask, which changes the values at padding tokens only.
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_attention(&self, qw: &Array, kw: &Array, eps: f32, (b, l): (i32, i32), (heads, kv_heads, head_dim): (i32, i32, i32),
        dims: i32, (base, rope_scale): (f32, f32), attn_scale: f32, mask: &Array, causal: bool) -> Result<Array> {
        wrap(ffi::qkv_attention(self.r(), qw.r(), kw.r(), eps, b, l, heads, kv_heads, head_dim, dims, base, rope_scale, attn_scale, mask.r(), causal))
    }

    /// `act(gate) · up` of a fused gate/up projection `[N, 2·I]` (gate columns first) → `[N, I]`.
    pub fn gated_halves(&self, act: Activation) -> Result<Array> {
        wrap(ffi::gated_halves(self.r(), act))
    }

    /// [`Array::gated_halves`] of `self · wt`, a fused gate/up projection (`wt` `[K, 2·I]`, a view of
    /// the rows `w` `[2·I, K]`): one kernel for a few token rows on a CUDA device.
    pub fn gated_matmul(&self, (w, wt): (&Array, &Array), act: Activation) -> Result<Array> {
        wrap(ffi::gated_matmul(self.r(), w.r(), wt.r(), act))
    }

    /// `self + post(y)` (the residual stream, f32, plus a block's output `y`, normed by `post`
    /// = (weight, eps) first when given) and that sum's RMSNorm by `weight`, returned in `out`.
    pub fn residual_rms_norm(&self, y: &Array, post: Option<(&Array, f32)>, weight: &Array, eps: f32, out: Dtype) -> Result<(Array, Array)> {
        let post_eps = post.map_or(eps, |(_, e)| e);
        let post = list_of(post.map(|(w, _)| w));
        let res = ffi::residual_rms_norm(self.r(), y.r(), &post, post_eps, weight.r(), eps, out)?;
        pair(&res, "residual_rms_norm")
    }

    /// [`Array::residual_rms_norm`] of the stream `self` and `y` (with its post-norm), or `self`
    /// and its RMSNorm when `y` is `None`, then that norm (in `out`) times `rows`ᵀ (the rows
    /// `[N, E]` and a `[E, N]` view of them), and with `gate` [`Array::gated_halves`] of the
    /// product: (the stream, the product). One kernel for a few token rows on a CUDA device.
    pub fn norm_matmul(&self, y: Option<(&Array, Option<(&Array, f32)>)>, weight: &Array, eps: f32, out: Dtype,
        (rows, rows_t): (&Array, &Array), gate: Option<Activation>) -> Result<(Array, Array)> {
        let post = y.and_then(|(_, p)| p);
        let post_eps = post.map_or(eps, |(_, e)| e);
        let (ys, post) = (list_of(y.map(|(y, _)| y)), list_of(post.map(|(w, _)| w)));
        let act = gate.unwrap_or(Activation::Silu);
        let res = ffi::norm_matmul(self.r(), &ys, &post, post_eps, weight.r(), eps, out, rows.r(), rows_t.r(), gate.is_some(), act)?;
        pair(&res, "norm_matmul")
    }

    /// Fused attention `softmax(q·kᵀ·scale + mask)·v` over `[B, H, L, D]` (grouped KV heads
    /// allowed). `mask` is boolean (true = may attend) and broadcasts to `[B, H, L, L]`.
    pub fn attention(q: &Array, k: &Array, v: &Array, scale: f32, mask: &Array) -> Result<Array> {
        wrap(ffi::scaled_dot_product_attention(q.r(), k.r(), v.r(), scale, mask.r()))
    }

    /// `self @ dequantize(w)ᵀ` for an affine-quantized `w` (MLX packing).
    pub fn quantized_matmul(&self, w: &Array, scales: &Array, biases: &Array, group_size: i32, bits: i32) -> Result<Array> {
        wrap(ffi::quantized_matmul(self.r(), w.r(), scales.r(), biases.r(), true, group_size, bits))
    }

    /// Affine dequantization of packed `w`: `scales · q + biases` per group.
    pub fn dequantize(w: &Array, scales: &Array, biases: &Array, group_size: i32, bits: i32) -> Result<Array> {
        wrap(ffi::dequantize(w.r(), scales.r(), biases.r(), group_size, bits))
    }
}

impl Clone for Array {
    fn clone(&self) -> Self {
        Array { raw: ffi::clone_ref(self.r()), _not_send: PhantomData }
    }
}

impl std::fmt::Debug for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dtype = self.dtype().map(|d| d.name()).unwrap_or("?");
        write!(f, "Array({:?}, {dtype})", self.shape())
    }
}

fn check_len(len: usize, shape: &[i32]) -> Result<()> {
    let want: i64 = shape.iter().map(|&d| d as i64).product();
    if shape.iter().any(|&d| d < 0) || want != len as i64 {
        return Err(MlxError(format!("{len} elements do not fill shape {shape:?}")));
    }
    Ok(())
}

/// A function of arrays compiled by `mlx::core::compile`: traced on its first call for each set
/// of input shapes and dtypes (the trace simplified, chains of elementwise operations fused into
/// single kernels), then replayed for later calls with those shapes. The function must be pure:
/// it may read its inputs' shapes and dtypes but not their values, and must not evaluate.
pub struct Compiled {
    raw: UniquePtr<ffi::CompiledFn>,
    _not_send: PhantomData<*const ()>,
}

/// The Rust side of a [`Compiled`]: what MLX calls to trace.
pub struct TraceFn(Box<dyn Fn(&[Array]) -> Result<Vec<Array>>>);

/// Called by MLX (through the bridge) when it traces a [`Compiled`]. A panic inside the function
/// becomes an error: it must not unwind into C++.
pub(crate) fn trace_call(f: &TraceFn, inputs: &ffi::ArrayList, mut outputs: Pin<&mut ffi::ArrayList>) -> Result<()> {
    let args = (0..ffi::array_list_len(inputs)).map(|i| wrap(ffi::array_list_get(inputs, i))).collect::<Result<Vec<_>>>()?;
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (f.0)(&args)))
        .map_err(|_| MlxError("the compiled function panicked while being traced".into()))??;
    for a in &out {
        ffi::array_list_push(outputs.as_mut(), a.r());
    }
    Ok(())
}

impl Compiled {
    pub fn new(f: impl Fn(&[Array]) -> Result<Vec<Array>> + 'static) -> Result<Compiled> {
        let raw = ffi::compile(Box::new(TraceFn(Box::new(f))))?;
        Ok(Compiled { raw, _not_send: PhantomData })
    }

    /// Runs the function on `inputs` (tracing it first for shapes not seen before). The outputs
    /// are lazy like any other array.
    pub fn call(&self, inputs: &[Array]) -> Result<Vec<Array>> {
        let f = self.raw.as_ref().expect("Compiled is never null");
        let out = ffi::call_compiled(f, &list_of(inputs))?;
        unlist(&out)
    }
}

/// A bridge list of `arrays`, in order.
fn list_of<'a>(arrays: impl IntoIterator<Item = &'a Array>) -> UniquePtr<ffi::ArrayList> {
    let mut list = ffi::array_list_new();
    for a in arrays {
        ffi::array_list_push(list.pin_mut(), a.r());
    }
    list
}

/// The two arrays of a list returned by `what` through the bridge.
fn pair(list: &UniquePtr<ffi::ArrayList>, what: &str) -> Result<(Array, Array)> {
    let mut v = unlist(list)?;
    match (v.pop(), v.pop()) {
        (Some(second), Some(first)) => Ok((first, second)),
        _ => Err(MlxError(format!("{what} returned fewer than two arrays"))),
    }
}

/// The arrays of a list returned by the bridge.
fn unlist(list: &UniquePtr<ffi::ArrayList>) -> Result<Vec<Array>> {
    let list = list.as_ref().ok_or_else(|| MlxError("the bridge returned no list".into()))?;
    (0..ffi::array_list_len(list)).map(|i| wrap(ffi::array_list_get(list, i))).collect()
}

/// The tensors of one safetensors file (memory-mapped by MLX, read lazily), taken out by name.
pub struct TensorFile {
    raw: UniquePtr<ffi::TensorFile>,
    _not_send: PhantomData<*const ()>,
}

impl TensorFile {
    pub fn open(path: &std::path::Path) -> Result<TensorFile> {
        let p = path.to_str().ok_or_else(|| MlxError(format!("path is not UTF-8: {}", path.display())))?;
        let raw = ffi::load_safetensors(p)?;
        Ok(TensorFile { raw, _not_send: PhantomData })
    }

    pub fn names(&self) -> Vec<String> {
        ffi::tensor_names(self.raw.as_ref().expect("TensorFile is never null"))
    }

    /// Removes and returns the tensor `name`.
    pub fn take(&mut self, name: &str) -> Result<Array> {
        let pinned: Pin<&mut ffi::TensorFile> = self.raw.pin_mut();
        wrap(ffi::take_tensor(pinned, name))
    }
}
