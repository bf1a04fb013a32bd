// mla_prefill_ws.cu: MLA prefill attention (varlen, causal, decompressed K/V) warp-specialised,
// with a TMA producer and two consumer warpgroups that take turns at the tensor cores
// (mla_prefill_ws_bf16, PrefillTile::Ws128). Same function, plan and outputs as
// mla_prefill_wgmma_bf16 (mla_prefill.cu), whose tile, softmax, causal mask and 64-key last
// tile it keeps.
//
// Why: the wgmma kernel loads with cp.async from all 256 threads and meets at a CTA barrier every
// key tile, so both warpgroups run the same phase at the same time: their softmaxes leave the
// tensor cores idle together, and a CTA's first Q and K tiles wait with nothing to hide them. At
// 64 x 512 a (tile, head) item is ~2.5 key tiles and that kernel ran at 0.30 of the cuBLAS rate
// (1.76 TB/s, 0.58 of the copy rate for the 4.8 GB it moves), against 0.56 at 1 x 4096
// (bench/RESULTS.md, session 20). Here, as FlashAttention-3 does:
// - warpgroup 0 (40 registers) is the producer: one thread issues every copy through TMA (Q: 3
//   boxes of 128 rows x 64 columns; a K tile: k_nope's two boxes and k_pe's; a V tile: two) into
//   Q and two-stage K and V rings guarded by mbarriers, walking the CTA's items ahead of the
//   consumers, so the next item's first K and V tiles load behind the current item's last tiles
//   and its Q as soon as both consumers are done with the current Q;
// - warpgroups 1 and 2 (232 registers) compute rows 0..63 and 64..127 of the item. Each issues
//   its MMAs of key tile j (S_j = Q.K_j, then O += P_{j-1}.V_{j-1}) as one burst, taking turns
//   through two named barriers (the "ping-pong" schedule), so that one warpgroup's softmax runs
//   while the other's MMAs hold the tensor cores.
// The CTA is persistent (grid = SM count): it walks items blockIdx.x, blockIdx.x + gridDim.x, ..
// of the n_tiles x heads (tile, head) items, tiles of one head side by side so their K/V share
// L2.
//
// Operands through tensor maps (encoded by the launcher): q as [n, H, 192] (box 64 columns x one
// head x 128 rows), k_nope and v as [T, H, 128] (the same boxes), k_pe as [T, 64] (64 x 128).
// Rows of a box past the tile's own rows are other sequences' rows (finite; the causal mask hides
// their keys and their query rows are not stored) or past the tensor (zero-filled).
//
// Stages (as mla_prefill_wgmma_bf16's, 128-byte swizzle, 1024-aligned): Q 3 chunks of [128 rows x
// 128 B] (48 KiB); a K stage 3 chunks (k_nope 0-63, 64-127, k_pe; 48 KiB); a V stage 2 chunks
// (32 KiB); two of each: 208 KiB, then the barriers.
//
// Consumer burst b of an item (b = 0 .. n_kt, the CTA's key tiles; each warpgroup passes every
// burst, so that both hand back every stage and take the same number of turns):
//   wait K_b (b < n_kt) and V_{b-1} (b >= 1) -> my turn -> S_b (b < n_wt, this warpgroup's
//   tiles) and P_{b-1}.V_{b-1} (1 <= b <= n_wt) issued -> the other's turn -> S_b done: K_b back
//   -> mask, softmax -> P.V done: V_{b-1} back -> O *= alpha, P_b = bf16(S_b).
// Stages a warpgroup does not read (past its n_wt) it hands back unread, after their full phase
// (an early arrival would count towards the stage's previous phase).
#include "common.cuh"
#include "mla_prefill.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#define PS_BN 128                        // keys per tile
#define PS_CH PF_WCH                     // one 64-column chunk of a 128-row operand
#define PS_KST (3 * PS_CH)               // one K stage
#define PS_VST (2 * PS_CH)               // one V stage
#define PS_Q 0
#define PS_K PS_KST                      // K stages 0, 1
#define PS_V (PS_K + 2 * PS_KST)         // V stages 0, 1
#define PS_BAR (PS_V + 2 * PS_VST)       // mbarriers (below)
#define PS_BYTES (PS_BAR + 128)          // the launcher adds 1024 for the alignment
#define PS_DV_N8 (PF_DV / 8)
// mbarriers, 8 bytes each at PS_BAR: Q full, Q empty, K full [2], K empty [2], V full [2], V empty [2]
#define PS_QF 0
#define PS_QE 8
#define PS_KF 16
#define PS_KE 32
#define PS_VF 48
#define PS_VE 64
#define PS_TURN 1  // named barriers 1, 2: consumer 0's, consumer 1's turn at the tensor cores

__device__ __forceinline__ void ps_setmaxnreg_dec40() { asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory"); }
__device__ __forceinline__ void ps_setmaxnreg_inc232() { asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory"); }

__device__ __forceinline__ void tma_load_3d(u32 dst, const TmaMap* map, int c0, int c1, int c2, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}

template <int N>
struct PsCols {
    static constexpr int n = N;
};

// Item `item` (< n_items): tile item % n_tiles, head item / n_tiles; false for a descriptor that
// does not fit (skipped by every role alike).
__device__ __forceinline__ bool ps_item(const int4* __restrict__ seqs, int n_seqs, const int2* __restrict__ tiles,
                                        long long n_q, long long n_ctx, int n_tiles, int item, PfTile& pt, int& h) {
    h = item / n_tiles;
    return pf_tile(seqs, n_seqs, tiles, n_q, n_ctx, item % n_tiles, pt);
}

// The first valid item at or after `item` in this CTA's walk (n_items if none).
__device__ __forceinline__ int ps_next(const int4* __restrict__ seqs, int n_seqs, const int2* __restrict__ tiles,
                                       long long n_q, long long n_ctx, int n_tiles, int n_items, int item, PfTile& pt,
                                       int& h) {
    while (item < n_items && !ps_item(seqs, n_seqs, tiles, n_q, n_ctx, n_tiles, item, pt, h)) item += gridDim.x;
    return item;
}

// Keys the item's CTA needs and its key tiles.
__device__ __forceinline__ int ps_keys(const PfTile& pt) { return pt.pos0 + min(pt.m0 + 128, pt.q_len); }

// grid min(n_tiles x heads, SM count), 384 threads, PS_BYTES + 1024 bytes of dynamic shared
// memory. out [n, H, 128] at (o_rs, o_hs) element strides; seqs, tiles, n_q, n_ctx, scale as
// mla_prefill_wgmma_bf16.
extern "C" __global__ void __launch_bounds__(384, 1)
mla_prefill_ws_bf16(const __grid_constant__ TmaMap q_map, const __grid_constant__ TmaMap kn_map,
                    const __grid_constant__ TmaMap kpe_map, const __grid_constant__ TmaMap v_map,
                    bf16* __restrict__ out, long long o_rs, long long o_hs, const int4* __restrict__ seqs,
                    int n_seqs, const int2* __restrict__ tiles, long long n_q, long long n_ctx, float scale,
                    int n_tiles, int n_heads) {
    griddep_wait();
    extern __shared__ __align__(1024) unsigned char ps_smem_raw[];
    unsigned char* smem =
        reinterpret_cast<unsigned char*>((reinterpret_cast<size_t>(ps_smem_raw) + 1023) & ~(size_t)1023);
    const u32 base = smem_addr(smem);
    const u32 bar = base + PS_BAR;
    const int tid = threadIdx.x, wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
    const int n_items = n_tiles * n_heads;

    if (tid == 0) {
        mbar_init(bar + PS_QF, 1);
        mbar_init(bar + PS_QE, 8);  // lane 0 of each consumer warp
        for (int s = 0; s < 2; ++s) {
            mbar_init(bar + PS_KF + 8 * s, 1);
            mbar_init(bar + PS_KE + 8 * s, 8);
            mbar_init(bar + PS_VF + 8 * s, 1);
            mbar_init(bar + PS_VE + 8 * s, 8);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        // ---- producer ----
        ps_setmaxnreg_dec40();
        if (tid == 0) {
            int kf = 0, vf = 0;
            // tile j of an item (keys row0 + 128 j ..) into the next K and V stages
            auto issue_kv = [&](int h, int row0, int j) {
                const int ks = kf & 1, vs = vf & 1;
                if (kf >= 2) mbar_wait_thread(bar + PS_KE + 8 * ks, ((kf >> 1) - 1) & 1);
                const u32 kb = base + PS_K + ks * PS_KST, kfull = bar + PS_KF + 8 * ks;
                mbar_arrive_expect_tx(kfull, PS_KST);
                tma_load_3d(kb, &kn_map, 0, h, row0 + j * PS_BN, kfull);
                tma_load_3d(kb + PS_CH, &kn_map, 64, h, row0 + j * PS_BN, kfull);
                tma_load_2d(kb + 2 * PS_CH, &kpe_map, 0, row0 + j * PS_BN, kfull);
                if (vf >= 2) mbar_wait_thread(bar + PS_VE + 8 * vs, ((vf >> 1) - 1) & 1);
                const u32 vb = base + PS_V + vs * PS_VST, vfull = bar + PS_VF + 8 * vs;
                mbar_arrive_expect_tx(vfull, PS_VST);
                tma_load_3d(vb, &v_map, 0, h, row0 + j * PS_BN, vfull);
                tma_load_3d(vb + PS_CH, &v_map, 64, h, row0 + j * PS_BN, vfull);
                ++kf;
                ++vf;
            };
            int h = 0, it = 0;
            PfTile pt;
            int item = ps_next(seqs, n_seqs, tiles, n_q, n_ctx, n_tiles, n_items, blockIdx.x, pt, h);
            bool first_issued = false;  // the item's tile 0 was issued behind the item before
            while (item < n_items) {
                // Q once both consumers' Q.K of the item before are done. Its tile 0 went out
                // before that wait (it waits on its stages only), so the item's first MMAs do not
                // wait for Q and K_0 one after the other.
                if (it > 0) mbar_wait_thread(bar + PS_QE, (it - 1) & 1);
                mbar_arrive_expect_tx(bar + PS_QF, 3 * PS_CH);
#pragma unroll
                for (int c = 0; c < 3; ++c)
                    tma_load_3d(base + PS_Q + c * PS_CH, &q_map, 64 * c, h, pt.q_row0 + pt.m0, bar + PS_QF);
                const int n_kt = (ps_keys(pt) + PS_BN - 1) / PS_BN;
                const int row0 = (int)pt.ctx_row0;
                for (int j = first_issued ? 1 : 0; j < n_kt; ++j) issue_kv(h, row0, j);
                int nh = 0;
                PfTile nt;
                const int next = ps_next(seqs, n_seqs, tiles, n_q, n_ctx, n_tiles, n_items, item + gridDim.x, nt, nh);
                first_issued = next < n_items;
                if (first_issued) issue_kv(nh, (int)nt.ctx_row0, 0);
                item = next;
                pt = nt;
                h = nh;
                ++it;
            }
        }
        __syncwarp();
        return;
    }

    // ---- consumers: c = 0, 1 computes rows 64 c .. 64 c + 63 of each item's 128 ----
    ps_setmaxnreg_inc232();
    const int c = wg - 1, wt = tid & 127, warp = wt >> 5, lane = tid & 31;
    const int mine = PS_TURN + c, other = PS_TURN + 1 - c;
    const float sl2 = scale * 1.4426950408889634f;
    const int g = lane >> 2, cq = 2 * (lane & 3);
    const int r_lo = 16 * warp + g;  // accumulator rows r_lo, r_lo + 8 of the warpgroup's 64
    const u32 q_addr = base + PS_Q + c * 64 * 128;
    int kf = 0, vf = 0, it = 0, h = 0;
    PfTile pt;
    int item = ps_next(seqs, n_seqs, tiles, n_q, n_ctx, n_tiles, n_items, blockIdx.x, pt, h);
    // consumer 0 takes the first turn (no hand-over is left pending when the CTA has no item)
    if (c == 1 && item < n_items) named_arrive(PS_TURN, 256);
    while (item < n_items) {
        int nh = 0;
        PfTile nt;
        const int next = ps_next(seqs, n_seqs, tiles, n_q, n_ctx, n_tiles, n_items, item + gridDim.x, nt, nh);
        const bool last_item = next >= n_items;
        const int q_len = pt.q_len, pos0 = pt.pos0, m0 = pt.m0;
        const int n_kt = (ps_keys(pt) + PS_BN - 1) / PS_BN;
        const PwRows rows = pw_rows(m0, q_len, pos0, c);
        const int wq0 = rows.wq0, n_wt = rows.n_wt, n_full = rows.n_full;
        const bool last_half = rows.last_half;

        float o[64], s[64], s2[32];  // s2: S of the 64-key last tile
        u32 p[32];
        pw_zero(o, s, s2, p);
        float m_r[2] = {-INFINITY, -INFINITY};
        float l_r[2] = {0.f, 0.f};

        mbar_wait(bar + PS_QF, it & 1);
        // a warpgroup with no rows here is done with Q at once
        if (n_wt == 0 && lane == 0) mbar_arrive(bar + PS_QE);

        // the stages of tile j (this item's j-th K and V fills)
        auto kst = [&](int j) { return (kf + j) & 1; };
        auto kpar = [&](int j) { return ((kf + j) >> 1) & 1; };
        auto vst = [&](int j) { return (vf + j) & 1; };
        auto vpar = [&](int j) { return ((vf + j) >> 1) & 1; };
        auto release = [&](u32 b) {
            if (lane == 0) mbar_arrive(b);
        };
        // the turn around a burst's MMA issue; consumer 1 skips its very last hand-over (nobody
        // takes the turn after it)
        auto turn_take = [&]() { named_sync(mine, 256); };
        auto turn_give = [&](bool final_burst) {
            if (!(c == 1 && final_burst)) named_arrive(other, 256);
        };
        auto issue_pv = [&](int jp, bool phalf) { pw_issue_pv(o, p, base + PS_V + vst(jp) * PS_VST, phalf); };

        // Burst j < n_wt: S_j over 128 keys, or 64 in the warpgroup's last tile when keys k0 + 64 ..
        // lie past all its rows; P_{j-1}.V_{j-1} behind it.
        auto step = [&](auto cols, int j) {
            constexpr int N = decltype(cols)::n;
            float* sa = N == 128 ? s : s2;
            const int k0 = j * PS_BN;
            mbar_wait(bar + PS_KF + 8 * kst(j), kpar(j));
            if (j > 0) mbar_wait(bar + PS_VF + 8 * vst(j - 1), vpar(j - 1));
            turn_take();
            wg_fence_regs<N / 2>(sa);
            wg_fence_regs<64>(o);
            wg_fence_regs<32>(p);
            wg_fence();
            pw_issue_qk<N>(sa, q_addr, base + PS_K + kst(j) * PS_KST);
            wg_commit();
            if (j > 0) {
                wg_fence();
                issue_pv(j - 1, false);  // tile j - 1 is never this warpgroup's last
            }
            wg_commit();  // an empty group at j = 0 keeps the wait counts below the same
            turn_give(false);  // a computing burst is never the item's last (burst n_kt is)
            wg_wait<1>();  // S_j done; P_{j-1}.V_{j-1} may still run
            wg_fence_regs<N / 2>(sa);
            release(bar + PS_KE + 8 * kst(j));
            if (j == n_wt - 1) release(bar + PS_QE);  // this warpgroup's last Q.K of the item
            // causal mask and online softmax, overlapping P_{j-1}.V_{j-1} and the other's MMAs
            float alpha[2];
            pw_mask_softmax<N>(sa, k0, pos0, wq0, r_lo, cq, sl2, m_r, l_r, alpha);
            wg_wait<0>();
            wg_fence_regs<64>(o);
            wg_fence_regs<32>(p);
            if (j > 0) release(bar + PS_VE + 8 * vst(j - 1));
            pw_rescale_pack<N>(o, p, sa, alpha);
        };

        // bursts 0 .. n_wt - 1 compute (the 64-key last tile peeled out: with Q.K under a
        // condition, or two shapes into the same registers, inside the loop, ptxas serialises
        // every wgmma); burst n_wt issues the last P.V; later bursts only hand stages back
        for (int j = 0; j < n_full; ++j) step(PsCols<128>{}, j);
        if (last_half) step(PsCols<64>{}, n_full);
        for (int b = n_wt; b <= n_kt; ++b) {
            const bool final_burst = last_item && b == n_kt;
            if (b < n_kt) mbar_wait(bar + PS_KF + 8 * kst(b), kpar(b));
            if (b >= 1) mbar_wait(bar + PS_VF + 8 * vst(b - 1), vpar(b - 1));
            turn_take();
            if (b == n_wt && n_wt > 0) {
                wg_fence_regs<64>(o);
                wg_fence_regs<32>(p);
                wg_fence();
                issue_pv(n_wt - 1, last_half);
                wg_commit();
            }
            turn_give(final_burst);
            if (b < n_kt) release(bar + PS_KE + 8 * kst(b));
            if (b == n_wt && n_wt > 0) {
                wg_wait<0>();
                wg_fence_regs<64>(o);
            }
            if (b >= 1) release(bar + PS_VE + 8 * vst(b - 1));
        }
        kf += n_kt;
        vf += n_kt;

        // ---- normalise and store this warpgroup's rows (values computed for every thread, only
        // the stores guarded: a read of the accumulators under a thread-dependent branch makes
        // ptxas serialise the wgmma)
        if (n_wt > 0) {
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                float l = l_r[hf];
                l += __shfl_xor_sync(0xffffffffu, l, 1);
                l += __shfl_xor_sync(0xffffffffu, l, 2);
                const float inv = l > 0.f ? 1.f / l : 0.f;
                const int r = wq0 + r_lo + 8 * hf;
                bf16* dst = out + (long long)(pt.q_row0 + r) * o_rs + h * o_hs + cq;
                u32 v[PS_DV_N8];
#pragma unroll
                for (int jj = 0; jj < PS_DV_N8; ++jj) v[jj] = pf_pack(o[4 * jj + 2 * hf] * inv, o[4 * jj + 2 * hf + 1] * inv);
                if (r < q_len) {
#pragma unroll
                    for (int jj = 0; jj < PS_DV_N8; ++jj) *reinterpret_cast<u32*>(dst + 8 * jj) = v[jj];
                }
            }
        }
        item = next;
        pt = nt;
        h = nh;
        ++it;
    }
}
