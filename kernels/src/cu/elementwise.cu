// elementwise.cu: embedding gather, RMSNorm (plain and fused with the residual add), SiLU·mul,
// YaRN RoPE from a cos/sin table. Row kernels move 8 bf16 per 16-byte access.
#include "common.cuh"

// out[r, :] = table[ids[r], :]; ids outside [0, vocab) give a zero row (the router validates ids).
extern "C" __global__ void embedding_bf16(const bf16* __restrict__ table, const int* __restrict__ ids,
                                          bf16* __restrict__ out, int rows, int hidden, int vocab) {
    griddep_wait();
    int r = blockIdx.x;
    if (r >= rows) return;
    int id = ids[r];
    bool ok = id >= 0 && id < vocab;
    const bf16x8* src = reinterpret_cast<const bf16x8*>(table + (size_t)(ok ? id : 0) * hidden);
    bf16x8* dst = reinterpret_cast<bf16x8*>(out + (size_t)r * hidden);
    bf16x8 zero;
#pragma unroll
    for (int i = 0; i < 4; ++i) zero.v[i] = __floats2bfloat162_rn(0.f, 0.f);
    for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) dst[i] = ok ? src[i] : zero;
}

// out = w * x / sqrt(mean(x^2) + eps), f32 math, one block per row.
extern "C" __global__ void rmsnorm_bf16(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                        bf16* __restrict__ out, int rows, int hidden, float eps) {
    griddep_wait();
    // one block per row, one wave: the next kernel may launch now and start its weight loads
    griddep_launch_dependents();
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const bf16* xr = x + (size_t)r * hidden;
    float ss = 0.f;
    for (int i = threadIdx.x * 8; i < hidden; i += blockDim.x * 8) {
        float v[8];
        load8(xr + i, v);
#pragma unroll
        for (int j = 0; j < 8; ++j) ss += v[j] * v[j];
    }
    float inv = rsqrtf(block_sum(ss, scratch) / (float)hidden + eps);
    for (int i = threadIdx.x * 8; i < hidden; i += blockDim.x * 8) {
        float v[8], g[8];
        load8(xr + i, v);
        load8(w + i, g);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = g[j] * (v[j] * inv);
        store8(out + (size_t)r * hidden + i, v);
    }
}

// residual <- bf16(x + residual); out = rmsnorm(residual) * w. The sum is rounded to bf16 before the
// norm because the residual stream is stored in bf16 (the CPU reference rounds the same way).
extern "C" __global__ void add_rmsnorm_bf16(const bf16* __restrict__ x, bf16* __restrict__ residual,
                                            const bf16* __restrict__ w, bf16* __restrict__ out, int rows,
                                            int hidden, float eps) {
    griddep_wait();
    // one block per row, one wave: the next kernel may launch now and start its weight loads
    griddep_launch_dependents();
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    bf16* rr = residual + (size_t)r * hidden;
    add_rmsnorm_row(x + (size_t)r * hidden, rr, w, rr, nullptr, out + (size_t)r * hidden, nullptr, hidden, eps,
                    blockDim.x, scratch);
}

// in [rows, 2I] = gate | up  ->  out [rows, I] = silu(gate) * up.
extern "C" __global__ void silu_mul_bf16(const bf16* __restrict__ in, bf16* __restrict__ out, int rows,
                                         int inter) {
    griddep_wait();
    size_t vec_per_row = inter / 8;
    size_t total = (size_t)rows * vec_per_row;
    for (size_t v = blockIdx.x * (size_t)blockDim.x + threadIdx.x; v < total; v += (size_t)gridDim.x * blockDim.x) {
        size_t r = v / vec_per_row, c = (v % vec_per_row) * 8;
        float g[8], u[8];
        load8(in + r * 2 * inter + c, g);
        load8(in + r * 2 * inter + inter + c, u);
#pragma unroll
        for (int j = 0; j < 8; ++j) g[j] = g[j] / (1.f + __expf(-g[j])) * u[j];
        store8(out + r * inter + c, g);
    }
}

// In-place RoPE on x viewed as [tokens, heads, head_dim] (token stride / head stride in elements);
// the rope part starts at rope_offset and has rope_dim values; adjacent pairs (2i, 2i+1) are rotated
// by the angle whose cos/sin (already times the YaRN mscale) sit at table[pos, i] (f32, [max_pos, rope_dim/2]).
extern "C" __global__ void rope_bf16(bf16* __restrict__ x, const int* __restrict__ pos,
                                     const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                     int tokens, int heads, long long token_stride, long long head_stride,
                                     int rope_offset, int rope_dim, int max_pos) {
    griddep_wait();
    int half = rope_dim / 2;
    size_t total = (size_t)tokens * heads * half;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        int i = idx % half;
        size_t th = idx / half;
        int h = th % heads;
        int t = th / heads;
        int p = pos[t];
        if (p < 0 || p >= max_pos) continue;  // launcher documents: out-of-table positions are left as is
        __nv_bfloat162* ptr = reinterpret_cast<__nv_bfloat162*>(x + t * token_stride + h * head_stride + rope_offset + 2 * i);
        float2 v = __bfloat1622float2(*ptr);
        float c = cos_t[(size_t)p * half + i], s = sin_t[(size_t)p * half + i];
        *ptr = __floats2bfloat162_rn(v.x * c - v.y * s, v.x * s + v.y * c);
    }
}

// Fill with uniform values in [-scale, scale) from a counter-based hash (benchmarks need gigabytes
// of random weights without a host upload).
extern "C" __global__ void fill_uniform_bf16(bf16* __restrict__ out, unsigned long long n, unsigned long long seed, float scale) {
    griddep_wait();
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long z = i + seed * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
        out[i] = __float2bfloat16_rn((2.f * u - 1.f) * scale);
    }
}

// Fill with N(mean, std) values (Box-Muller over two counter-hashed uniforms): random weights
// generated where they live (`--random-weights`), so a full-size model needs no checkpoint files.
__device__ __forceinline__ float hash_uniform(unsigned long long i, unsigned long long seed) {
    unsigned long long z = i + seed * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((float)(z >> 40) + 0.5f) * (1.0f / 16777216.0f);  // (0, 1)
}
extern "C" __global__ void fill_normal_bf16(bf16* __restrict__ out, unsigned long long n, unsigned long long seed,
                                            float mean, float std) {
    griddep_wait();
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        float u1 = hash_uniform(2 * i, seed), u2 = hash_uniform(2 * i + 1, seed);
        float z = sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
        out[i] = __float2bfloat16_rn(mean + std * z);
    }
}
