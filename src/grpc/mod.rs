//! The gRPC service: generated protocol types, handlers, health and reflection.

pub mod pb {
    //! Generated from `proto/embedding/v1/embedding.proto`.
    #![allow(clippy::all)]
    tonic::include_proto!("embedding.v1");

    /// Encoded descriptor set of the protocol, for server reflection.
    #[cfg(feature = "server")]
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("embedding_descriptor");
}
pub mod codec;
#[cfg(feature = "server")]
pub mod admission;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod convert;
#[cfg(feature = "server")]
pub mod health;
#[cfg(feature = "server")]
pub mod observe;
#[cfg(feature = "server")]
pub mod service;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod stream;
