//! Plain-Rust f32 references for every kernel: the numerical definition each GPU op is checked
//! against. Inputs are the bf16 values widened to f32; intermediate roundings that the kernels do
//! on purpose (the bf16 residual stream) are reproduced.

use crate::ops::moe::GateConfig;

/// Round to bf16 and back.
pub fn bf(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

pub fn embedding(table: &[f32], hidden: usize, ids: &[i32]) -> Vec<f32> {
    let vocab = table.len() / hidden;
    let mut out = vec![0f32; ids.len() * hidden];
    for (r, &id) in ids.iter().enumerate() {
        if id >= 0 && (id as usize) < vocab {
            let s = id as usize * hidden;
            out[r * hidden..(r + 1) * hidden].copy_from_slice(&table[s..s + hidden]);
        }
    }
    out
}

pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let mut out = vec![0f32; x.len()];
    for (xr, or) in x.chunks(h).zip(out.chunks_mut(h)) {
        let ms = xr.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / h as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for i in 0..h {
            or[i] = (w[i] as f64 * xr[i] as f64 * inv) as f32;
        }
    }
    out
}

/// Returns (out, new residual): residual' = bf16(x + residual), out = rmsnorm(residual').
pub fn add_rmsnorm(x: &[f32], residual: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let r: Vec<f32> = x.iter().zip(residual).map(|(a, b)| bf(a + b)).collect();
    (rmsnorm(&r, w, eps), r)
}

/// input [rows, 2I] gate | up -> [rows, I].
pub fn silu_mul(input: &[f32], inter: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(input.len() / 2);
    for row in input.chunks(2 * inter) {
        for i in 0..inter {
            let g = row[i] as f64;
            out.push((g / (1.0 + (-g).exp()) * row[inter + i] as f64) as f32);
        }
    }
    out
}

/// x [tokens, heads, head_dim] rotated in place at [offset, offset + rope_dim) by table rows pos[t].
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    offset: usize,
    rope_dim: usize,
    pos: &[i32],
    cos: &[f32],
    sin: &[f32],
) {
    let half = rope_dim / 2;
    let max_pos = cos.len() / half;
    for (t, &p) in pos.iter().enumerate() {
        if p < 0 || p as usize >= max_pos {
            continue;
        }
        for h in 0..heads {
            let base = (t * heads + h) * head_dim + offset;
            for i in 0..half {
                let (c, s) = (cos[p as usize * half + i], sin[p as usize * half + i]);
                let (a, b) = (x[base + 2 * i], x[base + 2 * i + 1]);
                x[base + 2 * i] = a * c - b * s;
                x[base + 2 * i + 1] = a * s + b * c;
            }
        }
    }
}

/// Softmax scores of one token (f64 for the reference).
pub fn gate_scores(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| (v / s) as f32).collect()
}

/// Greedy argmax with ties to the lowest index.
fn argmax_first(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// logits [tokens, E] -> (ids [tokens, k], weights [tokens, k]), DeepSeek's group-limited greedy.
pub fn moe_gate(logits: &[f32], n_exp: usize, c: &GateConfig) -> (Vec<i32>, Vec<f32>) {
    let mut ids = Vec::new();
    let mut ws = Vec::new();
    for row in logits.chunks(n_exp) {
        let mut s = gate_scores(row);
        if c.n_group > 1 {
            let gs = n_exp / c.n_group;
            let mut gmax: Vec<f32> = (0..c.n_group)
                .map(|g| {
                    s[g * gs..(g + 1) * gs]
                        .iter()
                        .cloned()
                        .fold(f32::NEG_INFINITY, f32::max)
                })
                .collect();
            let mut keep = vec![false; c.n_group];
            for _ in 0..c.topk_group {
                let g = argmax_first(&gmax);
                keep[g] = true;
                gmax[g] = f32::NEG_INFINITY;
            }
            for (e, v) in s.iter_mut().enumerate() {
                if !keep[e / gs] {
                    *v = 0.0;
                }
            }
        }
        let mut sel = Vec::new();
        for _ in 0..c.top_k {
            let e = argmax_first(&s);
            sel.push((e, s[e]));
            s[e] = f32::NEG_INFINITY;
        }
        let sum: f32 = sel.iter().map(|x| x.1).sum();
        for (e, w) in sel {
            ids.push(e as i32);
            ws.push(if c.norm_topk_prob {
                w / (sum + 1e-20)
            } else {
                w * c.routed_scaling_factor
            });
        }
    }
    (ids, ws)
}

/// (counts, offsets, slot_of, src_row) of the stable permutation by expert.
pub fn permute(ids: &[i32], k: usize, n_exp: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut counts = vec![0i32; n_exp];
    for &e in ids {
        if e >= 0 && (e as usize) < n_exp {
            counts[e as usize] += 1;
        }
    }
    let mut offsets = vec![0i32; n_exp + 1];
    for e in 0..n_exp {
        offsets[e + 1] = offsets[e] + counts[e];
    }
    let mut cursor = offsets.clone();
    let mut slot_of = vec![-1i32; ids.len()];
    let mut src_row = vec![0i32; ids.len()];
    for (a, &e) in ids.iter().enumerate() {
        if e >= 0 && (e as usize) < n_exp {
            let s = cursor[e as usize];
            cursor[e as usize] += 1;
            slot_of[a] = s;
            src_row[s as usize] = (a / k) as i32;
        }
    }
    (counts, offsets, slot_of, src_row)
}

/// out[t] = sum_j w[t,j] * y[slot_of[t,j]] (+ out[t] when accumulating).
pub fn combine(
    y: &[f32],
    hidden: usize,
    slot_of: &[i32],
    w: &[f32],
    k: usize,
    init: Option<&[f32]>,
) -> Vec<f32> {
    let tokens = slot_of.len() / k;
    let mut out = init
        .map(|v| v.to_vec())
        .unwrap_or_else(|| vec![0f32; tokens * hidden]);
    for t in 0..tokens {
        for j in 0..k {
            let s = slot_of[t * k + j];
            if s < 0 {
                continue;
            }
            let wt = w[t * k + j];
            for c in 0..hidden {
                out[t * hidden + c] += wt * y[s as usize * hidden + c];
            }
        }
    }
    out
}

/// y [m, n] = x [m, k] · w [n, k]^T in f64 accumulation.
pub fn gemm(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            y[i * n + j] = xr
                .iter()
                .zip(wr)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>() as f32;
        }
    }
    y
}

/// Expert FFN on permuted rows: per expert, down(silu(gate) * up); the intermediate is rounded to
/// bf16 as the GPU path stores it.
pub fn expert_ffn(
    x: &[f32],
    gate_up: &[f32],
    down: &[f32],
    counts: &[usize],
    hidden: usize,
    inter: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let mut off = 0;
    for (e, &n) in counts.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let xe = &x[off * hidden..(off + n) * hidden];
        let gu_w = &gate_up[e * 2 * inter * hidden..(e + 1) * 2 * inter * hidden];
        let gu: Vec<f32> = gemm(xe, gu_w, n, 2 * inter, hidden)
            .into_iter()
            .map(bf)
            .collect();
        let act: Vec<f32> = silu_mul(&gu, inter).into_iter().map(bf).collect();
        let dw = &down[e * hidden * inter..(e + 1) * hidden * inter];
        let y = gemm(&act, dw, n, hidden, inter);
        out[off * hidden..(off + n) * hidden].copy_from_slice(&y);
        off += n;
    }
    out
}

/// MLA decode reference: for each (b, h): softmax over t < len of scale * q·cache[t], times c.
/// q_abs [B, H, 512], q_pe [B, H, 64], cache [blocks * block_size, 576] flat, block table [B, mb].
#[allow(clippy::too_many_arguments)]
pub fn mla_decode(
    q_abs: &[f32],
    q_pe: &[f32],
    cache: &[f32],
    block_size: usize,
    block_table: &[i32],
    max_blocks: usize,
    seq_lens: &[i32],
    heads: usize,
    scale: f32,
) -> Vec<f32> {
    const L: usize = 512;
    const R: usize = 64;
    const D: usize = 576;
    let batch = seq_lens.len();
    let mut out = vec![0f32; batch * heads * L];
    for b in 0..batch {
        let len = seq_lens[b] as usize;
        let rows: Vec<&[f32]> = (0..len)
            .map(|t| {
                let blk = block_table[b * max_blocks + t / block_size] as usize;
                let s = (blk * block_size + t % block_size) * D;
                &cache[s..s + D]
            })
            .collect();
        for h in 0..heads {
            let qa = &q_abs[(b * heads + h) * L..(b * heads + h + 1) * L];
            let qp = &q_pe[(b * heads + h) * R..(b * heads + h + 1) * R];
            let logits: Vec<f64> = rows
                .iter()
                .map(|r| {
                    let s: f64 = qa
                        .iter()
                        .zip(&r[..L])
                        .map(|(a, c)| *a as f64 * *c as f64)
                        .sum::<f64>()
                        + qp.iter()
                            .zip(&r[L..])
                            .map(|(a, c)| *a as f64 * *c as f64)
                            .sum::<f64>();
                    s * scale as f64
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
            let z: f64 = p.iter().sum();
            let o = &mut out[(b * heads + h) * L..(b * heads + h + 1) * L];
            for (pi, r) in p.iter().zip(&rows) {
                for d in 0..L {
                    o[d] += (pi / z * r[d] as f64) as f32;
                }
            }
        }
    }
    out
}

/// cache (flat [slots, 576]) with c_kv/k_pe rows written at slots (negative / out of range skipped).
pub fn cache_append(cache: &mut [f32], c_kv: &[f32], k_pe: &[f32], slots: &[i64]) {
    let n_slots = (cache.len() / 576) as i64;
    for (t, &s) in slots.iter().enumerate() {
        if s < 0 || s >= n_slots {
            continue;
        }
        let d = s as usize * 576;
        cache[d..d + 512].copy_from_slice(&c_kv[t * 512..(t + 1) * 512]);
        cache[d + 512..d + 576].copy_from_slice(&k_pe[t * 64..(t + 1) * 64]);
    }
}

pub fn argmax(logits: &[f32], vocab: usize) -> Vec<i32> {
    logits
        .chunks(vocab)
        .map(|r| argmax_first(r) as i32)
        .collect()
}

/// The sampling definition the GPU kernel implements (see sample.cu): w = exp((x - max) / T) in
/// f32, keep w >= k-th largest, then the top set reaching top_p of that mass (ties kept), draw in
/// index order with target u * Z.
pub fn sample(
    logits: &[f32],
    vocab: usize,
    temp: &[f32],
    top_k: &[i32],
    top_p: &[f32],
    u: &[f32],
) -> Vec<i32> {
    let mut out = Vec::new();
    for (r, row) in logits.chunks(vocab).enumerate() {
        if temp[r] <= 0.0 || temp[r].is_nan() {
            out.push(argmax_first(row) as i32);
            continue;
        }
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f32> = row.iter().map(|x| ((x - m) / temp[r]).exp()).collect();
        let mut sorted = w.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let k = top_k[r];
        let tk = if k > 0 && (k as usize) < vocab {
            sorted[k as usize - 1]
        } else {
            0.0
        };
        let zk: f64 = w.iter().filter(|&&x| x >= tk).map(|&x| x as f64).sum();
        let mut thr = tk;
        if top_p[r] < 1.0 {
            let target = top_p[r] as f64 * zk;
            let mut acc = 0f64;
            let mut i = 0;
            while i < sorted.len() && sorted[i] >= tk {
                // add all ties of this value at once
                let v = sorted[i];
                while i < sorted.len() && sorted[i] == v {
                    acc += v as f64;
                    i += 1;
                }
                if acc >= target {
                    thr = v;
                    break;
                }
            }
        }
        let z: f64 = w.iter().filter(|&&x| x >= thr).map(|&x| x as f64).sum();
        let target = u[r] as f64 * z;
        let mut acc = 0f64;
        let mut pick = None;
        let mut last = 0;
        for (j, &x) in w.iter().enumerate() {
            if x >= thr {
                last = j;
                acc += x as f64;
                if acc > target {
                    pick = Some(j);
                    break;
                }
            }
        }
        out.push(pick.unwrap_or(last) as i32);
    }
    out
}

/// (max abs error, relative L2 error) of got vs want.
pub fn errors(got: &[f32], want: &[f32]) -> (f32, f32) {
    let mut max_abs = 0f64;
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        let d = (*g as f64 - *w as f64).abs();
        max_abs = max_abs.max(if d.is_nan() { f64::INFINITY } else { d });
        num += d * d;
        den += (*w as f64) * (*w as f64);
    }
    let rel = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    let rel = if rel.is_nan() { f64::INFINITY } else { rel };
    (max_abs as f32, rel as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_is_stable_and_skips_foreign() {
        let ids = [2, 0, -1, 2, 1, 0];
        let (counts, offsets, slot_of, src_row) = permute(&ids, 2, 3);
        assert_eq!(counts, vec![2, 1, 2]);
        assert_eq!(offsets, vec![0, 2, 3, 5]);
        assert_eq!(slot_of, vec![3, 0, -1, 4, 2, 1]);
        assert_eq!(&src_row[..5], &[0, 2, 2, 0, 1]);
    }

    #[test]
    fn gate_group_limit() {
        // 4 experts, 2 groups; group 1 holds the best expert -> only experts 2, 3 can be picked
        let logits = [1.0, 0.9, 3.0, -5.0];
        let c = GateConfig {
            n_group: 2,
            topk_group: 1,
            top_k: 2,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        };
        let (ids, w) = moe_gate(&logits, 4, &c);
        assert_eq!(ids, vec![2, 3]);
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn sample_limits() {
        let logits = [0.0, 5.0, 4.0, -1.0];
        // top_k = 1 always gives the argmax
        assert_eq!(sample(&logits, 4, &[1.0], &[1], &[1.0], &[0.99]), vec![1]);
        // temperature 0 is greedy
        assert_eq!(sample(&logits, 4, &[0.0], &[0], &[1.0], &[0.5]), vec![1]);
        // u close to 1 with no limits picks the last index
        assert_eq!(
            sample(&logits, 4, &[1.0], &[0], &[1.0], &[0.999999]),
            vec![3]
        );
        // top_p small keeps only the best
        assert_eq!(sample(&logits, 4, &[1.0], &[0], &[0.1], &[0.999]), vec![1]);
    }
}
