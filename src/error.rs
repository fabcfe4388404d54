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
    /// No model (or other named thing) by that name.
    #[error("{0}")]
    NotFound(String),
    /// The model exists but cannot serve now (loading, failed to load, shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// Too much work queued; try again later.
    #[error("{0}")]
    Overloaded(String),
    /// The request's deadline passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A message over `limits.max_message_bytes` (retrying the same call cannot help).
    #[error("{0}")]
    TooLarge(String),
    /// Something failed inside the service (an inference error, a panic).
    #[error("{0}")]
    Internal(String),
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

impl From<crate::engine::EngineError> for Error {
    fn from(e: crate::engine::EngineError) -> Self {
        use crate::engine::EngineError as E;
        match e {
            E::NotReady(_) | E::Stopped => Error::Unavailable(e.to_string()),
            E::Overloaded { .. } => Error::Overloaded(e.to_string()),
            E::Failed(_) => Error::Internal(e.to_string()),
        }
    }
}

/// The one mapping from errors to gRPC statuses. Invalid arguments carry a google.rpc.BadRequest
/// naming the field (`items[3].vector.values`); overload carries a google.rpc.RetryInfo.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        use tonic_types::{ErrorDetails, StatusExt};
        let message = e.to_string();
        match e {
            Error::InvalidArgument { field, message: why } => tonic::Status::with_error_details(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request_violation(field, why),
            ),
            Error::NotFound(_) => tonic::Status::not_found(message),
            Error::Unavailable(_) => tonic::Status::unavailable(message),
            Error::Overloaded(_) => tonic::Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(std::time::Duration::from_millis(100))),
            ),
            Error::DeadlineExceeded(_) => tonic::Status::deadline_exceeded(message),
            Error::TooLarge(_) => tonic::Status::resource_exhausted(message),
            Error::ModelFile { .. }
            | Error::ModelField { .. }
            | Error::Tensor { .. }
            | Error::Tokenizer(_)
            | Error::Mlx(_)
            | Error::Internal(_) => tonic::Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    #[test]
    fn invalid_arguments_name_the_field_in_a_bad_request() {
        let status: tonic::Status = Error::invalid("items[2].text", "empty").into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let details = status.get_error_details();
        let v = &details.bad_request().expect("BadRequest detail").field_violations[0];
        assert_eq!((v.field.as_str(), v.description.as_str()), ("items[2].text", "empty"));
    }

    #[test]
    fn overload_says_when_to_retry() {
        let status: tonic::Status = Error::Overloaded("full".into()).into();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.get_error_details().retry_info().and_then(|r| r.retry_delay).is_some());
    }

    #[test]
    fn engine_errors_map_to_their_codes() {
        use crate::engine::EngineError;
        let code = |e: EngineError| tonic::Status::from(Error::from(e)).code();
        assert_eq!(code(EngineError::NotReady("m".into())), tonic::Code::Unavailable);
        assert_eq!(code(EngineError::Overloaded { model: "m".into(), queued: 1, limit: 1 }), tonic::Code::ResourceExhausted);
        assert_eq!(code(EngineError::Failed("x".into())), tonic::Code::Internal);
    }
}
