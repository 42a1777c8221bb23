//! The callbridge gRPC contract: package `callbridge.v1`.
//!
//! The `.proto` source is `proto/proto/callbridge/v1/callbridge.proto`; it is compiled at
//! build time (protox + tonic-prost-build), so there is no generated code to drift.

pub mod codec;
pub mod paths;

/// Generated types, clients and servers of `callbridge.v1`.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used
)]
pub mod pb {
    tonic::include_proto!("callbridge.v1");
}

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/callbridge_descriptor.bin"));

/// Path of the `.proto` file inside this crate, for clients in other languages.
pub const PROTO_PATH: &str = "proto/callbridge/v1/callbridge.proto";
