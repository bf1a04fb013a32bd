//! Launchers for gemv.cu: few-row projections (M <= 8) as one weight-streaming launch instead of
//! cuBLAS's split-K GEMM + reduction. [`plan`] says whether a [`Gemm`] can take this path;
//! [`gemv`] runs it.

use std::sync::OnceLock;

use cudarc::driver::LaunchConfig;

use super::elementwise::norm_threads;
use super::gemm::{Gemm, GemmOut};
use crate::device::Gpu;
use crate::error::{KernelError, Result, shape_err};

/// Most rows the [N, K]-weight kernels take (their accumulators live in registers).
pub const MAX_ROWS_NK: usize = 8;
/// Most rows the [K, N]-weight kernels take (their split-K partials live in shared memory:
/// 8 KiB per row).
pub const MAX_ROWS_KN: usize = 4;
const THREADS: u32 = 256;
const WARPS: usize = THREADS as usize / 32;
/// Columns of one [K, N] tile (32 lanes x 8 columns).
const KN_TILE: usize = 256;

/// `DSV2_GEMV=0` sends every projection to cuBLAS (diagnosis, and the A/B rows of dsv2-gpu-check).
fn enabled_by_env() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DSV2_GEMV").map_or(true, |v| v != "0"))
}

/// Columns one warp of the [N, K] kernel owns at `m` rows (must match gemv.cu's instantiations).
fn cols_per_warp(m: usize) -> usize {
    match m {
        1 | 2 => 1,
        3 | 4 => 2,
        _ => 4,
    }
}

/// How a GEMV launch is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvPlan {
    /// K slices per column group ([N, K] kernel; 1 for [K, N]).
    pub splits: usize,
    pub blocks_x: usize,
}

/// The launch plan for `g` when the GEMV kernels can run it (rows, layout, 16-byte alignment of
/// every vector access, 32-bit dims), else None (cuBLAS runs it).
pub fn plan(g: &Gemm, sm_count: usize, force: bool) -> Option<GemvPlan> {
    if !force && !enabled_by_env() {
        return None;
    }
    let a8 = |v: usize| v.is_multiple_of(8);
    let a16 = |p: u64| p.is_multiple_of(16);
    let max_rows = if g.w_nk { MAX_ROWS_NK } else { MAX_ROWS_KN };
    // weights are read 16 bytes at a time in both layouts; X only by the [N, K] kernels (the
    // [K, N] kernels read one X value per weight row)
    let aligned =
        a16(g.w) && a8(g.ldw) && a8(g.sw) && (!g.w_nk || a16(g.x) && a8(g.ldx) && a8(g.sx));
    if g.m == 0
        || g.m > max_rows
        || g.n == 0
        || g.k == 0
        || g.batch == 0
        || g.batch > 65_535
        || !aligned
        || i32::try_from(g.n).is_err()
        || i32::try_from(g.k).is_err()
    {
        return None;
    }
    // Where the GEMV beats cuBLAS (dsv2-gpu-check --gemv, bench/RESULTS.md session 8): one row
    // always (cuBLAS answers with split-K + a reduction); more rows only for small weights, where
    // cuBLAS is latency-bound (5-15x the copy roofline on kv_a) — on large ones its
    // tensor-core tiles reuse each weight load across rows, which these CUDA-core loops do not.
    let weight_bytes = g
        .batch
        .saturating_mul(g.n)
        .saturating_mul(g.k)
        .saturating_mul(2);
    let rows_pay = match g.m {
        1 => true,
        2 => weight_bytes <= 16 << 20,
        _ => weight_bytes <= 12 << 20,
    };
    if !force && !rows_pay {
        return None;
    }
    if g.w_nk {
        if !a8(g.k) {
            return None;
        }
        let groups = g.n.div_ceil(cols_per_warp(g.m));
        // Enough warps to keep every SM's load pipes full (about 24 warps each, several 16-byte
        // loads in flight per lane), but no slice shorter than two warp-wide steps of K.
        let mut splits = 1;
        while splits < WARPS
            && groups * g.batch * splits < sm_count.max(1) * 24
            && g.k / (splits * 2) >= 2 * 256
        {
            splits *= 2;
        }
        let blocks_x = groups.div_ceil(WARPS / splits);
        Some(GemvPlan { splits, blocks_x })
    } else {
        if !a8(g.n) {
            return None;
        }
        Some(GemvPlan {
            splits: 1,
            blocks_x: g.n.div_ceil(KN_TILE),
        })
    }
}

fn i64_dim(v: usize, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| shape_err("gemv", format!("{what} = {v} exceeds i64")))
}

/// The gemv.cu kernel for a layout, row count and output suffix.
fn kernel_name(w_nk: bool, m: usize, out: &str) -> String {
    format!("gemv_{}_m{m}_{out}", if w_nk { "nk" } else { "kn" })
}

/// Runs `g` with the GEMV kernels on the GPU's main stream; `p` from [`plan`] for this `g`.
/// `accumulate`: `y += X·op(W)` (a bf16 y gets the product rounded to bf16 first, as a separate
/// add would), else `y = X·op(W)`.
///
/// # Safety
/// Every pointer must address enough live device memory for the dims, leading dims and batch
/// strides of `g` (as for cuBLAS), and stay valid until the launch has run.
pub unsafe fn gemv<O: GemmOut>(gpu: &Gpu, g: &Gemm, p: GemvPlan, accumulate: bool) -> Result<()> {
    let strides = [
        i64_dim(g.sx, "sx")?,
        i64_dim(g.sw, "sw")?,
        i64_dim(g.sy, "sy")?,
    ];
    // SAFETY: forwarded from the caller's contract.
    unsafe { launch::<O>(gpu, g, strides, p, accumulate, None) }
}

/// The second problem of a [`gemv_pair`]: its weight [n, K] and output (leading dim `ldy`).
#[derive(Debug, Clone, Copy)]
pub struct PairSecond {
    pub w: u64,
    pub y: u64,
    pub n: usize,
    pub ldy: usize,
}

/// Two [N, K] problems that share X and differ in W and Y (the gate and up projections of an
/// FFN, or q_proj and kv_a of MLA, each its own checkpoint tensor) as one launch: `first` (one
/// problem) and `second`, whose width and output stride may differ. False when the pair cannot
/// take the GEMV path (the caller runs the two problems some other way). `force` as for [`plan`].
///
/// # Safety
/// As [`gemv`], for both problems.
pub unsafe fn gemv_pair<O: GemmOut>(
    gpu: &Gpu,
    first: &Gemm,
    second: PairSecond,
    force: bool,
) -> Result<bool> {
    let elem = std::mem::size_of::<O>() as i64;
    let Some(l) = pair_launch(first, second, elem, gpu.sm_count, force)? else {
        return Ok(false);
    };
    // SAFETY: forwarded from the caller's contract; the second problem is addressed by the
    // (signed) element distance between the two weights and the two outputs.
    unsafe { launch::<O>(gpu, &l.g, l.strides, l.plan, false, Some(l.last))? };
    Ok(true)
}

/// One row's pre-attention add + RMSNorm, run inside the launch of the projections that read
/// its output ([`gemv_pair_after_add_norm`]): `residual_out = bf16(add + residual)`, and the
/// projections' X = RMSNorm(residual_out) · weight, bit for bit as `elementwise::rmsnorm` with a
/// residual computes it. Device addresses of bf16 vectors of the projections' K values.
#[derive(Debug, Clone, Copy)]
pub struct AddNormRow {
    pub add: u64,
    pub residual: u64,
    pub weight: u64,
    /// A buffer apart from `residual`: the launch's blocks read `residual` while one of them
    /// writes this.
    pub residual_out: u64,
    pub eps: f32,
}

/// Most K the fused norm takes: X lives in shared memory (2 bytes a value) next to the GEMV's
/// own, under the 48 KiB a launch gets without opting in.
const NORM_MAX_K: usize = 16_384;

/// [`gemv_pair`] at one row whose X is the [`AddNormRow`] of `norm` (first.x is not read): the
/// add + norm's launch folded into the pair's. False when the pair cannot take the GEMV path or
/// the norm's vectors are not 16-byte aligned (the caller runs the norm and the pair apart).
///
/// # Safety
/// As [`gemv_pair`] for both problems, and every address of `norm` must hold `first.k` live bf16
/// values; `norm.residual_out` must not overlap `norm.residual` or `norm.add`.
pub unsafe fn gemv_pair_after_add_norm(
    gpu: &Gpu,
    first: &Gemm,
    second: PairSecond,
    norm: AddNormRow,
    force: bool,
) -> Result<bool> {
    const OP: &str = "gemv_nk_norm_m1_bf16";
    if first.m != 1 {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("{} rows (the fused norm takes one)", first.m),
        });
    }
    let k = first.k;
    let a16 = |p: u64| p.is_multiple_of(16);
    if k > NORM_MAX_K
        || ![norm.add, norm.residual, norm.weight, norm.residual_out]
            .into_iter()
            .all(a16)
    {
        return Ok(false);
    }
    let bytes = (k * std::mem::size_of::<half::bf16>()) as u64;
    let overlaps = |a: u64, b: u64| a < b.saturating_add(bytes) && b < a.saturating_add(bytes);
    if overlaps(norm.residual_out, norm.residual) || overlaps(norm.residual_out, norm.add) {
        return Err(shape_err(
            OP,
            "residual_out overlaps an input that other blocks still read",
        ));
    }
    // the plan checks X's alignment, which this kernel reads from shared memory instead
    let mut g = *first;
    g.x = norm.add;
    g.ldx = k;
    let elem = std::mem::size_of::<half::bf16>() as i64;
    let Some(l) = pair_launch(&g, second, elem, gpu.sm_count, force)? else {
        return Ok(false);
    };
    let (ldw, ldy) = (i64_dim(l.g.ldw, "ldw")?, i64_dim(l.g.ldy, "ldy")?);
    let [_, sw, sy] = l.strides;
    let (n, kk) = (l.g.n as i32, k as i32);
    let splits = l.plan.splits as i32;
    let threads = norm_threads(k) as i32;
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&norm.add).arg(&norm.residual).arg(&norm.weight);
    b.arg(&norm.residual_out).arg(&threads).arg(&norm.eps);
    b.arg(&l.g.w).arg(&ldw).arg(&sw);
    b.arg(&l.g.y).arg(&ldy).arg(&sy);
    b.arg(&n).arg(&kk).arg(&splits);
    b.arg(&l.last.n).arg(&l.last.ldy);
    let cfg = LaunchConfig {
        grid_dim: (l.plan.blocks_x as u32, l.g.batch as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: bytes as u32,
    };
    // SAFETY: the argument list matches gemv_nk_norm_m1_bf16's signature; `pair_launch` checked
    // layout, alignment and dims of both problems, and the norm's vectors are aligned (above);
    // the caller guarantees the memory.
    unsafe { b.launch(cfg) }?;
    Ok(true)
}

/// How a [`gemv_pair`] launches: `first` as a batch of two problems (the second addressed by
/// signed element strides from the first), cut as two problems of the wider width (the narrower
/// one's extra blocks return at once), and the second's own width and output stride.
#[derive(Debug, Clone, Copy)]
struct PairLaunch {
    g: Gemm,
    plan: GemvPlan,
    strides: [i64; 3],
    last: Last,
}

/// The pair's launch, or None when it cannot take the GEMV path. Whether it does is decided on
/// the weights it really reads (n1 + n2 rows); `elem` is the output element's size in bytes.
fn pair_launch(
    first: &Gemm,
    second: PairSecond,
    elem: i64,
    sm_count: usize,
    force: bool,
) -> Result<Option<PairLaunch>> {
    let mut both = *first;
    both.n = first.n + second.n;
    if plan(&both, sm_count, force).is_none() {
        return Ok(None);
    }
    let mut g = *first;
    g.batch = 2;
    (g.sx, g.sw, g.sy) = (0, 0, 0);
    g.n = first.n.max(second.n);
    let (dw, dy) = (second.w as i64 - g.w as i64, second.y as i64 - g.y as i64);
    if !first.w_nk || first.batch != 1 || second.n == 0 || dw % 16 != 0 || dy % elem != 0 {
        return Ok(None);
    }
    let Some(p) = plan(&g, sm_count, true) else {
        return Ok(None);
    };
    let last = Last {
        n: i32::try_from(second.n)
            .map_err(|_| shape_err("gemv", format!("n = {} exceeds i32", second.n)))?,
        ldy: i64_dim(second.ldy, "ldy")?,
    };
    g.n = first.n;
    Ok(Some(PairLaunch {
        g,
        plan: p,
        strides: [0, dw / 2, dy / elem],
        last,
    }))
}

/// The last batch problem's own width and output stride ([N, K] kernels).
#[derive(Debug, Clone, Copy)]
struct Last {
    n: i32,
    ldy: i64,
}

/// # Safety
/// As [`gemv`]; `strides` = (sx, sw, sy) in elements, signed.
unsafe fn launch<O: GemmOut>(
    gpu: &Gpu,
    g: &Gemm,
    strides: [i64; 3],
    p: GemvPlan,
    accumulate: bool,
    last: Option<Last>,
) -> Result<()> {
    let (ldx, ldw, ldy) = (
        i64_dim(g.ldx, "ldx")?,
        i64_dim(g.ldw, "ldw")?,
        i64_dim(g.ldy, "ldy")?,
    );
    let [sx, sw, sy] = strides;
    let (n, k) = (g.n as i32, g.k as i32);
    let accumulate = i32::from(accumulate);
    let f = gpu.function(&kernel_name(g.w_nk, g.m, O::KERNEL_SUFFIX))?;
    let mut b = gpu.launch(f);
    b.arg(&g.x).arg(&ldx).arg(&sx);
    b.arg(&g.w).arg(&ldw).arg(&sw);
    b.arg(&g.y).arg(&ldy).arg(&sy);
    b.arg(&n).arg(&k);
    let splits = p.splits as i32;
    if g.w_nk {
        b.arg(&splits);
    }
    b.arg(&accumulate);
    let (n_last, ldy_last) = last.map_or((0, 0), |l| (l.n, l.ldy));
    if g.w_nk {
        b.arg(&n_last).arg(&ldy_last);
    }
    let shared_mem_bytes = if g.w_nk {
        0
    } else {
        (WARPS * g.m * KN_TILE * std::mem::size_of::<f32>()) as u32
    };
    let cfg = LaunchConfig {
        grid_dim: (p.blocks_x as u32, g.batch as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes,
    };
    // SAFETY: the argument list matches gemv_{nk,kn}_m*'s signatures; `plan` checked
    // rows, layout and alignment; the caller guarantees the memory (above).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(m: usize, n: usize, k: usize) -> Gemm {
        Gemm::xwt(m, n, k, 0x1000, 0x2000, 0x3000)
    }

    #[test]
    fn every_launchable_kernel_is_exported_by_name() {
        // the module loader looks kernels up by the names it reads in the source text
        let src = crate::compile::SOURCES
            .iter()
            .find(|(f, _)| *f == "gemv.cu")
            .map(|(_, s)| *s)
            .unwrap();
        let names = crate::device::kernel_names(src);
        for out in ["bf16", "f32"] {
            for m in 1..=MAX_ROWS_NK {
                assert!(names.contains(&kernel_name(true, m, out)), "nk m{m} {out}");
            }
            for m in 1..=MAX_ROWS_KN {
                assert!(names.contains(&kernel_name(false, m, out)), "kn m{m} {out}");
            }
        }
        assert!(names.iter().any(|n| n == "gemv_nk_norm_m1_bf16"));
        assert_eq!(names.len(), 2 * (MAX_ROWS_NK + MAX_ROWS_KN) + 1);
    }

    #[test]
    fn uneven_pairs_go_by_the_weights_both_read() {
        // V2-Lite q_proj | kv_a (K 2048): 15 MB of weights pays at 1 and 2 rows, not at 3 (12 MB)
        let pair = |m: usize, n1: usize, n2: usize, k: usize, w2: u64| {
            let first = Gemm::xwt(m, n1, k, 0x1000, 0x10_0000, 0x2000_0000);
            let second = PairSecond {
                w: w2,
                y: 0x3000_0000,
                n: n2,
                ldy: n2,
            };
            pair_launch(&first, second, 2, 132, false).unwrap()
        };
        for m in [1, 2] {
            let l = pair(m, 3072, 576, 2048, 0x4000_0000).expect("V2-Lite pairs");
            assert_eq!(
                (l.g.n, l.g.batch, l.last.n, l.last.ldy),
                (3072, 2, 576, 576)
            );
            assert_eq!(l.strides[1], (0x4000_0000 - 0x10_0000) / 2);
            assert_eq!(l.strides[2], (0x3000_0000 - 0x2000_0000) / 2);
        }
        assert!(pair(3, 3072, 576, 2048, 0x4000_0000).is_none());
        // V2 q_a | kv_a (K 5120, 21.6 MB): one row only
        assert!(pair(1, 1536, 576, 5120, 0x4000_0000).is_some());
        assert!(pair(2, 1536, 576, 5120, 0x4000_0000).is_none());
        // the wider problem second: the grid is cut for it
        let l = pair(1, 24, 67, 72, 0x4000_0000).unwrap();
        assert_eq!(
            (l.last.n, l.plan.blocks_x),
            (67, plan(&g(1, 67, 72), 132, true).unwrap().blocks_x)
        );
        // a second weight that is not 16-byte aligned cannot be addressed by the kernels' loads
        assert!(pair(1, 3072, 576, 2048, 0x4000_0008).is_none());
    }

    #[test]
    fn rows_layout_and_alignment_pick_the_path() {
        assert!(plan(&g(1, 576, 5120), 132, true).is_some());
        assert!(plan(&g(8, 576, 5120), 132, true).is_some());
        assert!(plan(&g(9, 576, 5120), 132, true).is_none());
        assert!(
            plan(&g(1, 576, 5121), 132, true).is_none(),
            "K not a multiple of 8"
        );
        let mut odd = g(1, 576, 5120);
        odd.x += 2;
        assert!(plan(&odd, 132, true).is_none(), "X not 16-byte aligned");
        let mut kn = g(4, 512, 128);
        kn.w_nk = false;
        kn.ldw = 512;
        assert!(plan(&kn, 132, true).is_some());
        kn.m = 5;
        assert!(
            plan(&kn, 132, true).is_none(),
            "[K, N] takes at most 4 rows"
        );
    }

    #[test]
    fn more_than_one_row_takes_the_gemv_only_for_small_weights() {
        // as measured on an H100 (bench/RESULTS.md, session 8): cuBLAS wins on large weights
        // once there are rows to reuse each weight load across
        assert!(plan(&g(1, 5120, 16384), 132, false).is_some());
        assert!(plan(&g(2, 1536, 5120), 132, false).is_some(), "15.7 MB");
        assert!(plan(&g(2, 3072, 5120), 132, false).is_none(), "31.5 MB");
        assert!(plan(&g(8, 576, 5120), 132, false).is_some(), "5.9 MB");
        assert!(plan(&g(8, 1536, 5120), 132, false).is_none(), "15.7 MB");
        assert!(
            plan(&g(8, 1536, 5120), 132, true).is_some(),
            "forced (checks, benchmarks)"
        );
    }

    #[test]
    fn splits_grow_for_narrow_outputs_and_stop_at_short_slices() {
        // kv_a of DeepSeek-V2: 576 columns would fill only a third of the card unsplit
        let p = plan(&g(1, 576, 5120), 132, true).unwrap();
        assert_eq!(p.splits, 8);
        assert_eq!(p.blocks_x, 576);
        // q_b: 24576 columns are plenty
        let p = plan(&g(1, 24576, 1536), 132, true).unwrap();
        assert_eq!(p.splits, 1);
        assert_eq!(p.blocks_x, 24576 / 8);
        // a short K is never cut below two warp-wide steps per slice
        assert_eq!(plan(&g(1, 16, 1024), 132, true).unwrap().splits, 2);
        assert_eq!(plan(&g(1, 16, 512), 132, true).unwrap().splits, 1);
        // 4 columns per warp at 8 rows
        let p = plan(&g(8, 5120, 3072), 132, true).unwrap();
        assert_eq!(p.blocks_x * WARPS / p.splits * 4, 5120);
    }
}
