//! Routed experts of a MoE layer in one launch per projection (grouped.cu): the routing's
//! permutation, the gather of permuted rows, the grouped gate_up (SiLU·mul fused) and down
//! GEMMs over every expert at once, and the weighted combine. The expert weights are read in
//! place through a device table of addresses, so the checkpoint's per-expert tensors need no
//! repacking, and every size (1 row to a whole prefill) takes the same kernels with a row tile
//! chosen by the rows per touched expert.

use cudarc::driver::{CudaEvent, LaunchConfig};
use half::bf16;
use std::sync::OnceLock;

use super::moe::{self, CombineParams, GatherParams, PermuteParams};
use super::tma;
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
    /// [`RowTile::R16`] / [`RowTile::R32`] persistent (`moe_grouped_*_p16/p32_bf16`): as many
    /// CTAs as fit the GPU at once, each walking a run of (tile, feature block) items with one
    /// cp.async pipeline through them, so the next item's first stages load while the current one
    /// finishes. Opt-in (`DSV2_GROUPED_DECODE=persistent`) until measured.
    P16,
    P32,
    /// 128 rows (mma.sync; kept to compare with [`RowTile::W128`]).
    R128,
    /// 128 rows x 256 weight rows on warpgroup MMA (prefill: compute bound).
    W128,
    /// 64 rows x 256 weight rows on warpgroup MMA (less padding for experts holding a little
    /// more than a multiple of 128 rows, but slower than W128 on P2: kept to compare).
    W64,
    /// 128 rows x 256 weight rows, warp-specialised and persistent (`moe_grouped_*_ws_bf16`):
    /// a TMA producer warpgroup and two wgmma consumer warpgroups over a 4-stage mbarrier ring,
    /// one CTA per SM walking a static tile schedule; a tile of <= 64 rows runs one consumer's
    /// MMAs only. `W128` stays to compare (`DSV2_GROUPED_WS=0` in the CUDA backend).
    Ws128,
    /// [`RowTile::Ws128`] in clusters of two CTAs that take the two row blocks of one weight
    /// block together and share its copies (each copies half and multicasts it to both), so
    /// every weight byte crosses L2 once per pair (`moe_grouped_*_ws_pair_bf16`). An expert
    /// with an odd number of row blocks leaves one CTA of its last pair without rows.
    Ws128Pair,
    /// [`RowTile::Ws128`] with tiles handed out by a global counter to whichever CTA asks next
    /// (`moe_grouped_*_ws_dyn_bf16`) instead of a static stride, so that the row blocks of one
    /// weight block run close together in time and share its copies through L2. The prefill
    /// tile ([`PREFILL_TILE`]): P2g 0.624 of cuBLAS against Ws128's 0.483, prefill of 64 x 512
    /// tokens 1.53x its floor against 1.67x (bench/RESULTS.md, session 15).
    Ws128Dyn,
    /// [`RowTile::Ws128Dyn`] in clusters of two CTAs that share copies both ways
    /// (`moe_grouped_*_ws_pair_dyn_bf16`): the counter hands out units of two tiles, row pairs
    /// (two row blocks of one weight block, each CTA copying half of the weights and multicasting
    /// it) and, for an expert's odd last row block, feature pairs (that block against two weight
    /// blocks, each CTA copying one of its two activation boxes for both). Ws128Dyn is bound by
    /// L2 delivery (bench/RESULTS.md session 20); this pulls 1.37x fewer bytes from L2 per FLOP
    /// over P2-like experts (`paired_dynamic_schedule_pulls_fewer_bytes_from_l2` counts them). Opt-in (`DSV2_GROUPED_WS=pairdyn`) until measured.
    Ws128PairDyn,
}

/// The tile prefill-sized batches take when the caller does not choose (`for_rows`).
pub const PREFILL_TILE: RowTile = RowTile::Ws128Dyn;

/// Stages of the warp-specialised kernel's ring (`WS_STAGES`): 48 KiB each (128 x 64 activation
/// + 256 x 64 weight bf16); a fifth does not fit the 227 KiB an sm_90 block may hold.
const WS_STAGES: usize = 4;
/// Experts the warp-specialised kernel's shared tables hold (`WS_MAX_EXP`, = check_dims' bound).
const WS_MAX_EXP: usize = 1024;
/// Rows per TMA box of the activations (two boxes per 128-row stage; the second is skipped for
/// tiles of <= 64 rows) and of the weights (two boxes per 256-row stage).
const WS_X_BOX_ROWS: usize = 64;
const WS_W_BOX_ROWS: usize = 128;

impl RowTile {
    pub fn rows(self) -> usize {
        match self {
            RowTile::R16 | RowTile::P16 => 16,
            RowTile::R32 | RowTile::P32 => 32,
            RowTile::R64 | RowTile::W64 => 64,
            RowTile::R128
            | RowTile::W128
            | RowTile::Ws128
            | RowTile::Ws128Pair
            | RowTile::Ws128Dyn
            | RowTile::Ws128PairDyn => 128,
        }
    }

    /// Weight rows per CTA (gate_up covers half as many features: gate + up).
    fn weight_rows(self) -> usize {
        match self {
            RowTile::W128
            | RowTile::W64
            | RowTile::Ws128
            | RowTile::Ws128Pair
            | RowTile::Ws128Dyn
            | RowTile::Ws128PairDyn => 256,
            _ => WEIGHT_ROWS,
        }
    }

    fn stages(self) -> usize {
        match self {
            RowTile::R16 | RowTile::R32 | RowTile::R64 | RowTile::P16 | RowTile::P32 => 4,
            RowTile::R128 => 3,
            RowTile::W128 | RowTile::W64 => 4,
            RowTile::Ws128 | RowTile::Ws128Pair | RowTile::Ws128Dyn | RowTile::Ws128PairDyn => {
                WS_STAGES
            }
        }
    }

    fn threads(self) -> u32 {
        match self {
            RowTile::R16 | RowTile::R32 | RowTile::R64 | RowTile::P16 | RowTile::P32 => 128,
            RowTile::R128 | RowTile::W128 | RowTile::W64 => 256,
            // one producer and two consumer warpgroups
            RowTile::Ws128 | RowTile::Ws128Pair | RowTile::Ws128Dyn | RowTile::Ws128PairDyn => 384,
        }
    }

    /// The warpgroup-MMA tiles (prefill-sized batches).
    pub fn is_wgmma(self) -> bool {
        matches!(self, RowTile::W128 | RowTile::W64) || self.is_warp_specialised()
    }

    /// The persistent mma.sync decode tiles (grid: the CTAs resident at once).
    fn is_persistent_decode(self) -> bool {
        matches!(self, RowTile::P16 | RowTile::P32)
    }

    /// The persistent tile of a decode tile (R16 -> P16, R32 -> P32); any other unchanged.
    pub fn persistent(self) -> Self {
        match self {
            RowTile::R16 => RowTile::P16,
            RowTile::R32 => RowTile::P32,
            t => t,
        }
    }

    /// The persistent warp-specialised kernels (one launch path, `ws_launch`).
    fn is_warp_specialised(self) -> bool {
        matches!(
            self,
            RowTile::Ws128 | RowTile::Ws128Pair | RowTile::Ws128Dyn | RowTile::Ws128PairDyn
        )
    }

    fn smem_bytes(self) -> usize {
        if self.is_warp_specialised() {
            // WS_SMEM_BYTES: alignment slack, the stages, 128 bytes of mbarriers, and the
            // experts' tile offsets, row offsets and pair offsets (E + 1 ints each)
            return 1024
                + self.stages() * (self.weight_rows() + self.rows()) * K_STEP * 2
                + 128
                + 3 * 4 * (WS_MAX_EXP + 1);
        }
        let stages = self.stages() * (self.weight_rows() + self.rows()) * K_STEP * 2;
        if self.is_persistent_decode() {
            // + the epilogue's staging tile, rows x (128 + 8) bf16 (GA + 8 for down)
            return stages + self.rows() * (WEIGHT_ROWS + 8) * 2;
        }
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
            (RowTile::P16, true) => "moe_grouped_gate_up_p16_bf16",
            (RowTile::P16, false) => "moe_grouped_down_p16_bf16",
            (RowTile::P32, true) => "moe_grouped_gate_up_p32_bf16",
            (RowTile::P32, false) => "moe_grouped_down_p32_bf16",
            (RowTile::R64, true) => "moe_grouped_gate_up_b64_bf16",
            (RowTile::R64, false) => "moe_grouped_down_b64_bf16",
            (RowTile::R128, true) => "moe_grouped_gate_up_b128_bf16",
            (RowTile::R128, false) => "moe_grouped_down_b128_bf16",
            (RowTile::W128, true) => "moe_grouped_gate_up_wgmma_bf16",
            (RowTile::W128, false) => "moe_grouped_down_wgmma_bf16",
            (RowTile::W64, true) => "moe_grouped_gate_up_wgmma64_bf16",
            (RowTile::W64, false) => "moe_grouped_down_wgmma64_bf16",
            (RowTile::Ws128, true) => "moe_grouped_gate_up_ws_bf16",
            (RowTile::Ws128, false) => "moe_grouped_down_ws_bf16",
            (RowTile::Ws128Pair, true) => "moe_grouped_gate_up_ws_pair_bf16",
            (RowTile::Ws128Pair, false) => "moe_grouped_down_ws_pair_bf16",
            (RowTile::Ws128Dyn, true) => "moe_grouped_gate_up_ws_dyn_bf16",
            (RowTile::Ws128Dyn, false) => "moe_grouped_down_ws_dyn_bf16",
            (RowTile::Ws128PairDyn, true) => "moe_grouped_gate_up_ws_pair_dyn_bf16",
            (RowTile::Ws128PairDyn, false) => "moe_grouped_down_ws_pair_dyn_bf16",
        }
    }

    /// The tile for `rows` routed rows spread over `touched` experts: the smallest tile that
    /// holds the mean expert's rows, so decode reads each expert's weights once and prefill
    /// gets tiles large enough to be compute bound (on wgmma): [`PREFILL_TILE`].
    pub fn for_rows(rows: usize, touched: usize) -> Self {
        Self::for_rows_with(rows, touched, PREFILL_TILE)
    }

    /// As [`RowTile::for_rows`], with `prefill` for prefill-sized batches (to compare kernels).
    pub fn for_rows_with(rows: usize, touched: usize, prefill: RowTile) -> Self {
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
            // The warp-specialised Ws128 pads like the 64-row tile where a block holds <= 64.
            prefill
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
    if tile.is_warp_specialised() {
        // SAFETY: forwarded contract; tile_off written just above on the same stream.
        unsafe {
            ws_launch(
                gpu,
                WsLaunch {
                    tile,
                    rows,
                    hidden,
                    inter,
                    n_exp,
                    x,
                    ptrs,
                    offsets,
                    tile_off: to,
                    act,
                    out,
                },
            )?;
        }
        drop(tile_off);
        return Ok(());
    }
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
        // a persistent tile: the CTAs resident at once (each walks its share of the tiles x
        // feature blocks, counted on the device)
        let grid = if tile.is_persistent_decode() {
            (persistent_ctas(gpu.sm_count, tile.smem_bytes()), 1, 1)
        } else {
            (tiles, features as u32, 1)
        };
        let cfg = LaunchConfig {
            grid_dim: grid,
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

/// CTAs of a persistent decode-tile launch: as many as shared memory lets each SM hold (228 KiB
/// an SM, 1 KiB reserved a CTA), at most 4 (the register file at ~120 registers x 128 threads).
fn persistent_ctas(sm_count: usize, smem_bytes: usize) -> u32 {
    let per_sm = (233_472 / (smem_bytes + 1024)).clamp(1, 4);
    (sm_count.max(1) * per_sm) as u32
}

/// Whether the decode tiles run persistent (`DSV2_GROUPED_DECODE=persistent`; unset or
/// `grid`: one CTA a tile). Read once.
pub fn persistent_decode_from_env() -> Result<bool> {
    static CHOICE: OnceLock<std::result::Result<bool, String>> = OnceLock::new();
    CHOICE
        .get_or_init(|| match std::env::var("DSV2_GROUPED_DECODE").as_deref() {
            Err(_) | Ok("grid") => Ok(false),
            Ok("persistent") => Ok(true),
            Ok(other) => Err(format!(
                "DSV2_GROUPED_DECODE={other}: expected grid or persistent"
            )),
        })
        .clone()
        .map_err(|what| KernelError::Unsupported {
            op: "moe_grouped_experts_bf16",
            what,
        })
}

/// Device addresses and sizes of one warp-specialised grouped FFN (both projections).
struct WsLaunch {
    tile: RowTile,
    rows: usize,
    hidden: usize,
    inter: usize,
    n_exp: usize,
    x: u64,
    ptrs: u64,
    offsets: u64,
    tile_off: u64,
    act: u64,
    out: u64,
}

/// Output features per tile of the warp-specialised kernel: 128 for gate_up (gate and up of the
/// same features fill the 256 weight rows), 256 for down.
fn ws_features(gate_up: bool) -> usize {
    if gate_up { 128 } else { 256 }
}

/// CTAs of a warp-specialised launch: one per SM, fewer when there are fewer tiles. The tile
/// count is known on the device only; its bound on the host is `rows / 128` full row blocks plus
/// one partial block per expert, times the feature blocks. The pair kernel takes an even count
/// (clusters of two), bounded the same way in pairs.
fn ws_grid(
    sm_count: usize,
    rows: usize,
    n_exp: usize,
    n: usize,
    gate_up: bool,
    pair: bool,
) -> usize {
    let row_blocks = rows / 128 + n_exp.min(rows);
    let tiles = row_blocks * n.div_ceil(ws_features(gate_up));
    if pair {
        2 * (sm_count / 2).min(tiles).max(1)
    } else {
        sm_count.min(tiles).max(1)
    }
}

/// The kernels' binary search over an expert prefix sum: the largest e < n_exp with
/// `at_or_below(e)` (true for e = 0 and then for a prefix), for the tests' schedule mirrors.
#[cfg(test)]
fn last_at_or_below(n_exp: usize, at_or_below: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0usize, n_exp);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if at_or_below(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The kernel's schedule (`ws_tile` in grouped.cu), for the tests: tile `t` < tile_off[E] * nb
/// is (expert e, first row, rows, first feature), numbered expert-major, then feature block,
/// then row block innermost.
#[cfg(test)]
fn ws_tile(tile_off: &[i32], offsets: &[i32], nb: i32, nf: i32, t: i32) -> (usize, i32, i32, i32) {
    let n_exp = tile_off.len() - 1;
    let lo = last_at_or_below(n_exp, |e| tile_off[e] * nb <= t);
    let mb = tile_off[lo + 1] - tile_off[lo];
    let local = t - tile_off[lo] * nb;
    let (n, m) = (local / mb, local % mb);
    let row0 = offsets[lo] + m * 128;
    (lo, row0, 128.min(offsets[lo + 1] - row0), n * nf)
}

/// The pair kernel's schedule (`ws_pair_tile` in grouped.cu), for the tests: unit `u` <
/// pair_off[E] * nb gives CTA `rank` (expert e, first row, rows (0: none), first feature);
/// pair_off is the prefix sum of ceil(row blocks / 2).
#[cfg(test)]
fn ws_pair_tile(
    pair_off: &[i32],
    tile_off: &[i32],
    offsets: &[i32],
    nb: i32,
    nf: i32,
    u: i32,
    rank: i32,
) -> (usize, i32, i32, i32) {
    let n_exp = pair_off.len() - 1;
    let lo = last_at_or_below(n_exp, |e| pair_off[e] * nb <= u);
    let pb = pair_off[lo + 1] - pair_off[lo];
    let local = u - pair_off[lo] * nb;
    let (n, m) = (local / pb, 2 * (local % pb) + rank);
    let row0 = offsets[lo] + m * 128;
    let nrows = if m < tile_off[lo + 1] - tile_off[lo] {
        128.min(offsets[lo + 1] - row0)
    } else {
        0
    };
    (lo, row0, nrows, n * nf)
}

/// The paired dynamic schedule's units an expert of `mb` row blocks takes (`ws_pdyn_units` in
/// grouped.cu): per two feature blocks, its row pairs for each, then one feature pair for an
/// odd last row block.
#[cfg(test)]
fn ws_pdyn_units(mb: i32, nb: i32) -> i32 {
    let (rp, odd) = (mb / 2, mb % 2);
    (nb / 2) * (2 * rp + odd) + (nb % 2) * (rp + odd)
}

/// A unit of the paired dynamic schedule for CTA `rank` (`ws_pdyn_unit` in grouped.cu), for the
/// tests: (expert, first row, rows, first feature, feature pair?, this CTA has a tile?).
#[cfg(test)]
fn ws_pdyn_unit(
    unit_off: &[i32],
    tile_off: &[i32],
    offsets: &[i32],
    nb: i32,
    nf: i32,
    u: i32,
    rank: i32,
) -> (usize, i32, i32, i32, bool, bool) {
    let n_exp = unit_off.len() - 1;
    let lo = last_at_or_below(n_exp, |e| unit_off[e] <= u);
    let mb = tile_off[lo + 1] - tile_off[lo];
    let rp = mb / 2;
    let g = (2 * rp + mb % 2).max(1);
    let local = u - unit_off[lo];
    let (q, w) = (local / g, local % g);
    let nfq = 2.min(nb - 2 * q);
    let (n, m, fpair, mine) = if w < nfq * rp {
        let j = w / rp;
        (2 * q + j, 2 * (w - j * rp) + rank, false, true)
    } else {
        (2 * q + rank, mb - 1, true, 2 * q + rank < nb)
    };
    let row0 = offsets[lo] + m * 128;
    (
        lo,
        row0,
        128.min(offsets[lo + 1] - row0),
        n * nf,
        fpair,
        mine,
    )
}

/// # Safety
/// As [`grouped_ffn`]: the table's non-zero addresses are live expert weights of the stated
/// shapes; x [rows, hidden], act [rows, inter], out [rows, hidden], offsets [E + 1] and tile_off
/// [E + 1] (moe_offsets_i32 at 128 rows) are live device buffers.
unsafe fn ws_launch(gpu: &Gpu, w: WsLaunch) -> Result<()> {
    const OP: &str = "moe_grouped_ffn_ws_bf16";
    let tile = w.tile;
    let pair = matches!(tile, RowTile::Ws128Pair | RowTile::Ws128PairDyn);
    let ne = dim_i32(OP, "experts", w.n_exp)?;
    // Per-expert weight maps, [E, 3] x 128 bytes: templates encoded here (the shapes; any
    // 16-byte aligned address), their addresses replaced on the device from the table.
    let gu_t = tma::encode_bf16_2d(OP, w.x, w.inter, w.hidden, 64, WS_W_BOX_ROWS)?;
    let dn_t = tma::encode_bf16_2d(OP, w.x, w.hidden, w.inter, 64, WS_W_BOX_ROWS)?;
    // + 8 bytes: the dynamic schedule's two tile counters (gate_up's, down's), zeroed by the
    // map kernel below, so they cost no allocation or memset of their own
    let maps = Tensor::<i64>::uninit(gpu, &[w.n_exp * 3 * 16 + 1])?;
    let mp = maps.ptr();
    if !mp.is_multiple_of(64) {
        return Err(shape_err(
            OP,
            format!("tensor-map buffer at {mp:#x} is not 64-byte aligned"),
        ));
    }
    let f = gpu.function("moe_grouped_weight_maps")?;
    let mut b = gpu.launch(f);
    b.arg(&gu_t).arg(&dn_t).arg(&w.ptrs).arg(&mp).arg(&ne);
    let cfg = LaunchConfig {
        grid_dim: ((3 * w.n_exp).div_ceil(128) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches moe_grouped_weight_maps(gu, dn, ptrs, maps, n_exp); maps holds 3 E
    // 128-byte maps, 64-byte aligned (checked), and the two counters after them; ptrs [E, 3].
    unsafe { b.launch(cfg) }?;

    let x_map = tma::encode_bf16_2d(OP, w.x, w.rows, w.hidden, 64, WS_X_BOX_ROWS)?;
    let act_map = tma::encode_bf16_2d(OP, w.act, w.rows, w.inter, 64, WS_X_BOX_ROWS)?;
    let (h, i) = (
        dim_i32(OP, "hidden", w.hidden)?,
        dim_i32(OP, "inter", w.inter)?,
    );
    for (gate_up, in_map, output, k, n, n_us, counter) in [
        (true, &x_map, w.act, h, i, w.inter, 0u64),
        (false, &act_map, w.out, i, h, w.hidden, 4u64),
    ] {
        let name = tile.kernel(gate_up);
        gpu.set_max_dynamic_smem(name, tile.smem_bytes())?;
        let f = gpu.function(name)?;
        let mut b = gpu.launch(f);
        b.arg(in_map)
            .arg(&mp)
            .arg(&w.ptrs)
            .arg(&w.offsets)
            .arg(&w.tile_off)
            .arg(&output)
            .arg(&k)
            .arg(&n)
            .arg(&ne);
        let sched_ptr = mp + (w.n_exp * 3 * 128) as u64 + counter;
        if matches!(tile, RowTile::Ws128Dyn | RowTile::Ws128PairDyn) {
            b.arg(&sched_ptr);
        }
        if pair {
            b.cluster_x(2);
        }
        let grid = ws_grid(gpu.sm_count, w.rows, w.n_exp, n_us, gate_up, pair);
        let cfg = LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (tile.threads(), 1, 1),
            shared_mem_bytes: tile.smem_bytes() as u32,
        };
        // SAFETY: matches moe_grouped_{gate_up,down}_ws{,_pair,_dyn}_bf16(x_map, wmaps, ptrs,
        // offsets, tile_off, out, K, N, n_exp[, sched]); the input map covers x / act [rows, K],
        // the weight maps (and the zeroed counters after them, sched) were written by the launch
        // above (stream order), out / act [rows, N]; act is written by the first launch before
        // the second reads it.
        unsafe { b.launch(cfg) }?;
    }
    // the maps buffer (and the counters) are freed stream-ordered after the launches that read them
    drop(maps);
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
    /// The tile of prefill-sized batches when `tile` is None: [`PREFILL_TILE`], or `W128` to
    /// compare (the CUDA backend's `DSV2_GROUPED_WS=0`).
    pub prefill_tile: RowTile,
    pub accumulate: bool,
    /// The main stream waits for this event just before the combine, the one launch that reads
    /// `out` (with `accumulate`): `out` may then be written beside the routed experts, on another
    /// stream (the shared experts' down projection), until the event.
    pub before_combine: Option<&'a CudaEvent>,
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
        let tile = match p.tile {
            Some(t) => t,
            None => {
                let touched = p.touched_experts.unwrap_or(n_exp.min(rows));
                let t = RowTile::for_rows_with(rows, touched, p.prefill_tile);
                if persistent_decode_from_env()? {
                    t.persistent()
                } else {
                    t
                }
            }
        };
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
    if let Some(event) = p.before_combine {
        gpu.stream.wait(event)?;
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
        // prefill: the warp-specialised 128-row tile with the dynamic schedule, or the one the
        // caller names for it
        assert_eq!(RowTile::for_rows(49152, 160), RowTile::Ws128Dyn);
        assert_eq!(RowTile::for_rows(160 * 256, 160), RowTile::Ws128Dyn);
        assert_eq!(RowTile::for_rows(160 * 1200, 160), RowTile::Ws128Dyn);
        assert_eq!(
            RowTile::for_rows_with(49152, 160, RowTile::W128),
            RowTile::W128
        );
        // ... but never for decode sizes
        assert_eq!(
            RowTile::for_rows_with(160 * 40, 160, RowTile::W128),
            RowTile::R64
        );
        assert_eq!(RowTile::for_rows(49, 1), RowTile::Ws128Dyn);
        assert!(RowTile::Ws128.is_wgmma());
        // no expert touched is still a valid (empty) choice
        assert_eq!(RowTile::for_rows(0, 0), RowTile::R16);
    }

    #[test]
    fn wgmma_tiles_fit_shared_memory() {
        for t in [
            RowTile::R16,
            RowTile::R32,
            RowTile::P16,
            RowTile::P32,
            RowTile::R64,
            RowTile::R128,
            RowTile::W64,
            RowTile::W128,
            RowTile::Ws128,
            RowTile::Ws128Pair,
            RowTile::Ws128Dyn,
            RowTile::Ws128PairDyn,
        ] {
            // 227 KiB of dynamic shared memory per block on sm_90
            assert!(t.smem_bytes() <= 227 * 1024, "{t:?}: {}", t.smem_bytes());
        }
        assert_eq!(RowTile::W128.smem_bytes(), 4 * 384 * 128 + 1024);
        assert_eq!(RowTile::W64.smem_bytes(), 4 * 320 * 128 + 1024);
        // WS_SMEM_BYTES in grouped.cu: 1024 + 4 x 48 KiB + 128 + 3 x 4 x 1025
        assert_eq!(RowTile::Ws128.smem_bytes(), 210_060);
        assert_eq!(RowTile::Ws128Pair.smem_bytes(), 210_060);
        // the dynamic schedule's tile names fit beside the mbarriers in their 128 bytes (32 + 32 + 16)
        assert_eq!(RowTile::Ws128Dyn.smem_bytes(), 210_060);
        // ... and so do the paired schedule's unit names and their barriers (32 + 16)
        assert_eq!(RowTile::Ws128PairDyn.smem_bytes(), 210_060);
        assert_eq!(RowTile::Ws128.threads(), 384);
        assert_eq!(RowTile::Ws128.kernel(true), "moe_grouped_gate_up_ws_bf16");
        // the persistent decode tiles: the stages and a rows x 136 staging tile of their own
        // (grouped_persist in grouped.cu), two CTAs an SM
        assert_eq!(RowTile::P32.smem_bytes(), 4 * 160 * 128 + 32 * 136 * 2);
        assert_eq!(RowTile::P16.smem_bytes(), 4 * 144 * 128 + 16 * 136 * 2);
        assert_eq!(super::persistent_ctas(132, RowTile::P32.smem_bytes()), 264);
        assert_eq!(super::persistent_ctas(132, RowTile::P16.smem_bytes()), 264);
        assert_eq!(RowTile::R32.persistent(), RowTile::P32);
        assert_eq!(RowTile::R16.persistent(), RowTile::P16);
        assert_eq!(RowTile::Ws128Dyn.persistent(), RowTile::Ws128Dyn);
        assert!(!RowTile::P32.is_wgmma());
        assert_eq!(RowTile::P32.kernel(false), "moe_grouped_down_p32_bf16");
    }

    /// Every name `RowTile::kernel` gives, and the weight-map kernel, is defined in grouped.cu.
    #[test]
    fn ws_kernels_exist_in_the_source() {
        let src = crate::compile::SOURCES
            .iter()
            .find(|(f, _)| *f == "grouped.cu")
            .map(|(_, s)| *s)
            .expect("grouped.cu is embedded");
        let names = crate::device::kernel_names(src);
        for t in [
            RowTile::W128,
            RowTile::Ws128,
            RowTile::Ws128Pair,
            RowTile::Ws128Dyn,
            RowTile::Ws128PairDyn,
        ] {
            for g in [true, false] {
                assert!(names.iter().any(|n| n == t.kernel(g)), "{}", t.kernel(g));
            }
        }
        assert!(names.iter().any(|n| n == "moe_grouped_weight_maps"));
        // the host's smem size is the kernel's
        assert!(src.contains("#define WS_STAGES 4"));
        assert!(src.contains("#define WS_MAX_EXP 1024"));
    }

    /// The tile offsets moe_offsets_i32 writes: prefix sums of ceil(count / 128).
    fn tile_offsets(counts: &[i32]) -> (Vec<i32>, Vec<i32>) {
        let (mut toff, mut off) = (vec![0], vec![0]);
        for &c in counts {
            toff.push(toff.last().unwrap() + (c + 127) / 128);
            off.push(off.last().unwrap() + c);
        }
        (toff, off)
    }

    /// Marks a tile's (row, feature block) cells in `seen` after checking that it holds 1..=128
    /// rows of its expert and starts on a feature block within N.
    fn mark(
        seen: &mut [u8],
        off: &[i32],
        (n, nf, nb): (i32, i32, i32),
        tile: (usize, i32, i32, i32),
    ) {
        let (e, row0, nrows, f0) = tile;
        assert!((1..=128).contains(&nrows));
        assert!(row0 >= off[e] && row0 + nrows <= off[e + 1]);
        assert!(f0 < n && f0 % nf == 0);
        for r in row0..row0 + nrows {
            seen[r as usize * nb as usize + (f0 / nf) as usize] += 1;
        }
    }

    #[test]
    fn ws_schedule_covers_every_row_and_feature_once() {
        // experts with 0, 1, 7, 64, 65, 67, 128, 129, 300 rows; N = 72, 1536 (gate_up 128
        // features a tile) and 5120 (down, 256)
        let counts = [0, 1, 7, 0, 64, 65, 67, 128, 129, 300, 0];
        let (toff, off) = tile_offsets(&counts);
        let rows = *off.last().unwrap() as usize;
        for (n, nf) in [(72i32, 128i32), (1536, 128), (5120, 256), (72, 256)] {
            let nb = (n + nf - 1) / nf;
            let total = toff[counts.len()] * nb;
            let mut seen = vec![0u8; rows * nb as usize];
            for t in 0..total {
                let tile = super::ws_tile(&toff, &off, nb, nf, t);
                assert!(
                    counts[tile.0] > 0,
                    "expert {} with no rows got tile {t}",
                    tile.0
                );
                mark(&mut seen, &off, (n, nf, nb), tile);
            }
            assert!(
                seen.iter().all(|&s| s == 1),
                "N {n}: a (row, block) not covered once"
            );
        }
    }

    #[test]
    fn pair_schedule_covers_every_row_and_feature_once_with_both_ctas_on_one_weight_block() {
        let counts = [0, 1, 7, 0, 64, 65, 67, 128, 129, 300, 0, 351, 257];
        let (toff, off) = tile_offsets(&counts);
        let mut poff = vec![0];
        for e in 0..counts.len() {
            poff.push(poff.last().unwrap() + (toff[e + 1] - toff[e] + 1) / 2);
        }
        let rows = *off.last().unwrap() as usize;
        for (n, nf) in [(72i32, 128i32), (1536, 128), (5120, 256)] {
            let nb = (n + nf - 1) / nf;
            let total = poff[counts.len()] * nb;
            let mut seen = vec![0u8; rows * nb as usize];
            for u in 0..total {
                let a = super::ws_pair_tile(&poff, &toff, &off, nb, nf, u, 0);
                let b = super::ws_pair_tile(&poff, &toff, &off, nb, nf, u, 1);
                // both CTAs of the pair on the same expert and weight block
                assert_eq!((a.0, a.3), (b.0, b.3));
                assert!(counts[a.0] > 0, "expert {} with no rows got unit {u}", a.0);
                assert!(a.2 > 0, "rank 0 always has rows");
                for tile in [a, b] {
                    if tile.2 > 0 {
                        mark(&mut seen, &off, (n, nf, nb), tile);
                    }
                }
            }
            assert!(
                seen.iter().all(|&s| s == 1),
                "N {n}: a (row, block) not covered once"
            );
        }
    }

    fn unit_offsets(toff: &[i32], nb: i32) -> Vec<i32> {
        let mut uoff = vec![0];
        for e in 0..toff.len() - 1 {
            uoff.push(uoff.last().unwrap() + super::ws_pdyn_units(toff[e + 1] - toff[e], nb));
        }
        uoff
    }

    #[test]
    fn paired_dynamic_schedule_covers_every_row_and_feature_once() {
        let counts = [0, 1, 7, 0, 64, 65, 67, 128, 129, 300, 0, 351, 257, 512, 513];
        let (toff, off) = tile_offsets(&counts);
        let rows = *off.last().unwrap() as usize;
        // odd and even feature block counts: V2-Lite's gate_up has 11 (1408 / 128)
        for (n, nf) in [
            (72i32, 128i32),
            (1536, 128),
            (1408, 128),
            (5120, 256),
            (300, 128),
        ] {
            let nb = (n + nf - 1) / nf;
            let uoff = unit_offsets(&toff, nb);
            let total = *uoff.last().unwrap();
            let mut seen = vec![0u8; rows * nb as usize];
            for u in 0..total {
                let a = super::ws_pdyn_unit(&uoff, &toff, &off, nb, nf, u, 0);
                let b = super::ws_pdyn_unit(&uoff, &toff, &off, nb, nf, u, 1);
                assert_eq!(a.0, b.0, "unit {u}: one expert");
                assert!(counts[a.0] > 0, "expert {} with no rows got unit {u}", a.0);
                assert_eq!(a.4, b.4, "unit {u}: one kind");
                assert!(a.5, "rank 0 always has a tile");
                if a.4 {
                    // a feature pair: one row block (the expert's last), two weight blocks
                    assert_eq!((a.1, a.2), (b.1, b.2));
                    assert_eq!(a.1 + a.2, off[a.0 + 1], "the last row block");
                    assert_eq!(b.3, a.3 + nf);
                    assert_eq!(b.5, b.3 < n);
                } else {
                    // a row pair: one weight block, two consecutive row blocks, both present
                    assert_eq!(a.3, b.3);
                    assert_eq!(b.1, a.1 + 128);
                    assert!(b.5);
                }
                for (e, row0, nrows, f0, _, mine) in [a, b] {
                    if mine {
                        mark(&mut seen, &off, (n, nf, nb), (e, row0, nrows, f0));
                    }
                }
            }
            assert!(
                seen.iter().all(|&s| s == 1),
                "N {n}: a (row, block) not covered once"
            );
        }
    }

    /// The bytes both schedules pull from L2 per k step for P2-like experts (three row blocks,
    /// the last short), counted as the kernels issue copies (a multicast box once): the paired
    /// schedule's reason to exist is this ratio.
    #[test]
    fn paired_dynamic_schedule_pulls_fewer_bytes_from_l2() {
        let counts = [300, 307, 351, 265, 290, 330];
        let (toff, off) = tile_offsets(&counts);
        let (nb, nf) = (12, 128); // gate_up at V2's 1536 features
        let (a_box, w_block) = (64 * 128, 256 * 128); // bytes per k step
        let a_bytes = |nrows: i32| if nrows > 64 { 2 * a_box } else { a_box };
        let mut unpaired = 0;
        for t in 0..toff[counts.len()] * nb {
            let (_, _, nrows, _) = super::ws_tile(&toff, &off, nb, nf, t);
            unpaired += a_bytes(nrows) + w_block;
        }
        let uoff = unit_offsets(&toff, nb);
        let mut paired = 0;
        for u in 0..*uoff.last().unwrap() {
            let a = super::ws_pdyn_unit(&uoff, &toff, &off, nb, nf, u, 0);
            let b = super::ws_pdyn_unit(&uoff, &toff, &off, nb, nf, u, 1);
            paired += if a.4 {
                a_bytes(a.2) + w_block * (1 + b.5 as usize)
            } else {
                a_bytes(a.2) + a_bytes(b.2) + w_block
            };
        }
        let ratio = unpaired as f64 / paired as f64;
        assert!(
            ratio > 1.3,
            "unpaired {unpaired} / paired {paired} = {ratio:.3}"
        );
    }

    #[test]
    fn ws_schedule_keeps_a_weight_block_together() {
        // P2-like: 3 row blocks per expert; consecutive tiles share (expert, feature block)
        let counts = [300, 307, 351, 265];
        let (toff, off) = tile_offsets(&counts);
        let nb = 1536 / 128;
        let tiles: Vec<_> = (0..toff[4] * nb)
            .map(|t| super::ws_tile(&toff, &off, nb, 128, t))
            .collect();
        assert_eq!(tiles.len(), 4 * 3 * 12);
        for grp in tiles.chunks(3) {
            assert!(grp.iter().all(|t| (t.0, t.3) == (grp[0].0, grp[0].3)));
            let rows: Vec<i32> = grp.iter().map(|t| t.1).collect();
            assert_eq!(
                rows,
                vec![off[grp[0].0], off[grp[0].0] + 128, off[grp[0].0] + 256]
            );
        }
        // the last block of the 265-row expert holds 9 rows (one consumer), of 351: 95 (both)
        assert_eq!(
            tiles
                .iter()
                .find(|t| t.0 == 3 && t.1 == off[3] + 256)
                .unwrap()
                .2,
            9
        );
        assert_eq!(
            tiles
                .iter()
                .find(|t| t.0 == 2 && t.1 == off[2] + 256)
                .unwrap()
                .2,
            95
        );
    }

    #[test]
    fn ws_grid_is_one_cta_per_sm_at_most() {
        // P2: 49152 rows over 160 experts on 132 SMs
        assert_eq!(super::ws_grid(132, 49152, 160, 1536, true, false), 132);
        // one row of one expert: gate_up 1536 / 128 = 12 tiles, down 5120 / 256 = 20
        assert_eq!(super::ws_grid(132, 1, 160, 1536, true, false), 12);
        assert_eq!(super::ws_grid(132, 1, 160, 5120, false, false), 20);
        // bound = (rows / 128 + min(E, rows)) * feature blocks: 7 rows over 9 experts, N 40
        assert_eq!(super::ws_grid(132, 7, 9, 40, true, false), 7);
        assert_eq!(super::ws_grid(132, 0, 9, 40, true, false), 1);
        // pairs: always an even count of CTAs, one pair per tile at most
        assert_eq!(super::ws_grid(132, 49152, 160, 1536, true, true), 132);
        assert_eq!(super::ws_grid(133, 49152, 160, 1536, true, true), 132);
        assert_eq!(super::ws_grid(132, 1, 160, 1536, true, true), 24);
        assert_eq!(super::ws_grid(132, 0, 9, 40, true, true), 2);
    }
}
