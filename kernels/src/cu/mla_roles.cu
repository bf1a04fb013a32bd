// mla_roles.cu: MLA decode attention for sm_90a in three warpgroups with one job each: one
// computes S = Q.K^T and the online softmax, the other two P.V, each on half of the latent columns.
//
// Why a third kernel next to mla_tma.cu: there warpgroup 0 runs S, softmax and P.V_L one after
// another, so nothing keeps the tensor cores busy while it does the softmax (the math alone ran
// at 0.132 ms on batch 64 x 4096 x 128 heads against ~0.093 ms of tensor work, bench/RESULTS.md
// session 12), and S reads Q from shared memory: a m64n64k16 with both operands in shared memory
// moves as many bytes through the SM's shared-memory port as its math takes cycles, so S was
// bound by the port the TMA copies write through as well. Here:
//   warpgroup 0 (184 registers): Q's latent columns 16..511 live in its registers as wgmma A
//       fragments (124 registers; columns 0..15 and the 64 rope columns are read from shared
//       memory: at 128 beside S's 32 ptxas spilled a quad and serialised every wgmma), so S
//       reads little besides K from shared memory; S of tile i, softmax, P to shared memory
//       (stmatrix), then straight on to S of tile i + 1, which the tensor cores run before the
//       other warpgroups' P.V of tile i (issued after it), so the softmax of tile i + 1 overlaps
//       that P.V;
//   warpgroups 1 and 2 (160 registers): O_L / O_R (latent columns 0..255 / 256..511) += P.V, P
//       read from shared memory.
// 184 + 160 + 160 = 504 registers a thread-triple: what the CTA holds at launch (168 x 384);
// setmaxnreg only moves registers between warpgroups (a sum of 512 deadlocked the first try).
// Q's latent columns no longer take 64 KB of shared memory, which buys a third latent buffer
// (the rope chunks, read by S alone, keep two): tile i + 2 is issued while P.V of tile i runs,
// into tile i - 1's buffer, so each load has a whole tile's math to land; with two buffers it
// would be issued when P.V of tile i ends and needed almost at once (S of tile i + 2 is issued
// as P.V of tile i runs).
// One P buffer: warpgroup 0 writes P of tile i + 1 only after P.V of tile i is done.
#include "common.cuh"
#include "mla_common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "mla_tma.cuh"

#define MR_LAT (8 * MLA_CHUNK)          // a tile's latent columns: 64 tokens x 512
#define MR_K0 0                         // three latent tile buffers
#define MR_R0 (3 * MR_LAT)              // two rope chunk buffers (64 tokens x 64)
#define MR_QR (MR_R0 + 2 * MLA_CHUNK)   // Q's rope columns, 64 heads x 64 swizzled
#define MR_P (MR_QR + MLA_CHUNK)        // P, 64 x 64 bf16 swizzled
#define MR_Q0 (MR_P + MLA_CHUNK)        // Q's latent columns 0..15 (k-step 0), no swizzle: 2 KB
#define MR_ALPHA (MR_Q0 + 2048)         // float[64]: the tile's O rescale
#define MR_L (MR_ALPHA + 256)           // float[64]: running row sums
#define MR_M (MR_L + 256)               // float[64]: running row maxima
#define MR_BAR (MR_M + 256)             // u64[3][9]: one mbarrier per chunk of each tile buffer
#define MR_ARGS (MR_BAR + 3 * 9 * 8)   // MrIssueArgs: what issuing a tile's copies needs
#define MR_BYTES (MR_ARGS + 32)
#define MR_LOG2E 1.4426950408889634f  // scores * scale * log2(e): exp2 units
#define MR_OROW 520                     // floats per row of the f32 output staging (2-way conflicts)

// named barriers: P (and its rescale) written (warpgroup 0 -> 1, 2); P read (1, 2 -> 0)
#define MR_NB_PREADY 1
#define MR_NB_PFREE 2
#define MR_NB_QREAD 3   // warpgroup 0 alone: Q read from buffer 2 (its zeros may come)

__device__ __forceinline__ void mr_setmaxnreg_inc184() { asm volatile("setmaxnreg.inc.sync.aligned.u32 184;\n" ::: "memory"); }
__device__ __forceinline__ void mr_setmaxnreg_dec160() { asm volatile("setmaxnreg.dec.sync.aligned.u32 160;\n" ::: "memory"); }

// Q's A fragments of k-steps 4 c + M, c = 0..7 (one per latent chunk of 8 KB), by ldmatrix x4
// from `a` + 8 KB c: the chunk offset an immediate of the instruction.
template <int C>
__device__ __forceinline__ void ldsm_q_chunk(u32* q, u32 a) {
    static_assert(C >= 0 && C < 8, "8 latent chunks");
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4+%5];"
                 : "=r"(q[0]), "=r"(q[1]), "=r"(q[2]), "=r"(q[3])
                 : "r"(a), "n"(C * MLA_CHUNK)
                 : "memory");
}
// rq holds k-steps 1..31: k-step k at rq + 4 (k - 1)
template <int M>
__device__ __forceinline__ void ldsm_q_chunks(u32* rq, u32 a) {
    if constexpr (M > 0) ldsm_q_chunk<0>(rq + 4 * (0 + M - 1), a);
    ldsm_q_chunk<1>(rq + 4 * (4 + M - 1), a);
    ldsm_q_chunk<2>(rq + 4 * (8 + M - 1), a);
    ldsm_q_chunk<3>(rq + 4 * (12 + M - 1), a);
    ldsm_q_chunk<4>(rq + 4 * (16 + M - 1), a);
    ldsm_q_chunk<5>(rq + 4 * (20 + M - 1), a);
    ldsm_q_chunk<6>(rq + 4 * (24 + M - 1), a);
    ldsm_q_chunk<7>(rq + 4 * (28 + M - 1), a);
}

// A shared-memory operand without swizzle (8-row x 16-byte core matrices): lbo the byte stride
// between core matrices along K, sbo along M / N.
__device__ __forceinline__ u64 wg_desc_noswz(u32 smem_addr, u32 lbo, u32 sbo) {
    return (u64)((smem_addr & 0x3FFFF) >> 4) | ((u64)((lbo >> 4) & 0x3FFF) << 16) | ((u64)((sbo >> 4) & 0x3FFF) << 32);
}

// P (bf16) goes into the swizzled 64 x 64 shared operand with stmatrix, one x4 store per 16
// columns, each of the warp's 8x8 matrices straight from its accumulator fragments. Why not
// store_p_swz's 16 scalar stores: their 16 swizzled addresses are loop invariants that ptxas keeps
// in registers, which warpgroup 0 (Q in 124 of them) has not got.
// Lane l gives the address of row (l & 7) + 8 ((l >> 3) & 1) of matrix l >> 3; its 16-byte
// column group for columns 8j.. (j even) is (j + (l >> 4)) ^ (row & 7) = j ^ y, y = (l >> 4) ^
// (l & 7); the row's address is a multiple of 128, so the address is (row | y << 4) ^ (j << 4):
// one register (p_row_addr) and an XOR inside the asm, where ptxas does not hoist it.
__device__ __forceinline__ u32 p_row_addr(u32 sp, int wq, int lane) {
    const int r = wq * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
    return (sp + r * 128) | ((((lane >> 4) ^ (lane & 7))) << 4);
}
// Columns 32 JJ .. 32 JJ + 15 of P: exp2 of the scores (masked at `valid`), packed to bf16, their
// sum (of the bf16 values, what P.V uses) into `sum`, one stmatrix x4 at p_row ^ (32 JJ).
template <int JJ>
__device__ __forceinline__ void p_store16(u32 p_row, const float* s, int valid, int cq, float scale,
                                          const float* m_new, float* sum) {
    u32 pk[4];  // matrix m: columns 8 (2 JJ + m / 2) + cq, +1 of row half m % 2
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        const int j = 2 * JJ + m / 2, hlf = m % 2, c = 8 * j + cq;
        const float p0 = c < valid ? exp2f(fmaf(s[4 * j + 2 * hlf] * scale, MR_LOG2E, -m_new[hlf])) : 0.f;
        const float p1 =
            c + 1 < valid ? exp2f(fmaf(s[4 * j + 2 * hlf + 1] * scale, MR_LOG2E, -m_new[hlf])) : 0.f;
        const __nv_bfloat162 pb = __floats2bfloat162_rn(p0, p1);
        const float2 pf = __bfloat1622float2(pb);
        sum[hlf] += pf.x + pf.y;
        pk[m] = *reinterpret_cast<const u32*>(&pb);
    }
    asm volatile(
        "{\n.reg .b32 a;\n"
        "xor.b32 a, %0, %1;\n"
        "stmatrix.sync.aligned.m8n8.x4.shared.b16 [a], {%2, %3, %4, %5};\n}\n" ::"r"(p_row),
        "n"(32 * JJ), "r"(pk[0]), "r"(pk[1]), "r"(pk[2]), "r"(pk[3])
        : "memory");
}

// mbar_wait without the out-of-line slow path (and so without its trap): the call would cost
// warpgroup 0 the few registers it has beyond Q's and S's.
__device__ __forceinline__ void mbar_wait_spin(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "MR_WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra MR_WAIT_%=;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// S[64 x 64] = Q . K^T over one tile: the rope chunk (Q from `qr`, K from `rbuf`), then the 8
// latent chunks at `kbuf` with Q's k-step 0 from `q0` and the rest from registers (rq: k-steps
// 1..31). wait = false (probe 1 only): the tile's copies are not waited for. Committed as one
// wgmma group, not waited for.
__device__ __forceinline__ void tile_qk_regs(float* s, const u32* rq, u32 qr, u32 q0, u32 kbuf, u32 rbuf,
                                             u32 bars, u32 parity, bool wait = true) {
    // every chunk first, then the 36 MMAs back to back: a wait between them is a branch, and
    // ptxas, short of registers here, then serialises every wgmma
    if (wait) {
#pragma unroll 1
        for (int c = 0; c < 9; ++c) mbar_wait_spin(bars + c * 8, parity);
    }
    __syncwarp();
    wg_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
        wgmma_m64n64_ss(s, wg_desc(qr + ks * 32, 16, 1024), wg_desc(rbuf + ks * 32, 16, 1024), ks > 0 ? 1 : 0);
#pragma unroll
    for (int c = 0; c < 8; ++c)
#pragma unroll
        for (int ks = 0; ks < 4; ++ks)
            if (c == 0 && ks == 0)
                wgmma_m64n64_ss(s, wg_desc_noswz(q0, 128, 256), wg_desc(kbuf, 16, 1024), 1);
            else
                wgmma_m64n64_rs(s, rq + 4 * (4 * c + ks - 1), wg_desc(kbuf + c * MLA_CHUNK + ks * 32, 16, 1024), 1);
    wg_commit();
}

// Shared-memory loads by 32-bit shared address: these warpgroups' registers are too few for the
// 64-bit generic pointers plain C++ would keep.
__device__ __forceinline__ float ld_shared_f32(u32 addr) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr) : "memory");
    return v;
}
__device__ __forceinline__ int ld_shared_s32(u32 addr) {
    int v;
    asm volatile("ld.shared.s32 %0, [%1];" : "=r"(v) : "r"(addr) : "memory");
    return v;
}
__device__ __forceinline__ void st_shared_f32(u32 addr, float v) {
    asm volatile("st.shared.f32 [%0], %1;" ::"r"(addr), "f"(v) : "memory");
}

// What issuing a tile's copies needs, kept in shared memory rather than in registers: warpgroup 0
// reads it only when it issues, so none of it is live while S holds Q's 124 registers and S's 32.
struct MrIssueArgs {
    const int* btab;
    int start, end, block_size;
};

// end - start of the CTA's split, read from MrIssueArgs in shared memory (`base`: its shared
// address) by warpgroups that keep nothing of the prologue in registers.
__device__ __forceinline__ int mr_split_tokens(u32 base) {
    // (offsets by the null-pointer idiom: NVRTC has no <cstddef> offsetof)
    const u32 o_end = (u32)reinterpret_cast<size_t>(&reinterpret_cast<const MrIssueArgs*>(0)->end);
    const u32 o_start = (u32)reinterpret_cast<size_t>(&reinterpret_cast<const MrIssueArgs*>(0)->start);
    return ld_shared_s32(base + MR_ARGS + o_end) - ld_shared_s32(base + MR_ARGS + o_start);
}

// The normalised O rows staged in shared memory (f32, MR_OROW apart, from the tile buffers) to
// `out` (bf16, splits == 1) or this split's f32 partials, all threads, 16 bytes each. Indices
// from the special registers again, read with asm volatile so that the compiler does not keep the
// prologue's copies alive through the P.V warpgroups' loop.
__device__ __forceinline__ void mr_store_rows(const unsigned char* smem, bf16* __restrict__ out,
                                              float* __restrict__ o_part, int splits, int heads) {
    u32 hg, b, split, tid;
    asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(hg));
    asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(b));
    asm volatile("mov.u32 %0, %%ctaid.z;" : "=r"(split));
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
    const float* so = reinterpret_cast<const float*>(smem + MR_K0);
    const int h0 = hg * 64, rows = min(64, heads - h0);
    if (splits == 1) {
        for (int c = tid; c < rows * (D_LAT / 8); c += 384) {
            const int r = c / (D_LAT / 8), col = (c % (D_LAT / 8)) * 8;
            const float4 a = *reinterpret_cast<const float4*>(so + r * MR_OROW + col);
            const float4 z = *reinterpret_cast<const float4*>(so + r * MR_OROW + col + 4);
            bf16x8 v;
            v.v[0] = __floats2bfloat162_rn(a.x, a.y);
            v.v[1] = __floats2bfloat162_rn(a.z, a.w);
            v.v[2] = __floats2bfloat162_rn(z.x, z.y);
            v.v[3] = __floats2bfloat162_rn(z.z, z.w);
            *reinterpret_cast<bf16x8*>(out + ((size_t)b * heads + h0 + r) * D_LAT + col) = v;
        }
    } else {
        for (int c = tid; c < rows * (D_LAT / 4); c += 384) {
            const int r = c / (D_LAT / 4), col = (c % (D_LAT / 4)) * 4;
            *reinterpret_cast<float4*>(o_part + (((size_t)b * splits + split) * heads + h0 + r) * D_LAT + col) =
                *reinterpret_cast<const float4*>(so + r * MR_OROW + col);
        }
    }
}

// The kernel body. PROBE (timing probes only, wrong outputs; DSV2_MLA_PROBE in the launcher, as for the tma
// kernel): 1 = the math alone (tiles 0..2 are loaded, later tiles reuse their buffers without
// loads or waits), 2 = the loads alone (every copy and handshake, no MMA and no softmax).
template <int PROBE>
__device__ __forceinline__ void roles_decode(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe,
                                             const int* __restrict__ block_table, const int* __restrict__ seq_lens,
                                             bf16* __restrict__ out, float* __restrict__ o_part,
                                             float* __restrict__ lse, int heads, int block_size, int max_blocks,
                                             int splits, float scale, long long qpe_sb, long long qpe_sh,
                                             const TmaMap& cache_map, const TmaMap& cache_map64) {
    extern __shared__ __align__(1024) unsigned char mr_smem_raw[];
    // No alignment slack: the layout takes all but 8 bytes of the 227 KB. Dynamic shared memory
    // starts 1024-aligned on sm_90 (after the driver's 1 KB); should it not, stop loudly rather
    // than read misaligned swizzled operands.
    unsigned char* smem = mr_smem_raw;
    if ((smem_addr(mr_smem_raw) & 1023) != 0) __trap();
    const u32 base = smem_addr(smem);

    const TmaPart part = tma_part(block_table, seq_lens, max_blocks, splits);
    const int b = part.b, split = part.split, h0 = part.h0, start = part.start, end = part.end;
    const int* btab = part.btab;
    // warp-uniform to ptxas (tid / 128 is not, and wgmma under a branch on it is serialised)
    const int tid = threadIdx.x, wg = __shfl_sync(0xffffffffu, tid / 128, 0), lane = tid % WARP, wq = (tid % 128) / WARP;
    const int r_lo = wq * 16 + lane / 4, cq = (lane % 4) * 2;
    if (start >= end) {
        tma_decode_empty(out, lse, b, split, splits, heads, h0);
        return;
    }
    const int ntiles = (end - start + 63) / 64;
    // tile i lives in buffer i % 3; its chunks' barriers complete for the (i / 3)-th time
    auto kbuf = [&](int i) -> u32 { return base + MR_K0 + (i % 3) * MR_LAT; };
    auto rbuf = [&](int i) -> u32 { return base + MR_R0 + (i & 1) * MLA_CHUNK; };
    auto bars = [&](int i) -> u32 { return base + MR_BAR + (i % 3) * 9 * 8; };
    auto parity = [&](int i) -> u32 { return (u32)((i / 3) & 1); };

    if (tid == 0) {
        for (int i = 0; i < 27; ++i) mbar_init(base + MR_BAR + 8 * i, 1);
        MrIssueArgs* a = reinterpret_cast<MrIssueArgs*>(smem + MR_ARGS);
        a->btab = btab;
        a->start = start;
        a->end = end;
        a->block_size = block_size;
        mbar_init_fence();
    }
    // Rows of the last tile that are never loaded (past `end`) must not hold NaN from whatever ran
    // on this SM before: P is 0 there, but 0 * NaN is NaN. A buffer that held an earlier tile
    // holds finite values, so only a first use needs the zeros.
    // (buffer 2 holds Q until warpgroup 0 has it in registers: its zeros come then, below)
    if ((end - start) % 64 != 0 && ntiles <= 2) {
        unsigned char* kb = smem + MR_K0 + ((ntiles - 1) % 3) * MR_LAT;
        for (int i = tid; i < MR_LAT / 16; i += 384) *reinterpret_cast<uint4*>(kb + i * 16) = make_uint4(0, 0, 0, 0);
        unsigned char* rb = smem + MR_R0 + ((ntiles - 1) & 1) * MLA_CHUNK;
        for (int i = tid; i < MLA_CHUNK / 16; i += 384) *reinterpret_cast<uint4*>(rb + i * 16) = make_uint4(0, 0, 0, 0);
    }
    // Q's rope columns (8 KB) stay in shared memory: in warpgroup 0's registers they would cost
    // 16 more than it can get beside the P.V warpgroups' 160
    for (int i = tid; i < 64 * (D_ROPE / 8); i += 384) {
        const int r = i / (D_ROPE / 8), col = (i % (D_ROPE / 8)) * 8;
        *reinterpret_cast<bf16x8*>(smem + MR_QR + wg_swz(r, col)) =
            load_q8(q_abs, q_pe, b, h0 + r, heads, D_LAT + col, qpe_sb, qpe_sh);
    }
    // Q's latent columns 0..15 (k-step 0) in the no-swizzle layout: core matrix (rows 8 mi..,
    // columns 8 ki..) at (2 mi + ki) x 128 bytes, rows 16 bytes apart. Read by S from here, so
    // warpgroup 0 holds 124 registers of Q, not 128: with 128 beside S's 32 ptxas spilled one
    // quad and serialised every wgmma (what the 2 KB of alignment slack this takes bought).
    if (tid < 128) {
        const int r = tid / 2, kh = tid % 2;
        *reinterpret_cast<bf16x8*>(smem + MR_Q0 + ((r / 8) * 2 + kh) * 128 + (r % 8) * 16) =
            load_q8(q_abs, q_pe, b, h0 + r, heads, 8 * kh, qpe_sb, qpe_sh);
    }
    // Q's latent columns staged in latent buffer 2 (its first tile is issued after warpgroup 0
    // has read them into registers), swizzled like the K chunks, so that warpgroup 0 takes its A
    // fragments with ldmatrix: 128 scattered 4-byte loads from global memory instead made ptxas
    // spill a quad of them, which then stayed in local memory through the loop
    load_q_latent_swz(smem + MR_K0 + 2 * MR_LAT, q_abs, q_pe, b, h0, heads, qpe_sb, qpe_sh);
    fence_async_smem();  // the zeros and Q (generic writes) before TMA writes and wgmma reads
    __syncthreads();
    const volatile MrIssueArgs* s_args = reinterpret_cast<const volatile MrIssueArgs*>(smem + MR_ARGS);
    auto issue = [&](int i) {
        const int* bt = s_args->btab;
        const int st = s_args->start, en = s_args->end, bs = s_args->block_size;
        const int t = st + 64 * i;
        // the rope chunk (c = 8) into its own buffer: tile_issue writes chunk c at dst + c * 8 KB
        tile_issue(rbuf(i) - 8 * MLA_CHUNK, bars(i), &cache_map, &cache_map64, bt, bs, t, en, 8, 9);
        tile_issue(kbuf(i), bars(i), &cache_map, &cache_map64, bt, bs, t, en, 0, 8);
    };
    if (tid == 0) {
        for (int i = 0; i < min(ntiles, 2); ++i) issue(i);  // tile 2's rope goes where tile 0's is
    }
    if (wg == 0) {
        mr_setmaxnreg_inc184();
        u32 rq[124];  // k-steps 1..31 (k-step 0 is read from shared memory, MR_Q0)
        {
            // lane l: row (l & 7) + 8 ((l >> 3) & 1), columns + 8 (l >> 4) of matrix l >> 3.
            // k-step 4 c + m reads 16-byte group (2 m + (l >> 4)) ^ (row & 7) = 2 m ^ y of the
            // row in chunk c: address (row_base | y << 4) ^ 32 m, + 8 KB c as an immediate, so
            // that four registers hold every address (ptxas hoisted 32 of them, and spilled Q)
            const int qr = wq * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
            const u32 row_base =
                (base + MR_K0 + 2 * MR_LAT + qr * 128) | (((lane >> 4) ^ (qr & 7)) << 4);
            ldsm_q_chunks<0>(rq, row_base);
            ldsm_q_chunks<1>(rq, row_base ^ 32);
            ldsm_q_chunks<2>(rq, row_base ^ 64);
            ldsm_q_chunks<3>(rq, row_base ^ 96);
            // buffer 2 is read: a last, partial tile 2 gets its zeros now (warpgroup 0 alone;
            // tile 2 is issued by its thread 0 after this)
            if ((end - start) % 64 != 0 && ntiles == 3) {
                named_sync(MR_NB_QREAD, 128);
                unsigned char* kb = smem + MR_K0 + 2 * MR_LAT;
                for (int i = tid; i < MR_LAT / 16; i += 128) *reinterpret_cast<uint4*>(kb + i * 16) = make_uint4(0, 0, 0, 0);
                fence_async_smem();
                named_sync(MR_NB_QREAD, 128);
            }
        }
        float s[32];
        // The running row maxima and sums live in shared memory (MR_M, MR_L; the quad's first
        // thread writes them), not in registers: during S this warpgroup holds Q (124) and S
        // (32) beside ptxas's own, with nothing to spare.
        const u32 m_addr = base + MR_M + 4 * r_lo, l_addr = base + MR_L + 4 * r_lo;
        if ((lane & 3) == 0) {
            st_shared_f32(m_addr, -INFINITY);
            st_shared_f32(m_addr + 32, -INFINITY);
            st_shared_f32(l_addr, 0.f);
            st_shared_f32(l_addr + 32, 0.f);
        }
        __syncwarp();
        for (int i = 0; i < ntiles; ++i) {
            if constexpr (PROBE == 2) {
                for (int c = 0; c < 9; ++c) mbar_wait_spin(bars(i) + c * 8, parity(i));
                if (i >= 1) named_sync(MR_NB_PFREE, 384);
                named_arrive(MR_NB_PREADY, 384);
                if (i == 0 && ntiles > 2) named_sync(MR_NB_QREAD, 128);
                if (tid == 0 && i + 2 < ntiles) issue(i + 2);
                continue;
            }
            tile_qk_regs(s, rq, base + MR_QR, base + MR_Q0, kbuf(i), rbuf(i), bars(i), parity(i), PROBE != 1 || i < 3);
            wg_wait<0>();
            wg_fence_regs<32>(s);
            // Softmax on the raw scores, each value read where the MMA left it and packed to
            // bf16 as soon as it is exponentiated: scaled copies of all 32 in other registers
            // (what tile_rowmax / tile_exp do) are 32 registers this warpgroup has not got.
            // >= 1; columns at or past it are masked. From shared memory (and the scale from the
            // constant bank, not premultiplied): none of it then holds a register through S.
            const int valid = mr_split_tokens(base) - 64 * i;
            float mx[2] = {-INFINITY, -INFINITY}, alpha[2], sum[2] = {0.f, 0.f}, m_new[2];
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int x = 0; x < 4; ++x)
                    mx[x >> 1] = fmaxf(mx[x >> 1], 8 * j + cq + (x & 1) < valid ? s[4 * j + x] : -INFINITY);
#pragma unroll
            for (int hlf = 0; hlf < 2; ++hlf) {
                mx[hlf] = fmaxf(mx[hlf], __shfl_xor_sync(0xffffffffu, mx[hlf], 1));
                mx[hlf] = fmaxf(mx[hlf], __shfl_xor_sync(0xffffffffu, mx[hlf], 2));
                const float m_old = ld_shared_f32(m_addr + 32 * hlf);
                m_new[hlf] = fmaxf(m_old, mx[hlf] * scale * MR_LOG2E);  // finite: token 0 is valid
                alpha[hlf] = exp2f(m_old - m_new[hlf]);   // 0 on the first tile
            }
            if (i >= 1) named_sync(MR_NB_PFREE, 384);  // P.V of tile i - 1 is done with P and alpha
            // P as bf16 pairs, 16 columns (one stmatrix x4) at a time: all 64 columns packed
            // first would hold 16 registers more through the softmax
            const u32 p_row = p_row_addr(base + MR_P, wq, lane);
            p_store16<0>(p_row, s, valid, cq, scale, m_new, sum);
            p_store16<1>(p_row, s, valid, cq, scale, m_new, sum);
            p_store16<2>(p_row, s, valid, cq, scale, m_new, sum);
            p_store16<3>(p_row, s, valid, cq, scale, m_new, sum);
#pragma unroll
            for (int hlf = 0; hlf < 2; ++hlf) {
                sum[hlf] += __shfl_xor_sync(0xffffffffu, sum[hlf], 1);
                sum[hlf] += __shfl_xor_sync(0xffffffffu, sum[hlf], 2);
                sum[hlf] += ld_shared_f32(l_addr + 32 * hlf) * alpha[hlf];
            }
            __syncwarp();  // every lane has read the row state before the quad leaders write it
            if ((lane & 3) == 0) {  // shared addresses: a generic pointer would hold 2 registers
#pragma unroll
                for (int hlf = 0; hlf < 2; ++hlf) {
                    st_shared_f32(base + MR_ALPHA + 4 * (r_lo + 8 * hlf), alpha[hlf]);
                    st_shared_f32(m_addr + 32 * hlf, m_new[hlf]);
                    st_shared_f32(l_addr + 32 * hlf, sum[hlf]);
                }
            }
            fence_async_smem();
            named_arrive(MR_NB_PREADY, 384);
            // Tile i + 2 goes into tile i - 1's latent buffer (P.V of tile i - 1 is done: the
            // sync above; unused before tile 2) and tile i's rope buffer (S of tile i is done).
            // Here rather than in the last warpgroup to finish P.V, so that the P.V warpgroups
            // hold no copy state (their registers are O's).
            // (tile 2 overwrites Q's staging copy in buffer 2: every warp of this warpgroup has
            // it in registers once all four are past their first S)
            if (i == 0 && ntiles > 2) named_sync(MR_NB_QREAD, 128);
            if (tid == 0 && i + 2 < (PROBE == 1 ? min(ntiles, 3) : ntiles)) issue(i + 2);
        }
        if (splits > 1 && (lane & 3) == 0) {
            // the block indices again, not the prologue's copies (see mr_store_rows)
            u32 hg2, b2, split2;
            asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(hg2));
            asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(b2));
            asm volatile("mov.u32 %0, %%ctaid.z;" : "=r"(split2));
#pragma unroll
            for (int hlf = 0; hlf < 2; ++hlf) {
                const int h = (int)hg2 * 64 + r_lo + 8 * hlf;
                const float l = ld_shared_f32(l_addr + 32 * hlf), m = ld_shared_f32(m_addr + 32 * hlf);
                if (h < heads)
                    lse[((size_t)b2 * splits + split2) * heads + h] =
                        l > 0.f ? (m + log2f(l)) * 0.6931471805599453f : -INFINITY;
            }
        }
        __syncthreads();
    } else {
        mr_setmaxnreg_dec160();
        // Everything this warpgroup needs, derived again here (special registers, the shared
        // memory symbol, the copies' arguments) rather than taken from the prologue: a value live
        // across the branch keeps the register number the prologue gave it, and one of them at
        // R22 pushed O's 128 accumulators to R24..R151, past a 152-register budget.
        u32 tid2, base2;
        asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid2));
        asm volatile("mov.u32 %0, mr_smem_raw;" : "=r"(base2));
        const int half = (int)(tid2 / 128) - 1;  // latent columns 256 half ..
        const int pv_lane = tid2 % WARP;
        const int pv_rlo = ((tid2 % 128) / WARP) * 16 + pv_lane / 4, pv_cq = (pv_lane % 4) * 2;
        const int pv_ntiles = (mr_split_tokens(base2) + 63) / 64;
        float o[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] = 0.f;
        // descriptors built once and stepped: ptxas keeps every loop-invariant descriptor of
        // an unrolled loop in registers otherwise, and these warpgroups' registers are O's
        const u64 dp = wg_desc(base2 + MR_P, 16, 1024);
        u64 dv = wg_desc(base2 + MR_K0 + 4 * half * MLA_CHUNK, MLA_CHUNK, 1024);
        for (int i = 0; i < pv_ntiles; ++i) {
            named_sync(MR_NB_PREADY, 384);
            if constexpr (PROBE == 2) {
                if (i + 1 < pv_ntiles) named_arrive(MR_NB_PFREE, 384);
                continue;
            }
            scale_o_rows(o, ld_shared_f32(base2 + MR_ALPHA + 4 * pv_rlo), ld_shared_f32(base2 + MR_ALPHA + 4 * (pv_rlo + 8)));
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
                wgmma_m64n256_ss_tn(o, dp + 2 * kk, dv + 128 * kk, 1);  // +32 B of P, +16 rows of V
            wg_commit();
            wg_wait<0>();
            wg_fence_regs<128>(o);
            dv = (i % 3 == 2) ? dv - 2 * (MR_LAT >> 4) : dv + (MR_LAT >> 4);
            if (i + 1 < pv_ntiles) named_arrive(MR_NB_PFREE, 384);  // warpgroup 0 syncs before each later P
        }
        __syncthreads();  // warpgroup 0's row sums are in; every tile buffer is free
        // O / l into shared memory as f32 rows of MR_OROW floats (the tile buffers): the stores
        // to global memory below are then whole rows from all 384 threads, and these
        // warpgroups need no output indexing (registers) beside O
#pragma unroll
        for (int hlf = 0; hlf < 2; ++hlf) {
            const int row = pv_rlo + 8 * hlf;
            const float l = ld_shared_f32(base2 + MR_L + 4 * row);
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const u32 dst = base2 + MR_K0 + 4 * (row * MR_OROW + 256 * half + pv_cq);
#pragma unroll
            for (int j = 0; j < 32; ++j)
                asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(dst + 32 * j), "f"(o[4 * j + 2 * hlf] * inv),
                             "f"(o[4 * j + 2 * hlf + 1] * inv)
                             : "memory");
        }
    }
    __syncthreads();
    mr_store_rows(smem, out, o_part, splits, heads);
}

// Same outputs and arguments as mla_decode_tma_bf16: grid (ceil(H/64), B, splits), 384 threads,
// MR_BYTES bytes of dynamic shared memory; splits cut at 64 tokens; the cache read through
// `cache_map` (a 2-D tensor map [slots, 576] bf16, box {64, min(block_size, 64)}, 128-byte swizzle).
// (Written out, not by a macro: the host finds kernel names in this text, device::kernel_names.)
extern "C" __global__ void __launch_bounds__(384, 1)
mla_decode_roles_bf16(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe,
                      const int* __restrict__ block_table, const int* __restrict__ seq_lens, bf16* __restrict__ out,
                      float* __restrict__ o_part, float* __restrict__ lse, int heads, int block_size, int max_blocks,
                      int splits, float scale, long long qpe_sb, long long qpe_sh,
                      const __grid_constant__ TmaMap cache_map, const __grid_constant__ TmaMap cache_map64) {
    griddep_wait();
    roles_decode<0>(q_abs, q_pe, block_table, seq_lens, out, o_part, lse, heads, block_size, max_blocks, splits, scale,
                    qpe_sb, qpe_sh, cache_map, cache_map64);
}

// Timing probes of it (wrong outputs): the math alone, the loads alone.
extern "C" __global__ void __launch_bounds__(384, 1)
mla_decode_roles_probe1_bf16(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe,
                             const int* __restrict__ block_table, const int* __restrict__ seq_lens,
                             bf16* __restrict__ out, float* __restrict__ o_part, float* __restrict__ lse, int heads,
                             int block_size, int max_blocks, int splits, float scale, long long qpe_sb,
                             long long qpe_sh, const __grid_constant__ TmaMap cache_map, const __grid_constant__ TmaMap cache_map64) {
    griddep_wait();
    roles_decode<1>(q_abs, q_pe, block_table, seq_lens, out, o_part, lse, heads, block_size, max_blocks, splits, scale,
                    qpe_sb, qpe_sh, cache_map, cache_map64);
}
extern "C" __global__ void __launch_bounds__(384, 1)
mla_decode_roles_probe2_bf16(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe,
                             const int* __restrict__ block_table, const int* __restrict__ seq_lens,
                             bf16* __restrict__ out, float* __restrict__ o_part, float* __restrict__ lse, int heads,
                             int block_size, int max_blocks, int splits, float scale, long long qpe_sb,
                             long long qpe_sh, const __grid_constant__ TmaMap cache_map, const __grid_constant__ TmaMap cache_map64) {
    griddep_wait();
    roles_decode<2>(q_abs, q_pe, block_table, seq_lens, out, o_part, lse, heads, block_size, max_blocks, splits, scale,
                    qpe_sb, qpe_sh, cache_map, cache_map64);
}
