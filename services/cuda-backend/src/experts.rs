//! Routed experts on the GPU: the one expert-FFN path of this backend, for in-process experts,
//! gRPC shards and NCCL shards alike ([`on_device`]): a few rows take the two-launch small-batch
//! kernels, everything else the grouped kernels (`ops::grouped`: permutation, gather, one
//! launch per projection over every expert, weighted combine). Weights stay in the checkpoint's
//! per-expert tensors, found through the bank's device address table.
//!
//! The per-expert cuBLAS loop ([`run_loop`]) remains for shapes the kernels do not take (hidden
//! or intermediate not a multiple of 8), and behind `DSV2_GROUPED_EXPERTS=0` (every size) or
//! `DSV2_GROUPED_PREFILL=0` (prefill-sized batches), to compare.

use half::bf16;

use cudarc::driver::CudaEvent;
use dsv2_core::backend::{ExpertBank, MlpWeights};
use dsv2_core::error::Result;
use dsv2_core::routing::Routing;
use dsv2_kernels::Gpu;
use dsv2_kernels::ops::{elementwise as ew, gemv, grouped, moe, small_experts as small};
use dsv2_kernels::{Tensor, View, ViewMut};

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
    let xb = b.bf16_of(x)?;
    let k = routing.top_k;
    let ids_t = Tensor::from_host(gpu, &ids, &[n, k]).kx()?;
    let w_t = Tensor::from_host(gpu, &routing.weights, &[n, k]).kx()?;
    let routed = ids.iter().filter(|&&e| e >= 0).count();
    let mut seen = vec![false; n_exp];
    for &e in &ids {
        if let Some(s) = usize::try_from(e).ok().and_then(|e| seen.get_mut(e)) {
            *s = true;
        }
    }
    let touched = seen.iter().filter(|&&s| s).count();
    if on_device(
        b,
        bank,
        xb.view(),
        ids_t.view(),
        w_t.view(),
        out.view_mut(),
        Some(routed),
        Some(touched),
        None,
    )? {
        return Ok(CudaAct::Bf16(out));
    }
    run_loop(b, bank, &xb, &ids, &ids_t, &w_t, out)
}

/// Which on-device kernels take a batch of routed experts (see [`on_device`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DevicePath {
    /// the small-batch kernels (each row reads its experts' weights itself)
    Small,
    /// the grouped kernels (every expert of the layer in one launch per projection)
    Grouped,
    /// none: the caller takes the host path
    Host,
}

/// The path [`on_device`] takes for `n` rows of top-`k` over `bank` (`routed` / `touched` as
/// there).
pub(crate) fn device_path(
    b: &CudaBackend,
    bank: &ExpertBank<CudaWeight>,
    n: usize,
    k: usize,
    routed: Option<usize>,
    touched: Option<usize>,
) -> DevicePath {
    if n <= small::SMALL_EXPERTS_MAX_ROWS && b.small_experts_enabled() {
        DevicePath::Small
    } else if b.grouped_experts_enabled()
        && (b.grouped_prefill_enabled() || !prefill_sized(n * k, routed, touched, bank))
    {
        DevicePath::Grouped
    } else {
        DevicePath::Host
    }
}

/// Routed experts of `bank` for rows whose routing is already on the device: x [n, H] bf16,
/// ids [n, k] (i32; values outside 0..E, or experts the bank does not hold, contribute
/// nothing), weights [n, k] f32; writes out [n, H]. `routed` / `touched`: the routed
/// assignments and distinct experts, when the caller knows them (host routing), else None.
/// `beside`: `out` is being written on another stream until this event (the shared experts,
/// see `CudaBackend::local_experts_routed`); the routed sum is added into it, which only the
/// grouped path does ([`device_path`] must be [`DevicePath::Grouped`]).
/// `Ok(false)`: shapes the kernels do not cover, a prefill-sized batch (see [`prefill_sized`]),
/// or the grouped kernels switched off above the small-batch size; nothing was written and the
/// caller takes the host path.
#[allow(clippy::too_many_arguments)]
pub(crate) fn on_device(
    b: &CudaBackend,
    bank: &ExpertBank<CudaWeight>,
    x: View<'_, bf16>,
    ids: View<'_, i32>,
    weights: View<'_, f32>,
    out: ViewMut<'_, bf16>,
    routed: Option<usize>,
    touched: Option<usize>,
    beside: Option<&CudaEvent>,
) -> Result<bool> {
    let (n, hidden) = match x.shape() {
        [n, h] => (*n, *h),
        other => return Err(err(format!("experts: input shape {other:?}"))),
    };
    // an empty bank or mismatched shapes: the host path reports them
    let Ok(Some(inter)) = bank_intermediate(bank, hidden) else {
        return Ok(false);
    };
    let k = ids.shape().get(1).copied().unwrap_or(0);
    let gpu = &b.gpu;
    let path = device_path(b, bank, n, k, routed, touched);
    if beside.is_some() && path != DevicePath::Grouped {
        return Err(err(format!(
            "experts: {n} rows take the {path:?} path, which cannot add into an output written beside it"
        )));
    }
    let table = b.expert_table(bank)?;
    let r = match path {
        DevicePath::Small => {
            let mut act = b.empty(&[n * k, inter])?;
            // SAFETY: ids within 0..E name this bank's experts or address 0 (not held:
            // skipped); the table's addresses are this bank's weights, shape-checked by
            // bank_intermediate and alive past these launches (the bank outlives the call).
            unsafe {
                small::small_experts(
                    gpu,
                    small::SmallExpertsParams {
                        x,
                        ids,
                        weights,
                        ptrs: table.view(),
                        act: act.view_mut(),
                        out,
                        shared: None,
                        shared_beside: None,
                    },
                )
            }
        }
        // SAFETY: as above; `routed`, when given, counts exactly the ids within 0..E (the
        // callers compute it from the same ids).
        DevicePath::Grouped => unsafe {
            grouped::grouped_experts(
                gpu,
                grouped::GroupedExpertsParams {
                    x,
                    ids,
                    weights,
                    ptrs: table.view(),
                    inter,
                    out,
                    routed_rows: routed,
                    touched_experts: touched,
                    tile: None,
                    prefill_tile: b.grouped_prefill_tile(),
                    accumulate: beside.is_some(),
                    before_combine: beside,
                },
            )
        },
        DevicePath::Host => return Ok(false),
    };
    match r {
        Ok(()) => Ok(true),
        Err(dsv2_kernels::KernelError::Unsupported { .. }) => Ok(false),
        Err(e) => Err(crate::kerr(e)),
    }
}

/// Most rows for which the shared experts ride in the small-batch kernels: each row reads the
/// shared weights itself there, so at 4 rows the 4-layer V2 step was 8 % slower than with the
/// shared MLP's own GEMVs, which read them once (94 MB a layer that L2 cannot keep; V2-Lite's
/// 35 MB stays in L2 and broke even); at one row it is 2.8 % (V2) and 7.5 % (V2-Lite) faster
/// (bench/RESULTS.md, session 13).
const FUSED_SHARED_MAX_ROWS: usize = 1;

/// The small-batch expert kernels with the layer's shared experts in the same two launches
/// (`small::SharedMlp`): x [n, H], device routing ids/weights [n, k], writes out [n, H] =
/// routed + shared. `Ok(false)`: more than [`FUSED_SHARED_MAX_ROWS`] rows, the small-batch
/// kernels switched off, or a shared MLP that does not split into parts of the routed
/// intermediate size `inter` (the caller then runs the routed and shared experts apart);
/// nothing was written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn small_with_shared(
    b: &CudaBackend,
    bank: &ExpertBank<CudaWeight>,
    inter: usize,
    x: &Tensor<bf16>,
    ids: &Tensor<i32>,
    weights: &Tensor<f32>,
    shared: &MlpWeights<CudaWeight>,
    out: &mut Tensor<bf16>,
    beside: Option<SharedBeside<'_>>,
) -> Result<bool> {
    let (n, hidden) = (x.shape()[0], x.shape()[1]);
    let k = ids.shape().get(1).copied().unwrap_or(0);
    let si = shared.gate.shape().first().copied().unwrap_or(0);
    let Some(parts) = small::shared_parts(si, inter) else {
        return Ok(false);
    };
    if n > FUSED_SHARED_MAX_ROWS.min(small::SMALL_EXPERTS_MAX_ROWS)
        || !b.small_experts_enabled()
        || shared.gate.shape() != [si, hidden]
        || shared.up.shape() != [si, hidden]
        || shared.down.shape() != [hidden, si]
    {
        return Ok(false);
    }
    let table = b.expert_table(bank)?;
    let act_shape = [n * (k + parts), inter];
    let (mut act, shared_done) = match beside {
        Some(bs) if n == 1 && bs.act.shape() == act_shape => {
            let SharedBeside {
                side,
                ready,
                norm,
                mut act,
            } = bs;
            let (done, written) =
                shared_gate_up_beside(side, ready, norm, shared, x, &mut act, k, parts, inter);
            // the main stream joins the beside stream whatever happened there (an unjoined
            // stream fails a graph capture, and `act` / the norm's inputs are freed on main)
            let done = done.kx()?;
            if !matches!(written, Ok(true)) {
                b.gpu.stream.wait(&done).kx()?;
            }
            (act, written?.then_some(done))
        }
        _ => (b.empty(&act_shape)?, None),
    };
    // SAFETY: the gate kernel's ids lie in 0..E = the table's rows; the table's addresses are
    // this bank's weights (shape-checked by bank_intermediate) and the shared weights are
    // checked by the launcher; all outlive the launches (the bank and model outlive the call).
    let r = unsafe {
        small::small_experts(
            &b.gpu,
            small::SmallExpertsParams {
                x: x.view(),
                ids: ids.view(),
                weights: weights.view(),
                ptrs: table.view(),
                act: act.view_mut(),
                out: out.view_mut(),
                shared: Some(small::SharedMlp {
                    gate: shared.gate.t.view(),
                    up: shared.up.t.view(),
                    down: shared.down.t.view(),
                }),
                shared_beside: shared_done.as_ref(),
            },
        )
    };
    // (on success the launcher waited before the down projection; on an error it may not have
    // reached that wait: `act` is freed in the main stream's order, after the beside stream's
    // writes)
    if let (Err(_), Some(done)) = (&r, &shared_done) {
        b.gpu.stream.wait(done).kx()?;
    }
    // (a refused shape is refused before any launch, and the main stream has joined the beside
    // stream above: the caller's other path may take the row)
    match r {
        Ok(()) => Ok(true),
        Err(dsv2_kernels::KernelError::Unsupported { .. }) => Ok(false),
        Err(e) => Err(crate::kerr(e)),
    }
}

/// The beside stream's part of [`small_with_shared`] at one row: where the shared experts'
/// gate/up run, and from when.
pub(crate) struct SharedBeside<'a> {
    /// the backend's beside view (`Gpu::beside`)
    pub side: &'a Gpu,
    /// recorded on the main stream once the inputs the beside work reads were written (with
    /// `norm`: before the gate kernel's launch, which it then overlaps)
    pub ready: &'a CudaEvent,
    /// the post-attention residual add + RMSNorm that the gate kernel also computes: the beside
    /// GEMV computes it for itself from the same inputs (its `residual_out` is its own scratch,
    /// not the layer's residual); None: `x` is the normed input, written before `ready`
    pub norm: Option<gemv::AddNormRow>,
    /// the small kernels' activations [k + parts, inter], allocated on the main stream before
    /// `ready` was recorded: the beside stream writes its last rows, and a buffer allocated on
    /// main after `ready` could still be in use by main's earlier work when it does
    pub act: Tensor<bf16>,
}

/// The shared MLP's gate/up and SiLU·mul for one row on the beside stream, written into act's
/// last `parts` rows (the layout the small down kernel reads: the row's parts in a row). The
/// event marks the beside stream's work done, and the main stream must wait for it (under a
/// graph capture, an unjoined stream fails the capture); the flag says whether the rows were
/// written: false where the paired GEMV does not take the shape (the small kernels then
/// compute the shared slots themselves). `x` is one row [1, H] (the caller takes no other).
#[allow(clippy::too_many_arguments)]
fn shared_gate_up_beside(
    side: &Gpu,
    ready: &CudaEvent,
    norm: Option<gemv::AddNormRow>,
    shared: &MlpWeights<CudaWeight>,
    x: &Tensor<bf16>,
    act: &mut Tensor<bf16>,
    k: usize,
    parts: usize,
    inter: usize,
) -> (
    std::result::Result<CudaEvent, cudarc::driver::DriverError>,
    Result<bool>,
) {
    if let Err(e) = side.stream.wait(ready) {
        return (Err(e), Ok(false));
    }
    // the buffers of the beside stream's own are freed on it (inside the closure) before the
    // event is recorded: work on it after its last join would leave a graph capture unjoined
    let written = (|| -> Result<bool> {
        let hidden = x.shape()[1];
        let si = parts * inter;
        let gu = Tensor::<bf16>::uninit(side, &[1, 2 * si]).kx()?;
        let mut g = Gemm::xwt(1, si, hidden, x.ptr(), shared.gate.t.ptr(), gu.ptr());
        g.ldy = 2 * si;
        let second = gemv::PairSecond {
            w: shared.up.t.ptr(),
            y: gu.ptr() + (si * std::mem::size_of::<bf16>()) as u64,
            n: si,
            ldy: 2 * si,
        };
        let launched = match norm {
            Some(norm) => {
                let scratch = Tensor::<bf16>::uninit(side, &[1, hidden]).kx()?;
                let norm = gemv::AddNormRow {
                    residual_out: scratch.ptr(),
                    ..norm
                };
                // SAFETY: the shared weights are [si, H] (checked by the caller), gu [1, 2 si];
                // the norm's vectors are the layer's live [1, H] inputs (the caller keeps them
                // alive until the main stream has waited for this stream) and the scratch is
                // apart from them.
                unsafe { gemv::gemv_pair_after_add_norm(side, &g, second, norm, false) }.kx()?
            }
            // SAFETY: x [1, H] is live (written before `ready`), the weights and gu as above.
            None => unsafe { gemv::gemv_pair::<bf16>(side, &g, second, false) }.kx()?,
        };
        if launched {
            let shared_act = act
                .view_mut()
                .narrow(0, k, parts)
                .and_then(|v| v.reshape(&[1, si]))
                .kx()?;
            ew::silu_mul(
                side,
                ew::SiluMulParams {
                    input: gu.view(),
                    out: shared_act,
                },
            )
            .kx()?;
        }
        Ok(launched)
    })();
    (side.stream.record_event(None), written)
}

/// Whether the grouped kernels would take their prefill tile (many rows per expert), which
/// `DSV2_GROUPED_PREFILL=0` sends to the per-expert cuBLAS loop instead. On an H100 (P2, 8192
/// tokens x top-6 over 160 experts; bench/RESULTS.md, 2026-12-06) the wgmma grouped kernel ran
/// at 0.45 of the cuBLAS peak against the loop's 0.47, and served prefill was a little faster
/// with it (no routing round trip to the host): 64 distinct 512-token prompts 176 ms mean time
/// to first token against 180 ms, one 4096-token prompt 42 ms against 48 ms.
pub(crate) fn prefill_sized(
    bound: usize,
    routed: Option<usize>,
    touched: Option<usize>,
    bank: &ExpertBank<CudaWeight>,
) -> bool {
    let rows = routed.unwrap_or(bound);
    let touched = touched.unwrap_or_else(|| bank.experts.len().min(rows));
    grouped::RowTile::for_rows(rows, touched).is_wgmma()
}

/// The per-expert cuBLAS loop: permute, gather, one GEMM per (expert, projection), SiLU·mul,
/// combine. `ids` (host) and `ids_t` are the routing with experts not held as -1.
fn run_loop(
    b: &CudaBackend,
    bank: &ExpertBank<CudaWeight>,
    xb: &Tensor<bf16>,
    ids: &[i32],
    ids_t: &Tensor<i32>,
    w_t: &Tensor<f32>,
    mut out: Tensor<bf16>,
) -> Result<CudaAct> {
    let gpu = &b.gpu;
    let n_exp = bank.experts.len();
    let hidden = xb.shape()[1];
    let inter = bank_intermediate(bank, hidden).map_err(err)?.unwrap_or(0);
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
    for &e in ids {
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
