//! `y = x · Wᵀ` with f32 accumulation over weights kept in their stored dtype (the checkpoint
//! layout: W is [out, in] row-major).
//!
//! Two paths: few rows (decode) stream the weight once with a hand-written, rayon-parallel dot
//! product over the stored dtype — the `gemm` crate would need the weight widened to f32 first,
//! doubling the bytes read by a memory-bound step; many rows (prefill) widen the weight to f32 in
//! column panels and use the `gemm` crate's multi-threaded GEMM.

use half::{bf16, f16};
use rayon::prelude::*;

use super::weight::{CpuWeight, WeightData};

/// Rows at or below this use the streaming dot-product path.
const STREAM_MAX_ROWS: usize = 4;
/// Output features per panel when widening a half-precision weight for GEMM (bounds scratch).
const PANEL_ROWS: usize = 1024;
/// Below this many multiply-adds, threads cost more than they save.
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// x: [m, k] row-major, w: [n, k]. Returns [m, n].
pub fn matmul_xwt(x: &[f32], m: usize, w: &CpuWeight) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    debug_assert_eq!(x.len(), m * k, "matmul input has wrong length");
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    if m <= STREAM_MAX_ROWS {
        stream_rows(x, m, k, n, w, &mut out);
    } else {
        match &w.data {
            WeightData::F32(d) => gemm_f32(x, m, k, d.as_slice(), 0, n, n, &mut out),
            WeightData::Bf16(d) => widen_panels(x, m, k, n, &mut out, |r0, r1, buf| {
                for (o, v) in buf.iter_mut().zip(&d.as_slice()[r0 * k..r1 * k]) {
                    *o = v.to_f32();
                }
            }),
            WeightData::F16(d) => widen_panels(x, m, k, n, &mut out, |r0, r1, buf| {
                for (o, v) in buf.iter_mut().zip(&d.as_slice()[r0 * k..r1 * k]) {
                    *o = v.to_f32();
                }
            }),
        }
    }
    out
}

fn widen_panels(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    widen: impl Fn(usize, usize, &mut [f32]),
) {
    let mut buf = vec![0f32; PANEL_ROWS.min(n) * k];
    let mut r0 = 0;
    while r0 < n {
        let r1 = (r0 + PANEL_ROWS).min(n);
        let panel = &mut buf[..(r1 - r0) * k];
        widen(r0, r1, panel);
        gemm_f32(x, m, k, panel, r0, r1 - r0, n, out);
        r0 = r1;
    }
}

/// out[:, col0..col0+cols] = x · panelᵀ, panel being `cols` rows of length k.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    x: &[f32],
    m: usize,
    k: usize,
    panel: &[f32],
    col0: usize,
    cols: usize,
    ld_out: usize,
    out: &mut [f32],
) {
    assert!(x.len() >= m * k && panel.len() >= cols * k && out.len() >= m * ld_out);
    let threads = if m * k * cols >= PARALLEL_MIN_WORK {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every access: dst is m×cols with row stride ld_out starting
    // at column col0 < ld_out; lhs is m×k row-major; rhs (panelᵀ) is k×cols with column stride k.
    unsafe {
        gemm::gemm(
            m,
            cols,
            k,
            out.as_mut_ptr().add(col0),
            1,
            ld_out as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            panel.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            threads,
        );
    }
}

fn stream_rows(x: &[f32], m: usize, k: usize, n: usize, w: &CpuWeight, out: &mut [f32]) {
    // Work on blocks of output features; each block reads its weight rows once for all m rows.
    const BLOCK: usize = 16;
    let compute = |j0: usize, block: &mut [f32]| {
        let j1 = (j0 + BLOCK).min(n);
        for j in j0..j1 {
            for i in 0..m {
                let xi = &x[i * k..(i + 1) * k];
                let v = match &w.data {
                    WeightData::F32(d) => dot_f32(xi, &d.as_slice()[j * k..(j + 1) * k]),
                    WeightData::Bf16(d) => dot_bf16(xi, &d.as_slice()[j * k..(j + 1) * k]),
                    WeightData::F16(d) => dot_f16(xi, &d.as_slice()[j * k..(j + 1) * k]),
                };
                block[i * BLOCK + (j - j0)] = v;
            }
        }
    };
    let nblocks = n.div_ceil(BLOCK);
    let mut blocks = vec![0f32; nblocks * m * BLOCK];
    if n * k * m >= PARALLEL_MIN_WORK {
        blocks
            .par_chunks_mut(m * BLOCK)
            .enumerate()
            .for_each(|(b, block)| compute(b * BLOCK, block));
    } else {
        blocks
            .chunks_mut(m * BLOCK)
            .enumerate()
            .for_each(|(b, block)| compute(b * BLOCK, block));
    }
    for b in 0..nblocks {
        let j0 = b * BLOCK;
        let cols = (n - j0).min(BLOCK);
        for i in 0..m {
            let src = &blocks[b * m * BLOCK + i * BLOCK..][..cols];
            out[i * n + j0..i * n + j0 + cols].copy_from_slice(src);
        }
    }
}

/// Eight independent accumulators so the compiler can vectorise without reassociating.
#[inline]
fn dot_with(a: &[f32], len: usize, b: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = len / 8;
    for c in 0..chunks {
        let base = c * 8;
        for l in 0..8 {
            acc[l] += a[base + l] * b(base + l);
        }
    }
    let mut tail = 0f32;
    for (i, av) in a.iter().enumerate().take(len).skip(chunks * 8) {
        tail += av * b(i);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot_with(a, a.len().min(b.len()), |i| b[i])
}

#[inline]
fn dot_bf16(a: &[f32], b: &[bf16]) -> f32 {
    dot_with(a, a.len().min(b.len()), |i| {
        f32::from_bits((b[i].to_bits() as u32) << 16)
    })
}

#[inline]
fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    dot_with(a, a.len().min(b.len()), |i| b[i].to_f32())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::weight::CpuWeight;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn all_paths_and_dtypes_agree_with_naive() {
        for &(m, k, n) in &[
            (1, 7, 5),
            (3, 67, 33),
            (7, 64, 1500),
            (67, 129, 70),
            (1, 1024, 300),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 97.0)
                .collect();
            for dtype in ["f32", "bf16", "f16"] {
                let (weight, wref): (CpuWeight, Vec<f32>) = match dtype {
                    "f32" => (CpuWeight::from_f32(vec![n, k], w.clone()), w.clone()),
                    "bf16" => {
                        let h: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                        let r = h.iter().map(|v| v.to_f32()).collect();
                        (CpuWeight::from_bf16(vec![n, k], h), r)
                    }
                    _ => {
                        let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                        let r = h.iter().map(|v| v.to_f32()).collect();
                        (CpuWeight::from_f16(vec![n, k], h), r)
                    }
                };
                let got = matmul_xwt(&x, m, &weight);
                let want = naive(&x, m, k, &wref, n);
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (g - e).abs() < 1e-4 * (1.0 + e.abs()),
                        "m={m} k={k} n={n} {dtype}: {g} vs {e}"
                    );
                }
            }
        }
    }
}
