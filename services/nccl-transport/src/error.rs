//! The crate's one error type. Every variant says which rank/peer and which step failed, so the
//! router can turn it into UNAVAILABLE with a message an operator can act on.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    /// libcuda or libnccl could not be loaded.
    #[error("NCCL data plane unavailable: {0}")]
    Unavailable(String),
    /// A CUDA driver call failed.
    #[error("CUDA {op}: {source}")]
    Cuda {
        op: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// An NCCL call (or the communicator's asynchronous state) reported an error.
    #[error("NCCL {op} (rank {rank}): {code}: {detail}")]
    Nccl {
        op: &'static str,
        rank: usize,
        code: String,
        detail: String,
    },
    /// ncclCommInitRank did not complete in time (a rank never joined); the communicator was aborted.
    #[error(
        "NCCL init of rank {rank} of {world} timed out after {timeout:?} (a rank did not join); aborted"
    )]
    InitTimeout {
        rank: usize,
        world: usize,
        timeout: Duration,
    },
    /// A transfer did not complete in time (a peer died or stopped answering); the communicator
    /// was aborted and this plane is unusable.
    #[error(
        "NCCL {op} (rank {rank}) did not complete within {timeout:?}: {what}; communicator aborted"
    )]
    Timeout {
        op: &'static str,
        rank: usize,
        timeout: Duration,
        what: String,
    },
    /// The communicator was aborted by an earlier error; re-bootstrap to continue.
    #[error("NCCL communicator of rank {rank} is aborted (earlier error: {reason})")]
    Aborted { rank: usize, reason: String },
    /// The peer sent something the lock-step protocol does not allow.
    #[error("NCCL exchange protocol (rank {rank}): {message}")]
    Protocol { rank: usize, message: String },
    /// A caller passed inconsistent sizes or ranks.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The gRPC bootstrap of one shard failed.
    #[error("NCCL bootstrap of shard {shard} (rank {rank}): {message}")]
    Bootstrap {
        shard: String,
        rank: usize,
        message: String,
    },
}

pub type Result<T> = std::result::Result<T, NcclError>;

pub(crate) fn cuda(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> NcclError {
    move |source| NcclError::Cuda { op, source }
}
