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

// Programmatic dependent launch (kernels/src/launch.rs): every kernel begins with this. It returns
// once the kernel before it on the stream has completed and its writes are visible (at once when
// launched without PDL). No early `griddepcontrol.launch_dependents`: with it, the next kernel's
// blocks became resident while this one ran and V2-Lite's batch-1 step got 16 % slower
// (bench/RESULTS.md, session 8 run 2); without it the next grid launches as this one's blocks exit.
__device__ __forceinline__ void griddep_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

// 8 bf16 values moved as one 16-byte access: the unit of every vectorised row kernel
// (H200 reaches copy bandwidth only with 16-byte loads, see docs/GPU.md).
struct __align__(16) bf16x8 {
    __nv_bfloat162 v[4];
};

__device__ __forceinline__ void load8(const bf16* p, float* out) {
    bf16x8 x = *reinterpret_cast<const bf16x8*>(p);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 f = __bfloat1622float2(x.v[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
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
