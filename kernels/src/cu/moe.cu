// moe.cu: softmax gating with group-limited greedy top-k, token permutation by expert, gather of
// permuted rows, and the weighted un-permute (combine).
#include "common.cuh"

#define MAX_EXPERTS 256
#define PER_LANE (MAX_EXPERTS / WARP)

// One warp per token. logits f32 [tokens, E] -> ids i32 [tokens, k], weights f32 [tokens, k].
// softmax over E; if n_group > 1 keep the topk_group groups with the largest max score (others
// scored 0, as DeepSeek's masked_fill does); greedy top-k (ties -> lower expert id);
// norm_topk: w / (sum + 1e-20), else w * scaling.
//
// Fast path (E a multiple of 32 up to 256, each group a power-of-two run of whole lanes): lane l
// holds experts PER l .. PER l + PER - 1, so a group's maximum is a few shuffles among its lanes,
// the kept groups are found by rank in one pass, and each top-k round is one __reduce_max_sync
// over order-preserving keys plus a ballot for the lowest expert id among equals. Why: the general
// path below is one warp's long chain of dependent instructions (runtime group divisions, a warp
// reduction per group, 10 shuffles per top-k round); it took 14.5 us per MoE layer on V2 at batch
// 1 (bench/RESULTS.md, session 7 run 3), this path 4.1 us on V2-Lite (session 9 run 1).
template <int PER>
__device__ __forceinline__ void gate_contiguous(const float* __restrict__ row, int* __restrict__ ids,
                                                float* __restrict__ weights, int n_group, int topk_group,
                                                int k, int norm_topk, float scaling) {
    const int lane = threadIdx.x % WARP;
    const int n_exp = PER * WARP;
    float s[PER];
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        s[j] = row[lane * PER + j];
        m = fmaxf(m, s[j]);
    }
    m = warp_max(m);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        s[j] = expf(s[j] - m);
        sum += s[j];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int j = 0; j < PER; ++j) s[j] = s[j] / sum;
    if (n_group > 1) {
        const int lanes = n_exp / n_group / PER;  // lanes per group: a power of two (launcher)
        float gm = s[0];
#pragma unroll
        for (int j = 1; j < PER; ++j) gm = fmaxf(gm, s[j]);
        for (int o = 1; o < lanes; o <<= 1) gm = fmaxf(gm, __shfl_xor_sync(0xffffffffu, gm, o));
        const int mine = lane / lanes;
        // rank of this lane's group among all groups (larger max first, ties to the lower group)
        int rank = 0;
        for (int g = 0; g < n_group; ++g) {
            const float v = __shfl_sync(0xffffffffu, gm, g * lanes);
            rank += (v > gm || (v == gm && g < mine)) ? 1 : 0;
        }
        if (rank >= topk_group) {
#pragma unroll
            for (int j = 0; j < PER; ++j) s[j] = 0.f;
        }
    }
    // keys: scores are >= 0, so their bits order as unsigned integers; + 1 leaves 0 for "taken"
    u32 key[PER];
#pragma unroll
    for (int j = 0; j < PER; ++j) key[j] = __float_as_uint(s[j]) + 1u;
    float wsum = 0.f, my_w = 0.f;
    int my_id = 0;
    for (int r = 0; r < k; ++r) {
        u32 best = key[0];
        int bj = 0;
#pragma unroll
        for (int j = 1; j < PER; ++j)
            if (key[j] > best) {  // strict: the lower expert id keeps a tie
                best = key[j];
                bj = j;
            }
        const u32 top = __reduce_max_sync(0xffffffffu, best);
        const int win = __ffs(__ballot_sync(0xffffffffu, best == top)) - 1;  // lowest lane: lowest id
        const int wj = __shfl_sync(0xffffffffu, bj, win);
        const float v = __uint_as_float(top - 1u);
        if (lane == win) {
#pragma unroll
            for (int j = 0; j < PER; ++j)
                if (j == wj) key[j] = 0u;
        }
        wsum += v;
        if (lane == r) {
            my_w = v;
            my_id = win * PER + wj;
        }
    }
    if (lane < k) {
        const float w = norm_topk ? my_w / (wsum + 1e-20f) : my_w * scaling;
        ids[lane] = my_id;
        weights[lane] = w;
    }
}

// gate_contiguous for E = 32 * per experts (per 1..8, what the launchers' fast-path test allows);
// false for any other count.
__device__ __forceinline__ bool gate_contiguous_any(const float* row, int* ids, float* weights, int n_exp,
                                                    int n_group, int topk_group, int k, int norm_topk,
                                                    float scaling) {
    switch (n_exp / WARP) {
        case 1: gate_contiguous<1>(row, ids, weights, n_group, topk_group, k, norm_topk, scaling); return true;
        case 2: gate_contiguous<2>(row, ids, weights, n_group, topk_group, k, norm_topk, scaling); return true;
        case 3: gate_contiguous<3>(row, ids, weights, n_group, topk_group, k, norm_topk, scaling); return true;
        case 4: gate_contiguous<4>(row, ids, weights, n_group, topk_group, k, norm_topk, scaling); return true;
        case 5: gate_contiguous<5>(row, ids, weights, n_group, topk_group, k, norm_topk, scaling); return true;
        case 6: gate_contiguous<6>(row, ids, weights, n_group, topk_group, k, norm_topk, scaling); return true;
        case 7: gate_contiguous<7>(row, ids, weights, n_group, topk_group, k, norm_topk, scaling); return true;
        case 8: gate_contiguous<8>(row, ids, weights, n_group, topk_group, k, norm_topk, scaling); return true;
        default: return false;
    }
}

extern "C" __global__ void moe_gate_f32(const float* __restrict__ logits, int* __restrict__ ids,
                                        float* __restrict__ weights, int tokens, int n_exp, int n_group,
                                        int topk_group, int k, int norm_topk, float scaling, int contiguous) {
    griddep_wait();
    int lane = threadIdx.x % WARP;
    int t = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (t >= tokens) return;
    const float* row = logits + (size_t)t * n_exp;
    // the launcher only sets `contiguous` for 32..256 experts in steps of 32
    if (contiguous && gate_contiguous_any(row, ids + (size_t)t * k, weights + (size_t)t * k, n_exp, n_group,
                                          topk_group, k, norm_topk, scaling))
        return;
    float s[PER_LANE];
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
        int e = lane + j * WARP;
        s[j] = e < n_exp ? row[e] : -INFINITY;
        m = fmaxf(m, s[j]);
    }
    m = warp_max(m);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
        int e = lane + j * WARP;
        s[j] = e < n_exp ? expf(s[j] - m) : 0.f;
        sum += s[j];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) s[j] = s[j] / sum;

    if (n_group > 1) {
        int gsize = n_exp / n_group;
        // lane g ends up holding group g's max score.
        float gmax_mine = -INFINITY;
        for (int g = 0; g < n_group; ++g) {
            float v = -INFINITY;
#pragma unroll
            for (int j = 0; j < PER_LANE; ++j) {
                int e = lane + j * WARP;
                if (e < n_exp && e / gsize == g) v = fmaxf(v, s[j]);
            }
            v = warp_max(v);
            if (lane == g) gmax_mine = v;
        }
        unsigned keep = 0;
        for (int r = 0; r < topk_group; ++r) {
            float v = (lane < n_group && !((keep >> lane) & 1u)) ? gmax_mine : -INFINITY;
            int gi = lane;
            warp_argmax(v, gi);
            keep |= 1u << gi;
        }
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            int e = lane + j * WARP;
            if (e < n_exp && !((keep >> (e / gsize)) & 1u)) s[j] = 0.f;
        }
    }

    float wsum = 0.f;
    float my_w = 0.f;
    int my_id = 0;
    for (int r = 0; r < k; ++r) {
        float v = -INFINITY;
        int vi = 0x7fffffff;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            int e = lane + j * WARP;
            if (e < n_exp && (s[j] > v || (s[j] == v && e < vi))) {
                v = s[j];
                vi = e;
            }
        }
        warp_argmax(v, vi);
        // remove the winner from further rounds
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j)
            if (lane + j * WARP == vi) s[j] = -INFINITY;
        wsum += v;
        if (lane == r) {
            my_w = v;
            my_id = vi;
        }
    }
    if (lane < k) {
        float w = norm_topk ? my_w / (wsum + 1e-20f) : my_w * scaling;
        ids[(size_t)t * k + lane] = my_id;
        weights[(size_t)t * k + lane] = w;
    }
}

// counts[e] = number of assignments (t, j) with ids[t, j] == e; ids outside [0, E) are skipped
// (an expert shard marks experts it does not own with -1). counts must be zeroed first.
extern "C" __global__ void moe_count_i32(const int* __restrict__ ids, int n_assign, int n_exp,
                                         int* __restrict__ counts) {
    griddep_wait();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_assign; i += gridDim.x * blockDim.x) {
        int e = ids[i];
        if (e >= 0 && e < n_exp) atomicAdd(&counts[e], 1);
    }
}

// offsets[0] = 0, offsets[e + 1] = offsets[e] + ceil(counts[e] / bb): the permuted row offsets
// (bb = 1) or the grouped kernels' tile offsets (bb rows per tile). One block of 1024 threads,
// E <= 1024.
extern "C" __global__ void moe_offsets_i32(const int* __restrict__ counts, int n_exp, int bb, int* __restrict__ offsets) {
    griddep_wait();
    __shared__ int buf[1024];
    int e = threadIdx.x;
    buf[e] = e < n_exp ? (counts[e] + bb - 1) / bb : 0;
    __syncthreads();
    for (int o = 1; o < 1024; o <<= 1) {
        int v = e >= o ? buf[e - o] : 0;
        __syncthreads();
        buf[e] += v;
        __syncthreads();
    }
    if (e < n_exp) offsets[e + 1] = buf[e];
    if (e == 0) offsets[0] = 0;
}

// One block per expert: a stable rank of each assignment among those of its expert, so the permuted
// order is deterministic (token order within an expert). slot_of[a] = permuted row of assignment a
// (or -1), src_row[slot] = token of that permuted row.
extern "C" __global__ void moe_scatter_i32(const int* __restrict__ ids, int n_assign, int k,
                                           const int* __restrict__ offsets, int* __restrict__ slot_of,
                                           int* __restrict__ src_row) {
    griddep_wait();
    __shared__ int warp_counts[32];
    __shared__ int base;
    int e = blockIdx.x;
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = blockDim.x / WARP;
    if (threadIdx.x == 0) base = offsets[e];
    __syncthreads();
    for (int start = 0; start < n_assign; start += blockDim.x) {
        int a = start + threadIdx.x;
        int id = a < n_assign ? ids[a] : -1;
        if (e == 0 && a < n_assign && (id < 0 || id >= (int)gridDim.x)) slot_of[a] = -1;
        bool mine = id == e;
        unsigned ballot = __ballot_sync(0xffffffffu, mine);
        if (lane == 0) warp_counts[wid] = __popc(ballot);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < nw; ++w) {
            if (w < wid) before += warp_counts[w];
            total += warp_counts[w];
        }
        if (mine) {
            int slot = base + before + __popc(ballot & ((1u << lane) - 1u));
            slot_of[a] = slot;
            src_row[slot] = a / k;
        }
        __syncthreads();
        if (threadIdx.x == 0) base += total;
        __syncthreads();
    }
}

// moe_count + moe_offsets + moe_scatter (and the memsets before them) in one block of 1,024
// threads, for decode-sized routings (E <= PERM_MAX_EXP; the launcher also bounds n_assign):
// the same counts, offsets, slot_of and src_row (src_row zero past the routed rows, as the
// zeroed buffer of the split path). Why: at batch 64-256 the split path is 4 memsets and 3
// launches a MoE layer, each a few us of mostly latency (session 17 ncu-step of V2-Lite at
// batch 256: count 2.6, offsets 3.4, scatter 4.8 us). Warp w owns a contiguous run of the
// assignments; pass 1 counts each warp's assignments per expert (warp votes group equal ids), a
// scan over warps and then over experts gives every (warp, expert) its first slot, and pass 2
// hands out slots in the same order, so rows keep assignment order within an expert.
#define PERM_WARPS 32
#define PERM_MAX_EXP 256
extern "C" __global__ void __launch_bounds__(1024) moe_permute_small_i32(const int* __restrict__ ids, int n_assign,
                                                                        int k, int n_exp, int* __restrict__ counts,
                                                                        int* __restrict__ offsets,
                                                                        int* __restrict__ slot_of,
                                                                        int* __restrict__ src_row) {
    griddep_wait();
    __shared__ int cnt[PERM_WARPS][PERM_MAX_EXP];  // a warp's count of an expert, then its first slot
    __shared__ int off[PERM_MAX_EXP + 1];
    const int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    const unsigned below = (1u << lane) - 1u;
    for (int i = threadIdx.x; i < PERM_WARPS * PERM_MAX_EXP; i += blockDim.x) (&cnt[0][0])[i] = 0;
    __syncthreads();
    const int per = (n_assign + PERM_WARPS - 1) / PERM_WARPS;
    const int a0 = w * per, a1 = min(n_assign, a0 + per);
    // pass 1: the group of equal ids in a chunk of 32 adds its size through its lowest lane
    for (int c = a0; c < a1; c += WARP) {
        const int a = c + lane;
        const int id = a < a1 ? ids[a] : -1;
        const bool ok = id >= 0 && id < n_exp;
        const unsigned grp = __match_any_sync(0xffffffffu, ok ? id : -1);
        if (ok && (grp & below) == 0) cnt[w][id] += __popc(grp);
        __syncwarp();
    }
    __syncthreads();
    // per expert: the warps' counts to their first ranks, and the expert's total
    if ((int)threadIdx.x < n_exp) {
        const int e = threadIdx.x;
        int run = 0;
        for (int q = 0; q < PERM_WARPS; ++q) {
            const int v = cnt[q][e];
            cnt[q][e] = run;
            run += v;
        }
        off[e] = run;
    }
    __syncthreads();
    // the totals to offsets: warp 0, PERM_MAX_EXP / WARP consecutive experts a lane
    if (w == 0) {
        constexpr int EXPS_A_LANE = PERM_MAX_EXP / WARP;
        int v[EXPS_A_LANE], sum = 0;
#pragma unroll
        for (int j = 0; j < EXPS_A_LANE; ++j) {
            const int e = lane * EXPS_A_LANE + j;
            v[j] = e < n_exp ? off[e] : 0;
            sum += v[j];
        }
        int inc = sum;
        for (int o = 1; o < WARP; o <<= 1) {
            const int t = __shfl_up_sync(0xffffffffu, inc, o);
            if (lane >= o) inc += t;
        }
        int run = inc - sum;
#pragma unroll
        for (int j = 0; j < EXPS_A_LANE; ++j) {
            const int e = lane * EXPS_A_LANE + j;
            if (e < n_exp) {
                counts[e] = v[j];
                offsets[e] = run;
                off[e] = run;
            }
            run += v[j];
        }
        if (lane == WARP - 1) {
            offsets[n_exp] = run;
            off[n_exp] = run;
        }
    }
    __syncthreads();
    // pass 2: the same chunks in the same order hand out the slots
    for (int c = a0; c < a1; c += WARP) {
        const int a = c + lane;
        const int id = a < a1 ? ids[a] : -1;
        const bool ok = id >= 0 && id < n_exp;
        const unsigned grp = __match_any_sync(0xffffffffu, ok ? id : -1);
        if (a < a1) {
            if (ok) {
                const int slot = off[id] + cnt[w][id] + __popc(grp & below);
                slot_of[a] = slot;
                src_row[slot] = a / k;
            } else {
                slot_of[a] = -1;
            }
        }
        __syncwarp();
        if (ok && (grp & below) == 0) cnt[w][id] += __popc(grp);
        __syncwarp();
    }
    for (int sl = off[n_exp] + threadIdx.x; sl < n_assign; sl += blockDim.x) src_row[sl] = 0;
}

// out[slot, :] = x[src_row[slot], :] for slot < n_rows. One block per permuted row.
extern "C" __global__ void moe_gather_bf16(const bf16* __restrict__ x, const int* __restrict__ src_row,
                                           bf16* __restrict__ out, int n_rows, int hidden) {
    griddep_wait();
    int slot = blockIdx.x;
    if (slot >= n_rows) return;
    const bf16x8* s = reinterpret_cast<const bf16x8*>(x + (size_t)src_row[slot] * hidden);
    bf16x8* d = reinterpret_cast<bf16x8*>(out + (size_t)slot * hidden);
    for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) d[i] = s[i];
}

// out[t, :] = (accumulate ? out[t, :] : 0) + sum_j weights[t, j] * y[slot_of[t, j], :], f32 sum.
extern "C" __global__ void moe_combine_bf16(const bf16* __restrict__ y, const int* __restrict__ slot_of,
                                            const float* __restrict__ weights, bf16* __restrict__ out,
                                            int tokens, int k, int hidden, int accumulate) {
    griddep_wait();
    int t = blockIdx.x;
    if (t >= tokens) return;
    for (int c = threadIdx.x * 8; c < hidden; c += blockDim.x * 8) {
        float acc[8];
        if (accumulate) {
            load8(out + (size_t)t * hidden + c, acc);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] = 0.f;
        }
        for (int j = 0; j < k; ++j) {
            int slot = slot_of[t * k + j];
            if (slot < 0) continue;
            float w = weights[t * k + j];
            float v[8];
            load8(y + (size_t)slot * hidden + c, v);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] += w * v[i];
        }
        store8(out + (size_t)t * hidden + c, acc);
    }
}

// The router gate's logits and the top-k choice in one launch, for a few rows (decode at small
// batch): the gate GEMV (bf16 x [tokens, H] . bf16 W [E, H]^T, f32 accumulation) spread over
// blocks of GATE_EXPERTS experts, GATE_SPLIT warps per expert (hidden split between them, so
// even V2-Lite's 64 experts make 32 blocks), the logits written to `logits`; the last block to
// finish (a ticket from `counter`, which it resets to 0 for the next launch) runs
// gate_contiguous on every row. Saves the separate moe_gate_f32 launch per MoE layer. Only for
// the fast path's expert counts (the launcher checks) and tokens <= GATE_MAX_ROWS.
//
// With `norm_w` given, the residual add and RMSNorm before the gate run in this launch too (one
// launch less per MoE layer): every block computes the normed rows x = rmsnorm(add_x + add_res) *
// norm_w into shared memory exactly as add_rmsnorm_bf16 with `norm_threads` threads would (same
// per-thread partition, same reduction tree: threads past norm_threads add exact zeros), and
// multiplies from there (`x` is not read); block 0 writes the new residual to `res_out` and the
// normed rows to `x_out` for the expert kernels. `res_out` must not be `add_res`: other blocks still read the old
// residual while block 0 writes. Dynamic shared memory: tokens * hidden bf16.
#define GATE_EXPERTS 2
#define GATE_SPLIT 4
#define GATE_MAX_ROWS 4
extern "C" __global__ void __launch_bounds__(GATE_EXPERTS * GATE_SPLIT * WARP)
    moe_gate_gemv_f32(const bf16* __restrict__ x, const bf16* __restrict__ w, float* __restrict__ logits,
                      int* __restrict__ counter, int* __restrict__ ids, float* __restrict__ weights, int tokens,
                      int hidden, int n_exp, int n_group, int topk_group, int k, int norm_topk, float scaling,
                      const bf16* __restrict__ add_x, const bf16* __restrict__ add_res,
                      const bf16* __restrict__ norm_w, bf16* __restrict__ res_out, bf16* __restrict__ x_out,
                      float eps, int norm_threads) {
    extern __shared__ __align__(16) unsigned char gate_smem[];
    __shared__ float scratch[32];
    __shared__ float part[GATE_EXPERTS][GATE_SPLIT][GATE_MAX_ROWS];
    __shared__ float rows_s[GATE_MAX_ROWS][MAX_EXPERTS];
    __shared__ int s_last;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int slot = warp / GATE_SPLIT, split = warp % GATE_SPLIT;
    const int e = blockIdx.x * GATE_EXPERTS + slot;
    float acc[GATE_MAX_ROWS] = {0.f, 0.f, 0.f, 0.f};
    const bf16* we = w + (size_t)min(e, n_exp - 1) * hidden;
    // this warp's share of the hidden features, in whole 8-value chunks
    const int chunks = hidden / 8, per = (chunks + GATE_SPLIT - 1) / GATE_SPLIT;
    const int c0 = split * per, c1 = min(chunks, c0 + per);
    // the lane's first weight chunk before griddep_wait (common.cuh: weights only)
    const uint4 w_first =
        e < n_exp && c0 + lane < c1 ? ld_stream16(we + (size_t)(c0 + lane) * 8) : make_uint4(0u, 0u, 0u, 0u);
    griddep_wait();
    const bf16* xsrc = x;
    if (norm_w != nullptr) {
        bf16* xs = reinterpret_cast<bf16*>(gate_smem);
        // block 0 also writes the new residual and the normed rows for the later kernels
        for (int r = 0; r < tokens; ++r) {
            const size_t o = (size_t)r * hidden;
            add_rmsnorm_row(add_x + o, add_res + o, norm_w, xs + o, blockIdx.x == 0 ? res_out + o : nullptr, xs + o,
                            blockIdx.x == 0 ? x_out + o : nullptr, hidden, eps, norm_threads, scratch);
        }
        __syncthreads();
        xsrc = xs;
    }
    if (e < n_exp) {
        for (int c = c0 + lane; c < c1; c += WARP) {
            float wv[8];
            if (c == c0 + lane) {
                unpack8(w_first, wv);
            } else {
                load8(we + (size_t)c * 8, wv);
            }
#pragma unroll
            for (int r = 0; r < GATE_MAX_ROWS; ++r) {
                if (r < tokens) {
                    float xv[8];
                    load8(xsrc + (size_t)r * hidden + (size_t)c * 8, xv);
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[r] += xv[j] * wv[j];
                }
            }
        }
    }
    griddep_launch_dependents();
#pragma unroll
    for (int r = 0; r < GATE_MAX_ROWS; ++r) {
        const float v = warp_sum(acc[r]);
        if (lane == 0) part[slot][split][r] = v;
    }
    __syncthreads();
    if (threadIdx.x < GATE_EXPERTS * GATE_MAX_ROWS) {
        const int sl = threadIdx.x / GATE_MAX_ROWS, r = threadIdx.x % GATE_MAX_ROWS;
        const int ee = blockIdx.x * GATE_EXPERTS + sl;
        if (ee < n_exp && r < tokens) {
            float v = 0.f;
#pragma unroll
            for (int q = 0; q < GATE_SPLIT; ++q) v += part[sl][q][r];
            logits[(size_t)r * n_exp + ee] = v;
        }
    }
    // publish this block's logits, then take a ticket: the last block sees every block's logits
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicAdd(counter, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    for (int i = threadIdx.x; i < tokens * n_exp; i += blockDim.x)
        rows_s[i / n_exp][i % n_exp] = __ldcg(logits + i);
    __syncthreads();
    if (threadIdx.x == 0) *counter = 0;
    // the launcher only takes 32..256 experts in steps of 32
    if (warp < tokens)
        gate_contiguous_any(rows_s[warp], ids + (size_t)warp * k, weights + (size_t)warp * k, n_exp, n_group,
                            topk_group, k, norm_topk, scaling);
}

// ---------------------------------------------------------------------------------------------
// Routed experts for a handful of rows (decode at small batch): no permutation, no per-expert
// GEMM launches, no host round trip. Each (row, slot) reads its expert's weights through a
// pointer table, so two launches cover every expert of the layer. At batch 1 the permuted path
// spends most of its time launching ~25 small kernels and cuBLAS calls for 6 GEMVs.
// ptrs [E, 3] (as i64): gate [I, H], up [I, H], down [H, I] of expert e, bf16 row-major; 0 for
// an expert this process does not hold (its slots contribute nothing, as in the permuted path).
// Ids outside 0..E (u32::MAX marks another shard's slot) are skipped the same way.
// Roundings mirror the permuted path (bf16 gate/up outputs, bf16 SiLU·mul, bf16 expert outputs,
// f32 weighted sum), so both paths agree up to f32 summation order.
//
// The shared experts may ride along (n_shared > 0; sg/su [n_shared * I, H], sd [H, n_shared * I],
// the checkpoint's one shared MLP): each row gets n_shared more slots after the n * k routed ones,
// part p being rows p*I..(p+1)*I of sg/su and columns p*I..(p+1)*I of sd, weight 1. At batch 1
// this replaces the shared MLP's three launches (paired gate/up GEMV, SiLU·mul, down GEMV) by
// work inside these two. The parts' down products are summed in f32 and rounded once, as the
// shared MLP's own down projection rounds its output once.

// grid (ceil(I / 8), n * (k + n_shared)), 256 threads, smem H bf16:
// act[slot, i] = silu(x . Wg[i]) * (x . Wu[i]).
// routed_only: grid (ceil(I / 8), n * k): the routed slots alone, the shared parts' act rows
// (n * k + row * n_shared + p) being written by another launch (the shared MLP's gate/up GEMV
// and SiLU·mul, which leave exactly that layout: row r's n_shared * I activations in a row).
#define GU_PIECES 8
extern "C" __global__ void __launch_bounds__(256, 2) moe_small_gate_up_bf16(const bf16* __restrict__ x, const int* __restrict__ ids,
                                                  const long long* __restrict__ ptrs, bf16* __restrict__ act,
                                                  int hidden, int inter, int k, int n_exp,
                                                  const bf16* __restrict__ sg, const bf16* __restrict__ su,
                                                  int n_shared, int routed_only) {
    extern __shared__ __align__(16) unsigned char small_smem[];
    bf16* xs = reinterpret_cast<bf16*>(small_smem);
    const int routed_slots = routed_only ? (int)gridDim.y : gridDim.y / (k + n_shared) * k;
    // the shared-expert slots (after the routed ones in `act`) take the first blocks: their
    // weights do not wait for the gate's ids (their first loads go out before griddep_wait)
    const int slot = (blockIdx.y + routed_slots) % gridDim.y;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int i = blockIdx.x * (blockDim.x / WARP) + warp;
    const bf16 *wg = nullptr, *wu = nullptr;
    int row = 0;
    // every weight load of a pass first (GU_PIECES x 2 per lane in flight), then the products:
    // with loads and products interleaved ptxas kept two loads in flight
    uint4 g[GU_PIECES], u[GU_PIECES];
    auto load_pass = [&](int base) {
#pragma unroll
        for (int q = 0; q < GU_PIECES; ++q) {
            const int c = base + q * WARP * 8;
            g[q] = c < hidden ? ld_stream16(wg + c) : make_uint4(0u, 0u, 0u, 0u);
            u[q] = c < hidden ? ld_stream16(wu + c) : make_uint4(0u, 0u, 0u, 0u);
        }
    };
    // a shared-expert slot's weights are known before the gate has run: its first pass is loaded
    // before griddep_wait (common.cuh); a routed slot needs the gate's ids, written by the kernel
    // just before
    const bool shared_slot = slot >= routed_slots;
    if (shared_slot) {
        const int q = slot - routed_slots, part = q % n_shared;
        row = q / n_shared;
        wg = sg + ((size_t)part * inter + min(i, inter - 1)) * hidden;
        wu = su + ((size_t)part * inter + min(i, inter - 1)) * hidden;
        load_pass(lane * 8);
    }
    griddep_wait();
    if (!shared_slot) {
        row = slot / k;
        const int e = ids[slot];
        // not routed here (-1), or an expert this process does not hold (address 0): the down
        // kernel skips the slot the same way
        if (e < 0 || e >= n_exp || ptrs[3 * e] == 0) return;
        wg = reinterpret_cast<const bf16*>(ptrs[3 * e]) + (size_t)min(i, inter - 1) * hidden;
        wu = reinterpret_cast<const bf16*>(ptrs[3 * e + 1]) + (size_t)min(i, inter - 1) * hidden;
        // the first pass's weight loads before the row's copy to shared memory and its barrier,
        // not after: one L2 round trip less before a block's weights start to stream
        load_pass(lane * 8);
    }
    for (int c = threadIdx.x * 8; c < hidden; c += blockDim.x * 8)
        *reinterpret_cast<bf16x8*>(xs + c) = *reinterpret_cast<const bf16x8*>(x + (size_t)row * hidden + c);
    __syncthreads();
    if (i >= inter) return;
    float ag = 0.f, au = 0.f;
    for (int base = lane * 8; base < hidden; base += WARP * 8 * GU_PIECES) {
        if (base != lane * 8) load_pass(base);
#pragma unroll
        for (int q = 0; q < GU_PIECES; ++q) {
            const int c = base + q * WARP * 8;
            if (c >= hidden) break;
            float xv[8], gv[8], uv[8];
            load8(xs + c, xv);
            unpack8(g[q], gv);
            unpack8(u[q], uv);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                ag += xv[j] * gv[j];
                au += xv[j] * uv[j];
            }
        }
    }
    griddep_launch_dependents();
    ag = warp_sum(ag);
    au = warp_sum(au);
    if (lane == 0) {
        float g = __bfloat162float(__float2bfloat16_rn(ag));
        float u = __bfloat162float(__float2bfloat16_rn(au));
        act[(size_t)slot * inter + i] = __float2bfloat16_rn(g / (1.f + __expf(-g)) * u);
    }
}

// The down projection with one warp per slot (the default; `moe_small_down_bf16` below is the
// earlier one warp per output row, kept to compare): grid (ceil(H / DOWN_ROWS), n), 32 * (k +
// n_shared) threads. Warp w takes slot w of row blockIdx.y for DOWN_ROWS output rows at once:
// it holds its slot's activation in registers and has DOWN_ROWS x DOWN_PIECES 16-byte weight
// loads in flight per lane, where one warp walking its row's slots one after the other had two
// (and a dependent id -> address load before each expert): that kernel ran at 0.45 of the copy
// bandwidth at batch 1 (session 9 ncu step). The slots' sums meet in shared memory and are added
// in slot order with the row kernel's roundings (each routed expert's output to bf16, the shared
// parts summed in f32 and rounded once); f32 summation order differs, so the two kernels agree
// to the CPU check's tolerance, not bit for bit.
#define DOWN_ROWS 2
#define DOWN_PIECES 6
#define DOWN_MAX_SLOTS 16

// Slot w of row `row` for the slot-per-warp down kernels: its activation row, its down weights
// (nullptr: not routed here or an expert this process does not hold), their row stride, and its
// routing weight (1 for a shared part). Reads the gate's ids and weights, which the kernels may
// do before griddep_wait (they come from the gate, two launches back: gate/up in between has
// passed its own wait before letting the down kernel launch); the activations come from gate/up
// and are read after the wait.
struct DownSlot {
    const bf16* a;
    const bf16* wd;
    size_t ld;
    float weight;
};
__device__ __forceinline__ DownSlot down_slot(const bf16* __restrict__ act, const int* __restrict__ ids,
                                              const float* __restrict__ wts, const long long* __restrict__ ptrs,
                                              const bf16* __restrict__ sd, int row, int w, int k, int n_exp,
                                              int inter, int n_shared, int routed_slots) {
    DownSlot s;
    s.wd = nullptr;
    s.weight = 1.f;
    if (w < k) {
        const int e = ids[row * k + w];
        if (e >= 0 && e < n_exp) s.wd = reinterpret_cast<const bf16*>(ptrs[3 * e + 2]);
        s.a = act + ((size_t)row * k + w) * inter;
        s.ld = inter;
        s.weight = wts[row * k + w];
    } else {
        const int p = w - k;
        s.a = act + ((size_t)routed_slots + (size_t)row * n_shared + p) * inter;
        s.wd = sd + (size_t)p * inter;
        s.ld = (size_t)n_shared * inter;
    }
    return s;
}

// What slot w leaves for one output row from its product v: a routed expert's output rounded to
// bf16 before its weight, as the reference does (0 for a slot not routed here); a shared part's
// product as it is (the parts are summed in f32 and rounded once, down_row_sum).
__device__ __forceinline__ float down_part(const DownSlot& s, int w, int k, float v) {
    return w < k ? (s.wd != nullptr ? s.weight * __bfloat162float(__float2bfloat16_rn(v)) : 0.f) : v;
}

// One output row from its slots' parts (part[j * stride], j = 0 .. k + n_shared), in slot order.
__device__ __forceinline__ bf16 down_row_sum(const float* part, int stride, int k, int n_shared) {
    float acc = 0.f;
    for (int j = 0; j < k; ++j) acc += part[j * stride];
    if (n_shared > 0) {
        float s = 0.f;
        for (int p = 0; p < n_shared; ++p) s += part[(k + p) * stride];
        acc += __bfloat162float(__float2bfloat16_rn(s));
    }
    return __float2bfloat16_rn(acc);
}
extern "C" __global__ void __launch_bounds__(DOWN_MAX_SLOTS * WARP, 1)
moe_small_down_slots_bf16(const bf16* __restrict__ act, const int* __restrict__ ids, const float* __restrict__ wts,
                          const long long* __restrict__ ptrs, bf16* __restrict__ out, int hidden, int inter, int k,
                          int n_exp, const bf16* __restrict__ sd, int n_shared) {
    __shared__ float part[DOWN_MAX_SLOTS][DOWN_ROWS];
    const int row = blockIdx.y, routed_slots = gridDim.y * k;
    const int w = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int o0 = blockIdx.x * DOWN_ROWS;
    // before griddep_wait (down_slot says why)
    const DownSlot slot = down_slot(act, ids, wts, ptrs, sd, row, w, k, n_exp, inter, n_shared, routed_slots);
    const bf16 *a = slot.a, *wd = slot.wd;
    const size_t ld = slot.ld;
    float d[DOWN_ROWS];
#pragma unroll
    for (int r = 0; r < DOWN_ROWS; ++r) d[r] = 0.f;
    // every weight load of a pass first, then the products; the first pass's before the wait
    // (at V2's and V2-Lite's intermediate sizes the first pass is all of them)
    uint4 wv[DOWN_ROWS][DOWN_PIECES];
    auto load_pass = [&](int base) {
#pragma unroll
        for (int r = 0; r < DOWN_ROWS; ++r) {
            const bf16* wr = wd + (size_t)min(o0 + r, hidden - 1) * ld;
#pragma unroll
            for (int q = 0; q < DOWN_PIECES; ++q) {
                const int c = base + q * WARP * 8;
                wv[r][q] = c < inter ? ld_stream16(wr + c) : make_uint4(0u, 0u, 0u, 0u);
            }
        }
    };
    if (wd != nullptr) load_pass(lane * 8);
    griddep_wait();
    if (wd != nullptr) {
        for (int base = lane * 8; base < inter; base += WARP * 8 * DOWN_PIECES) {
            if (base != lane * 8) load_pass(base);
            float av[DOWN_PIECES][8];
#pragma unroll
            for (int q = 0; q < DOWN_PIECES; ++q) {
                const int c = base + q * WARP * 8;
                if (c < inter) {
                    load8(a + c, av[q]);
                } else {
#pragma unroll
                    for (int t = 0; t < 8; ++t) av[q][t] = 0.f;
                }
            }
#pragma unroll
            for (int r = 0; r < DOWN_ROWS; ++r)
#pragma unroll
                for (int q = 0; q < DOWN_PIECES; ++q) {
                    float f[8];
                    unpack8(wv[r][q], f);
#pragma unroll
                    for (int t = 0; t < 8; ++t) d[r] += av[q][t] * f[t];
                }
        }
    }
    griddep_launch_dependents();
#pragma unroll
    for (int r = 0; r < DOWN_ROWS; ++r) {
        const float v = warp_sum(d[r]);
        if (lane == 0) part[w][r] = down_part(slot, w, k, v);
    }
    __syncthreads();
    if (threadIdx.x < DOWN_ROWS && o0 + (int)threadIdx.x < hidden) {
        const int r = threadIdx.x;
        out[(size_t)row * hidden + o0 + r] = down_row_sum(&part[0][r], DOWN_ROWS, k, n_shared);
    }
}

// The down projection with one warp per slot over a run of output rows, software-pipelined
// (the default where a slot's activation is one pass, I <= WARP * 8 * DOWN_PIECES): grid
// (ceil(H / rpb), n), 32 * (k + n_shared) threads, rpb <= DOWN_PIPE_MAX_ROWS output rows a block,
// chosen by the launcher so that the grid is about two blocks per SM (one wave).
// Why: moe_small_down_slots_bf16 issues all its block's loads at once and then waits, so at two
// resident blocks per SM its 1,024 blocks at V2-Lite batch 1 run as four waves. Here a warp
// keeps DOWN_RING - 1 rows of weight loads in flight while it multiplies the row before, and an
// SM's loads drain only at its last rows. Measured (bench/RESULTS.md, session 17): V2-Lite's
// batch-4 step 2.8 % faster; level at batch 1, so the slot kernel's 0.70 of copy there was not
// its waves. The slot's activation is re-read from L1 for each row. Products, sums and
// roundings are the slot kernel's, in the same order: both give the same bits.
#define DOWN_RING 3
#define DOWN_PIPE_MAX_ROWS 64
extern "C" __global__ void __launch_bounds__(256, 2)
moe_small_down_pipe_bf16(const bf16* __restrict__ act, const int* __restrict__ ids, const float* __restrict__ wts,
                         const long long* __restrict__ ptrs, bf16* __restrict__ out, int hidden, int inter, int k,
                         int n_exp, const bf16* __restrict__ sd, int n_shared, int rpb) {
    __shared__ float part[DOWN_MAX_SLOTS][DOWN_PIPE_MAX_ROWS];
    const int row = blockIdx.y, routed_slots = gridDim.y * k;
    const int w = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int o0 = blockIdx.x * rpb;
    const int nr = min(rpb, hidden - o0);  // > 0: the launcher's grid covers hidden exactly
    // before griddep_wait (down_slot says why)
    const DownSlot slot = down_slot(act, ids, wts, ptrs, sd, row, w, k, n_exp, inter, n_shared, routed_slots);
    const bf16 *a = slot.a, *wd = slot.wd;
    const size_t ld = slot.ld;
    uint4 wv[DOWN_RING][DOWN_PIECES];
    auto load_row = [&](uint4 (&buf)[DOWN_PIECES], int j) {
        const bf16* wr = wd + (size_t)(o0 + j) * ld;
#pragma unroll
        for (int q = 0; q < DOWN_PIECES; ++q) {
            const int c = lane * 8 + q * WARP * 8;
            buf[q] = c < inter ? ld_stream16(wr + c) : make_uint4(0u, 0u, 0u, 0u);
        }
    };
    if (wd != nullptr) {
#pragma unroll
        for (int s = 0; s < DOWN_RING - 1; ++s)
            if (s < nr) load_row(wv[s], s);
    }
    griddep_wait();
    if (wd != nullptr) {
        // rows j, j + 1, .. in ring slots j % DOWN_RING, unrolled by the ring so that every
        // register index is a constant
        for (int j0 = 0; j0 < nr; j0 += DOWN_RING) {
#pragma unroll
            for (int s = 0; s < DOWN_RING; ++s) {
                const int j = j0 + s;
                if (j >= nr) break;
                if (j + DOWN_RING - 1 < nr) load_row(wv[(s + DOWN_RING - 1) % DOWN_RING], j + DOWN_RING - 1);
                float d = 0.f;
#pragma unroll
                for (int q = 0; q < DOWN_PIECES; ++q) {
                    // the slot's activation from L1 (the same 2-3 KB for every row of the
                    // block; in registers it left too few for three rows of loads in flight)
                    const int c = lane * 8 + q * WARP * 8;
                    float f[8], x[8];
                    unpack8(c < inter ? *reinterpret_cast<const uint4*>(a + c) : make_uint4(0u, 0u, 0u, 0u), x);
                    unpack8(wv[s][q], f);
#pragma unroll
                    for (int t = 0; t < 8; ++t) d += x[t] * f[t];
                }
                d = warp_sum(d);
                if (lane == 0) part[w][j] = down_part(slot, w, k, d);
            }
        }
    } else if (lane == 0) {
        for (int j = 0; j < nr; ++j) part[w][j] = 0.f;
    }
    griddep_launch_dependents();
    __syncthreads();
    for (int j = threadIdx.x; j < nr; j += blockDim.x)
        out[(size_t)row * hidden + o0 + j] = down_row_sum(&part[0][j], DOWN_PIPE_MAX_ROWS, k, n_shared);
}

// grid (ceil(H / 8), n), 256 threads, smem (k + n_shared) * I bf16:
// out[row, o] = sum over routed slots j of w[row, j] * bf16(act[row*k + j] . Wd_e[o])
//             + bf16(sum over shared parts p of act[n*k + row*n_shared + p] . Sd[o, p*I..]).
extern "C" __global__ void moe_small_down_bf16(const bf16* __restrict__ act, const int* __restrict__ ids,
                                               const float* __restrict__ wts, const long long* __restrict__ ptrs,
                                               bf16* __restrict__ out, int hidden, int inter, int k, int n_exp,
                                               const bf16* __restrict__ sd, int n_shared) {
    griddep_wait();
    extern __shared__ __align__(16) unsigned char small_smem[];
    bf16* as = reinterpret_cast<bf16*>(small_smem);
    const int row = blockIdx.y, routed_slots = gridDim.y * k;
    for (int j = 0; j < k; ++j) {
        const int e = ids[row * k + j];
        if (e < 0 || e >= n_exp || ptrs[3 * e] == 0) continue;
        for (int c = threadIdx.x * 8; c < inter; c += blockDim.x * 8)
            *reinterpret_cast<bf16x8*>(as + j * inter + c) =
                *reinterpret_cast<const bf16x8*>(act + ((size_t)row * k + j) * inter + c);
    }
    for (int p = 0; p < n_shared; ++p)
        for (int c = threadIdx.x * 8; c < inter; c += blockDim.x * 8)
            *reinterpret_cast<bf16x8*>(as + (k + p) * inter + c) = *reinterpret_cast<const bf16x8*>(
                act + ((size_t)routed_slots + (size_t)row * n_shared + p) * inter + c);
    __syncthreads();
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int o = blockIdx.x * (blockDim.x / WARP) + warp;
    if (o >= hidden) return;
    float acc = 0.f;
    for (int j = 0; j < k; ++j) {
        const int e = ids[row * k + j];
        if (e < 0 || e >= n_exp || ptrs[3 * e + 2] == 0) continue;
        const bf16* wd = reinterpret_cast<const bf16*>(ptrs[3 * e + 2]) + (size_t)o * inter;
        float d = 0.f;
#pragma unroll 2
        for (int c = lane * 8; c < inter; c += WARP * 8) {
            float av[8], wv[8];
            load8(as + j * inter + c, av);
            load8(wd + c, wv);
#pragma unroll
            for (int q = 0; q < 8; ++q) d += av[q] * wv[q];
        }
        d = warp_sum(d);
        acc += wts[row * k + j] * __bfloat162float(__float2bfloat16_rn(d));
    }
    if (n_shared > 0) {
        // the shared MLP's down row o: n_shared * I contiguous weights against the parts' acts
        const bf16* wd = sd + (size_t)o * n_shared * inter;
        float d = 0.f;
#pragma unroll 2
        for (int c = lane * 8; c < n_shared * inter; c += WARP * 8) {
            float av[8], wv[8];
            load8(as + k * inter + c, av);
            load8(wd + c, wv);
#pragma unroll
            for (int q = 0; q < 8; ++q) d += av[q] * wv[q];
        }
        acc += __bfloat162float(__float2bfloat16_rn(warp_sum(d)));
    }
    if (lane == 0) out[(size_t)row * hidden + o] = __float2bfloat16_rn(acc);
}
