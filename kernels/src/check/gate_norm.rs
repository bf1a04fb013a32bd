//! GPU check of the post-attention residual add + RMSNorm computed inside the gate's launch
//! (`moe_gate_gemv_f32` with `GateInput::AddNorm`), one row per case:
//! - bit for bit against the two launches it replaces (`add_rmsnorm_bf16`, then the gate on its
//!   output): the new residual, the normed rows, the logits, the chosen ids and their weights
//!   must all be identical, since the kernel sums the squares in the norm launcher's order;
//! - the normed rows against the CPU reference (`reference::add_rmsnorm`) within 1e-2 relative L2,
//!   so that a kernel and a launcher wrong in the same way still fail.
//!
//! The outputs start as NaN, so a row or element left unwritten fails.

use half::bf16;

use super::{CheckRow, rand_bf16, rng};
use crate::device::Gpu;
use crate::error::Result;
use crate::ops::{elementwise as ew, moe};
use crate::reference as r;
use crate::tensor::Tensor;

pub fn check_gate_gemv_add_norm(
    gpu: &Gpu,
    tokens: usize,
    hidden: usize,
    n_exp: usize,
    cfg: moe::GateConfig,
) -> Result<CheckRow> {
    let eps = 1e-6f32;
    let mut g = rng(23);
    let (xb, xf) = rand_bf16(&mut g, tokens * hidden, 1.0);
    let (rb, rf) = rand_bf16(&mut g, tokens * hidden, 3.0);
    let (nb, nf) = rand_bf16(&mut g, hidden, 1.0);
    let (wb, _) = rand_bf16(&mut g, n_exp * hidden, 2.0 / (hidden as f32).sqrt());
    let nan = vec![bf16::from_f32(f32::NAN); tokens * hidden];
    let x = Tensor::from_host(gpu, &xb, &[tokens, hidden])?;
    let norm_w = Tensor::from_host(gpu, &nb, &[hidden])?;
    let w = Tensor::from_host(gpu, &wb, &[n_exp, hidden])?;
    let mut counter = Tensor::<i32>::zeros(gpu, &[1])?;

    // the two launches the fused one replaces
    let mut res_a = Tensor::from_host(gpu, &rb, &[tokens, hidden])?;
    let mut normed_a = Tensor::from_host(gpu, &nan, &[tokens, hidden])?;
    ew::rmsnorm(
        gpu,
        ew::RmsNormParams {
            x: x.view(),
            weight: norm_w.view(),
            residual: Some(res_a.view_mut()),
            out: normed_a.view_mut(),
            eps,
        },
    )?;
    let mut logits_a = Tensor::<f32>::zeros(gpu, &[tokens, n_exp])?;
    let mut ids_a = Tensor::<i32>::zeros(gpu, &[tokens, cfg.top_k])?;
    let mut wt_a = Tensor::<f32>::zeros(gpu, &[tokens, cfg.top_k])?;
    moe::moe_gate_gemv(
        gpu,
        moe::GateGemvParams {
            x: moe::GateInput::Rows(normed_a.view()),
            w: w.view(),
            logits: logits_a.view_mut(),
            counter: counter.view_mut(),
            ids: ids_a.view_mut(),
            weights: wt_a.view_mut(),
            cfg,
        },
    )?;

    // fused: the residual read from its own buffer, the new one written to another
    let res_old = Tensor::from_host(gpu, &rb, &[tokens, hidden])?;
    let mut res_b = Tensor::from_host(gpu, &nan, &[tokens, hidden])?;
    let mut normed_b = Tensor::from_host(gpu, &nan, &[tokens, hidden])?;
    let mut logits_b = Tensor::<f32>::zeros(gpu, &[tokens, n_exp])?;
    let mut ids_b = Tensor::<i32>::zeros(gpu, &[tokens, cfg.top_k])?;
    let mut wt_b = Tensor::<f32>::zeros(gpu, &[tokens, cfg.top_k])?;
    moe::moe_gate_gemv(
        gpu,
        moe::GateGemvParams {
            x: moe::GateInput::AddNorm {
                x: x.view(),
                residual: res_old.view(),
                weight: norm_w.view(),
                eps,
                res_out: res_b.view_mut(),
                out: normed_b.view_mut(),
            },
            w: w.view(),
            logits: logits_b.view_mut(),
            counter: counter.view_mut(),
            ids: ids_b.view_mut(),
            weights: wt_b.view_mut(),
            cfg,
        },
    )?;
    let bits = |t: &Tensor<bf16>| -> Result<Vec<u16>> {
        Ok(t.to_host(gpu)?.iter().map(|v| v.to_bits()).collect())
    };
    let f32_bits = |t: &Tensor<f32>| -> Result<Vec<u32>> {
        Ok(t.to_host(gpu)?.iter().map(|v| v.to_bits()).collect())
    };
    let same_res = bits(&res_a)? == bits(&res_b)?;
    let same_normed = bits(&normed_a)? == bits(&normed_b)?;
    let same_logits = f32_bits(&logits_a)? == f32_bits(&logits_b)?;
    let same_choice =
        ids_a.to_host(gpu)? == ids_b.to_host(gpu)? && f32_bits(&wt_a)? == f32_bits(&wt_b)?;
    let left = counter.to_host(gpu)?[0];

    let (want, _) = r::add_rmsnorm(&xf, &rf, &nf, eps);
    let got: Vec<f32> = normed_b.to_host(gpu)?.iter().map(|v| v.to_f32()).collect();
    let mut row = CheckRow::cmp(
        "moe_gate_gemv_f32 + add_rmsnorm",
        format!(
            "tokens {tokens} hidden {hidden} E {n_exp} groups {}/{} top{}",
            cfg.topk_group, cfg.n_group, cfg.top_k
        ),
        &got,
        &want,
        1e-2,
    );
    row.pass &= same_res && same_normed && same_logits && same_choice && left == 0;
    row.note = format!(
        "vs add_rmsnorm_bf16 + gate, bit for bit: residual {same_res}, normed {same_normed}, logits {same_logits}, ids+weights {same_choice}; counter after: {left}"
    );
    Ok(row)
}
