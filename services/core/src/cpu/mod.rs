//! The CPU reference backend: f32 activations and accumulation, weights in their stored dtype,
//! multi-threaded with rayon. Every other backend is tested against this one.

mod ceilings;
mod host_tier;
pub mod matmul;
pub mod weight;

use rayon::prelude::*;

use crate::backend::{
    AttnBatch, AttnMode, AttnWeights, Backend, Ceilings, ExpertBank, MlpWeights, QProj,
};
use crate::config::ModelConfig;
use crate::error::{CoreError, Result};
use crate::routing::{Routing, RoutingParams, route};
use crate::weights::TensorRef;
pub use host_tier::CpuHostBlocks;
pub use matmul::matmul_xwt;
pub use weight::CpuWeight;

/// A [rows, cols] f32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuAct {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuAct {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Latent cache of every layer: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim] f32.
pub struct CpuCache {
    layers: Vec<Vec<f32>>,
    width: usize,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

/// Chunks of at most this many new tokens use absorbed attention under `AttnMode::Auto`.
const ABSORB_MAX_CHUNK: usize = 4;

fn err(msg: impl Into<String>) -> CoreError {
    CoreError::Backend {
        backend: "cpu".into(),
        msg: msg.into(),
    }
}

pub fn rms_norm_rows(x: &[f32], cols: usize, w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (o, r) in out.chunks_mut(cols).zip(x.chunks(cols)) {
        let ms = r.iter().map(|v| v * v).sum::<f32>() / cols as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in o.iter_mut().zip(r).zip(w) {
            *o = g * (v * inv);
        }
    }
    out
}

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn softmax_inplace(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

fn mm(x: &CpuAct, w: &CpuWeight) -> Result<CpuAct> {
    if w.shape.len() != 2 || w.cols() != x.cols {
        return Err(err(format!(
            "linear: input has {} features, weight is {:?}",
            x.cols, w.shape
        )));
    }
    Ok(CpuAct {
        rows: x.rows,
        cols: w.rows(),
        data: matmul_xwt(&x.data, x.rows, w),
    })
}

impl CpuBackend {
    fn mlp_rows(&self, w: &MlpWeights<CpuWeight>, x: &CpuAct) -> Result<CpuAct> {
        let g = mm(x, &w.gate)?;
        let u = mm(x, &w.up)?;
        let act = CpuAct {
            rows: x.rows,
            cols: g.cols,
            data: g
                .data
                .iter()
                .zip(&u.data)
                .map(|(g, u)| silu(*g) * u)
                .collect(),
        };
        mm(&act, &w.down)
    }
}

impl Backend for CpuBackend {
    type Weight = CpuWeight;
    type Act = CpuAct;
    type Cache = CpuCache;
    type HostBlocks = CpuHostBlocks;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn host_block_bytes(&self, cfg: &ModelConfig, block_size: usize) -> usize {
        cfg.num_hidden_layers * block_size * cfg.latent_cache_width() * size_of::<f32>()
    }

    fn new_host_blocks(
        &self,
        cfg: &ModelConfig,
        block_size: usize,
        max_slots: usize,
    ) -> Result<CpuHostBlocks> {
        CpuHostBlocks::new(
            cfg.num_hidden_layers,
            block_size * cfg.latent_cache_width(),
            max_slots,
        )
    }

    fn export_blocks(
        &self,
        cache: &CpuCache,
        host: &mut CpuHostBlocks,
        copies: &[crate::backend::BlockCopy],
    ) -> Result<()> {
        host.export(cache, copies)
    }

    fn import_blocks(
        &self,
        host: &mut CpuHostBlocks,
        cache: &mut CpuCache,
        copies: &[crate::backend::BlockCopy],
    ) -> Result<()> {
        host.import(cache, copies)
    }

    fn weight(&self, t: &TensorRef) -> Result<CpuWeight> {
        Ok(CpuWeight::from_ref(t))
    }

    fn measure_ceilings(&self, quick: bool) -> Result<Ceilings> {
        Ok(ceilings::measure(quick))
    }

    fn new_cache(
        &self,
        cfg: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<CpuCache> {
        let width = cfg.latent_cache_width();
        let per_layer = num_blocks
            .checked_mul(block_size)
            .and_then(|v| v.checked_mul(width))
            .ok_or_else(|| err("KV cache size overflows"))?;
        Ok(CpuCache {
            layers: (0..cfg.num_hidden_layers)
                .map(|_| vec![0f32; per_layer])
                .collect(),
            width,
        })
    }

    fn act_from_host(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CpuAct> {
        if data.len() != rows * cols {
            return Err(err(format!(
                "{} values do not make a [{rows}, {cols}] matrix",
                data.len()
            )));
        }
        Ok(CpuAct {
            rows,
            cols,
            data: data.to_vec(),
        })
    }

    fn act_to_host(&self, a: &CpuAct) -> Result<Vec<f32>> {
        Ok(a.data.clone())
    }

    fn act_shape(&self, a: &CpuAct) -> (usize, usize) {
        (a.rows, a.cols)
    }

    fn select_rows(&self, a: &CpuAct, rows: &[usize]) -> Result<CpuAct> {
        let mut data = Vec::with_capacity(rows.len() * a.cols);
        for &r in rows {
            if r >= a.rows {
                return Err(err(format!("row {r} out of {}", a.rows)));
            }
            data.extend_from_slice(a.row(r));
        }
        Ok(CpuAct {
            rows: rows.len(),
            cols: a.cols,
            data,
        })
    }

    fn embed(&self, table: &CpuWeight, ids: &[u32]) -> Result<CpuAct> {
        let cols = table.cols();
        let mut data = Vec::with_capacity(ids.len() * cols);
        let mut row = Vec::with_capacity(cols);
        for &id in ids {
            if id as usize >= table.rows() {
                return Err(CoreError::InvalidInput(format!(
                    "token id {id} is outside the embedding table ({} rows)",
                    table.rows()
                )));
            }
            table.row_f32(id as usize, &mut row);
            data.extend_from_slice(&row);
        }
        Ok(CpuAct {
            rows: ids.len(),
            cols,
            data,
        })
    }

    fn rms_norm(&self, x: &CpuAct, w: &CpuWeight, eps: f32) -> Result<CpuAct> {
        let g = w.to_f32();
        if g.len() != x.cols {
            return Err(err(format!(
                "rms_norm: weight has {} values, input {} features",
                g.len(),
                x.cols
            )));
        }
        Ok(CpuAct {
            rows: x.rows,
            cols: x.cols,
            data: rms_norm_rows(&x.data, x.cols, &g, eps),
        })
    }

    fn add_assign(&self, acc: &mut CpuAct, x: &CpuAct) -> Result<()> {
        if (acc.rows, acc.cols) != (x.rows, x.cols) {
            return Err(err(format!(
                "add: [{}, {}] + [{}, {}]",
                acc.rows, acc.cols, x.rows, x.cols
            )));
        }
        for (a, b) in acc.data.iter_mut().zip(&x.data) {
            *a += b;
        }
        Ok(())
    }

    fn linear(&self, x: &CpuAct, w: &CpuWeight) -> Result<CpuAct> {
        mm(x, w)
    }

    fn mlp(&self, w: &MlpWeights<CpuWeight>, x: &CpuAct) -> Result<CpuAct> {
        self.mlp_rows(w, x)
    }

    fn attention(
        &self,
        cfg: &ModelConfig,
        w: &AttnWeights<CpuWeight>,
        x: &CpuAct,
        batch: &AttnBatch<'_>,
        cache: &mut CpuCache,
        layer: usize,
    ) -> Result<CpuAct> {
        let n = x.rows;
        let heads = cfg.num_attention_heads;
        let (dn, dr, dv, r) = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        );
        let qd = dn + dr;
        let eps = cfg.rms_norm_eps;
        let width = cache.width;
        let bs = batch.block_size;

        let mut q = match &w.q {
            QProj::LowRank { a, norm, b } => {
                let qa = mm(x, a)?;
                let qa = self.rms_norm(&qa, norm, eps)?;
                mm(&qa, b)?
            }
            QProj::Plain(wq) => mm(x, wq)?,
        };
        let kva = mm(x, &w.kv_a)?;
        let kv_norm = w.kv_a_norm.to_f32();

        // Positions of the step's rows, then rotate q_pe and append (c, k_pe) to the cache.
        let mut pos = vec![usize::MAX; n];
        for s in batch.seqs {
            for (i, row) in s.rows.clone().enumerate() {
                pos[row] = s.pos0 + i;
            }
        }
        let layer_cache = cache
            .layers
            .get_mut(layer)
            .ok_or_else(|| err(format!("cache has no layer {layer}")))?;
        for s in batch.seqs {
            for row in s.rows.clone() {
                let p = pos[row];
                let slot = s.blocks[p / bs] as usize * bs + p % bs;
                let dst = &mut layer_cache[slot * width..(slot + 1) * width];
                let src = &kva.data[row * (r + dr)..(row + 1) * (r + dr)];
                dst[..r].copy_from_slice(&rms_norm_rows(&src[..r], r, &kv_norm, eps));
                dst[r..].copy_from_slice(&src[r..]);
                batch.rope.apply(&mut dst[r..], p);
                for hd in 0..heads {
                    let off = row * heads * qd + hd * qd + dn;
                    batch.rope.apply(&mut q.data[off..off + dr], p);
                }
            }
        }

        let scale = cfg.softmax_scale();
        let layer_cache = &cache.layers[layer];
        let mut out = vec![0f32; n * heads * dv];
        for s in batch.seqs {
            let len = s.rows.len();
            if len == 0 {
                continue;
            }
            let ctx = s.pos0 + len;
            // The sequence's cached latents, in position order.
            let mut lat = Vec::with_capacity(ctx * width);
            for p in 0..ctx {
                let slot = s.blocks[p / bs] as usize * bs + p % bs;
                lat.extend_from_slice(&layer_cache[slot * width..(slot + 1) * width]);
            }
            let absorbed = match batch.mode {
                AttnMode::Absorbed => true,
                AttnMode::Naive => false,
                AttnMode::Auto => len <= ABSORB_MAX_CHUNK,
            };
            let per_head: Vec<Vec<f32>> = if absorbed {
                (0..heads)
                    .into_par_iter()
                    .map(|hd| {
                        absorbed_head(&q, &lat, s.rows.start, len, s.pos0, hd, cfg, &w.kv_b, scale)
                    })
                    .collect()
            } else {
                let c = CpuAct {
                    rows: ctx,
                    cols: r,
                    data: lat
                        .chunks(width)
                        .flat_map(|row| row[..r].iter().copied())
                        .collect(),
                };
                let kv = mm(&c, &w.kv_b)?;
                (0..heads)
                    .into_par_iter()
                    .map(|hd| naive_head(&q, &kv, &lat, s.rows.start, len, s.pos0, hd, cfg, scale))
                    .collect()
            };
            for (hd, o) in per_head.iter().enumerate() {
                for i in 0..len {
                    let row = s.rows.start + i;
                    out[row * heads * dv + hd * dv..][..dv]
                        .copy_from_slice(&o[i * dv..(i + 1) * dv]);
                }
            }
        }
        let attn = CpuAct {
            rows: n,
            cols: heads * dv,
            data: out,
        };
        mm(&attn, &w.o)
    }

    fn route(&self, gate: &CpuWeight, x: &CpuAct, p: &RoutingParams) -> Result<Routing> {
        let logits = mm(x, gate)?;
        Ok(route(&logits.data, p))
    }

    fn experts(
        &self,
        bank: &ExpertBank<CpuWeight>,
        x: &CpuAct,
        routing: &Routing,
    ) -> Result<CpuAct> {
        if routing.rows() != x.rows {
            return Err(err(format!(
                "routing has {} rows, input {}",
                routing.rows(),
                x.rows
            )));
        }
        // Group (row, weight) by expert so each expert runs once on all its rows.
        let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); bank.experts.len()];
        for row in 0..x.rows {
            let (ids, ws) = routing.row(row);
            for (&e, &wt) in ids.iter().zip(ws) {
                if e == crate::routing::NO_EXPERT {
                    continue;
                }
                let slot = by_expert
                    .get_mut(e as usize)
                    .ok_or_else(|| err(format!("expert id {e} out of {}", bank.experts.len())))?;
                slot.push((row, wt));
            }
        }
        let mut out = CpuAct {
            rows: x.rows,
            cols: x.cols,
            data: vec![0f32; x.rows * x.cols],
        };
        for (e, rows) in by_expert.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let Some(Some(mlp)) = bank.experts.get(e) else {
                continue;
            };
            let idx: Vec<usize> = rows.iter().map(|(r, _)| *r).collect();
            let xe = self.select_rows(x, &idx)?;
            let ye = self.mlp_rows(mlp, &xe)?;
            for (i, &(row, wt)) in rows.iter().enumerate() {
                for (o, v) in out.data[row * x.cols..(row + 1) * x.cols]
                    .iter_mut()
                    .zip(ye.row(i))
                {
                    *o += wt * v;
                }
            }
        }
        Ok(out)
    }
}

/// One head of naive MLA for one sequence chunk: K and V decompressed from the latent (`kv`,
/// [ctx, heads × (dn + dv)]). Returns [len, dv].
#[allow(clippy::too_many_arguments)]
fn naive_head(
    q: &CpuAct,
    kv: &CpuAct,
    lat: &[f32],
    row0: usize,
    len: usize,
    pos0: usize,
    hd: usize,
    cfg: &ModelConfig,
    scale: f32,
) -> Vec<f32> {
    let heads = cfg.num_attention_heads;
    let (dn, dr, dv, r) = (
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    );
    let qd = dn + dr;
    let width = r + dr;
    let kvw = dn + dv;
    let mut out = vec![0f32; len * dv];
    let mut scores = Vec::new();
    for i in 0..len {
        let p = pos0 + i;
        let qrow = &q.data[(row0 + i) * heads * qd + hd * qd..][..qd];
        scores.clear();
        for t in 0..=p {
            let k_nope = &kv.data[t * heads * kvw + hd * kvw..][..dn];
            let k_pe = &lat[t * width + r..(t + 1) * width];
            let s = matmul::dot_f32(&qrow[..dn], k_nope) + matmul::dot_f32(&qrow[dn..], k_pe);
            scores.push(s * scale);
        }
        softmax_inplace(&mut scores);
        let o = &mut out[i * dv..(i + 1) * dv];
        for (t, &pt) in scores.iter().enumerate() {
            let v = &kv.data[t * heads * kvw + hd * kvw + dn..][..dv];
            for (o, v) in o.iter_mut().zip(v) {
                *o += pt * v;
            }
        }
    }
    out
}

/// One head of absorbed MLA: q_abs = W_UKᵀ q_nope scores against the latent directly, and the
/// weighted latent goes through W_UV once. Returns [len, dv].
#[allow(clippy::too_many_arguments)]
fn absorbed_head(
    q: &CpuAct,
    lat: &[f32],
    row0: usize,
    len: usize,
    pos0: usize,
    hd: usize,
    cfg: &ModelConfig,
    kv_b: &CpuWeight,
    scale: f32,
) -> Vec<f32> {
    let heads = cfg.num_attention_heads;
    let (dn, dr, dv, r) = (
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    );
    let qd = dn + dr;
    let width = r + dr;
    let base = hd * (dn + dv);
    // This head's W_UK ([dn, r]) and W_UV ([dv, r]) rows of kv_b, widened once for all rows.
    let mut wrow = Vec::with_capacity(r);
    let mut w_uk = Vec::with_capacity(dn * r);
    for j in 0..dn {
        kv_b.row_f32(base + j, &mut wrow);
        w_uk.extend_from_slice(&wrow);
    }
    let mut w_uv = Vec::with_capacity(dv * r);
    for v in 0..dv {
        kv_b.row_f32(base + dn + v, &mut wrow);
        w_uv.extend_from_slice(&wrow);
    }
    let mut out = vec![0f32; len * dv];
    let mut q_abs = vec![0f32; r];
    let mut ctx_lat = vec![0f32; r];
    let mut scores = Vec::new();
    for i in 0..len {
        let p = pos0 + i;
        let qrow = &q.data[(row0 + i) * heads * qd + hd * qd..][..qd];
        q_abs.iter_mut().for_each(|v| *v = 0.0);
        for (&qj, w) in qrow[..dn].iter().zip(w_uk.chunks_exact(r)) {
            for (a, w) in q_abs.iter_mut().zip(w) {
                *a += qj * w;
            }
        }
        scores.clear();
        for t in 0..=p {
            let c = &lat[t * width..t * width + r];
            let k_pe = &lat[t * width + r..(t + 1) * width];
            scores.push((matmul::dot_f32(&q_abs, c) + matmul::dot_f32(&qrow[dn..], k_pe)) * scale);
        }
        softmax_inplace(&mut scores);
        ctx_lat.iter_mut().for_each(|v| *v = 0.0);
        for (t, &pt) in scores.iter().enumerate() {
            for (a, c) in ctx_lat.iter_mut().zip(&lat[t * width..t * width + r]) {
                *a += pt * c;
            }
        }
        for (o, w) in out[i * dv..(i + 1) * dv]
            .iter_mut()
            .zip(w_uv.chunks_exact(r))
        {
            *o = matmul::dot_f32(w, &ctx_lat);
        }
    }
    out
}
