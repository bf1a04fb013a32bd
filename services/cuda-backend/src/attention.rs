//! MLA on the GPU for one layer and one step: q and latent projections, YaRN RoPE, the latent
//! append (RMSNorm fused with the cache write), attention, output projection.
//!
//! Attention takes one of three routes. A pure decode step at DeepSeek-V2's latent dims (512 + 64,
//! one new token per sequence, absorbed mode) runs the tuned `mla_decode_bf16` over the paged
//! cache for the whole batch at once. Prefill and mixed steps at DeepSeek-V2's head dims run
//! `prefill`: one launch of each kind for all sequences, decompressed or absorbed per chunk by
//! FLOPs. Other dims (the tiny models) gather each sequence's latent context and run the general
//! causal kernel, naive or absorbed, following the same `AttnMode` rule as the CPU.
//!
//! The cache may be bf16 or FP8 (`cache::LayerCache`): an FP8 layer is written by the quantizing
//! append, decoded by `mla_decode_fp8`, and read by the prefill and general routes through a
//! gather that dequantizes to bf16 ([`gather_latent`], [`decode_latent`]).

mod prefill;

use half::bf16;

use dsv2_core::backend::{AttnBatch, AttnMode, AttnWeights, QProj, SeqChunk};
use dsv2_core::config::ModelConfig;
use dsv2_core::error::Result;
use dsv2_kernels::ops::{elementwise as ew, general as g, mla, mla_fp8};
use dsv2_kernels::{Tensor, View, ViewMut};

use crate::blas::{Gemm, gemm};
use crate::cache::LayerCache;
use crate::{ABSORB_MAX_CHUNK, CudaAct, CudaBackend, CudaCache, CudaWeight, Kx, err};

const BF: u64 = std::mem::size_of::<bf16>() as u64;

/// What attention's first projections (q_proj or q_a_proj, and kv_a: the only readers) read.
pub(crate) enum Input<'a> {
    /// The normed rows.
    Normed(&'a CudaAct),
    /// The rows of a pre-attention add + RMSNorm not run yet (`CudaBackend::mm_pair_after_add_norm`
    /// runs it, inside the projections' launch where it can).
    AddNorm(AddNorm<'a>),
}

/// `residual += add`, then RMSNorm(residual) · weight (`residual` may be replaced by a new tensor
/// holding the sum).
pub(crate) struct AddNorm<'a> {
    pub residual: &'a mut Tensor<bf16>,
    pub add: &'a Tensor<bf16>,
    pub weight: &'a CudaWeight,
    pub eps: f32,
}

pub(crate) fn run(
    b: &CudaBackend,
    cfg: &ModelConfig,
    w: &AttnWeights<CudaWeight>,
    x: Input<'_>,
    batch: &AttnBatch<'_>,
    cache: &mut CudaCache,
    layer: usize,
) -> Result<CudaAct> {
    let gpu = &b.gpu;
    let n = match &x {
        Input::Normed(x) => x.dims().0,
        Input::AddNorm(p) => p.add.shape()[0],
    };
    let heads = cfg.num_attention_heads;
    let (dn, dr, dv, r) = (
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    );
    let (qd, width) = (dn + dr, r + dr);
    if batch.block_size != cache.block_size {
        return Err(err(format!(
            "attention: batch block size {} but the cache was made with {}",
            batch.block_size, cache.block_size
        )));
    }
    let bs = cache.block_size;
    if w.kv_b.shape() != [heads * (dn + dv), r] {
        return Err(err(format!(
            "attention: kv_b_proj is {:?}, expected [{}, {r}]",
            w.kv_b.shape(),
            heads * (dn + dv)
        )));
    }
    let layer_cache = cache
        .layers
        .get_mut(layer)
        .ok_or_else(|| err(format!("cache has no layer {layer}")))?;
    let num_blocks = layer_cache.num_blocks();

    // Projections: q [n, H, qd], kva [n, 1, r + dr] (the rope launcher's [tokens, heads, dim]).
    // (the `timed` guards are no-ops unless DSV2_PROFILE is set)
    let t_proj = b.timed("attn.projections");
    // q_proj (or q_a_proj) and kv_a read the same x: one launch at few rows (`mm_pair`)
    let (q_first, q_first_shape) = match &w.q {
        QProj::LowRank { a, .. } => (a, vec![n, a.dims2("q_a_proj")?.0]),
        QProj::Plain(wq) => (wq, vec![n, heads, qd]),
    };
    let kva_shape = [n, 1, width];
    let (first, second, op) = (
        (q_first, q_first_shape.as_slice()),
        (&w.kv_a, kva_shape.as_slice()),
        "q_proj | kv_a_proj_with_mqa",
    );
    let (q_first_out, kva) = match x {
        Input::Normed(x) => {
            let xb = b.bf16_of(x)?;
            b.mm_pair(&xb, first, second, op)?
        }
        Input::AddNorm(p) => b.mm_pair_after_add_norm(p, first, second, op)?,
    };
    let mut q = match &w.q {
        QProj::LowRank { norm, b: wb, .. } => {
            let qa = q_first_out;
            let mut qn = b.empty(qa.shape())?;
            ew::rmsnorm(
                gpu,
                ew::RmsNormParams {
                    x: qa.view(),
                    weight: norm.t.view(),
                    residual: None,
                    out: qn.view_mut(),
                    eps: cfg.rms_norm_eps,
                },
            )
            .kx()?;
            b.mm_as(&qn, wb, &[n, heads, qd], "q_b_proj")?
        }
        QProj::Plain(_) => q_first_out,
    };
    drop(t_proj);

    let pure_decode = !batch.seqs.is_empty()
        && batch.seqs.len() == n
        && batch
            .seqs
            .iter()
            .enumerate()
            .all(|(i, s)| s.rows == (i..i + 1));
    let fast = pure_decode && decode_route(cfg, batch.mode);
    // decode's W_UK absorb by extra blocks of the append's launch (one launch per layer less)
    // where that launch can take it: few rows, a bf16 cache (the FP8 append keeps the GEMV)
    let fuse_absorb = b.fused_absorb
        && fast
        && matches!(layer_cache, LayerCache::Bf16(_))
        && g::absorb_fits(n, dn, r, w.kv_b.t.ptr());
    // allocated here, in the step's fixed order, so that a recorded graph's address stays valid
    let mut q_abs = if fuse_absorb {
        Some(b.empty(&[n, heads, r])?)
    } else {
        None
    };

    let rows = row_positions(batch.seqs, n, bs, num_blocks)?;
    let max_pos = rows.max_pos;
    let pos_t = b.upload_i32(POSITIONS, &rows.pos, &[n])?;
    let slots_t = b.upload_i64(CACHE_SLOTS, &rows.slots, &[n])?;
    {
        let mut guard = b.rope.lock().map_err(|_| err("rope table lock poisoned"))?;
        let table = b.rope_table(&mut guard, batch.rope, max_pos)?;
        if table.rope_dim != dr {
            return Err(err(format!(
                "rope table rotates {} dims, qk_rope_head_dim is {dr}",
                table.rope_dim
            )));
        }
        // the append rotates the shared key k_pe on its way into the cache and, in the same
        // launch, the queries' rope part (two rope launches less per layer; DSV2_FUSED_ROPE=0:
        // the queries in a launch of their own, to compare)
        if !b.fused_rope {
            ew::rope(
                gpu,
                ew::RopeParams {
                    x: q.view_mut(),
                    positions: pos_t.view(),
                    table,
                    rope_offset: dn,
                },
            )
            .kx()?;
        }
        let _t_append = b.timed("attn.latent_append");
        // the absorb reads the queries the launch rotates (their other columns), or its own
        // view of them when they were rotated apart
        let (rope_q, absorb_q) = if b.fused_rope {
            (Some(q.view_mut()), None)
        } else {
            (None, Some(q.view()))
        };
        let rope = Some(g::LatentRope {
            positions: pos_t.view(),
            table,
            q: rope_q,
        });
        let absorb = q_abs.as_mut().map(|out| g::LatentAbsorb {
            q: absorb_q,
            kv_b: w.kv_b.t.view(),
            qk_nope: dn,
            v_head: dv,
            out: out.view_mut(),
        });
        match layer_cache {
            LayerCache::Bf16(t) => g::mla_latent_append(
                gpu,
                g::LatentAppendParams {
                    kva: kva.view(),
                    norm_w: w.kv_a_norm.t.view(),
                    slots: slots_t.view(),
                    cache: t.view_mut(),
                    kv_lora: r,
                    eps: cfg.rms_norm_eps,
                    rope,
                    absorb,
                },
            ),
            // quantized on the way in: the FP8 cache holds the quantization of what the bf16
            // cache would hold
            LayerCache::Fp8(t, layout) => mla_fp8::mla_latent_append_fp8(
                gpu,
                mla_fp8::LatentAppendFp8Params {
                    kva: kva.view(),
                    norm_w: w.kv_a_norm.t.view(),
                    slots: slots_t.view(),
                    cache: t.view_mut(),
                    layout: *layout,
                    eps: cfg.rms_norm_eps,
                    rope,
                },
            ),
        }
        .kx()?;
    }
    let layer_cache = &*layer_cache;
    let attn_out = if fast {
        decode(b, cfg, w, &q, q_abs, layer_cache, batch)?
    } else if prefill::supported(cfg) {
        prefill::run(&prefill::Step {
            b,
            cfg,
            w,
            batch,
            q: &q,
            cache: layer_cache,
        })?
    } else {
        general(b, cfg, w, &q, layer_cache, batch)?
    };
    let _t = b.timed("attn.o_proj");
    Ok(CudaAct::Bf16(b.mm(&attn_out, &w.o, "o_proj")?))
}

/// Upload keys of a step's metadata (the same for every layer of the step; a recorded decode
/// graph holds one fixed buffer per key, see `graphs`).
pub(crate) const POSITIONS: &str = "positions";
pub(crate) const CACHE_SLOTS: &str = "cache slots";
pub(crate) const BLOCK_TABLE: &str = "block table";
pub(crate) const SEQ_LENS: &str = "sequence lengths";

/// Positions and cache slots of a step's rows (rows in no chunk keep slot -1: not cached).
pub(crate) struct RowPositions {
    pub pos: Vec<i32>,
    pub slots: Vec<i64>,
    /// One past the largest position.
    pub max_pos: usize,
}

pub(crate) fn row_positions(
    seqs: &[SeqChunk],
    n: usize,
    bs: usize,
    num_blocks: usize,
) -> Result<RowPositions> {
    let mut pos = vec![0i32; n];
    let mut slots = vec![-1i64; n];
    let mut max_pos = 0usize;
    for s in seqs {
        if s.rows.end > n {
            return Err(err(format!(
                "chunk rows {:?} beyond the step's {n}",
                s.rows
            )));
        }
        for (i, row) in s.rows.clone().enumerate() {
            let p = s.pos0 + i;
            let blk =
                *s.blocks.get(p / bs).ok_or_else(|| {
                    err(format!("position {p} is not covered by the chunk's blocks"))
                })? as usize;
            if blk >= num_blocks {
                return Err(err(format!("block {blk} out of {num_blocks}")));
            }
            pos[row] = i32::try_from(p).map_err(|_| err(format!("position {p} > i32")))?;
            slots[row] = (blk * bs + p % bs) as i64;
            max_pos = max_pos.max(p + 1);
        }
    }
    Ok(RowPositions {
        pos,
        slots,
        max_pos,
    })
}

/// A pure decode step's block table [n, max_blocks] (one row per sequence, as many columns as
/// the longest block list, zeros past a sequence's own) and context lengths [n].
pub(crate) struct DecodeTables {
    pub table: Vec<i32>,
    pub lens: Vec<i32>,
    pub max_blocks: usize,
}

pub(crate) fn decode_tables(seqs: &[SeqChunk], num_blocks: usize) -> Result<DecodeTables> {
    let n = seqs.len();
    let max_blocks = seqs
        .iter()
        .map(|s| s.blocks.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut table = vec![0i32; n * max_blocks];
    let mut lens = vec![0i32; n];
    for (i, s) in seqs.iter().enumerate() {
        for (j, &blk) in s.blocks.iter().enumerate() {
            if blk as usize >= num_blocks {
                return Err(err(format!("block {blk} out of {num_blocks}")));
            }
            table[i * max_blocks + j] = blk as i32;
        }
        lens[i] =
            i32::try_from(s.pos0 + 1).map_err(|_| err(format!("context {} > i32", s.pos0 + 1)))?;
    }
    Ok(DecodeTables {
        table,
        lens,
        max_blocks,
    })
}

/// Whether a pure decode step of this model takes the `decode` route (latent dims 512 + 64,
/// absorbed): the route a recorded decode graph needs.
pub(crate) fn decode_route(cfg: &ModelConfig, mode: AttnMode) -> bool {
    mode != AttnMode::Naive
        && cfg.kv_lora_rank == mla::KV_LORA
        && cfg.qk_rope_head_dim == mla::ROPE
        && cfg.num_attention_heads <= 65535
}

/// q_abs[i, h] = q_nope[i, h] · W_UK_h for m rows of q ([m, H, dn + dr] at `q`, row stride
/// H·(dn + dr)), W_UK_h = kv_b rows h·(dn+dv) .. +dn ([dn, r]); q_abs [m, H, r] at `out`.
pub(super) fn absorb_q(
    b: &CudaBackend,
    cfg: &ModelConfig,
    w: &AttnWeights<CudaWeight>,
    q: u64,
    m: usize,
    out: u64,
) -> Result<()> {
    let (heads, dn, dr, dv, r) = dims(cfg);
    let qd = dn + dr;
    gemm::<bf16>(
        &b.gpu,
        Gemm {
            m,
            n: r,
            k: dn,
            x: q,
            ldx: heads * qd,
            sx: qd,
            w: w.kv_b.t.ptr(),
            ldw: r,
            sw: (dn + dv) * r,
            w_nk: false,
            y: out,
            ldy: heads * r,
            sy: r,
            batch: heads,
        },
    )
    .kx()
}

/// o[i, h] = ctx_lat[i, h] · W_UV_hᵀ for m rows: ctx_lat [m, H, r] at `ctx_lat`, W_UV_h = kv_b
/// rows h·(dn+dv)+dn .. +dv ([dv, r]), o [m, H, dv] at `out` (row stride H·dv).
pub(super) fn project_uv(
    b: &CudaBackend,
    cfg: &ModelConfig,
    w: &AttnWeights<CudaWeight>,
    ctx_lat: u64,
    m: usize,
    out: u64,
) -> Result<()> {
    let (heads, dn, _, dv, r) = dims(cfg);
    gemm::<bf16>(
        &b.gpu,
        Gemm {
            m,
            n: dv,
            k: r,
            x: ctx_lat,
            ldx: heads * r,
            sx: r,
            w: w.kv_b.t.ptr() + (dn * r) as u64 * BF,
            ldw: r,
            sw: (dn + dv) * r,
            w_nk: true,
            y: out,
            ldy: heads * dv,
            sy: dv,
            batch: heads,
        },
    )
    .kx()
}

/// (heads, qk_nope, qk_rope, v_head, kv_lora).
fn dims(cfg: &ModelConfig) -> (usize, usize, usize, usize, usize) {
    (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    )
}

/// A pure decode step (one new token per sequence, row i = sequence i) at DeepSeek-V2's latent
/// dims, absorbed: the tuned `mla_decode` over the paged cache for the whole batch. `q_abs`: the
/// absorbed queries when the append's launch computed them, else they are computed here.
fn decode(
    b: &CudaBackend,
    cfg: &ModelConfig,
    w: &AttnWeights<CudaWeight>,
    q: &Tensor<bf16>,
    q_abs: Option<Tensor<bf16>>,
    cache: &LayerCache,
    batch: &AttnBatch<'_>,
) -> Result<Tensor<bf16>> {
    let (heads, dn, dr, dv, r) = dims(cfg);
    let n = q.shape()[0];
    let num_blocks = cache.num_blocks();
    let q_abs = match q_abs {
        Some(t) => t,
        None => {
            let _t = b.timed("attn.q_absorb");
            let t = b.empty(&[n, heads, r])?;
            absorb_q(b, cfg, w, q.ptr(), n, t.ptr())?;
            t
        }
    };
    let t_decode = b.timed("attn.decode");
    let t = decode_tables(batch.seqs, num_blocks)?;
    let bt = b.upload_i32(BLOCK_TABLE, &t.table, &[n, t.max_blocks])?;
    let sl = b.upload_i32(SEQ_LENS, &t.lens, &[n])?;
    // the kernel reads q's rope columns in place (no copy)
    let q_pe = q.view().narrow(2, dn, dr).kx()?;
    let mut ctx_lat = b.empty(&[n, heads, r])?;
    // the decode path writes every row
    let mut attn_out = b.empty(&[n, heads, dv])?;
    // with the context split (and DSV2_FUSED_UV not 0), the combine projects through W_UV in the same
    // launch (else the combine, then the projection's own launch)
    let uv = b.fused_uv.then(|| mla::ValueProjection {
        kv_b: w.kv_b.t.view(),
        qk_nope: dn,
        out: attn_out.view_mut(),
    });
    let projected = decode_latent(
        b,
        DecodeLatent {
            q_abs: q_abs.view(),
            q_pe,
            cache,
            block_table: bt.view(),
            seq_lens: sl.view(),
            out: ctx_lat.view_mut(),
            // the table's capacity, not the longest context: the split count then depends on
            // the shape alone (each sequence cuts its own length into those splits on the
            // device), which is what lets a recorded graph replay for any lengths
            max_seq_len: t.max_blocks * batch.block_size,
            scale: cfg.softmax_scale(),
            uv,
        },
    )?;
    drop(t_decode);
    if !projected {
        let _t = b.timed("attn.w_uv");
        project_uv(b, cfg, w, ctx_lat.ptr(), n, attn_out.ptr())?;
    }
    Ok(attn_out)
}

/// Any head dims (the tiny models): per sequence, gather its latent context and run the general
/// causal kernel, naive (K/V decompressed with one GEMM) or absorbed, by the CPU's `AttnMode`
/// rule. Slow (a host loop over sequences, no tensor cores); DeepSeek-V2's dims take `prefill`.
fn general(
    b: &CudaBackend,
    cfg: &ModelConfig,
    w: &AttnWeights<CudaWeight>,
    q: &Tensor<bf16>,
    cache: &LayerCache,
    batch: &AttnBatch<'_>,
) -> Result<Tensor<bf16>> {
    let gpu = &b.gpu;
    let (heads, dn, dr, dv, r) = dims(cfg);
    let (n, width) = (q.shape()[0], r + dr);
    let (num_blocks, bs) = (cache.num_blocks(), batch.block_size);
    let scale = cfg.softmax_scale();
    let absorbed_chunk = |len: usize| match batch.mode {
        AttnMode::Absorbed => true,
        AttnMode::Naive => false,
        AttnMode::Auto => len <= ABSORB_MAX_CHUNK,
    };
    let any_absorbed = batch
        .seqs
        .iter()
        .any(|s| !s.rows.is_empty() && absorbed_chunk(s.rows.len()));
    let t_absorb = b.timed("attn.q_absorb");
    let q_abs = if any_absorbed {
        let t = b.empty(&[n, heads, r])?;
        absorb_q(b, cfg, w, q.ptr(), n, t.ptr())?;
        Some(t)
    } else {
        None
    };
    drop(t_absorb);
    let _t = b.timed("attn.prefill");
    // prefill chunks may leave rows outside any chunk: those read as zeros
    let mut attn_out = b.zeros(&[n, heads, dv])?;
    let mut ctx_lat = if any_absorbed {
        Some(b.zeros(&[n, heads, r])?)
    } else {
        None
    };
    for s in batch.seqs {
        let len = s.rows.len();
        if len == 0 {
            continue;
        }
        let (row0, ctx) = (s.rows.start, s.pos0 + len);
        let ctx_slots = (0..ctx)
            .map(|p| match s.blocks.get(p / bs) {
                Some(&blk) if (blk as usize) < num_blocks => {
                    Ok((blk as usize * bs + p % bs) as i32)
                }
                _ => Err(err(format!("position {p} has no valid cache block"))),
            })
            .collect::<Result<Vec<i32>>>()?;
        let st = Tensor::from_host(gpu, &ctx_slots, &[ctx]).kx()?;
        let mut lat = b.zeros(&[ctx, width])?;
        gather_latent(b, cache, st.view(), lat.view_mut())?;
        let k_pe = lat.view().narrow(1, r, dr).kx()?;
        let q_pe = q.view().narrow(0, row0, len).kx()?.narrow(2, dn, dr).kx()?;
        match (absorbed_chunk(len), q_abs.as_ref(), ctx_lat.as_mut()) {
            (true, Some(q_abs), Some(ctx_lat)) => {
                g::mla_attn_causal(
                    gpu,
                    g::AttnCausalParams {
                        q1: q_abs.view().narrow(0, row0, len).kx()?,
                        q2: q_pe,
                        k1: lat.view().narrow(1, 0, r).kx()?,
                        k2: k_pe,
                        v: lat.view().narrow(1, 0, r).kx()?,
                        out: ctx_lat.view_mut().narrow(0, row0, len).kx()?,
                        pos0: s.pos0,
                        scale,
                    },
                )
                .kx()?;
                project_uv(
                    b,
                    cfg,
                    w,
                    ctx_lat.ptr() + (row0 * heads * r) as u64 * BF,
                    len,
                    attn_out.ptr() + (row0 * heads * dv) as u64 * BF,
                )?;
            }
            _ => {
                // K/V decompressed from the latent: kv [ctx, H, dn + dv] = c · kv_bᵀ.
                let kv = b.zeros(&[ctx, heads, dn + dv])?;
                let mut gm = Gemm::xwt(
                    ctx,
                    heads * (dn + dv),
                    r,
                    lat.ptr(),
                    w.kv_b.t.ptr(),
                    kv.ptr(),
                );
                gm.ldx = width;
                gemm::<bf16>(gpu, gm).kx()?;
                g::mla_attn_causal(
                    gpu,
                    g::AttnCausalParams {
                        q1: q.view().narrow(0, row0, len).kx()?.narrow(2, 0, dn).kx()?,
                        q2: q_pe,
                        k1: kv.view().narrow(2, 0, dn).kx()?,
                        k2: k_pe,
                        v: kv.view().narrow(2, dn, dv).kx()?,
                        out: attn_out.view_mut().narrow(0, row0, len).kx()?,
                        pos0: s.pos0,
                        scale,
                    },
                )
                .kx()?;
            }
        }
    }
    Ok(attn_out)
}

/// out[i] = cached token `slots[i]` as bf16 [kv_lora + rope] (an FP8 cache's rows dequantized):
/// how the prefill and general paths read the cached context, whatever the cache's dtype.
pub(super) fn gather_latent(
    b: &CudaBackend,
    cache: &LayerCache,
    slots: View<'_, i32>,
    out: ViewMut<'_, bf16>,
) -> Result<()> {
    match cache {
        LayerCache::Bf16(t) => g::gather_slots(
            &b.gpu,
            g::GatherSlotsParams {
                cache: t.view(),
                slots,
                out,
            },
        ),
        LayerCache::Fp8(t, layout) => mla_fp8::gather_slots_fp8(
            &b.gpu,
            mla_fp8::GatherFp8Params {
                cache: t.view(),
                layout: *layout,
                slots,
                out,
            },
        ),
    }
    .kx()
}

/// What [`decode_latent`] runs: `mla::MlaDecodeParams` without the kernel choice, over a cache
/// of either dtype.
pub(super) struct DecodeLatent<'a> {
    pub q_abs: View<'a, bf16>,
    pub q_pe: View<'a, bf16>,
    pub cache: &'a LayerCache,
    pub block_table: View<'a, i32>,
    pub seq_lens: View<'a, i32>,
    pub out: ViewMut<'a, bf16>,
    pub max_seq_len: usize,
    pub scale: f32,
    /// The value up-projection folded into the split-KV combine (see `mla::ValueProjection`).
    pub uv: Option<mla::ValueProjection<'a>>,
}

/// Absorbed decode attention over the paged cache: the bf16 kernels (`DSV2_MLA_KERNEL`) or
/// `mla_decode_fp8`, by the cache's dtype. True when `p.uv`'s output was written (the context
/// was split), false when `out` holds the latent output to project.
pub(super) fn decode_latent(b: &CudaBackend, p: DecodeLatent<'_>) -> Result<bool> {
    match p.cache {
        LayerCache::Bf16(t) => mla::mla_decode(
            &b.gpu,
            mla::MlaDecodeParams {
                q_abs: p.q_abs,
                q_pe: p.q_pe,
                cache: t.view(),
                block_table: p.block_table,
                seq_lens: p.seq_lens,
                out: p.out,
                max_seq_len: p.max_seq_len,
                scale: p.scale,
                splits: None,
                kernel: None,
                uv: p.uv,
            },
        ),
        LayerCache::Fp8(t, _) => mla::mla_decode_fp8(
            &b.gpu,
            mla::MlaDecodeFp8Params {
                q_abs: p.q_abs,
                q_pe: p.q_pe,
                cache: t.view(),
                block_table: p.block_table,
                seq_lens: p.seq_lens,
                out: p.out,
                max_seq_len: p.max_seq_len,
                scale: p.scale,
                splits: None,
                uv: p.uv,
                kernel: None,
            },
        ),
    }
    .kx()
}
