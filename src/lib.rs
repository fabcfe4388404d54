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
pub mod bench;
pub mod config;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod grpc;
pub mod mlx;
pub mod models;
pub mod registry;
pub mod tokenize;
