// gemv.cu: Y[M, N] = X[M, K] · op(W) for few rows (M <= 8), bf16 in, f32 accumulation, bf16 or f32
// out, `batch` independent problems (blockIdx.y) at element strides sx / sw / sy.
//
// Why not cuBLAS: at 1-8 rows a projection is a pure weight read, and cuBLAS answers these shapes
// with split-K GEMMs plus a separate reduction kernel (two launches, a workspace round trip and
// tensor-core tiles that are 1/16 full). These kernels stream every weight byte exactly once with
// 16-byte non-L1-allocating loads, keep several loads in flight per lane, and reduce split-K
// partials inside the block, in one launch. Measured (bench/RESULTS.md, session 8): at one row
// they match or beat cuBLAS on every DeepSeek-V2 projection (lm_head 0.98x its copy roofline);
// at 2-8 rows they lose on large weights, which ops/gemv.rs's plan leaves to cuBLAS.
//
// gemv_nk: W stored [N, K] (a checkpoint `weight`). A warp owns C columns and one of `splits`
//   slices of K; each lane reads 8 consecutive k of each column per step, so one weight row is
//   read by whole 512-byte warp transactions. X (a few KB) stays in L1, weights bypass it.
// gemv_kn: W stored [K, N] (MLA's absorbed W_UK). A lane owns 8 consecutive columns; the 8 warps of
//   a block split K and reduce through shared memory.
#include "common.cuh"

#define GEMV_THREADS 256
#define GEMV_WARPS (GEMV_THREADS / WARP)

// `accumulate`: y += the product, rounded as a separate add of a bf16 product would be (the
// product to bf16 first, then the sum to bf16), so fused and unfused runs agree bit for bit.
__device__ __forceinline__ void store_out(float* y, float v, int accumulate) { *y = accumulate ? *y + v : v; }
__device__ __forceinline__ void store_out(bf16* y, float v, int accumulate) {
    float r = __bfloat162float(__float2bfloat16(v));
    *y = __float2bfloat16(accumulate ? __bfloat162float(*y) + r : r);
}

struct KeepX {
    __device__ __forceinline__ const bf16* operator()(const bf16* x) const { return x; }
};

// One row's pre-attention step, residual' = bf16(add + residual), X = bf16(w * rmsnorm(residual')),
// computed by every block of the GEMV into shared memory (K bf16 values of dynamic shared memory)
// while its first weight loads are in flight: one launch per layer less at one decode row. Bit for
// bit add_rmsnorm_bf16 (elementwise.cu) launched with `threads` threads: the sum of squares is
// split over the same `threads` threads the same way and reduced by the same block_sum (the
// block's other threads add exact zeros to the final warp_sum), so the GEMV reads the same X.
// Block (0, 0) writes residual' to `residual_out`; it must not be `residual`, which the other
// blocks may still be reading.
struct AddNormRow {
    const bf16* __restrict__ add;
    const bf16* __restrict__ residual;
    const bf16* __restrict__ w;
    bf16* __restrict__ residual_out;
    int hidden, threads;
    float eps;
    __device__ __forceinline__ const bf16* operator()(const bf16*) const {
        extern __shared__ uint4 gemv_norm_x[];  // uint4: 16-byte aligned for load8 / store8
        __shared__ float scratch[32];
        bf16* xs = reinterpret_cast<bf16*>(gemv_norm_x);
        const bool writer = blockIdx.x == 0 && blockIdx.y == 0;
        add_rmsnorm_row(add, residual, w, xs, writer ? residual_out : nullptr, xs, nullptr, hidden, eps, threads,
                        scratch);
        __syncthreads();
        return xs;
    }
};

// Block: GEMV_WARPS warps = (GEMV_WARPS / splits) column groups x splits K slices; a column group
// is C columns. Grid: (ceil(N / (C * GEMV_WARPS / splits)), batch).
// `pre` runs once the kernel before has completed (after griddep_wait, every thread of the block)
// and gives the X that the product reads: X itself (KeepX), or a row it computes (AddNormRow).
template <int M, int C, typename OutT, typename Pre = KeepX>
__device__ __forceinline__ void gemv_nk(const bf16* __restrict__ x, long long ldx, long long sx,
                                        const bf16* __restrict__ w, long long ldw, long long sw,
                                        OutT* __restrict__ y, long long ldy, long long sy, int n, int k,
                                        int splits, int accumulate, int n_last, long long ldy_last,
                                        Pre pre = Pre()) {
    // 16-byte loads in flight per lane per step: U steps of C columns, 8 in all (4 left V2's
    // 32 KB o_proj rows at 1.23x the copy roofline: one memory latency per 2 KB per warp)
    constexpr int U = 8 / C;
    __shared__ float part[GEMV_WARPS][M][C];
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int groups = GEMV_WARPS / splits;
    const int g = warp / splits, sp = warp % splits;
    // a pair of projections of different widths (q_proj and kv_a): the last problem has its own
    // N and output stride, and the grid is as wide as the wider one
    if (n_last > 0 && blockIdx.y == gridDim.y - 1) {
        n = n_last;
        ldy = ldy_last;
    }
    if (blockIdx.x * groups * C >= n) return;  // the whole block is past this problem's columns
    const int col0 = (blockIdx.x * groups + g) * C;
    x += blockIdx.y * sx;
    w += blockIdx.y * sw;
    y += blockIdx.y * sy;

    const int chunk = ((k / 8 + splits - 1) / splits) * 8;
    const int k0 = sp * chunk;
    const int k1 = min(k, k0 + chunk);
    const bf16* wr[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
        // columns past N read row 0 (in bounds, discarded) so the loop stays branch-free
        int col = col0 + c < n ? col0 + c : 0;
        wr[c] = w + (long long)col * ldw;
    }
    float acc[M][C];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int c = 0; c < C; ++c) acc[m][c] = 0.f;

    // a pass's weight loads: the first pass's are issued before griddep_wait (weights are never
    // written by a kernel, and under PDL these loads overlap the end of the kernel before, which
    // for a 1-row projection of K <= 8192 is every weight byte this lane reads)
    uint4 wv[U][C];
    auto load_pass = [&](int base) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            int kq = base + u * WARP * 8;
#pragma unroll
            for (int c = 0; c < C; ++c) wv[u][c] = kq < k1 ? ld_stream16(wr[c] + kq) : make_uint4(0, 0, 0, 0);
        }
    };
    load_pass(k0 + lane * 8);
    griddep_wait();
    x = pre(x);

    for (int base = k0 + lane * 8; base < k1; base += U * WARP * 8) {
        if (base != k0 + lane * 8) load_pass(base);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            int kq = base + u * WARP * 8;
            if (kq >= k1) break;
            float wf[C][8];
#pragma unroll
            for (int c = 0; c < C; ++c) unpack8(wv[u][c], wf[c]);
#pragma unroll
            for (int m = 0; m < M; ++m) {
                float xf[8];
                load8(x + m * ldx + kq, xf);
#pragma unroll
                for (int c = 0; c < C; ++c)
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[m][c] = fmaf(xf[i], wf[c][i], acc[m][c]);
            }
        }
    }
    griddep_launch_dependents();
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int c = 0; c < C; ++c) {
            float v = warp_sum(acc[m][c]);
            if (lane == 0) part[warp][m][c] = v;
        }
    __syncthreads();
    // one thread per (column, row) of the block sums its K slices in a fixed order (reproducible)
    for (int t = threadIdx.x; t < groups * C * M; t += GEMV_THREADS) {
        int m = t % M, cc = (t / M) % C, gg = t / (M * C);
        int col = (blockIdx.x * groups + gg) * C + cc;
        if (col >= n) continue;
        float s = 0.f;
        for (int q = 0; q < splits; ++q) s += part[gg * splits + q][m][cc];
        store_out(y + m * ldy + col, s, accumulate);
    }
}

// Block: GEMV_WARPS warps over one tile of 256 columns (a lane owns 8 consecutive columns); warp i
// takes every GEMV_WARPS-th row of K starting at i, R rows per step in flight. Grid: (ceil(N / 256),
// batch). Dynamic shared memory: GEMV_WARPS * M * 256 floats.
template <int M, typename OutT>
__device__ __forceinline__ void gemv_kn(const bf16* __restrict__ x, long long ldx, long long sx,
                                        const bf16* __restrict__ w, long long ldw, long long sw,
                                        OutT* __restrict__ y, long long ldy, long long sy, int n, int k,
                                        int accumulate) {
    constexpr int R = 4;
    extern __shared__ float kn_part[];  // [GEMV_WARPS][M][256]
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int c0 = blockIdx.x * 256 + lane * 8;
    x += blockIdx.y * sx;
    w += blockIdx.y * sw;
    y += blockIdx.y * sy;
    const bool live = c0 < n;  // n is a multiple of 8, so a lane's 8 columns are all in or all out
    float acc[M][8];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[m][i] = 0.f;
    // the first pass's weight loads before griddep_wait (see gemv_nk)
    uint4 wv[R];
    auto load_pass = [&](int kb) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            int kk = kb + r * GEMV_WARPS;
            wv[r] = live && kk < k ? ld_stream16(w + (long long)kk * ldw + c0) : make_uint4(0, 0, 0, 0);
        }
    };
    load_pass(warp);
    griddep_wait();
    if (live) {
        for (int kb = warp; kb < k; kb += R * GEMV_WARPS) {
            if (kb != warp) load_pass(kb);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                int kk = kb + r * GEMV_WARPS;
                if (kk >= k) break;
                float wf[8];
                unpack8(wv[r], wf);
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    float xv = __bfloat162float(x[m * ldx + kk]);
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[m][i] = fmaf(xv, wf[i], acc[m][i]);
                }
            }
        }
    }
    griddep_launch_dependents();
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int i = 0; i < 8; ++i) kn_part[(warp * M + m) * 256 + lane * 8 + i] = acc[m][i];
    __syncthreads();
    for (int t = threadIdx.x; t < M * 256; t += GEMV_THREADS) {
        int m = t / 256, cc = t % 256;
        int col = blockIdx.x * 256 + cc;
        if (col >= n) continue;
        float s = 0.f;
        for (int q = 0; q < GEMV_WARPS; ++q) s += kn_part[(q * M + m) * 256 + cc];
        store_out(y + m * ldy + col, s, accumulate);
    }
}

// The exported kernels, written out (not token-pasted) because the module loader finds kernel
// names by reading the exported declarations in this text. Column group width per row count (C):
// more columns per warp reuse each X load (from L1) for more weight loads, which matters once M
// grows (L1 bandwidth, not DRAM, would bind at M = 8, C = 1). [K, N] takes up to 4 rows: 8 KiB of
// split-K partials per row stays under the 48 KiB default shared memory. `accumulate` != 0: y +=.
// [N, K]: n_last > 0 gives the last batch problem its own N and ldy (ldy_last).
#define GEMV_NK_ARGS                                                                                  \
    const bf16 *__restrict__ x, long long ldx, long long sx, const bf16 *__restrict__ w, long long ldw, \
        long long sw, OUT_T *__restrict__ y, long long ldy, long long sy, int n, int k, int splits,     \
        int accumulate, int n_last, long long ldy_last
#define GEMV_KN_ARGS                                                                                  \
    const bf16 *__restrict__ x, long long ldx, long long sx, const bf16 *__restrict__ w, long long ldw, \
        long long sw, OUT_T *__restrict__ y, long long ldy, long long sy, int n, int k, int accumulate

#define OUT_T bf16
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m1_bf16(GEMV_NK_ARGS) {
    gemv_nk<1, 1, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
// One row: X = the AddNormRow of (add, residual, norm_w) (see there), then the [N, K] product as
// gemv_nk_m1_bf16 computes it from that X (a pair with n_last / ldy_last as there). Dynamic shared
// memory: k bf16 values.
extern "C" __global__ void __launch_bounds__(GEMV_THREADS)
    gemv_nk_norm_m1_bf16(const bf16* __restrict__ add, const bf16* __restrict__ residual,
                         const bf16* __restrict__ norm_w, bf16* __restrict__ residual_out, int norm_threads,
                         float eps, const bf16* __restrict__ w, long long ldw, long long sw,
                         bf16* __restrict__ y, long long ldy, long long sy, int n, int k, int splits,
                         int n_last, long long ldy_last) {
    gemv_nk<1, 1, bf16>(nullptr, 0, 0, w, ldw, sw, y, ldy, sy, n, k, splits, 0, n_last, ldy_last,
                        AddNormRow{add, residual, norm_w, residual_out, k, norm_threads, eps});
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m2_bf16(GEMV_NK_ARGS) {
    gemv_nk<2, 1, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m3_bf16(GEMV_NK_ARGS) {
    gemv_nk<3, 2, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m4_bf16(GEMV_NK_ARGS) {
    gemv_nk<4, 2, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m5_bf16(GEMV_NK_ARGS) {
    gemv_nk<5, 4, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m6_bf16(GEMV_NK_ARGS) {
    gemv_nk<6, 4, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m7_bf16(GEMV_NK_ARGS) {
    gemv_nk<7, 4, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m8_bf16(GEMV_NK_ARGS) {
    gemv_nk<8, 4, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_kn_m1_bf16(GEMV_KN_ARGS) {
    gemv_kn<1, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, accumulate);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_kn_m2_bf16(GEMV_KN_ARGS) {
    gemv_kn<2, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, accumulate);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_kn_m3_bf16(GEMV_KN_ARGS) {
    gemv_kn<3, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, accumulate);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_kn_m4_bf16(GEMV_KN_ARGS) {
    gemv_kn<4, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, accumulate);
}
#undef OUT_T

#define OUT_T float
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m1_f32(GEMV_NK_ARGS) {
    gemv_nk<1, 1, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m2_f32(GEMV_NK_ARGS) {
    gemv_nk<2, 1, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m3_f32(GEMV_NK_ARGS) {
    gemv_nk<3, 2, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m4_f32(GEMV_NK_ARGS) {
    gemv_nk<4, 2, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m5_f32(GEMV_NK_ARGS) {
    gemv_nk<5, 4, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m6_f32(GEMV_NK_ARGS) {
    gemv_nk<6, 4, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m7_f32(GEMV_NK_ARGS) {
    gemv_nk<7, 4, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_nk_m8_f32(GEMV_NK_ARGS) {
    gemv_nk<8, 4, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, splits, accumulate, n_last, ldy_last);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_kn_m1_f32(GEMV_KN_ARGS) {
    gemv_kn<1, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, accumulate);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_kn_m2_f32(GEMV_KN_ARGS) {
    gemv_kn<2, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, accumulate);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_kn_m3_f32(GEMV_KN_ARGS) {
    gemv_kn<3, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, accumulate);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_kn_m4_f32(GEMV_KN_ARGS) {
    gemv_kn<4, OUT_T>(x, ldx, sx, w, ldw, sw, y, ldy, sy, n, k, accumulate);
}
#undef OUT_T
