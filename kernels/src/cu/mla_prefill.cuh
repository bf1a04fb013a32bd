// mla_prefill.cuh: what the MLA prefill attention kernels share (mla_prefill.cu, mla_prefill_ws.cu):
// the head dims they are compiled for, a tile's sequence descriptor and its bounds check, the bf16
// pair packing of P's register fragments, and the wgmma kernels' pieces (a warpgroup's rows of a
// 128-row item, its Q.K and P.V issue, the causal mask and online softmax step, the rescale).
#pragma once
#include "common.cuh"
#include "wgmma.cuh"

#define PF_DN 128              // qk_nope_head_dim
#define PF_DR 64               // qk_rope_head_dim
#define PF_DQK (PF_DN + PF_DR) // 192
#define PF_DV 128              // v_head_dim

// Tile `idx` of the list: sequence descriptor tiles[idx].x of `seqs` and first query m0.
// False for a descriptor that does not fit the operands (the CTA returns, uniformly, before any
// barrier): the launcher cannot see the device arrays, the kernel keeps them in bounds.
struct PfTile {
    int q_row0, q_len, pos0, m0;
    long long ctx_row0;
};
__device__ __forceinline__ bool pf_tile(const int4* __restrict__ seqs, int n_seqs, const int2* __restrict__ tiles,
                                        long long n_q, long long n_ctx, int idx, PfTile& t) {
    const int2 tile = tiles[idx];
    if (tile.x < 0 || tile.x >= n_seqs) return false;
    const int4 sd = seqs[tile.x];
    t.q_row0 = sd.x;
    t.q_len = sd.y;
    t.pos0 = sd.z;
    t.ctx_row0 = sd.w;
    t.m0 = tile.y;
    return !(t.m0 < 0 || t.m0 >= t.q_len || t.q_row0 < 0 || t.pos0 < 0 || t.ctx_row0 < 0 ||
             (long long)t.q_row0 + t.q_len > n_q || t.ctx_row0 + t.pos0 + t.q_len > n_ctx);
}

__device__ __forceinline__ u32 pf_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = the smaller column
    return *reinterpret_cast<u32*>(&v);
}

// The softmax step of the wgmma prefill kernels (mla_prefill.cu's pw_run, mla_prefill_ws.cu) on
// the m64nN S accumulator of a warpgroup (rows r_lo and r_lo + 8 of its 64, columns 8 jj + cq,
// + 1): the causal mask where the key tile k0 .. k0 + N - 1 reaches past the warpgroup's first
// query row (wq0, at position pos0 + wq0), then the online softmax in log2 units (scale sl2): S
// becomes P = exp2(S * sl2 - m), the running maxima m_r and sums l_r (this thread's share)
// advance, and alpha (the O rescale of each row) is returned.
template <int N>
__device__ __forceinline__ void pw_mask_softmax(float* sa, int k0, int pos0, int wq0, int r_lo, int cq, float sl2,
                                                float* m_r, float* l_r, float* alpha) {
    if (k0 + N - 1 > pos0 + wq0) {
        const int lim = pos0 + wq0 + r_lo - k0 - cq;  // this thread's row limit, as a key offset
#pragma unroll
        for (int jj = 0; jj < N / 8; ++jj)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                if (8 * jj + (e & 1) > lim + 8 * (e >> 1)) sa[4 * jj + e] = -INFINITY;
    }
    // (row r_lo: e = 0, 1; r_lo + 8: e = 2, 3)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float mx = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < N / 8; ++jj) mx = fmaxf(mx, fmaxf(sa[4 * jj + 2 * hf], sa[4 * jj + 2 * hf + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_r[hf], mx * sl2);
        // key 0 is in tile 0 and visible to every row, so m_new is finite; the guard keeps a
        // fully masked row at zeros instead of NaN should that ever change
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        alpha[hf] = exp2f(m_r[hf] - m_use);  // 0 on the first tile (m_r = -inf)
        float sum = 0.f;
#pragma unroll
        for (int jj = 0; jj < N / 8; ++jj) {
            const float p0 = exp2f(fmaf(sa[4 * jj + 2 * hf], sl2, -m_use));
            const float p1 = exp2f(fmaf(sa[4 * jj + 2 * hf + 1], sl2, -m_use));
            sa[4 * jj + 2 * hf] = p0;
            sa[4 * jj + 2 * hf + 1] = p1;
            sum += p0 + p1;
        }
        l_r[hf] = l_r[hf] * alpha[hf] + sum;
        m_r[hf] = m_new;
    }
}

// After the P.V that read the old P is done: O (64 x 128 accumulator) *= alpha per row, and P's
// bf16 A fragments for the next P.V from the tile's N probabilities.
template <int N>
__device__ __forceinline__ void pw_rescale_pack(float* o, u32* p, const float* sa, const float* alpha) {
#pragma unroll
    for (int jj = 0; jj < PF_DV / 8; ++jj) {
        o[4 * jj] *= alpha[0];
        o[4 * jj + 1] *= alpha[0];
        o[4 * jj + 2] *= alpha[1];
        o[4 * jj + 3] *= alpha[1];
    }
#pragma unroll
    for (int i = 0; i < N / 4; ++i) p[i] = pf_pack(sa[2 * i], sa[2 * i + 1]);
}

// The wgmma prefill kernels' operands: 64-column chunks of [128 rows x 128 B], 128-byte swizzled.
#define PF_WCH (128 * 128)

// S = Q . K^T of one warpgroup over N (128, or 64 in its last tile) keys: 12 wgmma k-steps over
// Q's 3 chunks at q_addr (the warpgroup's 64 rows) and the K stage at kb. Not committed.
template <int N>
__device__ __forceinline__ void pw_issue_qk(float* sa, u32 q_addr, u32 kb) {
#pragma unroll
    for (int ks = 0; ks < PF_DQK / 16; ++ks) {
        const u32 off = (ks >> 2) * PF_WCH + (ks & 3) * 32;
        const u64 da = wg_desc(q_addr + off, 16, 1024), db = wg_desc(kb + off, 16, 1024);
        if (N == 128)
            wgmma_m64n128_ss(sa, da, db, ks);
        else
            wgmma_m64n64_ss(sa, da, db, ks);
    }
}

// O += P . V over a V stage at vb (MN-major), 128 keys or the first 64 (`phalf`: the
// warpgroup's 64-key last tile). P's A fragments from registers. Not committed.
__device__ __forceinline__ void pw_issue_pv(float* o, const u32* p, u32 vb, bool phalf) {
#pragma unroll
    for (int kk = 0; kk < 128 / 16; ++kk)
        if (kk < 4 || !phalf) wgmma_m64n128_rs_tn(o, p + 4 * kk, wg_desc(vb + kk * 16 * 128, PF_WCH, 1024), 1);
}

// A warpgroup's share of a 128-row item of the wgmma prefill kernels (rows 64 wg .. 64 wg + 63 of
// the tile at m0): its first query (index in the sequence), the last key any of its rows sees,
// the 128-key tiles it computes (<= the CTA's), and whether the last of them is the 64-key half
// tile (keys k0 + 64 .. lie past all its rows) and so the count of full ones before it.
struct PwRows {
    int wq0, w_last, n_wt, n_full;
    bool last_half;
};
__device__ __forceinline__ PwRows pw_rows(int m0, int q_len, int pos0, int wg) {
    PwRows r;
    r.wq0 = m0 + 64 * wg;
    r.w_last = pos0 + min(r.wq0 + 63, q_len - 1);
    r.n_wt = r.wq0 < q_len ? r.w_last / 128 + 1 : 0;
    r.last_half = r.n_wt > 0 && (r.n_wt - 1) * 128 + 64 > r.w_last;
    r.n_full = r.n_wt - (r.last_half ? 1 : 0);
    return r;
}

// The accumulators of a wgmma prefill warpgroup zeroed: O, S, S of the 64-key tile, P.
__device__ __forceinline__ void pw_zero(float* o, float* s, float* s2, u32* p) {
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = s[i] = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
        s2[i] = 0.f;
        p[i] = 0u;
    }
}
