//! The cxx bridge to MLX's C++ API. Every function returns `Result`: a C++ exception becomes a
//! Rust error instead of terminating the process. The C++ side (`shim.cc`) forwards to MLX, or to
//! the fused CPU kernels (`cpu_kernels.cc`) or CUDA kernels (`gpu_kernels.cc`) where they apply.

pub(crate) use super::array::{trace_call, TraceFn};

#[cxx::bridge(namespace = "mlx_embed")]
pub(crate) mod ffi {
    /// Element types, shared with C++ so that an unknown value is an error, never a silent default.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[repr(u8)]
    enum Dtype {
        Bool,
        Uint8,
        Uint16,
        Uint32,
        Uint64,
        Int8,
        Int16,
        Int32,
        Int64,
        Float16,
        Float32,
        Float64,
        Bfloat16,
        Complex64,
    }

    /// The activation of a gated MLP, `act(gate) · up`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    #[repr(u8)]
    enum Activation {
        /// `x · sigmoid(x)`.
        Silu,
        /// GELU, tanh approximation (`gelu_pytorch_tanh`).
        GeluTanh,
    }

    /// A CUDA kernel kept in the compiled kernels' folder (`nvrtc::store`).
    struct StoredKernel {
        /// Whether it was compiled now (false: it was there).
        compiled: bool,
        /// Its image's file.
        image: String,
    }

    extern "Rust" {
        /// The Rust function a [`CompiledFn`] traces.
        type TraceFn;
        fn trace_call(f: &TraceFn, inputs: &ArrayList, outputs: Pin<&mut ArrayList>) -> Result<()>;
    }

    unsafe extern "C++" {
        include!("mlx-embed/src/mlx/shim.h");

        #[namespace = "mlx::core"]
        type array;
        /// The tensors of one safetensors file, taken out one by one.
        type TensorFile;
        /// A list of arrays (a compiled function's inputs or outputs).
        type ArrayList;
        /// A function compiled by `mlx::core::compile` (traced once per input shape, elementwise
        /// chains fused).
        type CompiledFn;

        // ---- construction and inspection
        fn from_f32(data: &[f32], shape: &[i32]) -> Result<UniquePtr<array>>;
        fn from_i32(data: &[i32], shape: &[i32]) -> Result<UniquePtr<array>>;
        fn scalar(value: f32, dtype: Dtype) -> Result<UniquePtr<array>>;
        fn arange(start: i32, stop: i32) -> Result<UniquePtr<array>>;
        fn clone_ref(a: &array) -> UniquePtr<array>;
        fn shape(a: &array) -> Vec<i32>;
        fn dtype(a: &array) -> Result<Dtype>;
        fn to_f32_vec(a: &array) -> Result<Vec<f32>>;
        fn to_i32_vec(a: &array) -> Result<Vec<i32>>;
        fn eval(a: &array) -> Result<()>;
        fn async_eval(a: &array) -> Result<()>;
        fn is_available(a: &array) -> bool;
        fn for_host(a: &array) -> Result<UniquePtr<array>>;
        /// The operation names of the graph not yet computed that `a` depends on, one entry per
        /// node (a multi-output node once).
        fn pending_ops(a: &array) -> Vec<String>;

        // ---- shape and type
        fn astype(a: &array, dtype: Dtype) -> Result<UniquePtr<array>>;
        fn reshape(a: &array, shape: &[i32]) -> Result<UniquePtr<array>>;
        fn transpose(a: &array, axes: &[i32]) -> Result<UniquePtr<array>>;
        fn expand_dims(a: &array, axis: i32) -> Result<UniquePtr<array>>;
        fn slice(a: &array, start: &[i32], stop: &[i32]) -> Result<UniquePtr<array>>;
        fn take(a: &array, indices: &array, axis: i32) -> Result<UniquePtr<array>>;
        fn concatenate(a: &array, b: &array, axis: i32) -> Result<UniquePtr<array>>;
        fn take_along_axis(a: &array, indices: &array, axis: i32) -> Result<UniquePtr<array>>;

        // ---- arithmetic and comparisons (broadcasting)
        fn add(a: &array, b: &array) -> Result<UniquePtr<array>>;
        fn subtract(a: &array, b: &array) -> Result<UniquePtr<array>>;
        fn multiply(a: &array, b: &array) -> Result<UniquePtr<array>>;
        fn divide(a: &array, b: &array) -> Result<UniquePtr<array>>;
        fn maximum(a: &array, b: &array) -> Result<UniquePtr<array>>;
        fn matmul(a: &array, b: &array) -> Result<UniquePtr<array>>;
        fn less(a: &array, b: &array) -> Result<UniquePtr<array>>;
        fn less_equal(a: &array, b: &array) -> Result<UniquePtr<array>>;
        fn equal(a: &array, b: &array) -> Result<UniquePtr<array>>;
        fn logical_and(a: &array, b: &array) -> Result<UniquePtr<array>>;
        fn logical_or(a: &array, b: &array) -> Result<UniquePtr<array>>;
        fn where_(cond: &array, x: &array, y: &array) -> Result<UniquePtr<array>>;

        // ---- elementwise and reductions
        fn abs(a: &array) -> Result<UniquePtr<array>>;
        fn sqrt(a: &array) -> Result<UniquePtr<array>>;
        fn rsqrt(a: &array) -> Result<UniquePtr<array>>;
        fn square(a: &array) -> Result<UniquePtr<array>>;
        fn tanh(a: &array) -> Result<UniquePtr<array>>;
        fn sigmoid(a: &array) -> Result<UniquePtr<array>>;
        fn sum_axis(a: &array, axis: i32, keepdims: bool) -> Result<UniquePtr<array>>;

        // ---- fused kernels
        fn rms_norm(x: &array, weight: &array, eps: f32) -> Result<UniquePtr<array>>;
        fn rope(
            x: &array,
            dims: i32,
            traditional: bool,
            base: f32,
            scale: f32,
            offset: i32,
        ) -> Result<UniquePtr<array>>;
        fn head_norm_rope(
            x: &array,
            weight: &array,
            eps: f32,
            dims: i32,
            base: f32,
            scale: f32,
        ) -> Result<UniquePtr<array>>;
        fn gated_activation(gate: &array, up: &array, act: Activation) -> Result<UniquePtr<array>>;
        #[allow(clippy::too_many_arguments)]
        fn qkv_heads(
            qkv: &array,
            qw: &array,
            kw: &array,
            eps: f32,
            b: i32,
            l: i32,
            heads: i32,
            kv_heads: i32,
            head_dim: i32,
            dims: i32,
            base: f32,
            scale: f32,
        ) -> Result<UniquePtr<ArrayList>>;
        #[allow(clippy::too_many_arguments)]
        fn qkv_attention(
            qkv: &array,
            qw: &array,
            kw: &array,
            eps: f32,
            b: i32,
            l: i32,
            heads: i32,
            kv_heads: i32,
            head_dim: i32,
            dims: i32,
            base: f32,
            rope_scale: f32,
            attn_scale: f32,
            mask: &array,
            causal: bool,
        ) -> Result<UniquePtr<array>>;
        fn gated_halves(gu: &array, act: Activation) -> Result<UniquePtr<array>>;
        fn gated_matmul(x: &array, w: &array, wt: &array, act: Activation) -> Result<UniquePtr<array>>;
        fn residual_rms_norm(
            x: &array,
            y: &array,
            post: &ArrayList,
            post_eps: f32,
            w: &array,
            eps: f32,
            out: Dtype,
        ) -> Result<UniquePtr<ArrayList>>;
        #[allow(clippy::too_many_arguments)]
        fn norm_matmul(
            x: &array,
            y: &ArrayList,
            post: &ArrayList,
            post_eps: f32,
            w: &array,
            eps: f32,
            out: Dtype,
            rows: &array,
            rows_t: &array,
            gated: bool,
            act: Activation,
        ) -> Result<UniquePtr<ArrayList>>;
        fn scaled_dot_product_attention(
            q: &array,
            k: &array,
            v: &array,
            scale: f32,
            mask: &array,
        ) -> Result<UniquePtr<array>>;
        fn quantized_matmul(
            x: &array,
            w: &array,
            scales: &array,
            biases: &array,
            transpose: bool,
            group_size: i32,
            bits: i32,
        ) -> Result<UniquePtr<array>>;
        fn dequantize(
            w: &array,
            scales: &array,
            biases: &array,
            group_size: i32,
            bits: i32,
        ) -> Result<UniquePtr<array>>;

        // ---- compilation
        fn array_list_new() -> UniquePtr<ArrayList>;
        fn array_list_push(list: Pin<&mut ArrayList>, a: &array);
        fn array_list_len(list: &ArrayList) -> usize;
        fn array_list_get(list: &ArrayList, i: usize) -> Result<UniquePtr<array>>;
        fn compile(f: Box<TraceFn>) -> Result<UniquePtr<CompiledFn>>;
        fn call_compiled(f: &CompiledFn, inputs: &ArrayList) -> Result<UniquePtr<ArrayList>>;

        // ---- weights
        fn load_safetensors(path: &str) -> Result<UniquePtr<TensorFile>>;
        fn tensor_names(file: &TensorFile) -> Vec<String>;
        fn take_tensor(file: Pin<&mut TensorFile>, name: &str) -> Result<UniquePtr<array>>;

        // ---- devices and memory
        fn gpu_is_available() -> bool;
        fn set_default_device(gpu: bool) -> Result<()>;
        fn version() -> String;
        fn active_memory() -> usize;
        fn peak_memory() -> usize;
        fn cache_memory() -> usize;
        /// Returns the limit before.
        fn set_memory_limit(limit: usize) -> Result<usize>;
        fn memory_limit() -> Result<usize>;
        /// Returns the limit before.
        fn set_cache_limit(limit: usize) -> Result<usize>;
        fn clear_cache() -> Result<()>;
        /// A size the GPU backend reports about device 0 (`mlx::core::gpu::device_info`), by key;
        /// an error if it has none under that key.
        fn gpu_info_size(key: &str) -> Result<usize>;

        // ---- the CUDA kernels' compiler (nvrtc.h)
        fn nvrtc_store(library: &str, dir: &str, name: &str, source: &str, arch: &str) -> Result<StoredKernel>;
        fn cuda_kernel_cache() -> String;
    }
}
