//! Generated protobuf messages and gRPC services of package `prodsys.v1`,
//! and their conversions to and from the domain's plain types (`convert`).

pub mod convert;

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("prodsys.v1");
}

/// Encoded `FileDescriptorSet` of every prodsys proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/prodsys_descriptor.bin"));

pub use convert::StateProto;
pub use v1::*;
