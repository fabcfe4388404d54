//! Safe MLX for the rest of the crate: [`Array`], [`Dtype`], device queries and [`memory`]
//! (MLX's counters, limits and cache).
//!
//! This is the only module that names `cxx` or the FFI. Every operation returns
//! [`Result`]: MLX reports bad shapes and other misuse with C++ exceptions, which arrive here as
//! [`MlxError`] instead of aborting the process. MLX is not thread-safe, so [`Array`] is `!Send`:
//! arrays stay on the thread that made them (the engine thread).

mod array;
mod ffi;
pub mod memory;

pub use array::{Array, Compiled, TensorFile};
pub use memory::{memory_stats, MemoryStats};
pub use ffi::ffi::{Activation, Dtype};

/// An error raised by MLX (a C++ exception) or by the bridge around it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("MLX: {0}")]
pub struct MlxError(pub String);

impl From<cxx::Exception> for MlxError {
    fn from(e: cxx::Exception) -> Self {
        MlxError(e.what().to_string())
    }
}

pub type Result<T> = std::result::Result<T, MlxError>;

impl Dtype {
    /// The name used in configs, logs and the API (`float32`, `bfloat16`, …).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "bool",
            Dtype::Uint8 => "uint8",
            Dtype::Uint16 => "uint16",
            Dtype::Uint32 => "uint32",
            Dtype::Uint64 => "uint64",
            Dtype::Int8 => "int8",
            Dtype::Int16 => "int16",
            Dtype::Int32 => "int32",
            Dtype::Int64 => "int64",
            Dtype::Float16 => "float16",
            Dtype::Float32 => "float32",
            Dtype::Float64 => "float64",
            Dtype::Bfloat16 => "bfloat16",
            Dtype::Complex64 => "complex64",
            _ => "unknown",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Dtype::Float16 | Dtype::Float32 | Dtype::Float64 | Dtype::Bfloat16)
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The MLX library version actually loaded (the wheel's, or the one `LD_LIBRARY_PATH` chose).
pub fn version() -> String {
    ffi::ffi::version()
}

/// Whether MLX has a GPU backend here (Metal on a Mac, CUDA with the CUDA runtime).
pub fn gpu_is_available() -> bool {
    ffi::ffi::gpu_is_available()
}

/// Makes the GPU (or the CPU) the device every later operation of this thread runs on.
pub fn set_default_device(gpu: bool) -> Result<()> {
    Ok(ffi::ffi::set_default_device(gpu)?)
}

/// Where the fused CUDA kernels' compiled images are kept (see `src/mlx/nvrtc.h`), once a model
/// has run on a CUDA device: `folder:{path}` (found again by later processes), `memory` (the
/// folder cannot be used: every process compiles them again), `unused` (no CUDA device, or
/// NVRTC cannot compile for it).
pub fn cuda_kernel_cache() -> String {
    ffi::ffi::cuda_kernel_cache()
}

/// Compiles the CUDA kernel `name` of `source` for `arch` (e.g. `sm_90a`) with the NVRTC library
/// at `library` into `dir`, as the service keeps its kernels' images (`src/mlx/nvrtc.h`), unless
/// it is there: whether it compiled, and the image's file. Needs no GPU.
pub fn compile_cuda_kernel(library: &std::path::Path, dir: &std::path::Path, name: &str, source: &str, arch: &str) -> Result<(bool, std::path::PathBuf)> {
    let (lib, dir) = (library.to_string_lossy(), dir.to_string_lossy());
    let stored = ffi::ffi::nvrtc_store(&lib, &dir, name, source, arch)?;
    Ok((stored.compiled, stored.image.into()))
}
