//! Typed launchers: one params struct per kernel; each checks shapes, dtypes (by type) and
//! contiguity before launching on the GPU's main stream.

pub mod elementwise;
pub mod expert;
pub mod gemm;
pub mod gemv;
pub mod general;
pub mod grouped;
pub mod mla;
pub mod mla_fp8;
pub mod mla_prefill;
pub mod moe;
pub mod sample;
pub mod small_experts;
pub mod tma;

use cudarc::driver::LaunchConfig;

/// Grid-stride launch config for `n` work items of `threads` threads each, capped at `max_blocks`.
pub(crate) fn grid_for(n: usize, threads: u32, max_blocks: u32) -> LaunchConfig {
    let blocks = n.div_ceil(threads as usize).clamp(1, max_blocks as usize) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row.
pub(crate) fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Checks that a dimension fits the kernels' 32-bit index arguments.
pub(crate) fn dim_i32(op: &'static str, what: &str, v: usize) -> crate::Result<i32> {
    i32::try_from(v).map_err(|_| crate::error::shape_err(op, format!("{what} = {v} exceeds i32")))
}
