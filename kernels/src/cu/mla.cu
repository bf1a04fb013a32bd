// mla.cu: MLA decode attention over the paged latent cache with absorbed weights, the split-K
// combine, and the latent cache append.
//
// Decode kernel (tensor cores through mma.sync m16n8k16 bf16 -> f32, operands via ldmatrix): a CTA owns one sequence, 64
// heads and one slice of the context. Per 32-token tile of cache (576 = 512 latent + 64 rope values):
//   S[64 x 32] = Q[64 x 576] . K[32 x 576]^T      (Q = q_abs | q_pe, K = cache rows)
//   online softmax (f32, exp2 with the scale folded in)
//   O[64 x 512] = O * alpha + P[64 x 32] . V[32 x 512]   (V = first 512 values of the same cache rows)
// The cache tile is loaded once into shared memory and used by all 64 heads of the CTA; the second
// head-group CTA of the same sequence reads the same tiles, mostly from L2.
#include "common.cuh"
#include "mla_common.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

#define HB 64           // heads per CTA
#define TN 32           // tokens per tile
#define SROW (D_QK + 8) // padded smem row (bf16): 292 words, rows land 4 banks apart
#define NTHREADS 256

struct MlaSmem {
    bf16 q[HB * SROW];
    bf16 k[2][TN * SROW];
    float s[HB * (TN + 1)];
    bf16 p[HB * (TN + 8)];
    float alpha[HB];
    float m_fin[HB];
    float l_fin[HB];
};

// Load cache tokens [t0, t0 + TN) of sequence b into a smem tile; tokens >= end become zeros.
__device__ __forceinline__ void load_k_tile(bf16* dst, const bf16* __restrict__ cache,
                                            const int* __restrict__ btab, int block_size, int t0, int end) {
    // TN rows x 72 chunks of 16 bytes
    for (int c = threadIdx.x; c < TN * (D_QK / 8); c += NTHREADS) {
        int r = c / (D_QK / 8), col = (c % (D_QK / 8)) * 8;
        int t = t0 + r;
        bool valid = t < end;
        const bf16* src = cache;
        if (valid) {
            int blk = btab[t / block_size];
            src = cache + ((size_t)blk * block_size + (t % block_size)) * D_QK + col;
        }
        cp_async16(dst + r * SROW + col, src, valid);
    }
}

// grid (ceil(H/64), B, splits). q_abs [B, H, 512], q_pe [B, H, 64] with element strides qpe_sb,
// qpe_sh between sequences and heads (it may be the rope part of the q projection in place),
// cache [blocks, block_size, 576],
// block_table [B, max_blocks] (i32), seq_lens [B] (i32).
// splits == 1: out [B, H, 512] bf16 = softmax(scale * q.k) . c.
// splits  > 1: o_part [B, splits, H, 512] f32 (normalised per split) and lse [B, splits, H] f32;
// sequence b's split s covers tokens [s * per, (s + 1) * per) with per = split_tokens(len_b, ...);
// a split with no tokens writes only lse = -inf (its o_part is left unwritten).
extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
mla_decode_bf16(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe, const bf16* __restrict__ cache,
                const int* __restrict__ block_table, const int* __restrict__ seq_lens, bf16* __restrict__ out,
                float* __restrict__ o_part, float* __restrict__ lse, int heads, int block_size,
                int max_blocks, int splits, float scale, long long qpe_sb,
                long long qpe_sh) {
    griddep_wait();
    extern __shared__ __align__(16) unsigned char smem_raw[];
    MlaSmem& sm = *reinterpret_cast<MlaSmem*>(smem_raw);
    const int hg = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
    const int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
    const int h0 = hg * HB;
    const int len = seq_lens[b];
    const int per = split_tokens(len, splits, TN);
    const int start = split * per;
    const int end = min(len, start + per);
    const int* btab = block_table + (size_t)b * max_blocks;
    const float sl2 = scale * 1.4426950408889634f;  // scale * log2(e): softmax via exp2
    if (splits > 1 && start >= len) {  // nothing to attend: the combine skips a -inf split
        empty_split(lse, b, split, splits, heads, h0);
        return;
    }

    // Q tile: rows are heads h0 .. h0+63 (zeros past `heads`), cols 0..511 q_abs, 512..575 q_pe.
    for (int c = tid; c < HB * (D_QK / 8); c += NTHREADS) {
        int r = c / (D_QK / 8), col = (c % (D_QK / 8)) * 8;
        const bf16x8 v = load_q8(q_abs, q_pe, b, h0 + r, heads, col, qpe_sb, qpe_sh);
        *reinterpret_cast<bf16x8*>(&sm.q[r * SROW + col]) = v;
    }

    // Per-thread O accumulators: warp owns output columns [64*warp, 64*warp+64) for all 64 rows:
    // 4 m-tiles x 8 n-tiles x 4 floats.
    float acc[4][8][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
            for (int x = 0; x < 4; ++x) acc[mi][ni][x] = 0.f;

    // softmax state: 4 threads per row, row = tid / 4
    const int srow = tid / 4, squad = tid % 4;
    float m_run = -INFINITY, l_run = 0.f;

    const int ntiles = end > start ? (end - start + TN - 1) / TN : 0;
    if (ntiles > 0) load_k_tile(sm.k[0], cache, btab, block_size, start, end);
    cp_async_commit();

    for (int it = 0; it < ntiles; ++it) {
        const int t0 = start + it * TN;
        if (it + 1 < ntiles) load_k_tile(sm.k[(it + 1) & 1], cache, btab, block_size, t0 + TN, end);
        cp_async_commit();
        cp_async_wait_all_but_one();
        __syncthreads();
        const bf16* kt = sm.k[it & 1];

        // ---- S = Q K^T: warp -> m-tile warp/2, n-tiles 2*(warp%2) and +1
        {
            const int mt = warp / 2, nt0 = (warp % 2) * 2;
            // two accumulator chains per output tile (even / odd k-steps): a single chain of 36
            // dependent mma per tile leaves the tensor cores waiting on mma latency
            float sacc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
            float sacc2[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
            // A (Q rows): matrices (r0, k), (r0+8, k), (r0, k+8), (r0+8, k+8)
            const bf16* qa = sm.q + (mt * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * SROW + (lane / 16) * 8;
            // B (K rows = n): matrices (n0, k), (n0, k+8), (n0+8, k), (n0+8, k+8)
            const bf16* kb = kt + (nt0 * 8 + (lane % 8) + (lane / 16) * 8) * SROW + ((lane / 8) % 2) * 8;
#pragma unroll 3
            for (int kk = 0; kk < D_QK; kk += 32) {
                u32 a[4], b[4], a2[4], b2[4];
                ldsm_x4(a, qa + kk);
                ldsm_x4(b, kb + kk);
                ldsm_x4(a2, qa + kk + 16);
                ldsm_x4(b2, kb + kk + 16);
                mma_bf16(sacc[0], a, b);
                mma_bf16(sacc[1], a, b + 2);
                mma_bf16(sacc2[0], a2, b2);
                mma_bf16(sacc2[1], a2, b2 + 2);
            }
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int x = 0; x < 4; ++x) sacc[j][x] += sacc2[j][x];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                int r = mt * 16 + lane / 4, c = (nt0 + j) * 8 + (lane % 4) * 2;
                sm.s[r * (TN + 1) + c] = sacc[j][0];
                sm.s[r * (TN + 1) + c + 1] = sacc[j][1];
                sm.s[(r + 8) * (TN + 1) + c] = sacc[j][2];
                sm.s[(r + 8) * (TN + 1) + c + 1] = sacc[j][3];
            }
        }
        __syncthreads();

        // ---- online softmax: row srow, columns squad*8 .. +8
        {
            float v[8];
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                int c = squad * 8 + j;
                v[j] = (t0 + c < end) ? sm.s[srow * (TN + 1) + c] * sl2 : -INFINITY;
                mx = fmaxf(mx, v[j]);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float m_new = fmaxf(m_run, mx);  // finite: every tile has at least one valid token
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float p = exp2f(v[j] - m_new);
                bf16 pb = __float2bfloat16_rn(p);
                sum += __bfloat162float(pb);  // sum what the PV product will actually use
                sm.p[srow * (TN + 8) + squad * 8 + j] = pb;
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            float alpha = exp2f(m_run - m_new);  // m_run = -inf on the first tile -> 0
            l_run = l_run * alpha + sum;
            m_run = m_new;
            if (squad == 0) sm.alpha[srow] = alpha;
        }
        __syncthreads();

        // ---- O = O * alpha + P V
        {
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                float a_lo = sm.alpha[mi * 16 + lane / 4], a_hi = sm.alpha[mi * 16 + lane / 4 + 8];
#pragma unroll
                for (int ni = 0; ni < 8; ++ni) {
                    acc[mi][ni][0] *= a_lo;
                    acc[mi][ni][1] *= a_lo;
                    acc[mi][ni][2] *= a_hi;
                    acc[mi][ni][3] *= a_hi;
                }
            }
#pragma unroll
            for (int kk = 0; kk < TN; kk += 16) {
                u32 bf[8][2];
                // V stored [token k][dim n]: matrices (k, n0), (k+8, n0), (k, n0+8), (k+8, n0+8), transposed
                const bf16* vb = kt + (kk + (lane % 8) + ((lane / 8) % 2) * 8) * SROW + warp * 64 + (lane / 16) * 8;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    u32 r[4];
                    ldsm_x4_t(r, vb + j * 16);
                    bf[2 * j][0] = r[0];
                    bf[2 * j][1] = r[1];
                    bf[2 * j + 1][0] = r[2];
                    bf[2 * j + 1][1] = r[3];
                }
#pragma unroll
                for (int mi = 0; mi < 4; ++mi) {
                    u32 a[4];
                    ldsm_x4(a, sm.p + (mi * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * (TN + 8) + kk + (lane / 16) * 8);
#pragma unroll
                    for (int ni = 0; ni < 8; ++ni) mma_bf16(acc[mi][ni], a, bf[ni]);
                }
            }
        }
        __syncthreads();  // the next iteration overwrites this K buffer and S/P
    }
    cp_async_wait_all();

    if (squad == 0) {
        sm.m_fin[srow] = m_run;
        sm.l_fin[srow] = l_run;
    }
    __syncthreads();

    // ---- write: rows (heads) mi*16 + lane/4 (+8), columns warp*64 + ni*8 + (lane%4)*2 (+1)
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            int r = mi * 16 + lane / 4 + half * 8;
            int h = h0 + r;
            if (h >= heads) continue;
            float l = sm.l_fin[r];
            float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
            for (int ni = 0; ni < 8; ++ni) {
                int c = warp * 64 + ni * 8 + (lane % 4) * 2;
                float o0 = acc[mi][ni][half * 2] * inv, o1 = acc[mi][ni][half * 2 + 1] * inv;
                if (splits == 1) {
                    *reinterpret_cast<__nv_bfloat162*>(out + ((size_t)b * heads + h) * D_LAT + c) =
                        __floats2bfloat162_rn(o0, o1);
                } else {
                    *reinterpret_cast<float2*>(o_part + (((size_t)b * splits + split) * heads + h) * D_LAT + c) =
                        make_float2(o0, o1);
                }
            }
        }
    }
    if (splits > 1 && tid < HB && h0 + tid < heads) {
        float l = sm.l_fin[tid];
        // lse in natural-log units of scale*q.k; -inf for an empty split
        lse[((size_t)b * splits + split) * heads + h0 + tid] =
            l > 0.f ? (sm.m_fin[tid] + log2f(l)) * 0.6931471805599453f : -INFINITY;
    }
}

// ---------------------------------------------------------------------------------------------
// Decode kernel for sm_90a: warpgroup MMA (wgmma) with both operands in shared memory.
//
// A CTA owns one sequence, 64 heads and one context slice: 2 warpgroups (256 threads). Per
// 64-token tile of cache:
//   S = Q . K^T        each warpgroup computes 32 of the 64 tokens (wgmma m64n32k16, 36 k-steps)
//   online softmax     row max exchanged between the two warpgroups through shared memory
//   O += P . V         each warpgroup owns 256 of the 512 output columns (wgmma m64n256k16, 4 k-steps)
// Q, the K tiles and P live in shared memory in the canonical 128-byte-swizzled layout: a 64-row
// operand is stored as 64-column chunks of 64 rows x 128 B, and inside every 8-row x 128 B block the
// 16-byte piece j of row r sits at piece j ^ (r % 8). The same cache tile bytes are the K operand
// of S (K-major) and the V operand of P.V (MN-major, transposed descriptor): the latent is
// contiguous in both views, which is why MLA can share one copy of the tile.
// Why wgmma: the mma.sync kernel above tops out at ~119 TFLOP/s (bench/RESULTS.md, P1) while this
// shape needs ~500 TFLOP/s of tensor work to read the cache at half the copy bandwidth.

#define WG_TN 64                          // tokens per tile
#define WG_CHUNK (64 * 128)               // one 64-column chunk of a 64-row operand, bytes
#define WG_TILE (9 * WG_CHUNK)            // 64 rows x 576 bf16
#define WG_SMEM_P (3 * WG_TILE)           // offsets inside the 1024-aligned dynamic smem
#define WG_SMEM_RED (WG_SMEM_P + WG_CHUNK)
#define WG_SMEM_BYTES (WG_SMEM_RED + 2 * 2 * 64 * 4)

// Load cache tokens [t0, t0 + 64) of one sequence into a swizzled tile; tokens >= end become zeros.
// Thread t copies row t / 4 (one block-table lookup per tile), 16-byte pieces p = t % 4 + 4 i
// (i = 0..17): four neighbouring threads read 64 contiguous bytes, and with i unrolled the
// swizzled destination is a shift and an xor. (A per-piece division by 72 and a block-table
// load per piece cost ~700 instructions per thread per tile, issued while the tensor cores waited.)
__device__ __forceinline__ void wg_load_tile(unsigned char* dst, const bf16* __restrict__ cache,
                                             const int* __restrict__ btab, int block_size, int t0, int end) {
    const int r = threadIdx.x >> 2, q = threadIdx.x & 3;
    const int t = t0 + r;
    const bool valid = t < end;
    const bf16* src = cache;
    if (valid) src = cache + ((size_t)btab[t / block_size] * block_size + (t % block_size)) * D_QK;
    unsigned char* drow = dst + r * 128;
    const int rx = r & 7;
#pragma unroll
    for (int i = 0; i < D_QK / 32; ++i) {
        const int piece = q + 4 * (i & 1);  // 16-byte piece within the 128-byte chunk
        cp_async16(drow + (i >> 1) * WG_CHUNK + ((piece ^ rx) << 4), src + (i >> 1) * 64 + piece * 8, valid);
    }
}

// Same arguments and outputs as mla_decode_bf16 (heads in groups of 64, splits cut at 64 tokens).
extern "C" __global__ void __launch_bounds__(256, 1)
mla_decode_wgmma_bf16(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe, const bf16* __restrict__ cache,
                      const int* __restrict__ block_table, const int* __restrict__ seq_lens, bf16* __restrict__ out,
                      float* __restrict__ o_part, float* __restrict__ lse, int heads, int block_size,
                      int max_blocks, int splits, float scale, long long qpe_sb,
                      long long qpe_sh) {
    griddep_wait();
    extern __shared__ __align__(1024) unsigned char wg_smem_raw[];
    // the swizzle is applied by the hardware on address bits 4..9: operands must be 1024-aligned
    unsigned char* smem = reinterpret_cast<unsigned char*>(
        (reinterpret_cast<size_t>(wg_smem_raw) + 1023) & ~(size_t)1023);
    unsigned char* sq = smem;
    unsigned char* sk0 = smem + WG_TILE;
    unsigned char* sk1 = smem + 2 * WG_TILE;
    unsigned char* sp = smem + WG_SMEM_P;
    float* red_max = reinterpret_cast<float*>(smem + WG_SMEM_RED);  // [2][64]
    float* red_l = red_max + 2 * 64;                                // [2][64]

    const int hg = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
    const int tid = threadIdx.x, wg = tid / 128, lane = tid % WARP, wq = (tid % 128) / WARP;
    const int h0 = hg * 64;
    const int len = seq_lens[b];
    const int per = split_tokens(len, splits, WG_TN);
    const int start = split * per;
    const int end = min(len, start + per);
    const int* btab = block_table + (size_t)b * max_blocks;
    const float sl2 = scale * 1.4426950408889634f;
    if (splits > 1 && start >= len) {
        empty_split(lse, b, split, splits, heads, h0);
        return;
    }

    // the first tile's copies before Q's loads (their buffers differ, and the barrier at the top of
    // the loop covers both): at batch 1 the kernel is a chain of round trips, this removes one
    const int ntiles = end > start ? (end - start + WG_TN - 1) / WG_TN : 0;
    if (ntiles > 0) wg_load_tile(sk0, cache, btab, block_size, start, end);
    cp_async_commit();

    // Q: rows are heads h0 .. h0+63 (zeros past `heads`), cols 0..511 q_abs, 512..575 q_pe
    for (int c = tid; c < 64 * (D_QK / 8); c += 256) {
        int r = c / (D_QK / 8), col = (c % (D_QK / 8)) * 8;
        const bf16x8 v = load_q8(q_abs, q_pe, b, h0 + r, heads, col, qpe_sb, qpe_sh);
        *reinterpret_cast<bf16x8*>(sq + wg_swz(r, col)) = v;
    }

    // accumulator rows of this thread (wgmma D layout): r_lo and r_lo + 8
    const int r_lo = wq * 16 + lane / 4;
    const int cq = (lane % 4) * 2;
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_part[2] = {0.f, 0.f};

    const u32 q_addr = (u32)__cvta_generic_to_shared(sq);
    const u32 k_addr0 = (u32)__cvta_generic_to_shared(sk0);
    const u32 p_addr = (u32)__cvta_generic_to_shared(sp);

    for (int it = 0; it < ntiles; ++it) {
        const int t0 = start + it * WG_TN;
        cp_async_wait_all();
        fence_async_smem();
        __syncthreads();  // tile `it` (and Q) visible to wgmma; every warpgroup is done with tile it-1
        const u32 kt = k_addr0 + (it & 1) * WG_TILE;

        // ---- S[64 x 32] for tokens t0 + 32*wg ..
        float s[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) s[i] = 0.f;
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < D_QK / 16; ++ks) {
            const u32 koff = (ks >> 2) * WG_CHUNK + (ks & 3) * 32;
            u64 da = wg_desc(q_addr + koff, 16, 1024);
            u64 db = wg_desc(kt + koff + wg * 32 * 128, 16, 1024);
            wgmma_m64n32_ss(s, da, db, ks > 0 ? 1 : 0);
        }
        wg_commit();
        // the next tile's loads are issued while the tensor cores work on S (its buffer was last
        // read by tile it-1's P.V, finished before the barrier above)
        if (it + 1 < ntiles) wg_load_tile((it & 1) ? sk0 : sk1, cache, btab, block_size, t0 + WG_TN, end);
        cp_async_commit();
        wg_wait0();

        // ---- online softmax; this thread: rows r_lo (s[4j], s[4j+1]) and r_lo+8 (s[4j+2], s[4j+3]),
        // token columns 32*wg + 8j + cq (+1)
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                int t = t0 + 32 * wg + 8 * j + cq + (x & 1);
                float v = t < end ? s[4 * j + x] * sl2 : -INFINITY;
                s[4 * j + x] = v;
                mx[x >> 1] = fmaxf(mx[x >> 1], v);
            }
#pragma unroll
        for (int hlf = 0; hlf < 2; ++hlf) {
            mx[hlf] = fmaxf(mx[hlf], __shfl_xor_sync(0xffffffffu, mx[hlf], 1));
            mx[hlf] = fmaxf(mx[hlf], __shfl_xor_sync(0xffffffffu, mx[hlf], 2));
        }
        if ((lane & 3) == 0) {
            red_max[wg * 64 + r_lo] = mx[0];
            red_max[wg * 64 + r_lo + 8] = mx[1];
        }
        __syncthreads();
        float alpha[2];
#pragma unroll
        for (int hlf = 0; hlf < 2; ++hlf) {
            int r = r_lo + 8 * hlf;
            // finite: token t0 is valid, so one of the two halves has a finite maximum
            float m_new = fmaxf(m_run[hlf], fmaxf(red_max[r], red_max[64 + r]));
            alpha[hlf] = exp2f(m_run[hlf] - m_new);  // 0 on the first tile (m_run = -inf)
            m_run[hlf] = m_new;
            l_part[hlf] *= alpha[hlf];
        }
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int hlf = 0; hlf < 2; ++hlf) {
                float p0 = exp2f(s[4 * j + 2 * hlf] - m_run[hlf]);
                float p1 = exp2f(s[4 * j + 2 * hlf + 1] - m_run[hlf]);
                __nv_bfloat162 pb = __floats2bfloat162_rn(p0, p1);
                float2 pf = __bfloat1622float2(pb);
                l_part[hlf] += pf.x + pf.y;  // sum what the PV product will actually use
                *reinterpret_cast<__nv_bfloat162*>(sp + wg_swz(r_lo + 8 * hlf, 32 * wg + 8 * j + cq)) = pb;
            }
#pragma unroll
        for (int j = 0; j < 32; ++j) {
            o[4 * j] *= alpha[0];
            o[4 * j + 1] *= alpha[0];
            o[4 * j + 2] *= alpha[1];
            o[4 * j + 3] *= alpha[1];
        }
        fence_async_smem();
        __syncthreads();  // P complete

        // ---- O[64 x 256 of this warpgroup] += P[64 x 64] . V[64 x 256]
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < WG_TN / 16; ++kk) {
            u64 da = wg_desc(p_addr + kk * 32, 16, 1024);
            // V: N = latent columns 256*wg .. (4 chunks, 8 KB apart = LBO), K = tokens 16*kk ..
            // (8-token groups 1 KB apart = SBO)
            u64 db = wg_desc(kt + (4 * wg) * WG_CHUNK + kk * 16 * 128, WG_CHUNK, 1024);
            wgmma_m64n256_ss_tn(o, da, db, 1);
        }
        wg_commit();
        wg_wait0();
    }
    griddep_launch_dependents();
    cp_async_wait_all();

    wg2_store_rows(o, l_part, m_run, red_l, out, o_part, lse, b, split, splits, heads, h0, wg, r_lo, cq);
}

// The split-KV combine: the split weights are computed once into shared memory by all threads
// together, then each thread sums its 4 columns over the splits.
#define COMBINE_MAX_SPLITS 1024

// The split weights of row (b, h) into w_s (0 for an empty split, whose partial is never read);
// returns 1 / their sum. All of the block's 128 threads take part (two block reductions through
// red[4]; combine_cols4's 4 columns a thread cover the 512 latent columns at 128 threads).
__device__ __forceinline__ float combine_weights(const float* __restrict__ lse_bh, int heads, int splits,
                                                 float* w_s, float* red) {
    const int tid = threadIdx.x, nw = blockDim.x / 32;
    float mx = -INFINITY;
    for (int s = tid; s < splits; s += blockDim.x) mx = fmaxf(mx, lse_bh[(size_t)s * heads]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (tid % 32 == 0) red[tid / 32] = mx;
    __syncthreads();
    mx = red[0];
    for (int i = 1; i < nw; ++i) mx = fmaxf(mx, red[i]);
    __syncthreads();  // red is reused below
    float den = 0.f;
    for (int s = tid; s < splits; s += blockDim.x) {
        const float l = lse_bh[(size_t)s * heads];
        const float w = l == -INFINITY ? 0.f : __expf(l - mx);
        w_s[s] = w;
        den += w;
    }
    for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
    if (tid % 32 == 0) red[tid / 32] = den;
    __syncthreads();
    den = 0.f;
    for (int i = 0; i < nw; ++i) den += red[i];
    return den > 0.f ? 1.f / den : 0.f;
}

// Four columns c..c+3 of row (b, h) summed over the splits in order, COMBINE_BATCH loads in
// flight at a time: at batch 1 the combine is a chain of L2 round trips (one per batch of
// splits), and a short context's live splits (9 at 544 tokens) then take one round, not three as
// with 4 at a time. The order of the sum is fixed (split order), so results are reproducible and
// do not depend on the batch size.
#define COMBINE_BATCH 16
__device__ __forceinline__ float4 combine_cols4(const float* __restrict__ base, size_t split_stride, int splits,
                                                const float* w_s) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < splits; s0 += COMBINE_BATCH) {
        float4 v[COMBINE_BATCH];
        float w[COMBINE_BATCH];
#pragma unroll
        for (int u = 0; u < COMBINE_BATCH; ++u) {
            const int s = s0 + u;
            w[u] = s < splits ? w_s[s] : 0.f;
            v[u] = w[u] != 0.f ? *reinterpret_cast<const float4*>(base + s * split_stride)
                               : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < COMBINE_BATCH; ++u) {
            acc.x += w[u] * v[u].x;
            acc.y += w[u] * v[u].y;
            acc.z += w[u] * v[u].z;
            acc.w += w[u] * v[u].w;
        }
    }
    return acc;
}

// grid (B, H), 128 threads: out[b, h, :] = sum_s o_part[b, s, h, :] * exp(lse_s - max) / sum exp(...)
extern "C" __global__ void __launch_bounds__(128)
mla_combine_bf16(const float* __restrict__ o_part, const float* __restrict__ lse, bf16* __restrict__ out,
                 int heads, int splits) {
    griddep_wait();
    __shared__ float w_s[COMBINE_MAX_SPLITS];
    __shared__ float red[4];
    const int b = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    const float inv = combine_weights(lse + (size_t)b * splits * heads + h, heads, splits, w_s, red);
    const float4 acc = combine_cols4(o_part + ((size_t)b * splits * heads + h) * D_LAT + tid * 4,
                                     (size_t)heads * D_LAT, splits, w_s);
    bf16* o = out + ((size_t)b * heads + h) * D_LAT + tid * 4;
    *reinterpret_cast<__nv_bfloat162*>(o) = __floats2bfloat162_rn(acc.x * inv, acc.y * inv);
    *reinterpret_cast<__nv_bfloat162*>(o + 2) = __floats2bfloat162_rn(acc.z * inv, acc.w * inv);
}

// The combine and the value up-projection in one launch (decode at few rows, where each is a
// launch of a few microseconds): grid (B * H, dv / UV_COLS), 128 threads. Row (b, h)'s combined
// latent, rounded to bf16 as the combine's output is, goes to shared memory; then each warp
// takes UV_COLS / 4 of the block's output columns: out[b, h, c] = bf16(ctx . W_UV_h[c]) with
// W_UV_h[c] the 512 bf16 at w_uv + h * w_head + c * 512 (kv_b's value rows), the product the
// [N, K] GEMV's (f32 sum, rounded once). Every column block recombines its row (16 KB of f32
// partials at 8 splits, from L2): cheaper than a launch.
#define UV_COLS 32
extern "C" __global__ void __launch_bounds__(128)
mla_combine_uv_bf16(const float* __restrict__ o_part, const float* __restrict__ lse,
                    const bf16* __restrict__ w_uv, long long w_head, bf16* __restrict__ out, int heads,
                    int splits, int dv) {
    __shared__ float w_s[COMBINE_MAX_SPLITS];
    __shared__ float red[4];
    __shared__ __align__(16) float ctx[D_LAT];
    const int b = blockIdx.x / heads, h = blockIdx.x % heads, tid = threadIdx.x;
    const int warp = tid / WARP, lane = tid % WARP;
    constexpr int PER_WARP = UV_COLS / 4;
    // W_UV's rows first, before griddep_wait (weights, common.cuh): with PDL they load while the
    // decode kernel finishes, and without it they are in flight while the combine below waits
    // on the partials
    const int c0 = blockIdx.y * UV_COLS + warp * PER_WARP;
    uint4 wv[PER_WARP][2];
#pragma unroll
    for (int j = 0; j < PER_WARP; ++j) {
        const bf16* wr = w_uv + (size_t)h * w_head + (size_t)min(c0 + j, dv - 1) * D_LAT;
#pragma unroll
        for (int p = 0; p < 2; ++p) wv[j][p] = ld_stream16(wr + (lane + 32 * p) * 8);
    }
    griddep_wait();
    const float inv = combine_weights(lse + (size_t)b * splits * heads + h, heads, splits, w_s, red);
    const float4 acc = combine_cols4(o_part + ((size_t)b * splits * heads + h) * D_LAT + tid * 4,
                                     (size_t)heads * D_LAT, splits, w_s);
    ctx[tid * 4 + 0] = __bfloat162float(__float2bfloat16_rn(acc.x * inv));
    ctx[tid * 4 + 1] = __bfloat162float(__float2bfloat16_rn(acc.y * inv));
    ctx[tid * 4 + 2] = __bfloat162float(__float2bfloat16_rn(acc.z * inv));
    ctx[tid * 4 + 3] = __bfloat162float(__float2bfloat16_rn(acc.w * inv));
    __syncthreads();
    griddep_launch_dependents();
    // a lane's 16 of the 512 latent columns: pieces lane and lane + 32 (8 bf16 each)
    // (16-byte shared loads: 4-byte ones at a 32-byte lane stride were 8-way bank conflicts)
    float cx[2][8];
#pragma unroll
    for (int p = 0; p < 2; ++p)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const float4 v = *reinterpret_cast<const float4*>(&ctx[(lane + 32 * p) * 8 + 4 * i]);
            cx[p][4 * i] = v.x;
            cx[p][4 * i + 1] = v.y;
            cx[p][4 * i + 2] = v.z;
            cx[p][4 * i + 3] = v.w;
        }
#pragma unroll
    for (int j = 0; j < PER_WARP; ++j) {
        float d = 0.f;
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            float f[8];
            unpack8(wv[j][p], f);
#pragma unroll
            for (int i = 0; i < 8; ++i) d = fmaf(cx[p][i], f[i], d);
        }
        d = warp_sum(d);
        if (lane == 0 && c0 + j < dv) out[((size_t)b * heads + h) * dv + c0 + j] = __float2bfloat16_rn(d);
    }
}

// cache[slot, :] = c_kv[t, :] | k_pe[t, :] with slot = slots[t] (block * block_size + offset);
// slots < 0 (padding) are skipped. One block of 72 threads per token, 16 bytes each.
extern "C" __global__ void mla_cache_append_bf16(bf16* __restrict__ cache, const bf16* __restrict__ c_kv,
                                                 const bf16* __restrict__ k_pe, const long long* __restrict__ slots,
                                                 int tokens, long long num_slots) {
    griddep_wait();
    int t = blockIdx.x;
    if (t >= tokens) return;
    long long slot = slots[t];
    if (slot < 0 || slot >= num_slots) return;
    int c = threadIdx.x * 8;
    if (c >= D_QK) return;
    const bf16* src = c < D_LAT ? c_kv + (size_t)t * D_LAT + c : k_pe + (size_t)t * D_ROPE + (c - D_LAT);
    *reinterpret_cast<bf16x8*>(cache + slot * D_QK + c) = *reinterpret_cast<const bf16x8*>(src);
}
