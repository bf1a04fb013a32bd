// mla_fp8.cu: the FP8 (e4m3) latent cache: the append (RMSNorm, k_pe RoPE and the per-token
// quantizer fused, like mla_latent_append_bf16), a gather that dequantizes cached rows to bf16
// (the prefill and general attention paths), and the MLA decode kernel that reads the cache in
// FP8.
//
// A cached token (layout and quantizer: kernels/src/fp8.rs, whose CPU code these kernels match
// bit for bit): bytes [0, r) e4m3 latent codes, [pe, pe + 2 dr) the bf16 rotated key k_pe,
// [sc, sc + 4) the f32 scale (amax / 448), zeros to the row's end (a multiple of 16 bytes).
// DeepSeek-V2: r 512, dr 64, pe 512, sc 640, 656 bytes a token (bf16: 1152).
#include "common.cuh"
#include "mla_common.cuh"
#include "wgmma.cuh"

#define F8_MAX 448.f

// Two f32 to two e4m3 codes, round to nearest even, saturating to +-448 (lo -> bits 0..7).
__device__ __forceinline__ unsigned short f8_pack2(float lo, float hi) {
    unsigned short r;
    // cvt's first source goes to the upper byte
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

// The value of the e4m3 code in the low byte of `b`, exactly, in f32: the code's bits placed
// where an f32's exponent and mantissa start read as the value times 2^-120 (subnormal codes
// as f32 subnormals), and times 2^120 is exact.
__device__ __forceinline__ float f8_to_f32(u32 b) {
    const u32 bits = ((b & 0x7fu) << 20) | ((b & 0x80u) << 24);
    return __uint_as_float(bits) * 1.329227995784916e36f;  // 2^120
}

// Two e4m3 codes, in bits 0..7 and 16..23 of x, to a bf16x2 of their values, exactly: the same
// trick with bf16's 8-bit exponent (a bf16 holds every e4m3 value), then one bf16x2 multiply by
// 2^120 (0x7b80; -0 added, so that nothing but the multiply is done).
__device__ __forceinline__ u32 f8x2_to_bf16x2(u32 x) {
    const u32 raw = ((x << 4) & 0x07f007f0u) | ((x << 8) & 0x80008000u);
    u32 r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(raw), "r"(0x7b807b80u), "r"(0x80008000u));
    return r;
}

// cache[slot] = [ quantize(norm_w * rmsnorm(kva[t, :r])) | rope(kva[t, r:]) | scale ], the
// values quantized being exactly what mla_latent_append_bf16 would store (same reduction, same
// bf16 rounding): an FP8 cache holds the quantization of the bf16 cache. One block of 128
// threads per token; slots < 0 or >= num_slots are skipped. r % 16 == 0, dr % 8 == 0.
extern "C" __global__ void mla_latent_append_fp8(const bf16* __restrict__ kva, const bf16* __restrict__ w,
                                                 const long long* __restrict__ slots,
                                                 unsigned char* __restrict__ cache, int tokens, int r, int dr,
                                                 long long num_slots, float eps, const int* __restrict__ pos,
                                                 const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                                 int max_pos, int row_bytes, int pe_off, int scale_off,
                                                 bf16* __restrict__ q, int q_heads, int q_head_dim) {
    griddep_wait();
    __shared__ float scratch[32];
    int t = blockIdx.x;
    if (t >= tokens) return;
    // blocks y >= 1: the query heads' rope part (as in mla_latent_append_bf16)
    if (blockIdx.y > 0) {
        rope_q_heads(q, t, q_heads, q_head_dim, dr, pos[t], cos_t, sin_t, max_pos);
        return;
    }
    long long slot = slots[t];
    // uniform over the block, so returning here cannot strand a __syncthreads
    if (slot < 0 || slot >= num_slots) return;
    int width = r + dr;
    const bf16* src = kva + (size_t)t * width;
    unsigned char* dst = cache + (size_t)slot * row_bytes;
    float ss = 0.f;
    for (int i = threadIdx.x; i < r; i += blockDim.x) {
        float v = __bfloat162float(src[i]);
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, scratch) / (float)r + eps);
    // pass 1: amax of the bf16 latent; pass 2 recomputes the same values and quantizes them
    float amax = 0.f;
    for (int i = threadIdx.x; i < r; i += blockDim.x) {
        float y = __bfloat162float(__float2bfloat16(__bfloat162float(w[i]) * (__bfloat162float(src[i]) * inv)));
        amax = fmaxf(amax, fabsf(y));
    }
    amax = block_max(amax, scratch);
    const float qinv = amax > 0.f ? F8_MAX / amax : 0.f;
    for (int i = 2 * threadIdx.x; i < r; i += 2 * blockDim.x) {
        float y0 = __bfloat162float(__float2bfloat16(__bfloat162float(w[i]) * (__bfloat162float(src[i]) * inv)));
        float y1 =
            __bfloat162float(__float2bfloat16(__bfloat162float(w[i + 1]) * (__bfloat162float(src[i + 1]) * inv)));
        *reinterpret_cast<unsigned short*>(dst + i) = f8_pack2(y0 * qinv, y1 * qinv);
    }
    if (threadIdx.x == 0) {
        *reinterpret_cast<float*>(dst + scale_off) = amax / F8_MAX;
        for (int i = scale_off + 4; i < row_bytes; i += 4) *reinterpret_cast<u32*>(dst + i) = 0u;
    }
    // the shared rope key, bf16: rotated here (as rope_bf16 would) when a table is given
    bf16* dpe = reinterpret_cast<bf16*>(dst + pe_off);
    const int p = pos != nullptr ? pos[t] : -1;
    if (p >= 0 && p < max_pos) {
        const int half = dr / 2;
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(src + r + 2 * i));
            const float c = cos_t[(size_t)p * half + i], s = sin_t[(size_t)p * half + i];
            *reinterpret_cast<__nv_bfloat162*>(dpe + 2 * i) = __floats2bfloat162_rn(v.x * c - v.y * s, v.x * s + v.y * c);
        }
    } else {
        for (int i = threadIdx.x; i < dr; i += blockDim.x) dpe[i] = src[r + i];
    }
}

// out[i] = the cached token in slot slots[i], dequantized: [bf16(decode(q) * scale) (r) | k_pe
// (dr)], out [n, r + dr] bf16. One block per row, 8 values per thread step. r % 16 == 0,
// dr % 8 == 0; slots are trusted (the host built them from valid block tables).
extern "C" __global__ void mla_gather_fp8(const unsigned char* __restrict__ cache, const int* __restrict__ slots,
                                          bf16* __restrict__ out, int n, int r, int dr, int row_bytes, int pe_off,
                                          int scale_off) {
    griddep_wait();
    const int i = blockIdx.x;
    if (i >= n) return;
    const unsigned char* src = cache + (size_t)slots[i] * row_bytes;
    bf16* dst = out + (size_t)i * (r + dr);
    const float sc = *reinterpret_cast<const float*>(src + scale_off);
    for (int c = threadIdx.x * 8; c < r; c += blockDim.x * 8) {
        const uint2 q = *reinterpret_cast<const uint2*>(src + c);
        float v[8];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            v[k] = f8_to_f32(q.x >> (8 * k)) * sc;
            v[4 + k] = f8_to_f32(q.y >> (8 * k)) * sc;
        }
        store8(dst + c, v);
    }
    const bf16x8* pe = reinterpret_cast<const bf16x8*>(src + pe_off);
    for (int c = threadIdx.x; c < dr / 8; c += blockDim.x) *reinterpret_cast<bf16x8*>(dst + r + 8 * c) = pe[c];
}

// ---------------------------------------------------------------------------------------------
// Decode over the FP8 cache, DeepSeek-V2's dims (r 512, dr 64, 656-byte rows). Same arguments
// (the cache as bytes) and outputs as mla_decode_wgmma_bf16, whose structure this follows: a CTA
// owns one sequence, 64 heads and one context slice, two warpgroups; per 64-token tile
//   S = Q . K^T        each warpgroup 32 of the 64 tokens (wgmma m64n32k16): 32 k-steps over the
//                      latent into s_lat, 4 over the rope dims into s_rope
//   S = s_lat * scale_t + s_rope          (per token t: the latent codes are unscaled in smem)
//   online softmax     as the bf16 kernel
//   O += P' . V        P' = bf16(p * scale_t): the scale folded into P, V the unscaled codes
// Where the scale goes: wgmma reads bf16 operands from shared memory, so each tile's codes are
// converted to bf16 there. e4m3 values are exact in bf16, so the converted tile holds exactly
// the codes' values; applying the token's scale to S (in f32) and folding it into P (which is
// rounded to bf16 for the tensor cores anyway) adds no rounding beyond the bf16 kernel's, where
// scaling during the conversion would round every value once more (bf16(code * scale), 2^-9).
//
// Loads: the tile's latent codes (64 x 512 B) come through registers: warp w reads rows w,
// w + 8, .. (each a contiguous 512 B, one 16-byte piece a lane), issued one tile ahead, right
// after the previous tile's codes were converted, so they are in flight during a whole tile's
// math; they are converted and stored into the free bf16 tile buffer while the tensor cores run
// P . V. k_pe (already bf16) and the scales go to shared memory by cp.async, one tile ahead as in
// the bf16 kernel. Shared memory is then what the bf16 kernel uses plus 512 B of scales:
// Q (72 KiB) + two bf16 tiles (144 KiB) + P (8 KiB) + reductions + scales = 226.5 KiB.

#define F8_ROW 656
#define F8_PE 512
#define F8_SC 640
#define F8_TN 64
#define F8_CHUNK (64 * 128)         // one 64-column chunk of a 64-row bf16 operand, bytes
#define F8_TILE (9 * F8_CHUNK)      // 64 rows x 576 bf16
#define F8_SMEM_P (3 * F8_TILE)
#define F8_SMEM_RED (F8_SMEM_P + F8_CHUNK)
#define F8_SMEM_SCL (F8_SMEM_RED + 2 * 2 * 64 * 4)
#define F8_SMEM_BYTES (F8_SMEM_SCL + 2 * 64 * 4)

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
    u32 s = (u32)__cvta_generic_to_shared(smem);
    int n = valid ? 4 : 0;  // src-size 0 zero-fills
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async16z(void* smem, const void* gmem, bool valid) {
    u32 s = (u32)__cvta_generic_to_shared(smem);
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void f8_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void f8_cp_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Byte address of cached token t of the sequence (t < end).
__device__ __forceinline__ const unsigned char* f8_row(const unsigned char* __restrict__ cache,
                                                       const int* __restrict__ btab, int block_size, int t) {
    return cache + ((size_t)btab[t / block_size] * block_size + (t % block_size)) * F8_ROW;
}

// This thread's share of tile t0's latent codes into registers: rows warp + 8 i (i < 8), the
// 16-byte piece `lane` of each; zeros for tokens >= end.
__device__ __forceinline__ void f8_load_codes(uint4* st, const unsigned char* __restrict__ cache,
                                              const int* __restrict__ btab, int block_size, int t0, int end) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int t = t0 + warp + 8 * i;
        if (t < end) {
            st[i] = __ldg(reinterpret_cast<const uint4*>(f8_row(cache, btab, block_size, t)) + lane);
        } else {
            st[i] = make_uint4(0u, 0u, 0u, 0u);
        }
    }
}

// The codes of f8_load_codes converted to bf16 into the swizzled tile `dst` (chunks 0..7): lane
// l's 16 codes are latent columns 16 l .. 16 l + 15, i.e. 16-byte pieces 2 (l % 4) and +1 of
// chunk l / 4. Lanes of odd chunks store their second piece first, so that the 8 lanes of each
// store phase (two chunks, one row) hit 8 distinct 16-byte bank groups.
__device__ __forceinline__ void f8_store_codes(unsigned char* dst, const uint4* st) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int c = lane >> 2, j0 = 2 * (lane & 3), odd = c & 1;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int r = warp + 8 * i, rx = r & 7;
        const uint4 q = st[i];
        // first store: piece j0 + odd (codes 8 odd ..), second: piece j0 + 1 - odd
        const u32 a0 = odd ? q.z : q.x, a1 = odd ? q.w : q.y;
        const u32 b0 = odd ? q.x : q.z, b1 = odd ? q.y : q.w;
        uint4 va, vb;
        va.x = f8x2_to_bf16x2(__byte_perm(a0, 0u, 0x5140));
        va.y = f8x2_to_bf16x2(__byte_perm(a0, 0u, 0x7362));
        va.z = f8x2_to_bf16x2(__byte_perm(a1, 0u, 0x5140));
        va.w = f8x2_to_bf16x2(__byte_perm(a1, 0u, 0x7362));
        vb.x = f8x2_to_bf16x2(__byte_perm(b0, 0u, 0x5140));
        vb.y = f8x2_to_bf16x2(__byte_perm(b0, 0u, 0x7362));
        vb.z = f8x2_to_bf16x2(__byte_perm(b1, 0u, 0x5140));
        vb.w = f8x2_to_bf16x2(__byte_perm(b1, 0u, 0x7362));
        unsigned char* row = dst + c * F8_CHUNK + r * 128;
        *reinterpret_cast<uint4*>(row + (((j0 + odd) ^ rx) << 4)) = va;
        *reinterpret_cast<uint4*>(row + (((j0 + 1 - odd) ^ rx) << 4)) = vb;
    }
}

// Tile t0's k_pe (bf16, into the tile's rope chunk 8, swizzled) and scales (64 f32) by cp.async;
// zeros for tokens >= end.
__device__ __forceinline__ void f8_load_side(unsigned char* dst, float* scl, const unsigned char* __restrict__ cache,
                                             const int* __restrict__ btab, int block_size, int t0, int end) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const int g = tid + 256 * k, r = g >> 3, pc = g & 7;
        const int t = t0 + r;
        const bool valid = t < end;
        const unsigned char* src = valid ? f8_row(cache, btab, block_size, t) + F8_PE + pc * 16 : cache;
        cp_async16z(dst + 8 * F8_CHUNK + r * 128 + ((pc ^ (r & 7)) << 4), src, valid);
    }
    if (tid < F8_TN) {
        const int t = t0 + tid;
        const bool valid = t < end;
        cp_async4(scl + tid, valid ? f8_row(cache, btab, block_size, t) + F8_SC : cache, valid);
    }
}

// grid (ceil(H / 64), B, splits), 256 threads, F8_SMEM_BYTES + 1024 bytes of dynamic shared
// memory. q_abs [B, H, 512], q_pe [B, H, 64] (element strides qpe_sb, qpe_sh), cache
// [blocks, block_size, 656] bytes, block_table [B, max_blocks], seq_lens [B]; out / o_part / lse
// as mla_decode_bf16 (splits of whole 64-token tiles, an empty split writes only lse = -inf).
extern "C" __global__ void __launch_bounds__(256, 1)
mla_decode_fp8(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe, const unsigned char* __restrict__ cache,
               const int* __restrict__ block_table, const int* __restrict__ seq_lens, bf16* __restrict__ out,
               float* __restrict__ o_part, float* __restrict__ lse, int heads, int block_size, int max_blocks,
               int splits, float scale, long long qpe_sb, long long qpe_sh) {
    griddep_wait();
    extern __shared__ __align__(1024) unsigned char f8_smem_raw[];
    // the swizzle is applied by the hardware on address bits 4..9: operands must be 1024-aligned
    unsigned char* smem =
        reinterpret_cast<unsigned char*>((reinterpret_cast<size_t>(f8_smem_raw) + 1023) & ~(size_t)1023);
    unsigned char* sq = smem;
    unsigned char* sk0 = smem + F8_TILE;
    unsigned char* sk1 = smem + 2 * F8_TILE;
    unsigned char* sp = smem + F8_SMEM_P;
    float* red_max = reinterpret_cast<float*>(smem + F8_SMEM_RED);  // [2][64]
    float* red_l = red_max + 2 * 64;                                // [2][64]
    float* scl0 = reinterpret_cast<float*>(smem + F8_SMEM_SCL);     // [2][64]

    const int hg = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
    const int tid = threadIdx.x, wg = tid / 128, lane = tid % WARP, wq = (tid % 128) / WARP;
    const int h0 = hg * 64;
    const int len = seq_lens[b];
    const int per = split_tokens(len, splits, F8_TN);
    const int start = split * per;
    const int end = min(len, start + per);
    const int* btab = block_table + (size_t)b * max_blocks;
    const float sl2 = scale * 1.4426950408889634f;
    if (splits > 1 && start >= len) {
        empty_split(lse, b, split, splits, heads, h0);
        return;
    }

    // Q: rows are heads h0 .. h0+63 (zeros past `heads`), cols 0..511 q_abs, 512..575 q_pe
    for (int c = tid; c < 64 * (D_QK / 8); c += 256) {
        int r = c / (D_QK / 8), col = (c % (D_QK / 8)) * 8;
        const bf16x8 v = load_q8(q_abs, q_pe, b, h0 + r, heads, col, qpe_sb, qpe_sh);
        *reinterpret_cast<bf16x8*>(sq + wg_swz(r, col)) = v;
    }

    const int r_lo = wq * 16 + lane / 4;
    const int cq = (lane % 4) * 2;
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_part[2] = {0.f, 0.f};

    const u32 q_addr = (u32)__cvta_generic_to_shared(sq);
    const u32 k_addr0 = (u32)__cvta_generic_to_shared(sk0);
    const u32 p_addr = (u32)__cvta_generic_to_shared(sp);

    const int ntiles = end > start ? (end - start + F8_TN - 1) / F8_TN : 0;
    uint4 codes[8];
    if (ntiles > 0) {
        f8_load_side(sk0, scl0, cache, btab, block_size, start, end);
        f8_load_codes(codes, cache, btab, block_size, start, end);
        f8_store_codes(sk0, codes);
        if (ntiles > 1) f8_load_codes(codes, cache, btab, block_size, start + F8_TN, end);
    }
    f8_cp_commit();

    for (int it = 0; it < ntiles; ++it) {
        const int t0 = start + it * F8_TN;
        f8_cp_wait_all();
        fence_async_smem();
        __syncthreads();  // tile `it` (and Q) visible to wgmma; every warpgroup is done with tile it-1
        const u32 kt = k_addr0 + (it & 1) * F8_TILE;
        unsigned char* next = (it & 1) ? sk0 : sk1;
        const float* scl = scl0 + (it & 1) * 64;
        // the next tile's k_pe and scales go into the buffers tile it-1 used
        if (it + 1 < ntiles) f8_load_side(next, scl0 + ((it + 1) & 1) * 64, cache, btab, block_size, t0 + F8_TN, end);
        f8_cp_commit();

        // ---- S[64 x 32] for tokens t0 + 32*wg ..: latent and rope parts apart
        float s_lat[16], s_rope[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            s_lat[i] = 0.f;
            s_rope[i] = 0.f;
        }
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < D_LAT / 16; ++ks) {
            const u32 koff = (ks >> 2) * F8_CHUNK + (ks & 3) * 32;
            u64 da = wg_desc(q_addr + koff, 16, 1024);
            u64 db = wg_desc(kt + koff + wg * 32 * 128, 16, 1024);
            wgmma_m64n32_ss(s_lat, da, db, ks > 0 ? 1 : 0);
        }
#pragma unroll
        for (int ks = 0; ks < D_ROPE / 16; ++ks) {
            const u32 koff = 8 * F8_CHUNK + ks * 32;
            u64 da = wg_desc(q_addr + koff, 16, 1024);
            u64 db = wg_desc(kt + koff + wg * 32 * 128, 16, 1024);
            wgmma_m64n32_ss(s_rope, da, db, ks > 0 ? 1 : 0);
        }
        wg_commit();
        wg_wait0();

        // ---- online softmax; this thread: rows r_lo (x = 0, 1) and r_lo + 8 (x = 2, 3) of token
        // columns 32*wg + 8j + cq (+1)
        float sc[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            sc[2 * j] = scl[32 * wg + 8 * j + cq];
            sc[2 * j + 1] = scl[32 * wg + 8 * j + cq + 1];
        }
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                int t = t0 + 32 * wg + 8 * j + cq + (x & 1);
                float v = t < end ? (s_lat[4 * j + x] * sc[2 * j + (x & 1)] + s_rope[4 * j + x]) * sl2 : -INFINITY;
                s_lat[4 * j + x] = v;
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
                float p0 = exp2f(s_lat[4 * j + 2 * hlf] - m_run[hlf]);
                float p1 = exp2f(s_lat[4 * j + 2 * hlf + 1] - m_run[hlf]);
                l_part[hlf] += p0 + p1;  // the softmax weights; P' below carries the scales too
                __nv_bfloat162 pb = __floats2bfloat162_rn(p0 * sc[2 * j], p1 * sc[2 * j + 1]);
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

        // ---- O[64 x 256 of this warpgroup] += P'[64 x 64] . V[64 x 256]
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < F8_TN / 16; ++kk) {
            u64 da = wg_desc(p_addr + kk * 32, 16, 1024);
            u64 db = wg_desc(kt + (4 * wg) * F8_CHUNK + kk * 16 * 128, F8_CHUNK, 1024);
            wgmma_m64n256_ss_tn(o, da, db, 1);
        }
        wg_commit();
        // while the tensor cores run P . V: the next tile's codes into its bf16 buffer (its last
        // readers, tile it-1's wgmma, finished before the barrier at the top), then the loads of
        // the tile after it
        if (it + 1 < ntiles) {
            f8_store_codes(next, codes);
            if (it + 2 < ntiles) f8_load_codes(codes, cache, btab, block_size, t0 + 2 * F8_TN, end);
        }
        wg_wait0();
    }
    f8_cp_wait_all();

    wg2_store_rows(o, l_part, m_run, red_l, out, o_part, lse, b, split, splits, heads, h0, wg, r_lo, cq);
}
