//! Launchers for mla.cu: decode attention over the paged latent cache (absorbed weights) and the
//! cache append.

use cudarc::driver::LaunchConfig;
use half::bf16;

use super::dim_i32;
use super::tma::{TmaMap2d, encode_bf16_2d, encode_u8_2d};
use crate::device::Gpu;
use crate::error::{KernelError, Result, shape_err};
use crate::tensor::{Tensor, View, ViewMut};

/// Latent width (c_kv) of DeepSeek-V2's MLA cache.
pub const KV_LORA: usize = 512;
/// Shared RoPE key width.
pub const ROPE: usize = 64;
/// Values per cached token.
pub const CACHE_DIM: usize = KV_LORA + ROPE;
const HEADS_PER_CTA: usize = 64;
/// Most context splits per sequence: the combine kernel keeps one weight per split in shared
/// memory (`COMBINE_MAX_SPLITS` in mla.cu).
const MAX_SPLITS: usize = 1024;
/// Shared memory of one `mla_decode_bf16` CTA (must match `MlaSmem` in mla.cu).
const MMA_SMEM_BYTES: usize =
    64 * 584 * 2 + 2 * 32 * 584 * 2 + 64 * 33 * 4 + 64 * 40 * 2 + 3 * 64 * 4;
/// Shared memory of one `mla_decode_wgmma_bf16` CTA: `WG_SMEM_BYTES` in mla.cu (Q, two cache
/// tiles, P, reduction scratch) plus 1 KiB so the kernel can align its operands to 1024 bytes.
const WGMMA_SMEM_BYTES: usize = 3 * 64 * 576 * 2 + 64 * 128 + 2 * 2 * 64 * 4 + 1024;

/// Shared memory of one `mla_decode_seesaw_bf16` CTA: `SS_BYTES` in mla_seesaw.cu (Q's latent
/// columns, two cache tiles, two P buffers, row state, 18 mbarriers) plus 1 KiB for alignment.
const SEESAW_SMEM_BYTES: usize = 8 * 8192 + 2 * 9 * 8192 + 2 * 8192 + 3 * 256 + 512 + 18 * 8 + 1024;
/// Shared memory of one `mla_decode_tma_bf16` CTA: `TM_BYTES` in mla_tma.cu (Q's latent columns,
/// two cache tiles, two P buffers, rescales and row sums, 18 chunk and 2 buffer mbarriers, 2
/// done-counters) plus 1 KiB for alignment.
const TMA_SMEM_BYTES: usize = 8 * 8192 + 2 * 9 * 8192 + 2 * 8192 + 2 * 512 + 20 * 8 + 2 * 4 + 1024;
/// Shared memory of one `mla_decode_roles_bf16` CTA: `MR_BYTES` in mla_roles.cu (three latent
/// tile buffers, two rope chunk buffers, Q's rope columns, P, Q's k-step 0, rescales, row maxima
/// and sums, 27 chunk mbarriers, the copies' arguments). No alignment slack: the kernel relies on
/// dynamic shared memory starting 1024-aligned (it traps otherwise). Q's other latent columns
/// live in registers there.
const ROLES_SMEM_BYTES: usize =
    3 * 8 * 8192 + 2 * 8192 + 8192 + 8192 + 2048 + 3 * 256 + 27 * 8 + 32;
// within the most dynamic shared memory a CTA may use on sm_90 (227 KiB)
/// Shared memory of one `mla_decode_narrow_bf16` CTA: `NR_BYTES` in mla_narrow.cu (two cache
/// tile stages, Q of 16 heads, P, column maxima, row sums, 20 mbarriers) plus 1 KiB for alignment.
const NARROW_SMEM_BYTES: usize = 2 * 9 * 8192 + 9 * 2048 + 2048 + 256 + 128 + 20 * 8 + 1024;
/// Query heads one `mla_decode_narrow_bf16` CTA takes.
const NARROW_HEADS: usize = 16;
const _: () = assert!(
    SEESAW_SMEM_BYTES <= 232_448
        && TMA_SMEM_BYTES <= 232_448
        && ROLES_SMEM_BYTES <= 232_448
        && NARROW_SMEM_BYTES <= 232_448
);

/// Which decode kernel runs. All compute the same function. `Tma` (TMA loads, fixed warpgroup
/// roles: one computes S and softmax while the other's P.V runs, mla_tma.cu), `Seesaw` (TMA loads,
/// the two warpgroups' softmax and tensor work interleaved over rounds of two tiles,
/// mla_seesaw.cu) and `Wgmma` (one phase after another) are the sm_90a kernels; `Mma` (mma.sync) is kept as a second implementation to compare
/// against and to fall back to (`DSV2_MLA_KERNEL=mma`) should a driver or GPU misbehave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlaKernel {
    /// `Tma` with the two head groups of a sequence (65..128 heads) launched as a cluster of two
    /// CTAs that share every tile's copies (multicast); the plain `Tma` kernel otherwise.
    TmaPair,
    Tma,
    /// Three warpgroups with one job each (S and softmax with Q in registers; P.V on either half
    /// of the latent columns) over three cache-tile buffers (mla_roles.cu).
    Roles,
    Seesaw,
    /// Few heads (DeepSeek-V2-Lite's 16): 16 heads a CTA with the tokens on wgmma's M side
    /// (S^T = K.Q^T, O^T = V^T.P^T), one math warpgroup and a producer warp feeding two TMA
    /// stages (mla_narrow.cu).
    Narrow,
    /// `Narrow` with P.V's A operand (V^T) loaded into registers by ldmatrix.trans instead of
    /// read as a transposed shared-memory operand (mla_narrow.cu's two forms of one product).
    NarrowRs,
    Wgmma,
    Mma,
}

impl MlaKernel {
    /// The kernel named by `DSV2_MLA_KERNEL`, or where it is unset the default for caches of
    /// `block_size`-token blocks read by `heads` query heads ([`MlaKernel::default_for`]). The
    /// variable is read once (every eager decode launch asks).
    pub fn from_env_for(heads: usize, block_size: usize) -> Result<Self> {
        static NAMED: std::sync::OnceLock<Option<std::result::Result<MlaKernel, String>>> =
            std::sync::OnceLock::new();
        let named = NAMED.get_or_init(|| {
            std::env::var("DSV2_MLA_KERNEL")
                .ok()
                .map(|v| Self::parse(&v).map_err(|e| e.to_string()))
        });
        match named {
            None => Ok(Self::default_for(heads, block_size)),
            Some(Ok(k)) => Ok(*k),
            Some(Err(what)) => Err(KernelError::Unsupported {
                op: "mla_decode",
                what: what.clone(),
            }),
        }
    }

    /// The default decode kernel: `TmaPair` for 65..=128 heads (DeepSeek-V2's 128) over cache
    /// blocks of a multiple of 64 tokens, `Wgmma` otherwise. The pair kernel copies whole
    /// 64-token tiles where blocks hold 64 tokens or more, but a tile of 16-token blocks takes 4
    /// TMA pieces: at 64-token blocks it ran at 0.507 of the roofline against wgmma's 0.462 (P1,
    /// batch 64 x 4096 x 128 heads) and the 4-layer V2 step at batch 64 x 4096 took 9.616 ms
    /// against 9.690; at the router's 16-token blocks it fell to 0.325 (wgmma 0.453) and its
    /// step to 10.185 ms against 9.782 (bench/RESULTS.md, session 17).
    pub fn default_for(heads: usize, block_size: usize) -> Self {
        if (65..=128).contains(&heads) && block_size > 0 && block_size.is_multiple_of(64) {
            MlaKernel::TmaPair
        } else {
            MlaKernel::Wgmma
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "" | "wgmma" => Ok(MlaKernel::Wgmma),
            "seesaw" => Ok(MlaKernel::Seesaw),
            "tma" => Ok(MlaKernel::Tma),
            "tma-pair" => Ok(MlaKernel::TmaPair),
            "roles" => Ok(MlaKernel::Roles),
            "narrow" => Ok(MlaKernel::Narrow),
            "narrow-rs" => Ok(MlaKernel::NarrowRs),
            "mma" => Ok(MlaKernel::Mma),
            other => Err(KernelError::Unsupported {
                op: "mla_decode",
                what: format!(
                    "DSV2_MLA_KERNEL={other:?} (expected \"wgmma\", \"tma\", \"tma-pair\", \"roles\", \"seesaw\", \"narrow\", \"narrow-rs\" or \"mma\")"
                ),
            }),
        }
    }

    /// Context tokens one CTA processes per step: splits are cut at multiples of it.
    pub fn tile_tokens(self) -> usize {
        match self {
            MlaKernel::TmaPair
            | MlaKernel::Tma
            | MlaKernel::Roles
            | MlaKernel::Seesaw
            | MlaKernel::Narrow
            | MlaKernel::NarrowRs
            | MlaKernel::Wgmma => 64,
            MlaKernel::Mma => 32,
        }
    }

    /// Query heads one CTA takes (the grid's x is the heads over this).
    pub fn heads_per_cta(self) -> usize {
        match self {
            MlaKernel::Narrow | MlaKernel::NarrowRs => NARROW_HEADS,
            _ => HEADS_PER_CTA,
        }
    }

    /// The kernel's function name in the CUDA sources.
    pub fn function(self) -> &'static str {
        match self {
            MlaKernel::TmaPair | MlaKernel::Tma => "mla_decode_tma_bf16",
            MlaKernel::Roles => "mla_decode_roles_bf16",
            MlaKernel::Seesaw => "mla_decode_seesaw_bf16",
            MlaKernel::Narrow => "mla_decode_narrow_bf16",
            MlaKernel::NarrowRs => "mla_decode_narrow_rs_bf16",
            MlaKernel::Wgmma => "mla_decode_wgmma_bf16",
            MlaKernel::Mma => "mla_decode_bf16",
        }
    }

    fn smem_bytes(self) -> usize {
        match self {
            MlaKernel::TmaPair | MlaKernel::Tma => TMA_SMEM_BYTES,
            MlaKernel::Roles => ROLES_SMEM_BYTES,
            MlaKernel::Seesaw => SEESAW_SMEM_BYTES,
            MlaKernel::Narrow | MlaKernel::NarrowRs => NARROW_SMEM_BYTES,
            MlaKernel::Wgmma => WGMMA_SMEM_BYTES,
            MlaKernel::Mma => MMA_SMEM_BYTES,
        }
    }

    /// Threads of one CTA.
    fn threads(self) -> u32 {
        match self {
            MlaKernel::Roles => 384,
            MlaKernel::Narrow | MlaKernel::NarrowRs => 160,
            MlaKernel::TmaPair
            | MlaKernel::Tma
            | MlaKernel::Seesaw
            | MlaKernel::Wgmma
            | MlaKernel::Mma => 256,
        }
    }

    /// Whether the kernel reads caches of this block size: the TMA kernels' pieces are
    /// min(block_size, 64) rows of one block, so 64 must be a multiple of the block size or the
    /// other way round, and at least 8 rows (a piece's box then starts on a whole 1024-byte
    /// swizzle atom, 8 rows of 128 B, as the 128-byte swizzle wants).
    pub fn supports_block_size(self, block_size: usize) -> bool {
        match self {
            MlaKernel::TmaPair
            | MlaKernel::Tma
            | MlaKernel::Roles
            | MlaKernel::Seesaw
            | MlaKernel::Narrow
            | MlaKernel::NarrowRs => {
                block_size >= 8
                    && (64usize.is_multiple_of(block_size) || block_size.is_multiple_of(64))
            }
            MlaKernel::Wgmma | MlaKernel::Mma => block_size > 0,
        }
    }
}

/// The split-KV partial outputs of one decode launch: f32 o_part [B, splits, H, 512] and lse
/// [B, splits, H] when the context is split (none for one split, where the decode kernel writes
/// `out` itself). lse is written for every split, o_part only for splits with tokens (the combine
/// reads no other).
struct SplitPartials {
    splits: usize,
    o_part: Option<Tensor<f32>>,
    lse: Option<Tensor<f32>>,
}

impl SplitPartials {
    fn new(gpu: &Gpu, batch: usize, splits: usize, heads: usize) -> Result<Self> {
        Self::alloc(gpu, batch, splits, heads, false)
    }

    /// `zeroed`: the partials start as zeros with lse 0 (every split read by the combine),
    /// else uninitialised (the decode kernel writes them).
    fn alloc(gpu: &Gpu, batch: usize, splits: usize, heads: usize, zeroed: bool) -> Result<Self> {
        let tensor = |shape: &[usize]| {
            if zeroed {
                Tensor::<f32>::zeros(gpu, shape)
            } else {
                Tensor::<f32>::uninit(gpu, shape)
            }
        };
        let (o_part, lse) = if splits > 1 {
            (
                Some(tensor(&[batch, splits, heads, KV_LORA])?),
                Some(tensor(&[batch, splits, heads])?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            splits,
            o_part,
            lse,
        })
    }

    /// Device addresses of o_part and lse (0 when there is one split).
    fn ptrs(&self) -> (u64, u64) {
        (
            self.o_part.as_ref().map(|t| t.ptr()).unwrap_or(0),
            self.lse.as_ref().map(|t| t.ptr()).unwrap_or(0),
        )
    }

    /// Enqueues `mla_combine_bf16` into `out` [B, H, 512] (bf16) when the context was split. The
    /// partials are freed in stream order after it (cudarc frees on the same stream).
    fn combine(self, gpu: &Gpu, out: u64, batch: usize, heads: usize) -> Result<()> {
        self.launch_combine(gpu, out, batch, heads)
    }

    fn launch_combine(&self, gpu: &Gpu, out: u64, batch: usize, heads: usize) -> Result<()> {
        if self.splits <= 1 {
            return Ok(());
        }
        let (op_ptr, lse_ptr) = self.ptrs();
        let h = dim_i32("mla_combine_bf16", "heads", heads)?;
        let si = self.splits as i32;
        let f = gpu.function("mla_combine_bf16")?;
        let mut b = gpu.launch(f);
        b.arg(&op_ptr).arg(&lse_ptr).arg(&out).arg(&h).arg(&si);
        let cfg = LaunchConfig {
            grid_dim: (batch as u32, heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches mla_combine_bf16(o_part, lse, out, heads, splits); 128 threads x 4 = 512;
        // o_part and lse hold batch*splits*heads*512 and batch*splits*heads f32.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// The combine with the value up-projection folded in (`mla_combine_uv_bf16`), or the plain
    /// combine into `out` when the context was not split or no projection is given: true when
    /// the projection's output was written (the caller projects `out` itself otherwise).
    fn finish(
        self,
        gpu: &Gpu,
        out: u64,
        uv: Option<ValueProjection<'_>>,
        batch: usize,
        heads: usize,
    ) -> Result<bool> {
        const OP: &str = "mla_combine_uv_bf16";
        let Some(uv) = uv.filter(|_| self.splits > 1) else {
            self.combine(gpu, out, batch, heads)?;
            return Ok(false);
        };
        let dn = uv.qk_nope;
        uv.kv_b.expect(OP, "kv_b", &[None, Some(KV_LORA)])?;
        uv.out
            .expect(OP, "out", &[Some(batch), Some(heads), None])?;
        let dv = uv.out.shape()[2];
        if uv.kv_b.shape()[0] != heads * (dn + dv) {
            return Err(shape_err(
                OP,
                format!(
                    "kv_b {:?} for {heads} heads of {dn} + {dv}",
                    uv.kv_b.shape()
                ),
            ));
        }
        if !uv.kv_b.ptr().is_multiple_of(16) {
            // the kernel streams W_UV's rows 16 bytes at a time
            return Err(shape_err(OP, "kv_b is not 16-byte aligned"));
        }
        let (op_ptr, lse_ptr) = self.ptrs();
        let w_uv = uv.kv_b.ptr() + (dn * KV_LORA * 2) as u64;
        let w_head = ((dn + dv) * KV_LORA) as i64;
        let o = uv.out.ptr();
        let (h, si, dvi) = (
            dim_i32(OP, "heads", heads)?,
            self.splits as i32,
            dim_i32(OP, "v_head_dim", dv)?,
        );
        let f = gpu.function(OP)?;
        let mut b = gpu.launch(f);
        b.arg(&op_ptr)
            .arg(&lse_ptr)
            .arg(&w_uv)
            .arg(&w_head)
            .arg(&o)
            .arg(&h)
            .arg(&si)
            .arg(&dvi);
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(batch * heads)
                    .map_err(|_| shape_err(OP, format!("{batch} x {heads} rows")))?,
                dv.div_ceil(UV_COLS) as u32,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches mla_combine_uv_bf16(o_part, lse, w_uv, w_head, out, heads, splits, dv);
        // o_part and lse hold batch*splits*heads*512 and batch*splits*heads f32; kv_b is
        // [heads*(dn+dv), 512] (checked), so head h's value rows end inside it; out [B, H, dv].
        unsafe { b.launch(cfg) }?;
        Ok(true)
    }
}

/// Output columns one block of `mla_combine_uv_bf16` computes (UV_COLS in mla.cu).
const UV_COLS: usize = 32;

/// The value up-projection of decode folded into the split-KV combine: o[b, h] = ctx[b, h] ·
/// W_UV_hᵀ, W_UV_h being head h's value rows of kv_b_proj (rows h·(dn+dv)+dn .. +dv of
/// `kv_b` [H·(dn+dv), 512]); `out` [B, H, dv]. Applied only when the context is split (the
/// decode launcher returns whether it was): unsplit, the decode kernel writes the latent output
/// itself and the caller projects it.
pub struct ValueProjection<'a> {
    pub kv_b: View<'a, bf16>,
    pub qk_nope: usize,
    pub out: ViewMut<'a, bf16>,
}

/// `DSV2_MLA_PROBE=1|2` (timing probes, wrong outputs): the tma or roles kernel's math alone
/// (`..._probe1_bf16`: later tiles reuse the first ones without loads) or its loads alone
/// (`..._probe2_bf16`: every copy and handshake, no MMA).
fn mla_probe(kernel: MlaKernel) -> Option<&'static str> {
    static PROBE: std::sync::OnceLock<Option<u8>> = std::sync::OnceLock::new();
    let p = *PROBE.get_or_init(|| match std::env::var("DSV2_MLA_PROBE").as_deref() {
        Ok("1") => Some(1),
        Ok("2") => Some(2),
        _ => None,
    });
    match (kernel, p) {
        (MlaKernel::Tma, Some(1)) => Some("mla_decode_tma_probe1_bf16"),
        (MlaKernel::Tma, Some(2)) => Some("mla_decode_tma_probe2_bf16"),
        (MlaKernel::Roles, Some(1)) => Some("mla_decode_roles_probe1_bf16"),
        (MlaKernel::Roles, Some(2)) => Some("mla_decode_roles_probe2_bf16"),
        _ => None,
    }
}

/// The latent cache [num_blocks, block_size, 576] as a 2-D TMA tensor [num_blocks * block_size,
/// 576] bf16, read in boxes of 64 columns x min(block_size, 64) rows with the 128-byte swizzle
/// the wgmma operands use, and the same tensor in boxes of 64 rows: the TMA kernels copy a whole
/// 64-token tile whose blocks follow one another in the cache in one box a chunk (`tile_issue`
/// in mla_tma.cuh; at 16-token blocks a tile is otherwise four boxes a chunk).
pub fn cache_tensor_maps(cache: &View<'_, bf16>) -> Result<(TmaMap2d, TmaMap2d)> {
    let piece = cache.shape().get(1).copied().unwrap_or(0).min(64);
    let pieces = cache_tensor_map(cache, piece)?;
    // (blocks of 64 tokens or more: the piece map is the 64-row one; one encode per launch)
    let whole = if piece == 64 {
        pieces
    } else {
        cache_tensor_map(cache, 64)?
    };
    Ok((pieces, whole))
}

/// The latent cache as a 2-D TMA tensor (see [`cache_tensor_maps`]) in boxes of `box_rows` rows.
fn cache_tensor_map(cache: &View<'_, bf16>, box_rows: usize) -> Result<TmaMap2d> {
    const OP: &str = "mla_decode_tma_bf16";
    let (blocks, block_size) = (cache.shape()[0], cache.shape()[1]);
    if cache.shape()[2] != CACHE_DIM {
        return Err(shape_err(
            OP,
            format!(
                "cache {:?}: expected [blocks, block_size, {CACHE_DIM}]",
                cache.shape()
            ),
        ));
    }
    encode_bf16_2d(
        OP,
        cache.ptr(),
        blocks * block_size,
        CACHE_DIM,
        64,
        box_rows,
    )
}

/// Decode attention for one new token per sequence:
/// `out[b, h] = softmax_t(scale * (q_abs[b,h]·c_t + q_pe[b,h]·kpe_t)) · c_t` over the sequence's
/// cached tokens t < seq_lens[b], found through its block table.
/// q_abs [B, H, 512], q_pe [B, H, 64] (may be strided, see the launcher), cache
/// [num_blocks, block_size, 576] (bf16),
/// block_table i32 [B, max_blocks], seq_lens i32 [B], out [B, H, 512] bf16.
/// `max_seq_len` (host) bounds seq_lens and sizes the split of the context over CTAs; the kernel
/// trusts seq_lens[b] <= max_seq_len <= max_blocks * block_size and block ids < num_blocks.
pub struct MlaDecodeParams<'a> {
    pub q_abs: View<'a, bf16>,
    pub q_pe: View<'a, bf16>,
    pub cache: View<'a, bf16>,
    pub block_table: View<'a, i32>,
    pub seq_lens: View<'a, i32>,
    pub out: ViewMut<'a, bf16>,
    pub max_seq_len: usize,
    pub scale: f32,
    /// Force the number of context splits (None: chosen to fill the GPU).
    pub splits: Option<usize>,
    /// Force a kernel (None: `MlaKernel::from_env_for` the shape).
    pub kernel: Option<MlaKernel>,
    /// Fold the value up-projection into the combine (see [`ValueProjection`]).
    pub uv: Option<ValueProjection<'a>>,
}

/// How many context splits to use so that (head groups x batch x splits) fills the SMs about once.
pub fn choose_splits(
    sm_count: usize,
    batch: usize,
    heads: usize,
    max_seq_len: usize,
    kernel: MlaKernel,
) -> usize {
    let ctas = batch * heads.div_ceil(kernel.heads_per_cta());
    // At least 2 tiles per split: a CTA's first tile load is not overlapped with anything, so a
    // 1-tile split is mostly latency. Unless even 1-tile splits leave most SMs idle (batch 1 at a
    // short context): then the shorter chain wins (batch 1 x 512 tokens: 20.5 -> 18 us at 128
    // heads, 17 -> 14 us at 16, bench/RESULTS.md session 8 run 3).
    let tiles = max_seq_len.div_ceil(kernel.tile_tokens()).max(1);
    let max_useful = if ctas * tiles * 2 <= sm_count {
        tiles
    } else {
        tiles.div_ceil(2)
    };
    // Splitting costs a combine pass over f32 partials (33 MB at batch 64 x 128 heads): only
    // worth it when a quarter or more of the SMs would otherwise sit idle.
    // Rounded down: one CTA more than the SMs hold would run a second wave for the whole
    // kernel's duration (16 CTAs x 9 splits = 144 on 132 SMs halved batch 8's speed).
    if ctas * 4 >= sm_count * 3 {
        1
    } else {
        (sm_count / ctas).min(max_useful).max(1)
    }
}

/// The split-KV combine alone, for benchmarks: how much of a split decode's time is the combine
/// pass over the f32 partials (the partials are zeros with lse 0: every split is read).
pub struct CombineBench {
    parts: SplitPartials,
    batch: usize,
    heads: usize,
}

impl CombineBench {
    pub fn new(gpu: &Gpu, batch: usize, splits: usize, heads: usize) -> Result<Self> {
        let parts = SplitPartials::alloc(gpu, batch, splits.clamp(1, MAX_SPLITS), heads, true)?;
        Ok(Self {
            parts,
            batch,
            heads,
        })
    }

    /// `mla_combine_bf16` into out [batch, heads, 512] (nothing with one split).
    pub fn run(&self, gpu: &Gpu, out: &mut ViewMut<'_, bf16>) -> Result<()> {
        out.expect(
            "mla_combine_bf16",
            "out",
            &[Some(self.batch), Some(self.heads), Some(KV_LORA)],
        )?;
        self.parts
            .launch_combine(gpu, out.ptr(), self.batch, self.heads)
    }
}

/// What both decode launchers (bf16 and FP8 cache) check of their arguments, the cache's row
/// width aside, and derive from them.
struct DecodeShape {
    batch: usize,
    heads: usize,
    block_size: usize,
    max_blocks: usize,
    /// q_pe's batch and head strides (elements).
    qpe_sb: i64,
    qpe_sh: i64,
}

impl DecodeShape {
    /// `Ok(None)`: nothing to compute (no sequences or no heads).
    #[allow(clippy::too_many_arguments)]
    fn check(
        op: &'static str,
        q_abs: &View<'_, bf16>,
        q_pe: &View<'_, bf16>,
        cache_shape: &[usize],
        block_table: &View<'_, i32>,
        seq_lens: &View<'_, i32>,
        out: &ViewMut<'_, bf16>,
        max_seq_len: usize,
    ) -> Result<Option<Self>> {
        q_abs.expect(op, "q_abs", &[None, None, Some(KV_LORA)])?;
        let (batch, heads) = (q_abs.shape()[0], q_abs.shape()[1]);
        // q_pe may be strided (the rope columns of q in place): rows of 64 contiguous values on
        // 16-byte boundaries, which is how the kernels load it
        let qs = q_pe.strides();
        if q_pe.shape() != [batch, heads, ROPE]
            || qs[2] != 1
            || !qs[0].is_multiple_of(8)
            || !qs[1].is_multiple_of(8)
            || !q_pe.ptr().is_multiple_of(16)
        {
            return Err(shape_err(
                op,
                format!(
                    "q_pe is {:?} with strides {:?}: expected [{batch}, {heads}, {ROPE}], unit last stride, 16-byte aligned rows",
                    q_pe.shape(),
                    qs
                ),
            ));
        }
        let block_size = cache_shape[1];
        block_table.expect(op, "block_table", &[Some(batch), None])?;
        let max_blocks = block_table.shape()[1];
        seq_lens.expect(op, "seq_lens", &[Some(batch)])?;
        out.expect(op, "out", &[Some(batch), Some(heads), Some(KV_LORA)])?;
        if block_size == 0 || max_seq_len > max_blocks * block_size {
            return Err(shape_err(
                op,
                format!(
                    "max_seq_len {max_seq_len} exceeds block table capacity {max_blocks} x {block_size}"
                ),
            ));
        }
        if batch == 0 || heads == 0 {
            return Ok(None);
        }
        if batch > 65535 {
            return Err(KernelError::Unsupported {
                op,
                what: format!("batch {batch} > 65535"),
            });
        }
        Ok(Some(Self {
            batch,
            heads,
            block_size,
            max_blocks,
            qpe_sb: qs[0] as i64,
            qpe_sh: qs[1] as i64,
        }))
    }
}

/// Enqueues the decode (and the combine when the context is split): Ok(true) when `p.uv` was
/// given and its output written (the context was split), Ok(false) when `out` holds the latent
/// output to project.
pub fn mla_decode(gpu: &Gpu, p: MlaDecodeParams<'_>) -> Result<bool> {
    const OP: &str = "mla_decode_bf16";
    p.cache
        .expect(OP, "cache", &[None, None, Some(CACHE_DIM)])?;
    let Some(d) = DecodeShape::check(
        OP,
        &p.q_abs,
        &p.q_pe,
        p.cache.shape(),
        &p.block_table,
        &p.seq_lens,
        &p.out,
        p.max_seq_len,
    )?
    else {
        return Ok(false);
    };
    let DecodeShape {
        batch,
        heads,
        block_size,
        max_blocks,
        qpe_sb,
        qpe_sh,
    } = d;
    let kernel = match p.kernel {
        Some(k) => k,
        None => MlaKernel::from_env_for(heads, block_size)?,
    };
    if !kernel.supports_block_size(block_size) {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!(
                "{} with cache blocks of {block_size} tokens (8..=64 tokens dividing 64, or a multiple of 64)",
                kernel.function()
            ),
        });
    }
    // each sequence cuts its own context into `splits` runs of whole tiles on the device
    let splits = p
        .splits
        .unwrap_or_else(|| choose_splits(gpu.sm_count, batch, heads, p.max_seq_len, kernel))
        .clamp(1, MAX_SPLITS);
    let parts = SplitPartials::new(gpu, batch, splits, heads)?;
    let (qa, qp, c, bt, sl, o) = (
        p.q_abs.ptr(),
        p.q_pe.ptr(),
        p.cache.ptr(),
        p.block_table.ptr(),
        p.seq_lens.ptr(),
        p.out.ptr(),
    );
    let (op_ptr, lse_ptr) = parts.ptrs();
    let (h, bs, mb) = (
        dim_i32(OP, "heads", heads)?,
        dim_i32(OP, "block_size", block_size)?,
        dim_i32(OP, "max_blocks", max_blocks)?,
    );
    let si = splits as i32;
    let scale = p.scale;
    let map = match kernel {
        MlaKernel::TmaPair
        | MlaKernel::Tma
        | MlaKernel::Roles
        | MlaKernel::Seesaw
        | MlaKernel::Narrow
        | MlaKernel::NarrowRs => Some(cache_tensor_maps(&p.cache)?),
        MlaKernel::Wgmma | MlaKernel::Mma => None,
    };
    // the pair kernel needs exactly two head groups, one per CTA of a cluster
    let pair = kernel == MlaKernel::TmaPair && heads.div_ceil(HEADS_PER_CTA) == 2;
    let entry = if pair {
        "mla_decode_tma_pair_bf16"
    } else {
        mla_probe(kernel).unwrap_or(kernel.function())
    };
    gpu.set_max_dynamic_smem(entry, kernel.smem_bytes())?;
    let f = gpu.function(entry)?;
    let mut b = gpu.launch(f);
    if pair {
        b.cluster_x(2);
    }
    b.arg(&qa).arg(&qp);
    if map.is_none() {
        b.arg(&c);
    }
    b.arg(&bt).arg(&sl).arg(&o).arg(&op_ptr).arg(&lse_ptr);
    b.arg(&h)
        .arg(&bs)
        .arg(&mb)
        .arg(&si)
        .arg(&scale)
        .arg(&qpe_sb)
        .arg(&qpe_sh);
    if let Some((m, m64)) = map.as_ref() {
        b.arg(m).arg(m64);
    }
    let cfg = LaunchConfig {
        grid_dim: (
            heads.div_ceil(kernel.heads_per_cta()) as u32,
            batch as u32,
            splits as u32,
        ),
        block_dim: (kernel.threads(), 1, 1),
        shared_mem_bytes: kernel.smem_bytes() as u32,
    };
    // SAFETY: matches the signature mla_decode_bf16 and mla_decode_wgmma_bf16 share (the TMA
    // kernels': no cache pointer, the cache's two tensor maps last); inputs shape-checked above; o_part/lse (when
    // splits > 1) hold batch*splits*heads*512 and batch*splits*heads f32 and live until after the
    // combine below is enqueued (stream order keeps them valid: cudarc frees asynchronously on the
    // same stream).
    unsafe { b.launch(cfg) }?;
    parts.finish(gpu, o, p.uv, batch, heads)
}

/// Write new tokens into the cache: cache[slots[t]] = c_kv[t] | k_pe[t].
/// cache [num_blocks, block_size, 576], c_kv [T, 512], k_pe [T, 64] (bf16), slots i64 [T]
/// (block * block_size + offset; negative = padding, skipped; out-of-range slots are skipped too).
pub struct CacheAppendParams<'a> {
    pub cache: ViewMut<'a, bf16>,
    pub c_kv: View<'a, bf16>,
    pub k_pe: View<'a, bf16>,
    pub slots: View<'a, i64>,
}

pub fn mla_cache_append(gpu: &Gpu, p: CacheAppendParams<'_>) -> Result<()> {
    const OP: &str = "mla_cache_append_bf16";
    p.cache
        .expect(OP, "cache", &[None, None, Some(CACHE_DIM)])?;
    let num_slots = (p.cache.shape()[0] * p.cache.shape()[1]) as i64;
    p.c_kv.expect(OP, "c_kv", &[None, Some(KV_LORA)])?;
    let tokens = p.c_kv.shape()[0];
    p.k_pe.expect(OP, "k_pe", &[Some(tokens), Some(ROPE)])?;
    p.slots.expect(OP, "slots", &[Some(tokens)])?;
    if tokens == 0 {
        return Ok(());
    }
    let (c, kv, pe, s) = (p.cache.ptr(), p.c_kv.ptr(), p.k_pe.ptr(), p.slots.ptr());
    let t = dim_i32(OP, "tokens", tokens)?;
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&c).arg(&kv).arg(&pe).arg(&s).arg(&t).arg(&num_slots);
    let cfg = LaunchConfig {
        grid_dim: (tokens as u32, 1, 1),
        block_dim: (CACHE_DIM as u32 / 8, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches mla_cache_append_bf16; the kernel bounds-checks slots against num_slots.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Shared memory of one `mla_decode_fp8` CTA: `F8_SMEM_BYTES` in mla_fp8.cu (Q, two bf16 tiles,
/// P, reduction scratch, two tiles' scales) plus 1 KiB so the kernel can align to 1024 bytes.
const FP8_SMEM_BYTES: usize = 3 * 64 * 576 * 2 + 64 * 128 + 2 * 2 * 64 * 4 + 2 * 64 * 4 + 1024;
/// Shared memory of one `mla_decode_fp8_regs` CTA: `FR_BYTES` in mla_fp8_regs.cu (Q as f16 and
/// its rope columns, three 41 KiB stages of codes, k_pe and scales, two P' buffers, reduction
/// scratch, rescales, row sums and maxima, Q's maxima, 6 mbarriers) plus 1 KiB for alignment.
const FP8_REGS_SMEM_BYTES: usize =
    9 * 8192 + 3 * (5 * 8192 + 1024) + 2 * 8192 + 1024 + 512 + 512 + 64 + 64 + 1024;
const _: () = assert!(FP8_SMEM_BYTES <= 232_448 && FP8_REGS_SMEM_BYTES <= 232_448);

/// Which kernel decodes over the FP8 cache (`DSV2_MLA_FP8_KERNEL`; unset: [`Fp8Kernel::for_block_size`]).
/// Both compute the same function over the same bytes.
/// - `Regs` (mla_fp8_regs.cu, the default): the tile is the A operand of both products
///   (S^T = K.Q^T and O^T = V^T.P^T), which wgmma takes from registers, so the codes are
///   converted there (f16) and never written back; a producer warp feeds a 3-stage TMA ring.
///   Blocks of 8..=64 tokens dividing 64, or a multiple of 64 (the TMA pieces). H100, b128 x
///   4096 x 64 heads: 0.229 ms against `Wgmma`'s 0.340 (1.48x), 0.98x the bf16 kernel's
///   tokens/s; b64 x 128 heads 0.87x (bench/RESULTS.md session 20).
/// - `Wgmma` (mla_fp8.cu): each tile's codes are loaded through registers and written to shared
///   memory as a bf16 tile, which both products read. Any block size: the fallback for blocks
///   `Regs` cannot read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Kernel {
    Wgmma,
    Regs,
    /// `mla_decode_fp8_pp` (`pp`): the register kernel with each math warpgroup owning its 32
    /// heads end to end, the two taking turns at the tensor cores. Opt-in until measured.
    Pp,
}

impl Fp8Kernel {
    /// The kernel named by `DSV2_MLA_FP8_KERNEL` (read once); None where it is unset (then
    /// [`Fp8Kernel::for_block_size`] chooses).
    pub fn from_env() -> Result<Option<Self>> {
        static NAMED: std::sync::OnceLock<std::result::Result<Option<Fp8Kernel>, String>> =
            std::sync::OnceLock::new();
        NAMED
            .get_or_init(|| {
                Self::parse(&std::env::var("DSV2_MLA_FP8_KERNEL").unwrap_or_default())
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|what| KernelError::Unsupported {
                op: "mla_decode_fp8",
                what,
            })
    }

    /// The kernel a name asks for: None for "" (the default), else `wgmma`, `regs` or `pp`.
    pub fn parse(name: &str) -> Result<Option<Self>> {
        match name {
            "" => Ok(None),
            "wgmma" => Ok(Some(Fp8Kernel::Wgmma)),
            "regs" => Ok(Some(Fp8Kernel::Regs)),
            "pp" => Ok(Some(Fp8Kernel::Pp)),
            other => Err(KernelError::Unsupported {
                op: "mla_decode_fp8",
                what: format!(
                    "DSV2_MLA_FP8_KERNEL={other:?} (expected \"wgmma\", \"regs\" or \"pp\")"
                ),
            }),
        }
    }

    /// The kernel's function name in the CUDA sources.
    pub fn function(self) -> &'static str {
        match self {
            Fp8Kernel::Wgmma => "mla_decode_fp8",
            Fp8Kernel::Regs => "mla_decode_fp8_regs",
            Fp8Kernel::Pp => "mla_decode_fp8_pp",
        }
    }

    fn smem_bytes(self) -> usize {
        match self {
            Fp8Kernel::Wgmma => FP8_SMEM_BYTES,
            Fp8Kernel::Regs | Fp8Kernel::Pp => FP8_REGS_SMEM_BYTES,
        }
    }

    fn threads(self) -> u32 {
        match self {
            Fp8Kernel::Wgmma => 256,
            Fp8Kernel::Regs | Fp8Kernel::Pp => 384,
        }
    }

    /// The default for a cache of `block_size`-token blocks: `Regs` where it reads them, else
    /// `Wgmma` (which reads any).
    pub fn for_block_size(block_size: usize) -> Self {
        if Fp8Kernel::Regs.supports_block_size(block_size) {
            Fp8Kernel::Regs
        } else {
            Fp8Kernel::Wgmma
        }
    }

    /// Whether the kernel reads caches of this block size (as [`MlaKernel::supports_block_size`]).
    pub fn supports_block_size(self, block_size: usize) -> bool {
        match self {
            Fp8Kernel::Wgmma => block_size > 0,
            // the TMA kernels' rule (at least 8 rows a piece: the 16-byte scale boxes then land
            // 128-byte aligned too)
            Fp8Kernel::Regs | Fp8Kernel::Pp => MlaKernel::Tma.supports_block_size(block_size),
        }
    }
}

/// [`mla_decode`] over the FP8 latent cache (`crate::fp8`, DeepSeek-V2's 656-byte rows): one of
/// the [`Fp8Kernel`]s, then the same combine. cache is [num_blocks, block_size, 656] bytes; every
/// other argument as [`MlaDecodeParams`].
pub struct MlaDecodeFp8Params<'a> {
    pub q_abs: View<'a, bf16>,
    pub q_pe: View<'a, bf16>,
    pub cache: View<'a, u8>,
    pub block_table: View<'a, i32>,
    pub seq_lens: View<'a, i32>,
    pub out: ViewMut<'a, bf16>,
    pub max_seq_len: usize,
    pub scale: f32,
    /// Force the number of context splits (None: chosen to fill the GPU, as the bf16 wgmma
    /// kernel's: 64-token tiles, 64 heads a CTA).
    pub splits: Option<usize>,
    /// Fold the value up-projection into the combine (see [`ValueProjection`]).
    pub uv: Option<ValueProjection<'a>>,
    /// Force a kernel (None: [`Fp8Kernel::from_env`], else [`Fp8Kernel::for_block_size`]).
    pub kernel: Option<Fp8Kernel>,
}

/// As [`mla_decode`] (the same return value).
pub fn mla_decode_fp8(gpu: &Gpu, p: MlaDecodeFp8Params<'_>) -> Result<bool> {
    const OP: &str = "mla_decode_fp8";
    let row = crate::fp8::Fp8Layout::DEEPSEEK_V2.row_bytes();
    p.cache.expect(OP, "cache", &[None, None, Some(row)])?;
    if !p.cache.ptr().is_multiple_of(16) {
        return Err(shape_err(OP, "cache is not 16-byte aligned"));
    }
    let Some(DecodeShape {
        batch,
        heads,
        block_size,
        max_blocks,
        qpe_sb,
        qpe_sh,
    }) = DecodeShape::check(
        OP,
        &p.q_abs,
        &p.q_pe,
        p.cache.shape(),
        &p.block_table,
        &p.seq_lens,
        &p.out,
        p.max_seq_len,
    )?
    else {
        return Ok(false);
    };
    let kernel = match p.kernel {
        Some(k) => k,
        None => Fp8Kernel::from_env()?.unwrap_or(Fp8Kernel::for_block_size(block_size)),
    };
    if !kernel.supports_block_size(block_size) {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!(
                "{} with cache blocks of {block_size} tokens (8..=64 tokens dividing 64, or a multiple of 64; DSV2_MLA_FP8_KERNEL=wgmma reads any)",
                kernel.function()
            ),
        });
    }
    let splits = p
        .splits
        .unwrap_or_else(|| {
            choose_splits(gpu.sm_count, batch, heads, p.max_seq_len, MlaKernel::Wgmma)
        })
        .clamp(1, MAX_SPLITS);
    let parts = SplitPartials::new(gpu, batch, splits, heads)?;
    let (qa, qp, c, bt, sl, o) = (
        p.q_abs.ptr(),
        p.q_pe.ptr(),
        p.cache.ptr(),
        p.block_table.ptr(),
        p.seq_lens.ptr(),
        p.out.ptr(),
    );
    let (op_ptr, lse_ptr) = parts.ptrs();
    let (h, bs, mb) = (
        dim_i32(OP, "heads", heads)?,
        dim_i32(OP, "block_size", block_size)?,
        dim_i32(OP, "max_blocks", max_blocks)?,
    );
    let si = splits as i32;
    let scale = p.scale;
    // the regs kernel reads the cache through two maps: 128-byte swizzled boxes of codes and
    // k_pe, 16-byte boxes of the scale, min(block_size, 64) rows each; and the same two in boxes
    // of 64 rows, for whole tiles in consecutive blocks (fr_issue, as the bf16 TMA kernels)
    let maps = match kernel {
        Fp8Kernel::Regs | Fp8Kernel::Pp => {
            let rows = p.cache.shape()[0] * block_size;
            let piece = block_size.min(64);
            let codes = encode_u8_2d(OP, c, rows, row, 128, piece, true)?;
            let scales = encode_u8_2d(OP, c, rows, row, 16, piece, false)?;
            // (64-token blocks or more: the piece maps are the 64-row ones)
            if piece == 64 {
                Some([codes, scales, codes, scales])
            } else {
                Some([
                    codes,
                    scales,
                    encode_u8_2d(OP, c, rows, row, 128, 64, true)?,
                    encode_u8_2d(OP, c, rows, row, 16, 64, false)?,
                ])
            }
        }
        Fp8Kernel::Wgmma => None,
    };
    let entry = kernel.function();
    gpu.set_max_dynamic_smem(entry, kernel.smem_bytes())?;
    let f = gpu.function(entry)?;
    let mut b = gpu.launch(f);
    b.arg(&qa).arg(&qp);
    if maps.is_none() {
        b.arg(&c);
    }
    b.arg(&bt).arg(&sl).arg(&o).arg(&op_ptr).arg(&lse_ptr);
    b.arg(&h)
        .arg(&bs)
        .arg(&mb)
        .arg(&si)
        .arg(&scale)
        .arg(&qpe_sb)
        .arg(&qpe_sh);
    if let Some([codes, scales, codes64, scales64]) = maps.as_ref() {
        b.arg(codes).arg(scales).arg(codes64).arg(scales64);
    }
    let cfg = LaunchConfig {
        grid_dim: (
            heads.div_ceil(HEADS_PER_CTA) as u32,
            batch as u32,
            splits as u32,
        ),
        block_dim: (kernel.threads(), 1, 1),
        shared_mem_bytes: kernel.smem_bytes() as u32,
    };
    // SAFETY: matches mla_decode_fp8's signature (mla_decode_wgmma_bf16's with the cache as
    // bytes), or mla_decode_fp8_regs' (no cache pointer; the two maps of the same cache last);
    // inputs shape-checked above; o_part/lse (when splits > 1) hold batch*splits*heads*512 and
    // batch*splits*heads f32 and live until after the combine below is enqueued (cudarc frees
    // them in stream order).
    unsafe { b.launch(cfg) }?;
    parts.finish(gpu, o, p.uv, batch, heads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_parse_and_bad_names_say_what_is_accepted() {
        assert_eq!(MlaKernel::parse("wgmma").ok(), Some(MlaKernel::Wgmma));
        assert_eq!(MlaKernel::parse("").ok(), Some(MlaKernel::Wgmma));
        assert_eq!(MlaKernel::parse("mma").ok(), Some(MlaKernel::Mma));
        assert_eq!(MlaKernel::parse("seesaw").ok(), Some(MlaKernel::Seesaw));
        assert_eq!(MlaKernel::parse("tma").ok(), Some(MlaKernel::Tma));
        assert_eq!(MlaKernel::parse("tma-pair").ok(), Some(MlaKernel::TmaPair));
        assert_eq!(MlaKernel::parse("roles").ok(), Some(MlaKernel::Roles));
        assert_eq!(MlaKernel::parse("narrow").ok(), Some(MlaKernel::Narrow));
        assert_eq!(
            MlaKernel::parse("narrow-rs").ok(),
            Some(MlaKernel::NarrowRs)
        );
        let err = MlaKernel::parse("flash").err().map(|e| e.to_string());
        let msg = err.unwrap_or_default();
        assert!(
            msg.contains("DSV2_MLA_KERNEL") && msg.contains("wgmma"),
            "{msg}"
        );
    }

    #[test]
    fn the_pair_kernel_is_the_default_only_for_128_heads_over_64_token_blocks() {
        assert_eq!(MlaKernel::default_for(128, 64), MlaKernel::TmaPair);
        assert_eq!(MlaKernel::default_for(100, 128), MlaKernel::TmaPair);
        // the router's 16-token blocks: 4 TMA pieces a tile, where wgmma was faster
        assert_eq!(MlaKernel::default_for(128, 16), MlaKernel::Wgmma);
        assert_eq!(MlaKernel::default_for(128, 32), MlaKernel::Wgmma);
        // one head group (V2-Lite's 16 heads, 64) or more than two
        assert_eq!(MlaKernel::default_for(16, 64), MlaKernel::Wgmma);
        assert_eq!(MlaKernel::default_for(64, 64), MlaKernel::Wgmma);
        assert_eq!(MlaKernel::default_for(256, 64), MlaKernel::Wgmma);
        assert_eq!(MlaKernel::default_for(128, 0), MlaKernel::Wgmma);
    }

    #[test]
    fn every_decode_kernel_is_exported_and_says_which_block_sizes_it_reads() {
        for k in [
            MlaKernel::TmaPair,
            MlaKernel::Tma,
            MlaKernel::Roles,
            MlaKernel::Seesaw,
            MlaKernel::Narrow,
            MlaKernel::NarrowRs,
            MlaKernel::Wgmma,
            MlaKernel::Mma,
        ] {
            let sig = format!("{}(", k.function());
            let exported = crate::compile::SOURCES
                .iter()
                .any(|(_, src)| src.contains("extern \"C\" __global__") && src.contains(&sig));
            assert!(exported, "{} is not in the CUDA sources", k.function());
            assert!(k.supports_block_size(16) && k.supports_block_size(64));
            assert!(!k.supports_block_size(0));
        }
        // the probe entries DSV2_MLA_PROBE picks
        for name in [
            "mla_decode_tma_probe1_bf16(",
            "mla_decode_tma_probe2_bf16(",
            "mla_decode_roles_probe1_bf16(",
            "mla_decode_roles_probe2_bf16(",
        ] {
            assert!(
                crate::compile::SOURCES
                    .iter()
                    .any(|(_, src)| src.contains(name)),
                "{name}"
            );
        }
        // the cluster entry the launcher picks for two head groups
        assert!(
            crate::compile::SOURCES
                .iter()
                .any(|(_, src)| src.contains("mla_decode_tma_pair_bf16("))
        );
        // TMA pieces of min(block, 64) rows must stay inside one cache block
        assert!(MlaKernel::Seesaw.supports_block_size(32));
        assert!(MlaKernel::Seesaw.supports_block_size(128));
        assert!(!MlaKernel::Seesaw.supports_block_size(48));
        assert!(!MlaKernel::Seesaw.supports_block_size(96));
        assert!(!MlaKernel::Tma.supports_block_size(48));
        assert!(MlaKernel::Wgmma.supports_block_size(48));
        // pieces under 8 rows would start off a 1024-byte swizzle atom
        assert!(!MlaKernel::Narrow.supports_block_size(4));
        assert!(MlaKernel::Narrow.supports_block_size(8));
        assert!(MlaKernel::Wgmma.supports_block_size(4));
    }

    type Defines = std::collections::HashMap<String, String>;

    /// Evaluates a `#define` expression of a TMA kernel's shared-memory layout: integers, other
    /// defines, `+`, `*` and parentheses (all the layout uses).
    fn eval_define(defs: &Defines, expr: &str) -> usize {
        fn sum(t: &[String], i: &mut usize, d: &Defines) -> usize {
            let mut v = product(t, i, d);
            while t.get(*i).is_some_and(|x| x == "+") {
                *i += 1;
                v += product(t, i, d);
            }
            v
        }
        fn product(t: &[String], i: &mut usize, d: &Defines) -> usize {
            let mut v = atom(t, i, d);
            while t.get(*i).is_some_and(|x| x == "*") {
                *i += 1;
                v *= atom(t, i, d);
            }
            v
        }
        fn atom(t: &[String], i: &mut usize, d: &Defines) -> usize {
            let tok = t[*i].clone();
            *i += 1;
            if tok == "(" {
                let v = sum(t, i, d);
                assert_eq!(t[*i], ")", "unbalanced parentheses");
                *i += 1;
                v
            } else if let Ok(n) = tok.parse() {
                n
            } else {
                eval_define(d, &d[&tok])
            }
        }
        let spaced = expr.replace('(', " ( ").replace(')', " ) ");
        let toks: Vec<String> = spaced.split_whitespace().map(str::to_string).collect();
        let mut i = 0;
        let v = sum(&toks, &mut i, defs);
        assert_eq!(i, toks.len(), "could not evaluate {expr:?}");
        v
    }

    /// The `#define`s of a CUDA source (the kernel's and mla_tma.cuh's), name -> expression.
    fn defines(file: &str) -> Defines {
        let src = |name: &str| {
            crate::compile::SOURCES
                .iter()
                .chain(crate::compile::HEADERS)
                .find(|(f, _)| *f == name)
                .map(|(_, s)| *s)
                .unwrap_or_default()
        };
        [src(file), src("mla_tma.cuh")]
            .iter()
            .flat_map(|s| s.lines())
            .filter_map(|l| l.strip_prefix("#define "))
            .map(|l| l.split("//").next().unwrap_or(l))
            .filter_map(|l| l.split_once(' '))
            .map(|(name, expr)| (name.to_string(), expr.trim().to_string()))
            .collect()
    }

    #[test]
    fn tma_kernels_shared_memory_matches_the_kernels() {
        // + 1 KiB: the kernels align their base to 1024 bytes
        let seesaw = defines("mla_seesaw.cu");
        assert_eq!(SEESAW_SMEM_BYTES, eval_define(&seesaw, "SS_BYTES") + 1024);
        let tma = defines("mla_tma.cu");
        assert_eq!(TMA_SMEM_BYTES, eval_define(&tma, "TM_BYTES") + 1024);
        let roles = defines("mla_roles.cu");
        assert_eq!(ROLES_SMEM_BYTES, eval_define(&roles, "MR_BYTES"));
        let narrow = defines("mla_narrow.cu");
        assert_eq!(NARROW_SMEM_BYTES, eval_define(&narrow, "NR_BYTES") + 1024);
        assert_eq!(NARROW_HEADS, eval_define(&narrow, "NR_HEADS"));
        assert_eq!(
            MlaKernel::Narrow.threads() as usize,
            eval_define(&narrow, "NR_THREADS")
        );
    }

    #[test]
    fn fp8_decode_is_exported_and_its_shared_memory_matches_the_kernel() {
        let src = crate::compile::SOURCES
            .iter()
            .find(|(f, _)| *f == "mla_fp8.cu")
            .map(|(_, s)| *s)
            .unwrap_or_default();
        assert!(src.contains("mla_decode_fp8("));
        let defs: Defines = src
            .lines()
            .filter_map(|l| l.strip_prefix("#define F8_"))
            .map(|l| l.split("//").next().unwrap_or(l))
            .filter_map(|l| l.split_once(' '))
            .map(|(name, expr)| (format!("F8_{name}"), expr.trim().to_string()))
            .collect();
        assert_eq!(FP8_SMEM_BYTES, eval_define(&defs, "F8_SMEM_BYTES") + 1024);
        let regs = defines("mla_fp8_regs.cu");
        assert_eq!(FP8_REGS_SMEM_BYTES, eval_define(&regs, "FR_BYTES") + 1024);
        assert_eq!(
            eval_define(&regs, "FR_ROW"),
            crate::fp8::Fp8Layout::DEEPSEEK_V2.row_bytes()
        );
        assert_eq!(
            eval_define(&regs, "FR_PE"),
            crate::fp8::Fp8Layout::DEEPSEEK_V2.pe_offset()
        );
        assert_eq!(
            eval_define(&regs, "FR_SC"),
            crate::fp8::Fp8Layout::DEEPSEEK_V2.scale_offset()
        );
        let exported = crate::compile::SOURCES
            .iter()
            .any(|(_, s)| s.contains("mla_decode_fp8_regs("));
        assert!(exported);
        assert_eq!(Fp8Kernel::parse("regs").ok(), Some(Some(Fp8Kernel::Regs)));
        assert_eq!(Fp8Kernel::parse("pp").ok(), Some(Some(Fp8Kernel::Pp)));
        assert_eq!(Fp8Kernel::parse("wgmma").ok(), Some(Some(Fp8Kernel::Wgmma)));
        assert_eq!(Fp8Kernel::parse("").ok(), Some(None));
        // the default: the register kernel where it reads the blocks, else the one that reads any
        assert_eq!(Fp8Kernel::for_block_size(16), Fp8Kernel::Regs);
        assert_eq!(Fp8Kernel::for_block_size(128), Fp8Kernel::Regs);
        assert_eq!(Fp8Kernel::for_block_size(4), Fp8Kernel::Wgmma);
        assert_eq!(Fp8Kernel::for_block_size(24), Fp8Kernel::Wgmma);
        assert!(Fp8Kernel::parse("fast").is_err());
        assert!(
            Fp8Kernel::Regs.supports_block_size(16) && Fp8Kernel::Regs.supports_block_size(128)
        );
        assert!(
            !Fp8Kernel::Regs.supports_block_size(48) && Fp8Kernel::Wgmma.supports_block_size(48)
        );
        // the row layout the kernel hard-codes is the one crate::fp8 defines
        let l = crate::fp8::Fp8Layout::DEEPSEEK_V2;
        assert_eq!(eval_define(&defs, "F8_ROW"), l.row_bytes());
        assert_eq!(eval_define(&defs, "F8_PE"), l.pe_offset());
        assert_eq!(eval_define(&defs, "F8_SC"), l.scale_offset());
    }

    #[test]
    fn splits_fill_the_gpu_and_keep_whole_tiles() {
        // 64 sequences x 2 head groups already cover 132 SMs' worth of CTAs: no split
        assert_eq!(choose_splits(132, 64, 128, 4096, MlaKernel::Wgmma), 1);
        // one sequence: split the context, but never below 2 tiles per split
        assert_eq!(choose_splits(132, 1, 128, 4096, MlaKernel::Wgmma), 32);
        assert_eq!(choose_splits(132, 1, 128, 4096, MlaKernel::Mma), 64);
        // batch 1 at a short context: one tile per split, the card is mostly idle anyway
        assert_eq!(choose_splits(132, 1, 16, 512, MlaKernel::Wgmma), 8);
        assert_eq!(choose_splits(132, 1, 128, 512, MlaKernel::Wgmma), 8);
        assert_eq!(choose_splits(132, 4, 128, 1024, MlaKernel::Wgmma), 8);
        assert_eq!(choose_splits(132, 1, 128, 10, MlaKernel::Wgmma), 1);
        // 8 sequences x 2 head groups: 8 splits (128 CTAs), not 9 (144: a second wave)
        assert_eq!(choose_splits(132, 8, 128, 32768, MlaKernel::Wgmma), 8);
        assert_eq!(choose_splits(132, 1, 128, 32768, MlaKernel::Wgmma), 66);
    }
}
