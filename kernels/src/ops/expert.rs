//! Grouped expert FFN over permuted rows: per non-empty expert a gate_up GEMM, then one SiLU·mul
//! over all rows, then per expert a down GEMM.
//!
//! Where it stands: a loop of cuBLAS calls per expert (the brief's accepted first version), spread
//! round-robin by row count over `SIDE_STREAMS` streams so that small per-expert GEMMs (a few
//! hundred rows fill only part of the 132 SMs) overlap. A single grouped kernel (wgmma, one launch
//! for all experts) is the later step.

use half::bf16;

use super::elementwise::{SiluMulParams, silu_mul};
use super::gemm::gemm_raw;
use crate::device::Gpu;
use crate::error::{Result, shape_err};
use crate::tensor::{View, ViewMut};

/// x [R, H] permuted rows (expert e owns rows offsets[e] .. offsets[e] + counts[e]);
/// gate_up [E, 2I, H] (gate rows first, then up, like HF's fused `experts.gate_up_proj`);
/// down [E, H, I]; workspaces gu [R, 2I] and act [R, I]; out [R, H] (unweighted expert outputs,
/// the combine applies the routing weights). `counts` is on the host (sum = R).
pub struct ExpertFfnParams<'a> {
    pub x: View<'a, bf16>,
    pub gate_up: View<'a, bf16>,
    pub down: View<'a, bf16>,
    pub counts: &'a [usize],
    pub gu: ViewMut<'a, bf16>,
    pub act: ViewMut<'a, bf16>,
    pub out: ViewMut<'a, bf16>,
}

pub fn expert_ffn(gpu: &Gpu, mut p: ExpertFfnParams<'_>) -> Result<()> {
    const OP: &str = "expert_ffn_bf16";
    p.x.expect(OP, "x", &[None, None])?;
    let (rows, hidden) = (p.x.shape()[0], p.x.shape()[1]);
    p.gate_up
        .expect(OP, "gate_up", &[None, None, Some(hidden)])?;
    let (n_exp, two_i) = (p.gate_up.shape()[0], p.gate_up.shape()[1]);
    let inter = two_i / 2;
    p.down
        .expect(OP, "down", &[Some(n_exp), Some(hidden), Some(inter)])?;
    p.gu.expect(OP, "gu", &[Some(rows), Some(two_i)])?;
    p.act.expect(OP, "act", &[Some(rows), Some(inter)])?;
    p.out.expect(OP, "out", &[Some(rows), Some(hidden)])?;
    if p.counts.len() != n_exp || p.counts.iter().sum::<usize>() != rows {
        return Err(shape_err(
            OP,
            format!(
                "counts has {} entries summing to {}, expected {n_exp} summing to {rows}",
                p.counts.len(),
                p.counts.iter().sum::<usize>()
            ),
        ));
    }
    if rows == 0 {
        return Ok(());
    }
    let mut offsets = Vec::with_capacity(n_exp);
    let mut acc = 0usize;
    for &c in p.counts {
        offsets.push(acc);
        acc += c;
    }
    // balance: biggest experts first onto the least-loaded stream
    let mut order: Vec<usize> = (0..n_exp).filter(|&e| p.counts[e] > 0).collect();
    order.sort_by_key(|&e| std::cmp::Reverse(p.counts[e]));
    let ns = gpu.side.len().max(1);
    let mut load = vec![0usize; ns];
    let mut assign = Vec::with_capacity(order.len());
    for e in order {
        let s = (0..ns).min_by_key(|&s| load[s]).unwrap_or(0);
        load[s] += p.counts[e];
        assign.push((e, s));
    }
    let bsz = std::mem::size_of::<bf16>() as u64;
    let (x, gu_w, dn_w, gu, act, out) = (
        p.x.ptr(),
        p.gate_up.ptr(),
        p.down.ptr(),
        p.gu.ptr(),
        p.act.ptr(),
        p.out.ptr(),
    );
    let (h, i2, i1) = (hidden as u64, two_i as u64, inter as u64);

    // phase 1: gate_up per expert on the side streams
    fork(gpu)?;
    for &(e, s) in &assign {
        let (o, n) = (offsets[e] as u64, p.counts[e]);
        let handle = side_blas(gpu, s);
        // SAFETY: rows o..o+n of x / gu and expert e's [2I, H] weight slice lie inside the
        // shape-checked tensors; the side stream waited for the main stream (fork) and the main
        // stream waits for it (join) before anything reads gu.
        unsafe {
            gemm_raw::<bf16>(
                handle,
                n,
                two_i,
                hidden,
                x + o * h * bsz,
                gu_w + e as u64 * i2 * h * bsz,
                gu + o * i2 * bsz,
                1.0,
                0.0,
            )?;
        }
    }
    join(gpu)?;
    silu_mul(
        gpu,
        SiluMulParams {
            input: p.gu.as_view(),
            out: p.act.reborrow(),
        },
    )?;
    // phase 2: down per expert
    fork(gpu)?;
    for &(e, s) in &assign {
        let (o, n) = (offsets[e] as u64, p.counts[e]);
        let handle = side_blas(gpu, s);
        // SAFETY: as above for act [R, I], out [R, H] and expert e's [H, I] down weight.
        unsafe {
            gemm_raw::<bf16>(
                handle,
                n,
                hidden,
                inter,
                act + o * i1 * bsz,
                dn_w + e as u64 * h * i1 * bsz,
                out + o * h * bsz,
                1.0,
                0.0,
            )?;
        }
    }
    join(gpu)
}

fn side_blas(gpu: &Gpu, s: usize) -> &cudarc::cublas::CudaBlas {
    gpu.side.get(s).map(|(_, b)| b).unwrap_or(&gpu.blas)
}

/// Side streams wait for everything enqueued on the main stream so far.
fn fork(gpu: &Gpu) -> Result<()> {
    for (s, _) in &gpu.side {
        s.join(&gpu.stream)?;
    }
    Ok(())
}

/// The main stream waits for all side streams.
fn join(gpu: &Gpu) -> Result<()> {
    for (s, _) in &gpu.side {
        gpu.stream.join(s)?;
    }
    Ok(())
}
