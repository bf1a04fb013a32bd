// mla_prefill.cu: MLA prefill attention for every sequence of a step in one launch (varlen,
// causal, K/V decompressed from the latent), and the row scatter the absorbed rows of a mixed
// step are put back with. Two implementations of the attention: mma.sync (mla_prefill_m128_bf16,
// mla_prefill_m64_bf16, described first) and warpgroup MMA (mla_prefill_wgmma_bf16, the default,
// described at its own code below).
//
// Shapes (DeepSeek-V2 dims, fixed at compile time; the launcher sends other dims elsewhere):
//   q      [n, H, 192]  128 nope + 64 rope (RoPE applied), any row / head stride (multiples of 8)
//   k_nope [T, H, 128]  the first 128 of each head of the decompressed kv [T, H, 256]
//   k_pe   [T, 64]      the rotated rope key, shared by all heads (latent columns 512..576)
//   v      [T, H, 128]  the last 128 of each head of kv
//   out    [n, H, 128]
// T counts the context rows of all sequences, gathered one sequence after the other. Sequence s
// (an int4 descriptor: q_row0, q_len, pos0, ctx_row0) owns query rows q_row0 .. q_row0+q_len-1 at
// positions pos0 .. pos0+q_len-1 and context rows ctx_row0 .. ctx_row0+pos0+q_len-1 (position p at
// row ctx_row0 + p). Query i sees positions 0 ..= pos0 + i:
//   out[q_row0+i, h] = sum_{p <= pos0+i} softmax_p(scale * q[i,h]·[k_nope[p,h] | k_pe[p]]) v[p,h]
//
// Tiling (flash-attention 2): a CTA owns BM = 16 * WARPS query rows of one sequence and one head;
// the grid is (query tiles of all sequences, heads), the tile list (int2: sequence, first query)
// built on the host with no tile past a sequence's end and the longest causal windows first (the
// x dimension is dispatched first, so one head's tiles run side by side and share its K/V in L2).
// Warp w owns query rows 16w .. 16w+15 of the tile. Per 64-key tile of the context:
//   S[16 x 64]  = Q[16 x 192] · K[64 x 192]^T    12 k-steps x 8 n-tiles of mma m16n8k16
//   online softmax on S in registers (row max / sum across the 4 lanes of a quad), f32, exp2
//   O[16 x 128] = O * alpha + P[16 x 64] · V[64 x 128]   4 k-steps x 16 n-tiles
// The K/V tiles are double-buffered in shared memory with cp.async: tile j+1 is in flight while
// tile j is computed. Q is loaded into shared memory once and kept in registers as A fragments
// (48 registers) for the whole loop. Key tiles that lie past all of a warp's rows are skipped by
// that warp; the causal mask is applied only in tiles that reach past the warp's first row. A
// warp whose rows all lie past the sequence's end only helps load.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16; g = lane / 4, t = lane % 4):
//   A 16x16 row-major: a0 (row g, k 2t..2t+1), a1 (row g+8, same k), a2 (row g, k 2t+8..),
//     a3 (row g+8, k 2t+8..). ldmatrix.x4 with lane l addressing row l % 16, k-chunk l / 16
//     gives exactly a0..a3 (matrices: rows 0-7/k 0-7, rows 8-15/k 0-7, rows 0-7/k 8-15, ...).
//   B 16x8 "col" (k x n, n-major = a [n][k] tile with k contiguous, which is how K sits in smem):
//     b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g). ldmatrix.x4 (no .trans) with lane l addressing
//     n-row (l / 16) * 8 + l % 8, k-chunk (l / 8) % 2 gives b0, b1 of n-tile 0 and b0, b1 of n-tile 1.
//   V sits [key][dv] (dv contiguous) = k-major B, so P·V loads it with ldmatrix.x4.trans: lane l
//     addresses key row l % 8 + ((l / 8) % 2) * 8, dv-chunk l / 16; the transpose hands thread
//     (g, t) the elements (key 2t..2t+1, dv g) = b0 (then b1 for keys +8) of two dv n-tiles.
//   C 16x8: c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8). The S accumulators of n-tiles 2j,
//     2j+1 are, once rounded to bf16 pairs, the A fragment of P for k-step j (keys 16j .. 16j+15):
//     a0 = S[2j].c0c1, a1 = S[2j].c2c3, a2 = S[2j+1].c0c1, a3 = S[2j+1].c2c3 (no shuffles).
// Shared memory rows are 384 B (Q, K: 24 chunks of 16 B) or 256 B (V: 16 chunks); both are
// multiples of 128 B, so the 8 rows one ldmatrix phase reads would all hit the same banks. The
// 16-byte chunk c of row r is therefore stored at chunk c ^ (r % 8) (XOR swizzle inside each
// aligned group of 8 chunks): 8 consecutive rows at one logical chunk land in 8 distinct bank
// groups, for the cp.async writes and every ldmatrix read alike.
#include "common.cuh"
#include "mla_prefill.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

#define PF_BN 64               // keys per tile
#define PF_QCH (PF_DQK / 8)    // 16-byte chunks per Q / K row (24)
#define PF_VCH (PF_DV / 8)     // per V row (16)
// Q's A fragments stay in registers across the key loop (243 registers, no spill with the tile
// loaders kept rolled); 0 re-reads them from shared memory every k-step (201 registers).
#ifndef PF_Q_REGS
#define PF_Q_REGS 1
#endif

// Offset in bf16 elements of 16-byte chunk `ch` of row `r` in a swizzled tile of `chunks` per row.
__device__ __forceinline__ int pf_swz(int r, int ch, int chunks) { return (r * chunks + (ch ^ (r & 7))) * 8; }

// Shared memory of one CTA, in bytes (must match PREFILL_SMEM in ops/mla_prefill.rs).
template <int WARPS>
struct PfSmem {
    static constexpr int BM = 16 * WARPS;
    static constexpr int Q = BM * PF_DQK;      // bf16 elements
    static constexpr int K = PF_BN * PF_DQK;   // per stage
    static constexpr int V = PF_BN * PF_DV;    // per stage
    static constexpr int BYTES = (Q + 2 * K + 2 * V) * 2;
};

template <int WARPS>
__device__ __forceinline__ void pf_load_kv(bf16* sK, bf16* sV, const bf16* __restrict__ k_nope, long long kn_rs,
                                           long long kn_hs, const bf16* __restrict__ k_pe, long long kp_rs,
                                           const bf16* __restrict__ v, long long v_rs, long long v_hs, int h,
                                           long long row0, int k0, int n_keys) {
    constexpr int NT = WARPS * 32;
    // rolled loops: unrolled, their hoisted addresses pushed the kernel into spills
#pragma unroll 1
    for (int c = threadIdx.x; c < PF_BN * PF_QCH; c += NT) {
        int r = c / PF_QCH, ch = c % PF_QCH;
        bool valid = k0 + r < n_keys;
        const bf16* src = k_nope;  // not read when !valid (zero fill)
        if (valid) {
            long long row = row0 + k0 + r;
            src = ch < PF_DN / 8 ? k_nope + row * kn_rs + h * kn_hs + ch * 8 : k_pe + row * kp_rs + (ch - PF_DN / 8) * 8;
        }
        cp_async16(sK + pf_swz(r, ch, PF_QCH), src, valid);
    }
#pragma unroll 1
    for (int c = threadIdx.x; c < PF_BN * PF_VCH; c += NT) {
        int r = c / PF_VCH, ch = c % PF_VCH;
        bool valid = k0 + r < n_keys;
        const bf16* src = v;
        if (valid) src = v + (row0 + k0 + r) * v_rs + h * v_hs + ch * 8;
        cp_async16(sV + pf_swz(r, ch, PF_VCH), src, valid);
    }
}


// grid (tiles, H), block WARPS * 32 threads, dynamic smem PfSmem<WARPS>::BYTES.
// seqs int4 [S] (q_row0, q_len, pos0, ctx_row0); tiles int2 [tiles] (sequence, first query of the
// tile). Strides are in elements. n_q / n_ctx are the rows of q and out / of the context
// operands: a tile whose sequence does not fit them is skipped.
template <int WARPS>
__device__ __forceinline__ void mla_prefill_body(const bf16* __restrict__ q, long long q_rs, long long q_hs,
                                                 const bf16* __restrict__ k_nope, long long kn_rs, long long kn_hs,
                                                 const bf16* __restrict__ k_pe, long long kp_rs,
                                                 const bf16* __restrict__ v, long long v_rs, long long v_hs,
                                                 bf16* __restrict__ out, long long o_rs, long long o_hs,
                                                 const int4* __restrict__ seqs, int n_seqs,
                                                 const int2* __restrict__ tiles, long long n_q, long long n_ctx,
                                                 float scale) {
    using SM = PfSmem<WARPS>;
    constexpr int BM = SM::BM, NT = WARPS * 32;
    extern __shared__ __align__(128) unsigned char pf_smem[];
    bf16* sQ = reinterpret_cast<bf16*>(pf_smem);
    bf16* sK = sQ + SM::Q;       // 2 stages
    bf16* sV = sK + 2 * SM::K;   // 2 stages

    const int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
    const int h = blockIdx.y;
    PfTile pt;
    if (!pf_tile(seqs, n_seqs, tiles, n_q, n_ctx, blockIdx.x, pt)) return;
    const int q_row0 = pt.q_row0, q_len = pt.q_len, pos0 = pt.pos0, m0 = pt.m0;
    const long long ctx_row0 = pt.ctx_row0;
    // keys this CTA needs: up to the position of its last valid query (inclusive)
    const int n_keys = pos0 + min(m0 + BM, q_len);
    const int n_kt = (n_keys + PF_BN - 1) / PF_BN;
    const int wq0 = m0 + 16 * warp;               // first query (index in the sequence) of this warp
    const bool active = wq0 < q_len;
    const int w_last = pos0 + min(wq0 + 15, q_len - 1);  // last key any row of this warp sees
    const float sl2 = scale * 1.4426950408889634f;       // softmax in exp2 with the scale folded in
    const int g = lane / 4, t = lane % 4;

    // Q tile (rows past q_len are zero) and K/V tile 0: cp.async group 0
    for (int c = tid; c < BM * PF_QCH; c += NT) {
        int r = c / PF_QCH, ch = c % PF_QCH;
        bool valid = m0 + r < q_len;
        const bf16* src = q;
        if (valid) src = q + (long long)(q_row0 + m0 + r) * q_rs + h * q_hs + ch * 8;
        cp_async16(sQ + pf_swz(r, ch, PF_QCH), src, valid);
    }
    pf_load_kv<WARPS>(sK, sV, k_nope, kn_rs, kn_hs, k_pe, kp_rs, v, v_rs, v_hs, h, ctx_row0, 0, n_keys);
    cp_async_commit();

    float o[PF_DV / 8][4];
#pragma unroll
    for (int d = 0; d < PF_DV / 8; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[d][e] = 0.f;
    float m_r[2] = {-INFINITY, -INFINITY};  // running max (scaled, log2 units) of rows g, g+8
    float l_r[2] = {0.f, 0.f};              // this thread's share of the running sums
#if PF_Q_REGS
    u32 qf[PF_DQK / 16][4];
#endif

    // the swizzle XOR term: every ldmatrix below addresses rows whose r % 8 == lane % 8
    const int l7 = lane & 7;
    const int q_row = 16 * warp + (lane & 15), q_ch = lane >> 4;               // A (Q)
    const int k_row = ((lane >> 4) << 3) + l7, k_ch = (lane >> 3) & 1;        // B (K)
    const int v_row = l7 + (((lane >> 3) & 1) << 3), v_ch = lane >> 4;        // B (V, .trans)

    for (int kt = 0; kt < n_kt; ++kt) {
        const int st = kt & 1;
        if (kt + 1 < n_kt)
            pf_load_kv<WARPS>(sK + (st ^ 1) * SM::K, sV + (st ^ 1) * SM::V, k_nope, kn_rs, kn_hs, k_pe, kp_rs, v,
                              v_rs, v_hs, h, ctx_row0, (kt + 1) * PF_BN, n_keys);
        cp_async_commit();  // possibly empty: keeps "all but the newest group" = tile kt
        cp_async_wait<1>();
        __syncthreads();
#if PF_Q_REGS
        if (kt == 0 && active) {
#pragma unroll
            for (int ks = 0; ks < PF_DQK / 16; ++ks)
                ldsm_x4(qf[ks], sQ + q_row * PF_QCH * 8 + (((2 * ks + q_ch) ^ l7) << 3));
        }
#endif
        const int k0 = kt * PF_BN;
        if (active && k0 <= w_last) {
            const bf16* kS = sK + st * SM::K;
            const bf16* vS = sV + st * SM::V;
            float s[PF_BN / 8][4];
#pragma unroll
            for (int j = 0; j < PF_BN / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
            // ---- S = Q K^T
#pragma unroll
            for (int ks = 0; ks < PF_DQK / 16; ++ks) {
#if PF_Q_REGS
                const u32* qa = qf[ks];
#else
                u32 qa[4];
                ldsm_x4(qa, sQ + q_row * PF_QCH * 8 + (((2 * ks + q_ch) ^ l7) << 3));
#endif
#pragma unroll
                for (int np = 0; np < PF_BN / 16; ++np) {
                    u32 b[4];
                    ldsm_x4(b, kS + (np * 16 + k_row) * PF_QCH * 8 + (((2 * ks + k_ch) ^ l7) << 3));
                    mma_bf16(s[2 * np], qa, b);
                    mma_bf16(s[2 * np + 1], qa, b + 2);
                }
            }
            // ---- causal mask, only where the tile reaches past the warp's first row
            if (k0 + PF_BN - 1 > pos0 + wq0) {
#pragma unroll
                for (int j = 0; j < PF_BN / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        int key = k0 + j * 8 + 2 * t + (e & 1);
                        int lim = pos0 + wq0 + g + (e >> 1) * 8;
                        if (key > lim) s[j][e] = -INFINITY;
                    }
            }
            // ---- online softmax (rows g: e = 0,1; g+8: e = 2,3)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                float mx = -INFINITY;
#pragma unroll
                for (int j = 0; j < PF_BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * hf], s[j][2 * hf + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                float m_new = fmaxf(m_r[hf], mx * sl2);
                // key 0 is in tile 0 and visible to every row, so m_new is finite; the guard keeps
                // a fully masked row at zeros instead of NaN should that ever change
                float m_use = m_new == -INFINITY ? 0.f : m_new;
                float alpha = exp2f(m_r[hf] - m_use);  // 0 on the first tile (m_r = -inf)
                float sum = 0.f;
#pragma unroll
                for (int j = 0; j < PF_BN / 8; ++j) {
                    float p0 = exp2f(s[j][2 * hf] * sl2 - m_use);
                    float p1 = exp2f(s[j][2 * hf + 1] * sl2 - m_use);
                    s[j][2 * hf] = p0;
                    s[j][2 * hf + 1] = p1;
                    sum += p0 + p1;
                }
                l_r[hf] = l_r[hf] * alpha + sum;
                m_r[hf] = m_new;
#pragma unroll
                for (int d = 0; d < PF_DV / 8; ++d) {
                    o[d][2 * hf] *= alpha;
                    o[d][2 * hf + 1] *= alpha;
                }
            }
            // ---- O += P V
#pragma unroll
            for (int ks = 0; ks < PF_BN / 16; ++ks) {
                u32 a[4];
                a[0] = pf_pack(s[2 * ks][0], s[2 * ks][1]);
                a[1] = pf_pack(s[2 * ks][2], s[2 * ks][3]);
                a[2] = pf_pack(s[2 * ks + 1][0], s[2 * ks + 1][1]);
                a[3] = pf_pack(s[2 * ks + 1][2], s[2 * ks + 1][3]);
#pragma unroll
                for (int dp = 0; dp < PF_DV / 16; ++dp) {
                    u32 b[4];
                    ldsm_x4_t(b, vS + (ks * 16 + v_row) * PF_VCH * 8 + (((2 * dp + v_ch) ^ l7) << 3));
                    mma_bf16(o[2 * dp], a, b);
                    mma_bf16(o[2 * dp + 1], a, b + 2);
                }
            }
        }
        __syncthreads();  // stage st is refilled by the load issued in the next iteration
    }
    cp_async_wait<0>();

    // ---- normalise and store rows g, g+8 of the warp (quad-reduce the row sums first: every lane
    // takes part in the shuffles)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float l = l_r[hf];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        int qi = wq0 + g + 8 * hf;
        if (!active || qi >= q_len) continue;
        float inv = l > 0.f ? 1.f / l : 0.f;
        bf16* dst = out + (long long)(q_row0 + qi) * o_rs + h * o_hs + 2 * t;
#pragma unroll
        for (int d = 0; d < PF_DV / 8; ++d)
            *reinterpret_cast<__nv_bfloat162*>(dst + d * 8) =
                __floats2bfloat162_rn(o[d][2 * hf] * inv, o[d][2 * hf + 1] * inv);
    }
}

// Two tile heights: 128 query rows (8 warps, 128 KiB of smem, one CTA per SM: K/V tiles shared by
// more rows) and 64 (4 warps, 104 KiB, two CTAs per SM: less padding on short sequences).
#define PF_ARGS                                                                                                     \
    const bf16 *__restrict__ q, long long q_rs, long long q_hs, const bf16 *__restrict__ k_nope, long long kn_rs,  \
        long long kn_hs, const bf16 *__restrict__ k_pe, long long kp_rs, const bf16 *__restrict__ v, long long v_rs, \
        long long v_hs, bf16 *__restrict__ out, long long o_rs, long long o_hs, const int4 *__restrict__ seqs,     \
        int n_seqs, const int2 *__restrict__ tiles, long long n_q, long long n_ctx, float scale
#define PF_PASS \
    q, q_rs, q_hs, k_nope, kn_rs, kn_hs, k_pe, kp_rs, v, v_rs, v_hs, out, o_rs, o_hs, seqs, n_seqs, tiles, n_q, n_ctx, scale

extern "C" __global__ void __launch_bounds__(256, 1) mla_prefill_m128_bf16(PF_ARGS) {
    griddep_wait();
    mla_prefill_body<8>(PF_PASS);
}
extern "C" __global__ void __launch_bounds__(128, 2) mla_prefill_m64_bf16(PF_ARGS) {
    griddep_wait();
    mla_prefill_body<4>(PF_PASS);
}

// ---------------------------------------------------------------------------------------------
// mla_prefill_wgmma_bf16: the same function on Hopper's warpgroup MMA (sm_90a), flash-attention-3
// style. Same arguments, descriptors, tile list and bounds checks as the kernels above; a tile
// of the list is 128 query rows (PrefillTile::Wgmma128).
//
// Why: mma.sync moves every operand through registers with ldmatrix (about one ldmatrix.x4 per
// two MMAs), which held the kernels above to 0.18-0.25 of the cuBLAS rate. wgmma reads both
// operands of Q.K^T and the V operand of P.V straight from shared memory, 64 rows x N per
// instruction, asynchronously: the warps are free for softmax and loads while it runs.
//
// CTA: 2 warpgroups (256 threads), one head, 128 query rows; warpgroup w owns rows
// m0 + 64w .. m0 + 64w + 63 (wgmma M = 64). Both share every 128-key K/V tile. Per key tile j:
//   S[64 x 128] = Q[64 x 192] . K_j[128 x 192]^T   12 x wgmma m64n128k16, A and B from smem,
//                                                  both K-major
//   online softmax on S in registers (f32, exp2, scale folded in), P = bf16(S) kept in registers
//   O[64 x 128] = O * alpha + P[64 x 128] . V_j[128 x 128]   8 x wgmma m64n128k16, A (P) from
//                                                  registers, B (V) from smem, MN-major
// P stays in registers (the "rs" form): the S accumulator of an m64nN wgmma, rounded to bf16
// pairs, is exactly the register A fragment of the next wgmma (see wgmma_m64n128_rs_tn), so P
// needs no shared-memory round trip, no proxy fence and no warpgroup barrier before P.V (the
// decode kernel, whose P is shared by two warpgroups, has to go through smem).
//
// Accumulator layout (wgmma m64nN, f32): thread t of the warpgroup (warp w = t / 32, lane l,
// g = l / 4, q = l % 4) holds rows r_lo = 16w + g and r_lo + 8, columns 8j + 2q and 8j + 2q + 1
// for j = 0 .. N/8 - 1, as d[4j + 0, 1] (row r_lo) and d[4j + 2, 3] (row r_lo + 8). Row max and
// row sum reduce over the 4 lanes of a quad (shfl xor 1, 2). P's A fragment for keys
// 16k .. 16k + 15 is p[4k + i] = bf16x2(s[8k + 2i], s[8k + 2i + 1]), i.e. p[i] = (s[2i], s[2i+1]).
//
// Shared memory (1024-aligned; the 128-byte swizzle is a function of address bits 4..9): every
// operand is stored as 64-column chunks of [128 rows x 128 B] (16 KiB); inside a chunk row r sits
// at r * 128 and its 16-byte piece c at piece c ^ (r % 8) (8-row groups 1024 B apart):
//   Q      3 chunks (cols 0-63, 64-127 nope, 128-191 rope)       48 KiB
//   K x 2  3 chunks per stage (k_nope 0-63, 64-127, k_pe)        96 KiB
//   V x 2  2 chunks per stage (dv 0-63, 64-127)                  64 KiB    total 208 KiB + 1 KiB
// Descriptors (wg_desc(addr, LBO, SBO), 128-byte swizzle):
//   Q (A, K-major): addr = Q + (ks / 4) * 16K + 64w * 128 + (ks % 4) * 32 for k-step ks (16
//     columns = 32 bytes inside the 128-byte row), LBO 16 (unused with K-major swizzle), SBO 1024
//     (next 8 rows). As grouped.cu's K-major operands and the decode kernel's Q.
//   K (B, K-major, N = keys): addr = K_stage + (ks / 4) * 16K + (ks % 4) * 32, LBO 16, SBO 1024.
//   V (B, MN-major, N = dv, K = keys): addr = V_stage + kk * 16 * 128 for keys 16kk .., LBO = 16K
//     (from dv 0-63 to dv 64-127: the next chunk), SBO = 1024 (next 8 keys). As the decode
//     kernel's V (LBO = chunk stride, SBO = 1024), which ran correctly.
// Loads: cp.async (16 B, src-size 0 zero-fills keys past the CTA's last key and queries past
// q_len); 8 consecutive threads copy the 128 contiguous bytes of one row chunk.
//
// Pipeline (epoch j = the j-th CTA barrier; FA3's intra-warpgroup overlap):
//   wait own cp.async, fence.proxy.async, __syncthreads  -> K_j and V_{j-1} visible; every
//       warpgroup finished Q.K_{j-1} and P.V_{j-2}, so K stage (j+1)%2 and V stage j%2 are free
//   issue S_j = Q.K_j (commit), issue O += P_{j-1}.V_{j-1} (commit)
//   issue the cp.async of K_{j+1} and V_j while the tensor cores work
//   wgmma wait 1 (S_j done), mask + softmax of S_j   <- overlaps P_{j-1}.V_{j-1} on the tensor core
//   wgmma wait 0, O *= alpha_j, P_j = bf16(S_j)
// then epoch n_wt (the warpgroup's tile count) issues only the last P.V, and epochs n_wt + 1 ..
// n_kt only load and pass the barrier (for the other warpgroup's later tiles): each warpgroup
// passes n_kt + 1 barriers. V lags K by one tile so that the V stage refilled at epoch j was last
// read by P.V_{j-2}, finished before the barrier. Why the pipeline is not the more compact
// "for j <= n_kt, if (j < n_wt) ..." loop: ptxas serializes every wgmma of the kernel (C7511,
// C7515, C7520 in its -v output) when Q.K sits under a condition in the loop that holds the
// softmax, when two wgmma shapes write the same accumulator registers, or when a wgmma's
// condition is not provably warp-uniform (hence the warpgroup index through a shuffle, and the
// 64-key last tile peeled out of the loop with an accumulator of its own).
// Causal work: a warpgroup computes key tiles 0 .. (its last row's position) / 128 only; in its
// last tile, when keys k0 + 64 .. lie past all its rows, Q.K runs as m64n64 and P.V over 64 keys
// (so a 128-key tile wastes no more than a 64-key one on the diagonal). The mask is applied only in
// tiles reaching past the warpgroup's first row; keys past the CTA's last key (zero-filled) are
// always in such a tile and masked there.
// Registers: O 64 + S 64 (+ 32 for the 64-key tile) + P 32 per thread: 216, no spills; one CTA
// (256 threads, up to 255 registers, 209 KiB of smem) per SM. ptxas still injects a few
// warpgroup.arrive (C7519, an extra fence) around the P.V that is cut short in the 64-key tile.

#define PW_BM 128                      // query rows per CTA
#define PW_BN 128                      // keys per tile
#define PW_CH PF_WCH                   // one 64-column chunk of a 128-row operand, bytes
#define PW_KST (3 * PW_CH)             // one K stage
#define PW_VST (2 * PW_CH)             // one V stage
#define PW_OFF_K PW_KST                // Q occupies the first 3 chunks
#define PW_OFF_V (PW_OFF_K + 2 * PW_KST)
#define PW_BYTES (PW_OFF_V + 2 * PW_VST)  // 212992; the launcher adds 1024 for the alignment
#define PW_DV_N8 (PF_DV / 8)            // n8 column blocks of the O accumulator

template <int N>
struct PwCols {
    static constexpr int n = N;
};

// Barrier of the 128 threads of warpgroup wg alone (ids 1, 2; 0 is __syncthreads).
__device__ __forceinline__ void pw_bar_sync_wg(int wg) {
    if (wg == 0)
        asm volatile("bar.sync 1, 128;\n" ::: "memory");
    else
        asm volatile("bar.sync 2, 128;\n" ::: "memory");
}

// K tile (keys k0 .. k0 + 127 of the sequence) into one K stage: thread tid copies piece tid % 8
// of rows tid / 8 + 32i of the three chunks.
__device__ __forceinline__ void pw_load_k(unsigned char* dst, const bf16* __restrict__ k_nope, long long kn_rs,
                                          long long kn_hs, const bf16* __restrict__ k_pe, long long kp_rs, int h,
                                          long long row0, int k0, int n_keys) {
    const int lr = threadIdx.x >> 3, pc = threadIdx.x & 7;
    unsigned char* d = dst + lr * 128 + ((pc ^ (lr & 7)) << 4);
#pragma unroll
    for (int i = 0; i < PW_BN / 32; ++i) {
        const int key = k0 + lr + 32 * i;
        const bool valid = key < n_keys;
        const bf16* sn = k_nope;  // not read when !valid (zero fill)
        const bf16* sp = k_pe;
        if (valid) {
            const long long row = row0 + key;
            sn = k_nope + row * kn_rs + h * kn_hs + pc * 8;
            sp = k_pe + row * kp_rs + pc * 8;
        }
        cp_async16(d + i * 32 * 128, sn, valid);
        cp_async16(d + i * 32 * 128 + PW_CH, valid ? sn + 64 : sn, valid);
        cp_async16(d + i * 32 * 128 + 2 * PW_CH, sp, valid);
    }
}

// V tile (keys k0 .. k0 + 127) into one V stage, same thread mapping, two chunks.
__device__ __forceinline__ void pw_load_v(unsigned char* dst, const bf16* __restrict__ v, long long v_rs,
                                          long long v_hs, int h, long long row0, int k0, int n_keys) {
    const int lr = threadIdx.x >> 3, pc = threadIdx.x & 7;
    unsigned char* d = dst + lr * 128 + ((pc ^ (lr & 7)) << 4);
#pragma unroll
    for (int i = 0; i < PW_BN / 32; ++i) {
        const int key = k0 + lr + 32 * i;
        const bool valid = key < n_keys;
        const bf16* sv = v;
        if (valid) sv = v + (row0 + key) * v_rs + h * v_hs + pc * 8;
        cp_async16(d + i * 32 * 128, sv, valid);
        cp_async16(d + i * 32 * 128 + PW_CH, valid ? sv + 64 : sv, valid);
    }
}

// Q (rows past q_len zero) of the tile into sQ and its K_0 into K stage 0 (the caller commits).
__device__ __forceinline__ void pw_load_q_k0(unsigned char* sQ, unsigned char* sK, const bf16* __restrict__ q,
                                             long long q_rs, long long q_hs, const bf16* __restrict__ k_nope,
                                             long long kn_rs, long long kn_hs, const bf16* __restrict__ k_pe,
                                             long long kp_rs, int h, const PfTile& pt) {
    const int tid = threadIdx.x;
    const int lr = tid >> 3, pc = tid & 7;
    unsigned char* d = sQ + lr * 128 + ((pc ^ (lr & 7)) << 4);
#pragma unroll
    for (int i = 0; i < PW_BM / 32; ++i) {
        const int r = lr + 32 * i;
        const bool valid = pt.m0 + r < pt.q_len;
        const bf16* src = q;
        if (valid) src = q + (long long)(pt.q_row0 + pt.m0 + r) * q_rs + h * q_hs + pc * 8;
#pragma unroll
        for (int c = 0; c < 3; ++c) cp_async16(d + i * 32 * 128 + c * PW_CH, valid ? src + 64 * c : src, valid);
    }
    const int n_keys = pt.pos0 + min(pt.m0 + PW_BM, pt.q_len);
    pw_load_k(sK, k_nope, kn_rs, kn_hs, k_pe, kp_rs, h, pt.ctx_row0, 0, n_keys);
}

// Work item `item` of a persistent launch: tile item % n_tiles of the list, head item / n_tiles
// (tiles of one head side by side, as the grid of the one-tile launch orders them); false past
// the last item or for a descriptor that does not fit.
__device__ __forceinline__ bool pw_item(const int4* __restrict__ seqs, int n_seqs, const int2* __restrict__ tiles,
                                        long long n_q, long long n_ctx, int n_tiles, int n_items, int item,
                                        PfTile& pt, int& h) {
    if (item >= n_items) return false;
    h = item / n_tiles;
    return pf_tile(seqs, n_seqs, tiles, n_q, n_ctx, item % n_tiles, pt);
}

// The body of both wgmma prefill kernels. PERSIST = false: one (tile, head) a CTA, from the
// grid. PERSIST = true (mla_prefill_wgmma_persist_bf16): a CTA walks items blockIdx.x,
// blockIdx.x + gridDim.x, .. of the n_tiles x heads items, and the next item's Q and K_0 are
// loaded from the last epoch of the current one on (every warpgroup's Q.K is done there, so Q
// and the K stages are free), behind the current item's last P.V and its output.
// Why: at 64 x 512 a CTA computes 2.5 key tiles on average, and before the first it waits for
// Q and K_0 (96 KiB); with one CTA per SM nothing hides that wait: the flash kernel alone ran at
// 0.31 of the cuBLAS rate there against 0.56 at 1 x 4096, where a CTA computes 16.5 tiles
// (bench/RESULTS.md, session 6 run 4).
template <bool PERSIST>
__device__ __forceinline__ void pw_run(PF_ARGS, int n_tiles, int n_heads) {
    extern __shared__ __align__(1024) unsigned char pw_smem_raw[];
    unsigned char* smem =
        reinterpret_cast<unsigned char*>((reinterpret_cast<size_t>(pw_smem_raw) + 1023) & ~(size_t)1023);
    unsigned char* sQ = smem;
    unsigned char* sK = smem + PW_OFF_K;
    unsigned char* sV = smem + PW_OFF_V;

    // the warpgroup index through a shuffle: ptxas then knows it is warp-uniform, and a wgmma
    // under a condition it cannot prove uniform is serialized (C7520)
    const int tid = threadIdx.x, wg = __shfl_sync(0xffffffffu, tid >> 7, 0), wt = tid & 127, warp = wt >> 5,
              lane = tid & 31;
    const int n_items = PERSIST ? n_tiles * n_heads : 1;
    int item = PERSIST ? (int)blockIdx.x : 0;
    int h = blockIdx.y;
    PfTile pt;
    if (PERSIST) {
        // the first valid item of this CTA
        while (item < n_items && !pw_item(seqs, n_seqs, tiles, n_q, n_ctx, n_tiles, n_items, item, pt, h))
            item += gridDim.x;
        if (item >= n_items) return;
    } else if (!pf_tile(seqs, n_seqs, tiles, n_q, n_ctx, blockIdx.x, pt)) {
        return;
    }
    // Q and K_0 of the first item: cp.async group 0
    pw_load_q_k0(sQ, sK, q, q_rs, q_hs, k_nope, kn_rs, kn_hs, k_pe, kp_rs, h, pt);
    cp_async_commit();

    const float sl2 = scale * 1.4426950408889634f;
    const int g = lane >> 2, cq = 2 * (lane & 3);
    const int r_lo = 16 * warp + g;  // accumulator rows r_lo, r_lo + 8 of the warpgroup's 64
    const u32 q_addr = (u32)__cvta_generic_to_shared(sQ) + wg * 64 * 128;
    const u32 k_addr = (u32)__cvta_generic_to_shared(sK);
    const u32 v_addr = (u32)__cvta_generic_to_shared(sV);

    while (true) {
        const int q_row0 = pt.q_row0, q_len = pt.q_len, pos0 = pt.pos0, m0 = pt.m0;
        const long long ctx_row0 = pt.ctx_row0;
        const int n_keys = pos0 + min(m0 + PW_BM, q_len);  // keys the CTA needs
        const int n_kt = (n_keys + PW_BN - 1) / PW_BN;
        const PwRows rows = pw_rows(m0, q_len, pos0, wg);
        const int wq0 = rows.wq0, n_wt = rows.n_wt;  // first query of this warpgroup, its key tiles
        // the next item (PERSIST): its Q and K_0 are loaded in this item's last epoch
        PfTile nt;
        int next = item + gridDim.x, nh = 0;
        if (PERSIST) {
            while (next < n_items && !pw_item(seqs, n_seqs, tiles, n_q, n_ctx, n_tiles, n_items, next, nt, nh))
                next += gridDim.x;
        }
        const bool has_next = PERSIST && next < n_items;

        float o[64], s[64], s2[32];  // s2: S of the 64-key last tile
        u32 p[32];
        pw_zero(o, s, s2, p);
        float m_r[2] = {-INFINITY, -INFINITY};  // running max (scaled, log2 units) of rows r_lo, r_lo+8
        float l_r[2] = {0.f, 0.f};              // this thread's share of the running sums

        // the cp.async of epoch j (after the j-th barrier): K_{j+1} and V_j, into stages that every
        // warpgroup finished reading before that barrier; in the last epoch (j = n_kt) the next
        // item's Q and K_0 (no Q.K of this item is left, and the output is staged in K stage 1)
        auto load_epoch = [&](int j) {
            if (j + 1 < n_kt)
                pw_load_k(sK + ((j + 1) & 1) * PW_KST, k_nope, kn_rs, kn_hs, k_pe, kp_rs, h, ctx_row0, (j + 1) * PW_BN,
                          n_keys);
            if (j < n_kt) pw_load_v(sV + (j & 1) * PW_VST, v, v_rs, v_hs, h, ctx_row0, j * PW_BN, n_keys);
            if (has_next && j == n_kt) pw_load_q_k0(sQ, sK, q, q_rs, q_hs, k_nope, kn_rs, kn_hs, k_pe, kp_rs, nh, nt);
            cp_async_commit();
        };
        auto barrier = [&]() {
            cp_async_wait<0>();
            fence_async_smem();
            __syncthreads();
        };
        // O += P_jp . V_jp, over the first 64 keys only when `phalf` (the warpgroup's 64-key last
        // tile; the P.V of every other tile runs inside the loop, unconditionally over 128 keys)
        auto issue_pv = [&](int jp, bool phalf) { pw_issue_pv(o, p, v_addr + (jp & 1) * PW_VST, phalf); };

        // Epoch j for this warpgroup: S_j = Q.K_j over N = 128 keys, or 64 in its last tile when
        // keys k0 + 64 .. lie past all of its rows; P_{j-1}.V_{j-1} issued behind it; the loads of
        // the epoch; softmax of S_j while P.V runs; then O *= alpha and P_j = bf16(S_j).
        auto step = [&](auto cols, int j) {
            constexpr int N = decltype(cols)::n;
            float* sa = N == 128 ? s : s2;
            barrier();
            const int k0 = j * PW_BN;
            // compiler pins first, then the hardware fence: every register write before it (softmax,
            // rescale, P) is ordered before the wgmma reads of the same registers
            wg_fence_regs<N / 2>(sa);
            wg_fence_regs<64>(o);
            wg_fence_regs<32>(p);
            wg_fence();
            pw_issue_qk<N>(sa, q_addr, k_addr + (j & 1) * PW_KST);
            wg_commit();
            if (j > 0) {
                wg_fence();
                issue_pv(j - 1, false);  // tile j - 1 is never this warpgroup's last
            }
            wg_commit();    // an empty group at j = 0 keeps the wait counts below the same
            load_epoch(j);  // issued while the tensor cores work

            wg_wait<1>();  // S_j done; P_{j-1}.V_{j-1} may still run
            wg_fence_regs<N / 2>(sa);
            // causal mask and online softmax, overlapping P_{j-1}.V_{j-1}
            float alpha[2];
            pw_mask_softmax<N>(sa, k0, pos0, wq0, r_lo, cq, sl2, m_r, l_r, alpha);
            wg_wait<0>();
            wg_fence_regs<64>(o);
            wg_fence_regs<32>(p);  // the old P stays live (its registers not reused) until here
            pw_rescale_pack<N>(o, p, sa, alpha);
        };

        // Every warpgroup passes n_kt + 1 barriers (epochs 0 .. n_kt) and issues its share of every
        // epoch's loads; it computes in epochs 0 .. n_wt. The 64-key last tile is peeled out of the
        // loop, and the idle epochs follow it: with Q.K issued under a condition (or as two shapes
        // into the same registers) inside the loop, ptxas serializes every wgmma (C7511 / C7515).
        const bool last_half = rows.last_half;
        const int n_full = rows.n_full;
        for (int j = 0; j < n_full; ++j) step(PwCols<128>{}, j);
        if (last_half) step(PwCols<64>{}, n_full);
        // epoch n_wt: the last P.V (V_{n_wt-1} arrived with this barrier)
        barrier();
        if (n_wt > 0) {
            wg_fence_regs<64>(o);
            wg_fence_regs<32>(p);
            wg_fence();
            issue_pv(n_wt - 1, last_half);
        }
        wg_commit();
        load_epoch(n_wt);
        wg_wait<0>();
        wg_fence_regs<64>(o);
        // epochs n_wt + 1 .. n_kt: loads and barriers only (the other warpgroup's later tiles)
        for (int j = n_wt + 1; j <= n_kt; ++j) {
            barrier();
            load_epoch(j);
        }
        if (!PERSIST) cp_async_wait<0>();  // (persistent: the next item's first barrier waits)
        // n_wt == 0: every row of this warpgroup lies past q_len (no barrier follows but the
        // warpgroup's own)
        if (n_wt > 0) {
            // ---- normalise, stage the warpgroup's 64 x 128 bf16 rows in the (now unused) K stage 1
            // (16-byte piece c of row r at c ^ (r % 8): conflict-free for these writes; stage 0 takes
            // the next item's K_0), then store 16 B per thread, rows past q_len skipped
            unsigned char* so = sK + PW_KST + wg * 64 * 256;
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                float l = l_r[hf];
                l += __shfl_xor_sync(0xffffffffu, l, 1);
                l += __shfl_xor_sync(0xffffffffu, l, 2);
                const float inv = l > 0.f ? 1.f / l : 0.f;
                const int r = r_lo + 8 * hf;
#pragma unroll
                for (int jj = 0; jj < PW_DV_N8; ++jj)
                    *reinterpret_cast<__nv_bfloat162*>(so + r * 256 + ((jj ^ (r & 7)) << 4) + cq * 2) =
                        __floats2bfloat162_rn(o[4 * jj + 2 * hf] * inv, o[4 * jj + 2 * hf + 1] * inv);
            }
            pw_bar_sync_wg(wg);
#pragma unroll
            for (int i = 0; i < 64 * 16 / 128; ++i) {
                const int idx = wt + 128 * i, r = idx >> 4, c = idx & 15;
                if (wq0 + r < q_len)
                    *reinterpret_cast<uint4*>(out + (long long)(q_row0 + wq0 + r) * o_rs + h * o_hs + c * 8) =
                        *reinterpret_cast<const uint4*>(so + r * 256 + ((c ^ (r & 7)) << 4));
            }
        }
        if (!has_next) break;
        item = next;
        h = nh;
        pt = nt;
    }
}

extern "C" __global__ void __launch_bounds__(256, 1) mla_prefill_wgmma_bf16(PF_ARGS) {
    griddep_wait();
    pw_run<false>(PF_PASS, 0, 0);
}

// Persistent: grid (min(n_tiles x heads, the CTAs resident at once)), 256 threads, the same
// shared memory; PF_ARGS, then the tile list's length and the head count.
extern "C" __global__ void __launch_bounds__(256, 1) mla_prefill_wgmma_persist_bf16(PF_ARGS, int n_tiles,
                                                                                   int n_heads) {
    griddep_wait();
    pw_run<true>(PF_PASS, n_tiles, n_heads);
}


// dst[idx[i], :] = src[i, :] for i < n; src [n, width], dst [rows, width] bf16, width a multiple of 8.
// One block per source row; indices outside [0, rows) are skipped.
extern "C" __global__ void scatter_rows_bf16(const bf16* __restrict__ src, const int* __restrict__ idx,
                                             bf16* __restrict__ dst, int n, int rows, int width) {
    griddep_wait();
    int i = blockIdx.x;
    if (i >= n) return;
    int r = idx[i];
    if (r < 0 || r >= rows) return;
    const bf16x8* s = reinterpret_cast<const bf16x8*>(src + (size_t)i * width);
    bf16x8* d = reinterpret_cast<bf16x8*>(dst + (size_t)r * width);
    for (int c = threadIdx.x; c < width / 8; c += blockDim.x) d[c] = s[c];
}
