// general.cu: MLA pieces for any latent / rope / head dims (the tuned kernels in mla.cu are fixed to
// DeepSeek-V2's 512 + 64), used by the CUDA backend for prefill chunks and small models: latent
// RMSNorm fused with the cache write (and, at decode's few rows, with the W_UK absorb), causal
// attention over a gathered context, strided row copy, residual add and an f32 -> bf16 cast.
//
// Where they stand: correct first versions. The attention kernel reads K rows straight from global
// memory one token per thread (no tensor cores, no tiling of K in shared memory); it is meant for
// prefill chunks and tests, not for the decode hot path (mla_decode_bf16 serves that).
#include "common.cuh"

#define ATT_THREADS 128

// cache[slots[t]] = [ w * x / rms(x) | kva[t, r:r+dr] ] with x = kva[t, :r] (k_pe already rotated).
// kva [tokens, r+dr], w [r], cache [num_slots, r+dr] (bf16); slots outside [0, num_slots) are skipped.
// One block per token; f32 math, one bf16 rounding of the stored latent. `scratch`: 32 floats of
// shared memory for the block's sum.
__device__ __forceinline__ void latent_append_token(const bf16* __restrict__ kva, const bf16* __restrict__ w,
                                                    const long long* __restrict__ slots, bf16* __restrict__ cache,
                                                    int t, int r, int dr, long long num_slots, float eps,
                                                    const int* __restrict__ pos, const float* __restrict__ cos_t,
                                                    const float* __restrict__ sin_t, int max_pos, float* scratch) {
    long long slot = slots[t];
    // uniform over the block, so returning here cannot strand a __syncthreads
    if (slot < 0 || slot >= num_slots) return;
    int width = r + dr;
    const bf16* src = kva + (size_t)t * width;
    bf16* dst = cache + (size_t)slot * width;
    float ss = 0.f;
    for (int i = threadIdx.x; i < r; i += blockDim.x) {
        float v = __bfloat162float(src[i]);
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, scratch) / (float)r + eps);
    for (int i = threadIdx.x; i < r; i += blockDim.x)
        dst[i] = __float2bfloat16(__bfloat162float(w[i]) * (__bfloat162float(src[i]) * inv));
    // the shared rope key: rotated here (as rope_bf16 would, in bf16) when a table is given
    const int p = pos != nullptr ? pos[t] : -1;
    if (p >= 0 && p < max_pos) {
        const int half = dr / 2;
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(src + r + 2 * i));
            const float c = cos_t[(size_t)p * half + i], s = sin_t[(size_t)p * half + i];
            *reinterpret_cast<__nv_bfloat162*>(dst + r + 2 * i) = __floats2bfloat162_rn(v.x * c - v.y * s, v.x * s + v.y * c);
        }
    } else {
        for (int i = threadIdx.x; i < dr; i += blockDim.x) dst[r + i] = src[r + i];
    }
}

// Blocks (t, 0) append token t (latent_append_token); blocks (t, y >= 1), when q is given, rotate
// the rope part of token t's query heads (rope_q_heads).
extern "C" __global__ void mla_latent_append_bf16(const bf16* __restrict__ kva, const bf16* __restrict__ w,
                                                  const long long* __restrict__ slots, bf16* __restrict__ cache,
                                                  int tokens, int r, int dr, long long num_slots, float eps,
                                                  const int* __restrict__ pos, const float* __restrict__ cos_t,
                                                  const float* __restrict__ sin_t, int max_pos, bf16* __restrict__ q,
                                                  int q_heads, int q_head_dim) {
    griddep_wait();
    __shared__ float scratch[32];
    int t = blockIdx.x;
    if (t >= tokens) return;
    if (blockIdx.y > 0) {
        rope_q_heads(q, t, q_heads, q_head_dim, dr, pos[t], cos_t, sin_t, max_pos);
        return;
    }
    latent_append_token(kva, w, slots, cache, t, r, dr, num_slots, eps, pos, cos_t, sin_t, max_pos, scratch);
}

// ---------------------------------------------------------------------------------------------
// The append's launch with decode's W_UK absorb folded in (one launch per layer less at few rows):
//   q_abs[t, h, :] = q[t, h, :dn] · W_UK_h,  W_UK_h = kv_b rows h·(dn+dv) .. +dn, [dn, kv_r] row-major.
// The absorb reads only the first dn values of each query head, the rope blocks write only the
// last dr, and the cache blocks touch neither, so the three kinds of block are independent.
//
// Arithmetic identical to gemv_kn_m{M}_bf16 (gemv.cu) on the same problem, so the fused and the
// separate paths agree bit for bit: each output column is the sum, in order q = 0..7, of 8 partial
// sums, partial q being the fmaf chain over k = q, q + 8, q + 16, ... ascending from 0.f; one bf16
// rounding at the end. Only the mapping of those chains onto threads differs: gemv_kn gives a warp
// a residue q and 256 columns; here a block of ABSORB_THREADS takes a tile of ABSORB_TILE columns
// (16 column groups of 8, one 16-byte weight load each) x the 8 residues, every thread holding all
// of its ceil(dn / 8) weight rows in flight at once (16 for dn = 128: the block's 32 KB tile is one
// round trip). Twice gemv_kn's blocks: V2-Lite's 2 MB of W_UK over 64 blocks, V2's 16 MB over 512.
#define ABSORB_THREADS 128  // the append's block size (the launcher's per_row(tokens, 128))
#define ABSORB_SPLITS 8     // K residues: gemv.cu's GEMV_WARPS, whose sum order this keeps
#define ABSORB_GROUPS (ABSORB_THREADS / ABSORB_SPLITS)
#define ABSORB_TILE (ABSORB_GROUPS * 8)
#define ABSORB_ROWS 16  // weight rows in flight per thread (all of dn = 128's 16 at once)

// Block `blk` of the absorb: head blk / tiles, column tile blk % tiles. q rows at stride q_rs,
// heads at q_hs (unit inner stride); q_abs [M, heads, kv_r] contiguous. Dynamic shared memory:
// the head's q_nope as f32 [dn][M] (M * dn floats), a weight row's M values side by side.
template <int M>
__device__ __forceinline__ void absorb_q_tile(const bf16* q, long long q_rs, long long q_hs,
                                              const bf16* __restrict__ kv_b, bf16* __restrict__ q_abs,
                                              int heads, int dn, int dv, int kv_r, int blk) {
    __shared__ __align__(16) float part[ABSORB_SPLITS][M][ABSORB_TILE];
    extern __shared__ __align__(16) float xs[];  // [dn][M]
    const int tiles = (kv_r + ABSORB_TILE - 1) / ABSORB_TILE;
    const int h = blk / tiles, tile = blk % tiles;
    if (h >= heads) return;  // the grid's rounding: whole block
    const int cg = threadIdx.x % ABSORB_GROUPS, sp = threadIdx.x / ABSORB_GROUPS;
    const int c0 = tile * ABSORB_TILE + cg * 8;
    // kv_r is a multiple of 8, so a thread's 8 columns are all in or all out
    const bool live = c0 < kv_r;
    const bf16* w = kv_b + (size_t)h * (dn + dv) * kv_r + c0;
    float acc[M][8];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[m][i] = 0.f;
    uint4 wv[ABSORB_ROWS];
    auto load_rows = [&](int kb) {
#pragma unroll
        for (int j = 0; j < ABSORB_ROWS; ++j) {
            const int kk = kb + j * ABSORB_SPLITS;
            wv[j] = live && kk < dn ? ld_stream16(w + (long long)kk * kv_r) : make_uint4(0, 0, 0, 0);
        }
    };
    load_rows(sp);
    // the queries staged while the first weight rows are on their way
    {
        const bf16* x = q + h * q_hs;
        for (int i = threadIdx.x; i < M * dn; i += blockDim.x) {
            const int m = i / dn, k = i % dn;
            xs[k * M + m] = __bfloat162float(x[m * q_rs + k]);
        }
    }
    __syncthreads();
    for (int kb = sp; kb < dn; kb += ABSORB_ROWS * ABSORB_SPLITS) {
        if (kb != sp) load_rows(kb);
#pragma unroll
        for (int j = 0; j < ABSORB_ROWS; ++j) {
            const int kk = kb + j * ABSORB_SPLITS;
            if (kk >= dn) break;
            float wf[8];
            unpack8(wv[j], wf);
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const float xv = xs[kk * M + m];
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[m][i] = fmaf(xv, wf[i], acc[m][i]);
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
        float4* dst = reinterpret_cast<float4*>(&part[sp][m][cg * 8]);
        dst[0] = make_float4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
        dst[1] = make_float4(acc[m][4], acc[m][5], acc[m][6], acc[m][7]);
    }
    __syncthreads();
    for (int t = threadIdx.x; t < M * ABSORB_TILE; t += blockDim.x) {
        const int m = t / ABSORB_TILE, cc = t % ABSORB_TILE;
        const int col = tile * ABSORB_TILE + cc;
        if (col >= kv_r) continue;
        float s = 0.f;
#pragma unroll
        for (int sq = 0; sq < ABSORB_SPLITS; ++sq) s += part[sq][m][cc];
        q_abs[((size_t)m * heads + h) * kv_r + col] = __float2bfloat16(s);
    }
}

// Grid (tokens + absorb_x, gridDim.y) of ABSORB_THREADS: blocks x < tokens are
// mla_latent_append_bf16's (y == 0 the cache write, y >= 1 the query rope when rq is given);
// blocks x >= tokens are absorb blocks (x - tokens) * gridDim.y + y (extra ones past
// heads * tiles return). M = tokens. `rq` (rotated) and `aq` (absorbed) may be the same queries:
// neither is __restrict__, their columns are disjoint.
template <int M>
__device__ __forceinline__ void latent_append_absorb(
    const bf16* __restrict__ kva, const bf16* __restrict__ w, const long long* __restrict__ slots,
    bf16* __restrict__ cache, int r, int dr, long long num_slots, float eps, const int* __restrict__ pos,
    const float* __restrict__ cos_t, const float* __restrict__ sin_t, int max_pos, bf16* rq, int q_heads,
    int q_head_dim, const bf16* aq, long long aq_rs, long long aq_hs, const bf16* __restrict__ kv_b,
    bf16* __restrict__ q_abs, int heads, int dn, int dv, int kv_r) {
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    if (t >= M) {
        absorb_q_tile<M>(aq, aq_rs, aq_hs, kv_b, q_abs, heads, dn, dv, kv_r, (t - M) * gridDim.y + blockIdx.y);
        return;
    }
    if (blockIdx.y > 0) {
        rope_q_heads(rq, t, q_heads, q_head_dim, dr, pos[t], cos_t, sin_t, max_pos);
        return;
    }
    latent_append_token(kva, w, slots, cache, t, r, dr, num_slots, eps, pos, cos_t, sin_t, max_pos, scratch);
}

// The exported kernels, written out (the module loader reads their names from this text); the
// arguments are mla_latent_append_bf16's (tokens implied by M), then the absorb's. Blocks per SM
// asked of ptxas: 5 at 1-2 rows (96 registers, no spill), so that V2's 512 absorb blocks and the
// append's fit one wave on 132 SMs; 4 at 3-4 rows, where 5 spilled (400 bytes at M = 3).
#define APPEND_ABSORB_ARGS                                                                               \
    const bf16 *__restrict__ kva, const bf16 *__restrict__ w, const long long *__restrict__ slots,         \
        bf16 *__restrict__ cache, int r, int dr, long long num_slots, float eps, const int *__restrict__ pos, \
        const float *__restrict__ cos_t, const float *__restrict__ sin_t, int max_pos, bf16 *rq, int q_heads,  \
        int q_head_dim, const bf16 *aq, long long aq_rs, long long aq_hs, const bf16 *__restrict__ kv_b,       \
        bf16 *__restrict__ q_abs, int heads, int dn, int dv, int kv_r
#define APPEND_ABSORB_CALL                                                                                   \
    kva, w, slots, cache, r, dr, num_slots, eps, pos, cos_t, sin_t, max_pos, rq, q_heads, q_head_dim, aq, aq_rs, \
        aq_hs, kv_b, q_abs, heads, dn, dv, kv_r
extern "C" __global__ void __launch_bounds__(ABSORB_THREADS, 5) mla_latent_append_absorb_m1_bf16(APPEND_ABSORB_ARGS) {
    griddep_wait();
    latent_append_absorb<1>(APPEND_ABSORB_CALL);
}
extern "C" __global__ void __launch_bounds__(ABSORB_THREADS, 5) mla_latent_append_absorb_m2_bf16(APPEND_ABSORB_ARGS) {
    griddep_wait();
    latent_append_absorb<2>(APPEND_ABSORB_CALL);
}
extern "C" __global__ void __launch_bounds__(ABSORB_THREADS, 4) mla_latent_append_absorb_m3_bf16(APPEND_ABSORB_ARGS) {
    griddep_wait();
    latent_append_absorb<3>(APPEND_ABSORB_CALL);
}
extern "C" __global__ void __launch_bounds__(ABSORB_THREADS, 4) mla_latent_append_absorb_m4_bf16(APPEND_ABSORB_ARGS) {
    griddep_wait();
    latent_append_absorb<4>(APPEND_ABSORB_CALL);
}
#undef APPEND_ABSORB_ARGS
#undef APPEND_ABSORB_CALL

// Causal attention of n_q query rows (positions pos0 .. pos0+n_q-1) over a context gathered in
// position order (ctx tokens, token t at position t):
//   out[i, h] = sum_{t <= pos0+i} softmax_t(scale * (q1[i,h]·k1[t,h] + q2[i,h]·k2[t,h])) v[t,h]
// Every operand is addressed by (row or token) stride and head stride, so the same kernel runs
// naive MLA (k1 = decompressed k_nope, v = decompressed v, per head) and absorbed MLA (k1 = v =
// the latent, head stride 0). k2 is the shared rotated k_pe (head stride 0). out is [n_q, heads, dv].
// One block per (head, query row); online softmax over tiles of ATT_THREADS tokens; f32 math.
// Dynamic shared memory: (d1 + d2 + dv + ATT_THREADS) floats.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    mla_attn_causal_bf16(const bf16* __restrict__ q1, long long q1_rs, long long q1_hs,
                         const bf16* __restrict__ q2, long long q2_rs, long long q2_hs,
                         const bf16* __restrict__ k1, long long k1_ts, long long k1_hs,
                         const bf16* __restrict__ k2, long long k2_ts, long long k2_hs,
                         const bf16* __restrict__ v, long long v_ts, long long v_hs, bf16* __restrict__ out,
                         int n_q, int heads, int d1, int d2, int dv, int pos0, int ctx, float scale) {
    griddep_wait();
    extern __shared__ float sm[];
    __shared__ float scratch[32];
    float* q = sm;              // d1 + d2
    float* acc = sm + d1 + d2;  // dv
    float* p = acc + dv;        // ATT_THREADS
    int h = blockIdx.x, i = blockIdx.y;
    if (h >= heads || i >= n_q) return;
    const bf16* q1r = q1 + i * q1_rs + h * q1_hs;
    const bf16* q2r = q2 + i * q2_rs + h * q2_hs;
    for (int j = threadIdx.x; j < d1; j += blockDim.x) q[j] = __bfloat162float(q1r[j]);
    for (int j = threadIdx.x; j < d2; j += blockDim.x) q[d1 + j] = __bfloat162float(q2r[j]);
    for (int j = threadIdx.x; j < dv; j += blockDim.x) acc[j] = 0.f;
    __syncthreads();
    int last = min(pos0 + i, ctx - 1);  // inclusive
    float m = -INFINITY, l = 0.f;
    for (int t0 = 0; t0 <= last; t0 += ATT_THREADS) {
        int t = t0 + threadIdx.x;
        float s = -INFINITY;
        if (t <= last) {
            const bf16* a = k1 + t * k1_ts + h * k1_hs;
            const bf16* b = k2 + t * k2_ts + h * k2_hs;
            float d = 0.f;
            for (int j = 0; j < d1; ++j) d += q[j] * __bfloat162float(a[j]);
            for (int j = 0; j < d2; ++j) d += q[d1 + j] * __bfloat162float(b[j]);
            s = d * scale;
        }
        float m_new = fmaxf(m, block_max(s, scratch));  // finite: token t0 is always valid
        float e = t <= last ? expf(s - m_new) : 0.f;
        p[threadIdx.x] = e;
        float tile_sum = block_sum(e, scratch);
        float corr = expf(m - m_new);  // 0 on the first tile (m = -inf)
        l = l * corr + tile_sum;
        m = m_new;
        __syncthreads();  // p complete
        int nt = min(ATT_THREADS, last - t0 + 1);
        for (int j = threadIdx.x; j < dv; j += blockDim.x) {
            const bf16* vp = v + (long long)t0 * v_ts + h * v_hs + j;
            float a = acc[j] * corr;
            for (int u = 0; u < nt; ++u) a += p[u] * __bfloat162float(vp[u * v_ts]);
            acc[j] = a;
        }
        __syncthreads();  // p is rewritten by the next tile
    }
    bf16* o = out + ((size_t)i * heads + h) * dv;
    float inv = l > 0.f ? 1.f / l : 0.f;
    for (int j = threadIdx.x; j < dv; j += blockDim.x) o[j] = __float2bfloat16(acc[j] * inv);
}

// dst[r, c] = src[r, c] for a [rows, cols] bf16 matrix with row strides in elements.
extern "C" __global__ void copy_rows_bf16(const bf16* __restrict__ src, long long src_rs, bf16* __restrict__ dst,
                                          long long dst_rs, int rows, int cols) {
    griddep_wait();
    long long n = (long long)rows * cols;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
        long long r = k / cols, c = k % cols;
        dst[r * dst_rs + c] = src[r * src_rs + c];
    }
}

// acc <- bf16(acc + x), n elements (the residual stream is bf16, as in the HF bf16 model).
extern "C" __global__ void add_bf16(bf16* __restrict__ acc, const bf16* __restrict__ x, long long n) {
    griddep_wait();
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x)
        acc[k] = __float2bfloat16(__bfloat162float(acc[k]) + __bfloat162float(x[k]));
}

// y = bf16(x), n elements.
extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, bf16* __restrict__ y, long long n) {
    griddep_wait();
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x)
        y[k] = __float2bfloat16(x[k]);
}

// acc[idx[i], :] += float(src[i, :]) for i < n: one expert shard's partial sums (bf16, in the
// order the shard got its rows) added into the router's f32 accumulator. One block per source
// row; the indices of one launch are distinct (a row goes to a shard at most once), so no two
// blocks touch the same accumulator row. Indices outside [0, rows) are skipped.
extern "C" __global__ void rows_add_f32(float* __restrict__ acc, const bf16* __restrict__ src,
                                        const int* __restrict__ idx, int n, int rows, int cols) {
    griddep_wait();
    int i = blockIdx.x;
    if (i >= n) return;
    int r = idx[i];
    if (r < 0 || r >= rows) return;
    float* a = acc + (size_t)r * cols;
    const bf16* s = src + (size_t)i * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) a[c] += __bfloat162float(s[c]);
}
