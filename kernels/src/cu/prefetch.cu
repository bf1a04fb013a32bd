// prefetch.cu: warm the L2 cache with weights that kernels later in the same step will read.
//
// Why: at batch 1 a decode step is ~20 small kernels a layer, and each streams its weights from
// HBM only once it starts, after the kernel before it has drained: HBM idles in every gap and
// during every latency-bound kernel (norms, RoPE, the gate, attention over a short context). This
// kernel runs on a side stream forked from the step, so a layer's weights are already on their
// way into L2 while the kernels ahead of them run. A prefetch is only a hint to the memory
// system: it cannot change any result, only when the bytes arrive.
//
// l2_prefetch: up to PREFETCH_RANGES (address, bytes) ranges, each 16-byte aligned and a multiple
// of 16 bytes long, cut into PREFETCH_CHUNK pieces; each thread hands its pieces to the TMA unit
// (cp.async.bulk.prefetch.L2), which fetches them without a register or shared-memory landing.
// `evict_last` (non-zero) marks the lines to be kept over lines read without a hint, so that a
// stream of routed-expert weights passing through L2 does not push them out before their use.
#include "common.cuh"

#define PREFETCH_RANGES 8
#define PREFETCH_CHUNK 16384

struct PrefetchRanges {
    unsigned long long ptr[PREFETCH_RANGES];
    unsigned long long bytes[PREFETCH_RANGES];
    int n;
    int evict_last;
};

extern "C" __global__ void l2_prefetch(PrefetchRanges r) {
    griddep_wait();
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long nthreads = (long long)gridDim.x * blockDim.x;
    unsigned long long policy = 0;
    if (r.evict_last) asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
    // one piece index over all ranges, so the pieces of small ranges spread over the threads too
    long long first = 0;
    for (int i = 0; i < r.n && i < PREFETCH_RANGES; ++i) {
        const long long pieces = (long long)((r.bytes[i] + PREFETCH_CHUNK - 1) / PREFETCH_CHUNK);
        long long p = tid - first;
        if (p < 0) p += ((-p + nthreads - 1) / nthreads) * nthreads;
        for (; p < pieces; p += nthreads) {
            const unsigned long long off = (unsigned long long)p * PREFETCH_CHUNK;
            const unsigned long long left = r.bytes[i] - off;
            const unsigned int size = (unsigned int)(left < PREFETCH_CHUNK ? left : PREFETCH_CHUNK);
            const unsigned long long addr = r.ptr[i] + off;
            if (r.evict_last)
                asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(addr), "r"(size),
                             "l"(policy)
                             : "memory");
            else
                asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(addr), "r"(size) : "memory");
        }
        first += pieces;
    }
}
