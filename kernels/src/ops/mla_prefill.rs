//! Launchers for mla_prefill.cu: MLA prefill attention for every sequence of a step in one launch
//! (varlen, causal, K/V decompressed from the latent), its host-side plan (sequence descriptors
//! and tile list), the K/V decompression GEMM that feeds it, and the row scatter.

use cudarc::cublas::{result as blas, sys as bsys};
use cudarc::driver::LaunchConfig;
use half::bf16;

use super::dim_i32;
use crate::device::Gpu;
use crate::error::{KernelError, Result, shape_err};
use crate::tensor::{DType, View, ViewMut};

/// Head dims the kernel is compiled for (DeepSeek-V2 and V2-Lite): q·k over nope + rope, v.
pub const QK_NOPE: usize = 128;
pub const QK_ROPE: usize = 64;
pub const V_HEAD: usize = 128;
/// Keys per tile of the mma.sync kernels' loop (`PF_BN`).
const BLOCK_N: usize = 64;
/// Keys per tile of the wgmma kernel (`PW_BN`).
const WGMMA_BLOCK_N: usize = 128;

/// Which prefill attention kernel runs. Both compute the same function; `Wgmma` (warpgroup MMA,
/// sm_90a) is the default, `Mma` (mma.sync, M128 / M64 tiles) is kept as a second
/// implementation to compare against and to fall back to: the CUDA backend reads
/// `DSV2_PREFILL_KERNEL` (`wgmma` or `mma`) into its config and passes it to
/// [`PrefillPlan::for_kernel`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrefillKernel {
    #[default]
    Wgmma,
    /// The wgmma kernel launched persistent (`wgmma-persist`): a CTA per SM walks the (tile,
    /// head) items and loads the next item's Q and first K tile behind the current one's end.
    WgmmaPersist,
    /// Warp-specialised (`ws`, mla_prefill_ws.cu): a TMA producer warpgroup and two consumer
    /// warpgroups taking turns at the tensor cores, persistent. Opt-in until measured.
    Ws,
    Mma,
}

impl PrefillKernel {
    /// The environment variable a binary reads the choice from.
    pub const ENV: &'static str = "DSV2_PREFILL_KERNEL";

    /// `wgmma` (or empty), `wgmma-persist`, `ws` or `mma`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "" | "wgmma" => Ok(PrefillKernel::Wgmma),
            "wgmma-persist" => Ok(PrefillKernel::WgmmaPersist),
            "ws" => Ok(PrefillKernel::Ws),
            "mma" => Ok(PrefillKernel::Mma),
            other => Err(KernelError::Unsupported {
                op: "mla_prefill",
                what: format!(
                    "{}={other:?} (expected \"wgmma\", \"wgmma-persist\", \"ws\" or \"mma\")",
                    Self::ENV
                ),
            }),
        }
    }

    /// The tile this kernel runs `seqs` with: the wgmma kernel has one; for mma.sync, M128 (K/V
    /// tiles shared by twice the rows) unless M64 pads over 10 % less.
    pub fn tile_for(self, seqs: &[PrefillSeq]) -> PrefillTile {
        match self {
            PrefillKernel::Wgmma => PrefillTile::Wgmma128,
            PrefillKernel::WgmmaPersist => PrefillTile::Wgmma128Persist,
            PrefillKernel::Ws => PrefillTile::Ws128,
            PrefillKernel::Mma => {
                let work = |t: PrefillTile| {
                    seqs.iter()
                        .map(|s| t.padded_work(s.q_len, s.pos0))
                        .sum::<usize>()
                };
                if work(PrefillTile::M64) * 10 < work(PrefillTile::M128) * 9 {
                    PrefillTile::M64
                } else {
                    PrefillTile::M128
                }
            }
        }
    }
}

/// One compiled kernel and its query rows per CTA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillTile {
    /// `mla_prefill_wgmma_bf16`: 128 rows (two warpgroups of 64), 128-key tiles, 209 KiB of
    /// shared memory, one CTA per SM.
    Wgmma128,
    /// `mla_prefill_wgmma_persist_bf16`: the same tile, one CTA per SM walking the (tile, head)
    /// items, the next item's Q and K_0 loaded behind the current item's end.
    Wgmma128Persist,
    /// `mla_prefill_ws_bf16`: the same tile, warp-specialised (TMA producer, two consumer
    /// warpgroups in turns), 384 threads, one CTA per SM walking the (tile, head) items.
    Ws128,
    /// mma.sync, 128 rows, 8 warps, 128 KiB of shared memory, one CTA per SM.
    M128,
    /// mma.sync, 64 rows, 4 warps, 104 KiB, two CTAs per SM: less padding on short chunks.
    M64,
}

impl PrefillTile {
    pub fn rows(self) -> usize {
        match self {
            PrefillTile::Wgmma128
            | PrefillTile::Wgmma128Persist
            | PrefillTile::Ws128
            | PrefillTile::M128 => 128,
            PrefillTile::M64 => 64,
        }
    }

    pub fn kernel(self) -> PrefillKernel {
        match self {
            PrefillTile::Wgmma128 => PrefillKernel::Wgmma,
            PrefillTile::Wgmma128Persist => PrefillKernel::WgmmaPersist,
            PrefillTile::Ws128 => PrefillKernel::Ws,
            PrefillTile::M128 | PrefillTile::M64 => PrefillKernel::Mma,
        }
    }

    /// The CUDA function (also the name of its check rows).
    pub fn function(self) -> &'static str {
        match self {
            PrefillTile::Wgmma128 => "mla_prefill_wgmma_bf16",
            PrefillTile::Wgmma128Persist => "mla_prefill_wgmma_persist_bf16",
            PrefillTile::Ws128 => "mla_prefill_ws_bf16",
            PrefillTile::M128 => "mla_prefill_m128_bf16",
            PrefillTile::M64 => "mla_prefill_m64_bf16",
        }
    }

    /// Dynamic shared memory. mma.sync (`PfSmem<WARPS>::BYTES` in mla_prefill.cu): the Q tile
    /// and two stages of K (64 x 192) and V (64 x 128) tiles, bf16. wgmma (`PW_BYTES` + 1024 for
    /// the kernel's 1024-byte alignment): Q (128 x 192) and two stages of K (128 x 192) and V
    /// (128 x 128).
    pub fn smem_bytes(self) -> usize {
        let qk = QK_NOPE + QK_ROPE;
        match self {
            PrefillTile::Wgmma128 | PrefillTile::Wgmma128Persist => {
                (128 * qk + 2 * WGMMA_BLOCK_N * qk + 2 * WGMMA_BLOCK_N * V_HEAD) * 2 + 1024
            }
            // PS_BYTES: the same operands, then 128 bytes of mbarriers
            PrefillTile::Ws128 => {
                (128 * qk + 2 * WGMMA_BLOCK_N * qk + 2 * WGMMA_BLOCK_N * V_HEAD) * 2 + 128 + 1024
            }
            PrefillTile::M128 | PrefillTile::M64 => {
                (self.rows() * qk + 2 * BLOCK_N * qk + 2 * BLOCK_N * V_HEAD) * 2
            }
        }
    }

    fn threads(self) -> u32 {
        match self {
            PrefillTile::Wgmma128 | PrefillTile::Wgmma128Persist => 256,
            PrefillTile::Ws128 => 384,
            PrefillTile::M128 | PrefillTile::M64 => (self.rows() / 16 * 32) as u32,
        }
    }

    /// Shared-memory-slot time the sequence's CTAs take, in (16 rows x 64 keys) blocks: every
    /// CTA holds its SM share for `rows` rows over all the key tiles it loads, whether or not all
    /// its warps have rows there (a 7-row chunk leaves 7 of 8 warps of an M128 CTA idle).
    fn padded_work(self, q_len: usize, pos0: usize) -> usize {
        (0..q_len)
            .step_by(self.rows())
            .map(|m0| self.rows() / 16 * (pos0 + (m0 + self.rows()).min(q_len)).div_ceil(BLOCK_N))
            .sum()
    }
}

/// One sequence's share of a prefill launch: query rows `q_row0 .. q_row0 + q_len` of q / out at
/// positions `pos0 ..`, its context (positions `0 .. pos0 + q_len`) at rows `ctx_row0 ..` of the
/// gathered latent and the decompressed K/V.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillSeq {
    pub q_row0: usize,
    pub q_len: usize,
    pub pos0: usize,
    pub ctx_row0: usize,
}

/// The host side of one launch: the descriptors and the tile list the kernel reads (upload
/// `seqs` and `tiles` as they are), plus the sizes the launcher checks the operands against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefillPlan {
    pub tile: PrefillTile,
    /// [S, 4] i32: q_row0, q_len, pos0, ctx_row0 per sequence.
    pub seqs: Vec<i32>,
    /// [tiles, 2] i32: sequence index, first query of the tile; longest causal window first, so
    /// the tail of the launch is made of short tiles.
    pub tiles: Vec<i32>,
    /// Query rows of q / out the plan reaches (max q_row0 + q_len).
    pub q_rows: usize,
    /// Context rows the plan reaches (max ctx_row0 + pos0 + q_len).
    pub ctx_rows: usize,
    /// Causal (query, key) pairs: sum over sequences of q_len * pos0 + q_len (q_len + 1) / 2.
    pub pairs: u64,
}

impl PrefillPlan {
    /// The plan of `kernel` for `seqs` (its tile chosen by [`PrefillKernel::tile_for`]).
    pub fn for_kernel(seqs: &[PrefillSeq], kernel: PrefillKernel) -> Result<Self> {
        Self::new(seqs, Some(kernel.tile_for(seqs)))
    }

    /// `tile` None: the default kernel's ([`PrefillKernel::default`], wgmma).
    pub fn new(seqs: &[PrefillSeq], tile: Option<PrefillTile>) -> Result<Self> {
        const OP: &str = "mla_prefill plan";
        let tile = tile.unwrap_or_else(|| PrefillKernel::default().tile_for(seqs));
        let (mut q_rows, mut ctx_rows, mut pairs) = (0usize, 0usize, 0u64);
        let mut desc = Vec::with_capacity(seqs.len() * 4);
        let mut tiles: Vec<(usize, i32, i32)> = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            let ctx = s.pos0 + s.q_len;
            for (what, v) in [
                ("q_row0 + q_len", s.q_row0 + s.q_len),
                ("ctx_row0 + context", s.ctx_row0 + ctx),
            ] {
                dim_i32(OP, what, v)?;
            }
            desc.extend([s.q_row0, s.q_len, s.pos0, s.ctx_row0].map(|v| v as i32));
            if s.q_len == 0 {
                continue;
            }
            q_rows = q_rows.max(s.q_row0 + s.q_len);
            ctx_rows = ctx_rows.max(s.ctx_row0 + ctx);
            let l = s.q_len as u64;
            pairs += l * s.pos0 as u64 + l * (l + 1) / 2;
            for m0 in (0..s.q_len).step_by(tile.rows()) {
                let keys = s.pos0 + (m0 + tile.rows()).min(s.q_len);
                tiles.push((keys, i as i32, m0 as i32));
            }
        }
        // stable: equal windows keep sequence order
        tiles.sort_by_key(|t| std::cmp::Reverse(t.0));
        dim_i32(OP, "tiles", tiles.len())?;
        Ok(Self {
            tile,
            seqs: desc,
            tiles: tiles.iter().flat_map(|t| [t.1, t.2]).collect(),
            q_rows,
            ctx_rows,
            pairs,
        })
    }

    pub fn n_seqs(&self) -> usize {
        self.seqs.len() / 4
    }

    pub fn n_tiles(&self) -> usize {
        self.tiles.len() / 2
    }
}

/// Causal MLA prefill attention over decompressed K/V for every sequence of a plan:
/// `out[q_row0+i, h] = sum_{p <= pos0+i} softmax_p(scale * q[q_row0+i, h]·[k_nope[c+p, h] | k_pe[c+p]]) v[c+p, h]`
/// with c = ctx_row0 of the sequence.
/// q [n, H, 192] (RoPE applied to its last 64), k_nope [T, H, 128], k_pe [T, 64] (shared by the
/// heads), v [T, H, 128], out [n, H, 128]: bf16, unit last stride, other strides multiples of 8
/// elements and 16-byte aligned rows (slices of one kv [T, H, 256] and of the latent [T, 576] are
/// what the backend passes). seqs i32 [S, 4] and tiles i32 [tiles, 2] are `plan.seqs` and
/// `plan.tiles` on the device; the kernel skips a tile whose descriptor does not fit n / T, so a
/// stale upload gives wrong rows, never an out-of-bounds access. Rows of out that no sequence
/// covers are not written.
pub struct MlaPrefillParams<'a> {
    pub q: View<'a, bf16>,
    pub k_nope: View<'a, bf16>,
    pub k_pe: View<'a, bf16>,
    pub v: View<'a, bf16>,
    pub out: ViewMut<'a, bf16>,
    pub plan: &'a PrefillPlan,
    pub seqs: View<'a, i32>,
    pub tiles: View<'a, i32>,
    pub scale: f32,
}

/// (row stride, head stride) of a [rows, H, d] operand (or (row stride, 0) of a [rows, d] one)
/// whose rows the kernel reads as 16-byte pieces: unit last stride, strides multiples of 8,
/// 16-byte aligned base.
fn strides16<T: DType>(
    op: &'static str,
    name: &'static str,
    shape: &[usize],
    strides: &[usize],
    ptr: u64,
    want: &[Option<usize>],
) -> Result<(i64, i64)> {
    let dims_ok = shape.len() == want.len()
        && want
            .iter()
            .zip(shape)
            .all(|(w, s)| w.is_none_or(|w| w == *s));
    if !dims_ok {
        return Err(shape_err(
            op,
            format!(
                "{name} ({}) has shape {shape:?}, expected {want:?}",
                T::NAME
            ),
        ));
    }
    let n = strides.len();
    if strides[n - 1] != 1
        || strides[..n - 1].iter().any(|s| !s.is_multiple_of(8))
        || !ptr.is_multiple_of(16)
    {
        return Err(KernelError::NotContiguous {
            op,
            tensor: name,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
        });
    }
    Ok((
        strides[0] as i64,
        if n == 3 { strides[1] as i64 } else { 0 },
    ))
}

pub fn mla_prefill(gpu: &Gpu, p: MlaPrefillParams<'_>) -> Result<()> {
    const OP: &str = "mla_prefill_bf16";
    let qk = QK_NOPE + QK_ROPE;
    let (n, heads) = (
        p.q.shape().first().copied().unwrap_or(0),
        p.q.shape().get(1).copied().unwrap_or(0),
    );
    let t = p.k_pe.shape().first().copied().unwrap_or(0);
    let (q_rs, q_hs) = strides16::<bf16>(
        OP,
        "q",
        p.q.shape(),
        p.q.strides(),
        p.q.ptr(),
        &[None, None, Some(qk)],
    )?;
    let (kn_rs, kn_hs) = strides16::<bf16>(
        OP,
        "k_nope",
        p.k_nope.shape(),
        p.k_nope.strides(),
        p.k_nope.ptr(),
        &[Some(t), Some(heads), Some(QK_NOPE)],
    )?;
    let (kp_rs, _) = strides16::<bf16>(
        OP,
        "k_pe",
        p.k_pe.shape(),
        p.k_pe.strides(),
        p.k_pe.ptr(),
        &[Some(t), Some(QK_ROPE)],
    )?;
    let (v_rs, v_hs) = strides16::<bf16>(
        OP,
        "v",
        p.v.shape(),
        p.v.strides(),
        p.v.ptr(),
        &[Some(t), Some(heads), Some(V_HEAD)],
    )?;
    let (o_rs, o_hs) = strides16::<bf16>(
        OP,
        "out",
        p.out.shape(),
        p.out.strides(),
        p.out.ptr(),
        &[Some(n), Some(heads), Some(V_HEAD)],
    )?;
    let plan = p.plan;
    p.seqs.expect(OP, "seqs", &[Some(plan.n_seqs()), Some(4)])?;
    p.tiles
        .expect(OP, "tiles", &[Some(plan.n_tiles()), Some(2)])?;
    if plan.q_rows > n || plan.ctx_rows > t {
        return Err(shape_err(
            OP,
            format!(
                "the plan reaches query row {} and context row {} of q [{n}, ..] and K/V [{t}, ..]",
                plan.q_rows, plan.ctx_rows
            ),
        ));
    }
    if plan.n_tiles() == 0 || heads == 0 {
        return Ok(());
    }
    if heads > 65535 {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("{heads} heads > 65535 (grid y)"),
        });
    }
    let tile = plan.tile;
    let smem = tile.smem_bytes();
    gpu.set_max_dynamic_smem(tile.function(), smem)?;
    if tile == PrefillTile::Ws128 {
        let ws = WsOperands {
            q: (p.q.ptr(), q_rs, q_hs),
            k_nope: (p.k_nope.ptr(), kn_rs, kn_hs),
            k_pe: (p.k_pe.ptr(), kp_rs),
            v: (p.v.ptr(), v_rs, v_hs),
            out: (p.out.ptr(), o_rs, o_hs),
            n,
            t,
            heads,
        };
        return launch_ws(gpu, &ws, &p, smem);
    }
    let (qp, knp, kpp, vp, op, sp, tp) = (
        p.q.ptr(),
        p.k_nope.ptr(),
        p.k_pe.ptr(),
        p.v.ptr(),
        p.out.ptr(),
        p.seqs.ptr(),
        p.tiles.ptr(),
    );
    let n_seqs = dim_i32(OP, "sequences", plan.n_seqs())?;
    let (nq, nctx) = (n as i64, t as i64);
    let scale = p.scale;
    let f = gpu.function(tile.function())?;
    let mut b = gpu.launch(f);
    b.arg(&qp).arg(&q_rs).arg(&q_hs);
    b.arg(&knp).arg(&kn_rs).arg(&kn_hs);
    b.arg(&kpp).arg(&kp_rs);
    b.arg(&vp).arg(&v_rs).arg(&v_hs);
    b.arg(&op).arg(&o_rs).arg(&o_hs);
    b.arg(&sp)
        .arg(&n_seqs)
        .arg(&tp)
        .arg(&nq)
        .arg(&nctx)
        .arg(&scale);
    let (n_tiles_i, heads_i) = (
        dim_i32(OP, "tiles", plan.n_tiles())?,
        dim_i32(OP, "heads", heads)?,
    );
    let grid_dim = if tile == PrefillTile::Wgmma128Persist {
        b.arg(&n_tiles_i).arg(&heads_i);
        (persistent_ctas(plan.n_tiles(), heads, gpu.sm_count)?, 1, 1)
    } else {
        (plan.n_tiles() as u32, heads as u32, 1)
    };
    let cfg = LaunchConfig {
        grid_dim,
        block_dim: (tile.threads(), 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: matches mla_prefill_{m128,m64,wgmma}_bf16(PF_ARGS) and, for the persistent tile,
    // mla_prefill_wgmma_persist_bf16(PF_ARGS, n_tiles, heads); every operand's shape, strides
    // and 16-byte alignment were checked above against (n, H, T); seqs / tiles hold n_seqs x
    // int4 and n_tiles x int2 (shape-checked, contiguous i32, 16- and 8-byte aligned as cudarc
    // allocations are), and the kernel skips any descriptor that does not fit n and T.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// The operands of a [`PrefillTile::Ws128`] launch after mla_prefill's checks: (address, row
/// stride[, head stride]) in elements, and the query rows, context rows and heads.
struct WsOperands {
    q: (u64, i64, i64),
    k_nope: (u64, i64, i64),
    k_pe: (u64, i64),
    v: (u64, i64, i64),
    out: (u64, i64, i64),
    n: usize,
    t: usize,
    heads: usize,
}

/// The warp-specialised kernel: q, k_nope, k_pe and v through TMA maps (boxes of 128 rows x 64
/// columns, one head), out, the plan's descriptors and the (tile, head) item count; persistent.
fn launch_ws(gpu: &Gpu, w: &WsOperands, p: &MlaPrefillParams<'_>, smem: usize) -> Result<()> {
    const OP: &str = "mla_prefill_ws_bf16";
    use super::tma::{encode_bf16_2d_strided, encode_bf16_3d};
    // [rows, H, cols] at (row, head) strides, in boxes of 128 rows x 64 columns of one head
    let head_map = |(addr, rs, hs): (u64, i64, i64), rows: usize, cols: usize| {
        encode_bf16_3d(
            OP,
            addr,
            rows.max(1),
            w.heads,
            cols,
            rs as usize,
            hs as usize,
            128,
        )
    };
    let q_map = head_map(w.q, w.n, QK_NOPE + QK_ROPE)?;
    let kn_map = head_map(w.k_nope, w.t, QK_NOPE)?;
    let v_map = head_map(w.v, w.t, V_HEAD)?;
    // k_pe [T, 64] with row stride kp_rs: a 2-D map whose row pitch is the stride
    let kpe_map = encode_bf16_2d_strided(
        OP,
        w.k_pe.0,
        w.t.max(1),
        QK_ROPE,
        w.k_pe.1 as usize,
        64,
        128,
    )?;
    let plan = p.plan;
    let (sp, tp) = (p.seqs.ptr(), p.tiles.ptr());
    let n_seqs = dim_i32(OP, "sequences", plan.n_seqs())?;
    let (nq, nctx) = (w.n as i64, w.t as i64);
    let (n_tiles, heads) = (
        dim_i32(OP, "tiles", plan.n_tiles())?,
        dim_i32(OP, "heads", w.heads)?,
    );
    let scale = p.scale;
    let f = gpu.function(PrefillTile::Ws128.function())?;
    let mut b = gpu.launch(f);
    b.arg(&q_map).arg(&kn_map).arg(&kpe_map).arg(&v_map);
    b.arg(&w.out.0).arg(&w.out.1).arg(&w.out.2);
    b.arg(&sp)
        .arg(&n_seqs)
        .arg(&tp)
        .arg(&nq)
        .arg(&nctx)
        .arg(&scale)
        .arg(&n_tiles)
        .arg(&heads);
    let cfg = LaunchConfig {
        grid_dim: (
            persistent_ctas(plan.n_tiles(), w.heads, gpu.sm_count)?,
            1,
            1,
        ),
        block_dim: (PrefillTile::Ws128.threads(), 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: matches mla_prefill_ws_bf16(q_map, kn_map, kpe_map, v_map, out, o_rs, o_hs, seqs,
    // n_seqs, tiles, n_q, n_ctx, scale, n_tiles, n_heads); the maps cover the operands whose
    // shapes, strides and alignment mla_prefill checked (TMA zero-fills past them); out [n, H,
    // 128] at its strides; seqs / tiles as for the other tiles, and the kernel skips any
    // descriptor that does not fit n and T.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// The grid of the persistent prefill kernel: one CTA per SM (209 KiB of shared memory each),
/// at most one per (tile, head) item. The kernel steps item indices by the grid in i32, so the
/// items and one more grid's worth must fit.
fn persistent_ctas(n_tiles: usize, heads: usize, sm_count: usize) -> Result<u32> {
    let items = n_tiles.saturating_mul(heads);
    let ctas = items.min(sm_count.max(1));
    if items.saturating_add(ctas) > i32::MAX as usize {
        return Err(shape_err(
            "mla_prefill_bf16",
            format!("{n_tiles} tiles x {heads} heads: too many (tile, head) items"),
        ));
    }
    Ok(ctas as u32)
}

/// K/V decompression for prefill: `kv[T, H*(dn+dv)] = lat[:, :kv_lora] · kv_bᵀ`.
/// lat [T, width >= kv_lora] (row-major with any row stride, unit last stride: the gathered
/// latent rows, whose rope columns are skipped), kv_b [H*(dn+dv), kv_lora] (the checkpoint's
/// kv_b_proj), kv [T, H*(dn+dv)] or [T, H, dn+dv] contiguous. bf16, f32 accumulation (cuBLAS).
pub struct DecompressParams<'a> {
    pub lat: View<'a, bf16>,
    pub kv_lora: usize,
    pub kv_b: View<'a, bf16>,
    pub kv: ViewMut<'a, bf16>,
}

pub fn decompress_kv(gpu: &Gpu, p: DecompressParams<'_>) -> Result<()> {
    const OP: &str = "decompress_kv (cuBLAS)";
    if p.lat.shape().len() != 2 || p.lat.strides()[1] != 1 || p.lat.shape()[1] < p.kv_lora {
        return Err(shape_err(
            OP,
            format!(
                "lat is {:?} with strides {:?}: expected [T, >= {}] with unit last stride",
                p.lat.shape(),
                p.lat.strides(),
                p.kv_lora
            ),
        ));
    }
    let (t, ldx) = (p.lat.shape()[0], p.lat.strides()[0]);
    p.kv_b.expect(OP, "kv_b", &[None, Some(p.kv_lora)])?;
    let nout = p.kv_b.shape()[0];
    if p.kv.shape().first() != Some(&t)
        || p.kv.shape().iter().product::<usize>() != t * nout
        || !p.kv.is_contiguous()
    {
        return Err(shape_err(
            OP,
            format!(
                "kv is {:?}: expected {t} contiguous rows of {nout}",
                p.kv.shape()
            ),
        ));
    }
    if t == 0 || nout == 0 {
        return Ok(());
    }
    let (m, n, k, lda) = (
        dim_i32(OP, "T", t)?,
        dim_i32(OP, "H*(dn+dv)", nout)?,
        dim_i32(OP, "kv_lora", p.kv_lora)?,
        dim_i32(OP, "lat row stride", ldx)?,
    );
    let (alpha, beta) = (1f32, 0f32);
    // Column-major view: kvᵀ [N, T] = kv_b [N, K] (K x N col-major, op T) · latᵀ (K x T col-major
    // with leading dim = lat's row stride, op N).
    // SAFETY: lat holds T rows of >= kv_lora values at row stride lda, kv_b N x K and kv T x N
    // contiguous (all checked above) and borrowed for the call; alpha / beta are f32 as
    // COMPUTE_32F requires; the handle runs on gpu.stream, after the producers of lat and kv_b.
    unsafe {
        blas::gemm_ex(
            *gpu.blas.handle(),
            bsys::cublasOperation_t::CUBLAS_OP_T,
            bsys::cublasOperation_t::CUBLAS_OP_N,
            n,
            m,
            k,
            (&alpha) as *const f32 as *const _,
            p.kv_b.ptr() as *const _,
            bsys::cudaDataType::CUDA_R_16BF,
            k,
            p.lat.ptr() as *const _,
            bsys::cudaDataType::CUDA_R_16BF,
            lda,
            (&beta) as *const f32 as *const _,
            p.kv.ptr() as *mut _,
            bsys::cudaDataType::CUDA_R_16BF,
            n,
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )?;
    }
    Ok(())
}

/// `dst[idx[i]] = src[i]` row by row: src [n, ..] and dst [rows, ..] contiguous bf16 with the
/// same row width (a multiple of 8), idx i32 [n]; indices outside 0..rows are skipped. Puts the
/// absorbed rows of a mixed step, computed packed, back in the step's row order.
pub struct ScatterRowsParams<'a> {
    pub src: View<'a, bf16>,
    pub idx: View<'a, i32>,
    pub dst: ViewMut<'a, bf16>,
}

pub fn scatter_rows(gpu: &Gpu, p: ScatterRowsParams<'_>) -> Result<()> {
    const OP: &str = "scatter_rows_bf16";
    let row_dims = |s: &[usize]| s.iter().skip(1).product::<usize>();
    let (n, width) = (
        p.src.shape().first().copied().unwrap_or(0),
        row_dims(p.src.shape()),
    );
    let rows = p.dst.shape().first().copied().unwrap_or(0);
    if !p.src.is_contiguous() || !p.dst.is_contiguous() || row_dims(p.dst.shape()) != width {
        return Err(shape_err(
            OP,
            format!(
                "src {:?} and dst {:?} must be contiguous with equal rows",
                p.src.shape(),
                p.dst.shape()
            ),
        ));
    }
    p.idx.expect(OP, "idx", &[Some(n)])?;
    if !width.is_multiple_of(8) {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("row width {width} is not a multiple of 8"),
        });
    }
    if n == 0 || width == 0 {
        return Ok(());
    }
    let (s, i, d) = (p.src.ptr(), p.idx.ptr(), p.dst.ptr());
    let (ni, ri, wi) = (
        dim_i32(OP, "n", n)?,
        dim_i32(OP, "rows", rows)?,
        dim_i32(OP, "width", width)?,
    );
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&s).arg(&i).arg(&d).arg(&ni).arg(&ri).arg(&wi);
    // SAFETY: matches scatter_rows_bf16; src holds n rows and dst `rows` rows of `width`
    // contiguous values (checked above); the kernel skips indices outside 0..rows.
    unsafe { b.launch(super::per_row(n, 128)) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(q_row0: usize, q_len: usize, pos0: usize, ctx_row0: usize) -> PrefillSeq {
        PrefillSeq {
            q_row0,
            q_len,
            pos0,
            ctx_row0,
        }
    }

    #[test]
    fn plan_covers_every_query_once_longest_window_first() {
        let seqs = [
            seq(0, 130, 3584, 0),
            seq(133, 7, 5, 3714),
            seq(140, 0, 9, 3726),
        ];
        let p = PrefillPlan::new(&seqs, Some(PrefillTile::M64)).unwrap();
        assert_eq!(p.n_seqs(), 3);
        // 130 rows -> tiles at 0, 64, 128; 7 rows -> one tile; the empty sequence none
        assert_eq!(p.tiles, vec![0, 128, 0, 64, 0, 0, 1, 0]);
        assert_eq!((p.q_rows, p.ctx_rows), (140, 3726));
        assert_eq!(p.pairs, 130 * 3584 + 130 * 131 / 2 + 7 * 5 + 28);
        assert_eq!(&p.seqs[4..8], &[133, 7, 5, 3714]);
    }

    #[test]
    fn mma_tile_choice_prefers_short_tiles_only_where_they_save_work() {
        let mma = |seqs: &[PrefillSeq]| {
            PrefillPlan::for_kernel(seqs, PrefillKernel::Mma)
                .unwrap()
                .tile
        };
        assert_eq!(mma(&[seq(0, 4096, 0, 0)]), PrefillTile::M128);
        let short: Vec<PrefillSeq> = (0..64).map(|i| seq(i * 40, 40, 0, i * 40)).collect();
        assert_eq!(mma(&short), PrefillTile::M64);
    }

    #[test]
    fn default_plan_is_the_wgmma_kernel_with_128_row_tiles() {
        let seqs = [seq(0, 130, 3584, 0), seq(133, 7, 5, 3714)];
        let p = PrefillPlan::new(&seqs, None).unwrap();
        assert_eq!(p.tile, PrefillTile::Wgmma128);
        assert_eq!(p.tile.kernel(), PrefillKernel::Wgmma);
        assert_eq!(
            p,
            PrefillPlan::for_kernel(&seqs, PrefillKernel::Wgmma).unwrap()
        );
        // 130 rows -> tiles at 0 and 128, 7 rows -> one
        assert_eq!(p.tiles, vec![0, 128, 0, 0, 1, 0]);
    }

    #[test]
    fn the_persistent_grid_is_one_cta_per_sm_and_stays_within_i32() {
        // 64 x 512: 4 tiles a sequence x 64 sequences x 128 heads, on 132 SMs
        assert_eq!(persistent_ctas(256, 128, 132).ok(), Some(132));
        // fewer items than SMs: one CTA an item
        assert_eq!(persistent_ctas(3, 16, 132).ok(), Some(48));
        assert_eq!(persistent_ctas(1, 1, 0).ok(), Some(1));
        assert!(persistent_ctas(1 << 20, 1 << 11, 132).is_err());
        assert!(persistent_ctas(usize::MAX, 2, 132).is_err());
    }

    #[test]
    fn kernel_names_parse() {
        assert_eq!(PrefillKernel::parse("").ok(), Some(PrefillKernel::Wgmma));
        assert_eq!(
            PrefillKernel::parse("wgmma").ok(),
            Some(PrefillKernel::Wgmma)
        );
        assert_eq!(PrefillKernel::parse("mma").ok(), Some(PrefillKernel::Mma));
        assert_eq!(
            PrefillKernel::parse("wgmma-persist").ok(),
            Some(PrefillKernel::WgmmaPersist)
        );
        let persist = PrefillKernel::WgmmaPersist.tile_for(&[]);
        assert_eq!(persist, PrefillTile::Wgmma128Persist);
        assert_eq!(persist.kernel(), PrefillKernel::WgmmaPersist);
        assert_eq!(persist.smem_bytes(), PrefillTile::Wgmma128.smem_bytes());
        let ws = PrefillKernel::parse("ws").ok().map(|k| k.tile_for(&[]));
        assert_eq!(ws, Some(PrefillTile::Ws128));
        assert_eq!(PrefillTile::Ws128.kernel(), PrefillKernel::Ws);
        let err = PrefillKernel::parse("flash").err().map(|e| e.to_string());
        let msg = err.unwrap_or_default();
        assert!(
            msg.contains("DSV2_PREFILL_KERNEL") && msg.contains("mma"),
            "{msg}"
        );
    }

    #[test]
    fn smem_matches_the_kernel() {
        assert_eq!(PrefillTile::M128.smem_bytes(), 128 * 1024);
        assert_eq!(PrefillTile::M64.smem_bytes(), 104 * 1024);
        // PW_BYTES (208 KiB) + 1 KiB of alignment slack, within the 227 KiB an H100 CTA may use
        assert_eq!(PrefillTile::Wgmma128.smem_bytes(), 209 * 1024);
        assert!(PrefillTile::Wgmma128.smem_bytes() <= 227 * 1024);
        // PS_BYTES in mla_prefill_ws.cu: the same operands, 128 bytes of mbarriers, the slack
        assert_eq!(PrefillTile::Ws128.smem_bytes(), 209 * 1024 + 128);
        assert!(PrefillTile::Ws128.smem_bytes() <= 227 * 1024);
        assert_eq!(PrefillTile::Ws128.threads(), 384);
    }

    /// Every prefill function name is a kernel of the embedded sources.
    #[test]
    fn prefill_kernels_exist_in_the_source() {
        for tile in [
            PrefillTile::Wgmma128,
            PrefillTile::Wgmma128Persist,
            PrefillTile::Ws128,
            PrefillTile::M128,
            PrefillTile::M64,
        ] {
            let found = crate::compile::SOURCES.iter().any(|(_, src)| {
                crate::device::kernel_names(src)
                    .iter()
                    .any(|n| n == tile.function())
            });
            assert!(found, "{}", tile.function());
        }
    }
}
