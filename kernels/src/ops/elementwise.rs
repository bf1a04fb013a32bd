//! Launchers for elementwise.cu: embedding gather, RMSNorm (+ residual add), SiLU·mul, RoPE.

use half::bf16;

use super::{dim_i32, grid_for, per_row};
use crate::device::Gpu;
use crate::error::{KernelError, Result, shape_err};
use crate::rope::RopeTable;
use crate::tensor::{View, ViewMut};

fn need_mult8(op: &'static str, what: &str, v: usize) -> Result<()> {
    if v == 0 || !v.is_multiple_of(8) {
        return Err(KernelError::Unsupported {
            op,
            what: format!("{what} = {v} must be a positive multiple of 8 (16-byte vector access)"),
        });
    }
    Ok(())
}

/// `out[r] = table[ids[r]]`. table [vocab, hidden] bf16, ids [rows] i32, out [rows, hidden] bf16.
/// Ids outside the vocabulary give zero rows (ids are validated at the router's edge).
pub struct EmbeddingParams<'a> {
    pub table: View<'a, bf16>,
    pub ids: View<'a, i32>,
    pub out: ViewMut<'a, bf16>,
}

pub fn embedding(gpu: &Gpu, p: EmbeddingParams<'_>) -> Result<()> {
    const OP: &str = "embedding_bf16";
    p.table.expect(OP, "table", &[None, None])?;
    let (vocab, hidden) = (p.table.shape()[0], p.table.shape()[1]);
    p.ids.expect(OP, "ids", &[None])?;
    let rows = p.ids.shape()[0];
    p.out.expect(OP, "out", &[Some(rows), Some(hidden)])?;
    need_mult8(OP, "hidden", hidden)?;
    if rows == 0 {
        return Ok(());
    }
    let (t, i, o) = (p.table.ptr(), p.ids.ptr(), p.out.ptr());
    let (r, h, v) = (
        dim_i32(OP, "rows", rows)?,
        dim_i32(OP, "hidden", hidden)?,
        dim_i32(OP, "vocab", vocab)?,
    );
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&t).arg(&i).arg(&o).arg(&r).arg(&h).arg(&v);
    // SAFETY: argument list matches embedding_bf16's signature; all buffers were shape-checked above
    // and live for the borrow 'a, which outlasts the launch's use on this stream.
    unsafe { b.launch(per_row(rows, 128)) }?;
    Ok(())
}

/// RMSNorm: `out = w * x / sqrt(mean(x^2) + eps)`; with `residual`, first
/// `residual <- bf16(x + residual)` and the norm is taken of the updated residual.
/// x [rows, hidden], weight [hidden], out [rows, hidden], residual [rows, hidden] (all bf16).
pub struct RmsNormParams<'a> {
    pub x: View<'a, bf16>,
    pub weight: View<'a, bf16>,
    pub residual: Option<ViewMut<'a, bf16>>,
    pub out: ViewMut<'a, bf16>,
    pub eps: f32,
}

/// Threads of a norm block for rows of `hidden` values (the order of the sum of squares depends
/// on it, so a kernel that norms in its own launch uses the same: `moe_gate_gemv_f32`).
pub fn norm_threads(hidden: usize) -> usize {
    if hidden >= 4096 { 256 } else { 128 }
}

pub fn rmsnorm(gpu: &Gpu, p: RmsNormParams<'_>) -> Result<()> {
    const OP: &str = "rmsnorm_bf16";
    p.x.expect(OP, "x", &[None, None])?;
    let (rows, hidden) = (p.x.shape()[0], p.x.shape()[1]);
    p.weight.expect(OP, "weight", &[Some(hidden)])?;
    p.out.expect(OP, "out", &[Some(rows), Some(hidden)])?;
    if let Some(r) = &p.residual {
        r.expect(OP, "residual", &[Some(rows), Some(hidden)])?;
    }
    need_mult8(OP, "hidden", hidden)?;
    if rows == 0 {
        return Ok(());
    }
    let (x, w, o) = (p.x.ptr(), p.weight.ptr(), p.out.ptr());
    let (r, h) = (dim_i32(OP, "rows", rows)?, dim_i32(OP, "hidden", hidden)?);
    let eps = p.eps;
    let threads = norm_threads(hidden) as u32;
    match &p.residual {
        None => {
            let f = gpu.function(OP)?;
            let mut b = gpu.launch(f);
            b.arg(&x).arg(&w).arg(&o).arg(&r).arg(&h).arg(&eps);
            // SAFETY: matches rmsnorm_bf16(x, w, out, rows, hidden, eps); shapes checked above.
            unsafe { b.launch(per_row(rows, threads)) }?;
        }
        Some(res) => {
            let rp = res.ptr();
            let f = gpu.function("add_rmsnorm_bf16")?;
            let mut b = gpu.launch(f);
            b.arg(&x).arg(&rp).arg(&w).arg(&o).arg(&r).arg(&h).arg(&eps);
            // SAFETY: matches add_rmsnorm_bf16(x, residual, w, out, rows, hidden, eps); shapes checked.
            unsafe { b.launch(per_row(rows, threads)) }?;
        }
    }
    Ok(())
}

/// `out = silu(gate) * up` with input [rows, 2*inter] laid out gate | up, out [rows, inter].
pub struct SiluMulParams<'a> {
    pub input: View<'a, bf16>,
    pub out: ViewMut<'a, bf16>,
}

pub fn silu_mul(gpu: &Gpu, p: SiluMulParams<'_>) -> Result<()> {
    const OP: &str = "silu_mul_bf16";
    p.input.expect(OP, "input", &[None, None])?;
    let (rows, two_i) = (p.input.shape()[0], p.input.shape()[1]);
    if two_i % 2 != 0 {
        return Err(shape_err(
            OP,
            format!("input width {two_i} is not 2 * inter"),
        ));
    }
    let inter = two_i / 2;
    p.out.expect(OP, "out", &[Some(rows), Some(inter)])?;
    need_mult8(OP, "inter", inter)?;
    if rows == 0 {
        return Ok(());
    }
    let (i, o) = (p.input.ptr(), p.out.ptr());
    let (r, n) = (dim_i32(OP, "rows", rows)?, dim_i32(OP, "inter", inter)?);
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&i).arg(&o).arg(&r).arg(&n);
    // SAFETY: matches silu_mul_bf16(in, out, rows, inter); shapes checked above.
    unsafe { b.launch(grid_for(rows * inter / 8, 256, (gpu.sm_count * 16) as u32)) }?;
    Ok(())
}

/// In-place YaRN RoPE on `x` [tokens, heads, head_dim] (bf16, contiguous): the values
/// `rope_offset .. rope_offset + table.rope_dim` of every head are rotated as adjacent pairs by the
/// angle of `positions[t]` (i32 [tokens]). Positions outside the table leave the row unchanged.
pub struct RopeParams<'a> {
    pub x: ViewMut<'a, bf16>,
    pub positions: View<'a, i32>,
    pub table: &'a RopeTable,
    pub rope_offset: usize,
}

pub fn rope(gpu: &Gpu, p: RopeParams<'_>) -> Result<()> {
    const OP: &str = "rope_bf16";
    p.x.expect(OP, "x", &[None, None, None])?;
    let (tokens, heads, head_dim) = (p.x.shape()[0], p.x.shape()[1], p.x.shape()[2]);
    p.positions.expect(OP, "positions", &[Some(tokens)])?;
    let rd = p.table.rope_dim;
    if !p.rope_offset.is_multiple_of(2) || p.rope_offset + rd > head_dim {
        return Err(shape_err(
            OP,
            format!(
                "rope part {}..{} does not fit head_dim {head_dim} (offset must be even)",
                p.rope_offset,
                p.rope_offset + rd
            ),
        ));
    }
    if tokens == 0 || heads == 0 {
        return Ok(());
    }
    let (x, pos) = (p.x.ptr(), p.positions.ptr());
    let (c, s) = (p.table.cos_ptr(), p.table.sin_ptr());
    let (t, h) = (dim_i32(OP, "tokens", tokens)?, dim_i32(OP, "heads", heads)?);
    let ts = (heads * head_dim) as i64;
    let hs = head_dim as i64;
    let (off, rdi, mp) = (
        p.rope_offset as i32,
        rd as i32,
        dim_i32(OP, "max_pos", p.table.max_pos)?,
    );
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&x)
        .arg(&pos)
        .arg(&c)
        .arg(&s)
        .arg(&t)
        .arg(&h)
        .arg(&ts)
        .arg(&hs)
        .arg(&off)
        .arg(&rdi)
        .arg(&mp);
    // SAFETY: matches rope_bf16's signature; x/positions shape-checked, the table holds
    // max_pos * rope_dim/2 f32 values for each of cos and sin and lives for 'a.
    unsafe {
        b.launch(grid_for(
            tokens * heads * rd / 2,
            256,
            (gpu.sm_count * 16) as u32,
        ))
    }?;
    Ok(())
}

/// The element count of a fill's output (None when empty), which must be contiguous.
fn fill_len(op: &'static str, out: &ViewMut<'_, bf16>) -> Result<Option<usize>> {
    if !out.is_contiguous() {
        return Err(KernelError::NotContiguous {
            op,
            tensor: "out",
            shape: out.shape().to_vec(),
            strides: out.strides().to_vec(),
        });
    }
    let n: usize = out.shape().iter().product();
    Ok((n > 0).then_some(n))
}

/// Fill a bf16 buffer with N(mean, std) values from a counter-based hash of `seed` (random
/// weights generated on the device).
pub fn fill_normal(
    gpu: &Gpu,
    out: ViewMut<'_, bf16>,
    seed: u64,
    mean: f32,
    std: f32,
) -> Result<()> {
    const OP: &str = "fill_normal_bf16";
    let Some(n) = fill_len(OP, &out)? else {
        return Ok(());
    };
    let (o, nn) = (out.ptr(), n as u64);
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&o).arg(&nn).arg(&seed).arg(&mean).arg(&std);
    // SAFETY: matches fill_normal_bf16(out, n, seed, mean, std); out holds n contiguous bf16.
    unsafe { b.launch(grid_for(n, 256, (gpu.sm_count * 32) as u32)) }?;
    Ok(())
}

/// Fill a bf16 buffer with hash-based uniform values in [-scale, scale) (benchmark data).
pub fn fill_uniform(gpu: &Gpu, out: ViewMut<'_, bf16>, seed: u64, scale: f32) -> Result<()> {
    const OP: &str = "fill_uniform_bf16";
    let Some(n) = fill_len(OP, &out)? else {
        return Ok(());
    };
    let (o, nn) = (out.ptr(), n as u64);
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&o).arg(&nn).arg(&seed).arg(&scale);
    // SAFETY: matches fill_uniform_bf16(out, n, seed, scale); out holds n contiguous bf16.
    unsafe { b.launch(grid_for(n, 256, (gpu.sm_count * 32) as u32)) }?;
    Ok(())
}
