// sample.cu: token selection on the GPU: argmax, and temperature / top-k / top-p sampling driven by
// caller-supplied uniform random numbers (so a run is reproducible and testable).
#include "common.cuh"

#define SAMPLE_THREADS 1024

// ids[r] = argmax_j logits[r, j] (ties -> smallest j). One block per row.
extern "C" __global__ void argmax_f32(const float* __restrict__ logits, int* __restrict__ ids, int rows, int vocab) {
    griddep_wait();
    __shared__ float sv[32];
    __shared__ int si[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* row = logits + (size_t)r * vocab;
    float v = -INFINITY;
    int idx = 0x7fffffff;
    // j increases per thread, so strict > keeps the first of equal values
    if ((vocab & 3) == 0 && (reinterpret_cast<size_t>(row) & 15) == 0) {
        // 16-byte loads, four in flight per thread: one CTA reads a batch-1 row of 102400 logits
        // (410 KB) alone, and one dependent 4-byte load at a time made that 44 us (H100)
        const float4* row4 = reinterpret_cast<const float4*>(row);
        const int n4 = vocab >> 2;
#pragma unroll 4
        for (int j = threadIdx.x; j < n4; j += blockDim.x) {
            const float4 x = row4[j];
            const int b = j << 2;
            if (x.x > v) { v = x.x; idx = b; }
            if (x.y > v) { v = x.y; idx = b + 1; }
            if (x.z > v) { v = x.z; idx = b + 2; }
            if (x.w > v) { v = x.w; idx = b + 3; }
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            float x = row[j];
            if (x > v) {
                v = x;
                idx = j;
            }
        }
    }
    block_argmax(v, idx, sv, si);
    if (threadIdx.x == 0) ids[r] = idx == 0x7fffffff ? 0 : idx;
}

// Count (how = 0) or sum (how = 1) of w[j] >= thr over the row.
__device__ float block_stat_ge(const float* w, int vocab, float thr, int how, float* scratch) {
    float acc = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float x = w[j];
        if (x >= thr) acc += how ? x : 1.f;
    }
    return block_sum(acc, scratch);
}

// Per row r: temperature <= 0 -> argmax. Otherwise w_j = exp((x_j - max) / T) (unnormalised
// probabilities, written to work [rows, vocab]); keep w_j >= tk where tk is the k-th largest w
// (top_k <= 0 or >= vocab: no limit); then keep the smallest top set whose mass >= top_p of the
// kept mass (as a threshold tp on w: the largest tp with mass(w >= max(tk, tp)) >= top_p * Z_k);
// sample the kept set in index order with target u * Z. Thresholds are found by bisection over
// the float bit patterns of w in (0, 1], which is exact for the count (top-k).
extern "C" __global__ void sample_f32(const float* __restrict__ logits, const float* __restrict__ temperature,
                                      const int* __restrict__ top_k, const float* __restrict__ top_p,
                                      const float* __restrict__ uniform, float* __restrict__ work,
                                      int* __restrict__ ids, int rows, int vocab) {
    griddep_wait();
    __shared__ float scratch[32];
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ float chunk_sums[SAMPLE_THREADS];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* row = logits + (size_t)r * vocab;
    float* w = work + (size_t)r * vocab;
    float temp = temperature[r];

    float v = -INFINITY;
    int idx = 0x7fffffff;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float x = row[j];
        if (x > v) {
            v = x;
            idx = j;
        }
    }
    block_argmax(v, idx, sv, si);
    if (!(temp > 0.f)) {
        if (threadIdx.x == 0) ids[r] = idx;
        return;
    }
    const float mx = v;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) w[j] = expf((row[j] - mx) / temp);
    __syncthreads();

    // top-k threshold: largest bit pattern tk with count(w >= tk) >= k
    unsigned lo = 0u, hi = 0x3f800000u;  // w in [0, 1]; the max element has w == 1 exactly
    int k = top_k[r];
    float tk = 0.f;
    if (k > 0 && k < vocab) {
        while (lo < hi) {
            unsigned mid = lo + (hi - lo + 1) / 2;
            float c = block_stat_ge(w, vocab, __uint_as_float(mid), 0, scratch);
            if (c >= (float)k) lo = mid; else hi = mid - 1;
        }
        tk = __uint_as_float(lo);
    }
    float zk = block_stat_ge(w, vocab, tk, 1, scratch);

    float p = top_p[r];
    float thr = tk;
    if (p < 1.f) {
        lo = __float_as_uint(tk);
        hi = 0x3f800000u;
        while (lo < hi) {
            unsigned mid = lo + (hi - lo + 1) / 2;
            float mass = block_stat_ge(w, vocab, __uint_as_float(mid), 1, scratch);
            if (mass >= p * zk) lo = mid; else hi = mid - 1;
        }
        thr = __uint_as_float(lo);
    }

    // Sample in index order: thread i owns a contiguous chunk; block scan of chunk sums.
    int per = (vocab + blockDim.x - 1) / blockDim.x;
    int j0 = threadIdx.x * per, j1 = min(vocab, j0 + per);
    float cs = 0.f;
    for (int j = j0; j < j1; ++j) {
        float x = w[j];
        if (x >= thr) cs += x;
    }
    chunk_sums[threadIdx.x] = cs;
    __syncthreads();
    if (threadIdx.x == 0) {
        float z = 0.f;
        for (int i = 0; i < (int)blockDim.x; ++i) {
            float c = chunk_sums[i];
            chunk_sums[i] = z;  // exclusive prefix
            z += c;
        }
        scratch[0] = z;
    }
    __syncthreads();
    float target = uniform[r] * scratch[0];
    float run = chunk_sums[threadIdx.x];
    int pick = 0x7fffffff;
    int last_kept = -1;
    if (run <= target || threadIdx.x == 0) {
        for (int j = j0; j < j1; ++j) {
            float x = w[j];
            if (x >= thr) {
                last_kept = j;
                run += x;
                if (run > target) {
                    pick = j;
                    break;
                }
            }
        }
    }
    // the first chunk whose running sum passes the target wins; rounding can leave none, then the
    // last kept element overall (largest index) is taken
    float pv = pick == 0x7fffffff ? -INFINITY : -(float)pick;
    int pi = pick;
    block_argmax(pv, pi, sv, si);
    float lv = last_kept < 0 ? -INFINITY : (float)last_kept;
    int li = last_kept;
    __syncthreads();
    block_argmax(lv, li, sv, si);
    if (threadIdx.x == 0) ids[r] = pi != 0x7fffffff ? pi : (li >= 0 ? li : idx);
}
