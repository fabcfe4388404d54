//! Typed errors. Model-folder errors name the file and the field or tensor at fault, so an operator
//! can fix a checkpoint without reading code; request errors name the request field.

use std::path::{Path, PathBuf};

use crate::mlx::MlxError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file of a model folder is missing, unreadable or not what it should be.
    #[error("{}: {message}", path.display())]
    ModelFile { path: PathBuf, message: String },
    /// A field of a model file (config.json, modules.json, …) is missing or has a bad value.
    #[error("{}: field `{field}`: {message}", path.display())]
    ModelField { path: PathBuf, field: String, message: String },
    /// A tensor of a weights file is missing or has the wrong shape or dtype.
    #[error("{}: tensor `{tensor}`: {message}", path.display())]
    Tensor { path: PathBuf, tensor: String, message: String },
    /// A request asks for something the model cannot do (unknown prompt, dimensions not allowed…).
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// The tokenizer failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// MLX raised an error while computing.
    #[error(transparent)]
    Mlx(#[from] MlxError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(path: &Path, message: impl Into<String>) -> Error {
        Error::ModelFile { path: path.to_path_buf(), message: message.into() }
    }

    pub fn field(path: &Path, field: impl Into<String>, message: impl Into<String>) -> Error {
        Error::ModelField { path: path.to_path_buf(), field: field.into(), message: message.into() }
    }

    pub fn tensor(path: &Path, tensor: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Tensor { path: path.to_path_buf(), tensor: tensor.into(), message: message.into() }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Error {
        Error::InvalidArgument { field: field.into(), message: message.into() }
    }
}
