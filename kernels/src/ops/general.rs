//! Launchers for general.cu (MLA pieces for any latent / rope / head dims: latent norm + cache
//! write, with decode's W_UK absorb in the same launch at few rows, causal attention over a
//! gathered context, strided row copy, residual add, f32 -> bf16 cast, indexed row
//! accumulation), their f32 references, and their GPU checks.

use cudarc::driver::LaunchConfig;
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{dim_i32, grid_for};
use crate::check::CheckRow;
use crate::device::Gpu;
use crate::error::{KernelError, Result, shape_err};
use crate::reference as r;
use crate::tensor::{DType, Tensor, View, ViewMut};

/// Threads per attention block (must match ATT_THREADS in general.cu).
const ATT_THREADS: usize = 128;

/// Shape check for a view whose last dimension must be unit-stride (outer strides are free).
fn expect_rows<T: DType>(
    v: &View<'_, T>,
    op: &'static str,
    tensor: &'static str,
    dims: &[Option<usize>],
) -> Result<()> {
    let ok = dims.len() == v.shape().len()
        && dims
            .iter()
            .zip(v.shape())
            .all(|(d, s)| d.is_none_or(|d| d == *s));
    if !ok {
        return Err(shape_err(
            op,
            format!(
                "{tensor} ({}) has shape {:?}, expected {:?}",
                T::NAME,
                v.shape(),
                dims
            ),
        ));
    }
    if v.shape().last().is_some_and(|&d| d > 1) && v.strides().last() != Some(&1) {
        return Err(KernelError::NotContiguous {
            op,
            tensor,
            shape: v.shape().to_vec(),
            strides: v.strides().to_vec(),
        });
    }
    Ok(())
}

/// cache[slots[t]] = [ norm_w * rmsnorm(kva[t, :r]) | rope(kva[t, r:]) ].
/// kva [T, r + dr] or [T, 1, r + dr], norm_w [r],
/// cache [num_blocks, block_size, r + dr] (bf16), slots i64 [T] (block * block_size + offset;
/// negative or out-of-range slots are skipped). With `rope`, the k_pe part is rotated on the way
/// (as `rope_bf16` would, positions outside the table left as they are); without, it is copied
/// as given (already rotated). Rotating here saves decode a launch per layer; with `absorb`
/// (at most [`ABSORB_MAX_ROWS`] tokens) the launch also computes decode's absorbed queries.
pub struct LatentAppendParams<'a> {
    pub kva: View<'a, bf16>,
    pub norm_w: View<'a, bf16>,
    pub slots: View<'a, i64>,
    pub cache: ViewMut<'a, bf16>,
    pub kv_lora: usize,
    pub eps: f32,
    pub rope: Option<LatentRope<'a>>,
    /// Decode's W_UK absorb in the same launch (at most [`ABSORB_MAX_ROWS`] tokens).
    pub absorb: Option<LatentAbsorb<'a>>,
}

/// Tokens up to which the append's launch can also absorb W_UK into the queries
/// (`mla_latent_append_absorb_m{1..4}_bf16`); more take the GEMM of their own.
pub const ABSORB_MAX_ROWS: usize = 4;
/// Columns of W_UK per absorb block (ABSORB_TILE in general.cu).
const ABSORB_TILE: usize = 128;
/// Threads of every block of the append's launch (ABSORB_THREADS in general.cu).
const APPEND_THREADS: u32 = 128;

/// `out[t, h, :] = q[t, h, :qk_nope] · W_UK_h`, W_UK_h = the qk_nope kv_b rows from
/// `h·(qk_nope + v_head)` on ([qk_nope, kv_r]): decode's absorbed query, computed by extra blocks
/// of the append's launch (one launch per layer less). The arithmetic is the [K, N] GEMV's (`gemv_kn_m*_bf16`):
/// the same partial sums added in the same order, so the two paths agree bit for bit.
pub struct LatentAbsorb<'a> {
    /// The queries [T, heads, >= qk_nope] (unit inner stride, any outer strides); `None`: those
    /// that [`LatentRope::q`] rotates in the same launch (the absorb reads only the first
    /// qk_nope values of each head, the rotation writes only the last rope values).
    pub q: Option<View<'a, bf16>>,
    /// kv_b_proj [heads · (qk_nope + v_head), kv_r], contiguous, 16-byte aligned, kv_r a
    /// multiple of 8 (whole 16-byte weight loads).
    pub kv_b: View<'a, bf16>,
    pub qk_nope: usize,
    pub v_head: usize,
    /// q_abs [T, heads, kv_r], contiguous.
    pub out: ViewMut<'a, bf16>,
}

/// Whether the append's launch can absorb W_UK for `tokens` rows of qk_nope `dn` against a
/// kv_b of rows of `kv_r` values at address `kv_b` (the launcher's rule, for callers choosing
/// between the fused and the separate path): 1 to [`ABSORB_MAX_ROWS`] rows, 16-byte aligned
/// weight rows, and shared memory for the split-K partials ([8][tokens][ABSORB_TILE] f32 and the
/// norm's 32 floats) and the head's queries ([dn][tokens] f32) within the default 48 KiB.
pub fn absorb_fits(tokens: usize, dn: usize, kv_r: usize, kv_b: u64) -> bool {
    let smem = (8 * tokens * ABSORB_TILE + 32 + tokens * dn) * 4;
    (1..=ABSORB_MAX_ROWS).contains(&tokens)
        && dn > 0
        && kv_r.is_multiple_of(8)
        && kv_b.is_multiple_of(16)
        && smem <= 48 * 1024
}

/// The absorb kernels' extra arguments and grid, checked against the append's `tokens` and the
/// rope blocks' grid height.
struct AbsorbArgs {
    q: u64,
    q_rs: i64,
    q_hs: i64,
    kv_b: u64,
    out: u64,
    heads: i32,
    dn: i32,
    dv: i32,
    kv_r: i32,
    /// Grid columns past the tokens' (absorb blocks = heads × column tiles, `grid_y` a column).
    grid_x: u32,
    shared_mem_bytes: u32,
}

impl LatentAbsorb<'_> {
    fn kernel_args(
        &self,
        op: &'static str,
        rope_q: Option<&View<'_, bf16>>,
        tokens: usize,
        grid_y: u32,
    ) -> Result<AbsorbArgs> {
        let q = match (&self.q, rope_q) {
            (Some(q), _) => q,
            (None, Some(q)) => q,
            (None, None) => {
                return Err(shape_err(
                    op,
                    "the absorb was given no queries and the rope rotates none",
                ));
            }
        };
        expect_rows(q, op, "q", &[Some(tokens), None, None])?;
        let (heads, qd) = (q.shape()[1], q.shape()[2]);
        let (dn, dv) = (self.qk_nope, self.v_head);
        if dn == 0 || dn > qd {
            return Err(shape_err(
                op,
                format!("qk_nope {dn} does not fit query heads of {qd} values"),
            ));
        }
        self.kv_b
            .expect(op, "kv_b", &[Some(heads * (dn + dv)), None])?;
        let kv_r = self.kv_b.shape()[1];
        self.out
            .expect(op, "q_abs", &[Some(tokens), Some(heads), Some(kv_r)])?;
        if !absorb_fits(tokens, dn, kv_r, self.kv_b.ptr()) {
            return Err(KernelError::Unsupported {
                op,
                what: format!(
                    "absorb of {tokens} rows (at most {ABSORB_MAX_ROWS}), qk_nope {dn} (its rows \
                     and the partial sums in 48 KiB of shared memory), kv_b rows of {kv_r} values \
                     at {:#x} (16-byte aligned rows)",
                    self.kv_b.ptr()
                ),
            });
        }
        let blocks = heads * kv_r.div_ceil(ABSORB_TILE);
        let grid_x = u32::try_from(blocks.div_ceil(grid_y.max(1) as usize))
            .ok()
            .filter(|&x| x < 1 << 30)
            .ok_or_else(|| {
                shape_err(
                    op,
                    format!("{blocks} absorb blocks exceed the grid's width"),
                )
            })?;
        Ok(AbsorbArgs {
            q: q.ptr(),
            q_rs: q.strides()[0] as i64,
            q_hs: q.strides()[1] as i64,
            kv_b: self.kv_b.ptr(),
            out: self.out.ptr(),
            heads: dim_i32(op, "heads", heads)?,
            dn: dim_i32(op, "qk_nope", dn)?,
            dv: dim_i32(op, "v_head", dv)?,
            kv_r: dim_i32(op, "kv_b columns", kv_r)?,
            grid_x,
            shared_mem_bytes: (tokens * dn * 4) as u32,
        })
    }
}

/// Positions i32 [T] and the table for [`LatentAppendParams::rope`]; with `q` (the step's
/// queries [T, heads, head_dim]) the append's launch also rotates the last rope_dim values of
/// every query head in place, exactly as `rope_bf16` with `rope_offset = head_dim - rope_dim`
/// would (one launch less per layer).
pub struct LatentRope<'a> {
    pub positions: View<'a, i32>,
    pub table: &'a crate::rope::RopeTable,
    pub q: Option<ViewMut<'a, bf16>>,
}

/// The append kernels' rope arguments: positions, cos, sin, max_pos, then the queries (address,
/// heads, head_dim) and the grid's height (1 + the blocks that rotate query heads).
pub(crate) struct AppendRopeArgs {
    pub pos: u64,
    pub cos: u64,
    pub sin: u64,
    pub max_pos: i32,
    pub q: u64,
    pub q_heads: i32,
    pub q_head_dim: i32,
    pub grid_y: u32,
}

/// Query heads one append block rotates (ROPE_Q_HEADS in common.cuh).
const ROPE_Q_HEADS: usize = 8;

impl LatentRope<'_> {
    /// The append kernels' rope arguments for `tokens` keys of `rope_dim` rotated dims; `None`
    /// gives the kernels' "no rope" zeros.
    pub(crate) fn kernel_args(
        rope: Option<&Self>,
        op: &'static str,
        tokens: usize,
        rope_dim: usize,
    ) -> Result<AppendRopeArgs> {
        let Some(rope) = rope else {
            return Ok(AppendRopeArgs {
                pos: 0,
                cos: 0,
                sin: 0,
                max_pos: 0,
                q: 0,
                q_heads: 0,
                q_head_dim: 0,
                grid_y: 1,
            });
        };
        rope.positions.expect(op, "positions", &[Some(tokens)])?;
        if rope.table.rope_dim != rope_dim || !rope_dim.is_multiple_of(2) {
            return Err(shape_err(
                op,
                format!(
                    "rope table rotates {} dims, the key has {rope_dim}",
                    rope.table.rope_dim
                ),
            ));
        }
        let (q, q_heads, q_head_dim) = match &rope.q {
            None => (0, 0, 0),
            Some(q) => {
                q.expect(op, "q", &[Some(tokens), None, None])?;
                let (heads, hd) = (q.shape()[1], q.shape()[2]);
                if hd < rope_dim || !(hd - rope_dim).is_multiple_of(2) {
                    return Err(shape_err(
                        op,
                        format!(
                            "query heads of {hd} values cannot end in a rope part of {rope_dim}"
                        ),
                    ));
                }
                (q.ptr(), heads, hd)
            }
        };
        Ok(AppendRopeArgs {
            pos: rope.positions.ptr(),
            cos: rope.table.cos_ptr(),
            sin: rope.table.sin_ptr(),
            max_pos: dim_i32(op, "max_pos", rope.table.max_pos)?,
            q,
            q_heads: dim_i32(op, "query heads", q_heads)?,
            q_head_dim: dim_i32(op, "query head dim", q_head_dim)?,
            grid_y: 1 + q_heads.div_ceil(ROPE_Q_HEADS) as u32,
        })
    }
}

pub fn mla_latent_append(gpu: &Gpu, p: LatentAppendParams<'_>) -> Result<()> {
    const OP: &str = "mla_latent_append_bf16";
    let width = p.kva.shape().last().copied().unwrap_or(0);
    match p.kva.shape().len() {
        3 => p.kva.expect(OP, "kva", &[None, Some(1), Some(width)])?,
        _ => p.kva.expect(OP, "kva", &[None, Some(width)])?,
    }
    let tokens = p.kva.shape()[0];
    if p.kv_lora == 0 || p.kv_lora > width {
        return Err(shape_err(
            OP,
            format!("kv_lora {} does not fit width {width}", p.kv_lora),
        ));
    }
    p.norm_w.expect(OP, "norm_w", &[Some(p.kv_lora)])?;
    p.slots.expect(OP, "slots", &[Some(tokens)])?;
    p.cache.expect(OP, "cache", &[None, None, Some(width)])?;
    if tokens == 0 {
        return Ok(());
    }
    let num_slots = (p.cache.shape()[0] * p.cache.shape()[1]) as i64;
    let (k, w, s, c) = (p.kva.ptr(), p.norm_w.ptr(), p.slots.ptr(), p.cache.ptr());
    let (t, rr, dr) = (
        dim_i32(OP, "tokens", tokens)?,
        dim_i32(OP, "kv_lora", p.kv_lora)?,
        dim_i32(OP, "rope", width - p.kv_lora)?,
    );
    let eps = p.eps;
    let ra = LatentRope::kernel_args(p.rope.as_ref(), OP, tokens, width - p.kv_lora)?;
    let Some(absorb) = &p.absorb else {
        let f = gpu.function(OP)?;
        let mut b = gpu.launch(f);
        b.arg(&k)
            .arg(&w)
            .arg(&s)
            .arg(&c)
            .arg(&t)
            .arg(&rr)
            .arg(&dr)
            .arg(&num_slots)
            .arg(&eps)
            .arg(&ra.pos)
            .arg(&ra.cos)
            .arg(&ra.sin)
            .arg(&ra.max_pos)
            .arg(&ra.q)
            .arg(&ra.q_heads)
            .arg(&ra.q_head_dim);
        let mut cfg = super::per_row(tokens, APPEND_THREADS);
        cfg.grid_dim.1 = ra.grid_y;
        // SAFETY: matches mla_latent_append_bf16's signature; shapes checked above (the queries
        // by kernel_args), the kernel bounds-checks slots against num_slots.
        unsafe { b.launch(cfg) }?;
        return Ok(());
    };
    const ABSORB_OP: &str = "mla_latent_append_absorb_bf16";
    let rope_q = p
        .rope
        .as_ref()
        .and_then(|r| r.q.as_ref())
        .map(|q| q.as_view());
    let aa = absorb.kernel_args(ABSORB_OP, rope_q.as_ref(), tokens, ra.grid_y)?;
    let f = gpu.function(&format!("mla_latent_append_absorb_m{tokens}_bf16"))?;
    let mut b = gpu.launch(f);
    b.arg(&k)
        .arg(&w)
        .arg(&s)
        .arg(&c)
        .arg(&rr)
        .arg(&dr)
        .arg(&num_slots)
        .arg(&eps)
        .arg(&ra.pos)
        .arg(&ra.cos)
        .arg(&ra.sin)
        .arg(&ra.max_pos)
        .arg(&ra.q)
        .arg(&ra.q_heads)
        .arg(&ra.q_head_dim)
        .arg(&aa.q)
        .arg(&aa.q_rs)
        .arg(&aa.q_hs)
        .arg(&aa.kv_b)
        .arg(&aa.out)
        .arg(&aa.heads)
        .arg(&aa.dn)
        .arg(&aa.dv)
        .arg(&aa.kv_r);
    let cfg = LaunchConfig {
        // columns x < tokens: the append's blocks; the rest: absorb blocks
        grid_dim: (tokens as u32 + aa.grid_x, ra.grid_y, 1),
        block_dim: (APPEND_THREADS, 1, 1),
        shared_mem_bytes: aa.shared_mem_bytes,
    };
    // SAFETY: matches mla_latent_append_absorb_m{tokens}_bf16's signature (tokens in 1..=4, the
    // kernel's M); the append's shapes checked above, the absorb's by kernel_args (q rows and
    // head strides address [tokens, heads, >= dn], kv_b holds heads·(dn + dv) rows of kv_r,
    // q_abs [tokens, heads, kv_r] contiguous); the dynamic shared memory holds tokens·dn floats.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// out[i] = cache slot `slots[i]` for a cache [num_blocks, block_size, width] (bf16): gathers a
/// sequence's latent context in position order. slots i32 [n] (each < num_blocks * block_size,
/// checked on the host by the caller's construction), out [n, width]; width a multiple of 8.
/// Runs moe.cu's row gather (`moe_gather_bf16`) over the cache seen as [slots, width].
pub struct GatherSlotsParams<'a> {
    pub cache: View<'a, bf16>,
    pub slots: View<'a, i32>,
    pub out: ViewMut<'a, bf16>,
}

pub fn gather_slots(gpu: &Gpu, p: GatherSlotsParams<'_>) -> Result<()> {
    const OP: &str = "moe_gather_bf16";
    p.cache.expect(OP, "cache", &[None, None, None])?;
    let width = p.cache.shape()[2];
    p.slots.expect(OP, "slots", &[None])?;
    let n = p.slots.shape()[0];
    p.out.expect(OP, "out", &[Some(n), Some(width)])?;
    if !width.is_multiple_of(8) {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("cache width {width} is not a multiple of 8 (16-byte rows)"),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let (x, s, o) = (p.cache.ptr(), p.slots.ptr(), p.out.ptr());
    let (r, h) = (dim_i32(OP, "rows", n)?, dim_i32(OP, "width", width)?);
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&x).arg(&s).arg(&o).arg(&r).arg(&h);
    // SAFETY: matches moe_gather_bf16(x, src_row, out, n_rows, hidden); out holds n rows of width.
    unsafe { b.launch(super::per_row(n, 128)) }?;
    Ok(())
}

/// Causal attention over a gathered context (token t at position t), query row i at position
/// `pos0 + i` attending tokens `0..=pos0+i`:
/// `out[i,h] = sum_t softmax_t(scale * (q1[i,h]·k1[t,h] + q2[i,h]·k2[t])) v[t,h]`.
/// q1 [N, H, d1], q2 [N, H, d2] (any outer strides); k1 [ctx, H, d1] or [ctx, d1] (shared by all
/// heads); k2 [ctx, d2] (shared); v [ctx, H, dv] or [ctx, dv]; out [N, H, dv] contiguous. bf16.
pub struct AttnCausalParams<'a> {
    pub q1: View<'a, bf16>,
    pub q2: View<'a, bf16>,
    pub k1: View<'a, bf16>,
    pub k2: View<'a, bf16>,
    pub v: View<'a, bf16>,
    pub out: ViewMut<'a, bf16>,
    pub pos0: usize,
    pub scale: f32,
}

/// (token stride, head stride) of a [ctx, H, d] or head-shared [ctx, d] operand.
fn kv_strides(
    op: &'static str,
    name: &'static str,
    v: &View<'_, bf16>,
    ctx: usize,
    heads: usize,
    d: usize,
) -> Result<(i64, i64)> {
    match v.shape().len() {
        2 => {
            expect_rows(v, op, name, &[Some(ctx), Some(d)])?;
            Ok((v.strides()[0] as i64, 0))
        }
        _ => {
            expect_rows(v, op, name, &[Some(ctx), Some(heads), Some(d)])?;
            Ok((v.strides()[0] as i64, v.strides()[1] as i64))
        }
    }
}

pub fn mla_attn_causal(gpu: &Gpu, p: AttnCausalParams<'_>) -> Result<()> {
    const OP: &str = "mla_attn_causal_bf16";
    expect_rows(&p.q1, OP, "q1", &[None, None, None])?;
    let (n, heads, d1) = (p.q1.shape()[0], p.q1.shape()[1], p.q1.shape()[2]);
    expect_rows(&p.q2, OP, "q2", &[Some(n), Some(heads), None])?;
    let d2 = p.q2.shape()[2];
    let ctx = p.k2.shape().first().copied().unwrap_or(0);
    let (k2_ts, k2_hs) = kv_strides(OP, "k2", &p.k2, ctx, heads, d2)?;
    let (k1_ts, k1_hs) = kv_strides(OP, "k1", &p.k1, ctx, heads, d1)?;
    let dv = *p.v.shape().last().unwrap_or(&0);
    let (v_ts, v_hs) = kv_strides(OP, "v", &p.v, ctx, heads, dv)?;
    p.out.expect(OP, "out", &[Some(n), Some(heads), Some(dv)])?;
    if n == 0 || heads == 0 {
        return Ok(());
    }
    if ctx == 0 || p.pos0 >= ctx {
        return Err(shape_err(
            OP,
            format!(
                "query 0 is at position {} but the context has {ctx} tokens",
                p.pos0
            ),
        ));
    }
    if n > 65535 {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("{n} query rows > 65535 (grid y)"),
        });
    }
    let smem = (d1 + d2 + dv + ATT_THREADS) * 4;
    if smem > 48 * 1024 {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("head dims {d1}+{d2}+{dv} need {smem} B of shared memory (max 48 KiB)"),
        });
    }
    let (q1, q2, k1, k2, v, o) = (
        p.q1.ptr(),
        p.q2.ptr(),
        p.k1.ptr(),
        p.k2.ptr(),
        p.v.ptr(),
        p.out.ptr(),
    );
    let (q1_rs, q1_hs) = (p.q1.strides()[0] as i64, p.q1.strides()[1] as i64);
    let (q2_rs, q2_hs) = (p.q2.strides()[0] as i64, p.q2.strides()[1] as i64);
    let (ni, hi, d1i, d2i, dvi) = (
        dim_i32(OP, "rows", n)?,
        dim_i32(OP, "heads", heads)?,
        dim_i32(OP, "d1", d1)?,
        dim_i32(OP, "d2", d2)?,
        dim_i32(OP, "dv", dv)?,
    );
    let (pos0, ctxi) = (dim_i32(OP, "pos0", p.pos0)?, dim_i32(OP, "ctx", ctx)?);
    let scale = p.scale;
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&q1).arg(&q1_rs).arg(&q1_hs);
    b.arg(&q2).arg(&q2_rs).arg(&q2_hs);
    b.arg(&k1).arg(&k1_ts).arg(&k1_hs);
    b.arg(&k2).arg(&k2_ts).arg(&k2_hs);
    b.arg(&v).arg(&v_ts).arg(&v_hs);
    b.arg(&o)
        .arg(&ni)
        .arg(&hi)
        .arg(&d1i)
        .arg(&d2i)
        .arg(&dvi)
        .arg(&pos0)
        .arg(&ctxi)
        .arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: (heads as u32, n as u32, 1),
        block_dim: (ATT_THREADS as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: matches mla_attn_causal_bf16's signature; every operand's shape and strides were
    // checked against (n, heads, ctx, d1, d2, dv) above and the views live for 'a.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// (rows, cols, row stride) of a 2-D view, or of a 3-D view whose two leading dims flatten into
/// one uniformly strided row dim (e.g. a last-dim slice [n, H, d] of a contiguous [n, H, D]).
fn as_rows(
    op: &'static str,
    name: &'static str,
    v: &View<'_, bf16>,
) -> Result<(usize, usize, i64)> {
    let (sh, st) = (v.shape(), v.strides());
    let inner_ok = sh.last().is_none_or(|&d| d <= 1) || st.last() == Some(&1);
    let flat = match sh.len() {
        2 => Some((sh[0], sh[1], st[0])),
        3 if sh[0] <= 1 || st[0] == sh[1] * st[1] => Some((sh[0] * sh[1], sh[2], st[1])),
        _ => None,
    };
    match flat {
        Some((r, c, s)) if inner_ok => Ok((r, c, s as i64)),
        _ => Err(KernelError::NotContiguous {
            op,
            tensor: name,
            shape: sh.to_vec(),
            strides: st.to_vec(),
        }),
    }
}

/// dst = src for [rows, cols] bf16 views with unit inner stride and any row stride; 3-D views
/// whose leading dims flatten to one row dim are accepted too (see `as_rows`).
pub fn copy_rows(gpu: &Gpu, src: View<'_, bf16>, dst: ViewMut<'_, bf16>) -> Result<()> {
    const OP: &str = "copy_rows_bf16";
    let (rows, cols, srs) = as_rows(OP, "src", &src)?;
    let (drows, dcols, drs) = as_rows(OP, "dst", &dst.as_view())?;
    if (rows, cols) != (drows, dcols) {
        return Err(shape_err(
            OP,
            format!("src {:?} and dst {:?} differ", src.shape(), dst.shape()),
        ));
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let (s, d) = (src.ptr(), dst.ptr());
    let (ri, ci) = (dim_i32(OP, "rows", rows)?, dim_i32(OP, "cols", cols)?);
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&s).arg(&srs).arg(&d).arg(&drs).arg(&ri).arg(&ci);
    // SAFETY: matches copy_rows_bf16; both views hold rows x cols elements at their row strides.
    unsafe { b.launch(grid_for(rows * cols, 256, (gpu.sm_count * 16) as u32)) }?;
    Ok(())
}

/// acc <- bf16(acc + x), contiguous views of the same shape.
pub fn add(gpu: &Gpu, acc: ViewMut<'_, bf16>, x: View<'_, bf16>) -> Result<()> {
    const OP: &str = "add_bf16";
    let dims: Vec<Option<usize>> = acc.shape().iter().map(|&d| Some(d)).collect();
    acc.expect(OP, "acc", &dims)?;
    x.expect(OP, "x", &dims)?;
    let n = acc.shape().iter().product::<usize>();
    if n == 0 {
        return Ok(());
    }
    let (a, xp, nn) = (acc.ptr(), x.ptr(), n as i64);
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&a).arg(&xp).arg(&nn);
    // SAFETY: matches add_bf16(acc, x, n); both contiguous with n elements.
    unsafe { b.launch(grid_for(n, 256, (gpu.sm_count * 16) as u32)) }?;
    Ok(())
}

/// y = bf16(x), contiguous views of the same shape.
pub fn cast_f32_bf16(gpu: &Gpu, x: View<'_, f32>, y: ViewMut<'_, bf16>) -> Result<()> {
    const OP: &str = "cast_f32_bf16";
    let dims: Vec<Option<usize>> = x.shape().iter().map(|&d| Some(d)).collect();
    x.expect(OP, "x", &dims)?;
    y.expect(OP, "y", &dims)?;
    let n = x.shape().iter().product::<usize>();
    if n == 0 {
        return Ok(());
    }
    let (xp, yp, nn) = (x.ptr(), y.ptr(), n as i64);
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&xp).arg(&yp).arg(&nn);
    // SAFETY: matches cast_f32_bf16(x, y, n); both contiguous with n elements.
    unsafe { b.launch(grid_for(n, 256, (gpu.sm_count * 16) as u32)) }?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// references (f32) and checks

/// Reference of [`mla_attn_causal`] with contiguous operands: q1 [n, h, d1], q2 [n, h, d2],
/// k1 [ctx, h, d1] (or [ctx, d1] if `shared_k1v`), k2 [ctx, d2], v like k1 with dv.
#[allow(clippy::too_many_arguments)]
pub fn attn_causal_ref(
    q1: &[f32],
    q2: &[f32],
    k1: &[f32],
    k2: &[f32],
    v: &[f32],
    n: usize,
    heads: usize,
    dims: (usize, usize, usize),
    shared_k1v: bool,
    pos0: usize,
    scale: f32,
) -> Vec<f32> {
    let (d1, d2, dv) = dims;
    let mut out = vec![0f32; n * heads * dv];
    for i in 0..n {
        for h in 0..heads {
            let qa = &q1[(i * heads + h) * d1..][..d1];
            let qb = &q2[(i * heads + h) * d2..][..d2];
            let last = pos0 + i;
            let mut s: Vec<f64> = (0..=last)
                .map(|t| {
                    let ka = if shared_k1v {
                        &k1[t * d1..][..d1]
                    } else {
                        &k1[(t * heads + h) * d1..][..d1]
                    };
                    let kb = &k2[t * d2..][..d2];
                    let d: f64 = qa
                        .iter()
                        .zip(ka)
                        .map(|(a, b)| (*a * *b) as f64)
                        .sum::<f64>()
                        + qb.iter()
                            .zip(kb)
                            .map(|(a, b)| (*a * *b) as f64)
                            .sum::<f64>();
                    d * scale as f64
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for x in s.iter_mut() {
                *x = (*x - m).exp();
                sum += *x;
            }
            let o = &mut out[(i * heads + h) * dv..][..dv];
            for (t, pt) in s.iter().enumerate() {
                let vr = if shared_k1v {
                    &v[t * dv..][..dv]
                } else {
                    &v[(t * heads + h) * dv..][..dv]
                };
                for (o, x) in o.iter_mut().zip(vr) {
                    *o += (pt / sum * *x as f64) as f32;
                }
            }
        }
    }
    out
}

fn rand_bf16(g: &mut ChaCha8Rng, n: usize, scale: f32) -> (Vec<bf16>, Vec<f32>) {
    let b: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(g.random_range(-scale..scale)))
        .collect();
    let f = b.iter().map(|v| v.to_f32()).collect();
    (b, f)
}

fn row(op: &str, sizes: String, got: &[f32], want: &[f32], tol: f32) -> CheckRow {
    let (max_abs, rel_l2) = r::errors(got, want);
    CheckRow {
        op: op.into(),
        sizes,
        max_abs,
        rel_l2,
        tol,
        pass: got.len() == want.len() && rel_l2 <= tol,
        note: String::new(),
    }
}

/// `mla_attn_causal` on n query rows at positions ctx-n .. ctx-1 with q1/q2 read as strided
/// slices of one [n, heads, d1 + d2] tensor (as the backend passes them). `shared`: absorbed form
/// (k1 = v = one latent shared by all heads); else per-head K/V. Tolerance 1e-2 (bf16 output).
pub fn check_attn_causal(
    gpu: &Gpu,
    n: usize,
    ctx: usize,
    heads: usize,
    dims: (usize, usize, usize),
    shared: bool,
) -> Result<CheckRow> {
    let (d1, d2, dv) = dims;
    let mut g = ChaCha8Rng::seed_from_u64(21);
    let (qb, qf) = rand_bf16(&mut g, n * heads * (d1 + d2), 0.5);
    let kh = if shared { 1 } else { heads };
    let (k1b, k1f) = rand_bf16(&mut g, ctx * kh * d1, 1.0);
    let (k2b, k2f) = rand_bf16(&mut g, ctx * d2, 1.0);
    let (vb, vf) = rand_bf16(&mut g, ctx * kh * dv, 1.0);
    let q = Tensor::from_host(gpu, &qb, &[n, heads, d1 + d2])?;
    let k1s: Vec<usize> = if shared {
        vec![ctx, d1]
    } else {
        vec![ctx, heads, d1]
    };
    let vs: Vec<usize> = if shared {
        vec![ctx, dv]
    } else {
        vec![ctx, heads, dv]
    };
    let k1 = Tensor::from_host(gpu, &k1b, &k1s)?;
    let k2 = Tensor::from_host(gpu, &k2b, &[ctx, d2])?;
    let v = Tensor::from_host(gpu, &vb, &vs)?;
    let mut out = Tensor::<bf16>::zeros(gpu, &[n, heads, dv])?;
    let pos0 = ctx - n;
    let scale = 1.0 / ((d1 + d2) as f32).sqrt();
    mla_attn_causal(
        gpu,
        AttnCausalParams {
            q1: q.view().narrow(2, 0, d1)?,
            q2: q.view().narrow(2, d1, d2)?,
            k1: k1.view(),
            k2: k2.view(),
            v: v.view(),
            out: out.view_mut(),
            pos0,
            scale,
        },
    )?;
    let got: Vec<f32> = out.to_host(gpu)?.iter().map(|x| x.to_f32()).collect();
    // the reference takes q1 and q2 contiguous
    let (mut q1f, mut q2f) = (Vec::new(), Vec::new());
    for rh in qf.chunks(d1 + d2) {
        q1f.extend_from_slice(&rh[..d1]);
        q2f.extend_from_slice(&rh[d1..]);
    }
    let want = attn_causal_ref(
        &q1f, &q2f, &k1f, &k2f, &vf, n, heads, dims, shared, pos0, scale,
    );
    Ok(row(
        "mla_attn_causal_bf16",
        format!(
            "rows {n} ctx {ctx} heads {heads} d {d1}+{d2}/{dv} {}",
            if shared { "absorbed" } else { "naive" }
        ),
        &got,
        &want,
        1e-2,
    ))
}

/// acc[idx[i]] += f32(src[i]) for every row i of `src`: acc f32 [rows, cols], src bf16 [n, cols],
/// idx i32 [n], all contiguous. The indices must be distinct within one call (rows of one expert
/// shard); an index outside 0..rows is skipped by the kernel.
pub fn rows_add_f32(
    gpu: &Gpu,
    acc: ViewMut<'_, f32>,
    src: View<'_, bf16>,
    idx: View<'_, i32>,
) -> Result<()> {
    const OP: &str = "rows_add_f32";
    acc.expect(OP, "acc", &[None, None])?;
    let (rows, cols) = (acc.shape()[0], acc.shape()[1]);
    src.expect(OP, "src", &[None, Some(cols)])?;
    let n = src.shape()[0];
    idx.expect(OP, "idx", &[Some(n)])?;
    if n == 0 || cols == 0 {
        return Ok(());
    }
    let (a, s, i) = (acc.ptr(), src.ptr(), idx.ptr());
    let (ni, ri, ci) = (
        dim_i32(OP, "n", n)?,
        dim_i32(OP, "rows", rows)?,
        dim_i32(OP, "cols", cols)?,
    );
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&a).arg(&s).arg(&i).arg(&ni).arg(&ri).arg(&ci);
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches rows_add_f32; acc holds rows x cols f32, src n x cols bf16, idx n i32 (all
    // contiguous, checked above); the kernel skips indices outside 0..rows.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `rows_add_f32` twice (two shards with overlapping row sets, one index out of range) against
/// the f32 reference; the result must be exact (one f32 add per element and launch).
pub fn check_rows_add(gpu: &Gpu, rows: usize, cols: usize) -> Result<CheckRow> {
    let mut g = ChaCha8Rng::seed_from_u64(23);
    let acc0: Vec<f32> = (0..rows * cols)
        .map(|_| g.random_range(-1.0f32..1.0))
        .collect();
    let mut want = acc0.clone();
    let mut acc = Tensor::from_host(gpu, &acc0, &[rows, cols])?;
    for shard in 0..2 {
        let mut idx: Vec<i32> = (0..rows as i32)
            .filter(|r| !(*r as usize + shard).is_multiple_of(3))
            .collect();
        for i in (1..idx.len()).rev() {
            let j = g.random_range(0..=i);
            idx.swap(i, j);
        }
        if shard == 1 {
            idx.push(rows as i32); // out of range: skipped
        }
        let (sb, sf) = rand_bf16(&mut g, idx.len() * cols, 1.0);
        for (i, &r) in idx.iter().enumerate() {
            if (r as usize) < rows {
                for c in 0..cols {
                    want[r as usize * cols + c] += sf[i * cols + c];
                }
            }
        }
        let src = Tensor::from_host(gpu, &sb, &[idx.len(), cols])?;
        let it = Tensor::from_host(gpu, &idx, &[idx.len()])?;
        rows_add_f32(gpu, acc.view_mut(), src.view(), it.view())?;
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    Ok(CheckRow::exact(
        "rows_add_f32",
        format!("rows {rows} cols {cols}, 2 shards"),
        &bits(&acc.to_host(gpu)?),
        &bits(&want),
    ))
}

/// The cache slots of an append check: `tokens` distinct slots of a cache of `nblocks` blocks of
/// `block` slots, shuffled, the second one -1 (skipped) where there are more than two tokens.
/// Returns (slots, block, nblocks).
pub(crate) fn append_slots(g: &mut ChaCha8Rng, tokens: usize) -> (Vec<i64>, usize, usize) {
    let (block, nblocks) = (4usize, (tokens + 5).div_ceil(4));
    let mut slots: Vec<i64> = (0..(block * nblocks) as i64).collect();
    for i in (1..slots.len()).rev() {
        let j = g.random_range(0..=i);
        slots.swap(i, j);
    }
    slots.truncate(tokens);
    if tokens > 2 {
        slots[1] = -1;
    }
    (slots, block, nblocks)
}

/// `mla_latent_append` of `tokens` rows into a shuffled set of slots (one slot left out as -1).
pub fn check_latent_append(
    gpu: &Gpu,
    tokens: usize,
    kv_lora: usize,
    rope: usize,
    rotate: bool,
) -> Result<CheckRow> {
    let mut g = ChaCha8Rng::seed_from_u64(22);
    let width = kv_lora + rope;
    let (kb, kf) = rand_bf16(&mut g, tokens * width, 2.0);
    let (wb, wf) = rand_bf16(&mut g, kv_lora, 1.5);
    let (slots, block, nblocks) = append_slots(&mut g, tokens);
    let num_slots = block * nblocks;
    let kva = Tensor::from_host(gpu, &kb, &[tokens, width])?;
    let w = Tensor::from_host(gpu, &wb, &[kv_lora])?;
    let st = Tensor::from_host(gpu, &slots, &[tokens])?;
    let mut cache = Tensor::<bf16>::zeros(gpu, &[nblocks, block, width])?;
    let eps = 1e-6;
    // positions for the rotating variant: the last one outside the table (left unrotated)
    let max_pos = 4096;
    let mut positions: Vec<i32> = (0..tokens)
        .map(|_| g.random_range(0..max_pos as i32))
        .collect();
    if let Some(last) = positions.last_mut().filter(|_| tokens > 1) {
        *last = max_pos as i32 + 3;
    }
    let (cos, sin) = crate::rope::yarn_cos_sin(
        &crate::rope::YarnConfig {
            dim: rope,
            ..crate::rope::YarnConfig::deepseek_v2()
        },
        max_pos,
    );
    let table = crate::rope::RopeTable::from_host(gpu, &cos, &sin, max_pos, rope)?;
    let pt = Tensor::from_host(gpu, &positions, &[tokens])?;
    // with rope, the queries too: 17 heads (two full blocks of 8 and one of 1) of 24 + rope values
    let (q_heads, q_dim) = (17usize, 24 + rope);
    let (qb, mut qf) = rand_bf16(&mut g, tokens * q_heads * q_dim, 2.0);
    let mut q = Tensor::from_host(gpu, &qb, &[tokens, q_heads, q_dim])?;
    mla_latent_append(
        gpu,
        LatentAppendParams {
            kva: kva.view(),
            norm_w: w.view(),
            slots: st.view(),
            cache: cache.view_mut(),
            kv_lora,
            eps,
            rope: rotate.then(|| LatentRope {
                positions: pt.view(),
                table: &table,
                q: Some(q.view_mut()),
            }),
            absorb: None,
        },
    )?;
    let mut kf = kf;
    if rotate {
        // the reference rotates in place: rows of one "head" of `width` values
        let mut rows = kf.clone();
        r::rope(&mut rows, 1, width, kv_lora, rope, &positions, &cos, &sin);
        kf = rows;
        r::rope(
            &mut qf,
            q_heads,
            q_dim,
            q_dim - rope,
            rope,
            &positions,
            &cos,
            &sin,
        );
    }
    let mut got: Vec<f32> = cache.to_host(gpu)?.iter().map(|x| x.to_f32()).collect();
    let mut want = vec![0f32; num_slots * width];
    for (t, &s) in slots.iter().enumerate() {
        if s < 0 {
            continue;
        }
        let src = &kf[t * width..(t + 1) * width];
        let dst = &mut want[s as usize * width..][..width];
        dst[..kv_lora].copy_from_slice(&r::rmsnorm(&src[..kv_lora], &wf, eps));
        dst[kv_lora..].copy_from_slice(&src[kv_lora..]);
    }
    // the queries after the launch: rotated with rope, untouched without
    got.extend(q.to_host(gpu)?.iter().map(|x| x.to_f32()));
    want.extend(qf.iter().map(|&v| r::bf(v)));
    Ok(row(
        "mla_latent_append_bf16",
        format!(
            "tokens {tokens} latent {kv_lora}+{rope}{}",
            if rotate {
                " with rope (and 17 query heads)"
            } else {
                ""
            }
        ),
        &got,
        &want,
        1e-2,
    ))
}
