//! Routed experts of a MoE layer in one launch per projection (grouped.cu): the routing's
//! permutation, the gather of permuted rows, the grouped gate_up (SiLU·mul fused) and down
//! GEMMs over every expert at once, and the weighted combine. The expert weights are read in
//! place through a device table of addresses, so the checkpoint's per-expert tensors need no
//! repacking, and every size (1 row to a whole prefill) takes the same kernels with a row tile
//! chosen by the rows per touched expert.

use cudarc::driver::LaunchConfig;
use half::bf16;

use super::moe::{self, CombineParams, GatherParams, PermuteParams};
use super::{dim_i32, per_row};
use crate::device::Gpu;
use crate::error::{KernelError, Result, shape_err};
use crate::tensor::{Tensor, View, ViewMut};

/// Weight rows per CTA (the kernels' `GA`); gate_up covers half as many features (gate + up).
const WEIGHT_ROWS: usize = 128;
/// k per pipeline stage (`GK`).
const K_STEP: usize = 64;

/// A row tile of the grouped kernels: rows of one expert per CTA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowTile {
    /// 16 rows (decode: a few rows per expert; weight-bandwidth bound).
    R16,
    /// 32 rows (large decode batches of few experts: V2-Lite's 64 experts at batch 256 hold ~24
    /// rows each, where the 64-row tile's padded MMAs made gate_up compute bound at 0.68 of the
    /// copy bandwidth, bench/RESULTS.md session 7).
    R32,
    /// 64 rows.
    R64,
    /// 128 rows (mma.sync; kept to compare with [`RowTile::W128`]).
    R128,
    /// 128 rows x 256 weight rows on warpgroup MMA (prefill: compute bound).
    W128,
    /// 64 rows x 256 weight rows on warpgroup MMA (less padding for experts holding a little
    /// more than a multiple of 128 rows, but slower than W128 on P2: kept to compare).
    W64,
}

impl RowTile {
    pub fn rows(self) -> usize {
        match self {
            RowTile::R16 => 16,
            RowTile::R32 => 32,
            RowTile::R64 | RowTile::W64 => 64,
            RowTile::R128 | RowTile::W128 => 128,
        }
    }

    /// Weight rows per CTA (gate_up covers half as many features: gate + up).
    fn weight_rows(self) -> usize {
        match self {
            RowTile::W128 | RowTile::W64 => 256,
            _ => WEIGHT_ROWS,
        }
    }

    fn stages(self) -> usize {
        match self {
            RowTile::R16 | RowTile::R32 | RowTile::R64 => 4,
            RowTile::R128 => 3,
            RowTile::W128 | RowTile::W64 => 4,
        }
    }

    fn threads(self) -> u32 {
        match self {
            RowTile::R16 | RowTile::R32 | RowTile::R64 => 128,
            RowTile::R128 | RowTile::W128 | RowTile::W64 => 256,
        }
    }

    /// The warpgroup-MMA tiles (prefill-sized batches).
    pub fn is_wgmma(self) -> bool {
        matches!(self, RowTile::W128 | RowTile::W64)
    }

    fn smem_bytes(self) -> usize {
        let stages = self.stages() * (self.weight_rows() + self.rows()) * K_STEP * 2;
        // the wgmma kernel aligns its stages to 1024 bytes itself
        if self.is_wgmma() {
            stages + 1024
        } else {
            stages
        }
    }

    fn kernel(self, gate_up: bool) -> &'static str {
        match (self, gate_up) {
            (RowTile::R16, true) => "moe_grouped_gate_up_b16_bf16",
            (RowTile::R16, false) => "moe_grouped_down_b16_bf16",
            (RowTile::R32, true) => "moe_grouped_gate_up_b32_bf16",
            (RowTile::R32, false) => "moe_grouped_down_b32_bf16",
            (RowTile::R64, true) => "moe_grouped_gate_up_b64_bf16",
            (RowTile::R64, false) => "moe_grouped_down_b64_bf16",
            (RowTile::R128, true) => "moe_grouped_gate_up_b128_bf16",
            (RowTile::R128, false) => "moe_grouped_down_b128_bf16",
            (RowTile::W128, true) => "moe_grouped_gate_up_wgmma_bf16",
            (RowTile::W128, false) => "moe_grouped_down_wgmma_bf16",
            (RowTile::W64, true) => "moe_grouped_gate_up_wgmma64_bf16",
            (RowTile::W64, false) => "moe_grouped_down_wgmma64_bf16",
        }
    }

    /// The tile for `rows` routed rows spread over `touched` experts: the smallest tile that
    /// holds the mean expert's rows, so decode reads each expert's weights once and prefill
    /// gets tiles large enough to be compute bound (on wgmma).
    pub fn for_rows(rows: usize, touched: usize) -> Self {
        let mean = rows.div_ceil(touched.max(1));
        if mean <= 16 {
            RowTile::R16
        } else if mean <= 32 {
            RowTile::R32
        } else if mean <= 48 {
            RowTile::R64
        } else {
            // The 128-row tile, although the 64-row one pads less: on P2 (307 rows per expert,
            // 384 vs 320 computed) the 128-row tile still ran at 0.456 of cuBLAS against 0.404
            // (H100, bench/RESULTS.md, 2026-12-06 run 3): it moves less shared memory per FLOP.
            RowTile::W128
        }
    }
}

/// One expert FFN over rows already permuted by expert: x [R, H] (expert e owns rows
/// offsets[e] .. offsets[e + 1]); counts [E] and offsets [E + 1] on the device (moe_permute's);
/// ptrs [E, 3] the addresses of expert e's gate [I, H], up [I, H] and down [H, I] (bf16,
/// row-major; 0 = not held here: its rows come out zero); act [R, I] workspace; out [R, H]
/// unweighted expert outputs (rows past offsets[E] are left as they are).
pub struct GroupedFfnParams<'a> {
    pub x: View<'a, bf16>,
    pub counts: View<'a, i32>,
    pub offsets: View<'a, i32>,
    pub ptrs: View<'a, i64>,
    pub act: ViewMut<'a, bf16>,
    pub out: ViewMut<'a, bf16>,
    pub tile: RowTile,
}

/// # Safety
/// Every non-zero address in `ptrs` must point to live bf16 tensors of shapes [I, H], [I, H]
/// and [H, I] (I = act's width, H = x's) that outlive the launches (stream order); the kernels
/// trust the table. offsets must be moe_permute's for `counts` (rows within x).
pub unsafe fn grouped_ffn(gpu: &Gpu, p: GroupedFfnParams<'_>) -> Result<()> {
    const OP: &str = "moe_grouped_ffn_bf16";
    p.x.expect(OP, "x", &[None, None])?;
    let (rows, hidden) = (p.x.shape()[0], p.x.shape()[1]);
    p.ptrs.expect(OP, "ptrs", &[None, Some(3)])?;
    let n_exp = p.ptrs.shape()[0];
    p.counts.expect(OP, "counts", &[Some(n_exp)])?;
    p.offsets.expect(OP, "offsets", &[Some(n_exp + 1)])?;
    p.act.expect(OP, "act", &[Some(rows), None])?;
    let inter = p.act.shape()[1];
    p.out.expect(OP, "out", &[Some(rows), Some(hidden)])?;
    check_dims(OP, hidden, inter, n_exp)?;
    if rows == 0 || n_exp == 0 {
        return Ok(());
    }
    let tile = p.tile;
    let tile_off = Tensor::<i32>::uninit(gpu, &[n_exp + 1])?;
    let (counts, to) = (p.counts.ptr(), tile_off.ptr());
    let (ne, bb) = (dim_i32(OP, "experts", n_exp)?, tile.rows() as i32);
    let f = gpu.function("moe_offsets_i32")?;
    let mut b = gpu.launch(f);
    b.arg(&counts).arg(&ne).arg(&bb).arg(&to);
    // SAFETY: matches moe_offsets_i32(counts, n_exp, bb, tile_off); one block of 1024 >= E
    // threads (check_dims), tile_off has E + 1 entries.
    unsafe { b.launch(per_row(1, 1024)) }?;
    // Every expert's last tile may be partial: at most rows / BB full tiles plus one per expert.
    let tiles = rows / tile.rows() + n_exp.min(rows);
    let tiles = u32::try_from(tiles).map_err(|_| shape_err(OP, format!("{tiles} row tiles")))?;
    let (x, ptrs, offsets, act, out) = (
        p.x.ptr(),
        p.ptrs.ptr(),
        p.offsets.ptr(),
        p.act.ptr(),
        p.out.ptr(),
    );
    let (h, i) = (dim_i32(OP, "hidden", hidden)?, dim_i32(OP, "inter", inter)?);
    for (gate_up, input, output, k, n, features) in [
        (true, x, act, h, i, inter.div_ceil(tile.weight_rows() / 2)),
        (false, act, out, i, h, hidden.div_ceil(tile.weight_rows())),
    ] {
        let name = tile.kernel(gate_up);
        gpu.set_max_dynamic_smem(name, tile.smem_bytes())?;
        let f = gpu.function(name)?;
        let mut b = gpu.launch(f);
        b.arg(&input)
            .arg(&ptrs)
            .arg(&offsets)
            .arg(&to)
            .arg(&output)
            .arg(&k)
            .arg(&n)
            .arg(&ne);
        let cfg = LaunchConfig {
            grid_dim: (tiles, features as u32, 1),
            block_dim: (tile.threads(), 1, 1),
            shared_mem_bytes: tile.smem_bytes() as u32,
        };
        // SAFETY: matches moe_grouped_{gate_up,down}_b*_bf16(x, ptrs, offsets, tile_off, out, K,
        // N, n_exp); shapes checked above (x/act [R, K], out/act [R, N], multiples of 8), the
        // tile offsets were written just before on the same stream, the table per the contract;
        // act is written by the first launch before the second reads it (stream order).
        unsafe { b.launch(cfg) }?;
    }
    // tile_off is freed stream-ordered after the launches that read it
    drop(tile_off);
    Ok(())
}

fn check_dims(op: &'static str, hidden: usize, inter: usize, n_exp: usize) -> Result<()> {
    if !hidden.is_multiple_of(8) || !inter.is_multiple_of(8) || hidden == 0 || inter == 0 {
        return Err(KernelError::Unsupported {
            op,
            what: format!("hidden {hidden} / intermediate {inter} must be non-zero multiples of 8"),
        });
    }
    if n_exp > 1024 {
        return Err(KernelError::Unsupported {
            op,
            what: format!("{n_exp} experts (at most 1024)"),
        });
    }
    Ok(())
}

/// The routed experts of one MoE layer for rows whose routing is on the device: x [T, H]; ids
/// [T, k] (i32 expert ids; values outside 0..E are not routed here, e.g. another shard's
/// experts); weights [T, k] f32; ptrs [E, 3] as in [`GroupedFfnParams`]; out [T, H] =
/// (accumulate ? out : 0) + Σ_j weights[t, j] · FFN_{ids[t, j]}(x[t]) (f32 sum, bf16 out).
/// `routed_rows`: how many assignments are routed here, when the caller knows (host routing);
/// None sizes the buffers for T · k. `touched_experts` (if known) picks the row tile.
pub struct GroupedExpertsParams<'a> {
    pub x: View<'a, bf16>,
    pub ids: View<'a, i32>,
    pub weights: View<'a, f32>,
    pub ptrs: View<'a, i64>,
    pub inter: usize,
    pub out: ViewMut<'a, bf16>,
    pub routed_rows: Option<usize>,
    pub touched_experts: Option<usize>,
    /// Forces a row tile (checks and benchmarks); None chooses by the rows per expert.
    pub tile: Option<RowTile>,
    pub accumulate: bool,
}

/// # Safety
/// As [`grouped_ffn`]: the table's non-zero addresses must be live expert weights of the
/// stated shapes until the launches complete. `routed_rows`, when given, must be at least the
/// number of ids within 0..E (the buffers are sized by it).
pub unsafe fn grouped_experts(gpu: &Gpu, p: GroupedExpertsParams<'_>) -> Result<()> {
    const OP: &str = "moe_grouped_experts_bf16";
    p.x.expect(OP, "x", &[None, None])?;
    let (tokens, hidden) = (p.x.shape()[0], p.x.shape()[1]);
    p.ids.expect(OP, "ids", &[Some(tokens), None])?;
    let k = p.ids.shape()[1];
    p.weights.expect(OP, "weights", &[Some(tokens), Some(k)])?;
    p.ptrs.expect(OP, "ptrs", &[None, Some(3)])?;
    p.out.expect(OP, "out", &[Some(tokens), Some(hidden)])?;
    let n_exp = p.ptrs.shape()[0];
    check_dims(OP, hidden, p.inter, n_exp)?;
    let bound = tokens * k;
    let rows = p.routed_rows.unwrap_or(bound);
    if rows > bound {
        return Err(shape_err(
            OP,
            format!("{rows} routed rows for {tokens} tokens x top-{k}"),
        ));
    }
    if tokens == 0 || k == 0 || n_exp == 0 {
        return Ok(());
    }
    let perm = moe::moe_permute(
        gpu,
        PermuteParams {
            ids: p.ids,
            n_experts: n_exp,
        },
    )?;
    // (one row at least: with nothing routed here the combine still writes the zeros)
    let y_rows = rows.max(1);
    let mut y = Tensor::<bf16>::uninit(gpu, &[y_rows, hidden])?;
    if rows > 0 {
        let mut xp = Tensor::<bf16>::uninit(gpu, &[rows, hidden])?;
        moe::moe_gather(
            gpu,
            GatherParams {
                x: p.x,
                src_row: perm.src_row.view(),
                out: xp.view_mut(),
            },
        )?;
        let mut act = Tensor::<bf16>::uninit(gpu, &[rows, p.inter])?;
        let tile = p.tile.unwrap_or_else(|| {
            RowTile::for_rows(rows, p.touched_experts.unwrap_or(n_exp.min(rows)))
        });
        // SAFETY: forwarded contract on the table; offsets/counts are moe_permute's.
        unsafe {
            grouped_ffn(
                gpu,
                GroupedFfnParams {
                    x: xp.view(),
                    counts: perm.counts.view(),
                    offsets: perm.offsets.view(),
                    ptrs: p.ptrs,
                    act: act.view_mut(),
                    out: y.view_mut(),
                    tile,
                },
            )?;
        }
    }
    moe::moe_combine(
        gpu,
        CombineParams {
            y: y.view(),
            slot_of: perm.slot_of.view(),
            weights: p.weights,
            out: p.out,
            accumulate: p.accumulate,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::RowTile;

    #[test]
    fn row_tile_follows_the_rows_per_expert() {
        // decode: one token's 6 experts; 64 distinct tokens over ~145 experts; 256 over 160
        assert_eq!(RowTile::for_rows(6, 6), RowTile::R16);
        assert_eq!(RowTile::for_rows(384, 145), RowTile::R16);
        assert_eq!(RowTile::for_rows(1536, 160), RowTile::R16);
        assert_eq!(RowTile::for_rows(160 * 30, 160), RowTile::R32);
        assert_eq!(RowTile::for_rows(160 * 40, 160), RowTile::R64);
        // V2-Lite at batch 256: 1536 rows over 64 experts, 24 each
        assert_eq!(RowTile::for_rows(1536, 64), RowTile::R32);
        // prefill: the 128-row wgmma tile (measured faster than the 64-row one on P2)
        assert_eq!(RowTile::for_rows(49152, 160), RowTile::W128);
        // a multiple of 128 pads nothing either way: the 128-row tile
        assert_eq!(RowTile::for_rows(160 * 256, 160), RowTile::W128);
        assert_eq!(RowTile::for_rows(160 * 1200, 160), RowTile::W128);
        // no expert touched is still a valid (empty) choice
        assert_eq!(RowTile::for_rows(0, 0), RowTile::R16);
    }

    #[test]
    fn wgmma_tiles_fit_shared_memory() {
        for t in [
            RowTile::R16,
            RowTile::R32,
            RowTile::R64,
            RowTile::R128,
            RowTile::W64,
            RowTile::W128,
        ] {
            // 227 KiB of dynamic shared memory per block on sm_90
            assert!(t.smem_bytes() <= 227 * 1024, "{t:?}: {}", t.smem_bytes());
        }
        assert_eq!(RowTile::W128.smem_bytes(), 4 * 384 * 128 + 1024);
        assert_eq!(RowTile::W64.smem_bytes(), 4 * 320 * 128 + 1024);
    }
}
