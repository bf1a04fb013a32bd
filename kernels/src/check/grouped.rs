//! Checks of the grouped expert kernels (`ops::grouped`) against the reference FFN: the whole
//! routed path (permute, gather, grouped gate_up + SiLU·mul, grouped down, combine) at awkward
//! sizes, each row tile forced in turn, with unrouted slots, ids beyond the table, an expert this
//! process does not hold and experts with no rows.

use half::bf16;
use rand::Rng;

use super::{CheckRow, expert_tensors, f32s, one_expert, rand_bf16, rng};
use crate::device::Gpu;
use crate::error::Result;
use crate::ops::grouped::{self, RowTile};
use crate::reference as r;
use crate::tensor::Tensor;

/// `tokens` rows, top-`k` of `n_exp` experts held as separate tensors (as a checkpoint holds
/// them); one slot in five is not routed here (-1), one in seven names an id beyond the table,
/// and the last expert is not held (address 0). Compares at most `max_cmp` tokens (the
/// reference is slow at real dims), spread over the batch.
#[allow(clippy::too_many_arguments)]
pub fn check_grouped_experts(
    gpu: &Gpu,
    tokens: usize,
    n_exp: usize,
    k: usize,
    hidden: usize,
    inter: usize,
    tile: Option<RowTile>,
    max_cmp: usize,
) -> Result<CheckRow> {
    let mut g = rng(17);
    let ids: Vec<i32> = (0..tokens * k)
        .map(|s| {
            if s % 5 == 4 {
                -1
            } else if s % 7 == 6 {
                n_exp as i32
            } else {
                g.random_range(0..n_exp as i32)
            }
        })
        .collect();
    let wts: Vec<f32> = (0..tokens * k)
        .map(|_| g.random_range(0.05f32..1.0))
        .collect();
    let (xb, xf) = rand_bf16(&mut g, tokens * hidden, 1.0);
    let (gub, guf) = rand_bf16(
        &mut g,
        n_exp * 2 * inter * hidden,
        1.7 / (hidden as f32).sqrt(),
    );
    let (db, df) = rand_bf16(&mut g, n_exp * hidden * inter, 1.7 / (inter as f32).sqrt());
    let absent = n_exp - 1;
    let (tensors, ptrs) = expert_tensors(gpu, &gub, &db, n_exp, hidden, inter, absent)?;
    let routed = ids
        .iter()
        .filter(|&&e| e >= 0 && (e as usize) < n_exp)
        .count();
    let x = Tensor::from_host(gpu, &xb, &[tokens, hidden])?;
    let ids_t = Tensor::from_host(gpu, &ids, &[tokens, k])?;
    let w_t = Tensor::from_host(gpu, &wts, &[tokens, k])?;
    let ptr_t = Tensor::from_host(gpu, &ptrs, &[n_exp, 3])?;
    // garbage in `out` proves the kernels overwrite it (accumulate off)
    let junk: Vec<bf16> = (0..tokens * hidden).map(|_| bf16::from_f32(7.0)).collect();
    let mut out = Tensor::from_host(gpu, &junk, &[tokens, hidden])?;
    // SAFETY: the table points at `tensors`, alive until after to_host; routed_rows counts
    // exactly the ids within 0..n_exp.
    unsafe {
        grouped::grouped_experts(
            gpu,
            grouped::GroupedExpertsParams {
                x: x.view(),
                ids: ids_t.view(),
                weights: w_t.view(),
                ptrs: ptr_t.view(),
                inter,
                out: out.view_mut(),
                routed_rows: Some(routed),
                touched_experts: None,
                tile,
                accumulate: false,
            },
        )?;
    }
    let got_all = f32s(&out.to_host(gpu)?);
    drop(tensors);
    let cmp: Vec<usize> = if tokens <= max_cmp {
        (0..tokens).collect()
    } else {
        let mut v: Vec<usize> = (0..tokens).step_by(tokens / max_cmp + 1).collect();
        v.push(tokens - 1);
        v.dedup();
        v
    };
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for &row in &cmp {
        let mut acc = vec![0f32; hidden];
        for j in 0..k {
            let e = ids[row * k + j];
            if e < 0 || e as usize >= n_exp || e as usize == absent {
                continue;
            }
            let y = one_expert(&xf, row, &guf, &df, e as usize, n_exp, hidden, inter);
            for (a, v) in acc.iter_mut().zip(&y) {
                *a += wts[row * k + j] * r::bf(*v);
            }
        }
        want.extend(acc);
        got.extend_from_slice(&got_all[row * hidden..(row + 1) * hidden]);
    }
    let chosen = tile.unwrap_or_else(|| RowTile::for_rows(routed, n_exp.min(routed)));
    let mut row = CheckRow::cmp(
        "moe_grouped_experts_bf16",
        format!("tokens {tokens} E {n_exp} top-{k} hidden {hidden} inter {inter} tile {chosen:?}"),
        &got,
        &want,
        1e-2,
    );
    row.note = format!("{} of {tokens} tokens compared", cmp.len());
    Ok(row)
}

/// The grouped rows of `run_all`: every row tile at awkward sizes (dims not multiples of the
/// 64-wide k step, partial tiles, experts with 0 rows) and the real DeepSeek-V2 expert dims.
pub fn run(gpu: &Gpu, quick: bool) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    for tile in [
        RowTile::R16,
        RowTile::R64,
        RowTile::R128,
        RowTile::W128,
        RowTile::W64,
    ] {
        out.push(check_grouped_experts(
            gpu,
            67,
            9,
            2,
            72,
            40,
            Some(tile),
            67,
        )?);
        out.push(check_grouped_experts(
            gpu,
            67,
            8,
            6,
            1024,
            320,
            Some(tile),
            67,
        )?);
    }
    // real DeepSeek-V2 / V2-Lite expert dims, the tile chosen by the launcher: one decode row,
    // a decode batch, a prefill chunk (several tiles per expert)
    out.push(check_grouped_experts(gpu, 1, 8, 6, 5120, 1536, None, 1)?);
    out.push(check_grouped_experts(gpu, 7, 8, 6, 5120, 1536, None, 7)?);
    if !quick {
        out.push(check_grouped_experts(gpu, 300, 8, 6, 2048, 1408, None, 8)?);
        out.push(check_grouped_experts(gpu, 1000, 8, 6, 5120, 1536, None, 8)?);
    }
    Ok(out)
}
