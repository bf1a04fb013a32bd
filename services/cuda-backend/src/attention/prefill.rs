//! Attention of a prefill or mixed step at DeepSeek-V2's head dims, with no loop over sequences:
//! the chunks that run decompressed share one slot upload, one latent gather, one K/V
//! decompression GEMM and one flash launch (`mla_prefill`); the chunks where the absorbed form
//! costs fewer FLOPs (decode rows, short chunks over a long cached prefix) share one `mla_decode`
//! launch, each of their queries a sequence of its own over the paged cache.
//!
//! FLOPs of one head for a chunk of L queries after a cached prefix of P tokens (context
//! C = P + L, causal pairs Π = L·P + L(L+1)/2), latent r, nope dn, rope dr, v dv:
//!   decompressed: 2·r·(dn+dv)·C (K/V GEMM over the whole context) + Π·(2·(dn+dr) + 2·dv)
//!   absorbed:     2·r·(dn+dv)·L (q·W_UK and o·W_UV for the chunk's rows) + Π·(2·(r+dr) + 2·r)
//! so the absorbed form is cheaper iff 2·r·(dn+dv)·P > Π·(2·(r+dr) + 2·r − 2·(dn+dr) − 2·dv).
//! At DeepSeek-V2's dims (512, 128, 64, 128): 262144·P > 1536·Π, i.e. 170.7·P > L·P + L(L+1)/2:
//! every chunk with no prefix decompresses, a single query absorbs from P = 1 on, L = 100 from
//! P = 72, L = 160 from P ≈ 1.2K, and no chunk of more than 170 queries ever absorbs. (FLOPs
//! only: the absorbed kernel runs further below its peak than the GEMM and the flash kernel, so
//! the measured crossover may sit at shorter chunks.)

use half::bf16;

use dsv2_core::backend::{AttnBatch, AttnMode, AttnWeights, SeqChunk};
use dsv2_core::config::ModelConfig;
use dsv2_core::error::Result;
use dsv2_kernels::Tensor;
use dsv2_kernels::ops::mla_prefill::{self as pf, PrefillPlan, PrefillSeq};
use dsv2_kernels::ops::{mla, moe};

use crate::cache::LayerCache;
use crate::{CudaBackend, CudaWeight, Kx, err};

const BF: u64 = std::mem::size_of::<bf16>() as u64;

/// Most decompressed K/V one launch group holds (bytes of the [T, H, dn + dv] buffer): 4 GiB is
/// 65,536 context tokens at 128 heads, e.g. 64 chunks of 512 over 512-token prefixes. A step with
/// more context runs as several groups (one gather, GEMM and flash launch each).
const KV_BUDGET_BYTES: usize = 4 << 30;

/// Whether this path serves `cfg`: the head dims `mla_prefill` is compiled for, and the latent
/// `mla_decode` reads (its absorbed rows). Other models (the tiny fixtures) take the general path.
pub(super) fn supported(cfg: &ModelConfig) -> bool {
    cfg.qk_nope_head_dim == pf::QK_NOPE
        && cfg.qk_rope_head_dim == pf::QK_ROPE
        && cfg.v_head_dim == pf::V_HEAD
        && cfg.kv_lora_rank == mla::KV_LORA
        && cfg.qk_rope_head_dim == mla::ROPE
        && cfg.num_attention_heads <= 65535
}

/// The FLOP rule of the module comment: whether a chunk of `len` queries after `pos0` cached
/// tokens costs fewer FLOPs absorbed than decompressed (`AttnMode::Auto`).
pub(super) fn absorbed_is_cheaper(cfg: &ModelConfig, len: usize, pos0: usize) -> bool {
    let (r, dn, dr, dv) = (
        cfg.kv_lora_rank as u128,
        cfg.qk_nope_head_dim as u128,
        cfg.qk_rope_head_dim as u128,
        cfg.v_head_dim as u128,
    );
    let (l, p) = (len as u128, pos0 as u128);
    let pairs = l * p + l * (l + 1) / 2;
    let per_pair_absorbed = 2 * (r + dr) + 2 * r;
    let per_pair_naive = 2 * (dn + dr) + 2 * dv;
    2 * r * (dn + dv) * p > pairs * per_pair_absorbed.saturating_sub(per_pair_naive)
}

/// Everything the step's attention reads. `q` is [n, H, dn + dr] with RoPE applied, the layer's
/// latents already appended to `cache`.
pub(super) struct Step<'a> {
    pub b: &'a CudaBackend,
    pub cfg: &'a ModelConfig,
    pub w: &'a AttnWeights<CudaWeight>,
    pub batch: &'a AttnBatch<'a>,
    pub q: &'a Tensor<bf16>,
    /// The layer's cache, bf16 or FP8 (the gather dequantizes, the absorbed rows take the FP8
    /// decode kernel).
    pub cache: &'a LayerCache,
}

/// attn_out [n, H, dv] for the step's rows; rows in no chunk are zeros.
pub(super) fn run(s: &Step<'_>) -> Result<Tensor<bf16>> {
    let n = s.q.shape()[0];
    let mut naive: Vec<&SeqChunk> = Vec::new();
    let mut absorbed: Vec<&SeqChunk> = Vec::new();
    let mut covered = vec![false; n];
    for c in s.batch.seqs {
        let len = c.rows.len();
        if len == 0 {
            continue;
        }
        covered[c.rows.clone()].fill(true);
        let abs = match s.batch.mode {
            AttnMode::Absorbed => true,
            AttnMode::Naive => false,
            AttnMode::Auto => absorbed_is_cheaper(s.cfg, len, c.pos0),
        };
        if abs { absorbed.push(c) } else { naive.push(c) }
    }
    // rows in no chunk must read as zeros; when every row is some chunk's, the launches below
    // write them all and the memset is skipped
    let mut attn_out = if covered.iter().all(|&c| c) {
        s.b.empty(&[n, s.cfg.num_attention_heads, s.cfg.v_head_dim])?
    } else {
        s.b.zeros(&[n, s.cfg.num_attention_heads, s.cfg.v_head_dim])?
    };
    if !naive.is_empty() {
        let _t = s.b.timed("attn.prefill");
        let heads = s.cfg.num_attention_heads;
        let per_token = heads * (pf::QK_NOPE + pf::V_HEAD) * BF as usize;
        let budget = (KV_BUDGET_BYTES / per_token).max(1);
        let mut group: Vec<&SeqChunk> = Vec::new();
        let mut ctx = 0usize;
        for c in naive {
            let need = c.pos0 + c.rows.len();
            if !group.is_empty() && ctx + need > budget {
                decompressed(s, &group, &mut attn_out)?;
                group.clear();
                ctx = 0;
            }
            group.push(c);
            ctx += need;
        }
        decompressed(s, &group, &mut attn_out)?;
    }
    if !absorbed.is_empty() {
        let _t = s.b.timed("attn.absorbed");
        // mla_decode takes at most 65535 sequences (grid y): one launch per 65535 queries
        let mut rows = 0usize;
        let mut part: Vec<&SeqChunk> = Vec::new();
        for c in absorbed {
            if !part.is_empty() && rows + c.rows.len() > 65535 {
                absorbed_rows(s, &part, &mut attn_out)?;
                part.clear();
                rows = 0;
            }
            part.push(c);
            rows += c.rows.len();
        }
        absorbed_rows(s, &part, &mut attn_out)?;
    }
    Ok(attn_out)
}

/// Cache slot of position `p` of chunk `c`.
fn slot(c: &SeqChunk, p: usize, bs: usize, num_blocks: usize) -> Result<usize> {
    match c.blocks.get(p / bs) {
        Some(&blk) if (blk as usize) < num_blocks => Ok(blk as usize * bs + p % bs),
        _ => Err(err(format!("position {p} has no valid cache block"))),
    }
}

/// One gather, one K/V GEMM and one `mla_prefill` launch for `chunks`.
fn decompressed(s: &Step<'_>, chunks: &[&SeqChunk], attn_out: &mut Tensor<bf16>) -> Result<()> {
    let (b, cfg) = (s.b, s.cfg);
    let gpu = &b.gpu;
    let (heads, r, width) = (
        cfg.num_attention_heads,
        cfg.kv_lora_rank,
        cfg.kv_lora_rank + cfg.qk_rope_head_dim,
    );
    let kvw = pf::QK_NOPE + pf::V_HEAD;
    let (num_blocks, bs) = (s.cache.num_blocks(), s.batch.block_size);
    let mut slots: Vec<i32> = Vec::new();
    let mut specs = Vec::with_capacity(chunks.len());
    for c in chunks {
        let ctx = c.pos0 + c.rows.len();
        specs.push(PrefillSeq {
            q_row0: c.rows.start,
            q_len: c.rows.len(),
            pos0: c.pos0,
            ctx_row0: slots.len(),
        });
        for p in 0..ctx {
            let sl = slot(c, p, bs, num_blocks)?;
            slots.push(i32::try_from(sl).map_err(|_| err(format!("cache slot {sl} > i32")))?);
        }
    }
    let t = slots.len();
    let st = b.upload_i32("prefill context slots", &slots, &[t])?;
    let mut lat = b.empty(&[t, width])?;
    super::gather_latent(b, s.cache, st.view(), lat.view_mut())?;
    let mut kv = b.empty(&[t, heads, kvw])?;
    pf::decompress_kv(
        gpu,
        pf::DecompressParams {
            lat: lat.view(),
            kv_lora: r,
            kv_b: s.w.kv_b.t.view(),
            kv: kv.view_mut(),
        },
    )
    .kx()?;
    let plan = PrefillPlan::for_kernel(&specs, b.prefill_kernel()).kx()?;
    let sd = b.upload_i32("prefill sequences", &plan.seqs, &[plan.n_seqs(), 4])?;
    let td = b.upload_i32("prefill tiles", &plan.tiles, &[plan.n_tiles(), 2])?;
    pf::mla_prefill(
        gpu,
        pf::MlaPrefillParams {
            q: s.q.view(),
            k_nope: kv.view().narrow(2, 0, pf::QK_NOPE).kx()?,
            k_pe: lat.view().narrow(1, r, pf::QK_ROPE).kx()?,
            v: kv.view().narrow(2, pf::QK_NOPE, pf::V_HEAD).kx()?,
            out: attn_out.view_mut(),
            plan: &plan,
            seqs: sd.view(),
            tiles: td.view(),
            scale: cfg.softmax_scale(),
        },
    )
    .kx()
}

/// The absorbed form for `chunks` in one `mla_decode` launch: query i of a chunk is a sequence of
/// its own of length pos0 + i + 1 over the chunk's block table (the kernel reads the same cache
/// blocks for all of them, mostly from L2). q rows are gathered packed, absorbed (q·W_UK), run,
/// projected (·W_UVᵀ) and scattered back to the step's rows.
fn absorbed_rows(s: &Step<'_>, chunks: &[&SeqChunk], attn_out: &mut Tensor<bf16>) -> Result<()> {
    let (b, cfg) = (s.b, s.cfg);
    let gpu = &b.gpu;
    let (heads, dn, dr, dv, r) = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    );
    let qd = dn + dr;
    let n = s.q.shape()[0];
    let (num_blocks, bs) = (s.cache.num_blocks(), s.batch.block_size);
    let max_blocks = chunks
        .iter()
        .map(|c| c.blocks.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let na: usize = chunks.iter().map(|c| c.rows.len()).sum();
    let mut rows = Vec::with_capacity(na);
    let mut lens = Vec::with_capacity(na);
    let mut table = vec![0i32; na * max_blocks];
    let mut max_len = 1usize;
    for c in chunks {
        let need = (c.pos0 + c.rows.len()).div_ceil(bs);
        if c.blocks.len() < need || c.blocks.iter().any(|&blk| blk as usize >= num_blocks) {
            return Err(err(format!(
                "chunk at position {} has blocks {:?} for {} tokens of a {num_blocks}-block cache",
                c.pos0,
                c.blocks,
                c.pos0 + c.rows.len()
            )));
        }
        for (i, row) in c.rows.clone().enumerate() {
            let k = rows.len();
            rows.push(row as i32);
            lens.push((c.pos0 + i + 1) as i32);
            for (j, &blk) in c.blocks.iter().enumerate() {
                table[k * max_blocks + j] = blk as i32;
            }
        }
        max_len = max_len.max(c.pos0 + c.rows.len());
    }
    // rows already packed in order at the start of the step: no gather, no scatter
    let row0 = rows[0] as usize;
    let packed = rows
        .iter()
        .enumerate()
        .all(|(k, &x)| x as usize == row0 + k);
    let rows_t = b.upload_i32("absorbed rows", &rows, &[na])?;
    let bt = b.upload_i32("absorbed block table", &table, &[na, max_blocks])?;
    let sl = b.upload_i32("absorbed lengths", &lens, &[na])?;
    let gathered;
    let (q_ptr, q_view) = if packed {
        let v = s.q.view().narrow(0, row0, na).kx()?;
        (v.ptr(), v)
    } else {
        let mut qg = b.empty(&[na, heads, qd])?;
        moe::moe_gather(
            gpu,
            moe::GatherParams {
                x: s.q.view().reshape(&[n, heads * qd]).kx()?,
                src_row: rows_t.view(),
                out: qg.view_mut().reshape(&[na, heads * qd]).kx()?,
            },
        )
        .kx()?;
        gathered = qg;
        (gathered.ptr(), gathered.view())
    };
    let q_abs = b.empty(&[na, heads, r])?;
    super::absorb_q(b, cfg, s.w, q_ptr, na, q_abs.ptr())?;
    let mut ctx_lat = b.empty(&[na, heads, r])?;
    super::decode_latent(
        b,
        super::DecodeLatent {
            q_abs: q_abs.view(),
            q_pe: q_view.narrow(2, dn, dr).kx()?,
            cache: s.cache,
            block_table: bt.view(),
            seq_lens: sl.view(),
            out: ctx_lat.view_mut(),
            max_seq_len: max_len,
            scale: cfg.softmax_scale(),
            uv: None,
        },
    )?;
    // packed rows project straight into the step's output; others through a packed buffer
    let packed_out = if packed {
        None
    } else {
        Some(b.empty(&[na, heads, dv])?)
    };
    let y = match &packed_out {
        Some(t) => t.ptr(),
        None => attn_out.ptr() + (row0 * heads * dv) as u64 * BF,
    };
    super::project_uv(b, cfg, s.w, ctx_lat.ptr(), na, y)?;
    if let Some(o) = packed_out {
        pf::scatter_rows(
            gpu,
            pf::ScatterRowsParams {
                src: o.view(),
                idx: rows_t.view(),
                dst: attn_out.view_mut(),
            },
        )
        .kx()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(r: usize, dn: usize, dr: usize, dv: usize) -> ModelConfig {
        let mut j = dsv2_core::tiny::config_json();
        for (k, v) in [
            ("kv_lora_rank", r),
            ("qk_nope_head_dim", dn),
            ("qk_rope_head_dim", dr),
            ("v_head_dim", dv),
        ] {
            j[k] = serde_json::json!(v);
        }
        ModelConfig::from_json_str(&j.to_string()).unwrap()
    }

    #[test]
    fn flop_crossover_at_deepseek_v2_dims() {
        let c = cfg(512, 128, 64, 128);
        assert!(supported(&c));
        // no prefix: decompressing only the chunk itself is always cheaper
        assert!(!absorbed_is_cheaper(&c, 1, 0));
        assert!(!absorbed_is_cheaper(&c, 512, 0));
        // one query absorbs from the first cached token on
        assert!(absorbed_is_cheaper(&c, 1, 1));
        // 170.7 P > L P + L (L + 1) / 2
        assert!(!absorbed_is_cheaper(&c, 100, 71));
        assert!(absorbed_is_cheaper(&c, 100, 72));
        assert!(absorbed_is_cheaper(&c, 170, 1_000_000));
        assert!(!absorbed_is_cheaper(&c, 171, 1_000_000));
        assert!(!absorbed_is_cheaper(&c, 512, 3584));
    }

    #[test]
    fn other_dims_take_the_general_path() {
        assert!(!supported(&cfg(64, 32, 16, 32)));
        assert!(!supported(&cfg(512, 128, 64, 64)));
    }
}
