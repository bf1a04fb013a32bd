//! Checks of the few-row GEMV kernels (gemv.cu) against the f64 CPU product, both weight layouts,
//! with padded leading dims and batch strides, at awkward sizes.

use half::bf16;

use super::{CheckRow, f32s, rand_bf16, rng};
use crate::device::Gpu;
use crate::error::{Result, shape_err};
use crate::ops::gemm::{Gemm, GemmOut};
use crate::ops::{elementwise as ew, gemv};
use crate::tensor::Tensor;

/// One GEMV problem: `batch` x (Y[m, n] = X[m, k] · op(W)), X rows padded to `k + pad`, W stored
/// [n, k] (`w_nk`) or [k, n] with rows padded by `pad`.
#[derive(Debug, Clone, Copy)]
pub struct GemvCase {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub w_nk: bool,
    pub pad: usize,
}

/// Runs one case with output type `O` and compares every output with the CPU product.
pub fn check_gemv<O: GemmOut + ToF32s>(gpu: &Gpu, c: GemvCase) -> Result<CheckRow> {
    let GemvCase {
        m,
        n,
        k,
        batch,
        w_nk,
        pad,
    } = c;
    let mut g = rng(17 + (m * 31 + n * 7 + k) as u64);
    let ldx = k + pad;
    let sx = m * ldx;
    let (ldw, w_rows) = if w_nk { (k + pad, n) } else { (n + pad, k) };
    let sw = w_rows * ldw;
    let ldy = n + pad;
    let sy = m * ldy;
    let (xb, xf) = rand_bf16(&mut g, batch * sx, 1.0);
    let (wb, wf) = rand_bf16(&mut g, batch * sw, 1.0);
    let x = Tensor::from_host(gpu, &xb, &[batch * sx])?;
    let w = Tensor::from_host(gpu, &wb, &[batch * sw])?;
    let y = Tensor::<O>::zeros(gpu, &[batch * sy])?;
    let gm = Gemm {
        m,
        n,
        k,
        x: x.ptr(),
        ldx,
        sx,
        w: w.ptr(),
        ldw,
        sw,
        w_nk,
        y: y.ptr(),
        ldy,
        sy,
        batch,
    };
    let op = format!(
        "gemv_{}_m{m}_{}",
        if w_nk { "nk" } else { "kn" },
        O::KERNEL_SUFFIX
    );
    let plan = gemv::plan(&gm, gpu.sm_count, true)
        .ok_or_else(|| shape_err("gemv", format!("{c:?} has no GEMV plan")))?;
    // SAFETY: x, w, y were allocated above with exactly the extents the strides address.
    unsafe { gemv::gemv::<O>(gpu, &gm, plan, false)? };
    let got_all = O::to_f32s(&y.to_host(gpu)?);
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for b in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    let xv = xf[b * sx + i * ldx + kk] as f64;
                    let wv = if w_nk {
                        wf[b * sw + j * ldw + kk]
                    } else {
                        wf[b * sw + kk * ldw + j]
                    };
                    s += xv * wv as f64;
                }
                want.push(s as f32);
                got.push(got_all[b * sy + i * ldy + j]);
            }
        }
    }
    // f32 outputs hold only f32 accumulation error; bf16 outputs add one rounding (module docs)
    let tol = if O::KERNEL_SUFFIX == "f32" {
        1e-5
    } else {
        1e-2
    };
    let mut row = CheckRow::cmp(
        &op,
        format!("M {m} N {n} K {k} batch {batch} pad {pad}"),
        &got,
        &want,
        tol,
    );
    row.note = format!("splits {}", plan.splits);
    Ok(row)
}

/// Two projections of different widths from one X in one launch (`gemv_pair`, as MLA's q_proj
/// and kv_a run at decode), with the second output padded to `n2 + pad`: both outputs against
/// the CPU product (the second output's padding columns are compared with zero).
pub fn check_gemv_pair_uneven(
    gpu: &Gpu,
    m: usize,
    n1: usize,
    n2: usize,
    k: usize,
    pad: usize,
) -> Result<CheckRow> {
    let mut g = rng(41 + (m * 13 + n1 + 3 * n2 + k) as u64);
    let (xb, xf) = rand_bf16(&mut g, m * k, 1.0);
    let (w1b, w1f) = rand_bf16(&mut g, n1 * k, 1.0);
    let (w2b, w2f) = rand_bf16(&mut g, n2 * k, 1.0);
    let x = Tensor::from_host(gpu, &xb, &[m, k])?;
    let w1 = Tensor::from_host(gpu, &w1b, &[n1, k])?;
    let w2 = Tensor::from_host(gpu, &w2b, &[n2, k])?;
    let y1 = Tensor::<bf16>::zeros(gpu, &[m, n1])?;
    let ldy2 = n2 + pad;
    let y2 = Tensor::<bf16>::zeros(gpu, &[m, ldy2])?;
    let first = Gemm::xwt(m, n1, k, x.ptr(), w1.ptr(), y1.ptr());
    let second = gemv::PairSecond {
        w: w2.ptr(),
        y: y2.ptr(),
        n: n2,
        ldy: ldy2,
    };
    // SAFETY: every tensor above has the extents these problems address.
    if !unsafe { gemv::gemv_pair::<bf16>(gpu, &first, second, true)? } {
        return Err(shape_err(
            "gemv",
            format!("[{m}, {k}] x ({n1} | {n2}) not paired"),
        ));
    }
    let dot = |w: &[f32], i: usize, j: usize| {
        (0..k)
            .map(|kk| xf[i * k + kk] as f64 * w[j * k + kk] as f64)
            .sum::<f64>() as f32
    };
    let (g1, g2) = (f32s(&y1.to_host(gpu)?), f32s(&y2.to_host(gpu)?));
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for i in 0..m {
        for j in 0..n1 {
            got.push(g1[i * n1 + j]);
            want.push(dot(&w1f, i, j));
        }
        for j in 0..ldy2 {
            got.push(g2[i * ldy2 + j]);
            want.push(if j < n2 { dot(&w2f, i, j) } else { 0.0 });
        }
    }
    Ok(CheckRow::cmp(
        &format!("gemv pair m{m}"),
        format!("N {n1} | {n2} (ldy {ldy2}) K {k}"),
        &got,
        &want,
        1e-2,
    ))
}

/// The few-row FFN as the CUDA backend runs it: gate and up as one paired launch into [m, 2I],
/// `silu_mul`, then the down projection added into an existing bf16 accumulator. Against the CPU:
/// bf16(acc + bf16(down(bf16(silu(gate) · up)))).
pub fn check_gemv_ffn(gpu: &Gpu, m: usize, h: usize, inter: usize) -> Result<CheckRow> {
    let mut g = rng(23 + (m * 7 + inter) as u64);
    let (xb, xf) = rand_bf16(&mut g, m * h, 1.0);
    let (gb, gf) = rand_bf16(&mut g, inter * h, 0.1);
    let (ub, uf) = rand_bf16(&mut g, inter * h, 0.1);
    let (db, df) = rand_bf16(&mut g, h * inter, 0.1);
    let (ab, af) = rand_bf16(&mut g, m * h, 0.05);
    let x = Tensor::from_host(gpu, &xb, &[m, h])?;
    let wg = Tensor::from_host(gpu, &gb, &[inter, h])?;
    let wu = Tensor::from_host(gpu, &ub, &[inter, h])?;
    let wd = Tensor::from_host(gpu, &db, &[h, inter])?;
    let acc = Tensor::from_host(gpu, &ab, &[m, h])?;
    let gu = Tensor::<bf16>::zeros(gpu, &[m, 2 * inter])?;
    let mut first = Gemm::xwt(m, inter, h, x.ptr(), wg.ptr(), gu.ptr());
    first.ldy = 2 * inter;
    let up_y = gu.ptr() + (inter * 2) as u64;
    let mut act = Tensor::<bf16>::zeros(gpu, &[m, inter])?;
    let down = Gemm::xwt(m, h, inter, act.ptr(), wd.ptr(), acc.ptr());
    let op = format!("gemv ffn (pair, silu_mul, accumulate) m{m}");
    // SAFETY: every tensor above has the extents these problems address.
    let second = gemv::PairSecond {
        w: wu.ptr(),
        y: up_y,
        n: inter,
        ldy: 2 * inter,
    };
    let paired = unsafe { gemv::gemv_pair::<bf16>(gpu, &first, second, true)? };
    let plan = gemv::plan(&down, gpu.sm_count, true)
        .ok_or_else(|| shape_err("gemv", format!("down [{m}, {inter}] has no GEMV plan")))?;
    if !paired {
        return Err(shape_err(
            "gemv",
            format!("gate/up [{m}, {h}] x {inter} not paired"),
        ));
    }
    ew::silu_mul(
        gpu,
        ew::SiluMulParams {
            input: gu.view(),
            out: act.view_mut(),
        },
    )?;
    // SAFETY: as above.
    unsafe { gemv::gemv::<bf16>(gpu, &down, plan, true)? };
    let got = f32s(&acc.to_host(gpu)?);
    let bf = |v: f32| bf16::from_f32(v).to_f32();
    let dot = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(p, q)| *p as f64 * *q as f64)
            .sum::<f64>() as f32
    };
    let mut want = Vec::with_capacity(m * h);
    for i in 0..m {
        let xr = &xf[i * h..(i + 1) * h];
        let act: Vec<f32> = (0..inter)
            .map(|j| {
                let gv = bf(dot(xr, &gf[j * h..(j + 1) * h]));
                let uv = bf(dot(xr, &uf[j * h..(j + 1) * h]));
                bf(gv / (1.0 + (-gv).exp()) * uv)
            })
            .collect();
        for c in 0..h {
            let d = bf(dot(&act, &df[c * inter..(c + 1) * inter]));
            want.push(bf(af[i * h + c] + d));
        }
    }
    let mut row = CheckRow::cmp(&op, format!("M {m} H {h} I {inter}"), &got, &want, 1e-2);
    row.note = format!("down splits {}", plan.splits);
    Ok(row)
}

/// Host copies of GPU outputs as f32, for either output type.
pub trait ToF32s: Sized {
    fn to_f32s(v: &[Self]) -> Vec<f32>;
}
impl ToF32s for f32 {
    fn to_f32s(v: &[Self]) -> Vec<f32> {
        v.to_vec()
    }
}
impl ToF32s for bf16 {
    fn to_f32s(v: &[Self]) -> Vec<f32> {
        f32s(v)
    }
}

/// The GEMV rows of the check table: 1, 3, 7 and 8 rows; odd column counts; K that splits
/// unevenly; padded strides; batched per-head problems like MLA's; real DeepSeek-V2 shapes.
pub fn run_gemv(gpu: &Gpu) -> Result<Vec<CheckRow>> {
    let nk = |m, n, k, batch, pad| GemvCase {
        m,
        n,
        k,
        batch,
        w_nk: true,
        pad,
    };
    let kn = |m, n, k, batch, pad| GemvCase {
        m,
        n,
        k,
        batch,
        w_nk: false,
        pad,
    };
    let mut out = Vec::new();
    for m in [1, 3, 7, 8] {
        out.push(check_gemv::<bf16>(gpu, nk(m, 67, 72, 1, 0))?);
        out.push(check_gemv::<bf16>(gpu, nk(m, 576, 5120, 1, 0))?);
        out.push(check_gemv::<f32>(gpu, nk(m, 160, 5120, 1, 0))?);
        out.push(check_gemv::<bf16>(gpu, nk(m, 129, 1544, 3, 8))?);
    }
    // q_proj | kv_a of V2-Lite and q_a | kv_a of V2, then odd widths either way round
    for m in [1, 2, 4] {
        out.push(check_gemv_pair_uneven(gpu, m, 3072, 576, 2048, 0)?);
        out.push(check_gemv_pair_uneven(gpu, m, 1536, 576, 5120, 8)?);
        out.push(check_gemv_pair_uneven(gpu, m, 24, 67, 72, 3)?);
    }
    for m in [1, 3, 8] {
        out.push(check_gemv_ffn(gpu, m, 5120, 1536)?);
        out.push(check_gemv_ffn(gpu, m, 72, 40)?);
    }
    for m in [1, 2, 3, 4] {
        out.push(check_gemv::<bf16>(gpu, kn(m, 512, 128, 16, 0))?);
        out.push(check_gemv::<bf16>(gpu, kn(m, 264, 40, 3, 8))?);
        out.push(check_gemv::<f32>(gpu, kn(m, 8, 7, 1, 0))?);
    }
    Ok(out)
}
