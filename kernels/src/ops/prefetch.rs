//! Launcher for prefetch.cu: device ranges pulled into L2 ahead of the launch that reads them.

use half::bf16;

use crate::device::Gpu;
use crate::error::{KernelError, Result};
use crate::tensor::Tensor;

/// Ranges one launch takes (the kernel's fixed argument list).
pub const MAX_RANGES: usize = 4;

/// How prefetched lines are kept (`DSV2_L2_PREFETCH`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Prefetch {
    /// Plain L2 prefetches: the lines age like any other.
    Normal,
    /// The lines carry the evict_last policy: with an L2 set-aside for persisting accesses
    /// (`Gpu::set_l2_persisting`), streaming reads in between do not evict them.
    Persist,
}

impl L2Prefetch {
    /// `DSV2_L2_PREFETCH`: `1` (Normal), `persist`, or unset / `0` for none.
    pub fn from_env() -> Result<Option<Self>> {
        match std::env::var("DSV2_L2_PREFETCH").as_deref() {
            Err(_) | Ok("0") | Ok("") => Ok(None),
            Ok("1") => Ok(Some(L2Prefetch::Normal)),
            Ok("persist") => Ok(Some(L2Prefetch::Persist)),
            Ok(other) => Err(KernelError::Unsupported {
                op: "l2_prefetch_ranges",
                what: format!("DSV2_L2_PREFETCH={other:?} (expected 0, 1 or persist)"),
            }),
        }
    }
}

/// The range of `t`'s bytes a prefetch covers: bulk copies move whole 16-byte pieces from
/// 16-byte aligned addresses, so a tail that is not a whole piece is left out (at most 15 bytes
/// of a weight), and a misaligned tensor is not prefetched at all (bytes 0).
pub fn range_of(t: &Tensor<bf16>) -> (u64, u64) {
    let bytes = (t.len() * std::mem::size_of::<bf16>()) as u64 & !15;
    if t.ptr().is_multiple_of(16) {
        (t.ptr(), bytes)
    } else {
        (t.ptr(), 0)
    }
}

/// Enqueues bulk L2 prefetches of up to [`MAX_RANGES`] tensors (see [`range_of`]). The launch
/// reads and writes nothing itself: it only moves the tensors' bytes into L2, where a later
/// launch on the stream finds them if nothing evicted them in between.
pub fn l2_prefetch(gpu: &Gpu, tensors: &[&Tensor<bf16>], mode: L2Prefetch) -> Result<()> {
    let ranges: Vec<(u64, u64)> = tensors.iter().map(|t| range_of(t)).collect();
    // SAFETY: every range is (a 16-byte aligned prefix of) a tensor borrowed for this call; the
    // prefetches are enqueued before it returns and the tensors' memory is freed in stream order.
    unsafe { l2_prefetch_ranges(gpu, &ranges, mode) }
}

/// [`l2_prefetch`] of raw (address, bytes) ranges, for a caller that keeps the ranges of
/// long-lived weights between calls.
///
/// # Safety
/// Each range must lie inside device memory that stays allocated until the launch has run
/// (weights of a loaded model do), start 16-byte aligned and have a length that is a multiple
/// of 16 (as [`range_of`] gives).
pub unsafe fn l2_prefetch_ranges(gpu: &Gpu, ranges: &[(u64, u64)], mode: L2Prefetch) -> Result<()> {
    const OP: &str = "l2_prefetch_ranges";
    if ranges.len() > MAX_RANGES {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("{} ranges (at most {MAX_RANGES} a launch)", ranges.len()),
        });
    }
    if let Some((p, n)) = ranges.iter().find(|(p, n)| p % 16 != 0 || n % 16 != 0) {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("range {p:#x} + {n} bytes (start and length must be multiples of 16)"),
        });
    }
    let mut args = [(0u64, 0u64); MAX_RANGES];
    args[..ranges.len()].copy_from_slice(ranges);
    if args.iter().all(|r| r.1 == 0) {
        return Ok(());
    }
    let persist = i32::from(mode == L2Prefetch::Persist);
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    for (p, n) in &args {
        b.arg(p).arg(n);
    }
    b.arg(&persist);
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (gpu.sm_count.max(1) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches l2_prefetch_ranges(p0, n0, .. p3, n3, persist); the ranges are live device
    // memory (this function's contract) and the kernel only issues L2 prefetches of them.
    unsafe { b.launch(cfg) }?;
    Ok(())
}
