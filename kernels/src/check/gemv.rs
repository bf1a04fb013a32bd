//! Checks of the few-row GEMV kernels (gemv.cu) against the f64 CPU product, both weight layouts,
//! with padded leading dims and batch strides, at awkward sizes.

use half::bf16;

use super::{CheckRow, f32s, rand_bf16, rng};
use crate::device::Gpu;
use crate::error::{Result, shape_err};
use crate::ops::gemm::{Gemm, GemmOut};
use crate::ops::{elementwise as ew, gemv};
use crate::reference as r;
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

/// MLA's first projections at one decode row with the pre-attention add + RMSNorm in their launch
/// (`gemv_pair_after_add_norm`): three rows. The outputs and the new residual against the CPU
/// (X = bf16(rmsnorm(bf16(add + residual))), f64 products); then bit for bit against the unfused
/// launches (`add_rmsnorm_bf16`, then `gemv_pair` of its output), with the fused launch's input
/// residual left as it was.
pub fn check_gemv_pair_after_add_norm(
    gpu: &Gpu,
    n1: usize,
    n2: usize,
    k: usize,
    pad: usize,
) -> Result<Vec<CheckRow>> {
    let mut g = rng(59 + (n1 + 3 * n2 + k) as u64);
    let (ab, af) = rand_bf16(&mut g, k, 2.0);
    let (rb, rf) = rand_bf16(&mut g, k, 2.0);
    let (nb, nf) = rand_bf16(&mut g, k, 1.0);
    let (w1b, w1f) = rand_bf16(&mut g, n1 * k, 1.0);
    let (w2b, w2f) = rand_bf16(&mut g, n2 * k, 1.0);
    let add = Tensor::from_host(gpu, &ab, &[1, k])?;
    let residual = Tensor::from_host(gpu, &rb, &[1, k])?;
    let nw = Tensor::from_host(gpu, &nb, &[k])?;
    let w1 = Tensor::from_host(gpu, &w1b, &[n1, k])?;
    let w2 = Tensor::from_host(gpu, &w2b, &[n2, k])?;
    let ldy2 = n2 + pad;
    let outputs = || -> Result<_> {
        Ok((
            Tensor::<bf16>::zeros(gpu, &[1, n1])?,
            Tensor::<bf16>::zeros(gpu, &[1, ldy2])?,
        ))
    };
    let pair = |x: u64, y1: u64, y2: u64| {
        let first = Gemm::xwt(1, n1, k, x, w1.ptr(), y1);
        let second = gemv::PairSecond {
            w: w2.ptr(),
            y: y2,
            n: n2,
            ldy: ldy2,
        };
        (first, second)
    };
    let eps = 1e-6;
    let sizes = format!("N {n1} | {n2} (ldy {ldy2}) K {k}");
    let not_paired = || shape_err("gemv", format!("{sizes}: not paired"));

    // fused: the new residual in a buffer of its own
    let (y1, y2) = outputs()?;
    let new_res = Tensor::<bf16>::zeros(gpu, &[1, k])?;
    let (first, second) = pair(0, y1.ptr(), y2.ptr());
    let norm = gemv::AddNormRow {
        add: add.ptr(),
        residual: residual.ptr(),
        weight: nw.ptr(),
        residual_out: new_res.ptr(),
        eps,
    };
    // SAFETY: every tensor above has the extents these problems and the norm address, and
    // new_res is a buffer of its own.
    if !unsafe { gemv::gemv_pair_after_add_norm(gpu, &first, second, norm, true)? } {
        return Err(not_paired());
    }
    let (f1, f2, f_res) = (y1.to_host(gpu)?, y2.to_host(gpu)?, new_res.to_host(gpu)?);
    let res_after = residual.to_host(gpu)?;

    // unfused: add_rmsnorm_bf16 (residual updated in place, on a copy), then the pair
    let (u1, u2) = outputs()?;
    let mut res_copy = Tensor::from_host(gpu, &rb, &[1, k])?;
    let mut x = Tensor::<bf16>::zeros(gpu, &[1, k])?;
    ew::rmsnorm(
        gpu,
        ew::RmsNormParams {
            x: add.view(),
            weight: nw.view(),
            residual: Some(res_copy.view_mut()),
            out: x.view_mut(),
            eps,
        },
    )?;
    let (first, second) = pair(x.ptr(), u1.ptr(), u2.ptr());
    // SAFETY: as above.
    if !unsafe { gemv::gemv_pair::<bf16>(gpu, &first, second, true)? } {
        return Err(not_paired());
    }
    let bits = |v: &[bf16]| v.iter().map(|b| b.to_bits()).collect::<Vec<u16>>();
    let got_bits = [bits(&f1), bits(&f2), bits(&f_res), bits(&res_after)].concat();
    let want_bits = [
        bits(&u1.to_host(gpu)?),
        bits(&u2.to_host(gpu)?),
        bits(&res_copy.to_host(gpu)?),
        bits(&rb),
    ]
    .concat();

    let (xn, want_res) = r::add_rmsnorm(&af, &rf, &nf, eps);
    let xn: Vec<f32> = xn.into_iter().map(r::bf).collect();
    let dot = |w: &[f32], j: usize| {
        (0..k)
            .map(|kk| xn[kk] as f64 * w[j * k + kk] as f64)
            .sum::<f64>() as f32
    };
    let (mut got, mut want) = (f32s(&f1), (0..n1).map(|j| dot(&w1f, j)).collect::<Vec<_>>());
    got.extend(f32s(&f2));
    want.extend((0..ldy2).map(|j| if j < n2 { dot(&w2f, j) } else { 0.0 }));
    let mut rows = vec![
        CheckRow::cmp("gemv_nk_norm_m1_bf16 out", sizes.clone(), &got, &want, 1e-2),
        CheckRow::cmp(
            "gemv_nk_norm_m1_bf16 residual",
            sizes.clone(),
            &f32s(&f_res),
            &want_res,
            1e-2,
        ),
        CheckRow::exact(
            "gemv_nk_norm_m1_bf16 = add_rmsnorm + pair",
            sizes,
            &got_bits,
            &want_bits,
        ),
    ];
    rows[2].note = format!(
        "{}: outputs, new residual, input residual untouched",
        rows[2].note
    );
    Ok(rows)
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
    // the same pairs at one row with the pre-attention add + norm in their launch
    out.extend(check_gemv_pair_after_add_norm(gpu, 3072, 576, 2048, 0)?);
    out.extend(check_gemv_pair_after_add_norm(gpu, 1536, 576, 5120, 8)?);
    out.extend(check_gemv_pair_after_add_norm(gpu, 24, 67, 72, 3)?);
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
