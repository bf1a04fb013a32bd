//! Checks of the routed-expert kernels against the reference FFN: the two-launch small-batch
//! kernels (`ops::small_experts`) and the grouped kernels (`ops::grouped`: permute, gather,
//! grouped gate_up + SiLU·mul, grouped down, combine), on one kind of case: expert weights in
//! separate tensors as a checkpoint holds them, unrouted slots, ids beyond the table, an expert
//! this process does not hold, and (at awkward sizes) experts with no rows.

use half::bf16;
use rand::Rng;

use super::{CheckRow, f32s, one_expert, rand_bf16, rng};
use crate::device::Gpu;
use crate::error::{KernelError, Result};
use crate::ops::gemm::Gemm;
use crate::ops::grouped::{self, RowTile};
use crate::ops::moe::GateConfig;
use crate::ops::small_experts;
use crate::ops::{elementwise as ew, gemv};
use crate::reference as r;
use crate::tensor::Tensor;

/// x, ids, routing weights and the expert address table of an [`ExpertCase`] on the device.
type CaseInputs = (Tensor<bf16>, Tensor<i32>, Tensor<f32>, Tensor<i64>);

/// `tokens` rows routed to top-`k` of `n_exp` experts: one slot in five is not routed here (-1),
/// one in seven names an id beyond the table (skipped the same way), and the last expert is not
/// held (address 0 in the table). The weight tensors must outlive every launch that reads
/// `ptrs`.
struct ExpertCase {
    tokens: usize,
    n_exp: usize,
    k: usize,
    hidden: usize,
    inter: usize,
    ids: Vec<i32>,
    wts: Vec<f32>,
    xb: Vec<bf16>,
    xf: Vec<f32>,
    gate_up: Vec<f32>,
    down: Vec<f32>,
    absent: usize,
    tensors: Vec<Tensor<bf16>>,
    ptrs: Vec<i64>,
}

impl ExpertCase {
    #[allow(clippy::too_many_arguments)]
    fn new(
        gpu: &Gpu,
        seed: u64,
        tokens: usize,
        n_exp: usize,
        k: usize,
        hidden: usize,
        inter: usize,
    ) -> Result<Self> {
        let mut g = rng(seed);
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
        let (gub, gate_up) = rand_bf16(
            &mut g,
            n_exp * 2 * inter * hidden,
            1.7 / (hidden as f32).sqrt(),
        );
        let (db, down) = rand_bf16(&mut g, n_exp * hidden * inter, 1.7 / (inter as f32).sqrt());
        let absent = n_exp - 1;
        // expert e's gate, up and down cut from the stacked weights into tensors of their own
        let mut tensors = Vec::new();
        let mut ptrs = Vec::new();
        for e in 0..n_exp {
            if e == absent {
                ptrs.extend([0i64; 3]);
                continue;
            }
            let gate = &gub[e * 2 * inter * hidden..(e * 2 + 1) * inter * hidden];
            let up = &gub[(e * 2 + 1) * inter * hidden..(e + 1) * 2 * inter * hidden];
            let dn = &db[e * hidden * inter..(e + 1) * hidden * inter];
            for (w, shape) in [
                (gate, [inter, hidden]),
                (up, [inter, hidden]),
                (dn, [hidden, inter]),
            ] {
                let t = Tensor::from_host(gpu, w, &shape)?;
                ptrs.push(t.ptr() as i64);
                tensors.push(t);
            }
        }
        Ok(Self {
            tokens,
            n_exp,
            k,
            hidden,
            inter,
            ids,
            wts,
            xb,
            xf,
            gate_up,
            down,
            absent,
            tensors,
            ptrs,
        })
    }

    /// Assignments routed to experts of the table (held or not).
    fn routed(&self) -> usize {
        let n = self.n_exp as i32;
        self.ids.iter().filter(|&&e| e >= 0 && e < n).count()
    }

    /// The reference output of `row`: Σ_j w · bf16(FFN_e(x)) over its slots with a held expert.
    fn reference(&self, row: usize) -> Vec<f32> {
        let mut acc = vec![0f32; self.hidden];
        for j in 0..self.k {
            let e = self.ids[row * self.k + j];
            if e < 0 || e as usize >= self.n_exp || e as usize == self.absent {
                continue;
            }
            let y = one_expert(
                &self.xf,
                row,
                &self.gate_up,
                &self.down,
                e as usize,
                self.n_exp,
                self.hidden,
                self.inter,
            );
            for (a, v) in acc.iter_mut().zip(&y) {
                *a += self.wts[row * self.k + j] * r::bf(*v);
            }
        }
        acc
    }

    /// The device inputs: x [T, H], ids [T, k], weights [T, k], the address table [E, 3].
    fn upload(&self, gpu: &Gpu) -> Result<CaseInputs> {
        let (t, k) = (self.tokens, self.k);
        Ok((
            Tensor::from_host(gpu, &self.xb, &[t, self.hidden])?,
            Tensor::from_host(gpu, &self.ids, &[t, k])?,
            Tensor::from_host(gpu, &self.wts, &[t, k])?,
            Tensor::from_host(gpu, &self.ptrs, &[self.n_exp, 3])?,
        ))
    }
}

/// The two-launch small-batch expert path against the reference FFN: `n` rows, top-`k` of
/// `n_exp` experts, and with `n_shared` > 0 a shared MLP of `n_shared` x `inter` intermediate
/// features computed in the same launches (added unweighted, rounded to bf16 as the shared MLP's
/// own down projection rounds it). `beside` (with `n_shared` > 0): the shared parts' gate/up
/// run on the beside stream as the CUDA backend runs them at one row (a paired GEMV and
/// SiLU·mul writing act's last rows), the small kernels' gate/up takes the routed slots alone.
#[allow(clippy::too_many_arguments)]
pub fn check_small_experts(
    gpu: &Gpu,
    n: usize,
    n_exp: usize,
    k: usize,
    hidden: usize,
    inter: usize,
    n_shared: usize,
    down: small_experts::SmallDown,
    beside: bool,
) -> Result<CheckRow> {
    let c = ExpertCase::new(gpu, 11, n, n_exp, k, hidden, inter)?;
    let (x, ids, w, ptrs) = c.upload(gpu)?;
    let si = n_shared * inter;
    let mut g = rng(12);
    let (sgu_b, sgu) = rand_bf16(&mut g, 2 * si * hidden, 1.7 / (hidden as f32).sqrt());
    let (sd_b, sd) = rand_bf16(&mut g, hidden * si, 1.7 / (si.max(1) as f32).sqrt());
    let sg_t = Tensor::from_host(gpu, &sgu_b[..si * hidden], &[si, hidden])?;
    let su_t = Tensor::from_host(gpu, &sgu_b[si * hidden..], &[si, hidden])?;
    let sd_t = Tensor::from_host(gpu, &sd_b, &[hidden, si])?;
    let mut act = Tensor::<bf16>::zeros(gpu, &[n * (k + n_shared), inter])?;
    let mut out = Tensor::<bf16>::zeros(gpu, &[n, hidden])?;
    let shared_done = if beside && n_shared > 0 {
        let side = gpu
            .beside
            .as_deref()
            .ok_or_else(|| KernelError::Unsupported {
                op: "moe_small_experts_bf16",
                what: "no beside stream on this Gpu".into(),
            })?;
        side.stream.wait(&gpu.stream.record_event(None)?)?;
        let gu = Tensor::<bf16>::uninit(side, &[n, 2 * si])?;
        let mut g = Gemm::xwt(n, si, hidden, x.ptr(), sg_t.ptr(), gu.ptr());
        g.ldy = 2 * si;
        let second = gemv::PairSecond {
            w: su_t.ptr(),
            y: gu.ptr() + (si * std::mem::size_of::<bf16>()) as u64,
            n: si,
            ldy: 2 * si,
        };
        // SAFETY: x [n, H], both shared weights [si, H] and gu [n, 2 si] are live tensors.
        if !unsafe { gemv::gemv_pair::<bf16>(side, &g, second, true)? } {
            return Err(KernelError::Unsupported {
                op: "gemv_pair",
                what: format!("{n} rows x {si} x {hidden}"),
            });
        }
        let shared_act = act
            .view_mut()
            .narrow(0, n * k, n * n_shared)?
            .reshape(&[n, si])?;
        ew::silu_mul(
            side,
            ew::SiluMulParams {
                input: gu.view(),
                out: shared_act,
            },
        )?;
        drop(gu);
        Some(side.stream.record_event(None)?)
    } else {
        None
    };
    // SAFETY: ids are -1, beyond the table or < n_exp; the table points at `c.tensors`, alive
    // until after to_host.
    unsafe {
        small_experts::small_experts_with(
            gpu,
            small_experts::SmallExpertsParams {
                x: x.view(),
                ids: ids.view(),
                weights: w.view(),
                ptrs: ptrs.view(),
                act: act.view_mut(),
                out: out.view_mut(),
                shared: (n_shared > 0).then(|| small_experts::SharedMlp {
                    gate: sg_t.view(),
                    up: su_t.view(),
                    down: sd_t.view(),
                }),
                shared_beside: shared_done.as_ref(),
            },
            down,
        )?;
    }
    let got = f32s(&out.to_host(gpu)?);
    let want: Vec<f32> = (0..n)
        .flat_map(|row| {
            let mut acc = c.reference(row);
            if n_shared > 0 {
                let y = one_expert(&c.xf, row, &sgu, &sd, 0, 1, hidden, si);
                for (a, v) in acc.iter_mut().zip(&y) {
                    *a += r::bf(*v);
                }
            }
            acc
        })
        .collect();
    drop(c.tensors);
    Ok(CheckRow::cmp(
        "moe_small_experts_bf16",
        format!(
            "rows {n} E {n_exp} top-{k} hidden {hidden} inter {inter} shared parts {n_shared}{}, {down:?} down",
            if shared_done.is_some() {
                " (gate/up beside)"
            } else {
                ""
            }
        ),
        &got,
        &want,
        1e-2,
    ))
}

/// The grouped path (`grouped_experts`) against the reference FFN; `tile` forces a row tile
/// (None: the launcher's choice). Compares at most `max_cmp` tokens (the reference is slow at
/// real dims), spread over the batch.
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
    let c = ExpertCase::new(gpu, 17, tokens, n_exp, k, hidden, inter)?;
    let (x, ids, w, ptrs) = c.upload(gpu)?;
    let routed = c.routed();
    // garbage in `out` proves the kernels overwrite it (accumulate off)
    let junk: Vec<bf16> = (0..tokens * hidden).map(|_| bf16::from_f32(7.0)).collect();
    let mut out = Tensor::from_host(gpu, &junk, &[tokens, hidden])?;
    // SAFETY: the table points at `c.tensors`, alive until after to_host; routed_rows counts
    // exactly the ids within 0..n_exp.
    unsafe {
        grouped::grouped_experts(
            gpu,
            grouped::GroupedExpertsParams {
                x: x.view(),
                ids: ids.view(),
                weights: w.view(),
                ptrs: ptrs.view(),
                inter,
                out: out.view_mut(),
                routed_rows: Some(routed),
                touched_experts: None,
                tile,
                prefill_tile: grouped::PREFILL_TILE,
                accumulate: false,
                before_combine: None,
            },
        )?;
    }
    let got_all = f32s(&out.to_host(gpu)?);
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
        want.extend(c.reference(row));
        got.extend_from_slice(&got_all[row * hidden..(row + 1) * hidden]);
    }
    drop(c.tensors);
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

/// One grouped FFN launch pair (`grouped_ffn`, no routing) over experts holding exactly `counts`
/// rows each, against the reference FFN: expert `absent` is not held (its rows must come out
/// zero). `tile` forces the row tile. Compares every row when there are at most `max_cmp`, else
/// the rows at each expert's edges (first, 63rd, 64th, 65th, last: where 64- and 128-row
/// blocks end).
pub fn check_grouped_counts(
    gpu: &Gpu,
    counts: &[usize],
    absent: usize,
    hidden: usize,
    inter: usize,
    tile: RowTile,
    max_cmp: usize,
) -> Result<CheckRow> {
    let n_exp = counts.len();
    let rows: usize = counts.iter().sum();
    let mut g = rng(23);
    let (xb, xf) = rand_bf16(&mut g, rows * hidden, 1.0);
    let (gub, gate_up) = rand_bf16(
        &mut g,
        n_exp * 2 * inter * hidden,
        1.7 / (hidden as f32).sqrt(),
    );
    let (db, down) = rand_bf16(&mut g, n_exp * hidden * inter, 1.7 / (inter as f32).sqrt());
    let mut tensors = Vec::new();
    let mut ptrs = Vec::new();
    for e in 0..n_exp {
        if e == absent {
            ptrs.extend([0i64; 3]);
            continue;
        }
        let gate = &gub[e * 2 * inter * hidden..(e * 2 + 1) * inter * hidden];
        let up = &gub[(e * 2 + 1) * inter * hidden..(e + 1) * 2 * inter * hidden];
        let dn = &db[e * hidden * inter..(e + 1) * hidden * inter];
        for (w, shape) in [
            (gate, [inter, hidden]),
            (up, [inter, hidden]),
            (dn, [hidden, inter]),
        ] {
            let t = Tensor::from_host(gpu, w, &shape)?;
            ptrs.push(t.ptr() as i64);
            tensors.push(t);
        }
    }
    let mut offsets = vec![0i32];
    for &c in counts {
        offsets.push(offsets.last().copied().unwrap_or(0) + c as i32);
    }
    let counts_i: Vec<i32> = counts.iter().map(|&c| c as i32).collect();
    let x = Tensor::from_host(gpu, &xb, &[rows, hidden])?;
    let table = Tensor::from_host(gpu, &ptrs, &[n_exp, 3])?;
    let cd = Tensor::from_host(gpu, &counts_i, &[n_exp])?;
    let od = Tensor::from_host(gpu, &offsets, &[n_exp + 1])?;
    // garbage in act and out proves the kernels overwrite them (zeros of the absent expert too)
    let junk = |n: usize| -> Vec<bf16> { (0..n).map(|_| bf16::from_f32(7.0)).collect() };
    let mut act = Tensor::from_host(gpu, &junk(rows * inter), &[rows, inter])?;
    let mut out = Tensor::from_host(gpu, &junk(rows * hidden), &[rows, hidden])?;
    // SAFETY: the table points at `tensors` ([I, H], [I, H], [H, I] each), alive until after
    // to_host; offsets are the prefix sums of counts, within x's rows.
    unsafe {
        grouped::grouped_ffn(
            gpu,
            grouped::GroupedFfnParams {
                x: x.view(),
                counts: cd.view(),
                offsets: od.view(),
                ptrs: table.view(),
                act: act.view_mut(),
                out: out.view_mut(),
                tile,
            },
        )?;
    }
    let got_all = f32s(&out.to_host(gpu)?);
    drop(tensors);
    let mut cmp: Vec<usize> = Vec::new();
    for e in 0..n_exp {
        let (a, b) = (offsets[e] as usize, offsets[e + 1] as usize);
        if rows <= max_cmp {
            cmp.extend(a..b);
        } else {
            cmp.extend(
                [
                    a,
                    a + 63,
                    a + 64,
                    a + 65,
                    a + 127,
                    a + 128,
                    b.saturating_sub(1),
                ]
                .into_iter()
                .filter(|&r| r >= a && r < b),
            );
        }
    }
    cmp.sort_unstable();
    cmp.dedup();
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for &row in &cmp {
        let e = offsets.partition_point(|&o| o as usize <= row) - 1;
        if e == absent {
            want.extend(std::iter::repeat_n(0f32, hidden));
        } else {
            let y = one_expert(&xf, row, &gate_up, &down, e, n_exp, hidden, inter);
            want.extend(y.into_iter().map(r::bf));
        }
        got.extend_from_slice(&got_all[row * hidden..(row + 1) * hidden]);
    }
    let mut row = CheckRow::cmp(
        "moe_grouped_ffn_bf16",
        format!(
            "rows/expert {counts:?} (expert {absent} not held) hidden {hidden} inter {inter} tile {tile:?}"
        ),
        &got,
        &want,
        1e-2,
    );
    // a zero row that came out non-zero fails however small the relative error
    let absent_rows = (offsets[absent] as usize..offsets[absent + 1] as usize)
        .filter(|r| {
            got_all[r * hidden..(r + 1) * hidden]
                .iter()
                .any(|&v| v != 0.0)
        })
        .count();
    if absent_rows > 0 {
        row.pass = false;
    }
    row.note = format!(
        "{} of {rows} rows compared; {absent_rows} rows of the absent expert not zero",
        cmp.len()
    );
    Ok(row)
}

/// The warp-specialised tile (and W128 beside it) at the counts that stress its schedule and
/// padding: 1, 7, 67 rows; 0 rows; exactly 64 (one consumer) and 65 (both); 128 and 129 (a
/// second block of one row); 300 (3 blocks); an expert not held that has rows; dims whose k and
/// features are not multiples of the 64-wide k step, 128 (gate_up) or 256 (down) features.
/// `tiles`: the tiles to check (W128 only at the small dims).
pub fn run_grouped_counts(gpu: &Gpu, quick: bool, tiles: &[RowTile]) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    let small = [1, 7, 0, 67, 64, 65, 0, 128, 129, 300, 5];
    for &tile in tiles {
        out.push(check_grouped_counts(gpu, &small, 10, 72, 40, tile, 1000)?);
        out.push(check_grouped_counts(
            gpu, &small, 10, 1024, 200, tile, 1000,
        )?);
        // the absent expert first, empty experts last
        out.push(check_grouped_counts(
            gpu,
            &[9, 64, 65, 1, 0, 0],
            0,
            200,
            72,
            tile,
            1000,
        )?);
    }
    // real DeepSeek-V2 expert dims (edges of each expert compared)
    let real = [1, 7, 0, 67, 64, 65, 300, 3];
    for &tile in tiles.iter().filter(|&&t| t != RowTile::W128) {
        out.push(check_grouped_counts(gpu, &real, 7, 5120, 1536, tile, 64)?);
        if !quick {
            // V2-Lite dims, and more experts than CTAs have SMs' worth of tiles at once
            out.push(check_grouped_counts(gpu, &real, 7, 2048, 1408, tile, 64)?);
            let many: Vec<usize> = (0..160).map(|e| [265, 300, 351, 0, 1][e % 5]).collect();
            out.push(check_grouped_counts(gpu, &many, 5, 1024, 256, tile, 0)?);
        }
    }
    Ok(out)
}

/// The grouped rows of `run_all`: every row tile at awkward sizes (dims not multiples of the
/// 64-wide k step, partial tiles, experts with 0 rows) and the real DeepSeek-V2 expert dims.
pub fn run_grouped(gpu: &Gpu, quick: bool) -> Result<Vec<CheckRow>> {
    // the small-batch kernels first (decode at up to 4 rows), then with the shared experts in
    // the same launches: V2's 2 parts at 1 and 4 rows, V2-Lite's dims, one part at an odd size
    let mut out = Vec::new();
    for (n, e, k, h, i, shared) in [
        (1, 16, 6, 5120, 1536, 0),
        (4, 16, 6, 5120, 1536, 0),
        (3, 9, 2, 72, 40, 0),
        (2, 16, 10, 72, 40, 0),
        (1, 16, 6, 5120, 1536, 2),
        (4, 16, 6, 5120, 1536, 2),
        (1, 64, 6, 2048, 1408, 2),
        (3, 9, 2, 72, 40, 1),
        (2, 16, 10, 72, 2056, 2),
        // the pipelined down kernel's last block short of a whole ring of rows (9 rows a
        // block on 132 SMs, 7 in the last; 3 rows a block, 2 in the last)
        (2, 9, 2, 1096, 1408, 1),
        (1, 9, 2, 536, 1408, 1),
    ] {
        for down in [
            small_experts::SmallDown::Pipe,
            small_experts::SmallDown::Slots,
            small_experts::SmallDown::Rows,
        ] {
            // a row per kernel that really runs (the pipelined one falls back to the slot
            // kernel at some shapes: that row would only repeat the slot kernel's)
            if down.runs_as(n, h, k + shared, i, gpu.sm_count) != Some(down) {
                continue;
            }
            out.push(check_small_experts(
                gpu, n, e, k, h, i, shared, down, false,
            )?);
            // the shared gate/up on the beside stream, as the backend runs them at one row
            // (and, to cover the layout, at a few)
            if shared > 0 {
                out.push(check_small_experts(gpu, n, e, k, h, i, shared, down, true)?);
            }
        }
    }
    // the permutation (split and fused kernels) at decode sizes: V2 at 64 rows, V2-Lite at 256
    out.extend(super::check_permute_combine(gpu, 64, 160, 5120)?);
    out.extend(super::check_permute_combine(gpu, 256, 64, 2048)?);
    // the fused gate GEMV + top-k of decode at <= 4 rows: V2 (160 experts, 8 groups, top-3
    // groups, scaling 16) and V2-Lite (64 experts, no groups)
    let (v2, lite) = (GateConfig::deepseek_v2(), GateConfig::deepseek_v2_lite());
    for (t, h, e, cfg) in [
        (1, 5120, 160, v2),
        (4, 5120, 160, v2),
        (1, 2048, 64, lite),
        (3, 2048, 64, lite),
    ] {
        out.push(super::check_gate_gemv(gpu, t, h, e, cfg)?);
        // the post-attention add + norm in the same launch
        out.push(super::gate_norm::check_gate_gemv_add_norm(
            gpu, t, h, e, cfg,
        )?);
    }
    for tile in [
        RowTile::R16,
        RowTile::R32,
        RowTile::P16,
        RowTile::P32,
        RowTile::R64,
        RowTile::R128,
        RowTile::W128,
        RowTile::W64,
        RowTile::Ws128,
        RowTile::Ws128Pair,
        RowTile::Ws128Dyn,
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
    // the persistent decode tiles where they would run: V2 at 64 distinct rows (16-row tiles),
    // V2-Lite at 256 (32-row tiles over its 64 experts)
    out.push(check_grouped_experts(
        gpu,
        64,
        160,
        6,
        5120,
        1536,
        Some(RowTile::P16),
        8,
    )?);
    out.push(check_grouped_experts(
        gpu,
        256,
        64,
        6,
        2048,
        1408,
        Some(RowTile::P32),
        8,
    )?);
    if !quick {
        out.push(check_grouped_experts(gpu, 300, 8, 6, 2048, 1408, None, 8)?);
        out.push(check_grouped_experts(gpu, 1000, 8, 6, 5120, 1536, None, 8)?);
    }
    out.extend(run_grouped_counts(
        gpu,
        quick,
        &[
            RowTile::Ws128Dyn,
            RowTile::Ws128Pair,
            RowTile::Ws128,
            RowTile::W128,
        ],
    )?);
    // the paired dynamic tile's rows last: a new kernel's crash leaves every row above printed
    let pd = RowTile::Ws128PairDyn;
    out.push(check_grouped_experts(gpu, 67, 9, 2, 72, 40, Some(pd), 67)?);
    out.push(check_grouped_experts(
        gpu,
        67,
        8,
        6,
        1024,
        320,
        Some(pd),
        67,
    )?);
    out.extend(run_grouped_counts(gpu, quick, &[pd])?);
    Ok(out)
}
