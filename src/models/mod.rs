//! Embedding models on MLX: the transformer encoders (`qwen3`, `gemma3`), their shared layers and
//! weight loading, the sentence-transformers head (`head`: pooling, Dense, normalization) and the
//! [`EmbeddingModel`] that ties a model folder together.

pub mod attention;
mod embedder;
pub mod files;
pub mod gemma3;
pub mod head;
pub mod kernel_check;
pub mod layers;
pub mod qwen3;
pub mod rope;
pub mod weights;

use std::path::Path;

pub use embedder::{finish, Architecture, EmbeddingModel, Launched, LoadOptions, ModelInfo, Preprocessor, PromptChoice};

use crate::error::{Error, Result};
use crate::mlx::Array;

/// A transformer that maps right-padded token ids to final hidden states, in two steps: the
/// arrays a batch needs besides its ids (attention masks, from the row lengths on the host), and
/// the forward itself, a pure function of arrays that [`crate::mlx::Compiled`] can trace.
pub trait Encoder {
    /// The masks for rows of `lengths` real tokens (each ≥ 1) padded to `len`.
    fn masks(&self, lengths: &[i32], len: i32) -> Result<Vec<Array>>;
    /// `ids` `[B, L]` int32, right-padded, and the batch's [`Encoder::masks`] → `[B, L, hidden]`.
    fn encode(&self, ids: &Array, masks: &[Array]) -> Result<Array>;
    fn dims(&self) -> EncoderDims;
}

/// Sizes of an encoder that the rest of the pipeline needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderDims {
    pub hidden: i32,
    pub vocab: i32,
    pub max_positions: i32,
}

/// Fails naming the first field that is not positive.
pub(crate) fn check_positive(path: &Path, fields: &[(&str, i32)]) -> Result<()> {
    match fields.iter().find(|(_, v)| *v <= 0) {
        Some((name, v)) => Err(Error::field(path, *name, format!("must be positive, found {v}"))),
        None => Ok(()),
    }
}
