//! The router (attention service) as a library: the engine task, the public gRPC service and
//! the tower layers in front of it, the client side of the expert shards, and the error →
//! status table. `main.rs` only wires them.

pub mod engine_task;
pub mod limits;
pub mod metrics;
pub mod remote_experts;
pub mod service;
pub mod status;
