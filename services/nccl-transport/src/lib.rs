//! dsv2-nccl: the NCCL data plane between the router (rank 0) and its expert shards (ranks
//! 1..N) on one host. gRPC stays the control plane: the router creates the NCCL unique id and
//! hands it to every shard with `ExpertShard.NcclInit` ([`bootstrap`]); then each MoE layer is
//! one lock-step exchange of device buffers ([`plane`]): header + rows + expert ids + gate weights
//! out, bf16 partial sums back, with grouped send/recv and no host copy of hidden states.
//!
//! Builds without CUDA (cudarc loads libcuda and libnccl at run time); [`nccl_available`] tells
//! whether this machine can run it.

pub mod bootstrap;
pub mod comm;
pub mod error;
pub mod header;
pub mod plane;

pub use comm::{Comm, UniqueId};
pub use error::{NcclError, Result};
pub use header::Header;
pub use plane::{
    BatchBuffers, LayerSet, LoopEnd, PlaneConfig, RouterPlane, ShardCompute, ShardPart, ShardPlane,
    SlotLayout,
};

/// Whether both a CUDA driver and libnccl can be loaded here (tests skip when not).
pub fn nccl_available() -> bool {
    // SAFETY: both only try dlopen of the library candidates; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

/// Number of CUDA devices, 0 when there is no driver.
pub fn device_count() -> usize {
    if !nccl_available() {
        return 0;
    }
    cudarc::driver::CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .unwrap_or(0)
}
