// mla_common.cuh: what the MLA decode kernels share: the query row loader, how a sequence's
// context is cut into splits, the empty-split marker, and the 128-byte-swizzled operand layout.
#pragma once
#include "common.cuh"

#define D_LAT 512
#define D_ROPE 64
#define D_QK 576

// Eight values of row (b, h) of the decode query [q_abs (512) | q_pe (64)] starting at column
// `col` (a multiple of 8); zeros for padding heads h >= heads. q_pe may be strided (see below).
__device__ __forceinline__ bf16x8 load_q8(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe, int b,
                                         int h, int heads, int col, long long qpe_sb, long long qpe_sh) {
    bf16x8 v;
    if (h < heads) {
        const bf16* src = col < D_LAT ? q_abs + ((size_t)b * heads + h) * D_LAT + col
                                      : q_pe + (size_t)b * qpe_sb + (size_t)h * qpe_sh + (col - D_LAT);
        v = *reinterpret_cast<const bf16x8*>(src);
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) v.v[i] = __floats2bfloat162_rn(0.f, 0.f);
    }
    return v;
}

// Context tokens of one split of a sequence of `len` tokens: the context is cut into `splits`
// equal runs of whole tiles from the sequence's own length (read on the device), so that splits
// stay balanced whatever the other sequences' lengths, and a launch does not depend on the host
// knowing the lengths (a captured CUDA graph replays it for every step).
__device__ __forceinline__ int split_tokens(int len, int splits, int tile) {
    const int per = (len + splits - 1) / splits;
    return max(tile, (per + tile - 1) / tile * tile);
}

// A split past the end of its sequence: only its log-sum-exp (-inf), which tells the combine to
// skip the split without reading its partial output.
__device__ __forceinline__ void empty_split(float* __restrict__ lse, int b, int split, int splits, int heads, int h0,
                                            int cta_heads = 64) {
    for (int r = threadIdx.x; r < cta_heads && h0 + r < heads; r += blockDim.x)
        lse[((size_t)b * splits + split) * heads + h0 + r] = -INFINITY;
}

// The canonical 128-byte-swizzled wgmma layout of a 64-row operand: 64-column chunks of 64 rows x
// 128 B (8 KiB), and inside every 8-row x 128 B block the 16-byte piece j of row r sits at piece
// j ^ (r % 8). The byte offset of element (row, col) of such an operand:
__device__ __forceinline__ u32 wg_swz(int row, int col) {
    int k = col & 63;
    return (u32)((col >> 6) * 8192 + row * 128 + ((((k >> 3) ^ (row & 7))) << 4) + ((k & 7) << 1));
}

// Byte offset of 16-byte piece `piece` (0..7) of row `row` inside such a chunk (wg_swz by pieces).
__device__ __forceinline__ u32 swz_piece(int row, int piece) { return (u32)(row * 128 + ((piece ^ (row & 7)) << 4)); }

// The decode kernels with the tokens on the MMA's M side (S^T = K.Q^T: mla_fp8_regs.cu,
// mla_narrow.cu) reduce each head's values down its column. In the m64nN accumulator layout a
// thread holds columns 8 j + 2 t + e (t = lane % 4) of rows g and g + 8 (g = lane / 4); its N
// column values v[2 j + e] are reduced here over the warp's 8 row groups (the lanes of equal
// t), then over the warps through shared memory: col_store puts the warp's values into `row`.
template <int N>
__device__ __forceinline__ void col_max_warp(float* v) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
        v[k] = fmaxf(v[k], __shfl_xor_sync(0xffffffffu, v[k], 4));
        v[k] = fmaxf(v[k], __shfl_xor_sync(0xffffffffu, v[k], 8));
        v[k] = fmaxf(v[k], __shfl_xor_sync(0xffffffffu, v[k], 16));
    }
}
template <int N>
__device__ __forceinline__ void col_sum_warp(float* v) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
        v[k] += __shfl_xor_sync(0xffffffffu, v[k], 4);
        v[k] += __shfl_xor_sync(0xffffffffu, v[k], 8);
        v[k] += __shfl_xor_sync(0xffffffffu, v[k], 16);
    }
}
template <int N>
__device__ __forceinline__ void col_store(float* row, const float* v) {
    const int lane = threadIdx.x % WARP;
    if (lane < 4) {
#pragma unroll
        for (int k = 0; k < N; ++k) row[8 * (k / 2) + 2 * lane + (k & 1)] = v[k];
    }
}

// The end of a two-warpgroup decode CTA (64 heads h0.., one context split): warpgroup wg holds
// output columns 256 wg .. 256 wg + 255 of rows r_lo and r_lo + 8 in `o` (the wgmma accumulator
// layout of m64n256) and its partial row sums over those columns in l_part; m[hlf] is the row
// maximum (log2 units of scale * q.k) of row r_lo + 8 hlf. Sums the rows over the quad and both
// warpgroups through red_l [2][64] (one __syncthreads), then writes normalised rows: bf16 `out`
// when splits == 1, else f32 partials and their log-sum-exp (natural log units) for the combine.
__device__ __forceinline__ void wg2_store_rows(const float* o, float* l_part, const float* m, float* red_l,
                                               bf16* __restrict__ out, float* __restrict__ o_part,
                                               float* __restrict__ lse, int b, int split, int splits, int heads,
                                               int h0, int wg, int r_lo, int cq) {
    const int lane = threadIdx.x % WARP;
#pragma unroll
    for (int hlf = 0; hlf < 2; ++hlf) {
        l_part[hlf] += __shfl_xor_sync(0xffffffffu, l_part[hlf], 1);
        l_part[hlf] += __shfl_xor_sync(0xffffffffu, l_part[hlf], 2);
    }
    if ((lane & 3) == 0) {
        red_l[wg * 64 + r_lo] = l_part[0];
        red_l[wg * 64 + r_lo + 8] = l_part[1];
    }
    __syncthreads();
#pragma unroll
    for (int hlf = 0; hlf < 2; ++hlf) {
        const int row = r_lo + 8 * hlf;
        const int h = h0 + row;
        if (h >= heads) continue;
        const float l = red_l[row] + red_l[64 + row];
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
            const int c = 256 * wg + 8 * j + cq;
            const float o0 = o[4 * j + 2 * hlf] * inv, o1 = o[4 * j + 2 * hlf + 1] * inv;
            if (splits == 1) {
                *reinterpret_cast<__nv_bfloat162*>(out + ((size_t)b * heads + h) * D_LAT + c) =
                    __floats2bfloat162_rn(o0, o1);
            } else {
                *reinterpret_cast<float2*>(o_part + (((size_t)b * splits + split) * heads + h) * D_LAT + c) =
                    make_float2(o0, o1);
            }
        }
        if (splits > 1 && wg == 0 && (lane & 3) == 0) {
            lse[((size_t)b * splits + split) * heads + h] =
                l > 0.f ? (m[hlf] + log2f(l)) * 0.6931471805599453f : -INFINITY;
        }
    }
}

// Whether the whole tile of tokens [t0, t0 + 64) (t0 a multiple of 64) lies in cache blocks of
// `block_size` (< 64) tokens that follow one another in the cache, so that the TMA kernels copy
// each of its chunks as one 64-row box (tile_issue in mla_tma.cuh, fr_issue in mla_fp8_regs.cu).
// Why: with the router's 16-token blocks a tile is otherwise four boxes of 16 rows a chunk, 36
// copies a tile, and the pair kernel fell from the best P1 kernel at 64-token blocks (0.507 of
// the roofline) to the worst at 16 (0.325, bench/RESULTS.md session 17 run 2). The block
// allocator hands a prompt's blocks out in order (kv_cache.rs: the free list pops ascending), so
// the tiles of a prefilled context are mostly contiguous; decode's later blocks interleave.
__device__ __forceinline__ bool tile_contiguous(const int* __restrict__ btab, int block_size, int t0, int end) {
    if (block_size >= 64 || end - t0 < 64) return false;
    const int first = t0 / block_size, n = 64 / block_size, b0 = btab[first];
    bool run = true;
    for (int j = 1; j < n; ++j) run = run && btab[first + j] == b0 + j;
    return run;
}
