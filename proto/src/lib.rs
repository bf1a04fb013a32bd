//! Wire types and tonic stubs of dsv2's two gRPC APIs, plus codecs for their raw tensor fields.
//!
//! - [`inference::v1`]: the public API `dsv2.v1.Inference` served by the router.
//! - [`expert::v1`]: the internal API `dsv2.expert.v1.ExpertShard` served by each expert shard.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors of both, for tonic-reflection.
//! - [`tensor`]: little-endian bf16/f32 rows <-> `bytes` fields, with typed size checks.

pub mod tensor;

/// The public inference API (`package dsv2.v1`).
pub mod inference {
    /// Version 1 of the public API.
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("dsv2.v1");
    }
}

/// The internal router <-> expert-shard API (`package dsv2.expert.v1`).
pub mod expert {
    /// Version 1 of the expert-shard API.
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("dsv2.expert.v1");
    }
}

/// Encoded `google.protobuf.FileDescriptorSet` of every proto file of this crate, for
/// `tonic_reflection::server::Builder::register_encoded_file_descriptor_set`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/dsv2_descriptor.bin"));

/// Fully-qualified name of the public service (`dsv2.v1.Inference`), as health checks and
/// reflection list it.
pub const INFERENCE_SERVICE_NAME: &str = inference::v1::inference_server::SERVICE_NAME;
/// Fully-qualified name of the expert-shard service (`dsv2.expert.v1.ExpertShard`), as health
/// checks and reflection list it.
pub const EXPERT_SHARD_SERVICE_NAME: &str = expert::v1::expert_shard_server::SERVICE_NAME;
