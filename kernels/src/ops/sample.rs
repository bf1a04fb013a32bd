//! Launchers for sample.cu: argmax and temperature / top-k / top-p sampling on the GPU.

use super::{dim_i32, per_row};
use crate::device::Gpu;
use crate::error::Result;
use crate::tensor::{Tensor, View, ViewMut};

/// ids[r] = argmax logits[r] (ties: lowest index). logits f32 [rows, vocab], ids i32 [rows].
pub struct ArgmaxParams<'a> {
    pub logits: View<'a, f32>,
    pub ids: ViewMut<'a, i32>,
}

pub fn argmax(gpu: &Gpu, p: ArgmaxParams<'_>) -> Result<()> {
    const OP: &str = "argmax_f32";
    p.logits.expect(OP, "logits", &[None, None])?;
    let (rows, vocab) = (p.logits.shape()[0], p.logits.shape()[1]);
    p.ids.expect(OP, "ids", &[Some(rows)])?;
    if rows == 0 {
        return Ok(());
    }
    let (l, i) = (p.logits.ptr(), p.ids.ptr());
    let (r, v) = (dim_i32(OP, "rows", rows)?, dim_i32(OP, "vocab", vocab)?);
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&l).arg(&i).arg(&r).arg(&v);
    // SAFETY: matches argmax_f32(logits, ids, rows, vocab); shapes checked.
    unsafe { b.launch(per_row(rows, 1024)) }?;
    Ok(())
}

/// Per-row sampling. temperature <= 0 means greedy; top_k <= 0 means no top-k limit; top_p >= 1
/// means no nucleus cut; uniform in [0, 1) drives the draw. All per-row vectors have length rows.
pub struct SampleParams<'a> {
    pub logits: View<'a, f32>,
    pub temperature: View<'a, f32>,
    pub top_k: View<'a, i32>,
    pub top_p: View<'a, f32>,
    pub uniform: View<'a, f32>,
    pub ids: ViewMut<'a, i32>,
}

pub fn sample(gpu: &Gpu, p: SampleParams<'_>) -> Result<()> {
    const OP: &str = "sample_f32";
    p.logits.expect(OP, "logits", &[None, None])?;
    let (rows, vocab) = (p.logits.shape()[0], p.logits.shape()[1]);
    for (n, v) in [
        ("temperature", &p.temperature),
        ("top_p", &p.top_p),
        ("uniform", &p.uniform),
    ] {
        v.expect(OP, n, &[Some(rows)])?;
    }
    p.top_k.expect(OP, "top_k", &[Some(rows)])?;
    p.ids.expect(OP, "ids", &[Some(rows)])?;
    if rows == 0 {
        return Ok(());
    }
    // scratch for the unnormalised probabilities; freed in stream order after the kernel
    let work = Tensor::<f32>::zeros(gpu, &[rows, vocab])?;
    let (l, t, k, tp, u, w, i) = (
        p.logits.ptr(),
        p.temperature.ptr(),
        p.top_k.ptr(),
        p.top_p.ptr(),
        p.uniform.ptr(),
        work.ptr(),
        p.ids.ptr(),
    );
    let (r, v) = (dim_i32(OP, "rows", rows)?, dim_i32(OP, "vocab", vocab)?);
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&l)
        .arg(&t)
        .arg(&k)
        .arg(&tp)
        .arg(&u)
        .arg(&w)
        .arg(&i)
        .arg(&r)
        .arg(&v);
    // SAFETY: matches sample_f32's signature; work holds rows * vocab f32; 1024 threads match
    // SAMPLE_THREADS (the kernel's chunk_sums size).
    unsafe { b.launch(per_row(rows, 1024)) }?;
    Ok(())
}
