//! Launcher for prefetch.cu: L2 prefetches of weights on the GPU's prefetch stream, forked from
//! the main stream at the call (so they start where the caller is in the step, and join a CUDA
//! graph being recorded there), and joined back with [`join`].

use cudarc::driver::{DeviceRepr, LaunchConfig};

use crate::device::Gpu;
use crate::error::{KernelError, Result};

/// Ranges one launch takes (`PREFETCH_RANGES` in prefetch.cu).
pub const MAX_RANGES: usize = 8;

/// prefetch.cu's `PrefetchRanges`, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct PrefetchRanges {
    ptr: [u64; MAX_RANGES],
    bytes: [u64; MAX_RANGES],
    n: i32,
    evict_last: i32,
}

// SAFETY: a plain #[repr(C)] struct of integers, laid out as the kernel's parameter struct.
unsafe impl DeviceRepr for PrefetchRanges {}

/// Blocks of one warp each that issue the prefetches: enough threads that the issuing takes a
/// few instructions each (40 MB is 2,560 pieces of 16 KB), few enough to leave the step's kernels
/// their SMs.
const BLOCKS: u32 = 32;

/// Starts L2 prefetches of `ranges` (device address, bytes; each 16-byte aligned and a multiple
/// of 16 bytes) on the prefetch stream, after the main stream's work issued so far. With
/// `evict_last` the lines are kept over lines loaded without a hint. Call [`join`] before
/// anything needs the main stream to have no fork open (the end of a graph recording).
pub fn l2_prefetch(gpu: &Gpu, ranges: &[(u64, usize)], evict_last: bool) -> Result<()> {
    const OP: &str = "l2_prefetch";
    if ranges.len() > MAX_RANGES {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("{} ranges (at most {MAX_RANGES} a launch)", ranges.len()),
        });
    }
    let mut r = PrefetchRanges {
        ptr: [0; MAX_RANGES],
        bytes: [0; MAX_RANGES],
        n: 0,
        evict_last: evict_last as i32,
    };
    for &(ptr, bytes) in ranges {
        if bytes == 0 {
            continue;
        }
        if ptr % 16 != 0 || bytes % 16 != 0 {
            return Err(KernelError::Unsupported {
                op: OP,
                what: format!(
                    "range at {ptr:#x} of {bytes} bytes (address and length must be multiples of 16)"
                ),
            });
        }
        r.ptr[r.n as usize] = ptr;
        r.bytes[r.n as usize] = bytes as u64;
        r.n += 1;
    }
    if r.n == 0 {
        return Ok(());
    }
    gpu.prefetch.join(&gpu.stream)?;
    let f = gpu.function(OP)?;
    let cfg = LaunchConfig {
        grid_dim: (BLOCKS, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.launch(f);
    b.arg(&r).on(&gpu.prefetch);
    // SAFETY: the one argument is the kernel's parameter struct by value; the kernel only hands
    // addresses to the memory system as prefetch hints, reading and writing nothing.
    unsafe { b.launch(cfg) }
}

/// Makes the main stream wait for the prefetch stream's work so far: closes the fork that
/// [`l2_prefetch`] opened.
pub fn join(gpu: &Gpu) -> Result<()> {
    gpu.stream.join(&gpu.prefetch)?;
    Ok(())
}
