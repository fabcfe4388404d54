//! Typed errors. Model-folder errors name the file and the field or tensor at fault, so an operator
//! can fix a checkpoint without reading code; request errors name the request field.
//!
//! Client strings reach errors only through [`quote`], and the status mapping bounds every text it
//! carries: a client can send megabytes in any string field, and quoted whole they would come back
//! as megabytes of trailers, which gRPC clients refuse (grpc-core at 8 KB, with
//! RESOURCE_EXHAUSTED in place of the real error).

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

/// How much of a client string an error quotes, in bytes.
const QUOTED_BYTES: usize = 64;

/// How long a status message (or a field violation's field or description) may be, in bytes:
/// room for every message the service writes, far below the clients' trailer limits.
const STATUS_TEXT_BYTES: usize = 1024;

/// A client-supplied string as errors quote it: in backticks, whole when short, else its first
/// 64 bytes (cut on a character boundary), `…` and its length.
pub fn quote(s: &str) -> String {
    match shortened(s, QUOTED_BYTES) {
        None => format!("`{s}`"),
        Some(prefix) => format!("`{prefix}…` ({} bytes)", s.len()),
    }
}

/// `s` cut to at most `max_bytes` on a character boundary, or `None` when it fits.
fn shortened(s: &str, max_bytes: usize) -> Option<&str> {
    if s.len() <= max_bytes {
        return None;
    }
    let end = (0..=max_bytes).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
    Some(&s[..end])
}

/// A text for a status: whole when it fits [`STATUS_TEXT_BYTES`], else cut with `…`. Catches
/// client input that reached a message without [`quote`].
fn bounded(s: String) -> String {
    match shortened(&s, STATUS_TEXT_BYTES - '…'.len_utf8()) {
        None => s,
        Some(prefix) => format!("{prefix}…"),
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
        let message = bounded(e.to_string());
        match e {
            Error::InvalidArgument { field, message: why } => tonic::Status::with_error_details(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request_violation(bounded(field), bounded(why)),
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
    fn a_quote_keeps_short_strings_whole_and_cuts_long_ones_on_a_character_boundary() {
        assert_eq!(quote("poem"), "`poem`");
        assert_eq!(quote(&"a".repeat(64)), format!("`{}`", "a".repeat(64)));
        assert_eq!(quote(&"a".repeat(65)), format!("`{}…` (65 bytes)", "a".repeat(64)));
        // 'é' is two bytes: 32 of them fill the 64, a 33rd would straddle the cut.
        assert_eq!(quote(&format!("x{}", "é".repeat(100))), format!("`x{}…` (201 bytes)", "é".repeat(31)));
    }

    #[test]
    fn a_status_carries_at_most_a_kilobyte_of_text_whatever_the_error_holds() {
        let huge = "ü".repeat(1 << 19);
        let status: tonic::Status = Error::invalid(huge.clone(), huge.clone()).into();
        assert!(status.message().len() <= STATUS_TEXT_BYTES && status.message().ends_with('…'));
        let details = status.get_error_details();
        let v = &details.bad_request().expect("BadRequest detail").field_violations[0];
        assert!(v.field.len() <= STATUS_TEXT_BYTES && v.description.len() <= STATUS_TEXT_BYTES);
        let status: tonic::Status = Error::NotFound(huge).into();
        assert_eq!((status.code(), status.message().len() <= STATUS_TEXT_BYTES), (tonic::Code::NotFound, true));
        // Messages that fit are untouched.
        assert_eq!(tonic::Status::from(Error::NotFound("no model named `x`".into())).message(), "no model named `x`");
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
