// mla_narrow.cu: MLA decode over the bf16 latent cache for few query heads (DeepSeek-V2-Lite's
// 16): a CTA owns 16 heads of one sequence and one context split.
//
// Why: the other decode kernels put the heads on wgmma's M side (m64), so at 16 heads 48 of the
// 64 rows are padding, every CTA still holds two warpgroups and ~220 KiB of shared memory, and
// loads go through cp.async from the math warps. Inside the V2-Lite batch-256 decode step the
// wgmma kernel read the cache at 0.63 of the copy bandwidth (bench/RESULTS.md session 17 run 2),
// 12 % of the step. At 16 heads decode is bytes bound by far (2 x 16 x 1088 FLOP per 1152-byte
// token): what matters is keeping the copies in flight. Here the tokens are on M:
//   S^T[64 tokens x 16 heads] = K . Q^T        wgmma m64n16k16, A = the cache tile (K-major,
//                                              straight from the TMA stage), B = Q
//   O^T[512 latent x 16 heads] += V^T . P^T    8 m-blocks of m64n16k16, A = the same tile read
//                                              MN-major (transposed), B = P (heads x tokens)
// so a tile's math is 2.2 MFLOP of useful work with no padding and one warpgroup does it all,
// while one producer warp keeps two 72 KiB stages of TMA copies in flight (the 9 per-chunk
// mbarriers of mla_tma.cuh's tile_issue, S consuming chunks as they land).
//
// 160 threads: warps 0-3 the math warpgroup, warp 4 the producer (lane 0). No setmaxnreg: 160
// threads may use 255 registers each.
// Softmax runs down the columns of S^T: a head's 64 scores sit in rows (tokens) spread over the
// warpgroup's lanes (g = lane / 4 and the 4 warps), so the column maxima and sums reduce over
// shuffles (xor 4, 8, 16) and the 4 warps through shared memory. The O^T accumulator has the
// same columns (heads) per thread as S^T, so each thread rescales O with the alpha it computed.
#include "common.cuh"
#include "mla_common.cuh"
#include "mma.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "mla_tma.cuh"

#define NR_HEADS 16                        // heads a CTA
#define NR_TILE (9 * MLA_CHUNK)            // one stage: 64 tokens x 576 bf16 in 9 chunks
#define NR_STAGES 2
#define NR_QCH (NR_HEADS * 128)            // one 64-column chunk of Q: 16 rows x 128 B
#define NR_ST0 0
#define NR_Q (NR_ST0 + NR_STAGES * NR_TILE)       // Q: 9 chunks of 16 heads (2 KiB each)
#define NR_P (NR_Q + 9 * NR_QCH)                  // P: 16 heads x 64 tokens bf16, swizzled
#define NR_RED (NR_P + NR_QCH)                    // float [4 warps][16 heads]
#define NR_LM (NR_RED + 256)                      // float l[16], m[16] at the end
#define NR_BAR (NR_LM + 128)                      // u64 full[2][9], empty[2]
#define NR_BYTES (NR_BAR + (NR_STAGES * 9 + NR_STAGES) * 8)
#define NR_THREADS 160
#define NR_NB_MATH 1                              // named barrier of the 128 math threads

// m64n16k16 bf16 -> f32, both operands in shared memory; TRANS_A = 1: A MN-major (M contiguous,
// as the latent columns of a cache tile read as V^T).
template <int TRANS_A>
__device__ __forceinline__ void nr_wgmma_m64n16(float* d, u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "setp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, "
        "%11, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "l"(da), "l"(db), "r"(scale_d), "n"(TRANS_A));
}

// m64n16k16 bf16 -> f32 with A from registers (the mma.m16n8k16 A fragment of the warp's 16
// rows, as wgmma_m64n64_rs) and B K-major in shared memory.
__device__ __forceinline__ void nr_wgmma_m64n16_rs(float* d, const u32* a, u64 db) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, "
        "{%8, %9, %10, %11}, %12, 1, 1, 1, 0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

// Byte offset of (head, column) in the 16-row swizzled Q (9 chunks of 2 KiB).
__device__ __forceinline__ u32 nr_q_off(int h, int col) {
    const int k = col & 63;
    return (u32)((col >> 6) * NR_QCH + h * 128 + ((((k >> 3) ^ (h & 7))) << 4) + ((k & 7) << 1));
}

// The kernel body. PV_REGS = false (mla_decode_narrow_bf16): P . V's A operand (V^T) straight
// from the stage as a transposed shared-memory operand. PV_REGS = true
// (mla_decode_narrow_rs_bf16): the same values through ldmatrix.trans into registers (the A
// fragment of a warp's 16 latent columns x 16 tokens is one ldmatrix.x4.trans of the stage), so
// the stage goes back to the producer as soon as it is read, before P . V completes. Two forms
// of one product: the transposed shared-memory A is the repository's first (the other kernels
// read V as a transposed B), and the register form does not depend on it.
template <bool PV_REGS>
__device__ __forceinline__ void narrow_decode(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe,
                                              const int* __restrict__ block_table, const int* __restrict__ seq_lens,
                                              bf16* __restrict__ out, float* __restrict__ o_part,
                                              float* __restrict__ lse, int heads, int block_size, int max_blocks,
                                              int splits, float scale, long long qpe_sb, long long qpe_sh,
                                              const TmaMap* cache_map, const TmaMap* cache_map64) {
    extern __shared__ __align__(1024) unsigned char nr_smem_raw[];
    unsigned char* smem =
        reinterpret_cast<unsigned char*>((reinterpret_cast<size_t>(nr_smem_raw) + 1023) & ~(size_t)1023);
    const u32 sbase = smem_addr(smem);
    const u32 bar_full = sbase + NR_BAR, bar_empty = bar_full + NR_STAGES * 9 * 8;

    const int b = blockIdx.y, split = blockIdx.z, h0 = blockIdx.x * NR_HEADS;
    const int tid = threadIdx.x;
    const int len = seq_lens[b];
    const int per = split_tokens(len, splits, 64);
    const int start = split * per;
    const int end = min(len, start + per);
    const int* btab = block_table + (size_t)b * max_blocks;
    if (splits > 1 && start >= len) {
        empty_split(lse, b, split, splits, heads, h0, NR_HEADS);
        return;
    }
    const int ntiles = end > start ? (end - start + 63) / 64 : 0;

    if (tid == 0) {
        for (int i = 0; i < NR_STAGES * 9; ++i) mbar_init(bar_full + 8 * i, 1);
        for (int s = 0; s < NR_STAGES; ++s) mbar_init(bar_empty + 8 * s, 4);  // lane 0 of each math warp
        mbar_init_fence();
    }
    // a partial last tile in a stage never used before: zero the stage (rows it does not load
    // must hold finite values: P = 0 times a NaN would not be 0)
    const int last = ntiles - 1;
    if (last >= 0 && last < NR_STAGES && end - (start + 64 * last) < 64) {
        uint4* z = reinterpret_cast<uint4*>(smem + NR_ST0 + last * NR_TILE);
        for (int i = tid; i < NR_TILE / 16; i += NR_THREADS) z[i] = make_uint4(0u, 0u, 0u, 0u);
    }
    // Q of the CTA's 16 heads (zeros past `heads`), latent and rope columns, 9 swizzled chunks
    for (int i = tid; i < NR_HEADS * (D_QK / 8); i += NR_THREADS) {
        const int r = i / (D_QK / 8), col = (i % (D_QK / 8)) * 8;
        *reinterpret_cast<bf16x8*>(smem + NR_Q + nr_q_off(r, col)) =
            load_q8(q_abs, q_pe, b, h0 + r, heads, col, qpe_sb, qpe_sh);
    }
    fence_async_smem();  // Q and the zeroed stage: generic writes, read by wgmma / overwritten by TMA
    __syncthreads();

    // the warp index through a shuffle: ptxas then knows the branch is warp-uniform (a wgmma
    // after a branch it cannot prove uniform is serialized, C7520)
    const int warp_id = __shfl_sync(0xffffffffu, tid / WARP, 0);
    if (warp_id >= 4) {
        if (tid == 128) {
            for (int it = 0; it < ntiles; ++it) {
                const int s = it % NR_STAGES;
                if (it >= NR_STAGES) mbar_wait_thread(bar_empty + 8 * s, ((it / NR_STAGES) - 1) & 1);
                tile_issue(sbase + NR_ST0 + s * NR_TILE, bar_full + s * 9 * 8, cache_map, cache_map64, btab, block_size,
                           start + 64 * it, end, 0, 9);
            }
        }
        return;
    }

    const int lane = tid % WARP, w = warp_id, g = lane / 4, t = lane % 4;
    const float sl2 = scale * 1.4426950408889634f;
    float* red = reinterpret_cast<float*>(smem + NR_RED);
    const u32 q_addr = sbase + NR_Q, p_addr = sbase + NR_P;
    const int row0 = 16 * w + g;  // S^T rows (tokens) of this thread: row0, row0 + 8

    float o[8][8];  // O^T m-block mb (latent 64 mb ..): rows 16 w + g (+8), heads 8 j + 2 t (+1)
#pragma unroll
    for (int mb = 0; mb < 8; ++mb)
#pragma unroll
        for (int i = 0; i < 8; ++i) o[mb][i] = 0.f;
    // this thread's 4 heads (8 j + 2 t + e, index 2 j + e): running max and its share of the sum
    float m_run[4], l_part[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        m_run[k] = -INFINITY;
        l_part[k] = 0.f;
    }

    for (int it = 0; it < ntiles; ++it) {
        const int s = it % NR_STAGES;
        const u32 par = (it / NR_STAGES) & 1;
        const int t0 = start + 64 * it;
        const u32 kt = sbase + NR_ST0 + s * NR_TILE, bars = bar_full + s * 9 * 8;

        // ---- S^T = K . Q^T, each of the 9 chunks (latent 0..7, rope 8) as it lands, in the
        // order tile_issue copies them
        float sacc[8];
        wg_fence();
#pragma unroll
        for (int c = 0; c < 9; ++c) {
            mbar_wait(bars + c * 8, par);
#pragma unroll
            for (int ks = 0; ks < 4; ++ks) {
                const u32 off = c * MLA_CHUNK + ks * 32;
                nr_wgmma_m64n16<0>(sacc, wg_desc(kt + off, 16, 1024), wg_desc(q_addr + c * NR_QCH + ks * 32, 16, 1024),
                                   c > 0 || ks > 0);
            }
        }
        wg_commit();
        wg_wait0();
        wg_fence_regs<8>(sacc);

        // ---- column (head) maxima over the tile's 64 tokens
        const bool v0 = t0 + row0 < end, v1 = t0 + row0 + 8 < end;
        float cmax[4];
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                const bool lo = x < 2;
                const float v = (lo ? v0 : v1) ? sacc[4 * j + x] * sl2 : -INFINITY;
                sacc[4 * j + x] = v;
                const int k = 2 * j + (x & 1);
                cmax[k] = lo ? v : fmaxf(cmax[k], v);
            }
        col_max_warp<4>(cmax);
        col_store<4>(red + w * 16, cmax);
        named_sync(NR_NB_MATH, 128);
        float alpha[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int col = 8 * (k / 2) + 2 * t + (k & 1);
            float mx = m_run[k];
#pragma unroll
            for (int ww = 0; ww < 4; ++ww) mx = fmaxf(mx, red[ww * 16 + col]);
            // finite: token t0 is valid, so every column has a finite entry
            alpha[k] = exp2f(m_run[k] - mx);  // 0 on the first tile
            m_run[k] = mx;
            l_part[k] *= alpha[k];
        }
        // P = bf16(exp2(x - m)); the sum adds the rounded values P . V uses
        u32 pp[4];  // bf16x2 of (row half hf, n8 block j): index 2 j + hf
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const __nv_bfloat162 pb = __floats2bfloat162_rn(exp2f(sacc[4 * j + 2 * hf] - m_run[2 * j]),
                                                                exp2f(sacc[4 * j + 2 * hf + 1] - m_run[2 * j + 1]));
                const float2 pf = __bfloat1622float2(pb);
                l_part[2 * j] += pf.x;
                l_part[2 * j + 1] += pf.y;
                pp[2 * j + hf] = *reinterpret_cast<const u32*>(&pb);
            }
        // stmatrix.trans: matrix (j, hf) = tokens 16 w + 8 hf .. + 7 x heads 8 j .. + 7, stored as
        // rows of P (heads) holding 8 tokens (16 B). The previous tile's P . V has completed (its
        // wait below), and every warp is past its reads of red (the barrier above).
        {
            const int mi = lane / 8, c = lane % 8;
            const int j = mi / 2, hf = mi & 1, head = 8 * j + c;
            stsm_x4_t_at(p_addr + swz_piece(head, 2 * w + hf), pp[0], pp[1], pp[2], pp[3]);
        }
        fence_async_smem();
        named_sync(NR_NB_MATH, 128);  // P complete

        // ---- O^T = O^T * alpha + V^T . P^T over the 8 latent chunks of the tile
#pragma unroll
        for (int mb = 0; mb < 8; ++mb)
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int x = 0; x < 4; ++x) o[mb][4 * j + x] *= alpha[2 * j + (x & 1)];
        if constexpr (PV_REGS) {
            // ldmatrix.x4.trans of m-block mb, k-step kk: matrix i = tokens 16 kk + 8 (i >> 1) ..
            // + 7 x latent columns 64 mb + 16 w + 8 (i & 1) .. + 7, i.e. a0 (row g, k 2t..), a1 (row
            // g + 8), a2 (row g, k 2t + 8..), a3; lane l addresses row l % 8 of matrix l / 8
            const int mi = lane / 8, piece = 2 * w + (mi & 1);
#pragma unroll
            for (int mb = 0; mb < 8; ++mb) {
                u32 a[16];
#pragma unroll
                for (int kk = 0; kk < 4; ++kk) {
                    const int tok = 16 * kk + 8 * (mi >> 1) + (lane % 8);
                    ldsm_x4_t_at(a + 4 * kk, kt + mb * MLA_CHUNK + swz_piece(tok, piece));
                }
                if (mb == 7) {
                    // the stage's last reads are done (S^T's wgmma completed above): back to the
                    // producer before P . V completes
                    __syncwarp();
                    if (lane == 0) mbar_arrive(bar_empty + 8 * s);
                }
                wg_fence();
#pragma unroll
                for (int kk = 0; kk < 4; ++kk) nr_wgmma_m64n16_rs(o[mb], a + 4 * kk, wg_desc(p_addr + kk * 32, 16, 1024));
                wg_commit();
                // m-block mb - 1's registers are free for mb + 1; the last drains P . V
                if (mb < 7) wg_wait<1>();
                else wg_wait0();
            }
#pragma unroll
            for (int mb = 0; mb < 8; ++mb) wg_fence_regs<8>(o[mb]);
        } else {
            wg_fence();
#pragma unroll
            for (int mb = 0; mb < 8; ++mb)
#pragma unroll
                for (int kk = 0; kk < 4; ++kk)
                    nr_wgmma_m64n16<1>(o[mb], wg_desc(kt + mb * MLA_CHUNK + kk * 16 * 128, MLA_CHUNK, 1024),
                                       wg_desc(p_addr + kk * 32, 16, 1024), 1);
            wg_commit();
            wg_wait0();
#pragma unroll
            for (int mb = 0; mb < 8; ++mb) wg_fence_regs<8>(o[mb]);
            // the stage's last readers (both products) are done: back to the producer
            __syncwarp();
            if (lane == 0) mbar_arrive(bar_empty + 8 * s);
        }
    }

    // ---- the end: l over the tokens' rows and the 4 warps, then the normalised rows
    col_sum_warp<4>(l_part);
    named_sync(NR_NB_MATH, 128);  // every warp is past its last read of red
    col_store<4>(red + w * 16, l_part);
    named_sync(NR_NB_MATH, 128);
    float inv[4], l_tot[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int col = 8 * (k / 2) + 2 * t + (k & 1);
        l_tot[k] = red[col] + red[16 + col] + red[32 + col] + red[48 + col];
        inv[k] = l_tot[k] > 0.f ? 1.f / l_tot[k] : 0.f;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int h = h0 + 8 * (k / 2) + 2 * t + (k & 1);
        if (h >= heads) continue;
        const int j = k / 2, e = k & 1;
#pragma unroll
        for (int mb = 0; mb < 8; ++mb)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int c = 64 * mb + 16 * w + g + 8 * hf;
                const float v = o[mb][4 * j + 2 * hf + e] * inv[k];
                if (splits == 1) {
                    out[((size_t)b * heads + h) * D_LAT + c] = __float2bfloat16(v);
                } else {
                    o_part[(((size_t)b * splits + split) * heads + h) * D_LAT + c] = v;
                }
            }
        if (splits > 1 && w == 0 && g == 0)
            lse[((size_t)b * splits + split) * heads + h] =
                l_tot[k] > 0.f ? (m_run[k] + log2f(l_tot[k])) * 0.6931471805599453f : -INFINITY;
    }
}

// grid (ceil(H / 16), B, splits), NR_THREADS threads, NR_BYTES + 1024 bytes of dynamic shared
// memory. Arguments and outputs as mla_decode_tma_bf16 (the cache read through cache_map: [slots,
// 576] bf16, box 64 columns x min(block_size, 64) rows, 128-byte swizzle; block_size 8..64
// dividing 64 or a multiple of it). Splits of whole 64-token tiles; an empty split writes only
// lse = -inf.
extern "C" __global__ void __launch_bounds__(NR_THREADS, 1)
mla_decode_narrow_bf16(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe,
                       const int* __restrict__ block_table, const int* __restrict__ seq_lens, bf16* __restrict__ out,
                       float* __restrict__ o_part, float* __restrict__ lse, int heads, int block_size, int max_blocks,
                       int splits, float scale, long long qpe_sb, long long qpe_sh,
                       const __grid_constant__ TmaMap cache_map, const __grid_constant__ TmaMap cache_map64) {
    griddep_wait();
    narrow_decode<false>(q_abs, q_pe, block_table, seq_lens, out, o_part, lse, heads, block_size, max_blocks, splits,
                         scale, qpe_sb, qpe_sh, &cache_map, &cache_map64);
}

// The same with P . V's A operand through registers (narrow_decode<true>).
extern "C" __global__ void __launch_bounds__(NR_THREADS, 1)
mla_decode_narrow_rs_bf16(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe,
                          const int* __restrict__ block_table, const int* __restrict__ seq_lens,
                          bf16* __restrict__ out, float* __restrict__ o_part, float* __restrict__ lse, int heads,
                          int block_size, int max_blocks, int splits, float scale, long long qpe_sb,
                          long long qpe_sh, const __grid_constant__ TmaMap cache_map, const __grid_constant__ TmaMap cache_map64) {
    griddep_wait();
    narrow_decode<true>(q_abs, q_pe, block_table, seq_lens, out, o_part, lse, heads, block_size, max_blocks, splits,
                        scale, qpe_sb, qpe_sh, &cache_map, &cache_map64);
}
