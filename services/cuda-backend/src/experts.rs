//! Routed experts on the GPU: routing ids → permutation by expert (`moe_permute`), gather of the
//! permuted rows, per-expert gate/up GEMMs into one [rows, 2I] buffer, one SiLU·mul over all rows,
//! per-expert down GEMMs, then the weighted un-permute (`moe_combine`).
//!
//! Where it stands: one cuBLAS call per (expert, projection) on the main stream, like the
//! kernels crate's first expert FFN; weights stay in the checkpoint's per-expert tensors (the
//! fused [E, 2I, H] layout of `ops::expert` would need a repacking at load). The row counts that
//! size the GEMMs come from the routing the host already holds (no device round trip).

use half::bf16;

use dsv2_core::backend::ExpertBank;
use dsv2_core::error::Result;
use dsv2_core::routing::Routing;
use dsv2_kernels::Tensor;
use dsv2_kernels::ops::{elementwise as ew, moe, small_experts as small};

use crate::blas::{Gemm, gemm};
use crate::{CudaAct, CudaBackend, CudaWeight, Kx, err};

const BF: u64 = std::mem::size_of::<bf16>() as u64;

/// The intermediate size of `bank`'s experts: `Ok(None)` for a bank that holds none, an error
/// naming the shapes when an expert does not fit an FFN over `hidden` features.
pub(crate) fn bank_intermediate(
    bank: &ExpertBank<CudaWeight>,
    hidden: usize,
) -> std::result::Result<Option<usize>, String> {
    let Some(inter) = bank
        .experts
        .iter()
        .flatten()
        .next()
        .map(|m| m.gate.shape()[0])
    else {
        return Ok(None);
    };
    for m in bank.experts.iter().flatten() {
        if m.gate.shape() != [inter, hidden]
            || m.up.shape() != [inter, hidden]
            || m.down.shape() != [hidden, inter]
        {
            return Err(format!(
                "experts: input has {hidden} features, expert weights are gate {:?} up {:?} down {:?}",
                m.gate.shape(),
                m.up.shape(),
                m.down.shape()
            ));
        }
    }
    Ok(Some(inter))
}

pub(crate) fn run(
    b: &CudaBackend,
    bank: &ExpertBank<CudaWeight>,
    x: &CudaAct,
    routing: &Routing,
) -> Result<CudaAct> {
    let gpu = &b.gpu;
    let (n, hidden) = x.dims();
    if routing.rows() != n {
        return Err(err(format!(
            "experts: routing has {} rows, input {n}",
            routing.rows()
        )));
    }
    let n_exp = bank.experts.len();
    // zeros: rows without a local expert are written only by moe_combine, which is skipped
    // when no row is routed here at all
    let mut out = b.zeros(&[n, hidden])?;
    if n == 0 || routing.top_k == 0 || n_exp == 0 {
        return Ok(CudaAct::Bf16(out));
    }
    // Experts this process does not hold (and padding slots) become -1: not routed here.
    let ids: Vec<i32> = routing
        .ids
        .iter()
        .map(|&e| match bank.experts.get(e as usize) {
            Some(Some(_)) => e as i32,
            _ => -1,
        })
        .collect();
    let inter = bank_intermediate(bank, hidden).map_err(err)?.unwrap_or(0);
    let xb = b.bf16_of(x)?;
    let k = routing.top_k;
    let ids_t = Tensor::from_host(gpu, &ids, &[n, k]).kx()?;
    let w_t = Tensor::from_host(gpu, &routing.weights, &[n, k]).kx()?;
    if n <= small::SMALL_EXPERTS_MAX_ROWS && b.small_experts_enabled() {
        let table = b.expert_table(bank)?;
        let mut act = b.empty(&[n * k, inter])?;
        // SAFETY: ids are -1 or experts this bank holds (mapped above); the table holds the
        // addresses of those experts' weights, shape-checked above, which live as long as the
        // bank, i.e. past these launches.
        let r = unsafe {
            small::small_experts(
                gpu,
                small::SmallExpertsParams {
                    x: xb.view(),
                    ids: ids_t.view(),
                    weights: w_t.view(),
                    ptrs: table.view(),
                    act: act.view_mut(),
                    out: out.view_mut(),
                },
            )
        };
        match r {
            Ok(()) => return Ok(CudaAct::Bf16(out)),
            // sizes beyond the kernels' shared memory take the permuted path below
            Err(dsv2_kernels::KernelError::Unsupported { .. }) => {}
            Err(e) => return Err(crate::kerr(e)),
        }
    }
    let perm = moe::moe_permute(
        gpu,
        moe::PermuteParams {
            ids: ids_t.view(),
            n_experts: n_exp,
        },
    )
    .kx()?;
    // The host sizes the GEMMs by the per-expert row counts: the histogram of the ids it already
    // holds (what moe_permute counts on the device), so no device-to-host copy and no stream
    // synchronisation here.
    let mut counts = vec![0i32; n_exp];
    for &e in &ids {
        if let Some(c) = usize::try_from(e).ok().and_then(|e| counts.get_mut(e)) {
            *c += 1;
        }
    }
    let total: usize = counts.iter().map(|&c| c.max(0) as usize).sum();
    if total > 0 {
        let mut xp = b.empty(&[total, hidden])?;
        moe::moe_gather(
            gpu,
            moe::GatherParams {
                x: xb.view(),
                src_row: perm.src_row.view(),
                out: xp.view_mut(),
            },
        )
        .kx()?;
        // each written entirely: the spans of the GEMMs cover all `total` rows
        let gu = b.empty(&[total, 2 * inter])?;
        let mut act = b.empty(&[total, inter])?;
        let y = b.empty(&[total, hidden])?;
        let mut off = 0usize;
        let mut spans = Vec::new();
        for (e, &c) in counts.iter().enumerate() {
            let c = c.max(0) as usize;
            if c > 0 {
                spans.push((e, off, c));
            }
            off += c;
        }
        for &(e, o, c) in &spans {
            let Some(Some(m)) = bank.experts.get(e) else {
                return Err(err(format!("expert {e} has rows but no weights")));
            };
            let mut g = Gemm::xwt(
                c,
                inter,
                hidden,
                xp.ptr() + (o * hidden) as u64 * BF,
                m.gate.t.ptr(),
                gu.ptr() + (o * 2 * inter) as u64 * BF,
            );
            g.ldy = 2 * inter;
            gemm::<bf16>(gpu, g).kx()?;
            g.w = m.up.t.ptr();
            g.y += inter as u64 * BF;
            gemm::<bf16>(gpu, g).kx()?;
        }
        ew::silu_mul(
            gpu,
            ew::SiluMulParams {
                input: gu.view(),
                out: act.view_mut(),
            },
        )
        .kx()?;
        for &(e, o, c) in &spans {
            let Some(Some(m)) = bank.experts.get(e) else {
                return Err(err(format!("expert {e} has rows but no weights")));
            };
            gemm::<bf16>(
                gpu,
                Gemm::xwt(
                    c,
                    hidden,
                    inter,
                    act.ptr() + (o * inter) as u64 * BF,
                    m.down.t.ptr(),
                    y.ptr() + (o * hidden) as u64 * BF,
                ),
            )
            .kx()?;
        }
        moe::moe_combine(
            gpu,
            moe::CombineParams {
                y: y.view(),
                slot_of: perm.slot_of.view(),
                weights: w_t.view(),
                out: out.view_mut(),
                accumulate: false,
            },
        )
        .kx()?;
    }
    Ok(CudaAct::Bf16(out))
}
