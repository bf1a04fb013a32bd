//! Checks of the varlen MLA prefill path (`ops::mla_prefill`) as the backend runs it: every
//! sequence's context slots gathered from the paged cache in one launch, K/V decompressed by one
//! GEMM, one attention launch for all sequences (each kernel and tile in turn: wgmma, mma.sync
//! M128 and M64); against an f32
//! reference at awkward query lengths and prefixes, 100 and 128 heads, cache blocks of 16 and 64.
//! Also the row scatter the absorbed rows of a mixed step are put back with.

use half::bf16;
use rand::Rng;

use super::{CheckRow, f32s, rand_bf16, rng};
use crate::device::Gpu;
use crate::error::Result;
use crate::ops::general as g;
use crate::ops::mla::{CACHE_DIM, KV_LORA, ROPE};
use crate::ops::mla_prefill::{
    self as pf, PrefillPlan, PrefillSeq, PrefillTile, QK_NOPE, QK_ROPE, V_HEAD,
};
use crate::reference as r;
use crate::rope::{YarnConfig, yarn_softmax_scale};
use crate::tensor::Tensor;

/// Query rows left between two sequences' rows: the kernel must not write them.
const GAP: usize = 3;
/// What the output holds before the launch (bf16-exact), to see unwritten rows.
const SENTINEL: f32 = 7.0;

/// Query rows of a `len`-row chunk compared with the reference: the ends and both sides of the
/// 64- and 128-row tile edges (the reference is slow at 128 heads and 5137 tokens of context).
fn probe_rows(len: usize) -> Vec<usize> {
    let mut v: Vec<usize> = [0, 1, 15, 16, 63, 64, 127, 128, len / 2]
        .into_iter()
        .chain([len.saturating_sub(2), len.saturating_sub(1)])
        .filter(|&i| i < len)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// `chunks`: (query count, cached prefix) per sequence, all in one step. Returns rows for the
/// gather (exact), the decompression GEMM (sampled context rows), and the attention for each tile
/// variant (sampled query rows of every sequence; rows between sequences must stay untouched).
pub fn check_mla_prefill(
    gpu: &Gpu,
    chunks: &[(usize, usize)],
    heads: usize,
    block_size: usize,
) -> Result<Vec<CheckRow>> {
    let mut gr = rng(31);
    let (dqk, kvw) = (QK_NOPE + QK_ROPE, QK_NOPE + V_HEAD);
    // step layout: query rows with gaps, context rows one sequence after the other
    let mut seqs = Vec::new();
    let (mut q_row, mut ctx_row) = (GAP, 0usize);
    for &(q_len, pos0) in chunks {
        seqs.push(PrefillSeq {
            q_row0: q_row,
            q_len,
            pos0,
            ctx_row0: ctx_row,
        });
        q_row += q_len + GAP;
        ctx_row += pos0 + q_len;
    }
    let (n, t) = (q_row, ctx_row);
    // paged cache with shuffled physical blocks
    let blocks_of: Vec<usize> = chunks
        .iter()
        .map(|&(l, p)| (l + p).div_ceil(block_size))
        .collect();
    let num_blocks = blocks_of.iter().sum::<usize>() + 3;
    let mut phys: Vec<usize> = (0..num_blocks).collect();
    for i in (1..phys.len()).rev() {
        let j = gr.random_range(0..=i);
        phys.swap(i, j);
    }
    let mut slots = Vec::with_capacity(t);
    let mut next = 0;
    for (&(l, p), &nb) in chunks.iter().zip(&blocks_of) {
        let table = &phys[next..next + nb];
        next += nb;
        slots.extend(
            (0..l + p).map(|pos| (table[pos / block_size] * block_size + pos % block_size) as i32),
        );
    }
    let (cb, cf) = rand_bf16(&mut gr, num_blocks * block_size * CACHE_DIM, 1.0);
    let (qb, qf) = rand_bf16(&mut gr, n * heads * dqk, 1.0);
    let (wb, wf) = rand_bf16(
        &mut gr,
        heads * kvw * KV_LORA,
        1.7 / (KV_LORA as f32).sqrt(),
    );
    let scale = yarn_softmax_scale(&YarnConfig::deepseek_v2(), dqk);

    let cache = Tensor::from_host(gpu, &cb, &[num_blocks, block_size, CACHE_DIM])?;
    let st = Tensor::from_host(gpu, &slots, &[t])?;
    let q = Tensor::from_host(gpu, &qb, &[n, heads, dqk])?;
    let kv_b = Tensor::from_host(gpu, &wb, &[heads * kvw, KV_LORA])?;
    let mut lat = Tensor::<bf16>::zeros(gpu, &[t, CACHE_DIM])?;
    g::gather_slots(
        gpu,
        g::GatherSlotsParams {
            cache: cache.view(),
            slots: st.view(),
            out: lat.view_mut(),
        },
    )?;
    let mut kv = Tensor::<bf16>::zeros(gpu, &[t, heads, kvw])?;
    pf::decompress_kv(
        gpu,
        pf::DecompressParams {
            lat: lat.view(),
            kv_lora: KV_LORA,
            kv_b: kv_b.view(),
            kv: kv.view_mut(),
        },
    )?;
    let lat_h = f32s(&lat.to_host(gpu)?);
    let kv_h = f32s(&kv.to_host(gpu)?);
    let lens: Vec<String> = chunks.iter().map(|(l, p)| format!("{l}@{p}")).collect();
    let sizes = format!("q@pos0 {} heads {heads} block {block_size}", lens.join(","));
    let mut out_rows = Vec::new();

    // gather: exact copies of the cache rows
    let want_lat: Vec<f32> = slots
        .iter()
        .flat_map(|&s| cf[s as usize * CACHE_DIM..][..CACHE_DIM].iter().copied())
        .collect();
    out_rows.push(CheckRow::exact(
        "gather_slots (prefill ctx)",
        sizes.clone(),
        &lat_h,
        &want_lat,
    ));

    // decompression: sampled context rows against lat[:, :512] · kv_bᵀ
    let rows_t: Vec<usize> = (0..8).map(|i| i * (t - 1) / 7).collect();
    let xs: Vec<f32> = rows_t
        .iter()
        .flat_map(|&i| lat_h[i * CACHE_DIM..][..KV_LORA].iter().copied())
        .collect();
    let got_kv: Vec<f32> = rows_t
        .iter()
        .flat_map(|&i| kv_h[i * heads * kvw..][..heads * kvw].iter().copied())
        .collect();
    let mut row = CheckRow::cmp(
        "decompress_kv (cuBLAS)",
        sizes.clone(),
        &got_kv,
        &r::gemm(&xs, &wf, rows_t.len(), heads * kvw, KV_LORA),
        1e-2,
    );
    row.note = format!("T {t}, {} rows compared", rows_t.len());
    out_rows.push(row);

    // attention reference on the GPU's own bf16 K/V (so it checks the kernel alone)
    let mut probes: Vec<(usize, usize)> = Vec::new(); // (sequence, query index)
    for (si, s) in seqs.iter().enumerate() {
        probes.extend(probe_rows(s.q_len).into_iter().map(|i| (si, i)));
    }
    let mut want = Vec::with_capacity(probes.len() * heads * V_HEAD);
    for &(si, i) in &probes {
        let s = seqs[si];
        for h in 0..heads {
            let qr = &qf[((s.q_row0 + i) * heads + h) * dqk..][..dqk];
            let keys = s.pos0 + i + 1;
            let scores: Vec<f64> = (0..keys)
                .map(|p| {
                    let c = s.ctx_row0 + p;
                    let kn = &kv_h[(c * heads + h) * kvw..][..QK_NOPE];
                    let kp = &lat_h[c * CACHE_DIM + KV_LORA..][..ROPE];
                    let d: f32 = qr[..QK_NOPE]
                        .iter()
                        .zip(kn)
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                        + qr[QK_NOPE..]
                            .iter()
                            .zip(kp)
                            .map(|(a, b)| a * b)
                            .sum::<f32>();
                    d as f64 * scale as f64
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            let mut o = vec![0f64; V_HEAD];
            for (p, w) in e.iter().enumerate() {
                let vr = &kv_h[((s.ctx_row0 + p) * heads + h) * kvw + QK_NOPE..][..V_HEAD];
                for (o, x) in o.iter_mut().zip(vr) {
                    *o += w * *x as f64;
                }
            }
            want.extend(o.iter().map(|x| (x / sum) as f32));
        }
    }

    let specs: Vec<pf::PrefillSeq> = seqs.clone();
    for tile in [
        PrefillTile::Wgmma128,
        PrefillTile::M128,
        PrefillTile::M64,
        PrefillTile::Wgmma128Persist,
        // new last: a crash of it leaves the other rows printed
        PrefillTile::Ws128,
    ] {
        let plan = PrefillPlan::new(&specs, Some(tile))?;
        let sd = Tensor::from_host(gpu, &plan.seqs, &[plan.n_seqs(), 4])?;
        let td = Tensor::from_host(gpu, &plan.tiles, &[plan.n_tiles(), 2])?;
        let init = vec![bf16::from_f32(SENTINEL); n * heads * V_HEAD];
        let mut out = Tensor::from_host(gpu, &init, &[n, heads, V_HEAD])?;
        pf::mla_prefill(
            gpu,
            pf::MlaPrefillParams {
                q: q.view(),
                k_nope: kv.view().narrow(2, 0, QK_NOPE)?,
                k_pe: lat.view().narrow(1, KV_LORA, ROPE)?,
                v: kv.view().narrow(2, QK_NOPE, V_HEAD)?,
                out: out.view_mut(),
                plan: &plan,
                seqs: sd.view(),
                tiles: td.view(),
                scale,
            },
        )?;
        let got_all = f32s(&out.to_host(gpu)?);
        let got: Vec<f32> = probes
            .iter()
            .flat_map(|&(si, i)| {
                got_all[(seqs[si].q_row0 + i) * heads * V_HEAD..][..heads * V_HEAD]
                    .iter()
                    .copied()
            })
            .collect();
        // rows outside every sequence keep the sentinel
        let mut covered = vec![false; n];
        for s in &seqs {
            covered[s.q_row0..s.q_row0 + s.q_len].fill(true);
        }
        let touched = (0..n)
            .filter(|&row| !covered[row])
            .filter(|&row| {
                got_all[row * heads * V_HEAD..][..heads * V_HEAD]
                    .iter()
                    .any(|&x| x != SENTINEL)
            })
            .count();
        let mut row = CheckRow::cmp(tile.function(), sizes.clone(), &got, &want, 1e-2);
        row.pass &= touched == 0;
        row.note = format!(
            "{} query rows compared, {} tiles; {touched} rows outside the sequences written",
            probes.len(),
            plan.n_tiles()
        );
        out_rows.push(row);
    }
    Ok(out_rows)
}

/// `scatter_rows`: 5 packed rows to their step rows (one index out of range), others untouched.
pub fn check_scatter_rows(gpu: &Gpu, width: usize) -> Result<CheckRow> {
    let mut gr = rng(32);
    let rows = 10;
    let idx = [3i32, 0, 7, -1, 9];
    let (sb, sf) = rand_bf16(&mut gr, idx.len() * width, 1.0);
    let (db, mut df) = rand_bf16(&mut gr, rows * width, 1.0);
    let src = Tensor::from_host(gpu, &sb, &[idx.len(), width])?;
    let it = Tensor::from_host(gpu, &idx, &[idx.len()])?;
    let mut dst = Tensor::from_host(gpu, &db, &[rows, width])?;
    pf::scatter_rows(
        gpu,
        pf::ScatterRowsParams {
            src: src.view(),
            idx: it.view(),
            dst: dst.view_mut(),
        },
    )?;
    for (i, &r) in idx.iter().enumerate() {
        if (0..rows as i32).contains(&r) {
            df[r as usize * width..][..width].copy_from_slice(&sf[i * width..][..width]);
        }
    }
    Ok(CheckRow::exact(
        "scatter_rows_bf16",
        format!("5 rows of {width} into {rows}"),
        &f32s(&dst.to_host(gpu)?),
        &df,
    ))
}

/// The prefill rows of `dsv2-gpu-check --mla` (and of the full run).
pub fn run_prefill(gpu: &Gpu) -> Result<Vec<CheckRow>> {
    // (query count, cached prefix) of every chunk of one step; then heads, cache block size
    type Chunks = &'static [(usize, usize)];
    let cases: [(Chunks, usize, usize); 4] = [
        (&[(1, 0), (7, 5), (67, 0), (130, 3584)], 128, 64),
        (&[(130, 0), (67, 3584), (7, 0), (1, 5)], 100, 16),
        (&[(130, 5007), (1, 3584), (7, 5)], 128, 16),
        (&[(67, 5), (1, 0), (130, 5)], 100, 64),
    ];
    let mut out = Vec::new();
    for (chunks, heads, block) in cases {
        out.extend(check_mla_prefill(gpu, chunks, heads, block)?);
    }
    out.push(check_scatter_rows(gpu, 16 * V_HEAD)?);
    Ok(out)
}
