//! Launchers for mla_fp8.cu's append (RMSNorm + RoPE + per-token quantizer into the FP8 latent
//! cache) and gather (cached rows dequantized to bf16). The layout and the quantizer are
//! `crate::fp8`'s; the FP8 decode kernel's launcher sits beside the bf16 ones
//! (`mla::mla_decode_fp8`).

use half::bf16;

use super::dim_i32;
use super::general::LatentRope;
use crate::device::Gpu;
use crate::error::{Result, shape_err};
use crate::fp8::Fp8Layout;
use crate::tensor::{View, ViewMut};

/// Threads of one append block (the reduction is the bf16 append's, which uses 128 too: the
/// quantized values are bit for bit those the bf16 cache would hold).
const APPEND_THREADS: u32 = 128;

/// cache[slots[t]] = the FP8 row of [ norm_w * rmsnorm(kva[t, :r]) | rope(kva[t, r:]) ]
/// (`Fp8Layout::encode` of what `general::mla_latent_append` would store). kva [T, r + dr] or
/// [T, 1, r + dr], norm_w [r], slots i64 [T] (negative or out-of-range skipped), cache
/// [num_blocks, block_size, layout.row_bytes()] bytes.
pub struct LatentAppendFp8Params<'a> {
    pub kva: View<'a, bf16>,
    pub norm_w: View<'a, bf16>,
    pub slots: View<'a, i64>,
    pub cache: ViewMut<'a, u8>,
    pub layout: Fp8Layout,
    pub eps: f32,
    pub rope: Option<LatentRope<'a>>,
}

pub fn mla_latent_append_fp8(gpu: &Gpu, p: LatentAppendFp8Params<'_>) -> Result<()> {
    const OP: &str = "mla_latent_append_fp8";
    let l = Fp8Layout::new(p.layout.kv_lora, p.layout.rope).map_err(|e| shape_err(OP, e))?;
    let width = l.kv_lora + l.rope;
    match p.kva.shape().len() {
        3 => p.kva.expect(OP, "kva", &[None, Some(1), Some(width)])?,
        _ => p.kva.expect(OP, "kva", &[None, Some(width)])?,
    }
    let tokens = p.kva.shape()[0];
    p.norm_w.expect(OP, "norm_w", &[Some(l.kv_lora)])?;
    p.slots.expect(OP, "slots", &[Some(tokens)])?;
    p.cache
        .expect(OP, "cache", &[None, None, Some(l.row_bytes())])?;
    if tokens == 0 {
        return Ok(());
    }
    let num_slots = (p.cache.shape()[0] * p.cache.shape()[1]) as i64;
    let (k, w, s, c) = (p.kva.ptr(), p.norm_w.ptr(), p.slots.ptr(), p.cache.ptr());
    let (t, rr, dr) = (
        dim_i32(OP, "tokens", tokens)?,
        dim_i32(OP, "kv_lora", l.kv_lora)?,
        dim_i32(OP, "rope", l.rope)?,
    );
    let (row, pe, sc) = (
        l.row_bytes() as i32,
        l.pe_offset() as i32,
        l.scale_offset() as i32,
    );
    let eps = p.eps;
    let ra = LatentRope::kernel_args(p.rope.as_ref(), OP, tokens, l.rope)?;
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
        .arg(&row)
        .arg(&pe)
        .arg(&sc)
        .arg(&ra.q)
        .arg(&ra.q_heads)
        .arg(&ra.q_head_dim);
    let mut cfg = super::per_row(tokens, APPEND_THREADS);
    cfg.grid_dim.1 = ra.grid_y;
    // SAFETY: matches mla_latent_append_fp8's signature; shapes checked above (rows of
    // row_bytes, the offsets inside them by construction of Fp8Layout; the queries by
    // kernel_args), the kernel bounds-checks slots against num_slots.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// out[i] = cached token `slots[i]` dequantized to bf16: [bf16(decode(q) · scale) | k_pe], for
/// a cache [num_blocks, block_size, layout.row_bytes()] bytes; slots i32 [n] (each below
/// num_blocks · block_size: the callers build them from checked block tables), out
/// [n, kv_lora + rope] bf16. The prefill and general attention paths read the cached context
/// through this, in bf16 like the bf16 cache's.
pub struct GatherFp8Params<'a> {
    pub cache: View<'a, u8>,
    pub layout: Fp8Layout,
    pub slots: View<'a, i32>,
    pub out: ViewMut<'a, bf16>,
}

pub fn gather_slots_fp8(gpu: &Gpu, p: GatherFp8Params<'_>) -> Result<()> {
    const OP: &str = "mla_gather_fp8";
    let l = Fp8Layout::new(p.layout.kv_lora, p.layout.rope).map_err(|e| shape_err(OP, e))?;
    p.cache
        .expect(OP, "cache", &[None, None, Some(l.row_bytes())])?;
    p.slots.expect(OP, "slots", &[None])?;
    let n = p.slots.shape()[0];
    p.out
        .expect(OP, "out", &[Some(n), Some(l.kv_lora + l.rope)])?;
    if n == 0 {
        return Ok(());
    }
    let (c, s, o) = (p.cache.ptr(), p.slots.ptr(), p.out.ptr());
    let ni = dim_i32(OP, "rows", n)?;
    let (rr, dr) = (l.kv_lora as i32, l.rope as i32);
    let (row, pe, sc) = (
        l.row_bytes() as i32,
        l.pe_offset() as i32,
        l.scale_offset() as i32,
    );
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&c)
        .arg(&s)
        .arg(&o)
        .arg(&ni)
        .arg(&rr)
        .arg(&dr)
        .arg(&row)
        .arg(&pe)
        .arg(&sc);
    // SAFETY: matches mla_gather_fp8's signature; out holds n rows of kv_lora + rope bf16, the
    // cache rows are row_bytes long with the pieces where Fp8Layout puts them; slots are the
    // caller's, within the cache.
    unsafe { b.launch(super::per_row(n, 64)) }?;
    Ok(())
}
