// mla_seesaw.cu: MLA decode attention for sm_90a with TMA loads and the "seesaw" schedule of
// FlashMLA's 2025 kernel (docs/20250422-new-kernel-deep-dive.md in deepseek-ai/FlashMLA; this is
// our own implementation of the idea, in raw PTX).
//
// Why: mla_decode_wgmma_bf16 (mla.cu) runs load, S = Q.K^T, softmax and P.V one after another
// with block-wide barriers between them; its warps wait on barriers, wgmma and memory in equal
// parts and it reaches 0.48 of the binding roofline at batch 64 x 4096 x 128 heads
// (bench/RESULTS.md, session 7). Each of its warpgroups also computes S at N = 32, where the
// shared-memory reads of Q outpace what the tensor cores consume.
//
// A CTA owns one sequence, 64 heads and one context split, as before: 2 warpgroups, 256 threads.
// The 64 x 512 output is split by columns: warpgroup 0 holds O_L (latent columns 0..255) in
// registers, warpgroup 1 holds O_R (256..511). The context is walked two 64-token tiles per round,
// tile K0 for warpgroup 0 and K1 for warpgroup 1; each computes the full S (m64n64, 36 k-steps)
// of its own tile, so one warpgroup's softmax runs while the other's tensor work does. With m
// the running row maximum (shared through shared memory):
//   [0] S0 = Q K0^T; m0 = max(m, rowmax S0); sc0 = exp(m - m0); P0 = exp(S0 - m0)
//   [1] S1 = Q K1^T; m1 = max(m0, rowmax S1); sc1 = exp(m0 - m1); P1 = exp(S1 - m1)
//   [0] O_L = (O_L sc0 + P0 V0_L) sc1 + P1 V1_L           (P0 from registers, P1 from shared)
//   [1] O_R = O_R sc0 sc1 + P1 V1_R + (P0 sc1) V0_R        (P1 from registers, P0 sc1 shared)
// which is the usual online softmax over the two tiles in turn.
//
// Loads: the cache is a 2-D tensor [slots, 576] for the TMA unit (128-byte swizzle, the layout
// wgmma reads); each tile is 9 column chunks of 64, each its own mbarrier, so S starts on the
// first chunk to land. A chunk is reloaded for the next round as soon as its last reader is
// done: the rope chunk after S, the V_L chunks after warpgroup 0's P.V, the V_R chunks after
// warpgroup 1's. The rope columns of Q stay in registers (16 per thread), which frees the shared
// memory for the second P buffer: Q 64 KiB + 2 tiles 144 KiB + 2 P 16 KiB fill the 227 KiB.
//
// Measured (bench/RESULTS.md, session 9 run 1): correct, but slower than mla_decode_wgmma_bf16 on
// our bytes-bound rows (0.392 vs 0.467 of the roofline at batch 64 x 4096 x 128 heads). Every
// chunk of both buffers is last read in a round's final P.V, so the next round's copies start at
// the round's end and their latency is exposed each round. FlashMLA uses this schedule for
// compute-bound shapes only. Hence an option (DSV2_MLA_KERNEL=seesaw), not the default.
// That measurement was taken while the device's ptxas (NVRTC 13) serialised every wgmma of this
// kernel (C7520: the warpgroup index was not warp-uniform to it; fixed in session 10 by
// broadcasting it with __shfl_sync). The kernel has not been timed since.
#include "common.cuh"
#include "mla_common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "mla_tma.cuh"

#define SS_CHUNK MLA_CHUNK
#define SS_TILE (9 * SS_CHUNK)        // 64 tokens x 576
#define SS_Q 0                        // Q latent columns 0..511: 8 chunks
#define SS_K0 (8 * SS_CHUNK)
#define SS_K1 (SS_K0 + SS_TILE)
#define SS_P0 (SS_K1 + SS_TILE)
#define SS_P1 (SS_P0 + SS_CHUNK)
#define SS_M (SS_P1 + SS_CHUNK)       // float[64]: running row maximum (log2 units)
#define SS_SC0 (SS_M + 256)           // float[64]: sc0 of the round
#define SS_SC1 (SS_SC0 + 256)         // float[64]: sc1 of the round
#define SS_L (SS_SC1 + 256)           // float[2][64]: row sums at the end
#define SS_BAR (SS_L + 512)           // u64[2][9]: one mbarrier per chunk of each tile buffer
#define SS_BYTES (SS_BAR + 2 * 9 * 8)

// named barriers between the two warpgroups (producer arrives, consumer waits)
#define NB_SC0 1 // sc0 and m0 written (warpgroup 0 -> 1)
#define NB_SC1 2 // sc1 and m1 written (1 -> 0)
#define NB_P0 3  // P0 sc1 in shared memory (0 -> 1)
#define NB_P1 4  // P1 in shared memory (1 -> 0)

// Same outputs as mla_decode_wgmma_bf16 (mla.cu): grid (ceil(H/64), B, splits), 256 threads,
// SS_BYTES + 1024 bytes of dynamic shared memory; splits cut at 64 tokens. The cache is read
// through `cache_map` only: a 2-D tensor map [num_blocks * block_size rows, 576] bf16, box
// {64, min(block_size, 64)}, 128-byte swizzle.
extern "C" __global__ void __launch_bounds__(256, 1)
mla_decode_seesaw_bf16(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe,
                       const int* __restrict__ block_table, const int* __restrict__ seq_lens, bf16* __restrict__ out,
                       float* __restrict__ o_part, float* __restrict__ lse, int heads, int block_size,
                       int max_blocks, int splits, float scale, long long qpe_sb, long long qpe_sh,
                       const __grid_constant__ TmaMap cache_map, const __grid_constant__ TmaMap cache_map64) {
    griddep_wait();
    extern __shared__ __align__(1024) unsigned char ss_smem_raw[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(
        (reinterpret_cast<size_t>(ss_smem_raw) + 1023) & ~(size_t)1023);
    float* s_m = reinterpret_cast<float*>(smem + SS_M);
    float* s_sc0 = reinterpret_cast<float*>(smem + SS_SC0);
    float* s_sc1 = reinterpret_cast<float*>(smem + SS_SC1);
    float* s_l = reinterpret_cast<float*>(smem + SS_L);
    const u32 base = smem_addr(smem);
    const u32 q_addr = base + SS_Q, kb0 = base + SS_K0, kb1 = base + SS_K1;
    const u32 bars0 = base + SS_BAR, bars1 = bars0 + 9 * 8;

    const TmaPart part = tma_part(block_table, seq_lens, max_blocks, splits);
    const int b = part.b, split = part.split, h0 = part.h0, start = part.start, end = part.end;
    const int* btab = part.btab;
    // warp-uniform to ptxas (tid / 128 is not, and wgmma under a branch on it is serialised)
    const int tid = threadIdx.x, wg = __shfl_sync(0xffffffffu, tid / 128, 0), lane = tid % WARP, wq = (tid % 128) / WARP;
    const float sl2 = scale * 1.4426950408889634f;
    const int r_lo = wq * 16 + lane / 4, cq = (lane % 4) * 2;
    if (start >= end) {
        tma_decode_empty(out, lse, b, split, splits, heads, h0);
        return;
    }
    const int ntiles = (end - start + 63) / 64;
    const int nrounds = (ntiles + 1) / 2;

    if (tid == 0) {
        for (int i = 0; i < 18; ++i) mbar_init(bars0 + 8 * i, 1);
        mbar_init_fence();
    }
    // Rows that are never loaded (past `end` in the split's last round) must not hold NaN from
    // whatever ran on this SM before: P is 0 there, but 0 * NaN is NaN.
    if ((end - start) % 128 != 0) {
        for (int i = tid; i < 2 * SS_TILE / 16; i += 256)
            *reinterpret_cast<uint4*>(smem + SS_K0 + i * 16) = make_uint4(0, 0, 0, 0);
    }
    load_q_latent_swz(smem + SS_Q, q_abs, q_pe, b, h0, heads, qpe_sb, qpe_sh);
    u32 rq[16];
    load_q_rope_frags(rq, q_pe, b, h0, heads, qpe_sb, qpe_sh, r_lo, cq);
    if (tid < 64) s_m[tid] = -INFINITY;
    fence_async_smem();  // the zeros and Q (generic writes) before TMA writes and wgmma reads
    __syncthreads();
    if (tid == 0) {
        tile_issue(kb0, bars0, &cache_map, &cache_map64, btab, block_size, start, end, 0, 9);
        tile_issue(kb1, bars1, &cache_map, &cache_map64, btab, block_size, start + 64, end, 0, 9);
    }
    const bool issuer = (tid % 128) == 0;

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float s[32];
    u32 pa[16];
    float l_acc[2] = {0.f, 0.f};

    if (wg == 0) {
        for (int r = 0; r < nrounds; ++r) {
            const u32 par = r & 1;
            const int ta = start + 128 * r;  // tokens of K0; K1 holds ta + 64 ..
            const bool next = r + 1 < nrounds;
            tile_qk(s, q_addr, kb0, bars0, par, rq);
            wg_wait<0>();
            wg_fence_regs<32>(s);
            if (issuer && next) tile_issue(kb0, bars0, &cache_map, &cache_map64, btab, block_size, ta + 128, end, 8, 9);
            float mx[2], m_new[2], sc0[2], sum[2];
            tile_rowmax(s, ta, cq, end, sl2, mx);
#pragma unroll
            for (int hlf = 0; hlf < 2; ++hlf) {
                const float m_old = s_m[r_lo + 8 * hlf];
                m_new[hlf] = fmaxf(m_old, mx[hlf]);  // finite: token ta is valid
                sc0[hlf] = exp2f(m_old - m_new[hlf]);
            }
            tile_exp(s, m_new, pa, sum);
            __syncwarp();  // every lane of the quad has read m_old
            if ((lane & 3) == 0) {
#pragma unroll
                for (int hlf = 0; hlf < 2; ++hlf) {
                    s_m[r_lo + 8 * hlf] = m_new[hlf];
                    s_sc0[r_lo + 8 * hlf] = sc0[hlf];
                }
            }
            named_arrive(NB_SC0, 256);
            // O_L = O_L sc0 + P0 V0_L
            scale_o_rows(o, sc0[0], sc0[1]);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
                wgmma_m64n256_rs_tn(o, pa + 4 * kk, wg_desc(kb0 + kk * 16 * 128, SS_CHUNK, 1024), 1);
            wg_commit();
            // P0 sc1 for warpgroup 1
            named_sync(NB_SC1, 256);
            const float sc1_0 = s_sc1[r_lo], sc1_1 = s_sc1[r_lo + 8];
            store_p_swz(smem + SS_P0, s, r_lo, cq, sc1_0, sc1_1);
            fence_async_smem();
            named_arrive(NB_P0, 256);
            l_acc[0] = (l_acc[0] * sc0[0] + sum[0]) * sc1_0;
            l_acc[1] = (l_acc[1] * sc0[1] + sum[1]) * sc1_1;
            wg_wait<0>();
            wg_fence_regs<128>(o);
            wg_fence_regs<16>(pa);
            if (issuer && next) tile_issue(kb0, bars0, &cache_map, &cache_map64, btab, block_size, ta + 128, end, 0, 4);
            // O_L = O_L sc1 + P1 V1_L
            scale_o_rows(o, sc1_0, sc1_1);
            named_sync(NB_P1, 256);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
                wgmma_m64n256_ss_tn(o, wg_desc(base + SS_P1 + kk * 32, 16, 1024),
                                    wg_desc(kb1 + kk * 16 * 128, SS_CHUNK, 1024), 1);
            wg_commit();
            wg_wait<0>();
            wg_fence_regs<128>(o);
            if (issuer && next) tile_issue(kb1, bars1, &cache_map, &cache_map64, btab, block_size, ta + 192, end, 0, 4);
        }
    } else {
        for (int r = 0; r < nrounds; ++r) {
            const u32 par = r & 1;
            const int tb = start + 128 * r + 64;  // tokens of K1
            const bool next = r + 1 < nrounds;
            tile_qk(s, q_addr, kb1, bars1, par, rq);
            wg_wait<0>();
            wg_fence_regs<32>(s);
            if (issuer && next) tile_issue(kb1, bars1, &cache_map, &cache_map64, btab, block_size, tb + 128, end, 8, 9);
            float mx[2], m_new[2], sc1[2], sum[2];
            tile_rowmax(s, tb, cq, end, sl2, mx);  // all -inf when the round has no second tile
            named_sync(NB_SC0, 256);
            float sc0[2];
#pragma unroll
            for (int hlf = 0; hlf < 2; ++hlf) {
                const float m0 = s_m[r_lo + 8 * hlf];  // warpgroup 0's m0: finite
                sc0[hlf] = s_sc0[r_lo + 8 * hlf];
                m_new[hlf] = fmaxf(m0, mx[hlf]);
                sc1[hlf] = exp2f(m0 - m_new[hlf]);
            }
            tile_exp(s, m_new, pa, sum);
            __syncwarp();
            if ((lane & 3) == 0) {
#pragma unroll
                for (int hlf = 0; hlf < 2; ++hlf) {
                    s_m[r_lo + 8 * hlf] = m_new[hlf];
                    s_sc1[r_lo + 8 * hlf] = sc1[hlf];
                }
            }
            named_arrive(NB_SC1, 256);
            l_acc[0] = l_acc[0] * sc0[0] * sc1[0] + sum[0];
            l_acc[1] = l_acc[1] * sc0[1] * sc1[1] + sum[1];
            // O_R = O_R sc0 sc1 + P1 V1_R
            scale_o_rows(o, sc0[0] * sc1[0], sc0[1] * sc1[1]);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
                wgmma_m64n256_rs_tn(o, pa + 4 * kk, wg_desc(kb1 + 4 * SS_CHUNK + kk * 16 * 128, SS_CHUNK, 1024), 1);
            wg_commit();
            store_p_swz(smem + SS_P1, s, r_lo, cq, 1.f, 1.f);
            fence_async_smem();
            named_arrive(NB_P1, 256);
            // O_R += (P0 sc1) V0_R
            named_sync(NB_P0, 256);
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
                wgmma_m64n256_ss_tn(o, wg_desc(base + SS_P0 + kk * 32, 16, 1024),
                                    wg_desc(kb0 + 4 * SS_CHUNK + kk * 16 * 128, SS_CHUNK, 1024), 1);
            wg_commit();
            wg_wait<1>();
            wg_fence_regs<16>(pa);
            if (issuer && next) tile_issue(kb1, bars1, &cache_map, &cache_map64, btab, block_size, tb + 128, end, 4, 8);
            wg_wait<0>();
            wg_fence_regs<128>(o);
            if (issuer && next) tile_issue(kb0, bars0, &cache_map, &cache_map64, btab, block_size, tb + 64, end, 4, 8);
        }
    }

    // ---- m is the last round's m1 (warpgroup 1 wrote it before warpgroup 0's last wait on it)
    const float m_fin[2] = {s_m[r_lo], s_m[r_lo + 8]};
    wg2_store_rows(o, l_acc, m_fin, s_l, out, o_part, lse, b, split, splits, heads, h0, wg, r_lo, cq);
}
