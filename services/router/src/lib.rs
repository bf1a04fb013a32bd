//! The router (attention service) as a library: the engine task, the public gRPC service and
//! the tower layers in front of it, the OpenAI-compatible HTTP API over that service, the
//! client side of the expert shards, the error → status tables, metrics and trace context.
//! `main.rs` only wires them.

pub mod engine_task;
pub mod event_sender;
pub mod host_memory;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod remote_experts;
pub mod request;
pub mod service;
pub mod shard_health;
pub mod status;
pub mod trace;
