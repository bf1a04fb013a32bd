//! The CPU backend's ceilings: a memcpy of a buffer far larger than the caches and a GEMM through
//! the backend's own `matmul_xwt` (bf16 weights, as checkpoints store them), both over the rayon
//! threads the backend computes with.

use std::time::Instant;

use half::bf16;
use rayon::prelude::*;

use super::matmul::matmul_xwt;
use super::weight::CpuWeight;
use crate::backend::Ceilings;

/// Copy size: 256 MiB, far beyond any L3; `quick` (tests): 8 MiB.
const COPY_BYTES: usize = 256 << 20;
const QUICK_COPY_BYTES: usize = 8 << 20;
/// GEMM M = N = K: 1024 takes tens of ms on a few cores and reaches the gemm crate's rate; 128
/// for tests.
const GEMM_DIM: usize = 1024;
const QUICK_GEMM_DIM: usize = 128;
/// Best of this many timed repetitions (after one untimed run): the ceiling is what the machine
/// can do, so the fastest run is the estimate least disturbed by other processes.
const REPEATS: usize = 5;

pub fn measure(quick: bool) -> Ceilings {
    let threads = rayon::current_num_threads();
    let (copy_bytes, dim) = if quick {
        (QUICK_COPY_BYTES, QUICK_GEMM_DIM)
    } else {
        (COPY_BYTES, GEMM_DIM)
    };
    let copy_s = copy_seconds(copy_bytes, threads);
    let gemm_s = gemm_seconds(dim);
    let mib = copy_bytes >> 20;
    let quick_note = if quick { ", quick: not a ceiling" } else { "" };
    Ceilings {
        copy_bytes_per_s: 2.0 * copy_bytes as f64 / copy_s,
        copy_method: format!(
            "memcpy {mib} MiB over {threads} threads, read + write, best of {REPEATS}{quick_note}"
        ),
        gemm_flops_per_s: 2.0 * (dim as f64).powi(3) / gemm_s,
        gemm_method: format!(
            "matmul_xwt {dim}x{dim}x{dim}, f32 x bf16 weights, {threads} threads, best of \
             {REPEATS}{quick_note}"
        ),
        weight_elem_bytes: None,
        cache_elem_bytes: std::mem::size_of::<f32>(),
    }
}

/// Seconds of the fastest copy of `bytes` bytes, split into one contiguous piece per thread.
fn copy_seconds(bytes: usize, threads: usize) -> f64 {
    // Both buffers are written first so that page faults are not timed.
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let piece = bytes.div_ceil(threads.max(1));
    let once = |dst: &mut [u8]| {
        dst.par_chunks_mut(piece)
            .zip(src.par_chunks(piece))
            .for_each(|(d, s)| d.copy_from_slice(s));
    };
    once(&mut dst);
    best_of(|| once(&mut dst))
}

/// Seconds of the fastest `[dim, dim] x [dim, dim]ᵀ` product through the backend's matmul.
fn gemm_seconds(dim: usize) -> f64 {
    let x: Vec<f32> = (0..dim * dim)
        .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
        .collect();
    let w = CpuWeight::from_bf16(
        vec![dim, dim],
        (0..dim * dim)
            .map(|i| bf16::from_f32(((i % 13) as f32 - 6.0) / 6.0))
            .collect(),
    );
    std::hint::black_box(matmul_xwt(&x, dim, &w));
    best_of(|| {
        std::hint::black_box(matmul_xwt(&x, dim, &w));
    })
}

fn best_of(mut f: impl FnMut()) -> f64 {
    (0..REPEATS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
        .max(1e-9)
}

#[cfg(test)]
mod tests {
    #[test]
    fn quick_ceilings_are_positive_and_say_how() {
        let c = super::measure(true);
        assert!(
            c.copy_bytes_per_s > 0.0 && c.gemm_flops_per_s > 0.0,
            "{c:?}"
        );
        assert!(c.copy_method.contains("memcpy 8 MiB"), "{}", c.copy_method);
        assert!(c.gemm_method.contains("128x128x128"), "{}", c.gemm_method);
        assert_eq!(c.cache_elem_bytes, 4);
    }
}
