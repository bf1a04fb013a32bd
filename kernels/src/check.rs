//! The GPU check harness: each function runs one op on the GPU over random inputs and compares it
//! with its `reference` twin, returning a table row. Used by the kernel tests and by
//! `dsv2-gpu-check`.
//!
//! Tolerances: ops whose output is bf16 are held to relative L2 <= 1e-2 — one bf16 rounding of the
//! output alone gives ~2.3e-3 (2^-8 / sqrt(3)), and kernels round some intermediates (P in MLA, the
//! FFN intermediate) once more. Integer outputs (ids, permutations, copies) must match exactly;
//! f32 gate weights to 1e-5.

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod append_absorb;
mod experts;
pub mod fp8;
mod gate_norm;
mod gemv;

pub use append_absorb::{AbsorbCase, check_latent_append_absorb};
pub use experts::{
    check_grouped_counts, check_grouped_experts, check_small_experts, run_grouped,
    run_grouped_counts,
};
pub use gemv::{GemvCase, check_gemv, run_gemv};
pub mod prefill;

use crate::device::Gpu;
use crate::error::Result;
use crate::ops::{elementwise as ew, expert, gemm, mla, moe, sample};
use crate::reference as r;
use crate::rope::{RopeTable, YarnConfig, yarn_cos_sin, yarn_softmax_scale};
use crate::tensor::Tensor;

/// One line of the check table.
#[derive(Debug, Clone)]
pub struct CheckRow {
    pub op: String,
    pub sizes: String,
    pub max_abs: f32,
    pub rel_l2: f32,
    pub tol: f32,
    pub pass: bool,
    pub note: String,
}

impl CheckRow {
    /// Prints the row's verdict to stderr as it is taken, so that a kernel that crashes the
    /// context leaves the rows before it on the console.
    pub fn eprint_progress(&self) {
        eprintln!(
            "{} {} rel_l2 {:.3e} {}",
            self.op,
            self.sizes,
            self.rel_l2,
            if self.pass { "PASS" } else { "FAIL" }
        );
    }

    fn cmp(op: &str, sizes: String, got: &[f32], want: &[f32], tol: f32) -> Self {
        let (max_abs, rel_l2) = r::errors(got, want);
        let pass = got.len() == want.len() && rel_l2 <= tol;
        Self {
            op: op.into(),
            sizes,
            max_abs,
            rel_l2,
            tol,
            pass,
            note: String::new(),
        }
    }
    pub(crate) fn exact<T: PartialEq>(op: &str, sizes: String, got: &[T], want: &[T]) -> Self {
        let bad =
            got.iter().zip(want).filter(|(a, b)| a != b).count() + got.len().abs_diff(want.len());
        Self {
            op: op.into(),
            sizes,
            max_abs: bad as f32,
            rel_l2: 0.0,
            tol: 0.0,
            pass: bad == 0,
            note: if bad == 0 {
                "exact".into()
            } else {
                format!("{bad} mismatches")
            },
        }
    }
}

/// The standard awkward row counts.
pub const ROWS: [usize; 4] = [1, 7, 67, 5137];

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// n uniform values in [-scale, scale) rounded to bf16: (device form, f32 form).
fn rand_bf16(g: &mut ChaCha8Rng, n: usize, scale: f32) -> (Vec<bf16>, Vec<f32>) {
    let b: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(g.random_range(-scale..scale)))
        .collect();
    let f = b.iter().map(|v| v.to_f32()).collect();
    (b, f)
}

fn f32s(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Rows to compare for a big output: all when small, else a spread sample incl. first and last.
fn sample_rows(rows: usize) -> Vec<usize> {
    if rows <= 80 {
        (0..rows).collect()
    } else {
        let mut v: Vec<usize> = (0..rows).step_by(rows / 61).collect();
        v.push(rows - 1);
        v.dedup();
        v
    }
}

pub fn check_embedding(gpu: &Gpu, rows: usize, hidden: usize, vocab: usize) -> Result<CheckRow> {
    let mut g = rng(1);
    let (tb, tf) = rand_bf16(&mut g, vocab * hidden, 1.0);
    let mut ids: Vec<i32> = (0..rows).map(|_| g.random_range(0..vocab as i32)).collect();
    if rows > 2 {
        ids[1] = -1; // out of range -> zero row
    }
    let table = Tensor::from_host(gpu, &tb, &[vocab, hidden])?;
    let idt = Tensor::from_host(gpu, &ids, &[rows])?;
    let mut out = Tensor::<bf16>::zeros(gpu, &[rows, hidden])?;
    ew::embedding(
        gpu,
        ew::EmbeddingParams {
            table: table.view(),
            ids: idt.view(),
            out: out.view_mut(),
        },
    )?;
    let got = f32s(&out.to_host(gpu)?);
    Ok(CheckRow::exact(
        "embedding_bf16",
        format!("rows {rows} hidden {hidden} vocab {vocab}"),
        &got,
        &r::embedding(&tf, hidden, &ids),
    ))
}

pub fn check_rmsnorm(gpu: &Gpu, rows: usize, hidden: usize, fused: bool) -> Result<Vec<CheckRow>> {
    let mut g = rng(2);
    let (xb, xf) = rand_bf16(&mut g, rows * hidden, 2.0);
    let (wb, wf) = rand_bf16(&mut g, hidden, 1.0);
    let (rb, rf) = rand_bf16(&mut g, rows * hidden, 2.0);
    let x = Tensor::from_host(gpu, &xb, &[rows, hidden])?;
    let w = Tensor::from_host(gpu, &wb, &[hidden])?;
    let mut res = Tensor::from_host(gpu, &rb, &[rows, hidden])?;
    let mut out = Tensor::<bf16>::zeros(gpu, &[rows, hidden])?;
    let sizes = format!("rows {rows} hidden {hidden}");
    if fused {
        ew::rmsnorm(
            gpu,
            ew::RmsNormParams {
                x: x.view(),
                weight: w.view(),
                residual: Some(res.view_mut()),
                out: out.view_mut(),
                eps: 1e-6,
            },
        )?;
        let (want, want_res) = r::add_rmsnorm(&xf, &rf, &wf, 1e-6);
        let got = f32s(&out.to_host(gpu)?);
        let got_res = f32s(&res.to_host(gpu)?);
        Ok(vec![
            CheckRow::cmp("add_rmsnorm_bf16 out", sizes.clone(), &got, &want, 1e-2),
            CheckRow::cmp(
                "add_rmsnorm_bf16 residual",
                sizes,
                &got_res,
                &want_res,
                1e-2,
            ),
        ])
    } else {
        ew::rmsnorm(
            gpu,
            ew::RmsNormParams {
                x: x.view(),
                weight: w.view(),
                residual: None,
                out: out.view_mut(),
                eps: 1e-6,
            },
        )?;
        let got = f32s(&out.to_host(gpu)?);
        Ok(vec![CheckRow::cmp(
            "rmsnorm_bf16",
            sizes,
            &got,
            &r::rmsnorm(&xf, &wf, 1e-6),
            1e-2,
        )])
    }
}

pub fn check_silu_mul(gpu: &Gpu, rows: usize, inter: usize) -> Result<CheckRow> {
    let mut g = rng(3);
    let (ib, i_f) = rand_bf16(&mut g, rows * 2 * inter, 4.0);
    let input = Tensor::from_host(gpu, &ib, &[rows, 2 * inter])?;
    let mut out = Tensor::<bf16>::zeros(gpu, &[rows, inter])?;
    ew::silu_mul(
        gpu,
        ew::SiluMulParams {
            input: input.view(),
            out: out.view_mut(),
        },
    )?;
    let got = f32s(&out.to_host(gpu)?);
    Ok(CheckRow::cmp(
        "silu_mul_bf16",
        format!("rows {rows} inter {inter}"),
        &got,
        &r::silu_mul(&i_f, inter),
        1e-2,
    ))
}

pub fn check_rope(
    gpu: &Gpu,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    offset: usize,
) -> Result<CheckRow> {
    let mut g = rng(4);
    let yc = YarnConfig::deepseek_v2();
    let max_pos = 8192;
    let (cos, sin) = yarn_cos_sin(&yc, max_pos);
    let table = RopeTable::from_host(gpu, &cos, &sin, max_pos, yc.dim)?;
    let (xb, mut xf) = rand_bf16(&mut g, tokens * heads * head_dim, 2.0);
    let pos: Vec<i32> = (0..tokens)
        .map(|_| g.random_range(0..max_pos as i32))
        .collect();
    let mut x = Tensor::from_host(gpu, &xb, &[tokens, heads, head_dim])?;
    let pt = Tensor::from_host(gpu, &pos, &[tokens])?;
    ew::rope(
        gpu,
        ew::RopeParams {
            x: x.view_mut(),
            positions: pt.view(),
            table: &table,
            rope_offset: offset,
        },
    )?;
    r::rope(&mut xf, heads, head_dim, offset, yc.dim, &pos, &cos, &sin);
    let got = f32s(&x.to_host(gpu)?);
    Ok(CheckRow::cmp(
        "rope_bf16",
        format!(
            "tokens {tokens} heads {heads} dim {head_dim} rope {offset}+{}",
            yc.dim
        ),
        &got,
        &xf,
        1e-2,
    ))
}

pub fn check_gemm(gpu: &Gpu, m: usize, n: usize, k: usize) -> Result<CheckRow> {
    let mut g = rng(5);
    let (xb, xf) = rand_bf16(&mut g, m * k, 1.0);
    let (wb, wf) = rand_bf16(&mut g, n * k, 1.0);
    let x = Tensor::from_host(gpu, &xb, &[m, k])?;
    let w = Tensor::from_host(gpu, &wb, &[n, k])?;
    let mut y = Tensor::<bf16>::zeros(gpu, &[m, n])?;
    gemm::gemm(
        gpu,
        gemm::GemmParams {
            x: x.view(),
            w: w.view(),
            y: y.view_mut(),
            alpha: 1.0,
            beta: 0.0,
        },
    )?;
    let got = f32s(&y.to_host(gpu)?);
    let rows = sample_rows(m);
    let xs: Vec<f32> = rows
        .iter()
        .flat_map(|&i| xf[i * k..(i + 1) * k].iter().cloned())
        .collect();
    let gs: Vec<f32> = rows
        .iter()
        .flat_map(|&i| got[i * n..(i + 1) * n].iter().cloned())
        .collect();
    let want = r::gemm(&xs, &wf, rows.len(), n, k);
    let mut row = CheckRow::cmp(
        "gemm_bf16 (cuBLAS)",
        format!("M {m} N {n} K {k}"),
        &gs,
        &want,
        1e-2,
    );
    row.note = format!("{} rows compared", rows.len());
    Ok(row)
}

fn gate_cfg_v2() -> moe::GateConfig {
    moe::GateConfig {
        n_group: 8,
        topk_group: 3,
        top_k: 6,
        norm_topk_prob: false,
        routed_scaling_factor: 16.0,
    }
}

/// Chosen ids `got` against the reference's `want` ([tokens, k] each) for gate `logits`
/// [tokens, E]: (hard, soft) mismatches, soft being those where the reference's own scores of
/// the two experts tie within 1e-6 (exp rounding can then legitimately order them differently).
fn gate_id_mismatches(
    logits: &[f32],
    n_exp: usize,
    k: usize,
    got: &[i32],
    want: &[i32],
) -> (usize, usize) {
    let (mut hard, mut soft) = (0, 0);
    for (t, row) in logits.chunks(n_exp).enumerate() {
        let s = r::gate_scores(row);
        for j in 0..k {
            let (a, b) = (got[t * k + j], want[t * k + j]);
            if a == b {
                continue;
            }
            let sa = s.get(a as usize).copied().unwrap_or(f32::NAN);
            if (sa - s[b as usize]).abs() <= 1e-6 {
                soft += 1
            } else {
                hard += 1
            }
        }
    }
    (hard, soft)
}

pub fn check_gate(
    gpu: &Gpu,
    tokens: usize,
    n_exp: usize,
    cfg: moe::GateConfig,
) -> Result<CheckRow> {
    let mut g = rng(6);
    let logits: Vec<f32> = (0..tokens * n_exp)
        .map(|_| g.random_range(-4.0f32..4.0))
        .collect();
    let lt = Tensor::from_host(gpu, &logits, &[tokens, n_exp])?;
    let mut ids = Tensor::<i32>::zeros(gpu, &[tokens, cfg.top_k])?;
    let mut w = Tensor::<f32>::zeros(gpu, &[tokens, cfg.top_k])?;
    moe::moe_gate(
        gpu,
        moe::GateParams {
            logits: lt.view(),
            ids: ids.view_mut(),
            weights: w.view_mut(),
            cfg,
        },
    )?;
    let (gi, gw) = (ids.to_host(gpu)?, w.to_host(gpu)?);
    let (ri, rw) = r::moe_gate(&logits, n_exp, &cfg);
    let (hard, soft) = gate_id_mismatches(&logits, n_exp, cfg.top_k, &gi, &ri);
    let mut row = CheckRow::cmp(
        "moe_gate_f32",
        format!(
            "tokens {tokens} E {n_exp} groups {}/{} top{}",
            cfg.topk_group, cfg.n_group, cfg.top_k
        ),
        &gw,
        &rw,
        1e-5,
    );
    row.pass &= hard == 0;
    row.note = format!("id mismatches: {hard} (+{soft} near-ties)");
    Ok(row)
}

/// The fused gate GEMV + top-k (`moe_gate_gemv`) against the f64 logits of the same bf16
/// inputs and the reference routing of those logits; launched twice on the same ticket counter,
/// the second launch's output compared (so a counter left non-zero would fail the row).
pub fn check_gate_gemv(
    gpu: &Gpu,
    tokens: usize,
    hidden: usize,
    n_exp: usize,
    cfg: moe::GateConfig,
) -> Result<CheckRow> {
    let mut g = rng(16);
    let (xb, xf) = rand_bf16(&mut g, tokens * hidden, 1.0);
    let (wb, wf) = rand_bf16(&mut g, n_exp * hidden, 2.0 / (hidden as f32).sqrt());
    let want_logits: Vec<f32> = (0..tokens * n_exp)
        .map(|i| {
            let (t, e) = (i / n_exp, i % n_exp);
            (0..hidden)
                .map(|c| xf[t * hidden + c] as f64 * wf[e * hidden + c] as f64)
                .sum::<f64>() as f32
        })
        .collect();
    let (x, w) = (
        Tensor::from_host(gpu, &xb, &[tokens, hidden])?,
        Tensor::from_host(gpu, &wb, &[n_exp, hidden])?,
    );
    let mut logits = Tensor::<f32>::zeros(gpu, &[tokens, n_exp])?;
    let mut counter = Tensor::<i32>::zeros(gpu, &[1])?;
    let mut ids = Tensor::<i32>::zeros(gpu, &[tokens, cfg.top_k])?;
    let mut wt = Tensor::<f32>::zeros(gpu, &[tokens, cfg.top_k])?;
    for _ in 0..2 {
        moe::moe_gate_gemv(
            gpu,
            moe::GateGemvParams {
                x: moe::GateInput::Rows(x.view()),
                w: w.view(),
                logits: logits.view_mut(),
                counter: counter.view_mut(),
                ids: ids.view_mut(),
                weights: wt.view_mut(),
                cfg,
            },
        )?;
    }
    let (gl, gi, gw) = (logits.to_host(gpu)?, ids.to_host(gpu)?, wt.to_host(gpu)?);
    let left = counter.to_host(gpu)?[0];
    // routing of the kernel's own logits (summation order differs from f64 in the last bits)
    let (ri, rw) = r::moe_gate(&gl, n_exp, &cfg);
    let (hard, soft) = gate_id_mismatches(&gl, n_exp, cfg.top_k, &gi, &ri);
    let mut got = gl;
    got.extend(&gw);
    let mut want = want_logits;
    want.extend(&rw);
    let mut row = CheckRow::cmp(
        "moe_gate_gemv_f32",
        format!(
            "tokens {tokens} hidden {hidden} E {n_exp} groups {}/{} top{}",
            cfg.topk_group, cfg.n_group, cfg.top_k
        ),
        &got,
        &want,
        1e-4,
    );
    row.pass &= hard == 0 && left == 0;
    row.note = format!("id mismatches: {hard} (+{soft} near-ties); counter after: {left}");
    Ok(row)
}

/// Permutation + gather + combine (one routing of `tokens` x top-6 over `n_exp` experts).
pub fn check_permute_combine(
    gpu: &Gpu,
    tokens: usize,
    n_exp: usize,
    hidden: usize,
) -> Result<Vec<CheckRow>> {
    let mut g = rng(7);
    let k = 6;
    let mut ids: Vec<i32> = (0..tokens * k)
        .map(|_| g.random_range(0..n_exp as i32))
        .collect();
    if ids.len() > 3 {
        ids[3] = -1; // not routed here (expert shard case)
    }
    if ids.len() > 4 {
        ids[4] = n_exp as i32; // out of range: not routed either
    }
    let w: Vec<f32> = (0..tokens * k)
        .map(|_| g.random_range(0.0f32..1.0))
        .collect();
    let (xb, xf) = rand_bf16(&mut g, tokens * hidden, 1.0);
    let it = Tensor::from_host(gpu, &ids, &[tokens, k])?;
    let (rc, ro, rs, rsrc) = r::permute(&ids, k, n_exp);
    let routed = rc.iter().sum::<i32>() as usize;
    let sizes = format!("tokens {tokens} top{k} E {n_exp} hidden {hidden}");
    let mut rows = Vec::new();
    // the split kernels, then the fused one where it fits (the gather and combine below use
    // the split kernels' permutation)
    let mut split = None;
    for kernel in [moe::PermuteKernel::Split, moe::PermuteKernel::Fused] {
        if !kernel.fits(n_exp, tokens * k) {
            continue;
        }
        let perm = moe::moe_permute_with(
            gpu,
            moe::PermuteParams {
                ids: it.view(),
                n_experts: n_exp,
            },
            kernel,
        )?;
        let sizes = format!("{sizes}, {kernel:?}");
        rows.push(CheckRow::exact(
            "moe_permute counts",
            sizes.clone(),
            &perm.counts.to_host(gpu)?,
            &rc,
        ));
        rows.push(CheckRow::exact(
            "moe_permute offsets",
            sizes.clone(),
            &perm.offsets.to_host(gpu)?,
            &ro,
        ));
        rows.push(CheckRow::exact(
            "moe_permute slot_of",
            sizes.clone(),
            &perm.slot_of.to_host(gpu)?,
            &rs,
        ));
        // past the routed rows src_row is 0 (the gather of a bound-sized buffer reads token 0)
        let mut want_src = rsrc[..routed].to_vec();
        want_src.resize(tokens * k, 0);
        rows.push(CheckRow::exact(
            "moe_permute src_row",
            sizes,
            &perm.src_row.to_host(gpu)?,
            &want_src,
        ));
        if kernel == moe::PermuteKernel::Split {
            split = Some(perm);
        }
    }
    let Some(perm) = split else {
        return Err(crate::error::KernelError::Unsupported {
            op: "check_permute_combine",
            what: "no split permutation".into(),
        });
    };
    let x = Tensor::from_host(gpu, &xb, &[tokens, hidden])?;
    let mut px = Tensor::<bf16>::zeros(gpu, &[routed, hidden])?;
    moe::moe_gather(
        gpu,
        moe::GatherParams {
            x: x.view(),
            src_row: perm.src_row.view(),
            out: px.view_mut(),
        },
    )?;
    let want_px: Vec<f32> = rsrc[..routed]
        .iter()
        .flat_map(|&t| {
            xf[t as usize * hidden..(t as usize + 1) * hidden]
                .iter()
                .cloned()
        })
        .collect();
    rows.push(CheckRow::exact(
        "moe_gather_bf16",
        sizes.clone(),
        &f32s(&px.to_host(gpu)?),
        &want_px,
    ));
    // combine the permuted rows back, accumulating onto an initial value
    let (ib, i_f) = rand_bf16(&mut g, tokens * hidden, 1.0);
    let wt = Tensor::from_host(gpu, &w, &[tokens, k])?;
    let mut out = Tensor::from_host(gpu, &ib, &[tokens, hidden])?;
    moe::moe_combine(
        gpu,
        moe::CombineParams {
            y: px.view(),
            slot_of: perm.slot_of.view(),
            weights: wt.view(),
            out: out.view_mut(),
            accumulate: true,
        },
    )?;
    let want = r::combine(&want_px, hidden, &rs, &w, k, Some(&i_f));
    rows.push(CheckRow::cmp(
        "moe_combine_bf16",
        sizes,
        &f32s(&out.to_host(gpu)?),
        &want,
        1e-2,
    ));
    Ok(rows)
}

/// The reference FFN of expert `e` (of `n_exp` stacked in `gate_up` / `down`) on row `row` of x.
#[allow(clippy::too_many_arguments)]
fn one_expert(
    x: &[f32],
    row: usize,
    gate_up: &[f32],
    down: &[f32],
    e: usize,
    n_exp: usize,
    hidden: usize,
    inter: usize,
) -> Vec<f32> {
    let mut one = vec![0usize; n_exp];
    one[e] = 1;
    r::expert_ffn(
        &x[row * hidden..(row + 1) * hidden],
        gate_up,
        down,
        &one,
        hidden,
        inter,
    )
}

pub fn check_expert_ffn(
    gpu: &Gpu,
    tokens: usize,
    n_exp: usize,
    hidden: usize,
    inter: usize,
) -> Result<CheckRow> {
    let mut g = rng(8);
    let k = 6.min(n_exp);
    let ids: Vec<i32> = (0..tokens * k)
        .map(|_| g.random_range(0..n_exp as i32))
        .collect();
    let (rc, _, _, _) = r::permute(&ids, k, n_exp);
    let counts: Vec<usize> = rc.iter().map(|&c| c as usize).collect();
    let rows: usize = counts.iter().sum();
    let scale_in = 1.0 / (hidden as f32).sqrt();
    let (xb, xf) = rand_bf16(&mut g, rows * hidden, 1.0);
    let (gub, guf) = rand_bf16(&mut g, n_exp * 2 * inter * hidden, scale_in * 1.7);
    let (db, df) = rand_bf16(&mut g, n_exp * hidden * inter, 1.7 / (inter as f32).sqrt());
    let x = Tensor::from_host(gpu, &xb, &[rows, hidden])?;
    let gu_w = Tensor::from_host(gpu, &gub, &[n_exp, 2 * inter, hidden])?;
    let d_w = Tensor::from_host(gpu, &db, &[n_exp, hidden, inter])?;
    let mut gu = Tensor::<bf16>::zeros(gpu, &[rows, 2 * inter])?;
    let mut act = Tensor::<bf16>::zeros(gpu, &[rows, inter])?;
    let mut out = Tensor::<bf16>::zeros(gpu, &[rows, hidden])?;
    expert::expert_ffn(
        gpu,
        expert::ExpertFfnParams {
            x: x.view(),
            gate_up: gu_w.view(),
            down: d_w.view(),
            counts: &counts,
            gu: gu.view_mut(),
            act: act.view_mut(),
            out: out.view_mut(),
        },
    )?;
    let got = f32s(&out.to_host(gpu)?);
    // reference on a few rows of every expert
    let (mut gs, mut ws) = (Vec::new(), Vec::new());
    let mut off = 0;
    for (e, &n) in counts.iter().enumerate() {
        for i in [0, n / 2, n.saturating_sub(1)]
            .into_iter()
            .filter(|&i| i < n)
            .collect::<std::collections::BTreeSet<_>>()
        {
            let row = off + i;
            ws.extend(one_expert(&xf, row, &guf, &df, e, n_exp, hidden, inter));
            gs.extend_from_slice(&got[row * hidden..(row + 1) * hidden]);
        }
        off += n;
    }
    let mut row = CheckRow::cmp(
        "expert_ffn_bf16",
        format!("rows {rows} E {n_exp} hidden {hidden} inter {inter}"),
        &gs,
        &ws,
        1e-2,
    );
    row.note = format!("{} rows compared", gs.len() / hidden);
    Ok(row)
}

/// q_pe as the engine passes it to the decode kernels: the rope columns of a [B, H, 128 + 64]
/// q, read in place (`.narrow(2, 128, ROPE)` of the returned tensor); `q_pe` is [B, H, 64].
pub(crate) fn q_pe_in_place(
    gpu: &Gpu,
    q_pe: &[bf16],
    batch: usize,
    heads: usize,
) -> Result<Tensor<bf16>> {
    let qd = 128 + mla::ROPE;
    let mut qfull = vec![bf16::ZERO; batch * heads * qd];
    for (i, row) in q_pe.chunks(mla::ROPE).enumerate() {
        qfull[i * qd + 128..(i + 1) * qd].copy_from_slice(row);
    }
    Tensor::from_host(gpu, &qfull, &[batch, heads, qd])
}

/// How a decode case's block table assigns physical cache blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockLayout {
    /// A random permutation: no two of a sequence's blocks follow one another but by chance.
    Shuffled,
    /// Each sequence's blocks in ascending order, as the router's allocator hands out a prompt's
    /// blocks, except that every third 64-token tile has its first two blocks swapped: the TMA
    /// kernels then take both their one-box path (a whole tile in consecutive blocks) and their
    /// piece path in one case.
    Runs,
}

impl BlockLayout {
    /// The block table [batch, max_blocks] over `num_blocks` physical blocks of `block_size`
    /// tokens, laid out as this says.
    fn block_table(
        self,
        g: &mut ChaCha8Rng,
        batch: usize,
        max_blocks: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Vec<i32> {
        let mut phys: Vec<i32> = (0..num_blocks as i32).collect();
        match self {
            BlockLayout::Shuffled => {
                for i in (1..phys.len()).rev() {
                    let j = g.random_range(0..=i);
                    phys.swap(i, j);
                }
            }
            BlockLayout::Runs => {
                let per_tile = (64 / block_size).max(1);
                for b in 0..batch {
                    for t in (1..max_blocks.div_ceil(per_tile)).step_by(3) {
                        let i = b * max_blocks + t * per_tile;
                        if per_tile > 1 && i + 1 < (b + 1) * max_blocks {
                            phys.swap(i, i + 1);
                        }
                    }
                }
            }
        }
        phys.truncate(batch * max_blocks);
        phys
    }

    /// What a check row's sizes say of the layout.
    pub(crate) fn label(self) -> &'static str {
        match self {
            BlockLayout::Shuffled => "",
            BlockLayout::Runs => " runs",
        }
    }
}

/// A decode problem over a paged cache (`lens`: the context lengths): the block table, lengths
/// and queries, as host values for the CPU reference and device copies; the caller fills
/// `num_blocks` cache blocks in its own dtype.
pub(crate) struct DecodeCase {
    table: Vec<i32>,
    seq: Vec<i32>,
    q_abs_f: Vec<f32>,
    q_pe_f: Vec<f32>,
    pub max_len: usize,
    max_blocks: usize,
    pub num_blocks: usize,
    pub scale: f32,
    pub q_abs: Tensor<bf16>,
    /// [B, H, 128 + 64]: the rope columns are q_pe (see [`q_pe_in_place`])
    pub q_full: Tensor<bf16>,
    pub block_table: Tensor<i32>,
    pub seq_lens: Tensor<i32>,
}

impl DecodeCase {
    pub(crate) fn new(
        gpu: &Gpu,
        g: &mut ChaCha8Rng,
        lens: &[usize],
        heads: usize,
        block_size: usize,
        layout: BlockLayout,
    ) -> Result<Self> {
        let batch = lens.len();
        let max_len = lens.iter().copied().max().unwrap_or(1).max(1);
        let max_blocks = max_len.div_ceil(block_size);
        let num_blocks = batch * max_blocks + 3;
        let table = layout.block_table(g, batch, max_blocks, num_blocks, block_size);
        let (qab, q_abs_f) = rand_bf16(g, batch * heads * mla::KV_LORA, 0.25);
        let (qpb, q_pe_f) = rand_bf16(g, batch * heads * mla::ROPE, 0.25);
        let seq: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        Ok(Self {
            q_abs: Tensor::from_host(gpu, &qab, &[batch, heads, mla::KV_LORA])?,
            q_full: q_pe_in_place(gpu, &qpb, batch, heads)?,
            block_table: Tensor::from_host(gpu, &table, &[batch, max_blocks])?,
            seq_lens: Tensor::from_host(gpu, &seq, &[batch])?,
            table,
            seq,
            q_abs_f,
            q_pe_f,
            max_len,
            max_blocks,
            num_blocks,
            scale: yarn_softmax_scale(&YarnConfig::deepseek_v2(), 192),
        })
    }

    /// q_pe as the decode kernels read it: the rope columns of `q_full`, in place.
    pub(crate) fn q_pe(&self) -> Result<crate::tensor::View<'_, bf16>> {
        self.q_full.view().narrow(2, 128, mla::ROPE)
    }

    /// The CPU reference's latent output [B, H, 512] (f32) over the cache values `cache`.
    pub(crate) fn reference(&self, cache: &[f32], block_size: usize, heads: usize) -> Vec<f32> {
        r::mla_decode(
            &self.q_abs_f,
            &self.q_pe_f,
            cache,
            block_size,
            &self.table,
            self.max_blocks,
            &self.seq,
            heads,
            self.scale,
        )
    }
}

/// MLA decode over a paged cache whose blocks are laid out as `layout` says (shuffled, or in
/// runs). `lens` are the per-sequence context lengths.
pub fn check_mla_decode(
    gpu: &Gpu,
    lens: &[usize],
    heads: usize,
    block_size: usize,
    splits: Option<usize>,
    kernel: mla::MlaKernel,
    layout: BlockLayout,
) -> Result<CheckRow> {
    let batch = lens.len();
    let mut g = rng(9);
    let c = DecodeCase::new(gpu, &mut g, lens, heads, block_size, layout)?;
    let max_len = c.max_len;
    let (cb, cf) = rand_bf16(&mut g, c.num_blocks * block_size * mla::CACHE_DIM, 1.0);
    let cache = Tensor::from_host(gpu, &cb, &[c.num_blocks, block_size, mla::CACHE_DIM])?;
    let mut out = Tensor::<bf16>::zeros(gpu, &[batch, heads, mla::KV_LORA])?;
    mla::mla_decode(
        gpu,
        mla::MlaDecodeParams {
            q_abs: c.q_abs.view(),
            q_pe: c.q_pe()?,
            cache: cache.view(),
            block_table: c.block_table.view(),
            seq_lens: c.seq_lens.view(),
            out: out.view_mut(),
            max_seq_len: max_len,
            scale: c.scale,
            splits,
            kernel: Some(kernel),
            uv: None,
        },
    )?;
    let got = f32s(&out.to_host(gpu)?);
    let want = c.reference(&cf, block_size, heads);
    let used =
        splits.unwrap_or_else(|| mla::choose_splits(gpu.sm_count, batch, heads, max_len, kernel));
    let lens_s = if lens.len() <= 8 {
        format!("{lens:?}")
    } else {
        format!("{} seqs, max {max_len}", lens.len())
    };
    let name = kernel.function();
    let mut row = CheckRow::cmp(
        name,
        format!(
            "lens {lens_s} heads {heads} block {block_size}{}",
            layout.label()
        ),
        &got,
        &want,
        1e-2,
    );
    row.note = format!("splits {used}");
    Ok(row)
}

/// The decode with the value up-projection folded into the split-KV combine
/// (`mla_combine_uv_bf16`): o[b, h] = bf16(ctx[b, h]) · W_UV_hᵀ against the CPU reference's ctx
/// (rounded to bf16, as the combine rounds it) and kv_b's value rows, at `splits` > 1 (the row
/// also fails when the launcher says it did not project).
pub fn check_mla_decode_uv(
    gpu: &Gpu,
    lens: &[usize],
    heads: usize,
    splits: usize,
    dv: usize,
) -> Result<CheckRow> {
    let (dn, bs) = (128, 64);
    let batch = lens.len();
    let mut g = rng(19);
    let c = DecodeCase::new(gpu, &mut g, lens, heads, bs, BlockLayout::Shuffled)?;
    let (cb, cf) = rand_bf16(&mut g, c.num_blocks * bs * mla::CACHE_DIM, 1.0);
    let cache = Tensor::from_host(gpu, &cb, &[c.num_blocks, bs, mla::CACHE_DIM])?;
    let (kvbb, kvbf) = rand_bf16(&mut g, heads * (dn + dv) * mla::KV_LORA, 0.05);
    let kv_b = Tensor::from_host(gpu, &kvbb, &[heads * (dn + dv), mla::KV_LORA])?;
    let mut lat = Tensor::<bf16>::zeros(gpu, &[batch, heads, mla::KV_LORA])?;
    let mut out = Tensor::<bf16>::zeros(gpu, &[batch, heads, dv])?;
    let projected = mla::mla_decode(
        gpu,
        mla::MlaDecodeParams {
            q_abs: c.q_abs.view(),
            q_pe: c.q_pe()?,
            cache: cache.view(),
            block_table: c.block_table.view(),
            seq_lens: c.seq_lens.view(),
            out: lat.view_mut(),
            max_seq_len: c.max_len,
            scale: c.scale,
            splits: Some(splits),
            kernel: Some(mla::MlaKernel::Wgmma),
            uv: Some(mla::ValueProjection {
                kv_b: kv_b.view(),
                qk_nope: dn,
                out: out.view_mut(),
            }),
        },
    )?;
    let ctx = c.reference(&cf, bs, heads);
    let mut want = Vec::with_capacity(batch * heads * dv);
    for b in 0..batch {
        for h in 0..heads {
            let lat_row = &ctx[(b * heads + h) * mla::KV_LORA..][..mla::KV_LORA];
            for j in 0..dv {
                let w = &kvbf[(h * (dn + dv) + dn + j) * mla::KV_LORA..][..mla::KV_LORA];
                let d: f64 = lat_row
                    .iter()
                    .zip(w)
                    .map(|(&x, &y)| r::bf(x) as f64 * y as f64)
                    .sum();
                want.push(d as f32);
            }
        }
    }
    let got = f32s(&out.to_host(gpu)?);
    let mut row = CheckRow::cmp(
        "mla_combine_uv_bf16",
        format!("lens {lens:?} heads {heads} splits {splits} v {dv}"),
        &got,
        &want,
        1e-2,
    );
    row.pass &= projected == (splits > 1);
    row.note = format!("projected {projected}");
    Ok(row)
}

pub fn check_cache_append(gpu: &Gpu, tokens: usize) -> Result<CheckRow> {
    let mut g = rng(10);
    let (num_blocks, bs) = (tokens.div_ceil(16) + 2, 16);
    let (cb, mut cf) = rand_bf16(&mut g, num_blocks * bs * mla::CACHE_DIM, 1.0);
    let (kvb, kvf) = rand_bf16(&mut g, tokens * mla::KV_LORA, 1.0);
    let (peb, pef) = rand_bf16(&mut g, tokens * mla::ROPE, 1.0);
    let mut slots: Vec<i64> = (0..(num_blocks * bs) as i64).collect();
    for i in (1..slots.len()).rev() {
        let j = g.random_range(0..=i);
        slots.swap(i, j);
    }
    slots.truncate(tokens);
    if tokens > 1 {
        slots[0] = -1; // padding
    }
    let mut cache = Tensor::from_host(gpu, &cb, &[num_blocks, bs, mla::CACHE_DIM])?;
    let kv = Tensor::from_host(gpu, &kvb, &[tokens, mla::KV_LORA])?;
    let pe = Tensor::from_host(gpu, &peb, &[tokens, mla::ROPE])?;
    let st = Tensor::from_host(gpu, &slots, &[tokens])?;
    mla::mla_cache_append(
        gpu,
        mla::CacheAppendParams {
            cache: cache.view_mut(),
            c_kv: kv.view(),
            k_pe: pe.view(),
            slots: st.view(),
        },
    )?;
    r::cache_append(&mut cf, &kvf, &pef, &slots);
    Ok(CheckRow::exact(
        "mla_cache_append_bf16",
        format!("tokens {tokens}"),
        &f32s(&cache.to_host(gpu)?),
        &cf,
    ))
}

/// `fill_normal` of 4M values: sample mean and std against N(mean, std) (a statistical check:
/// the sample mean's own spread is std / 2048 here), and a different seed gives other values.
pub fn check_fill_normal(gpu: &Gpu, mean: f32, std: f32) -> Result<CheckRow> {
    let n = 1usize << 22;
    let mut t = Tensor::<bf16>::zeros(gpu, &[n])?;
    ew::fill_normal(gpu, t.view_mut(), 7, mean, std)?;
    let v = f32s(&t.to_host(gpu)?);
    let m = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let sd = (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n as f64).sqrt();
    let mut t2 = Tensor::<bf16>::zeros(gpu, &[n])?;
    ew::fill_normal(gpu, t2.view_mut(), 8, mean, std)?;
    let same = f32s(&t2.to_host(gpu)?)
        .iter()
        .zip(&v)
        .filter(|(a, b)| a == b)
        .count();
    // bf16 rounding of mean + std z moves the moments by < 2^-8 relative
    let mean_err = (m - mean as f64).abs();
    let sd_err = (sd - std as f64).abs() / (std as f64).max(1e-30);
    let pass = mean_err <= 6.0 * std as f64 / 2048.0 + mean.abs() as f64 / 256.0
        && sd_err < 0.01
        && same < n / 4;
    Ok(CheckRow {
        op: "fill_normal_bf16".into(),
        sizes: format!("n {n}, N({mean}, {std})"),
        max_abs: mean_err as f32,
        rel_l2: sd_err as f32,
        tol: 0.01,
        pass,
        note: format!("sample mean {m:.5}, std {sd:.5}; seed 8 equal in {same}/{n}"),
    })
}

pub fn check_argmax(gpu: &Gpu, rows: usize, vocab: usize) -> Result<CheckRow> {
    let mut g = rng(11);
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|_| g.random_range(-10.0f32..10.0))
        .collect();
    let lt = Tensor::from_host(gpu, &logits, &[rows, vocab])?;
    let mut ids = Tensor::<i32>::zeros(gpu, &[rows])?;
    sample::argmax(
        gpu,
        sample::ArgmaxParams {
            logits: lt.view(),
            ids: ids.view_mut(),
        },
    )?;
    Ok(CheckRow::exact(
        "argmax_f32",
        format!("rows {rows} vocab {vocab}"),
        &ids.to_host(gpu)?,
        &r::argmax(&logits, vocab),
    ))
}

pub fn check_sample(gpu: &Gpu, rows: usize, vocab: usize) -> Result<CheckRow> {
    let mut g = rng(12);
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|_| g.random_range(-6.0f32..6.0))
        .collect();
    let temp: Vec<f32> = (0..rows)
        .map(|i| {
            if i % 5 == 0 {
                0.0
            } else {
                g.random_range(0.3f32..1.5)
            }
        })
        .collect();
    let top_k: Vec<i32> = (0..rows).map(|i| [0, 1, 5, 50, 1000][i % 5]).collect();
    let top_p: Vec<f32> = (0..rows)
        .map(|i| [1.0, 0.9, 0.5, 0.95, 0.7][(i / 5) % 5])
        .collect();
    let u: Vec<f32> = (0..rows).map(|_| g.random_range(0.0f32..1.0)).collect();
    let t = |v: &Vec<f32>| Tensor::from_host(gpu, v, &[rows]);
    let lt = Tensor::from_host(gpu, &logits, &[rows, vocab])?;
    let (tt, tpt, ut) = (t(&temp)?, t(&top_p)?, t(&u)?);
    let tkt = Tensor::from_host(gpu, &top_k, &[rows])?;
    let mut ids = Tensor::<i32>::zeros(gpu, &[rows])?;
    sample::sample(
        gpu,
        sample::SampleParams {
            logits: lt.view(),
            temperature: tt.view(),
            top_k: tkt.view(),
            top_p: tpt.view(),
            uniform: ut.view(),
            ids: ids.view_mut(),
        },
    )?;
    let got = ids.to_host(gpu)?;
    let want = r::sample(&logits, vocab, &temp, &top_k, &top_p, &u);
    let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    // f32 sums in a different order can move a draw that lands within ~1e-6 of a boundary: allow
    // at most one such row per thousand.
    let allowed = rows / 1000;
    Ok(CheckRow {
        op: "sample_f32".into(),
        sizes: format!("rows {rows} vocab {vocab}"),
        max_abs: bad as f32,
        rel_l2: 0.0,
        tol: allowed as f32,
        pass: bad <= allowed,
        note: format!("{bad} of {rows} draws differ"),
    })
}

/// Every check at the awkward sizes and at real DeepSeek-V2 dims.
pub fn run_all(gpu: &Gpu, quick: bool) -> Result<Vec<CheckRow>> {
    let rows_set: Vec<usize> = if quick { vec![1, 7, 67] } else { ROWS.to_vec() };
    let mut out = Vec::new();
    for &rows in &rows_set {
        out.push(check_embedding(gpu, rows, 5120, 4096)?);
        out.extend(check_rmsnorm(gpu, rows, 5120, false)?);
        out.extend(check_rmsnorm(gpu, rows, 5120, true)?);
        out.push(check_silu_mul(gpu, rows, 1536)?);
        out.push(check_rope(
            gpu,
            rows,
            if rows > 67 { 1 } else { 128 },
            if rows > 67 { 64 } else { 192 },
            if rows > 67 { 0 } else { 128 },
        )?);
        out.push(check_gemm(gpu, rows, 1536, 5120)?);
        out.push(check_gate(gpu, rows, 160, gate_cfg_v2())?);
        out.push(check_gate(
            gpu,
            rows,
            64,
            moe::GateConfig {
                n_group: 1,
                topk_group: 1,
                top_k: 6,
                norm_topk_prob: false,
                routed_scaling_factor: 1.0,
            },
        )?);
        out.extend(check_permute_combine(gpu, rows, 160, 5120)?);
        out.push(check_cache_append(gpu, rows)?);
        out.push(check_argmax(
            gpu,
            rows,
            if rows > 67 { 1000 } else { 102400 },
        )?);
    }
    out.push(check_rmsnorm(gpu, 67, 512, false)?.remove(0));
    out.push(check_rmsnorm(gpu, 67, 1536, false)?.remove(0));
    out.push(check_gate(
        gpu,
        5137,
        160,
        moe::GateConfig {
            norm_topk_prob: true,
            ..gate_cfg_v2()
        },
    )?);
    // the general gate path (72 experts: not whole lanes of 32)
    out.push(check_gate(
        gpu,
        67,
        72,
        moe::GateConfig {
            n_group: 4,
            topk_group: 2,
            top_k: 4,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        },
    )?);
    out.push(check_sample(gpu, 67, 102400)?);
    out.push(check_sample(gpu, if quick { 500 } else { 5137 }, 1000)?);
    out.push(check_expert_ffn(gpu, 67, 8, 5120, 1536)?);
    out.push(check_expert_ffn(gpu, 7, 3, 512, 64)?);
    out.extend(experts::run_grouped(gpu, quick)?);
    out.extend(gemv::run_gemv(gpu)?);
    out.extend(run_mla(
        gpu,
        &[
            mla::MlaKernel::Wgmma,
            mla::MlaKernel::Mma,
            mla::MlaKernel::Seesaw,
            mla::MlaKernel::Tma,
            mla::MlaKernel::TmaPair,
            // (Roles is checked by `dsv2-gpu-check --mla` only until it has run on a GPU: a
            // kernel that traps here would take the rows after it along)
        ],
    )?);
    for (n, ctx, heads, dims, shared) in [
        (1, 1, 4, (32, 8, 32), true),
        (7, 37, 4, (16, 8, 16), false),
        (67, 300, 16, (512, 64, 512), true),
        (67, 300, 16, (128, 64, 128), false),
    ] {
        out.push(crate::ops::general::check_attn_causal(
            gpu, n, ctx, heads, dims, shared,
        )?);
    }
    out.push(check_fill_normal(gpu, 0.0, 0.02)?);
    out.push(check_fill_normal(gpu, 1.0, 0.5)?);
    out.push(crate::ops::general::check_rows_add(gpu, 1, 5120)?);
    out.push(crate::ops::general::check_rows_add(gpu, 67, 5120)?);
    out.push(crate::ops::general::check_rows_add(gpu, 300, 72)?);
    if !quick {
        let lens: Vec<usize> = (0..67).map(|i| 1 + (i * 97) % 700).collect();
        for kernel in [
            mla::MlaKernel::Wgmma,
            mla::MlaKernel::Mma,
            mla::MlaKernel::Seesaw,
            mla::MlaKernel::Tma,
            mla::MlaKernel::TmaPair,
        ] {
            out.push(check_mla_decode(
                gpu,
                &lens,
                128,
                64,
                None,
                kernel,
                BlockLayout::Shuffled,
            )?);
        }
    }
    Ok(out)
}

/// The MLA rows alone (`dsv2-gpu-check --mla`): decode for each of `kernels`, then prefill.
/// Each row prints as soon as it is taken, so that a kernel that crashes the context leaves the
/// rows before it on record.
pub fn run_mla(gpu: &Gpu, kernels: &[mla::MlaKernel]) -> Result<Vec<CheckRow>> {
    // (context lengths, heads, block size, forced splits)
    let cases: [(&[usize], usize, usize, Option<usize>); 12] = [
        (&[1], 128, 64, None),
        (&[7, 1, 67, 130], 128, 64, None),
        (&[5137, 33, 1], 128, 64, None),
        (&[5137, 33, 1], 128, 64, Some(1)),
        (&[5137, 33, 1], 128, 64, Some(3)),
        (&[67, 300, 7], 16, 16, None),
        // V2-Lite's 16 heads over 64-token blocks (the narrow kernel's case), a long context split
        (&[5137, 1, 67, 130], 16, 64, None),
        (&[64, 65, 63, 128], 100, 64, None),
        // more splits than a sequence has tiles: empty splits write only their -inf lse
        (&[1, 2, 100], 128, 16, Some(64)),
        (&[2000, 1, 129], 128, 16, Some(200)),
        // the TMA kernels: an odd tile count (the seesaw's rounds of two tiles), a last tile of
        // one token, cache blocks of 32 and of 128 tokens (TMA pieces of 32 and 64 rows)
        (&[192, 129, 65, 64], 128, 32, Some(1)),
        (&[300, 1000, 17], 128, 128, None),
    ];
    // the latent append first (it also rotates the queries' rope part with rope on)
    let mut out = vec![
        crate::ops::general::check_latent_append(gpu, 67, 512, 64, false)?,
        crate::ops::general::check_latent_append(gpu, 67, 512, 64, true)?,
        crate::ops::general::check_latent_append(gpu, 7, 32, 8, true)?,
        // the combine with the value projection folded in: V2's 128 heads and V2-Lite's 16,
        // an empty split, and a batch of 3
        check_mla_decode_uv(gpu, &[512], 128, 8, 128)?,
        check_mla_decode_uv(gpu, &[512], 16, 8, 128)?,
        check_mla_decode_uv(gpu, &[67, 1, 300], 16, 5, 128)?,
        // a value width that leaves the last 32-column block part empty
        check_mla_decode_uv(gpu, &[130], 16, 3, 40)?,
    ];
    // the append with decode's W_UK absorb in its launch (two rows each: the references, and
    // bit for bit the GEMV it replaces): V2-Lite at 1, 3 (one slot -1) and 4 rows, V2 at 1, and
    // odd dims (5 heads, qk_nope 136 = 17 rows per K residue, 200 columns = a part-empty tile)
    // with the queries given apart
    let lite = |tokens| AbsorbCase {
        tokens,
        heads: 16,
        dn: 128,
        dr: 64,
        dv: 128,
        kv_lora: 512,
        fused_q: true,
    };
    for case in [
        lite(1),
        lite(4),
        lite(3),
        AbsorbCase {
            heads: 128,
            ..lite(1)
        },
        AbsorbCase {
            tokens: 3,
            heads: 5,
            dn: 136,
            dr: 8,
            dv: 16,
            kv_lora: 200,
            fused_q: false,
        },
    ] {
        out.extend(check_latent_append_absorb(gpu, &case)?);
    }
    // blocks in runs, as a prompt's are allocated: the TMA kernels copy a whole tile of
    // consecutive blocks in one box a chunk (V2 and V2-Lite heads, blocks of 16 and 8 tokens)
    let runs: [(&[usize], usize, usize, Option<usize>); 3] = [
        (&[5137, 33, 1], 128, 16, None),
        (&[300, 1000, 17], 16, 16, None),
        (&[700, 64, 129], 128, 8, Some(2)),
    ];
    for &kernel in kernels {
        for (lens, heads, block, splits) in cases {
            let row = check_mla_decode(
                gpu,
                lens,
                heads,
                block,
                splits,
                kernel,
                BlockLayout::Shuffled,
            )?;
            row.eprint_progress();
            out.push(row);
        }
        for (lens, heads, block, splits) in runs {
            let row = check_mla_decode(gpu, lens, heads, block, splits, kernel, BlockLayout::Runs)?;
            row.eprint_progress();
            out.push(row);
        }
    }
    out.extend(prefill::run_prefill(gpu)?);
    // the FP8 cache's kernels last (a new kernel last: a crash leaves the rows above printed)
    out.extend(fp8::run_fp8(gpu)?);
    Ok(out)
}

/// Print rows as a fixed-width table.
pub fn print_table(rows: &[CheckRow]) {
    println!(
        "{:<28} {:<52} {:>10} {:>10} {:>8}  {:<4} note",
        "op", "sizes", "max_abs", "rel_l2", "tol", "ok"
    );
    for r in rows {
        println!(
            "{:<28} {:<52} {:>10.3e} {:>10.3e} {:>8.1e}  {:<4} {}",
            r.op,
            r.sizes,
            r.max_abs,
            r.rel_l2,
            r.tol,
            if r.pass { "PASS" } else { "FAIL" },
            r.note
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{BlockLayout, rng};

    /// Whole 64-token tiles whose blocks follow one another (the TMA kernels' one-box copies)
    /// and tiles whose do not (their per-block pieces), over every sequence of the table.
    fn tiles_by_kind(table: &[i32], batch: usize, max_blocks: usize, bs: usize) -> (usize, usize) {
        let per_tile = 64 / bs;
        let (mut runs, mut pieces) = (0, 0);
        for b in 0..batch {
            let row = &table[b * max_blocks..(b + 1) * max_blocks];
            for tile in row.chunks_exact(per_tile) {
                if tile.windows(2).all(|w| w[1] == w[0] + 1) {
                    runs += 1;
                } else {
                    pieces += 1;
                }
            }
        }
        (runs, pieces)
    }

    /// The "runs" check rows take both copy paths of the TMA kernels; shuffled tables (nearly)
    /// never the one-box path. Without this the runs rows could pass on the piece path alone.
    #[test]
    fn runs_layout_has_tiles_of_both_kinds() {
        for bs in [8, 16, 32] {
            let (batch, max_blocks) = (3, 12 * 64 / bs);
            let n = batch * max_blocks + 3;
            let runs = BlockLayout::Runs.block_table(&mut rng(1), batch, max_blocks, n, bs);
            let (r, p) = tiles_by_kind(&runs, batch, max_blocks, bs);
            assert_eq!((r, p), (24, 12), "block {bs}: every third tile broken");
            let mut sorted = runs.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(
                sorted.len(),
                batch * max_blocks,
                "a physical block used twice"
            );
            let shuffled = BlockLayout::Shuffled.block_table(&mut rng(1), batch, max_blocks, n, bs);
            assert!(tiles_by_kind(&shuffled, batch, max_blocks, bs).0 <= 1);
        }
    }
}
