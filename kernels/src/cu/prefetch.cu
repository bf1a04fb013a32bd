// prefetch.cu: weights pulled into L2 ahead of the kernel that reads them.
//
// At few rows a decode layer's attention is a chain of latency-bound launches (latent append,
// MLA decode, split-KV combine) that leave the memory bandwidth mostly idle for tens of
// microseconds, while the experts after it are bandwidth-bound. Weights known before the gate
// (the shared experts, o_proj) can be read into L2 during that idle time, so that the
// bandwidth-bound launches read them from L2.

#include "common.cuh"

#define PREFETCH_RANGES 4
#define PREFETCH_CHUNK 16384

// One bulk L2 prefetch (TMA, no data returned to the SM) of [p, p + bytes); bytes a multiple of 16,
// p 16-byte aligned. `persist`: the lines carry the evict_last policy, so that with an L2
// set-aside for persisting accesses the streaming reads in between do not evict them.
__device__ __forceinline__ void prefetch_l2_bulk(const void* p, unsigned bytes, bool persist) {
    if (persist) {
        unsigned long long pol;
        asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
        asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(p), "r"(bytes), "l"(pol)
                     : "memory");
    } else {
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
    }
}

// Up to PREFETCH_RANGES ranges (p_i, n_i bytes; n_i = 0: unused), cut into PREFETCH_CHUNK-byte
// pieces dealt round-robin to every thread of the grid, so that the bulk requests leave from
// every SM's copy engine at once. It touches only weights, so the prefetches go out before
// griddep_wait; the wait stays (at the end) because a kernel after this one counts on this
// one's completion meaning the kernel before it has completed too (common.cuh).
extern "C" __global__ void l2_prefetch_ranges(const unsigned char* p0, unsigned long long n0,
                                              const unsigned char* p1, unsigned long long n1,
                                              const unsigned char* p2, unsigned long long n2,
                                              const unsigned char* p3, unsigned long long n3,
                                              int persist) {
    const unsigned char* ps[PREFETCH_RANGES] = {p0, p1, p2, p3};
    const unsigned long long ns[PREFETCH_RANGES] = {n0, n1, n2, n3};
    const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long nthreads = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long base = 0;  // chunk index where range r starts, over all ranges
#pragma unroll
    for (int r = 0; r < PREFETCH_RANGES; ++r) {
        const unsigned long long chunks = (ns[r] + PREFETCH_CHUNK - 1) / PREFETCH_CHUNK;
        // this thread's first chunk of range r: the smallest c >= base with c % nthreads == tid
        unsigned long long c = base + (tid + nthreads - base % nthreads) % nthreads;
        for (; c < base + chunks; c += nthreads) {
            const unsigned long long off = (c - base) * PREFETCH_CHUNK;
            const unsigned long long left = ns[r] - off;
            const unsigned bytes = (unsigned)(left < PREFETCH_CHUNK ? left : PREFETCH_CHUNK);
            prefetch_l2_bulk(ps[r] + off, bytes, persist != 0);
        }
        base += chunks;
    }
    griddep_wait();
    griddep_launch_dependents();
}
