//! mlx-embed: text embeddings computed with Apple's MLX, for vector stores.
//!
//! Layout:
//! - [`mlx`]: the only place that touches MLX's C++ API (cxx bridge); safe, `!Send` arrays.
//! - [`models`]: Qwen3 and Gemma 3 encoders, weight loading (safetensors, MLX-quantized), the
//!   sentence-transformers head (pooling, Dense, normalization) and [`models::EmbeddingModel`].
//! - [`tokenize`]: tokenizer.json with prompts, end tokens and truncation.
//! - [`registry`]: model sources: local folders and Hugging Face hub repositories (download,
//!   cache shared with Python tools, integrity checks).
//! - [`error`]: typed errors naming the file, field or tensor at fault.
//! - [`synthetic`]: real models' shapes with random weights from a seed, for benchmarks.
//! - [`grpc`]: the protocol (generated types) and, with the `server` feature, the service.
//! - [`client`]: the Rust client for vector stores (`client` feature): retries, deadlines,
//!   bulk ingest in bounded requests, balancing across endpoints.
//!
//! Features: `server` (the service and the `mlx-embed` binary) and `client`, both on by default. A
//! vector store depends on `default-features = false, features = ["client"]`.
#[cfg(feature = "server")]
pub mod bench;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod engine;
#[cfg(feature = "server")]
pub mod error;
#[cfg(feature = "server")]
pub mod metrics;
pub mod grpc;
#[cfg(feature = "server")]
pub mod mlx;
#[cfg(feature = "server")]
pub mod models;
#[cfg(feature = "server")]
pub mod registry;
#[cfg(feature = "server")]
pub mod synthetic;
#[cfg(feature = "server")]
pub mod profile;
#[cfg(feature = "server")]
pub mod tokenize;
