//! GPU check of the latent append with decode's W_UK absorb in its launch
//! (`mla_latent_append_absorb_m{1..4}_bf16`), two rows per case:
//! - against the f32/f64 references: the cache rows and the (rotated) queries as
//!   `check_latent_append` checks them, and q_abs against q_nope · W_UK, each part within 1e-2
//!   relative L2 on its own (one figure over all three would let a wrong q_abs hide behind the
//!   cache's larger values); q_abs starts as NaN, so a block left unwritten fails;
//! - q_abs bit for bit against `gemv_kn_m*_bf16` on the same problem: the separate launch the
//!   fused one replaces adds the same partial sums in the same order.

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{CheckRow, f32s, rand_bf16};
use crate::device::Gpu;
use crate::error::{Result, shape_err};
use crate::ops::gemm::Gemm;
use crate::ops::gemv;
use crate::ops::general::{self as g, LatentAbsorb, LatentRope};
use crate::reference as r;
use crate::rope::YarnConfig;
use crate::tensor::Tensor;

/// One case: `tokens` new tokens of `heads` query heads of qk_nope `dn` + rope `dr`, values `dv`,
/// latent `kv_lora`. `fused_q`: the launch rotates the queries it absorbs (the decode default);
/// else they are given apart (`DSV2_FUSED_ROPE=0`) and must come back untouched.
pub struct AbsorbCase {
    pub tokens: usize,
    pub heads: usize,
    pub dn: usize,
    pub dr: usize,
    pub dv: usize,
    pub kv_lora: usize,
    pub fused_q: bool,
}

pub fn check_latent_append_absorb(gpu: &Gpu, c: &AbsorbCase) -> Result<Vec<CheckRow>> {
    let &AbsorbCase {
        tokens,
        heads,
        dn,
        dr,
        dv,
        kv_lora,
        fused_q,
    } = c;
    let op = format!("mla_latent_append_absorb_m{tokens}_bf16");
    let mut rg = ChaCha8Rng::seed_from_u64(24);
    let (width, qd) = (kv_lora + dr, dn + dr);
    let (kb, kf) = rand_bf16(&mut rg, tokens * width, 2.0);
    let (wb, wf) = rand_bf16(&mut rg, kv_lora, 1.5);
    let (slots, block, nblocks) = g::append_slots(&mut rg, tokens);
    let num_slots = block * nblocks;
    let max_pos = 4096;
    // the last position outside the table (its key and query left unrotated)
    let mut positions: Vec<i32> = (0..tokens)
        .map(|_| rg.random_range(0..max_pos as i32))
        .collect();
    if let Some(last) = positions.last_mut().filter(|_| tokens > 1) {
        *last = max_pos as i32 + 3;
    }
    let (cos, sin) = crate::rope::yarn_cos_sin(
        &YarnConfig {
            dim: dr,
            ..YarnConfig::deepseek_v2()
        },
        max_pos,
    );
    let (qb, qf) = rand_bf16(&mut rg, tokens * heads * qd, 2.0);
    let (kvb_b, kvb_f) = rand_bf16(&mut rg, heads * (dn + dv) * kv_lora, 0.5);

    let kva = Tensor::from_host(gpu, &kb, &[tokens, width])?;
    let w = Tensor::from_host(gpu, &wb, &[kv_lora])?;
    let st = Tensor::from_host(gpu, &slots, &[tokens])?;
    let mut cache = Tensor::<bf16>::zeros(gpu, &[nblocks, block, width])?;
    let table = crate::rope::RopeTable::from_host(gpu, &cos, &sin, max_pos, dr)?;
    let pt = Tensor::from_host(gpu, &positions, &[tokens])?;
    let mut q = Tensor::from_host(gpu, &qb, &[tokens, heads, qd])?;
    let kv_b = Tensor::from_host(gpu, &kvb_b, &[heads * (dn + dv), kv_lora])?;
    let nan = vec![bf16::NAN; tokens * heads * kv_lora];
    let mut q_abs = Tensor::from_host(gpu, &nan, &[tokens, heads, kv_lora])?;
    let q_abs_gemv = Tensor::from_host(gpu, &nan, &[tokens, heads, kv_lora])?;
    let eps = 1e-6;
    {
        // the launch reads the queries it rotates, or a view of its own (both borrows of `q`)
        let (rope_q, absorb_q) = if fused_q {
            (Some(q.view_mut()), None)
        } else {
            (None, Some(q.view()))
        };
        g::mla_latent_append(
            gpu,
            g::LatentAppendParams {
                kva: kva.view(),
                norm_w: w.view(),
                slots: st.view(),
                cache: cache.view_mut(),
                kv_lora,
                eps,
                rope: Some(LatentRope {
                    positions: pt.view(),
                    table: &table,
                    q: rope_q,
                }),
                absorb: Some(LatentAbsorb {
                    q: absorb_q,
                    kv_b: kv_b.view(),
                    qk_nope: dn,
                    v_head: dv,
                    out: q_abs.view_mut(),
                }),
            },
        )?;
    }
    // the separate path on the same queries (their first dn values per head are never rotated)
    let gm = Gemm {
        m: tokens,
        n: kv_lora,
        k: dn,
        x: q.ptr(),
        ldx: heads * qd,
        sx: qd,
        w: kv_b.ptr(),
        ldw: kv_lora,
        sw: (dn + dv) * kv_lora,
        w_nk: false,
        y: q_abs_gemv.ptr(),
        ldy: heads * kv_lora,
        sy: kv_lora,
        batch: heads,
    };
    let plan = gemv::plan(&gm, gpu.sm_count, true)
        .ok_or_else(|| shape_err("gemv", format!("{op}'s W_UK product has no GEMV plan")))?;
    // SAFETY: q, kv_b and q_abs_gemv were allocated above with exactly the extents these
    // leading dims and batch strides address.
    unsafe { gemv::gemv::<bf16>(gpu, &gm, plan, false)? };

    // references
    let mut want_cache = vec![0f32; num_slots * width];
    let mut krows = kf;
    r::rope(&mut krows, 1, width, kv_lora, dr, &positions, &cos, &sin);
    for (t, &s) in slots.iter().enumerate() {
        if s < 0 {
            continue;
        }
        let src = &krows[t * width..(t + 1) * width];
        let dst = &mut want_cache[s as usize * width..][..width];
        dst[..kv_lora].copy_from_slice(&r::rmsnorm(&src[..kv_lora], &wf, eps));
        dst[kv_lora..].copy_from_slice(&src[kv_lora..]);
    }
    let mut want_q = qf.clone();
    if fused_q {
        r::rope(&mut want_q, heads, qd, dn, dr, &positions, &cos, &sin);
    }
    let want_q: Vec<f32> = want_q.iter().map(|&v| r::bf(v)).collect();
    let mut want_abs = vec![0f32; tokens * heads * kv_lora];
    for t in 0..tokens {
        for h in 0..heads {
            let x = &qf[(t * heads + h) * qd..][..dn];
            let wk = &kvb_f[h * (dn + dv) * kv_lora..][..dn * kv_lora];
            let out = &mut want_abs[(t * heads + h) * kv_lora..][..kv_lora];
            for (j, o) in out.iter_mut().enumerate() {
                *o = x
                    .iter()
                    .enumerate()
                    .map(|(k, &xv)| xv as f64 * wk[k * kv_lora + j] as f64)
                    .sum::<f64>() as f32;
            }
        }
    }

    let got_abs = q_abs.to_host(gpu)?;
    let parts = [
        ("cache", f32s(&cache.to_host(gpu)?), want_cache),
        ("q", f32s(&q.to_host(gpu)?), want_q),
        ("q_abs", f32s(&got_abs), want_abs),
    ];
    let tol = 1e-2;
    let (mut max_abs, mut rel_l2, mut pass) = (0f32, 0f32, true);
    let mut note = Vec::new();
    for (name, got, want) in &parts {
        let (a, rel) = r::errors(got, want);
        max_abs = max_abs.max(a);
        rel_l2 = rel_l2.max(rel);
        pass &= got.len() == want.len() && rel <= tol;
        note.push(format!("{name} {rel:.1e}"));
    }
    let sizes = format!(
        "tokens {tokens} heads {heads} latent {kv_lora}+{dr} q {dn}+{dr} v {dv}, {}",
        if fused_q {
            "queries rotated in the launch"
        } else {
            "queries apart"
        }
    );
    let vs_ref = CheckRow {
        op: op.clone(),
        sizes: sizes.clone(),
        max_abs,
        rel_l2,
        tol,
        pass,
        note: format!("rel L2: {}", note.join(", ")),
    };
    let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<u16>>();
    let vs_gemv = CheckRow::exact(
        &format!("{op} q_abs vs gemv_kn_m{tokens}_bf16"),
        sizes,
        &bits(&got_abs),
        &bits(&q_abs_gemv.to_host(gpu)?),
    );
    Ok(vec![vs_ref, vs_gemv])
}
