// common.cuh: helpers shared by every kernel file (bf16 vector access, warp/block reductions).
#pragma once
#include <cuda_bf16.h>

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

typedef __nv_bfloat16 bf16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define WARP 32

// Programmatic dependent launch (kernels/src/launch.rs, `DSV2_PDL=1`). griddep_wait returns once
// the kernel before it on the stream has completed and its writes are visible (at once when
// launched without PDL). The rules every kernel keeps:
// - before griddep_wait it writes no global memory and reads only what no kernel of the step
//   writes (weights) or what a kernel at least two launches back wrote (the routing ids the
//   small-expert down kernel reads, written by the gate before gate/up): the kernel just before
//   may still be running;
// - it calls griddep_launch_dependents only after its own griddep_wait (so a kernel two launches
//   on has its inputs complete), and late: after its main loop, or at once in one-wave kernels
//   of a few blocks (norms). An early trigger in every kernel made the next kernel's blocks
//   resident while this one still had blocks to run, and V2-Lite's batch-1 step 16 % slower
//   (bench/RESULTS.md, session 8 run 2).
// Kernels that stream weights issue their first weight loads before griddep_wait, so that with PDL
// those loads overlap the end of the kernel before.
__device__ __forceinline__ void griddep_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void griddep_launch_dependents() {
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

// The queries' rope part rotated in the latent append's launch (one rope launch less per layer):
// blocks y >= 1 of the append grid each take ROPE_Q_HEADS heads of token t's query
// q [tokens, heads, head_dim] (rope part = the last dr values of each head), rotating pairs
// exactly as rope_bf16 does (bf16 in, f32 math, bf16 out; positions outside the table left as is).
#define ROPE_Q_HEADS 8
__device__ __forceinline__ void rope_q_heads(bf16* __restrict__ q, int t, int heads, int head_dim, int dr,
                                             int p, const float* __restrict__ cos_t,
                                             const float* __restrict__ sin_t, int max_pos) {
    if (p < 0 || p >= max_pos) return;
    const int half = dr / 2, h0 = (blockIdx.y - 1) * ROPE_Q_HEADS;
    const int nh = min(ROPE_Q_HEADS, heads - h0);
    for (int idx = threadIdx.x; idx < nh * half; idx += blockDim.x) {
        const int h = h0 + idx / half, i = idx % half;
        __nv_bfloat162* ptr = reinterpret_cast<__nv_bfloat162*>(q + ((size_t)t * heads + h) * head_dim + head_dim - dr + 2 * i);
        const float2 v = __bfloat1622float2(*ptr);
        const float c = cos_t[(size_t)p * half + i], s = sin_t[(size_t)p * half + i];
        *ptr = __floats2bfloat162_rn(v.x * c - v.y * s, v.x * s + v.y * c);
    }
}

// 8 bf16 values moved as one 16-byte access: the unit of every vectorised row kernel
// (H200 reaches copy bandwidth only with 16-byte loads, see docs/GPU.md).
// Copies go through uint4: copied member by member (the implicit copy), the compiler issued four
// 4-byte loads (LD.E / LDG.E in the SASS) for every `*reinterpret_cast<const bf16x8*>(p)` where
// one 16-byte access was meant (session 14: the small-expert kernels' weight reads were 4-byte).
struct __align__(16) bf16x8 {
    __nv_bfloat162 v[4];
    bf16x8() = default;
    __device__ __forceinline__ bf16x8(const bf16x8& o) {
        *reinterpret_cast<uint4*>(this) = *reinterpret_cast<const uint4*>(&o);
    }
    __device__ __forceinline__ bf16x8& operator=(const bf16x8& o) {
        *reinterpret_cast<uint4*>(this) = *reinterpret_cast<const uint4*>(&o);
        return *this;
    }
};

// 16 bytes of weights streamed once: read-only path, not kept in L1 (each byte is used once), so
// the activations stay there.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ void unpack8(uint4 u, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 v = __bfloat1622float2(h[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

__device__ __forceinline__ void load8(const bf16* p, float* out) {
    unpack8(*reinterpret_cast<const uint4*>(p), out);
}

__device__ __forceinline__ void store8(bf16* p, const float* in) {
    bf16x8 x;
#pragma unroll
    for (int i = 0; i < 4; ++i) x.v[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
    *reinterpret_cast<bf16x8*>(p) = x;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Argmax over a warp: larger value wins, ties go to the smaller index (the reference does the same).
__device__ __forceinline__ void warp_argmax(float& v, int& idx) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > v || (ov == v && oi < idx)) {
            v = ov;
            idx = oi;
        }
    }
}

// Block-wide sum; `scratch` holds at least 32 floats. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    int nw = (blockDim.x + WARP - 1) / WARP;
    float r = lane < nw ? scratch[lane] : 0.f;
    return warp_sum(r);
}

// The residual add + RMSNorm of one row of `hidden` values, the one implementation behind
// add_rmsnorm_bf16 and the launches that norm their own input (the gate, the q_proj | kv_a GEMV):
// h = bf16(x + res), out = w * h / sqrt(mean(h^2) + eps), f32 math. The squares are summed by the
// block's first `threads` threads over i = t*8, t*8 + threads*8, .. and reduced by block_sum (the
// block's other threads add exact zeros), so every caller that passes the norm launcher's thread
// count gets the same bits. Every thread of the block must call it. `h` may be `res` (in place)
// and `out` may be `h`: each thread re-reads only the elements it wrote. `h_copy` / `out_copy`,
// when not null, get a second copy of each (a block's residual and normed rows for later kernels).
__device__ __forceinline__ void add_rmsnorm_row(const bf16* x, const bf16* res, const bf16* __restrict__ w,
                                                bf16* h, bf16* h_copy, bf16* out, bf16* out_copy, int hidden,
                                                float eps, int threads, float* scratch) {
    const int t = threadIdx.x;
    float ss = 0.f;
    if (t < threads)
        for (int i = t * 8; i < hidden; i += threads * 8) {
            float a[8], b[8];
            load8(x + i, a);
            load8(res + i, b);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                a[j] = __bfloat162float(__float2bfloat16_rn(a[j] + b[j]));
                ss += a[j] * a[j];
            }
            store8(h + i, a);
            if (h_copy != nullptr) store8(h_copy + i, a);
        }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)hidden + eps);
    if (t < threads)
        for (int i = t * 8; i < hidden; i += threads * 8) {
            float v[8], g[8];
            load8(h + i, v);
            load8(w + i, g);
#pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = g[j] * (v[j] * inv);
            store8(out + i, v);
            if (out_copy != nullptr) store8(out_copy + i, v);
        }
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    int nw = (blockDim.x + WARP - 1) / WARP;
    float r = lane < nw ? scratch[lane] : -INFINITY;
    return warp_max(r);
}

__device__ __forceinline__ void block_argmax(float& v, int& idx, float* sv, int* si) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
    warp_argmax(v, idx);
    __syncthreads();
    if (lane == 0) {
        sv[wid] = v;
        si[wid] = idx;
    }
    __syncthreads();
    int nw = (blockDim.x + WARP - 1) / WARP;
    v = lane < nw ? sv[lane] : -INFINITY;
    idx = lane < nw ? si[lane] : 0x7fffffff;
    warp_argmax(v, idx);
}
