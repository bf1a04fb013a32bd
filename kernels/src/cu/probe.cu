// probe.cu: tensor-core throughput probes (dsv2-gpu-check --probe). Each CTA runs warpgroup MMAs
// over operands that stay in shared memory (no global loads), the instruction shapes and wait
// patterns the MLA decode and grouped expert kernels use, so their TFLOP/s beside cuBLAS's says
// how much of a kernel's time its MMAs alone would take. Values are whatever shared memory holds
// (zeros); only the rate matters. Grid: one CTA per SM, 256 threads (2 warpgroups), 64 KiB + 1 KiB
// of dynamic shared memory. The load-stream probes at the end measure the other side: how fast
// the MLA cache tiles arrive with no math.
#include "common.cuh"
#include "wgmma.cuh"
#include "tma.cuh"

#define PR_SMEM (64 * 1024)

__device__ __forceinline__ u32 probe_smem(unsigned char* raw) {
    unsigned char* s = reinterpret_cast<unsigned char*>((reinterpret_cast<size_t>(raw) + 1023) & ~(size_t)1023);
    for (int i = threadIdx.x; i < PR_SMEM / 16; i += blockDim.x) reinterpret_cast<uint4*>(s)[i] = make_uint4(0, 0, 0, 0);
    fence_async_smem();
    __syncthreads();
    return (u32)__cvta_generic_to_shared(s);
}

// keeps the accumulators live (the MMAs are volatile asm; this only pins the registers)
__device__ __forceinline__ void probe_sink(float* out, const float* d, int n) {
    float acc = 0.f;
    for (int i = 0; i < n; ++i) acc += d[i];
    if (acc == 12345.f) out[threadIdx.x] = acc;
}

// Both warpgroups: `iters` groups of 4 m64n256k16 (B K-major when TN == 0, MN-major as V in P.V
// when TN == 1), each group waited for at once (WAIT == 0) or with one group left in flight (1).
template <int TN, int WAIT>
__device__ __forceinline__ void probe_n256(float* out, int iters) {
    extern __shared__ __align__(1024) unsigned char pr_raw[];
    const u32 base = probe_smem(pr_raw);
    float d[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) d[i] = 0.f;
    for (int it = 0; it < iters; ++it) {
        wg_fence();
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const u64 da = wg_desc(base + k * 32, 16, 1024);
            const u64 db = TN ? wg_desc(base + 8192 + k * 16 * 128, 8192, 1024) : wg_desc(base + 8192 + k * 32, 16, 1024);
            wgmma_m64n256<TN>(d, da, db, 1);
        }
        wg_commit();
        wg_wait<WAIT>();
    }
    wg_wait<0>();
    wg_fence_regs<128>(d);
    probe_sink(out, d, 128);
}

// S of the MLA decode kernels: 36 m64n64k16 (k = 576) per group, waited for at once; by both
// warpgroups (BOTH) or by warpgroup 0 alone.
template <bool BOTH>
__device__ __forceinline__ void probe_n64(float* out, int iters) {
    extern __shared__ __align__(1024) unsigned char pr_raw[];
    const u32 base = probe_smem(pr_raw);
    const int wg = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0);
    if (!BOTH && wg == 1) return;
    float d[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) d[i] = 0.f;
    for (int it = 0; it < iters; ++it) {
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < 36; ++ks) {
            const u32 off = ((ks >> 2) & 3) * 8192 + (ks & 3) * 32;
            wgmma_m64n64_ss(d, wg_desc(base + off, 16, 1024), wg_desc(base + 32768 + off, 16, 1024), 1);
        }
        wg_commit();
        wg_wait<0>();
    }
    wg_fence_regs<32>(d);
    probe_sink(out, d, 32);
}

extern "C" __global__ void __launch_bounds__(256, 1) probe_n256_kmajor_wait0(float* out, int iters) {
    griddep_wait();
    probe_n256<0, 0>(out, iters);
}
extern "C" __global__ void __launch_bounds__(256, 1) probe_n256_kmajor_wait1(float* out, int iters) {
    griddep_wait();
    probe_n256<0, 1>(out, iters);
}
extern "C" __global__ void __launch_bounds__(256, 1) probe_n256_mnmajor_wait0(float* out, int iters) {
    griddep_wait();
    probe_n256<1, 0>(out, iters);
}
extern "C" __global__ void __launch_bounds__(256, 1) probe_n64_both(float* out, int iters) {
    griddep_wait();
    probe_n64<true>(out, iters);
}
extern "C" __global__ void __launch_bounds__(256, 1) probe_n64_one(float* out, int iters) {
    griddep_wait();
    probe_n64<false>(out, iters);
}

// ---------------------------------------------------------------------------------------------
// Load-stream probes: how fast one CTA per SM can pull MLA cache tiles (64 rows x 576 bf16 =
// 73.7 KB, 9 TMA boxes of 64 x 64 with the 128-byte swizzle, as mla_tma.cu loads them) into a
// ring of NBUF tile buffers, with no math: a tile is "consumed" the moment it lands and its
// buffer is refilled at once. SHARE: CTAs 2j and 2j + 1 stream the same rows (two head groups
// of one sequence reading one cache), else every CTA its own rows. Grid: one CTA per SM (even
// count), 128 threads; CTA c streams `tiles` tiles from row (c / (SHARE ? 2 : 1)) * tiles * 64.
template <int NBUF, bool SHARE>
__device__ __forceinline__ void probe_stream(const TmaMap* map, int tiles) {
    extern __shared__ __align__(1024) unsigned char ps_raw[];
    unsigned char* s = reinterpret_cast<unsigned char*>((reinterpret_cast<size_t>(ps_raw) + 1023) & ~(size_t)1023);
    const u32 base = (u32)__cvta_generic_to_shared(s);
    const u32 bars = base + NBUF * 9 * 8192;
    if (threadIdx.x == 0) {
        for (int i = 0; i < NBUF; ++i) mbar_init(bars + 8 * i, 1);
        mbar_init_fence();
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    const int row0 = (blockIdx.x / (SHARE ? 2 : 1)) * tiles * 64;
    auto issue = [&](int t) {
        const u32 buf = base + (t % NBUF) * 9 * 8192, bar = bars + 8 * (t % NBUF);
        mbar_arrive_expect_tx(bar, 9 * 8192);
        for (int c = 0; c < 9; ++c) tma_load_2d(buf + c * 8192, map, c * 64, row0 + t * 64, bar);
    };
    for (int t = 0; t < NBUF && t < tiles; ++t) issue(t);
    for (int t = 0; t < tiles; ++t) {
        mbar_wait_thread(bars + 8 * (t % NBUF), (t / NBUF) & 1);
        if (t + NBUF < tiles) issue(t + NBUF);
    }
}

extern "C" __global__ void __launch_bounds__(128, 1) probe_stream_buf1_own(const __grid_constant__ TmaMap map, int tiles) {
    griddep_wait();
    probe_stream<1, false>(&map, tiles);
}
extern "C" __global__ void __launch_bounds__(128, 1) probe_stream_buf2_own(const __grid_constant__ TmaMap map, int tiles) {
    griddep_wait();
    probe_stream<2, false>(&map, tiles);
}
extern "C" __global__ void __launch_bounds__(128, 1) probe_stream_buf3_own(const __grid_constant__ TmaMap map, int tiles) {
    griddep_wait();
    probe_stream<3, false>(&map, tiles);
}
extern "C" __global__ void __launch_bounds__(128, 1) probe_stream_buf1_shared(const __grid_constant__ TmaMap map, int tiles) {
    griddep_wait();
    probe_stream<1, true>(&map, tiles);
}
extern "C" __global__ void __launch_bounds__(128, 1) probe_stream_buf2_shared(const __grid_constant__ TmaMap map, int tiles) {
    griddep_wait();
    probe_stream<2, true>(&map, tiles);
}
extern "C" __global__ void __launch_bounds__(128, 1) probe_stream_buf3_shared(const __grid_constant__ TmaMap map, int tiles) {
    griddep_wait();
    probe_stream<3, true>(&map, tiles);
}
