// mla_tma.cu: MLA decode attention for sm_90a with TMA loads and fixed warpgroup roles, the
// schedule of FlashMLA's first (2025-02) kernel for memory-bound shapes; our own implementation.
//
// Why: mla_decode_wgmma_bf16 (mla.cu) runs load, S, softmax and P.V one after another with
// block-wide barriers, at 0.47 of the binding roofline on batch 64 x 4096 x 128 heads; the seesaw
// kernel (mla_seesaw.cu) overlaps the math but issues a round's copies only at the round's end
// (0.39). Per 64-token tile a CTA moves 73.7 KB and does 8.9 MFLOP: ~1.6 us of its share of the
// copy bandwidth against ~1.3 us of tensor work, so the copies must stay in flight all the time.
//
// A CTA owns one sequence, 64 heads and one context split: 2 warpgroups, 256 threads.
//   warpgroup 0: S = Q.K^T (m64n64, the whole tile), online softmax (it alone owns the row
//                maximum and sum), P to shared memory, O_L += P.V_L (latent columns 0..255, P
//                from registers), then straight on to the next tile's S;
//   warpgroup 1: waits for P, rescales O_R, O_R += P.V_R (columns 256..511, P from shared).
// The tensor work of both warpgroups interleaves: warpgroup 1's P.V of tile i runs beside
// warpgroup 0's P.V and the next S. Two cache-tile buffers and two P buffers.
//
// Loads: each tile buffer is 9 column chunks with an mbarrier each (mla_tma.cuh), so S starts on
// the first chunk to land. Tile i + 2 is issued into the buffer of tile i by whichever
// warpgroup finishes its P.V of tile i last, all 9 chunks at once, so each load has the whole of
// tile i + 1's math to land. (Reloading chunk by chunk as each chunk's last reader finished, with
// warpgroup 0 issuing V_L's chunks after the next tile's S was queued, chained every tile's loads
// behind the previous tile's arrival: 0.28 of the roofline, bench/RESULTS.md session 10 run 1.)
#include "common.cuh"
#include "mla_common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "mla_tma.cuh"

#define TM_TILE (9 * MLA_CHUNK)         // 64 tokens x 576
#define TM_Q 0                          // Q latent columns 0..511: 8 chunks (rope in registers)
#define TM_K0 (8 * MLA_CHUNK)
#define TM_K1 (TM_K0 + TM_TILE)
#define TM_P0 (TM_K1 + TM_TILE)
#define TM_P1 (TM_P0 + MLA_CHUNK)
#define TM_ALPHA (TM_P1 + MLA_CHUNK)    // float[2][64]: the tile's O rescale, per P buffer
#define TM_L (TM_ALPHA + 512)           // float[2][64]: row sums at the end
#define TM_BAR (TM_L + 512)             // u64[2][9]: one mbarrier per chunk of each tile buffer
#define TM_EMPTY (TM_BAR + 2 * 9 * 8)   // u64[2]: both CTAs of a pair done with a tile buffer
#define TM_DONE (TM_EMPTY + 2 * 8)      // int[2]: warpgroups done with a tile buffer (0, 1, 2)
#define TM_BYTES (TM_DONE + 2 * 4)

// named barriers: P (and its rescale) of buffer j written (0 -> 1); P buffer j read (1 -> 0).
// One id per buffer each.
#define NB_PREADY 1
#define NB_PFREE 3
#define NB_EMPTY 5  // the pair kernel: warpgroup 0 done with tile buffer j (0 -> 1)

// The kernel body. PAIR: the CTA is one of a cluster of two, the two head groups of the same
// sequence and split (128 heads): each copies half of every tile and multicasts it to both, so
// each SM pulls half the bytes through L2 and issues half the copies.
// PROBE (timing probes only, wrong outputs; DSV2_MLA_PROBE in the launcher): 1 = the math alone
// (tiles 0 and 1 are loaded, later tiles reuse them without loads or waits), 2 = the loads alone
// (every copy and handshake, no MMA and no softmax).
template <bool PAIR, int PROBE = 0>
__device__ __forceinline__ void tma_decode(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe,
                                           const int* __restrict__ block_table, const int* __restrict__ seq_lens,
                                           bf16* __restrict__ out, float* __restrict__ o_part, float* __restrict__ lse,
                                           int heads, int block_size, int max_blocks, int splits, float scale,
                                           long long qpe_sb, long long qpe_sh, const TmaMap* cache_map,
                                           const TmaMap* cache_map64) {
    extern __shared__ __align__(1024) unsigned char tm_smem_raw[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(
        (reinterpret_cast<size_t>(tm_smem_raw) + 1023) & ~(size_t)1023);
    float* s_alpha = reinterpret_cast<float*>(smem + TM_ALPHA);
    float* s_l = reinterpret_cast<float*>(smem + TM_L);
    const u32 base = smem_addr(smem);
    const u32 q_addr = base + TM_Q;

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
    // tile i lives in buffer i & 1; its chunks' barriers complete for the (i >> 1)-th time
    auto kbuf = [&](int i) -> u32 { return base + ((i & 1) ? TM_K1 : TM_K0); };
    auto bars = [&](int i) -> u32 { return base + TM_BAR + (i & 1) * 9 * 8; };

    const u32 rank = PAIR ? cluster_ctarank() : 0;
    if (tid == 0) {
        for (int i = 0; i < 18; ++i) mbar_init(base + TM_BAR + 8 * i, 1);
        for (int i = 0; i < 2; ++i) mbar_init(base + TM_EMPTY + 8 * i, 2);
        mbar_init_fence();
        reinterpret_cast<int*>(smem + TM_DONE)[0] = reinterpret_cast<int*>(smem + TM_DONE)[1] = 0;
    }
    // Rows of the last tile that are never loaded (past `end`) must not hold NaN from whatever ran
    // on this SM before: P is 0 there, but 0 * NaN is NaN. A buffer that held an earlier tile
    // holds finite values, so only a first use needs the zeros.
    if ((end - start) % 64 != 0 && ntiles <= 2) {
        unsigned char* kb = smem + (((ntiles - 1) & 1) ? TM_K1 : TM_K0);
        for (int i = tid; i < TM_TILE / 16; i += 256) *reinterpret_cast<uint4*>(kb + i * 16) = make_uint4(0, 0, 0, 0);
    }
    load_q_latent_swz(smem + TM_Q, q_abs, q_pe, b, h0, heads, qpe_sb, qpe_sh);
    fence_async_smem();  // the zeros and Q (generic writes) before TMA writes and wgmma reads
    // the pair's barriers are initialised before either CTA copies into the other
    if (PAIR) cluster_sync();
    else __syncthreads();
    // tiles 0 and 1, the rope chunk first: S (tile_qk) starts with it
    auto issue = [&](int i) {
        const int t = start + 64 * i;
        if (PAIR) {
            tile_issue_pair(kbuf(i), bars(i), cache_map, cache_map64, btab, block_size, t, end, rank);
        } else {
            tile_issue(kbuf(i), bars(i), cache_map, cache_map64, btab, block_size, t, end, 8, 9);
            tile_issue(kbuf(i), bars(i), cache_map, cache_map64, btab, block_size, t, end, 0, 8);
        }
    };
    if (tid == 0) {
        for (int i = 0; i < min(ntiles, 2); ++i) issue(i);
    }
    // Tile i + 2 goes into tile i's buffer as soon as both warpgroups are done with it: one
    // thread of each counts itself done, and the second to do so issues the copies. Nobody
    // waits for the other warpgroup. (With a named barrier there, warpgroup 1 stalled every tile
    // until warpgroup 0's P.V_L finished: the loads-only probe ran at 0.156 ms against 0.102 ms
    // for a plain stream of the same tiles, bench/RESULTS.md session 11 run 1.) The pair kernel
    // keeps the barrier: its reissue also waits for the other CTA, and a wait on that
    // thread-divergent path between warpgroup 0's MMAs made ptxas serialise them.
    int* s_done = reinterpret_cast<int*>(smem + TM_DONE);
    auto done_with = [&](int i) {
        __threadfence_block();  // this warpgroup's reads of the buffer (waited for) come first
        if (atomicAdd(&s_done[i & 1], 1) == 0) return;  // the other warpgroup still reads it
        __threadfence_block();
        s_done[i & 1] = 0;
        if (PROBE != 1) issue(i + 2);
    };
    const bool counter = (tid % 128) == 0;  // the thread of each warpgroup that counts
    // warpgroup 0, done with tile i's buffer
    auto wg0_done = [&](int i) {
        if (PAIR) named_arrive(NB_EMPTY + (i & 1), 256);
        else if (counter) done_with(i);
    };

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float l_acc[2] = {0.f, 0.f};
    float m_run[2] = {-INFINITY, -INFINITY};

    if (wg == 0) {
        u32 rq[16];
        load_q_rope_frags(rq, q_pe, b, h0, heads, qpe_sb, qpe_sh, r_lo, cq);
        float s[32];
        u32 pa[16];  // P's bf16 A fragments (P.V_L reads P from registers)
        for (int i = 0; i < ntiles; ++i) {
            const int pb = i & 1;
            const int t0 = start + 64 * i;
            if constexpr (PROBE == 2) {
                for (int c = 0; c < 9; ++c) mbar_wait(bars(i) + c * 8, (i >> 1) & 1);
                if (i >= 2) named_sync(NB_PFREE + pb, 256);
                named_arrive(NB_PREADY + pb, 256);
                if (i + 2 < ntiles) wg0_done(i);
                continue;
            }
            tile_qk(s, q_addr, kbuf(i), bars(i), (i >> 1) & 1, rq, PROBE != 1 || i < 2);
            wg_wait<0>();
            wg_fence_regs<32>(s);
            float mx[2], alpha[2], sum[2];
            tile_rowmax(s, t0, cq, end, sl2, mx);
#pragma unroll
            for (int hlf = 0; hlf < 2; ++hlf) {
                const float m_new = fmaxf(m_run[hlf], mx[hlf]);  // finite: token t0 is valid
                alpha[hlf] = exp2f(m_run[hlf] - m_new);          // 0 on the first tile
                m_run[hlf] = m_new;
            }
            tile_exp(s, m_run, pa, sum);
            l_acc[0] = l_acc[0] * alpha[0] + sum[0];
            l_acc[1] = l_acc[1] * alpha[1] + sum[1];
            if (i >= 2) named_sync(NB_PFREE + pb, 256);  // warpgroup 1 is done with tile i - 2's P
            store_p_swz(smem + (pb ? TM_P1 : TM_P0), s, r_lo, cq, 1.f, 1.f);
            if ((lane & 3) == 0) {
                s_alpha[pb * 64 + r_lo] = alpha[0];
                s_alpha[pb * 64 + r_lo + 8] = alpha[1];
            }
            fence_async_smem();
            named_arrive(NB_PREADY + pb, 256);
            scale_o_rows(o, alpha[0], alpha[1]);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
                wgmma_m64n256_rs_tn(o, pa + 4 * kk, wg_desc(kbuf(i) + kk * 16 * 128, MLA_CHUNK, 1024), 1);
            wg_commit();
            wg_wait<0>();
            wg_fence_regs<128>(o);
            wg_fence_regs<16>(pa);
            if (i + 2 < ntiles) wg0_done(i);  // done with buffer i & 1
        }
    } else {
        for (int i = 0; i < ntiles; ++i) {
            const int pb = i & 1;
            const u32 kb = kbuf(i);
            named_sync(NB_PREADY + pb, 256);
            if constexpr (PROBE != 2) {
                scale_o_rows(o, s_alpha[pb * 64 + r_lo], s_alpha[pb * 64 + r_lo + 8]);
                wg_fence();
#pragma unroll
                for (int kk = 0; kk < 4; ++kk)
                    wgmma_m64n256_ss_tn(o, wg_desc(base + (pb ? TM_P1 : TM_P0) + kk * 32, 16, 1024),
                                        wg_desc(kb + 4 * MLA_CHUNK + kk * 16 * 128, MLA_CHUNK, 1024), 1);
                wg_commit();
                wg_wait<0>();
                wg_fence_regs<128>(o);
            }
            if (i + 2 < ntiles) {
                named_arrive(NB_PFREE + pb, 256);
                if (!PAIR) {
                    if (counter) done_with(i);
                } else {
                    // the whole buffer is free once warpgroup 0's P.V_L is done too, and the
                    // other CTA of the pair is done with its copy of it
                    named_sync(NB_EMPTY + pb, 256);
                    if (counter && PROBE != 1) {
                        const u32 empty = base + TM_EMPTY + (i & 1) * 8;
                        mbar_arrive(empty);
                        mbar_arrive_remote(empty, rank ^ 1);
                        mbar_wait_thread(empty, (i >> 1) & 1);
                        issue(i + 2);
                    }
                }
            }
        }
    }
    // warpgroup 0 owns the row maximum and sum; warpgroup 1 adds 0 to the sum
    wg2_store_rows(o, l_acc, m_run, s_l, out, o_part, lse, b, split, splits, heads, h0, wg, r_lo, cq);
    // neither CTA of a pair leaves while the other may still arrive on its barriers
    if (PAIR) cluster_sync();
}

// Same outputs and arguments as mla_decode_seesaw_bf16: grid (ceil(H/64), B, splits), 256 threads,
// TM_BYTES + 1024 bytes of dynamic shared memory; splits cut at 64 tokens; the cache read through
// `cache_map` (a 2-D tensor map [slots, 576] bf16, box {64, min(block_size, 64)}, 128-byte swizzle)
// and `cache_map64` (the same with box {64, 64}: whole tiles of consecutive blocks, tile_issue).
extern "C" __global__ void __launch_bounds__(256, 1)
mla_decode_tma_bf16(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe,
                    const int* __restrict__ block_table, const int* __restrict__ seq_lens, bf16* __restrict__ out,
                    float* __restrict__ o_part, float* __restrict__ lse, int heads, int block_size, int max_blocks,
                    int splits, float scale, long long qpe_sb, long long qpe_sh,
                    const __grid_constant__ TmaMap cache_map, const __grid_constant__ TmaMap cache_map64) {
    griddep_wait();
    tma_decode<false>(q_abs, q_pe, block_table, seq_lens, out, o_part, lse, heads, block_size, max_blocks, splits,
                      scale, qpe_sb, qpe_sh, &cache_map, &cache_map64);
}

// The same for 65..128 heads (grid x = 2) launched in clusters of (2, 1, 1): the two head groups
// of a sequence and split share every tile's copies.
extern "C" __global__ void __launch_bounds__(256, 1)
mla_decode_tma_pair_bf16(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe,
                         const int* __restrict__ block_table, const int* __restrict__ seq_lens,
                         bf16* __restrict__ out, float* __restrict__ o_part, float* __restrict__ lse, int heads,
                         int block_size, int max_blocks, int splits, float scale, long long qpe_sb, long long qpe_sh,
                         const __grid_constant__ TmaMap cache_map, const __grid_constant__ TmaMap cache_map64) {
    griddep_wait();
    tma_decode<true>(q_abs, q_pe, block_table, seq_lens, out, o_part, lse, heads, block_size, max_blocks, splits,
                     scale, qpe_sb, qpe_sh, &cache_map, &cache_map64);
}

// Timing probes of mla_decode_tma_bf16 (wrong outputs): the math alone, the loads alone.
extern "C" __global__ void __launch_bounds__(256, 1)
mla_decode_tma_probe1_bf16(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe,
                           const int* __restrict__ block_table, const int* __restrict__ seq_lens,
                           bf16* __restrict__ out, float* __restrict__ o_part, float* __restrict__ lse, int heads,
                           int block_size, int max_blocks, int splits, float scale, long long qpe_sb,
                           long long qpe_sh, const __grid_constant__ TmaMap cache_map, const __grid_constant__ TmaMap cache_map64) {
    griddep_wait();
    tma_decode<false, 1>(q_abs, q_pe, block_table, seq_lens, out, o_part, lse, heads, block_size, max_blocks,
                         splits, scale, qpe_sb, qpe_sh, &cache_map, &cache_map64);
}
extern "C" __global__ void __launch_bounds__(256, 1)
mla_decode_tma_probe2_bf16(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe,
                           const int* __restrict__ block_table, const int* __restrict__ seq_lens,
                           bf16* __restrict__ out, float* __restrict__ o_part, float* __restrict__ lse, int heads,
                           int block_size, int max_blocks, int splits, float scale, long long qpe_sb,
                           long long qpe_sh, const __grid_constant__ TmaMap cache_map, const __grid_constant__ TmaMap cache_map64) {
    griddep_wait();
    tma_decode<false, 2>(q_abs, q_pe, block_table, seq_lens, out, o_part, lse, heads, block_size, max_blocks,
                         splits, scale, qpe_sb, qpe_sh, &cache_map, &cache_map64);
}
