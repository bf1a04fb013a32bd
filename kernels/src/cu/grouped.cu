// grouped.cu: the routed experts of one MoE layer, every expert in one launch per projection.
//
// Rows arrive permuted by expert (moe_permute + moe_gather): expert e owns rows
// offsets[e] .. offsets[e + 1] of x. Weights stay in the checkpoint's per-expert tensors and are
// found through a device table ptrs [E, 3] = (gate [I, H], up [I, H], down [H, I]) addresses,
// 0 for an expert this process does not hold.
//
//   moe_grouped_gate_up_*:  act[r, i] = silu(x[r] . Wg_e[i]) * (x[r] . Wu_e[i])   (K = H, N = I)
//   moe_grouped_down_*:     y[r, o]   = act[r] . Wd_e[o]                           (K = I, N = H)
// The routing weight and the un-permute stay in moe_combine (one pass over [rows, H]).
//
// Tiling: a CTA computes one (expert, tile of BB rows) x (GA = 128 weight rows) block. The MMA
// runs "swapped" (m16n8k16 with A = weights, B = activations): the weight rows fill the MMA's
// M = 16 side, so a decode tile of 1..16 rows wastes no weight traffic and each touched expert's
// weights stream from DRAM once (decode is weight-bandwidth bound: ~145 of 160 experts at 64
// distinct rows). Tiles of 64 / 128 rows serve prefill, where the same code is compute bound.
// Grid: x = tile of rows over all experts (tile_off [E + 1] is the prefix sum of
// ceil(count_e / BB), built on the device by moe_offsets_i32 (moe.cu), so no host round trip; CTAs
// past the last tile return at once), y = block of output features.
//
// gate_up: the 128 A rows of a CTA are 64 gate rows and the 64 up rows of the same features,
// interleaved per 16 (rows 32w..32w+15 gate, 32w+16..32w+31 up): warp w's two m16 accumulators
// then hold gate and up of the same (feature, row) in the same registers, and SiLU·mul happens in
// the epilogue. Roundings mirror the unfused path (bf16 gate/up, bf16 SiLU·mul output, bf16 y).
//
// Shared memory: a k-step stage holds GA + BB rows of GK = 64 bf16 (128 bytes = 8 chunks of
// 16 B); chunk c of row r is stored at c ^ (r & 7) so that the 8 row addresses of an ldmatrix
// 8x8 matrix fall in 8 different 16-byte bank groups. STAGES stages are kept in flight with
// cp.async (src-size 0 zero-fills rows past the expert's rows, features past N and k past K).
#include "common.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

#define GK 64
#define GA 128
#define GWA 4  // warps along the weight rows: 32 rows (two m16 tiles) each

__device__ __forceinline__ int swz(int r, int c) { return r * GK + ((c ^ (r & 7)) << 3); }

// The CTA's tile: expert e (the largest e with tile_off[e] <= blockIdx.x), its first row and
// how many of its rows the tile holds (tiles of `rows_per_tile` rows). False past the last tile.
// Every thread of the block calls it (full warps: it uses warp votes); the answer is uniform.
//
// Why a two-level warp search and not a binary search: every load of a binary search over
// tile_off depends on the one before, so a CTA waited ~log2(E) + 3 L2 round trips (9 at
// V2-Lite's 64 experts) before its first weight load; at decode tiles of 16-32 rows a CTA lives
// for only ~30-45 us of streaming, and the grouped decode kernels ran at 0.81-0.82 of the copy
// bandwidth (V2-Lite batch 256, bench/RESULTS.md session 17 ncu-step). Here each lane reads one
// of 32 evenly spaced entries, a vote picks the segment, and the lanes read that segment's (at
// most 32) entries: E <= 1024 = 32 x 32 (check_dims) in two dependent round trips. Measured:
// batch 64 and 256 steps 0.4-0.7 % faster (session 17 run 3), so start-up was not what held
// those kernels at 0.82.
struct GroupedTile {
    int e, row0, nrows;
};
// Tile `tile` (< tile_off[n_exp]) of the schedule, by the search above.
__device__ __forceinline__ void grouped_tile_at(const int* __restrict__ offsets, const int* __restrict__ tile_off,
                                                int n_exp, int rows_per_tile, int tile, GroupedTile& t) {
    const int lane = threadIdx.x % WARP;
    // tile_off is non-decreasing with tile_off[0] = 0: the entries <= tile are a prefix
    const int stride = (n_exp + WARP - 1) / WARP;
    const int i1 = lane * stride;
    const unsigned m1 = __ballot_sync(0xffffffffu, i1 < n_exp && tile_off[i1] <= tile);
    const int base = (31 - __clz(m1)) * stride;
    const int i2 = base + lane;
    const unsigned m2 = __ballot_sync(0xffffffffu, lane < stride && i2 < n_exp && tile_off[i2] <= tile);
    const int e = base + 31 - __clz(m2);
    t.e = e;
    t.row0 = offsets[e] + (tile - tile_off[e]) * rows_per_tile;
    t.nrows = min(rows_per_tile, offsets[e + 1] - t.row0);
}
__device__ __forceinline__ bool grouped_find_tile(const int* __restrict__ offsets, const int* __restrict__ tile_off,
                                                  int n_exp, int rows_per_tile, GroupedTile& t) {
    const int tile = blockIdx.x;
    if (tile >= tile_off[n_exp]) return false;
    grouped_tile_at(offsets, tile_off, n_exp, rows_per_tile, tile, t);
    return true;
}

// Rows routed to an expert this process does not hold contribute nothing: zeros for the tile's
// rows x features f0 .. f0 + nf.
__device__ __forceinline__ void grouped_zero_tile(bf16* __restrict__ out, int row0, int nrows, int f0, int nf, int N,
                                                  int nthreads) {
    for (int c = threadIdx.x; c < nrows * (nf / 8); c += nthreads) {
        int r = c / (nf / 8), f = f0 + (c % (nf / 8)) * 8;
        if (f < N) {
            bf16x8 z;
#pragma unroll
            for (int i = 0; i < 4; ++i) z.v[i] = __floats2bfloat162_rn(0.f, 0.f);
            *reinterpret_cast<bf16x8*>(out + (size_t)(row0 + r) * N + f) = z;
        }
    }
}

// The pieces of a mma.sync grouped tile (grouped_tile, one tile a CTA; grouped_persist, a run of
// tiles a CTA). WB warps along the activation rows, GWA along the weight rows; NT = 32 * GWA * WB.

// Stage loads of k step kt: the GA weight rows of features f0.. (gate_up: 64 gate rows and the
// 64 up rows of the same features, interleaved per 16) and the tile's BB activation rows
// row0..row0+nrows. w0 == nullptr (an expert not held here) zero-fills the weights.
template <int BB, int NT, bool GATE_UP>
__device__ __forceinline__ void grouped_load_stage(bf16* a, bf16* b, const bf16* __restrict__ w0,
                                                   const bf16* __restrict__ w1, const bf16* __restrict__ x,
                                                   int row0, int nrows, int f0, int kt, int K, int N, int tid) {
    const int k0 = kt * GK;
    for (int c = tid; c < GA * 8; c += NT) {
        int r = c >> 3, ch = c & 7, k = k0 + ch * 8;
        int f;
        const bf16* w;
        if (GATE_UP) {
            int wi = r & 31;
            f = f0 + (r >> 5) * 16 + (wi & 15);
            w = wi < 16 ? w0 : w1;
        } else {
            f = f0 + r;
            w = w0;
        }
        bool ok = w != nullptr && f < N && k < K;
        cp_async16(a + swz(r, ch), ok ? w + (size_t)f * K + k : x, ok);
    }
    for (int c = tid; c < BB * 8; c += NT) {
        int r = c >> 3, ch = c & 7, k = k0 + ch * 8;
        bool ok = r < nrows && k < K;
        cp_async16(b + swz(r, ch), ok ? x + (size_t)(row0 + r) * K + k : x, ok);
    }
}

// The MMAs of one stage (GK = 64 of k) into the warp's accumulators.
template <int BB, int WB>
__device__ __forceinline__ void grouped_mma_stage(const bf16* a, const bf16* b, float (&acc)[2][BB / WB / 8][4],
                                                  int lane, int wa, int wb) {
    constexpr int WROWS = BB / WB;  // activation rows per warp
    constexpr int NB8 = WROWS / 8;  // n8 MMA tiles per warp
#pragma unroll
    for (int kk = 0; kk < GK / 16; ++kk) {
        u32 af[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
            int r = wa * 32 + mi * 16 + (lane & 15);
            ldsm_x4(af[mi], a + swz(r, kk * 2 + (lane >> 4)));
        }
#pragma unroll
        for (int np = 0; np < NB8 / 2; ++np) {
            u32 bf[4];
            int r = wb * WROWS + np * 16 + (lane & 7) + ((lane >> 4) << 3);
            ldsm_x4(bf, b + swz(r, kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                mma_bf16(acc[mi][2 * np], af[mi], bf);
                mma_bf16(acc[mi][2 * np + 1], af[mi], bf + 2);
            }
        }
    }
}

// The accumulators to the staging tile sc [BB][NF + 8] (rows x the CTA's features): SiLU·mul
// of the bf16 gate and up for gate_up, the bf16 product for down.
template <int BB, int WB, bool GATE_UP>
__device__ __forceinline__ void grouped_stage_out(bf16* sc, const float (&acc)[2][BB / WB / 8][4], int lane, int wa,
                                                  int wb) {
    constexpr int WROWS = BB / WB;
    constexpr int NB8 = WROWS / 8;
    constexpr int NF = GATE_UP ? GA / 2 : GA;
    constexpr int SC = NF + 8;  // 16-byte multiple
#pragma unroll
    for (int nj = 0; nj < NB8; ++nj) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // c0,c1 (A row lane/4) and c2,c3 (A row lane/4 + 8)
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                int br = wb * WROWS + nj * 8 + 2 * (lane & 3) + q;
                if (GATE_UP) {
                    int fl = wa * 16 + (lane >> 2) + 8 * h;
                    float g = __bfloat162float(__float2bfloat16_rn(acc[0][nj][2 * h + q]));
                    float u = __bfloat162float(__float2bfloat16_rn(acc[1][nj][2 * h + q]));
                    sc[br * SC + fl] = __float2bfloat16_rn(g / (1.f + __expf(-g)) * u);
                } else {
#pragma unroll
                    for (int mi = 0; mi < 2; ++mi) {
                        int fl = wa * 32 + mi * 16 + (lane >> 2) + 8 * h;
                        sc[br * SC + fl] = __float2bfloat16_rn(acc[mi][nj][2 * h + q]);
                    }
                }
            }
        }
    }
}

// The staging tile's nrows rows to out [R, N] at row0, features f0.. (16-byte stores).
template <int NT, bool GATE_UP>
__device__ __forceinline__ void grouped_store_out(const bf16* sc, bf16* __restrict__ out, int row0, int nrows, int f0,
                                                  int N, int tid) {
    constexpr int NF = GATE_UP ? GA / 2 : GA;
    constexpr int SC = NF + 8;
    for (int c = tid; c < nrows * (NF / 8); c += NT) {
        int r = c / (NF / 8), fl = (c % (NF / 8)) * 8;
        if (f0 + fl < N)
            *reinterpret_cast<bf16x8*>(out + (size_t)(row0 + r) * N + f0 + fl) =
                *reinterpret_cast<const bf16x8*>(sc + r * SC + fl);
    }
}

template <int BB, int WB, int STAGES, bool GATE_UP>
__device__ __forceinline__ void grouped_tile(const bf16* __restrict__ x, const long long* __restrict__ ptrs,
                                             const int* __restrict__ offsets, const int* __restrict__ tile_off,
                                             bf16* __restrict__ out, int K, int N, int n_exp) {
    constexpr int NT = 32 * GWA * WB;
    static_assert((BB / WB) % 16 == 0, "B fragments are loaded 16 rows at a time");
    constexpr int NF = GATE_UP ? GA / 2 : GA;  // output features per CTA
    extern __shared__ __align__(128) unsigned char grouped_smem[];
    bf16* sa = reinterpret_cast<bf16*>(grouped_smem);  // [STAGES][GA][GK]
    bf16* sb = sa + STAGES * GA * GK;                     // [STAGES][BB][GK]

    GroupedTile t;
    if (!grouped_find_tile(offsets, tile_off, n_exp, BB, t)) return;
    const int e = t.e, row0 = t.row0, nrows = t.nrows;
    const int f0 = blockIdx.y * NF;
    const bf16* w0 = reinterpret_cast<const bf16*>(ptrs[3 * e + (GATE_UP ? 0 : 2)]);
    const bf16* w1 = GATE_UP ? reinterpret_cast<const bf16*>(ptrs[3 * e + 1]) : w0;
    const int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
    const int wa = warp % GWA, wb = warp / GWA;
    if (w0 == nullptr || w1 == nullptr) {
        grouped_zero_tile(out, row0, nrows, f0, NF, N, NT);
        return;
    }
    auto load_stage = [&](int stage, int kt) {
        grouped_load_stage<BB, NT, GATE_UP>(sa + stage * GA * GK, sb + stage * BB * GK, w0, w1, x, row0, nrows, f0,
                                            kt, K, N, tid);
    };

    float acc[2][BB / WB / 8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int nj = 0; nj < BB / WB / 8; ++nj)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[mi][nj][q] = 0.f;

    const int KT = (K + GK - 1) / GK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < KT) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage kt visible to all; every warp is done with stage kt - 1
        {
            int nk = kt + STAGES - 1;
            if (nk < KT) load_stage(nk % STAGES, nk);
            cp_async_commit();
        }
        grouped_mma_stage<BB, WB>(sa + (kt % STAGES) * GA * GK, sb + (kt % STAGES) * BB * GK, acc, lane, wa, wb);
    }
    cp_async_wait<0>();
    __syncthreads();  // the pipeline's smem becomes the epilogue's staging tile
    grouped_stage_out<BB, WB, GATE_UP>(sa, acc, lane, wa, wb);
    __syncthreads();
    grouped_store_out<NT, GATE_UP>(sa, out, row0, nrows, f0, N, tid);
}

// Decode tiles (16 or 32 rows, 4 warps), persistent: CTA b of G walks the items (tile, feature
// block) b, b + G', b + 2 G', ... in the order of grouped_tile's grid (tile fastest), G' <= G
// chosen on the device so that every CTA gets the same number of items to within one (the
// item count is known on the device only). One cp.async pipeline runs through all of a CTA's
// items: the next item's first stages load while the current one's last stages multiply and
// its epilogue writes (a staging tile of its own after the stages).
// Why: a one-tile CTA waits for its tile search and first stages before any weight streams and
// drains its stages at the end; at V2-Lite's K (2048, 1408) a decode tile lives for only 22-32
// k steps, and the R32 kernels ran at 0.81-0.82 of the copy bandwidth at batch 256
// (bench/RESULTS.md session 17) against 0.89 for V2's 80-step tiles. Items of an expert not
// held here load zero-filled weights (no DRAM traffic) and write zeros, as grouped_tile does.
// dynamic smem: STAGES * (GA + BB) * GK * 2 + BB * (GA + 8) * 2 bytes.
template <int BB, int STAGES, bool GATE_UP>
__device__ __forceinline__ void grouped_persist(const bf16* __restrict__ x, const long long* __restrict__ ptrs,
                                                const int* __restrict__ offsets, const int* __restrict__ tile_off,
                                                bf16* __restrict__ out, int K, int N, int n_exp) {
    constexpr int NT = 32 * GWA;
    static_assert(BB % 16 == 0, "B fragments are loaded 16 rows at a time");
    constexpr int NF = GATE_UP ? GA / 2 : GA;
    extern __shared__ __align__(128) unsigned char grouped_smem[];
    bf16* sa = reinterpret_cast<bf16*>(grouped_smem);  // [STAGES][GA][GK]
    bf16* sb = sa + STAGES * GA * GK;                     // [STAGES][BB][GK]
    bf16* sc = sb + STAGES * BB * GK;                     // [BB][NF + 8] staging
    const int tid = threadIdx.x, lane = tid % WARP, wa = tid / WARP;

    const int total = tile_off[n_exp];
    const int items = total * ((N + NF - 1) / NF);
    if (items == 0) return;
    const int per = (items + gridDim.x - 1) / gridDim.x;
    const int g = (items + per - 1) / per;  // CTAs with work, each per or per - 1 items
    if ((int)blockIdx.x >= g) return;
    const int mine = (items - 1 - blockIdx.x) / g + 1;
    const int KT = (K + GK - 1) / GK;
    const int steps = mine * KT;

    struct Item {
        const bf16* w0;
        const bf16* w1;
        int row0, nrows, f0;
    };
    auto item_of = [&](int j) {
        const int it = blockIdx.x + j * g;
        GroupedTile t;
        grouped_tile_at(offsets, tile_off, n_exp, BB, it % total, t);
        Item r;
        r.w0 = reinterpret_cast<const bf16*>(ptrs[3 * t.e + (GATE_UP ? 0 : 2)]);
        r.w1 = GATE_UP ? reinterpret_cast<const bf16*>(ptrs[3 * t.e + 1]) : r.w0;
        if (r.w0 == nullptr || r.w1 == nullptr) r.w0 = r.w1 = nullptr;  // not held here
        r.row0 = t.row0;
        r.nrows = t.nrows;
        r.f0 = (it / total) * NF;
        return r;
    };
    // the load cursor: item ld_j (descriptor ld), k step ld_kt; flat step ld_s
    Item ld = item_of(0);
    Item cur = ld;
    int ld_j = 0, ld_kt = 0, ld_s = 0;
    auto load_next = [&]() {
        if (ld_s < steps) {
            if (ld_kt == KT) {
                ld_kt = 0;
                ld = item_of(++ld_j);
            }
            const int stage = ld_s % STAGES;
            grouped_load_stage<BB, NT, GATE_UP>(sa + stage * GA * GK, sb + stage * BB * GK, ld.w0, ld.w1, x, ld.row0,
                                                ld.nrows, ld.f0, ld_kt, K, N, tid);
            ++ld_kt;
            ++ld_s;
        }
        cp_async_commit();
    };

    float acc[2][BB / 8][4];
    auto zero_acc = [&]() {
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int nj = 0; nj < BB / 8; ++nj)
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[mi][nj][q] = 0.f;
    };
    zero_acc();
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) load_next();
    int j = 0, kt = 0;
    for (int s = 0; s < steps; ++s) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage s visible to all; every warp is done with stage s - 1 and sc
        load_next();
        grouped_mma_stage<BB, 1>(sa + (s % STAGES) * GA * GK, sb + (s % STAGES) * BB * GK, acc, lane, wa, 0);
        if (++kt == KT) {
            // (cur is the same for the whole block: the barrier is reached by all or none)
            if (cur.w0 != nullptr) grouped_stage_out<BB, 1, GATE_UP>(sc, acc, lane, wa, 0);
            __syncthreads();
            if (cur.w0 != nullptr)
                grouped_store_out<NT, GATE_UP>(sc, out, cur.row0, cur.nrows, cur.f0, N, tid);
            else
                grouped_zero_tile(out, cur.row0, cur.nrows, cur.f0, NF, N, NT);
            zero_acc();
            kt = 0;
            ++j;
            // the loader looked the next item up when it reached it (at most STAGES - 1 steps
            // ahead: the same item unless an item is shorter than that)
            if (j < mine) cur = ld_j == j ? ld : item_of(j);
        }
    }
    cp_async_wait<0>();
}

// Instances: BB rows per tile, WB warps along the rows (threads = 128 * WB), STAGES in flight.
// Launch: grid (tile bound, ceil(N / NF)), dynamic smem = STAGES * (128 + BB) * 64 * 2 bytes.
// (written out, not generated by a macro: the module loader finds kernels by their names here)

extern "C" __global__ void __launch_bounds__(128) moe_grouped_gate_up_b16_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_tile<16, 1, 4, true>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

extern "C" __global__ void __launch_bounds__(128) moe_grouped_down_b16_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_tile<16, 1, 4, false>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

extern "C" __global__ void __launch_bounds__(128) moe_grouped_gate_up_b32_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_tile<32, 1, 4, true>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

extern "C" __global__ void __launch_bounds__(128) moe_grouped_down_b32_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_tile<32, 1, 4, false>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

// Persistent decode tiles (grouped_persist): grid = CTAs resident at once (the launcher's
// count), 128 threads, dynamic smem 4 * (128 + BB) * 128 + BB * 136 * 2 bytes.
extern "C" __global__ void __launch_bounds__(128) moe_grouped_gate_up_p16_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_persist<16, 4, true>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

extern "C" __global__ void __launch_bounds__(128) moe_grouped_down_p16_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_persist<16, 4, false>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

extern "C" __global__ void __launch_bounds__(128) moe_grouped_gate_up_p32_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_persist<32, 4, true>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

extern "C" __global__ void __launch_bounds__(128) moe_grouped_down_p32_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_persist<32, 4, false>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

extern "C" __global__ void __launch_bounds__(128) moe_grouped_gate_up_b64_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_tile<64, 1, 4, true>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

extern "C" __global__ void __launch_bounds__(128) moe_grouped_down_b64_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_tile<64, 1, 4, false>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

extern "C" __global__ void __launch_bounds__(256, 2) moe_grouped_gate_up_b128_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_tile<128, 2, 3, true>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

extern "C" __global__ void __launch_bounds__(256, 2) moe_grouped_down_b128_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_tile<128, 2, 3, false>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

// ---------------------------------------------------------------------------------------------
// Prefill-sized batches (many rows per expert): the same grouped GEMMs on warpgroup MMA.
//
// A CTA is 2 warpgroups and computes 128 rows (warpgroup w: rows 64w .. 64w+63) x 256 weight
// rows, k step 64: per stage A (rows) 16 KB and B (weights) 32 KB, both K-major in the
// 128-byte-swizzled layout the wgmma descriptors name (the layout of the mma.sync tiles above:
// chunk c of row r at c ^ (r & 7), 8-row groups 1024 bytes apart, stages 1024-aligned). Each
// warpgroup issues 4 wgmma m64n256k16 per stage (k advances 32 bytes inside the swizzled rows),
// then the cp.async copies of the stage WGM_STAGES - 1 ahead, then waits for its wgmma. Why
// wgmma: the mma.sync kernel moves every operand through registers with ldmatrix and stays
// shared-memory bound at about a quarter of the cuBLAS peak on P2 (bench/RESULTS.md); wgmma
// reads both operands from shared memory (0.45 of the peak; TMA loads and producer/consumer
// warp specialisation are the next step).
// gate_up: B rows 0..127 are gate features f0.., rows 128..255 the up rows of the same
// features, so accumulator columns c and c + 128 of a thread are gate and up of one feature.
#define WGM_W 256
#define WGM_STAGES 4

// MR = 128: warpgroup w computes rows 64w .. 64w+63 against all 256 weight rows (m64n256).
// MR = 64 (less padding when experts hold few rows more than a multiple of 128): both
// warpgroups take rows 0..63, warpgroup w the weight rows 128w .. 128w+127 (m64n128); for
// gate_up the weight rows then alternate in blocks of 64 (gate f0.., up f0.., gate f0+64..,
// up f0+64..) so each warpgroup still holds gate and up of the same features.
template <bool GATE_UP, int MR>
__device__ __forceinline__ void grouped_tile_wgmma(const bf16* __restrict__ x, const long long* __restrict__ ptrs,
                                                   const int* __restrict__ offsets, const int* __restrict__ tile_off,
                                                   bf16* __restrict__ out, int K, int N, int n_exp) {
    constexpr int STAGE_BYTES = (MR + WGM_W) * GK * 2;
    constexpr int NF = GATE_UP ? WGM_W / 2 : WGM_W;  // output features per CTA
    constexpr int SCW = NF + 8;                        // epilogue staging row (bf16)
    constexpr int WN = MR == 128 ? WGM_W : WGM_W / 2;  // weight rows (wgmma N) per warpgroup
    constexpr int ACC = WN / 2;                        // accumulator floats per thread
    extern __shared__ __align__(1024) unsigned char wgm_smem_raw[];
    // the hardware applies the swizzle on address bits 4..9: operands must be 1024-aligned
    unsigned char* smem =
        reinterpret_cast<unsigned char*>((reinterpret_cast<size_t>(wgm_smem_raw) + 1023) & ~(size_t)1023);

    GroupedTile t;
    if (!grouped_find_tile(offsets, tile_off, n_exp, MR, t)) return;
    const int e = t.e, row0 = t.row0, nrows = t.nrows;
    const int f0 = blockIdx.y * NF;
    const bf16* w0 = reinterpret_cast<const bf16*>(ptrs[3 * e + (GATE_UP ? 0 : 2)]);
    const bf16* w1 = GATE_UP ? reinterpret_cast<const bf16*>(ptrs[3 * e + 1]) : w0;
    const int tid = threadIdx.x, wg = tid / 128, lane = tid % WARP, wq = (tid % 128) / WARP;
    if (w0 == nullptr || w1 == nullptr) {
        grouped_zero_tile(out, row0, nrows, f0, NF, N, 256);
        return;
    }

    // This thread's copies: 16-byte chunk `ch` of rows rb + 32 i (A: i < MR / 32, B: i < 8).
    // Every one of those rows has the same row % 8, so the swizzled chunk is the same for all.
    const int ch = tid & 7, rb = tid >> 3;
    const u32 sw = (u32)((ch ^ (rb & 7)) << 4);
    const bf16* asrc[MR / 32];
    bool aok[MR / 32];
#pragma unroll
    for (int i = 0; i < MR / 32; ++i) {
        int r = rb + 32 * i;
        aok[i] = r < nrows;
        asrc[i] = aok[i] ? x + (size_t)(row0 + r) * K + ch * 8 : x;
    }
    const bf16* bsrc[WGM_W / 32];
    bool bok[WGM_W / 32];
#pragma unroll
    for (int i = 0; i < WGM_W / 32; ++i) {
        int r = rb + 32 * i;
        int f;
        bool up;
        if (MR == 128) {  // gate rows 0..127, up rows 128..255
            f = GATE_UP ? f0 + (r & 127) : f0 + r;
            up = GATE_UP && r >= 128;
        } else {  // blocks of 64: gate, up, gate, up
            f = GATE_UP ? f0 + (r >> 7) * 64 + (r & 63) : f0 + r;
            up = GATE_UP && ((r >> 6) & 1);
        }
        const bf16* w = up ? w1 : w0;
        bok[i] = f < N;
        bsrc[i] = bok[i] ? w + (size_t)f * K + ch * 8 : w;
    }
    auto load_stage = [&](int stage, int kt) {
        unsigned char* a = smem + stage * STAGE_BYTES;
        unsigned char* b = a + MR * 128;
        const int k = kt * GK;
        const bool kok = k + ch * 8 < K;
#pragma unroll
        for (int i = 0; i < MR / 32; ++i) {
            bool ok = aok[i] && kok;
            cp_async16(a + (rb + 32 * i) * 128 + sw, ok ? asrc[i] + k : x, ok);
        }
#pragma unroll
        for (int i = 0; i < WGM_W / 32; ++i) {
            bool ok = bok[i] && kok;
            cp_async16(b + (rb + 32 * i) * 128 + sw, ok ? bsrc[i] + k : w0, ok);
        }
    };

    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0.f;
    // Pipeline: copies run WGM_STAGES - 1 stages ahead; each stage's wgmma is waited for before
    // the next barrier. (Keeping one wgmma group in flight across the barrier, with copies only
    // two stages ahead, measured slower on P2: 0.413 against 0.456 of cuBLAS, 2026-12-06.)
    const int KT = (K + GK - 1) / GK;
#pragma unroll
    for (int s = 0; s < WGM_STAGES - 1; ++s) {
        if (s < KT) load_stage(s, s);
        cp_async_commit();
    }
    const u32 base = (u32)__cvta_generic_to_shared(smem);
    const u32 a_off = MR == 128 ? wg * 64 * 128 : 0;
    const u32 b_off = MR == 128 ? 0 : wg * WN * 128;
    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<WGM_STAGES - 2>();
        fence_async_smem();
        __syncthreads();  // stage kt visible to wgmma; every warpgroup finished stage kt - 1
        const u32 sa = base + (kt % WGM_STAGES) * STAGE_BYTES;
        const u32 sb = sa + MR * 128;
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < GK / 16; ++kk) {
            u64 da = wg_desc(sa + a_off + kk * 32, 16, 1024);
            u64 db = wg_desc(sb + b_off + kk * 32, 16, 1024);
            if (MR == 128) wgmma_m64n256_ss(acc, da, db, 1);
            else wgmma_m64n128_ss(acc, da, db, 1);
        }
        wg_commit();
        // The next stage's copies are issued while the tensor cores work (issued before the
        // wgmma they held it back). Their stage was last read by stage kt - 1's wgmma, which
        // every warpgroup waited for before the barrier above.
        {
            int nk = kt + WGM_STAGES - 1;
            if (nk < KT) load_stage(nk % WGM_STAGES, nk);
            cp_async_commit();
        }
        wg_wait0();
    }
    cp_async_wait<0>();
    __syncthreads();  // the stages become the epilogue's staging tile

    // accumulator layout (wgmma D): rows r_lo and r_lo + 8, columns 8j + cq and 8j + cq + 1
    bf16* sc = reinterpret_cast<bf16*>(smem);  // [MR][SCW]
    const int r_lo = (MR == 128 ? wg * 64 : 0) + wq * 16 + lane / 4, cq = (lane % 4) * 2;
    // gate_up: accumulator columns c (gate) and c + WN / 2 (up) are one feature: feature
    // c of warpgroup 0 (MR 128) or wg * 64 + c (MR 64)
    const int fbase = MR == 128 ? 0 : wg * (GATE_UP ? WN / 2 : WN);
#pragma unroll
    for (int j = 0; j < (GATE_UP ? WN / 16 : WN / 8); ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = r_lo + 8 * h, c = fbase + 8 * j + cq;
            float v0, v1;
            if (GATE_UP) {
                constexpr int UP = WN / 16;  // accumulator column blocks between gate and up
                float g0 = __bfloat162float(__float2bfloat16_rn(acc[4 * j + 2 * h]));
                float g1 = __bfloat162float(__float2bfloat16_rn(acc[4 * j + 2 * h + 1]));
                float u0 = __bfloat162float(__float2bfloat16_rn(acc[4 * (j + UP) + 2 * h]));
                float u1 = __bfloat162float(__float2bfloat16_rn(acc[4 * (j + UP) + 2 * h + 1]));
                v0 = g0 / (1.f + __expf(-g0)) * u0;
                v1 = g1 / (1.f + __expf(-g1)) * u1;
            } else {
                v0 = acc[4 * j + 2 * h];
                v1 = acc[4 * j + 2 * h + 1];
            }
            *reinterpret_cast<__nv_bfloat162*>(sc + r * SCW + c) = __floats2bfloat162_rn(v0, v1);
        }
    }
    __syncthreads();
    for (int c = tid; c < nrows * (NF / 8); c += 256) {
        int r = c / (NF / 8), fl = (c % (NF / 8)) * 8;
        if (f0 + fl < N)
            *reinterpret_cast<bf16x8*>(out + (size_t)(row0 + r) * N + f0 + fl) =
                *reinterpret_cast<const bf16x8*>(sc + r * SCW + fl);
    }
}

// grid (tile bound for MR-row tiles, ceil(N / NF)), 256 threads, dynamic smem
// WGM_STAGES * (MR + 256) * 128 + 1024 (alignment slack); NF = 128 (gate_up) or 256 (down).
extern "C" __global__ void __launch_bounds__(256, 1) moe_grouped_gate_up_wgmma_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_tile_wgmma<true, 128>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

extern "C" __global__ void __launch_bounds__(256, 1) moe_grouped_down_wgmma_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_tile_wgmma<false, 128>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

extern "C" __global__ void __launch_bounds__(256, 1) moe_grouped_gate_up_wgmma64_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_tile_wgmma<true, 64>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

extern "C" __global__ void __launch_bounds__(256, 1) moe_grouped_down_wgmma64_bf16(
    const bf16* __restrict__ x, const long long* __restrict__ ptrs, const int* __restrict__ offsets,
    const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N, int n_exp) {
    griddep_wait();
    grouped_tile_wgmma<false, 64>(x, ptrs, offsets, tile_off, out, K, N, n_exp);
}

// ---------------------------------------------------------------------------------------------
// Prefill-sized batches, warp-specialised and persistent (RowTile::Ws128): the same two GEMMs,
// roundings and outputs as the wgmma kernels above, built the way fast Hopper GEMMs are.
//
// CTA = 3 warpgroups, 384 threads, one CTA per SM (grid = SM count, at most the tile count):
// - warpgroup 0, the producer, gives its registers back (setmaxnreg 40); one thread issues
//   every copy: per k step (64) the activation rows (two TMA boxes of 64 rows x 64 k, the
//   second skipped when the tile holds <= 64 rows) and the 256 weight rows (two boxes of 128
//   rows: gate and up of the same 128 features for gate_up, features f0.. and f0+128.. for
//   down), all in the 128-byte swizzle the wgmma descriptors name (wg_desc(.., 16, 1024)),
//   into a ring of WS_STAGES stages guarded by full / empty mbarriers;
// - warpgroups 1 and 2, the consumers (setmaxnreg 232), compute rows 0..63 and 64..127 of the
//   tile against all 256 weight rows (m64n256k16, 4 per stage), keep one wgmma group in flight
//   (wait_group 1) and hand the previous stage back to the producer (one arrival per warp:
//   the empty barrier completes when all 8 consumer warps are done with the stage).
// No __syncthreads after the set-up: producer and consumers walk the same tile sequence and
// meet only at the barriers, so the producer runs ahead across tile boundaries and loads the
// next tile's first stages while the consumers run the epilogue (registers -> global).
//
// Weights: the experts' tensors are separate allocations, so each expert gets its own tensor
// maps (gate, up, down). They are written on the device by moe_grouped_weight_maps just
// before the GEMMs (a template encoded on the host, the address patched with
// tensormap.replace), so the table of addresses stays the only interface and no host round trip
// is needed; 128 bytes each, 64-byte aligned in a device buffer. Why TMA and not cp.async by
// the producer warpgroup's 128 threads: the weights are 2/3 of every stage's bytes; TMA moves
// them without registers or issue slots (one instruction per 16 KB box instead of 1024
// cp.async), so the producer warpgroup can sit at 40 registers and the consumers get 232.
//
// Scheduler: tiles are (expert e, 128-row block m, feature block n) numbered expert-major, then
// n, then m innermost: the CTAs running at the same time (consecutive tile numbers, static
// stride gridDim.x) are the row blocks of one weight block, which then streams from DRAM once
// for all of them (P2 streams 7.5 GB of weights per layer: with ~3 row blocks per expert, L2
// reuse of the weight block is what keeps the kernel compute bound) and the 12 (gate_up) or 20
// (down) feature blocks of one expert's rows follow within a few dozen tiles.
//
// Padding: P2 (8192 tokens x top-6 over 160 experts; 265..351 rows per expert measured,
// bench/RESULTS.md) gives every expert 3 row blocks whose last holds 9..95 rows: with whole
// 128-row tiles 384 rows are computed per ~307 (25 % waste); a tile of <= 64 rows runs only
// the first consumer's wgmma (the second waits on the same barriers and releases the stages
// untouched), which computes ceil(rows / 64) * 64, i.e. 320 for the experts at <= 320 rows,
// about half of P2's (~15 % waste in all).
//
// Experts with 0 rows take no tiles; an expert this process does not hold (address 0) takes
// its tiles without loads: the consumers write its rows' zeros.
#include "tma.cuh"

#define WS_STAGES 4
#define WS_A_BYTES (128 * 128)                    // 128 rows x 64 k (bf16)
#define WS_B_BYTES (256 * 128)                    // 256 weight rows x 64 k
#define WS_STAGE_BYTES (WS_A_BYTES + WS_B_BYTES)  // 48 KB
#define WS_MAX_EXP 1024
// dynamic smem: 1024 (alignment slack) + stages + 128 (barriers) + tile_off, offsets and the
// pair kernel's unit offsets (ints)
#define WS_SMEM_BYTES (1024 + WS_STAGES * WS_STAGE_BYTES + 128 + 3 * 4 * (WS_MAX_EXP + 1))

__device__ __forceinline__ void ws_setmaxnreg_dec40() { asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory"); }
__device__ __forceinline__ void ws_setmaxnreg_inc232() { asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory"); }

// The maps were written by an earlier launch through the generic proxy; TMA reads them through
// the tensormap proxy.
__device__ __forceinline__ void ws_map_acquire(const TmaMap* m) {
    asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n" ::"l"(reinterpret_cast<u64>(m)) : "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<u64>(m)) : "memory");
}

// The expert whose share of a prefix sum (prefix[e] * mul: the first tile or unit it owns) holds
// item u: the largest e < n_exp with prefix[e] * mul <= u, by binary search over shared memory.
__device__ __forceinline__ int ws_expert_of(const int* prefix, int mul, int n_exp, int u) {
    int lo = 0, hi = n_exp;
    while (hi - lo > 1) {
        int mid = (lo + hi) >> 1;
        if (prefix[mid] * mul <= u) lo = mid;
        else hi = mid;
    }
    return lo;
}

// Tile t of the schedule (t < s_toff[n_exp] * nb): s_toff is the prefix sum of the experts'
// 128-row blocks, nb the feature blocks per row block.
struct WsTile {
    int e, row0, nrows, f0;
};
__device__ __forceinline__ WsTile ws_tile(const int* s_toff, const int* s_off, int n_exp, int nb, int nf, int t) {
    const int lo = ws_expert_of(s_toff, nb, n_exp, t);
    const int mb = s_toff[lo + 1] - s_toff[lo], local = t - s_toff[lo] * nb;
    const int n = local / mb, m = local - n * mb;
    WsTile w;
    w.e = lo;
    w.row0 = s_off[lo] + m * 128;
    w.nrows = min(128, s_off[lo + 1] - w.row0);
    w.f0 = n * nf;
    return w;
}

// Unit u of the pair schedule (u < s_poff[n_exp] * nb): s_poff is the prefix sum of the experts'
// pairs of 128-row blocks (ceil(blocks / 2)). A unit is (expert, feature block, pair of row
// blocks), numbered as ws_tile's tiles; CTA `rank` of the pair takes row block 2 p + rank, which
// may not exist (an odd last block): nrows 0, and the CTA only loads its half of the weights.
__device__ __forceinline__ WsTile ws_pair_tile(const int* s_poff, const int* s_toff, const int* s_off, int n_exp,
                                               int nb, int nf, int u, int rank) {
    const int lo = ws_expert_of(s_poff, nb, n_exp, u);
    const int pb = s_poff[lo + 1] - s_poff[lo], local = u - s_poff[lo] * nb;
    const int n = local / pb, m = 2 * (local - n * pb) + rank;
    WsTile w;
    w.e = lo;
    w.row0 = s_off[lo] + m * 128;
    w.nrows = m < s_toff[lo + 1] - s_toff[lo] ? min(128, s_off[lo + 1] - w.row0) : 0;
    w.f0 = n * nf;
    return w;
}

// Unit u of the paired dynamic schedule (RowTile::Ws128PairDyn; u < s_uoff[n_exp], s_uoff the
// prefix sum of ws_pdyn_units). An expert's mb row blocks and nb feature blocks become:
// - row pairs: row blocks 2p and 2p + 1 of one feature block (CTA `rank` takes 2p + rank); they
//   share the weight block, each CTA copying half of it and multicasting it to both;
// - for an odd mb, feature pairs: the last row block against feature blocks 2q and 2q + 1 (CTA
//   `rank` takes 2q + rank, which may not exist for an odd nb: `mine` false); they share the
//   activations, each CTA copying one of the two 64-row boxes and multicasting it.
// Units run in groups of two feature blocks, their row pairs first, then their feature pair, so
// a weight block's readers follow one another within a few units, as ws_tile's row blocks do.
// Why: the unpaired dynamic kernel is bound by L2 delivery (ncu, bench/RESULTS.md session 20:
// 99.7 % L2 throughput at 0.646 of cuBLAS). Per two weight blocks of an expert with three row
// blocks it pulls ~288 KB per k step from L2 (six tiles of 32 KB weights + 16 KB activations);
// paired, ~208 KB: 1.38x less. Over a mix of P2-like experts with short last blocks it is 1.37x
// (grouped.rs's paired_dynamic_schedule_pulls_fewer_bytes_from_l2 counts the copies). Ws128Pair
// only paired rows and left a CTA idle on the odd block.
struct WsUnit {
    WsTile w;
    bool fpair;  // a feature pair (shared activations); else a row pair (shared weights)
    bool mine;   // this CTA has a tile in the unit
};
__device__ __forceinline__ int ws_pdyn_units(int mb, int nb) {
    const int rp = mb >> 1, odd = mb & 1;
    return (nb >> 1) * (2 * rp + odd) + (nb & 1) * (rp + odd);
}
__device__ __forceinline__ WsUnit ws_pdyn_unit(const int* s_uoff, const int* s_toff, const int* s_off, int n_exp,
                                               int nb, int nf, int u, int rank) {
    const int lo = ws_expert_of(s_uoff, 1, n_exp, u);
    // (g >= 1: an expert without rows takes no unit, but the end marker's lookup may land on one)
    const int mb = s_toff[lo + 1] - s_toff[lo], rp = mb >> 1, g = max(2 * rp + (mb & 1), 1);
    const int local = u - s_uoff[lo], q = local / g, w = local - q * g;
    const int nfq = min(2, nb - 2 * q);
    WsUnit r;
    int n, m;
    if (w < nfq * rp) {
        const int j = w / rp;
        n = 2 * q + j;
        m = 2 * (w - j * rp) + rank;
        r.fpair = false;
        r.mine = true;
    } else {
        n = 2 * q + rank;
        m = mb - 1;
        r.fpair = true;
        r.mine = n < nb;
    }
    r.w.e = lo;
    r.w.row0 = s_off[lo] + m * 128;
    r.w.nrows = min(128, s_off[lo + 1] - r.w.row0);
    r.w.f0 = n * nf;
    return r;
}

// The consumer warpgroups' loop of grouped_tile_ws (see there).
template <bool GATE_UP, bool PAIR, bool DYN, typename TileOf>
__device__ __forceinline__ void ws_consume(u32 base, u32 full0, u32 empty0, const volatile int* s_tile, int c,
                                           int tid, int first, int stride, int total, int KT, TileOf tile_of,
                                           const long long* __restrict__ ptrs, bf16* __restrict__ out, int N,
                                           int rank) {
    constexpr int NF = GATE_UP ? 128 : 256;
    const int t128 = tid % 128, lane = tid % WARP, wq = t128 / WARP;
    // a stage goes back to this CTA's producer and, in a pair, to the partner's (its half of
    // the weights is in this CTA's stage too)
    auto release = [&](u32 bar) {
        mbar_arrive(bar);
        if (PAIR) mbar_arrive_remote(bar, rank ^ 1);
    };
    float acc[128];
    int it = 0;
    // DYN: the producer names each tile in its first stage (-1: no more), with a stage of its
    // own (no copies) for a tile of an expert not held here and for the end. (The loop ends at
    // its head: a break on the name made ptxas serialise every wgmma, C7518.)
    auto next = [&](int t) -> int {
        if (!DYN) return t + stride;
        const int s = it % WS_STAGES;
        mbar_wait(full0 + 8 * s, (it / WS_STAGES) & 1);
        return __shfl_sync(0xffffffffu, s_tile[s], 0);
    };
    for (int t = DYN ? next(0) : first; t >= 0 && t < total; t = next(t)) {
        const WsTile w = tile_of(t);
        const int r0 = 64 * c, nr = min(64, w.nrows - r0);  // this warpgroup's rows of the tile
        const bool held = __shfl_sync(0xffffffffu, GATE_UP ? ptrs[3 * w.e] != 0 && ptrs[3 * w.e + 1] != 0
                                                             : ptrs[3 * w.e + 2] != 0, 0);
        if (!held) {
            for (int i = t128; i < max(nr, 0) * (NF / 8); i += 128) {
                const int r = i / (NF / 8), f = w.f0 + (i % (NF / 8)) * 8;
                if (f < N) *reinterpret_cast<uint4*>(out + (size_t)(w.row0 + r0 + r) * N + f) = make_uint4(0, 0, 0, 0);
            }
            if (DYN) {  // the naming stage goes back
                if (lane == 0) release(empty0 + 8 * (it % WS_STAGES));
                ++it;
            }
            continue;
        }
        // the second warpgroup sits out tiles of <= 64 rows
        const bool active = __shfl_sync(0xffffffffu, nr > 0, 0);
        for (int kt = 0; kt < KT; ++kt, ++it) {
            const int s = it % WS_STAGES;
            mbar_wait(full0 + 8 * s, (it / WS_STAGES) & 1);
            if (active) {
                const u32 a = base + s * WS_STAGE_BYTES + c * (WS_A_BYTES / 2), b = base + s * WS_STAGE_BYTES + WS_A_BYTES;
                wg_fence();
#pragma unroll
                for (int kk = 0; kk < GK / 16; ++kk)
                    wgmma_m64n256_ss(acc, wg_desc(a + kk * 32, 16, 1024), wg_desc(b + kk * 32, 16, 1024),
                                     (kt | kk) != 0);
                wg_commit();
                wg_wait<1>();  // the group of step kt - 1 is done: its stage goes back
            }
            if (kt > 0 && lane == 0) release(empty0 + 8 * ((it - 1) % WS_STAGES));
        }
        if (active) {
            wg_wait<0>();
            wg_fence_regs<128>(acc);
        }
        if (lane == 0) release(empty0 + 8 * ((it - 1) % WS_STAGES));
        if (!active) continue;

        // epilogue: accumulator rows r_lo, r_lo + 8 (of the tile), columns 8j + cq, 8j + cq + 1.
        // (Values are computed unconditionally and only the stores are guarded: a read of the
        // accumulators under a thread-dependent branch makes ptxas serialise every wgmma.)
        const int r_lo = r0 + wq * 16 + lane / 4, cq = (lane % 4) * 2;
#pragma unroll
        for (int j = 0; j < (GATE_UP ? 16 : 32); ++j) {
            const int f = w.f0 + 8 * j + cq;
            const bool fok = w.f0 + 8 * j < N;  // N is a multiple of 8: the pair is in or out
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = r_lo + 8 * h;
                float v0, v1;
                if (GATE_UP) {  // gate: columns 0..127, up: 128..255 of the same features
                    float g0 = __bfloat162float(__float2bfloat16_rn(acc[4 * j + 2 * h]));
                    float g1 = __bfloat162float(__float2bfloat16_rn(acc[4 * j + 2 * h + 1]));
                    float u0 = __bfloat162float(__float2bfloat16_rn(acc[4 * (j + 16) + 2 * h]));
                    float u1 = __bfloat162float(__float2bfloat16_rn(acc[4 * (j + 16) + 2 * h + 1]));
                    v0 = g0 / (1.f + __expf(-g0)) * u0;
                    v1 = g1 / (1.f + __expf(-g1)) * u1;
                } else {
                    v0 = acc[4 * j + 2 * h];
                    v1 = acc[4 * j + 2 * h + 1];
                }
                const __nv_bfloat162 v = __floats2bfloat162_rn(v0, v1);
                if (fok && r < w.nrows)
                    *reinterpret_cast<__nv_bfloat162*>(out + (size_t)(w.row0 + r) * N + f) = v;
            }
        }
    }
}

// PAIR: the CTA is one of a cluster of two that take the two row blocks of one weight block
// together (ws_pair_tile); each copies half of every stage's 256 weight rows and multicasts it
// into both CTAs' stage, so every weight byte crosses L2 once per pair instead of once per CTA
// (bench/RESULTS.md session 11: the unpaired kernel is bound by L2 delivery, 95 % busy). A stage
// then holds the partner's copy too, so it is free only when both CTAs' consumers are done with
// it: the empty barriers count the 8 consumer warps of each CTA.
// DYN: tiles are handed out by a global counter (`sched`, zero before the launch) to whichever
// CTA's producer asks next, instead of the static stride: the three row blocks of a weight block
// then start within a few tiles' time of each other and read its copies while L2 still holds
// them. With the static stride the CTAs drift apart (a block of <= 64 rows takes half the time),
// and the unpaired and paired kernels both pulled the weights about twice from DRAM (ncu: 11 GB
// for 5 GB of gate/up weights, L2 hit rate 40 %, bench/RESULTS.md session 12).
template <bool GATE_UP, bool PAIR, bool DYN = false>
__device__ __forceinline__ void grouped_tile_ws(const TmaMap* x_map, const TmaMap* __restrict__ wmaps,
                                                const long long* __restrict__ ptrs, const int* __restrict__ offsets,
                                                const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N,
                                                int n_exp, int* __restrict__ sched = nullptr) {
    // PAIR && DYN: the paired dynamic schedule (ws_pdyn_unit): rank 0's producer takes each unit
    // from the counter and names it to rank 1's through a ring of WS_STAGES slots in rank 1's
    // shared memory, each with a barrier rank 0 arrives on remotely (release, cluster scope).
    constexpr bool PDYN = PAIR && DYN;
    constexpr int NF = GATE_UP ? 128 : 256;  // output features per tile
    extern __shared__ __align__(1024) unsigned char ws_smem_raw[];
    unsigned char* smem =
        reinterpret_cast<unsigned char*>((reinterpret_cast<size_t>(ws_smem_raw) + 1023) & ~(size_t)1023);
    const u32 base = smem_addr(smem);
    const u32 full0 = base + WS_STAGES * WS_STAGE_BYTES;  // full[s] at full0 + 8 s
    const u32 empty0 = full0 + 8 * WS_STAGES;              // empty[s] at empty0 + 8 s
    // DYN: the tile each stage's first k step belongs to, written before its full arrival
    volatile int* s_tile = reinterpret_cast<volatile int*>(smem + WS_STAGES * WS_STAGE_BYTES + 16 * WS_STAGES);
    int* s_toff = reinterpret_cast<int*>(smem + WS_STAGES * WS_STAGE_BYTES + 128);
    int* s_off = s_toff + (WS_MAX_EXP + 1);
    int* s_poff = s_off + (WS_MAX_EXP + 1);
    // PDYN: the unit-name ring (barriers, then slots) in the last 48 of the 128 bytes after the
    // stages: full 0..31, empty 32..63, s_tile 64..79, names' barriers 80..111, names 112..127
    static_assert(WS_STAGES == 4, "the barrier area holds four stages' barriers and names");
    const u32 name0 = full0 + 80;
    volatile int* s_name = reinterpret_cast<volatile int*>(smem + WS_STAGES * WS_STAGE_BYTES + 112);
    // (role and per-tile decisions broadcast with __shfl_sync: the compiler then knows them to
    // be warp-uniform, and wgmma under them is not serialised as in a divergent path)
    const int tid = threadIdx.x, wg = __shfl_sync(0xffffffffu, tid / 128, 0);
    const int rank = PAIR ? (int)cluster_ctarank() : 0;

    for (int i = tid; i <= n_exp; i += blockDim.x) {
        s_toff[i] = tile_off[i];
        s_off[i] = offsets[i];
    }
    __syncthreads();
    const int nb = (N + NF - 1) / NF;
    if (PAIR && tid < WARP) {
        // s_poff: exclusive prefix sum of ceil(row blocks / 2) (PDYN: of the experts' units), 32
        // experts a round
        int carry = 0;
        if (tid == 0) s_poff[0] = 0;
        for (int e0 = 0; e0 < n_exp; e0 += WARP) {
            const int e = e0 + tid;
            const int mb = e < n_exp ? s_toff[e + 1] - s_toff[e] : 0;
            int v = PDYN ? ws_pdyn_units(mb, nb) : (mb + 1) / 2;
#pragma unroll
            for (int d = 1; d < WARP; d *= 2) {
                const int o = __shfl_up_sync(0xffffffffu, v, d);
                if (tid >= d) v += o;
            }
            if (e < n_exp) s_poff[e + 1] = carry + v;
            carry += __shfl_sync(0xffffffffu, v, WARP - 1);
        }
    }
    if (tid == 0) {
        for (int s = 0; s < WS_STAGES; ++s) {
            mbar_init(full0 + 8 * s, 1);  // the producer's expect_tx arrival (+ the TMA bytes)
            // one arrival per consumer warp (of both CTAs of a pair)
            mbar_init(empty0 + 8 * s, PAIR ? 16 : 8);
            if (PDYN) mbar_init(name0 + 8 * s, 1);  // rank 0's remote arrival with the name
        }
        mbar_init_fence();
    }
    // a pair's barriers are initialised before either CTA copies into or arrives on the other's
    if (PAIR) cluster_sync();
    else __syncthreads();

    const int total =
        __shfl_sync(0xffffffffu, PDYN ? s_poff[n_exp] : (PAIR ? s_poff[n_exp] : s_toff[n_exp]) * nb, 0);
    const int KT = (K + GK - 1) / GK;
    const int first = PAIR ? blockIdx.x / 2 : blockIdx.x, stride = PAIR ? gridDim.x / 2 : gridDim.x;
    auto tile_of = [&](int t) -> WsTile {
        if (PDYN) {
            WsUnit x = ws_pdyn_unit(s_poff, s_toff, s_off, n_exp, nb, NF, t, rank);
            if (!x.mine) x.w.nrows = 0;  // the consumers only hand its stages back
            return x.w;
        }
        return PAIR ? ws_pair_tile(s_poff, s_toff, s_off, n_exp, nb, NF, t, rank)
                    : ws_tile(s_toff, s_off, n_exp, nb, NF, t);
    };

    // whether this process holds expert e's weights of this projection, and its weight maps
    // acquired once per expert run (the producer's)
    auto held_e = [&](int e) {
        return GATE_UP ? ptrs[3 * e] != 0 && ptrs[3 * e + 1] != 0 : ptrs[3 * e + 2] != 0;
    };
    auto weight_maps = [&](int e, int& last_e, const TmaMap*& m0, const TmaMap*& m1) {
        m0 = wmaps + 3 * e + (GATE_UP ? 0 : 2);
        m1 = GATE_UP ? m0 + 1 : m0;
        if (e != last_e) {
            ws_map_acquire(m0);
            if (GATE_UP) ws_map_acquire(m1);
            last_e = e;
        }
    };

    if (wg == 0) {
        // ---- producer ----
        ws_setmaxnreg_dec40();
        if (PDYN && tid == 0) {
            int it = 0, ui = 0, last_e = -1;
            for (;;) {
                // The unit's first stage is free before rank 0 names the unit: both CTAs'
                // consumers are then done with the stage 4 back, so rank 1's producer has read
                // the name of the unit 4 back (every unit takes a stage at least), whose slot and
                // barrier phase this one reuses.
                const int s0 = it % WS_STAGES, ns = ui % WS_STAGES;
                mbar_wait_thread(empty0 + 8 * s0, ((it / WS_STAGES) & 1) ^ 1);
                int t;
                if (rank == 0) {
                    t = atomicAdd(sched, 1);
                    if (t >= total) t = -1;
                    st_remote_s32(smem_addr(const_cast<int*>(&s_name[ns])), 1, t);
                    mbar_arrive_remote_release(name0 + 8 * ns, 1);
                } else {
                    mbar_wait_thread<true>(name0 + 8 * ns, (ui / WS_STAGES) & 1);
                    t = s_name[ns];
                }
                ++ui;
                const WsUnit x = ws_pdyn_unit(s_poff, s_toff, s_off, n_exp, nb, NF, t < 0 ? 0 : t, rank);
                const WsTile& w = x.w;
                const bool held = t >= 0 && held_e(w.e);
                if (!held) {
                    // a stage that only names the unit (or the end): the consumers write zeros
                    s_tile[s0] = t;
                    mbar_arrive(full0 + 8 * s0);
                    ++it;
                    if (t < 0) break;
                    continue;
                }
                const TmaMap *m0, *m1;
                weight_maps(w.e, last_e, m0, m1);
                const bool two = w.nrows > 64;  // every unit's row blocks hold a row at least
                // per CTA: its activations (row pair) or both CTAs' shared ones (feature pair),
                // and the whole weight block (row pair: half from each CTA; feature pair: its own)
                const u32 bytes = (two ? WS_A_BYTES : WS_A_BYTES / 2) + (x.mine ? WS_B_BYTES : 0);
                const int fb = GATE_UP ? w.f0 : w.f0 + 128;  // the second weight box's first row
                for (int kt = 0; kt < KT; ++kt, ++it) {
                    const int s = it % WS_STAGES;
                    const u32 full = full0 + 8 * s;
                    mbar_wait_thread(empty0 + 8 * s, ((it / WS_STAGES) & 1) ^ 1);
                    if (kt == 0) s_tile[s] = t;
                    mbar_arrive_expect_tx(full, bytes);
                    const u32 a = base + s * WS_STAGE_BYTES, b = a + WS_A_BYTES;
                    const int k0 = kt * GK;
                    if (!x.fpair) {
                        tma_load_2d(a, x_map, k0, w.row0, full);
                        if (two) tma_load_2d(a + WS_A_BYTES / 2, x_map, k0, w.row0 + 64, full);
                        if (rank == 0) tma_load_2d_multicast(b, m0, k0, w.f0, full, 3);
                        else tma_load_2d_multicast(b + WS_B_BYTES / 2, m1, k0, fb, full, 3);
                    } else {
                        if (rank == 0) tma_load_2d_multicast(a, x_map, k0, w.row0, full, 3);
                        else if (two) tma_load_2d_multicast(a + WS_A_BYTES / 2, x_map, k0, w.row0 + 64, full, 3);
                        if (x.mine) {
                            tma_load_2d(b, m0, k0, w.f0, full);
                            tma_load_2d(b + WS_B_BYTES / 2, m1, k0, fb, full);
                        }
                    }
                }
            }
        } else if (!PDYN && tid == 0) {
            int it = 0, last_e = -1;
            for (int t = first; DYN || t < total; t += stride) {
                if (DYN) {
                    t = atomicAdd(sched, 1);
                    if (t >= total) t = -1;
                }
                const WsTile w = tile_of(t < 0 ? 0 : t);
                const bool held = t >= 0 && held_e(w.e);
                if (DYN && !held) {
                    // a stage that only names the tile (or the end): the consumers write zeros
                    const int s = it % WS_STAGES;
                    mbar_wait_thread(empty0 + 8 * s, ((it / WS_STAGES) & 1) ^ 1);
                    s_tile[s] = t;
                    mbar_arrive(full0 + 8 * s);
                    ++it;
                    if (t < 0) break;
                    continue;
                }
                if (!held) continue;  // no stages: the consumers write zeros
                const TmaMap *m0, *m1;
                weight_maps(w.e, last_e, m0, m1);
                const bool one = w.nrows > 0, two = w.nrows > 64;
                const u32 bytes = (two ? WS_A_BYTES : one ? WS_A_BYTES / 2 : 0) + WS_B_BYTES;
                const int fb = GATE_UP ? w.f0 : w.f0 + 128;  // the second weight box's first row
                for (int kt = 0; kt < KT; ++kt, ++it) {
                    const int s = it % WS_STAGES;
                    const u32 full = full0 + 8 * s;
                    mbar_wait_thread(empty0 + 8 * s, ((it / WS_STAGES) & 1) ^ 1);
                    if (DYN && kt == 0) s_tile[s] = t;
                    mbar_arrive_expect_tx(full, bytes);
                    const u32 a = base + s * WS_STAGE_BYTES, b = a + WS_A_BYTES;
                    const int k0 = kt * GK;
                    if (one) tma_load_2d(a, x_map, k0, w.row0, full);
                    if (two) tma_load_2d(a + WS_A_BYTES / 2, x_map, k0, w.row0 + 64, full);
                    if (!PAIR) {
                        tma_load_2d(b, m0, k0, w.f0, full);
                        tma_load_2d(b + WS_B_BYTES / 2, m1, k0, fb, full);
                    } else if (rank == 0) {
                        tma_load_2d_multicast(b, m0, k0, w.f0, full, 3);
                    } else {
                        tma_load_2d_multicast(b + WS_B_BYTES / 2, m1, k0, fb, full, 3);
                    }
                }
            }
        }
        __syncwarp();
    } else {
        // ---- consumers: warpgroup c = 0, 1 computes rows 64c .. 64c + 63 of each tile ----
        ws_setmaxnreg_inc232();
        ws_consume<GATE_UP, PAIR, DYN>(base, full0, empty0, s_tile, wg - 1, tid, first, stride, total, KT, tile_of,
                                       ptrs, out, N, rank);
    }
    // neither CTA of a pair leaves while the other may still copy into it or arrive on it
    if (PAIR) cluster_sync();
}

// grid min(SM count, tile bound), 384 threads, dynamic smem WS_SMEM_BYTES; x_map: x [rows, K]
// in boxes of 64 k x 64 rows; wmaps [E, 3] the experts' gate / up / down maps (boxes of 64 k x
// 128 rows) from moe_grouped_weight_maps; tile_off: moe_offsets_i32's with 128-row tiles.
extern "C" __global__ void __launch_bounds__(384, 1) moe_grouped_gate_up_ws_bf16(
    const __grid_constant__ TmaMap x_map, const TmaMap* __restrict__ wmaps, const long long* __restrict__ ptrs,
    const int* __restrict__ offsets, const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N,
    int n_exp) {
    griddep_wait();
    grouped_tile_ws<true, false>(&x_map, wmaps, ptrs, offsets, tile_off, out, K, N, n_exp);
}

extern "C" __global__ void __launch_bounds__(384, 1) moe_grouped_down_ws_bf16(
    const __grid_constant__ TmaMap x_map, const TmaMap* __restrict__ wmaps, const long long* __restrict__ ptrs,
    const int* __restrict__ offsets, const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N,
    int n_exp) {
    griddep_wait();
    grouped_tile_ws<false, false>(&x_map, wmaps, ptrs, offsets, tile_off, out, K, N, n_exp);
}

// The same with the dynamic tile schedule (RowTile::Ws128Dyn): sched, one int, zero before the
// launch (moe_grouped_weight_maps zeroes it).
extern "C" __global__ void __launch_bounds__(384, 1) moe_grouped_gate_up_ws_dyn_bf16(
    const __grid_constant__ TmaMap x_map, const TmaMap* __restrict__ wmaps, const long long* __restrict__ ptrs,
    const int* __restrict__ offsets, const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N,
    int n_exp, int* __restrict__ sched) {
    griddep_wait();
    grouped_tile_ws<true, false, true>(&x_map, wmaps, ptrs, offsets, tile_off, out, K, N, n_exp, sched);
}

extern "C" __global__ void __launch_bounds__(384, 1) moe_grouped_down_ws_dyn_bf16(
    const __grid_constant__ TmaMap x_map, const TmaMap* __restrict__ wmaps, const long long* __restrict__ ptrs,
    const int* __restrict__ offsets, const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N,
    int n_exp, int* __restrict__ sched) {
    griddep_wait();
    grouped_tile_ws<false, false, true>(&x_map, wmaps, ptrs, offsets, tile_off, out, K, N, n_exp, sched);
}

// The same in clusters of (2, 1, 1) CTAs (grid even): the two row blocks of a weight block share
// its copies (ws_pair_tile).
extern "C" __global__ void __launch_bounds__(384, 1) moe_grouped_gate_up_ws_pair_bf16(
    const __grid_constant__ TmaMap x_map, const TmaMap* __restrict__ wmaps, const long long* __restrict__ ptrs,
    const int* __restrict__ offsets, const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N,
    int n_exp) {
    griddep_wait();
    grouped_tile_ws<true, true>(&x_map, wmaps, ptrs, offsets, tile_off, out, K, N, n_exp);
}

extern "C" __global__ void __launch_bounds__(384, 1) moe_grouped_down_ws_pair_bf16(
    const __grid_constant__ TmaMap x_map, const TmaMap* __restrict__ wmaps, const long long* __restrict__ ptrs,
    const int* __restrict__ offsets, const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N,
    int n_exp) {
    griddep_wait();
    grouped_tile_ws<false, true>(&x_map, wmaps, ptrs, offsets, tile_off, out, K, N, n_exp);
}

// The same in clusters of (2, 1, 1) CTAs with the paired dynamic schedule (RowTile::Ws128PairDyn,
// ws_pdyn_unit): row pairs share weight blocks, feature pairs an odd last row block's
// activations; sched as for the dyn kernels.
extern "C" __global__ void __launch_bounds__(384, 1) moe_grouped_gate_up_ws_pair_dyn_bf16(
    const __grid_constant__ TmaMap x_map, const TmaMap* __restrict__ wmaps, const long long* __restrict__ ptrs,
    const int* __restrict__ offsets, const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N,
    int n_exp, int* __restrict__ sched) {
    griddep_wait();
    grouped_tile_ws<true, true, true>(&x_map, wmaps, ptrs, offsets, tile_off, out, K, N, n_exp, sched);
}

extern "C" __global__ void __launch_bounds__(384, 1) moe_grouped_down_ws_pair_dyn_bf16(
    const __grid_constant__ TmaMap x_map, const TmaMap* __restrict__ wmaps, const long long* __restrict__ ptrs,
    const int* __restrict__ offsets, const int* __restrict__ tile_off, bf16* __restrict__ out, int K, int N,
    int n_exp, int* __restrict__ sched) {
    griddep_wait();
    grouped_tile_ws<false, true, true>(&x_map, wmaps, ptrs, offsets, tile_off, out, K, N, n_exp, sched);
}

// maps[3 e + j] = the template for j (gate and up: gu, down: dn) with its global address
// replaced by ptrs[3 e + j] (left as the template's for an expert not held: never loaded).
// One thread per map; 3 * n_exp threads. Thread 0 also zeroes the two ints after the maps: the
// dynamic schedule's tile counters (Ws128Dyn's gate_up and down launches that follow).
extern "C" __global__ void moe_grouped_weight_maps(const __grid_constant__ TmaMap gu, const __grid_constant__ TmaMap dn,
                                                   const long long* __restrict__ ptrs, TmaMap* __restrict__ maps,
                                                   int n_exp) {
    griddep_wait();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i == 0) {
        int* sched = reinterpret_cast<int*>(maps + 3 * n_exp);
        sched[0] = sched[1] = 0;
    }
    if (i >= 3 * n_exp) return;
    const TmaMap* src = i % 3 == 2 ? &dn : &gu;
#pragma unroll
    for (int j = 0; j < 16; ++j) maps[i].v[j] = src->v[j];
    const long long p = ptrs[i];
    if (p != 0)
        asm volatile("tensormap.replace.tile.global_address.global.b1024.b64 [%0], %1;\n" ::"l"(
                         (u64)__cvta_generic_to_global(&maps[i])),
                     "l"(p)
                     : "memory");
    asm volatile("fence.proxy.tensormap::generic.release.gpu;\n" ::: "memory");
}
