//! dsv2-nccl-experts: routed experts over dsv2-nccl's data plane, for the CUDA backend.
//!
//! - [`NcclExperts`] is the router's `ExpertExecutor`: per MoE layer it gathers each shard's rows
//!   on the router's GPU, hands them to the plane's thread (rank 0) and adds the partial sums
//!   that come back into an f32 accumulator, all on the device.
//! - [`ShardExperts`] is the shard's `ShardCompute`: it runs the shard's experts on the rows
//!   received into its device buffers; [`shard_join_handler`] answers `ExpertShard.NcclInit`.
//! - [`ShardWatch`] polls the shards' health so that a dead shard fails the layer at once.
//!
//! The rows a shard gets, their order and the arithmetic of the sum are the gRPC transport's
//! (`dsv2_core::placement::split_rows`, f32 sum in shard order, one rounding to bf16), so both
//! transports give bit-identical results.

mod router;
mod shard;
mod watchdog;

pub use router::{NcclExperts, PlaneShard};
pub use shard::{NcclJoin, ShardExperts, shard_join_handler};
pub use watchdog::ShardWatch;
