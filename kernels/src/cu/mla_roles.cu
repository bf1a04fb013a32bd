// mla_roles.cu: MLA decode attention for sm_90a in three warpgroups with one job each: one
// computes S = Q.K^T and the online softmax, the other two P.V, each on half of the latent columns.
//
// Why a third kernel next to mla_tma.cu: there warpgroup 0 runs S, softmax and P.V_L one after
// another, so nothing keeps the tensor cores busy while it does the softmax (the math alone ran
// at 0.135 ms on batch 64 x 4096 x 128 heads against ~0.093 ms of tensor work, bench/RESULTS.md
// session 10), and S reads Q from shared memory: a m64n64k16 with both operands in shared memory
// moves as many bytes through the SM's shared-memory port as its math takes cycles, so S was
// bound by the port the TMA copies write through as well. Here:
//   warpgroup 0 (208 registers): Q's 576 columns live in its registers as wgmma A fragments (144
//       registers), so S reads only K from shared memory; S of tile i, softmax, P to shared
//       memory, then straight on to S of tile i + 1, which the tensor cores run before the
//       other warpgroups' P.V of tile i (issued after it), so the softmax of tile i + 1 overlaps
//       that P.V: per tile the tensor cores see S, then P.V, with no idle gap;
//   warpgroups 1 and 2 (152 registers): O_L / O_R (latent columns 0..255 / 256..511) += P.V, P
//       read from shared memory.
// Q no longer takes 64 KB of shared memory, which buys a third cache-tile buffer: tile i + 3 is
// issued into tile i's buffer when the last of the three warpgroups is done with it, so each load
// has two tiles' math to land (with two buffers a load issued when P.V of tile i ends would be
// needed almost at once: S of tile i + 2 is issued as P.V of tile i runs).
// One P buffer: warpgroup 0 writes P of tile i + 1 only after P.V of tile i is done, which is
// when the tensor cores get to S of tile i + 2's predecessor anyway (S runs first).
#include "common.cuh"
#include "mla_common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "mla_tma.cuh"

#define MR_TILE (9 * MLA_CHUNK)         // 64 tokens x 576
#define MR_K0 0                         // three tile buffers
#define MR_P (3 * MR_TILE)              // P, 64 x 64 bf16 swizzled
#define MR_ALPHA (MR_P + MLA_CHUNK)     // float[64]: the tile's O rescale
#define MR_L (MR_ALPHA + 256)           // float[64]: row sums at the end
#define MR_M (MR_L + 256)               // float[64]: row maxima at the end
#define MR_BAR (MR_M + 256)             // u64[3][9]: one mbarrier per chunk of each tile buffer
#define MR_BYTES (MR_BAR + 3 * 9 * 8)

// named barriers: P (and its rescale) written (warpgroup 0 -> 1, 2); P read (1, 2 -> 0)
#define MR_NB_PREADY 1
#define MR_NB_PFREE 2

__device__ __forceinline__ void mr_setmaxnreg_inc192() { asm volatile("setmaxnreg.inc.sync.aligned.u32 192;\n" ::: "memory"); }
__device__ __forceinline__ void mr_setmaxnreg_dec160() { asm volatile("setmaxnreg.dec.sync.aligned.u32 160;\n" ::: "memory"); }

// Q's 576 columns of heads h0 .. h0 + 63 as this thread's wgmma A fragments: k-step ks (16
// columns) in rq[4 ks .. 4 ks + 3]; ks 0..31 the latent columns, 32..35 the rope columns.
__device__ __forceinline__ void load_q_frags_all(u32* rq, const bf16* __restrict__ q_abs,
                                                 const bf16* __restrict__ q_pe, int b, int h0, int heads,
                                                 long long qpe_sb, long long qpe_sh, int r_lo, int cq) {
#pragma unroll
    for (int ks = 0; ks < 36; ++ks)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int h = h0 + r_lo + 8 * (i & 1);
            const int col = 16 * ks + cq + 8 * (i >> 1);
            const bf16* src = col < D_LAT ? q_abs + ((size_t)b * heads + h) * D_LAT + col
                                          : q_pe + (size_t)b * qpe_sb + (size_t)h * qpe_sh + (col - D_LAT);
            rq[4 * ks + i] = h < heads ? *reinterpret_cast<const u32*>(src) : 0u;
        }
}

// P (bf16) into the swizzled 64 x 64 shared operand at `sp` (shared address) with stmatrix: one
// x4 store per 16 columns, each of the warp's 8x8 matrices straight from its accumulator
// fragments. Why not store_p_swz's 16 scalar stores: their 16 swizzled addresses are loop
// invariants that ptxas keeps in registers, which warpgroup 0 (Q in 144 of them) has not got.
__device__ __forceinline__ void store_p_stmatrix(u32 sp, const float* p, int wq, int lane) {
    const int r = wq * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
    const u32 row = sp + r * 128;
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
        u32 v[4];
#pragma unroll
        for (int m = 0; m < 4; ++m) {  // matrix m: columns 8 (j + m / 2), rows + 8 (m % 2)
            const int k = 4 * (j + m / 2) + 2 * (m % 2);
            const __nv_bfloat162 h = __floats2bfloat162_rn(p[k], p[k + 1]);
            v[m] = *reinterpret_cast<const u32*>(&h);
        }
        const u32 addr = row + ((((j + (lane >> 4)) ^ (lane & 7))) << 4);
        asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v[0]),
                     "r"(v[1]), "r"(v[2]), "r"(v[3])
                     : "memory");
    }
}

// S[64 x 64] = Q . K^T over the tile in `kbuf` with Q from registers, waiting for each chunk's
// copy, the rope chunk (8) first. Committed as one wgmma group (not waited for).
__device__ __forceinline__ void tile_qk_regs(float* s, const u32* rq, u32 kbuf, u32 bars, u32 parity) {
    mbar_wait(bars + 8 * 8, parity);
    wg_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
        wgmma_m64n64_rs(s, rq + 4 * (32 + ks), wg_desc(kbuf + 8 * MLA_CHUNK + ks * 32, 16, 1024), ks > 0 ? 1 : 0);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        mbar_wait(bars + c * 8, parity);
#pragma unroll
        for (int ks = 0; ks < 4; ++ks)
            wgmma_m64n64_rs(s, rq + 4 * (4 * c + ks), wg_desc(kbuf + c * MLA_CHUNK + ks * 32, 16, 1024), 1);
    }
    wg_commit();
}

// Same outputs and arguments as mla_decode_tma_bf16: grid (ceil(H/64), B, splits), 384 threads,
// MR_BYTES + 1024 bytes of dynamic shared memory; splits cut at 64 tokens; the cache read through
// `cache_map` (a 2-D tensor map [slots, 576] bf16, box {64, min(block_size, 64)}, 128-byte swizzle).
extern "C" __global__ void __launch_bounds__(384, 1)
mla_decode_roles_bf16(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe,
                      const int* __restrict__ block_table, const int* __restrict__ seq_lens, bf16* __restrict__ out,
                      float* __restrict__ o_part, float* __restrict__ lse, int heads, int block_size, int max_blocks,
                      int splits, float scale, long long qpe_sb, long long qpe_sh,
                      const __grid_constant__ TmaMap cache_map) {
    griddep_wait();
    extern __shared__ __align__(1024) unsigned char mr_smem_raw[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(
        (reinterpret_cast<size_t>(mr_smem_raw) + 1023) & ~(size_t)1023);
    float* s_alpha = reinterpret_cast<float*>(smem + MR_ALPHA);
    float* s_l = reinterpret_cast<float*>(smem + MR_L);
    float* s_m = reinterpret_cast<float*>(smem + MR_M);
    const u32 base = smem_addr(smem);

    const int hg = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
    // warp-uniform to ptxas (tid / 128 is not, and wgmma under a branch on it is serialised)
    const int tid = threadIdx.x, wg = __shfl_sync(0xffffffffu, tid / 128, 0), lane = tid % WARP, wq = (tid % 128) / WARP;
    const int h0 = hg * 64;
    const int len = seq_lens[b];
    const int per = split_tokens(len, splits, 64);
    const int start = split * per;
    const int end = min(len, start + per);
    const int* btab = block_table + (size_t)b * max_blocks;
    const int r_lo = wq * 16 + lane / 4, cq = (lane % 4) * 2;
    if (start >= end) {
        tma_decode_empty(out, lse, b, split, splits, heads, h0);
        return;
    }
    const int ntiles = (end - start + 63) / 64;
    // tile i lives in buffer i % 3; its chunks' barriers complete for the (i / 3)-th time
    auto kbuf = [&](int i) -> u32 { return base + MR_K0 + (i % 3) * MR_TILE; };
    auto bars = [&](int i) -> u32 { return base + MR_BAR + (i % 3) * 9 * 8; };
    auto parity = [&](int i) -> u32 { return (u32)((i / 3) & 1); };

    if (tid == 0) {
        for (int i = 0; i < 27; ++i) mbar_init(base + MR_BAR + 8 * i, 1);
        mbar_init_fence();
    }
    // Rows of the last tile that are never loaded (past `end`) must not hold NaN from whatever ran
    // on this SM before: P is 0 there, but 0 * NaN is NaN. A buffer that held an earlier tile
    // holds finite values, so only a first use needs the zeros.
    if ((end - start) % 64 != 0 && ntiles <= 3) {
        unsigned char* kb = smem + MR_K0 + ((ntiles - 1) % 3) * MR_TILE;
        for (int i = tid; i < MR_TILE / 16; i += 384) *reinterpret_cast<uint4*>(kb + i * 16) = make_uint4(0, 0, 0, 0);
    }
    fence_async_smem();  // the zeros (generic writes) before TMA writes and wgmma reads
    __syncthreads();
    auto issue = [&](int i) {
        const int t = start + 64 * i;
        tile_issue(kbuf(i), bars(i), &cache_map, btab, block_size, t, end, 8, 9);
        tile_issue(kbuf(i), bars(i), &cache_map, btab, block_size, t, end, 0, 8);
    };
    if (tid == 0) {
        for (int i = 0; i < min(ntiles, 3); ++i) issue(i);
    }
    if (wg == 0) {
        mr_setmaxnreg_inc192();
        const float sl2 = scale * 1.4426950408889634f;
        u32 rq[144];
        load_q_frags_all(rq, q_abs, q_pe, b, h0, heads, qpe_sb, qpe_sh, r_lo, cq);
        float s[32];
        float l_acc[2] = {0.f, 0.f};
        float m_run[2] = {-INFINITY, -INFINITY};
        for (int i = 0; i < ntiles; ++i) {
            tile_qk_regs(s, rq, kbuf(i), bars(i), parity(i));
            wg_wait<0>();
            wg_fence_regs<32>(s);
            float mx[2], alpha[2], sum[2];
            tile_rowmax(s, start + 64 * i, cq, end, sl2, mx);
#pragma unroll
            for (int hlf = 0; hlf < 2; ++hlf) {
                const float m_new = fmaxf(m_run[hlf], mx[hlf]);  // finite: the tile's first token is valid
                alpha[hlf] = exp2f(m_run[hlf] - m_new);          // 0 on the first tile
                m_run[hlf] = m_new;
            }
            u32 pa[16];
            tile_exp(s, m_run, pa, sum);
            l_acc[0] = l_acc[0] * alpha[0] + sum[0];
            l_acc[1] = l_acc[1] * alpha[1] + sum[1];
            if (i >= 1) named_sync(MR_NB_PFREE, 384);  // P.V of tile i - 1 is done with P and alpha
            store_p_stmatrix(base + MR_P, s, wq, lane);
            if ((lane & 3) == 0) {
                s_alpha[r_lo] = alpha[0];
                s_alpha[r_lo + 8] = alpha[1];
            }
            fence_async_smem();
            named_arrive(MR_NB_PREADY, 384);
            // P.V of tile i - 1 is done (the sync above), and S of it long before: its buffer
            // takes tile i + 2. Here rather than in the last warpgroup to finish P.V, so that the
            // P.V warpgroups hold no copy state (their registers are O's).
            if (tid == 0 && i >= 1 && i + 2 < ntiles) issue(i + 2);
        }
        // the row sums over the quad, and the maxima, for the warpgroups that hold O
#pragma unroll
        for (int hlf = 0; hlf < 2; ++hlf) {
            l_acc[hlf] += __shfl_xor_sync(0xffffffffu, l_acc[hlf], 1);
            l_acc[hlf] += __shfl_xor_sync(0xffffffffu, l_acc[hlf], 2);
        }
        if ((lane & 3) == 0) {
            s_l[r_lo] = l_acc[0];
            s_l[r_lo + 8] = l_acc[1];
            s_m[r_lo] = m_run[0];
            s_m[r_lo + 8] = m_run[1];
        }
        __syncthreads();
    } else {
        mr_setmaxnreg_dec160();
        const int half = wg - 1;  // latent columns 256 half ..
        float o[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] = 0.f;
        // descriptors built once and stepped: ptxas keeps every loop-invariant descriptor of
        // an unrolled loop in registers otherwise, and these warpgroups' registers are O's
        const u64 dp = wg_desc(base + MR_P, 16, 1024);
        u64 dv = wg_desc(base + MR_K0 + 4 * half * MLA_CHUNK, MLA_CHUNK, 1024);
        const float* alpha_row = s_alpha + r_lo;
        for (int i = 0; i < ntiles; ++i) {
            named_sync(MR_NB_PREADY, 384);
            scale_o_rows(o, alpha_row[0], alpha_row[8]);
            wg_fence();
#pragma unroll 1
            for (int kk = 0; kk < 4; ++kk)
                wgmma_m64n256_ss_tn(o, dp + 2 * kk, dv + 128 * kk, 1);  // +32 B of P, +16 rows of V
            wg_commit();
            wg_wait<0>();
            wg_fence_regs<128>(o);
            dv = (i % 3 == 2) ? dv - 2 * (MR_TILE >> 4) : dv + (MR_TILE >> 4);
            if (i + 1 < ntiles) named_arrive(MR_NB_PFREE, 384);  // warpgroup 0 syncs before each later P
        }
        __syncthreads();
#pragma unroll
        for (int hlf = 0; hlf < 2; ++hlf) {
            const int row = r_lo + 8 * hlf;
            const int h = h0 + row;
            if (h >= heads) continue;
            const float l = s_l[row];
            const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
            for (int j = 0; j < 32; ++j) {
                const int c = 256 * half + 8 * j + cq;
                const float o0 = o[4 * j + 2 * hlf] * inv, o1 = o[4 * j + 2 * hlf + 1] * inv;
                if (splits == 1) {
                    *reinterpret_cast<__nv_bfloat162*>(out + ((size_t)b * heads + h) * D_LAT + c) =
                        __floats2bfloat162_rn(o0, o1);
                } else {
                    *reinterpret_cast<float2*>(o_part + (((size_t)b * splits + split) * heads + h) * D_LAT + c) =
                        make_float2(o0, o1);
                }
            }
            if (splits > 1 && half == 0 && (lane & 3) == 0) {
                lse[((size_t)b * splits + split) * heads + h] =
                    l > 0.f ? (s_m[row] + log2f(l)) * 0.6931471805599453f : -INFINITY;
            }
        }
    }
}
