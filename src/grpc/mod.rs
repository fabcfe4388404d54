//! The gRPC service: generated protocol types, handlers, health and reflection.

pub mod pb {
    //! Generated from `proto/embedding/v1/embedding.proto`.
    #![allow(clippy::all)]
    tonic::include_proto!("embedding.v1");

    /// Encoded descriptor set of the protocol, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("embedding_descriptor");
}
pub mod admission;
pub mod auth;
pub mod codec;
pub mod convert;
pub mod observe;
pub mod service;
pub mod server;
