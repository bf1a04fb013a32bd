// tma.cuh: Hopper tensor memory accelerator (TMA) copies, the shared-memory transaction barriers
// (mbarrier) that tell when they have landed, and named barriers between warpgroups.
#pragma once
#include "common.cuh"

// A CUtensorMap as cuTensorMapEncodeTiled writes it: 128 opaque bytes, passed to a kernel by
// value as a `const __grid_constant__` parameter (the TMA unit reads it from parameter space).
struct __align__(64) TmaMap {
    unsigned long long v[16];
};

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes barrier initialisation visible to the TMA unit and to the CTA's other threads (with the
// __syncthreads that must follow).
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// One arrival that also announces `bytes` of TMA traffic the phase must wait for.
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// One arrival with no traffic (a phase with nothing to load completes at once).
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// CLUSTER: acquire at cluster scope (a barrier another CTA of the cluster arrives on with release
// semantics, whose writes the waiter then reads); else the default acquire at CTA scope.
#define DSV2_MBAR_TRY_WAIT(SEM)                                      \
    "{\n.reg .pred p;\n"                                             \
    "mbarrier.try_wait.parity" SEM ".shared::cta.b64 p, [%1], %2;\n" \
    "selp.u32 %0, 1, 0, p;\n}\n"
template <bool CLUSTER = false>
__device__ __forceinline__ bool mbar_try_wait(u32 bar, u32 parity) {
    u32 done;
    if constexpr (CLUSTER)
        asm volatile(DSV2_MBAR_TRY_WAIT(".acquire.cluster") : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    else
        asm volatile(DSV2_MBAR_TRY_WAIT("") : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    return done != 0;
}

// The slow path of mbar_wait, out of line: with the trap inline, ptxas treats everything after
// the wait as a divergent path and serialises every wgmma of the kernel (C7518/C7520 "Potential
// Performance Loss"); out of line it does not.
__device__ __noinline__ void mbar_wait_slow(u32 bar, u32 parity) {
    const long long t0 = clock64();
    while (!mbar_try_wait(bar, parity)) {
        if (clock64() - t0 > 4000000000ll) __trap();
    }
}

// Waits until the barrier's phase of this parity has completed. A phase that never completes (a
// copy that was never issued, a byte count that does not match) traps after about two seconds
// instead of hanging the GPU: the launch then fails with an error the caller reports.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    if (!mbar_try_wait(bar, parity)) mbar_wait_slow(bar, parity);
    __syncwarp();  // lanes may leave the poll loop at different turns; wgmma after it is .aligned
}

// mbar_wait for one thread alone (a producer that issues copies; no wgmma follows it, so the
// trap may stay inline: a call would need registers a producer has given up with setmaxnreg).
// CLUSTER: as mbar_try_wait's.
template <bool CLUSTER = false>
__device__ __forceinline__ void mbar_wait_thread(u32 bar, u32 parity) {
    if (!mbar_try_wait<CLUSTER>(bar, parity)) {
        const long long t0 = clock64();
        while (!mbar_try_wait<CLUSTER>(bar, parity)) {
            if (clock64() - t0 > 4000000000ll) __trap();
        }
    }
}

// 2-D tile copy global -> shared through the tensor map; completion is counted in bytes on `bar`.
// c0 is the inner (contiguous) coordinate in elements, c1 the row.
__device__ __forceinline__ void tma_load_2d(u32 dst, const TmaMap* map, int c0, int c1, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}

// The same copy delivered to every CTA of the cluster in `cta_mask`, at the same shared-memory
// offset, each completing on its own barrier at `bar`'s offset.
__device__ __forceinline__ void tma_load_2d_multicast(u32 dst, const TmaMap* map, int c0, int c1, u32 bar,
                                                      unsigned short cta_mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(bar), "h"(cta_mask)
        : "memory");
}

// Thread block clusters: this CTA's rank, a barrier over all threads of the cluster, and an
// arrival on the barrier at the same offset in another CTA's shared memory.
__device__ __forceinline__ u32 cluster_ctarank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The arrival has the default (CTA-scope release) semantics, as CUTLASS's cluster barrier
// arrive: the callers arrive to hand back a buffer whose reads have completed (wgmma waited),
// so nothing needs ordering at cluster scope, and `.release.cluster` costs every arriving warp a
// memory barrier (the pair grouped kernel ran at half speed with it: ncu, bench/RESULTS.md
// session 11 run 2).
__device__ __forceinline__ void mbar_arrive_remote(u32 bar, u32 cta) {
    u32 remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(bar), "r"(cta));
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}

// A value handed to another CTA of the cluster: a store into its shared memory (at this CTA's
// `local` offset) followed by a cluster-scope release arrival on its barrier at `bar`'s offset,
// which the reader waits on with mbar_wait_thread<true> (acquire at cluster scope) before it
// reads the value. One of each per hand-over: the release's memory barrier is paid rarely.
__device__ __forceinline__ void st_remote_s32(u32 local, u32 cta, int v) {
    u32 remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(cta));
    asm volatile("st.shared::cluster.s32 [%0], %1;\n" ::"r"(remote), "r"(v) : "memory");
}
__device__ __forceinline__ void mbar_arrive_remote_release(u32 bar, u32 cta) {
    u32 remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(bar), "r"(cta));
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}

// Named barriers (ids 1..15; 0 is __syncthreads): `n` threads in all must arrive. A producer
// warpgroup arrives without waiting, the consumer warpgroup waits; shared-memory writes made
// before the arrival are visible to the waiters after it.
__device__ __forceinline__ void named_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void named_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
