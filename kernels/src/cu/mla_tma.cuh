// mla_tma.cuh: the pieces of the TMA-fed MLA decode kernels (mla_seesaw.cu, mla_tma.cu): issuing
// a cache tile's copies chunk by chunk, S = Q.K^T over a tile as chunks land, and the online
// softmax steps on the m64n64 accumulator layout. A cache tile is 64 tokens x 576 bf16 held as
// 9 column chunks of 64 (8 KiB each, 128-byte swizzled), each chunk with its own mbarrier.
#pragma once
#include "common.cuh"
#include "mla_common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#define MLA_CHUNK 8192 // one 64-column chunk of a 64-row operand (64 x 128 B)

// Issue the copies of chunks [c_lo, c_hi) of the tile of tokens [t0, t0 + 64) into the tile buffer
// `kbuf` (one thread). Rows come from cache blocks of `block_size` tokens: 64 % block_size == 0 or
// block_size % 64 == 0 (the launcher checks), so each piece of min(block_size, 64) rows is
// contiguous in the cache. Pieces at or past `end` are not loaded (their rows keep what they held:
// zeros or an earlier tile's finite values; softmax masks them); a tile wholly past `end` only
// arrives, so that its phase completes. A whole tile in consecutive blocks (tile_contiguous) is
// copied in one box of 64 rows a chunk through `map64` (the same tensor with 64-row boxes).
__device__ __forceinline__ void tile_issue(u32 kbuf, u32 bars, const TmaMap* map, const TmaMap* map64,
                                           const int* __restrict__ btab, int block_size, int t0, int end, int c_lo,
                                           int c_hi) {
    const int piece = min(block_size, 64);
    const int valid = t0 < end ? min(64, end - t0) : 0;
    const int pieces = (valid + piece - 1) / piece;
    const bool run = tile_contiguous(btab, block_size, t0, end);
    const int row0 = run ? btab[t0 / block_size] * block_size : 0;
    for (int c = c_lo; c < c_hi; ++c) {
        const u32 bar = bars + c * 8;
        if (pieces == 0) {
            mbar_arrive(bar);
            continue;
        }
        mbar_arrive_expect_tx(bar, (u32)(pieces * piece * 128));
        if (run) {
            tma_load_2d(kbuf + c * MLA_CHUNK, map64, c * 64, row0, bar);
            continue;
        }
        for (int j = 0; j < pieces; ++j) {
            const int t = t0 + j * piece;
            const int row = btab[t / block_size] * block_size + (t % block_size);
            tma_load_2d(kbuf + c * MLA_CHUNK + j * piece * 128, map, c * 64, row, bar);
        }
    }
}

// tile_issue for a cluster of two CTAs that read the same tiles (the two head groups of a sequence):
// each CTA announces all 9 chunks' bytes on its own barriers, and copies only its own chunks
// (rank 0: the rope chunk and 0..3; rank 1: 4..7), multicast to both CTAs. The rope chunk first.
__device__ __forceinline__ void tile_issue_pair(u32 kbuf, u32 bars, const TmaMap* map, const TmaMap* map64,
                                                const int* __restrict__ btab, int block_size, int t0, int end,
                                                u32 rank) {
    const int piece = min(block_size, 64);
    const int valid = t0 < end ? min(64, end - t0) : 0;
    const int pieces = (valid + piece - 1) / piece;
    const bool run = tile_contiguous(btab, block_size, t0, end);
    const int row0 = run ? btab[t0 / block_size] * block_size : 0;
    for (int k = 0; k < 9; ++k) {
        const int c = k == 0 ? 8 : k - 1;
        const u32 bar = bars + c * 8;
        if (pieces == 0) {
            mbar_arrive(bar);
            continue;
        }
        mbar_arrive_expect_tx(bar, (u32)(pieces * piece * 128));
        if ((c < 4 || c == 8) != (rank == 0)) continue;
        if (run) {
            tma_load_2d_multicast(kbuf + c * MLA_CHUNK, map64, c * 64, row0, bar, 0x3);
            continue;
        }
        for (int j = 0; j < pieces; ++j) {
            const int t = t0 + j * piece;
            const int row = btab[t / block_size] * block_size + (t % block_size);
            tma_load_2d_multicast(kbuf + c * MLA_CHUNK + j * piece * 128, map, c * 64, row, bar, 0x3);
        }
    }
}

// S[64 x 64] = Q . K^T over the 576 columns of the tile in `kbuf`, waiting for each chunk's copy.
// The rope chunk (8) goes first: it is reloaded earliest. rq: this thread's A fragments of Q's
// rope columns. Committed as one wgmma group (not waited for).
// wait = false (a timing probe only): the tile's copies are not waited for.
__device__ __forceinline__ void tile_qk(float* s, u32 q_addr, u32 kbuf, u32 bars, u32 parity, const u32* rq,
                                        bool wait = true) {
    if (wait) mbar_wait(bars + 8 * 8, parity);
    wg_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
        wgmma_m64n64_rs(s, rq + 4 * ks, wg_desc(kbuf + 8 * MLA_CHUNK + ks * 32, 16, 1024), ks > 0 ? 1 : 0);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        if (wait) mbar_wait(bars + c * 8, parity);
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
            const u32 off = c * MLA_CHUNK + ks * 32;
            wgmma_m64n64_ss(s, wg_desc(q_addr + off, 16, 1024), wg_desc(kbuf + off, 16, 1024), 1);
        }
    }
    wg_commit();
}

// P (bf16, rows r_lo and r_lo + 8 of this thread) into a swizzled 64 x 64 shared operand, times `mul`.
__device__ __forceinline__ void store_p_swz(unsigned char* sp, const float* p, int r_lo, int cq, float mul0, float mul1) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int hlf = 0; hlf < 2; ++hlf) {
            const float mul = hlf ? mul1 : mul0;
            *reinterpret_cast<__nv_bfloat162*>(sp + wg_swz(r_lo + 8 * hlf, 8 * j + cq)) =
                __floats2bfloat162_rn(p[4 * j + 2 * hlf] * mul, p[4 * j + 2 * hlf + 1] * mul);
        }
}

// Softmax numerators of one tile, in place: s (raw Q.K) -> exp2(s * sl2 - m_new) with columns at or
// past `end` masked; returns the row maxima of the masked, scaled scores (per half: rows r_lo, r_lo + 8).
__device__ __forceinline__ void tile_rowmax(float* s, int t0, int cq, int end, float sl2, float* mx) {
    mx[0] = mx[1] = -INFINITY;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int x = 0; x < 4; ++x) {
            const int t = t0 + 8 * j + cq + (x & 1);
            const float v = t < end ? s[4 * j + x] * sl2 : -INFINITY;
            s[4 * j + x] = v;
            mx[x >> 1] = fmaxf(mx[x >> 1], v);
        }
#pragma unroll
    for (int hlf = 0; hlf < 2; ++hlf) {
        mx[hlf] = fmaxf(mx[hlf], __shfl_xor_sync(0xffffffffu, mx[hlf], 1));
        mx[hlf] = fmaxf(mx[hlf], __shfl_xor_sync(0xffffffffu, mx[hlf], 2));
    }
}

// p = exp2(s - m) into s, the bf16 A fragments of P into pa, and the row sums of what P.V uses.
__device__ __forceinline__ void tile_exp(float* s, const float* m, u32* pa, float* sum) {
    sum[0] = sum[1] = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int hlf = 0; hlf < 2; ++hlf) {
            const float p0 = exp2f(s[4 * j + 2 * hlf] - m[hlf]);
            const float p1 = exp2f(s[4 * j + 2 * hlf + 1] - m[hlf]);
            const __nv_bfloat162 pb = __floats2bfloat162_rn(p0, p1);
            const float2 pf = __bfloat1622float2(pb);
            s[4 * j + 2 * hlf] = pf.x;
            s[4 * j + 2 * hlf + 1] = pf.y;
            sum[hlf] += pf.x + pf.y;
            pa[2 * j + hlf] = *reinterpret_cast<const u32*>(&pb);
        }
}

__device__ __forceinline__ void scale_o_rows(float* o, float a0, float a1) {
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        o[4 * j] *= a0;
        o[4 * j + 1] *= a0;
        o[4 * j + 2] *= a1;
        o[4 * j + 3] *= a1;
    }
}


// The CTA's part of the decode grid (ceil(H/64), B, splits): head group, sequence, split, and
// the split's tokens [start, end) of the sequence (end <= start: an empty split).
struct TmaPart {
    int hg, b, split, h0, start, end;
    const int* btab;  // the sequence's row of the block table
};
__device__ __forceinline__ TmaPart tma_part(const int* __restrict__ block_table, const int* __restrict__ seq_lens,
                                            int max_blocks, int splits) {
    TmaPart p;
    p.hg = blockIdx.x;
    p.b = blockIdx.y;
    p.split = blockIdx.z;
    p.h0 = p.hg * 64;
    const int len = seq_lens[p.b];
    const int per = split_tokens(len, splits, 64);
    p.start = p.split * per;
    p.end = min(len, p.start + per);
    p.btab = block_table + (size_t)p.b * max_blocks;
    return p;
}

// A CTA with no context (start >= end): an empty split marks itself for the combine; an empty
// sequence (a padding row, splits == 1) writes zeros, as the other decode kernels do.
__device__ __forceinline__ void tma_decode_empty(bf16* __restrict__ out, float* __restrict__ lse, int b, int split,
                                                 int splits, int heads, int h0) {
    if (splits > 1) {
        empty_split(lse, b, split, splits, heads, h0);
        return;
    }
    for (int i = threadIdx.x; i < 64 * (D_LAT / 8); i += blockDim.x) {
        const int h = h0 + i / (D_LAT / 8);
        if (h < heads) {
            bf16x8 z;
#pragma unroll
            for (int k = 0; k < 4; ++k) z.v[k] = __floats2bfloat162_rn(0.f, 0.f);
            *reinterpret_cast<bf16x8*>(out + ((size_t)b * heads + h) * D_LAT + (i % (D_LAT / 8)) * 8) = z;
        }
    }
}

// Q's latent columns 0..511 of heads h0 .. h0 + 63 into 8 swizzled chunks at `sq` (all threads).
__device__ __forceinline__ void load_q_latent_swz(unsigned char* sq, const bf16* __restrict__ q_abs,
                                                  const bf16* __restrict__ q_pe, int b, int h0, int heads,
                                                  long long qpe_sb, long long qpe_sh) {
    for (int i = threadIdx.x; i < 64 * (D_LAT / 8); i += blockDim.x) {
        const int r = i / (D_LAT / 8), col = (i % (D_LAT / 8)) * 8;
        *reinterpret_cast<bf16x8*>(sq + wg_swz(r, col)) = load_q8(q_abs, q_pe, b, h0 + r, heads, col, qpe_sb, qpe_sh);
    }
}

// Q's rope columns as this thread's wgmma A fragments (rows r_lo, r_lo + 8 of the warpgroup's
// m64 tile): k-step ks covers rope columns 16 ks .. 16 ks + 15.
__device__ __forceinline__ void load_q_rope_frags(u32* rq, const bf16* __restrict__ q_pe, int b, int h0, int heads,
                                                  long long qpe_sb, long long qpe_sh, int r_lo, int cq) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int h = h0 + r_lo + 8 * (i & 1);
            const int col = 16 * ks + cq + 8 * (i >> 1);
            rq[4 * ks + i] = h < heads ? *reinterpret_cast<const u32*>(q_pe + (size_t)b * qpe_sb + (size_t)h * qpe_sh + col) : 0u;
        }
}
