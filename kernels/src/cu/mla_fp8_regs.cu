// mla_fp8_regs.cu: MLA decode over the FP8 (e4m3) latent cache with the codes converted in
// registers, never written back to shared memory as bf16.
//
// Why a second FP8 kernel (mla_fp8.cu's mla_decode_fp8 ran at 0.64-0.68x the bf16 kernel's
// tokens/s, bench/RESULTS.md session 10 run 2): wgmma reads a shared-memory operand as 16-bit
// values, so that kernel converts every tile's codes into a bf16 tile in shared memory. That
// moves 3 bytes through the shared-memory port for every code byte (read the codes, write the
// bf16 copy, wgmma reads it again), on warpgroup 0's critical path, with one tile in flight.
// Here the cache tile is always the A operand, which wgmma takes from registers:
//   S^T[64 tokens x 32 heads] = K . Q^T     (each math warpgroup 32 of the CTA's 64 heads; A =
//                                           the tile's codes, cvt'd to f16 in registers; B = Q,
//                                           f16, from shared memory)
//   O^T[256 latent x 64 heads] += V^T . P'^T (each math warpgroup 256 of the 512 latent columns;
//                                           A = the same codes, read transposed by ldmatrix and
//                                           cvt'd to f16; B = P', f16, in shared memory)
// f16 rather than bf16: `cvt.rn.f16x2.e4m3x2` converts two codes in one instruction (e4m3 values
// are exact in f16); Q is scaled by a power of two so that f16 holds it (its 11-bit significand
// keeps every bit of the bf16 query), and P' <= 1 (below).
//
// The token's scale: S = scale_t * (codes . q_abs) + k_pe . q_pe, applied to S^T's rows in f32.
// In P . V it is folded into P: P'_t = exp2(x_t - m) * scale_t with x_t the scaled score (log2
// units) and m the running maximum of x_t + log2(scale_t), so P' <= 1 and f16 keeps its
// precision whatever the scales; the softmax sum l = sum_t exp2(x_t - m) (f32) is kept against
// the same m, and out = O / l. (mla_fp8.cu keeps m of x_t alone; P = p * scale_t is fine in
// bf16's range but not in f16's.)
//
// A CTA owns one sequence, 64 heads and one context split (grid as mla_decode_fp8), 384 threads:
//   warpgroups 0, 1 (240 registers each): the math above, in lock step once a tile (P' of all
//       64 heads is needed by both P . V halves);
//   warpgroup 2 (24 registers): one thread issues every tile's TMA copies (4 code chunks of
//       64 tokens x 128 B, the rope chunk, the scales) into a ring of 3 stages guarded by
//       mbarriers; a stage goes back to it once both math warpgroups have read it into
//       registers (the last reads are P . V's ldmatrix), before their P . V has finished.
//
// Layouts (all 128-byte swizzled chunks of 64 rows x 128 B unless said, as wg_swz):
//   stage: codes chunk c (columns 128 c .. 128 c + 127) at 8 KiB c, rows = tokens (TMA writes
//       the swizzle); the rope chunk (bf16 k_pe) at 32 KiB; 64 x 16 B of scales (no swizzle,
//       the f32 in each row's first 4 bytes) at 40 KiB. 41 KiB a stage.
//   Q: f16 latent columns in 8 chunks, rows = heads, the columns permuted (S^T's k order
//       below); the bf16 rope columns in a ninth chunk.
//   P': two buffers, f16, rows = heads, columns = the tile's 64 tokens.
// S^T's k order: the A fragment of an m64nNk16 wants (row g; k 2t, 2t+1) and (row g; k 2t+8,
// 2t+9) in one thread. One 16-byte load of a token row at latent columns 64 c + 16 t .. + 15
// gives a thread the codes of k-steps 4 c .. 4 c + 3: k-step 4 c + j takes columns 64 c + 16 t +
// 4 j + {0, 1} as k = 2t, 2t+1 and + {2, 3} as k = 2t+8, 2t+9. Q (the B operand) is stored in the
// same k order, so the sum over k is the same sum.
// O^T's row order: ldmatrix.trans of an 8-token x 16-code block (8 x 8 b16) gives a thread the
// codes of latent columns 2 g, 2 g + 1 at tokens 2 t, 2 t + 1; a byte permute makes the pairs
// (column 2 g; tokens 2t, 2t+1) and (column 2 g + 1; same tokens): A rows g and g + 8 of the
// warp's 16 rows. So O^T's row g of warp w, m-block mb is latent column 256 wg + 64 mb + 16 w +
// 2 g, row g + 8 the column after it, and the output writes column pairs.
//
// Cache invariant the kernel relies on (as the bf16 TMA kernels do): rows of a loaded block past
// the sequence's end hold finite codes (the cache is allocated zeroed and only the quantizer,
// which saturates, writes it). Their scores are masked, but P' = 0 times a NaN code would not be
// 0. Stage rows never loaded are zeroed before their first use.
#include "common.cuh"
#include "mla_common.cuh"
#include "mma.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#define FR_ROW 656          // bytes a cached token: 512 codes | 64 bf16 k_pe | f32 scale | pad
#define FR_PE 512
#define FR_SC 640
#define FR_TN 64            // tokens a tile
#define FR_CHUNK 8192
#define FR_STAGES 3
#define FR_ST_ROPE (4 * FR_CHUNK)
#define FR_ST_SCL (5 * FR_CHUNK)
#define FR_STAGE (5 * FR_CHUNK + 1024)
#define FR_Q 0                                   // 8 chunks of f16 latent + 1 chunk of bf16 rope
#define FR_QPE (8 * FR_CHUNK)
#define FR_ST0 (9 * FR_CHUNK)
#define FR_P (FR_ST0 + FR_STAGES * FR_STAGE)      // two P' buffers
#define FR_RED (FR_P + 2 * FR_CHUNK)              // float [2 wg][4 warps][32 heads]
#define FR_ALPHA (FR_RED + 1024)                  // float [2 tiles][64 heads]: O's rescale
#define FR_LM (FR_ALPHA + 512)                    // float l[64], m[64] at the end
#define FR_QAMAX (FR_LM + 512)                    // float [12 warps]: Q's |max|
#define FR_BAR (FR_QAMAX + 64)                    // u64 full[3], empty[3]
#define FR_BYTES (FR_BAR + 64)
#define FR_LOG2E 1.4426950408889634f
#define FR_MIN_LOG2_SCALE -60.f                   // a zero row's scale, in log2 (finite m)

// named barriers: 1 + wg: warpgroup wg's 4 warps (column maxima); 3: both math warpgroups;
// 4 + wg: warpgroup wg's turn (the PP form)
#define FR_NB_WG 1
#define FR_NB_MATH 3
#define FR_NB_TURN 4  // 4, 5: warpgroup 0's, 1's turn at the tensor cores (mla_decode_fp8_pp)

__device__ __forceinline__ void fr_setmaxnreg_inc240() { asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory"); }
__device__ __forceinline__ void fr_setmaxnreg_dec24() { asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory"); }

// Two f32 to an f16x2 (lo in bits 0..15), round to nearest.
__device__ __forceinline__ u32 f16x2_pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// The four e4m3 codes of x (byte 0 lowest) as two f16x2: lo = codes 0, 1; hi = codes 2, 3 (the
// lower byte of each pair in the lower half). Exact.
__device__ __forceinline__ void f8x4_to_f16x2x2(u32 x, u32& lo, u32& hi) {
    asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.rn.f16x2.e4m3x2 %0, l;\ncvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
        : "=r"(lo), "=r"(hi)
        : "r"(x));
}

__device__ __forceinline__ uint4 fr_lds128(u32 addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
    return v;
}

// Issue tile [t0, t0 + 64)'s copies into stage `st` (one thread): per contiguous piece of
// min(block_size, 64) cache rows, the 4 code chunks and the rope chunk (map: box 128 B x piece,
// 128-byte swizzle) and the scales (scl_map: box 16 B x piece). Pieces at or past `end` are not
// loaded; a tile wholly past `end` only arrives.
// A whole tile in consecutive cache blocks (tile_contiguous) goes in one 64-row box each through
// map64 / scl_map64 (the 64-row boxes of the same two tensors), as the bf16 kernels' tile_issue.
__device__ __forceinline__ void fr_issue(u32 st, u32 bar, const TmaMap* map, const TmaMap* scl_map,
                                         const TmaMap* map64, const TmaMap* scl_map64,
                                         const int* __restrict__ btab, int block_size, int t0, int end) {
    const int piece = min(block_size, FR_TN);
    const int valid = t0 < end ? min(FR_TN, end - t0) : 0;
    const int pieces = (valid + piece - 1) / piece;
    if (pieces == 0) {
        mbar_arrive(bar);
        return;
    }
    mbar_arrive_expect_tx(bar, (u32)(pieces * piece * (5 * 128 + 16)));
    if (tile_contiguous(btab, block_size, t0, end)) {
        const int row = btab[t0 / block_size] * block_size;
#pragma unroll
        for (int c = 0; c < 4; ++c) tma_load_2d(st + c * FR_CHUNK, map64, c * 128, row, bar);
        tma_load_2d(st + FR_ST_ROPE, map64, FR_PE, row, bar);
        tma_load_2d(st + FR_ST_SCL, scl_map64, FR_SC, row, bar);
        return;
    }
    for (int j = 0; j < pieces; ++j) {
        const int t = t0 + j * piece;
        const int row = btab[t / block_size] * block_size + (t % block_size);
#pragma unroll
        for (int c = 0; c < 4; ++c) tma_load_2d(st + c * FR_CHUNK + j * piece * 128, map, c * 128, row, bar);
        tma_load_2d(st + FR_ST_ROPE + j * piece * 128, map, FR_PE, row, bar);
        tma_load_2d(st + FR_ST_SCL + j * piece * 16, scl_map, FR_SC, row, bar);
    }
}

// m64n32k16, f32 += f16 x f16 (F16) or bf16 x bf16, A from registers, B K-major in shared memory.
// scale_d = 0: d = A . B (the accumulator's old values ignored).
template <bool F16>
__device__ __forceinline__ void fr_wgmma_m64n32_rs(float* d, const u32* a, u64 db, int scale_d) {
    if constexpr (F16) {
        asm volatile(
            "{\n.reg .pred p;\n"
            "setp.ne.b32 p, %21, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {"
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
            "}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
              "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
    } else {
        asm volatile(
            "{\n.reg .pred p;\n"
            "setp.ne.b32 p, %21, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
            "}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
              "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
    }
}

// m64n64k16, f32 += f16 x f16, A from registers, B K-major in shared memory.
__device__ __forceinline__ void fr_wgmma_m64n64_rs_f16(float* d, const u32* a, u64 db) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, {%32, %33, %34, %35}, %36, 1, 1, 1, 0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

// Q into shared memory by all 12 warps: the latent columns as f16 times 2^e (e from the CTA's
// largest |q_abs|, so that it lands in [2^14, 2^15)), in S^T's k order; the rope columns as
// they are (bf16). Returns 2^-e (every thread). Rows past `heads` are zeros.
__device__ __forceinline__ float fr_stage_q(unsigned char* smem, const bf16* __restrict__ q_abs,
                                            const bf16* __restrict__ q_pe, int b, int h0, int heads,
                                            long long qpe_sb, long long qpe_sh) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    float* qamax = reinterpret_cast<float*>(smem + FR_QAMAX);
    // lane l of a row holds latent columns 16 l .. 16 l + 15: the c = l / 4, t = l % 4 block
    float amax = 0.f;
    for (int r = warp; r < 64; r += 12) {
        if (h0 + r >= heads) continue;
        const bf16* src = q_abs + ((size_t)b * heads + h0 + r) * D_LAT + 16 * lane;
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const bf16x8 v = *reinterpret_cast<const bf16x8*>(src + 8 * k);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float2 f = __bfloat1622float2(v.v[i]);
                amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (lane == 0) qamax[warp] = amax;
    __syncthreads();
    amax = 0.f;
#pragma unroll
    for (int w = 0; w < 12; ++w) amax = fmaxf(amax, qamax[w]);
    // amax * 2^e in [2^14, 2^15): f16's largest finite value is 65504 < 2^16
    const int e = amax > 0.f ? min(max(14 - ilogbf(amax), -100), 100) : 0;
    const float up = exp2f((float)e);
    const int c = lane / 4, t = lane % 4;
    for (int r = warp; r < 64; r += 12) {
        const bool live = h0 + r < heads;
        const bf16* src = q_abs + ((size_t)b * heads + h0 + r) * D_LAT + 16 * lane;
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            bf16x8 v;
            if (live) v = *reinterpret_cast<const bf16x8*>(src + 8 * k);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                // physical columns 64 c + 16 t + 8 k + 2 i, + 1: j = 2 k + i / 2, upper = i % 2
                const float2 f = live ? __bfloat1622float2(v.v[i]) : make_float2(0.f, 0.f);
                const int j = 2 * k + i / 2, upper = i % 2;
                const int L = 64 * c + 16 * j + 8 * upper + 2 * t;  // logical column
                *reinterpret_cast<u32*>(smem + FR_Q + wg_swz(r, L)) = f16x2_pack(f.x * up, f.y * up);
            }
        }
    }
    // the rope columns: 8 lanes a row
    for (int i = threadIdx.x; i < 64 * 8; i += blockDim.x) {
        const int r = i / 8, col = (i % 8) * 8;
        const bf16x8 v = load_q8(q_abs, q_pe, b, h0 + r, heads, D_LAT + col, qpe_sb, qpe_sh);
        *reinterpret_cast<bf16x8*>(smem + FR_QPE + wg_swz(r, col)) = v;
    }
    return exp2f((float)-e);
}

// grid (ceil(H / 64), B, splits), 384 threads, FR_BYTES + 1024 bytes of dynamic shared memory.
// Arguments as mla_decode_fp8 without the cache pointer; the cache [slots, 656] bytes is read
// through cache_map (box 128 B x min(block_size, 64) rows, 128-byte swizzle) and scale_map
// (box 16 B x the same rows, no swizzle), and cache_map64 / scale_map64 (the same with 64-row
// boxes). block_size is 8..64 dividing 64 or a multiple of
// 64 (TMA wants 128-byte aligned boxes in shared memory; 1024 for the swizzled ones).
// The kernel body. PP = false (mla_decode_fp8_regs): the two math warpgroups share the tile's
// P' (each computes S^T for its 32 heads, then P' . V for its 256 latent columns over all 64
// heads) and meet at a barrier of both every tile. PP = true (mla_decode_fp8_pp): each math
// warpgroup owns its 32 heads end to end (S^T, softmax, and P' . V over all 512 latent
// columns, O^T 512 x 32), so nothing ties the two but the stages, and they take turns at the
// tensor cores (two named barriers): one's softmax and conversions run while the other's MMAs
// hold the tensor cores. Why: the shared form runs S^T, the softmax, both barriers and P' . V one
// after another with both warpgroups in the same phase; at 64 heads, batch 128 x 4096 (bytes
// bound) it ran level with the bf16 kernel (0.229 against 0.223 ms, bench/RESULTS.md session
// 20) where the FP8 bytes allow half. The cost: each warpgroup converts the whole tile for P . V
// (twice the shared form's conversions there) and its P . V is m64n32 (N = its 32 heads).
template <bool PP>
__device__ __forceinline__ void fr_decode(const bf16* __restrict__ q_abs, const bf16* __restrict__ q_pe,
                                          const int* __restrict__ block_table, const int* __restrict__ seq_lens,
                                          bf16* __restrict__ out, float* __restrict__ o_part, float* __restrict__ lse,
                                          int heads, int block_size, int max_blocks, int splits, float scale,
                                          long long qpe_sb, long long qpe_sh, const TmaMap* cache_map,
                                          const TmaMap* scale_map, const TmaMap* cache_map64,
                                          const TmaMap* scale_map64) {
    extern __shared__ __align__(1024) unsigned char fr_smem_raw[];
    unsigned char* smem =
        reinterpret_cast<unsigned char*>((reinterpret_cast<size_t>(fr_smem_raw) + 1023) & ~(size_t)1023);
    const u32 sbase = smem_addr(smem);
    const u32 bar_full = sbase + FR_BAR, bar_empty = bar_full + FR_STAGES * 8;

    const int hg = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
    const int tid = threadIdx.x, wg = tid / 128;
    const int h0 = hg * 64;
    const int len = seq_lens[b];
    const int per = split_tokens(len, splits, FR_TN);
    const int start = split * per;
    const int end = min(len, start + per);
    const int* btab = block_table + (size_t)b * max_blocks;
    if (splits > 1 && start >= len) {
        empty_split(lse, b, split, splits, heads, h0);
        return;
    }
    const int ntiles = end > start ? (end - start + FR_TN - 1) / FR_TN : 0;

    if (tid == 0) {
        for (int s = 0; s < FR_STAGES; ++s) {
            mbar_init(bar_full + 8 * s, 1);
            mbar_init(bar_empty + 8 * s, 8);  // lane 0 of each math warp
        }
        mbar_init_fence();
    }
    // a partial last tile in a stage never used before: zero the stage (rows it does not load
    // must hold finite codes)
    const int last = ntiles - 1;
    if (last >= 0 && last < FR_STAGES && end - (start + last * FR_TN) < FR_TN) {
        uint4* z = reinterpret_cast<uint4*>(smem + FR_ST0 + last * FR_STAGE);
        for (int i = tid; i < FR_STAGE / 16; i += blockDim.x) z[i] = make_uint4(0u, 0u, 0u, 0u);
    }
    const float qdescale = fr_stage_q(smem, q_abs, q_pe, b, h0, heads, qpe_sb, qpe_sh);
    fence_async_smem();  // Q and the zeroed stage: generic writes, read by wgmma / overwritten by TMA
    __syncthreads();

    if (wg == 2) {
        fr_setmaxnreg_dec24();
        if (tid == 256) {
            for (int it = 0; it < ntiles; ++it) {
                const int s = it % FR_STAGES;
                if (it >= FR_STAGES) mbar_wait_thread(bar_empty + 8 * s, ((it / FR_STAGES) - 1) & 1);
                fr_issue(sbase + FR_ST0 + s * FR_STAGE, bar_full + 8 * s, cache_map, scale_map, cache_map64,
                         scale_map64, btab, block_size,
                         start + it * FR_TN, end);
            }
        }
        return;
    }
    fr_setmaxnreg_inc240();

    const int lane = tid % WARP, w = (tid % 128) / WARP, g = lane / 4, t = lane % 4;
    const float sl2 = scale * FR_LOG2E;
    float* red = reinterpret_cast<float*>(smem + FR_RED);
    float* alpha_s = reinterpret_cast<float*>(smem + FR_ALPHA);
    const u32 q_lat = sbase + FR_Q + wg * 32 * 128;    // this warpgroup's 32 heads: B rows
    const u32 q_rope = sbase + FR_QPE + wg * 32 * 128;

    // O^T: PP, 8 m-blocks of 64 latent columns x this warpgroup's 32 heads (m64n32); else 4 of
    // this warpgroup's 256 columns x all 64 heads (m64n64)
    constexpr int MB = PP ? 8 : 4, ON = PP ? 16 : 32;
    float o[MB][ON];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int i = 0; i < ON; ++i) o[mb][i] = 0.f;
    // PP: the turns at the tensor cores (named barriers FR_NB_TURN + wg); warpgroup 0 goes first,
    // and warpgroup 1 does not hand over after its very last burst (nobody would take it)
    const int turn_mine = FR_NB_TURN + wg, turn_other = FR_NB_TURN + 1 - wg;
    if (PP && wg == 1 && ntiles > 0) named_arrive(FR_NB_TURN, 256);
    auto turn_take = [&]() {
        if (PP) named_sync(turn_mine, 256);
    };
    auto turn_give = [&](bool last_burst) {
        if (PP && !(wg == 1 && last_burst)) named_arrive(turn_other, 256);
    };
    // this thread's 8 heads of S^T (32 wg + 8 j + 2 t + e, index 2 j + e): running max, sum
    float m_run[8], l_part[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        m_run[k] = -INFINITY;
        l_part[k] = 0.f;
    }
    const int row0 = 16 * w + g;  // S^T rows (tokens) of this thread: row0, row0 + 8

    for (int it = 0; it < ntiles; ++it) {
        const int s = it % FR_STAGES;
        const int t0 = start + it * FR_TN;
        const u32 st = sbase + FR_ST0 + s * FR_STAGE;
        mbar_wait(bar_full + 8 * s, (it / FR_STAGES) & 1);

        // ---- S^T = K . Q^T: the rope part (bf16) and the latent part (f16) apart
        float s_lat[16], s_rope[16];
        turn_take();
        {
            u32 ra[16];
            // ldmatrix x4: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
            // (rows 8-15, k 8-15) of k-step ks; lane l addresses matrix l / 8, row l % 8
            const int mi = lane / 8, r = 16 * w + (lane % 8) + (mi & 1) * 8;
#pragma unroll
            for (int ks = 0; ks < 4; ++ks) ldsm_x4_at(ra + 4 * ks, st + FR_ST_ROPE + swz_piece(r, 2 * ks + (mi >> 1)));
            wg_fence();
#pragma unroll
            for (int ks = 0; ks < 4; ++ks)
                fr_wgmma_m64n32_rs<false>(s_rope, ra + 4 * ks, wg_desc(q_rope + ks * 32, 16, 1024), ks > 0);
        }
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            // the codes of k-steps 4 c .. 4 c + 3 for rows row0 and row0 + 8
            const int piece = (c & 1) * 4 + t;
            const uint4 c0 = fr_lds128(st + (c >> 1) * FR_CHUNK + swz_piece(row0, piece));
            const uint4 c1 = fr_lds128(st + (c >> 1) * FR_CHUNK + swz_piece(row0 + 8, piece));
            u32 a[16];
            const u32 w0[4] = {c0.x, c0.y, c0.z, c0.w}, w1[4] = {c1.x, c1.y, c1.z, c1.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                f8x4_to_f16x2x2(w0[j], a[4 * j], a[4 * j + 2]);
                f8x4_to_f16x2x2(w1[j], a[4 * j + 1], a[4 * j + 3]);
            }
            wg_fence();
#pragma unroll
            for (int j = 0; j < 4; ++j)
                fr_wgmma_m64n32_rs<true>(s_lat, a + 4 * j, wg_desc(q_lat + c * FR_CHUNK + j * 32, 16, 1024),
                                         c > 0 || j > 0);
            wg_commit();
            // the registers of chunk c - 1 are free for chunk c + 1 (and the tile before's P . V done)
            wg_wait<1>();
        }
        turn_give(false);
        wg_wait0();  // S^T done (and this warpgroup's P' . V of the tile before)
        wg_fence_regs<16>(s_lat);
        wg_fence_regs<16>(s_rope);
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) wg_fence_regs<ON>(o[mb]);

        // ---- scores; column (head) maxima of x + log2(scale) over the tile's 64 tokens
        const float* scl = reinterpret_cast<const float*>(smem + FR_ST0 + s * FR_STAGE + FR_ST_SCL);
        const bool v0 = t0 + row0 < end, v1 = t0 + row0 + 8 < end;
        // a masked row's P' is 0 * scale: its scale (whatever the stage held) must not be a NaN
        const float sc0 = v0 ? scl[4 * row0] : 0.f, sc1 = v1 ? scl[4 * (row0 + 8)] : 0.f;
        const float ls0 = log2f(fmaxf(sc0, exp2f(FR_MIN_LOG2_SCALE)));
        const float ls1 = log2f(fmaxf(sc1, exp2f(FR_MIN_LOG2_SCALE)));
        float cmax[8];
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                const bool lo = x < 2;
                const float v = (lo ? v0 : v1)
                                    ? (s_lat[4 * j + x] * qdescale * (lo ? sc0 : sc1) + s_rope[4 * j + x]) * sl2
                                    : -INFINITY;
                s_lat[4 * j + x] = v;
                const float y = v + (lo ? ls0 : ls1);
                const int k = 2 * j + (x & 1);
                cmax[k] = lo ? y : fmaxf(cmax[k], y);
            }
        col_max_warp<8>(cmax);
        col_store<8>(red + (wg * 4 + w) * 32, cmax);
        named_sync(FR_NB_WG + wg, 128);
        float alpha[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int col = 8 * (k / 2) + 2 * t + (k & 1);
            float mx = m_run[k];
#pragma unroll
            for (int ww = 0; ww < 4; ++ww) mx = fmaxf(mx, red[(wg * 4 + ww) * 32 + col]);
            // finite: token t0 is valid, so every column has a finite entry
            alpha[k] = exp2f(m_run[k] - mx);  // 0 on the first tile
            m_run[k] = mx;
            l_part[k] *= alpha[k];
        }
        if (!PP && w == 0 && g == 0) {
#pragma unroll
            for (int k = 0; k < 8; ++k) alpha_s[(it & 1) * 64 + 32 * wg + 8 * (k / 2) + 2 * t + (k & 1)] = alpha[k];
        }
        // P'[row][col] = exp2(x - m) * scale_row (<= 1); l += exp2(x - m)
        u32 pp[8];  // f16x2 (row half hf, n8 block j): index 2 j + hf
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const float sc = hf ? sc1 : sc0;
                const float e0 = exp2f(s_lat[4 * j + 2 * hf] - m_run[2 * j]);
                const float e1 = exp2f(s_lat[4 * j + 2 * hf + 1] - m_run[2 * j + 1]);
                l_part[2 * j] += e0;
                l_part[2 * j + 1] += e1;
                pp[2 * j + hf] = f16x2_pack(e0 * sc, e1 * sc);
            }
        // stmatrix.trans: matrix (j, hf) is tokens 16 w + 8 hf + 0..7 x heads 8 j + 0..7 of this
        // warpgroup's 32; stored transposed, as rows of P' (heads) of 8 tokens (16 B)
        const u32 pbuf = sbase + FR_P + (it & 1) * FR_CHUNK;
        {
            const int mi = lane / 8, c = lane % 8;
#pragma unroll
            for (int jp = 0; jp < 2; ++jp) {
                const int j = 2 * jp + mi / 2, hf = mi & 1;
                const int head = 32 * wg + 8 * j + c;
                stsm_x4_t_at(pbuf + swz_piece(head, 2 * w + hf), pp[4 * jp], pp[4 * jp + 1], pp[4 * jp + 2],
                             pp[4 * jp + 3]);
            }
        }
        fence_async_smem();
        if (PP) named_sync(FR_NB_WG + wg, 128);  // P' of this warpgroup's 32 heads written
        else named_sync(FR_NB_MATH, 256);        // P' and the rescale of all 64 heads written

        // ---- O^T[256 latent of this warpgroup x 64 heads] = O^T * alpha + V^T . P'^T
        // (PP: this thread's O^T columns are its own S^T columns, whose alpha it computed)
        float al[16];  // alpha of heads 8 j + 2 t + e, index 2 j + e
#pragma unroll
        for (int j = 0; j < ON / 4; ++j) {
            al[2 * j] = PP ? alpha[2 * j] : alpha_s[(it & 1) * 64 + 8 * j + 2 * t];
            al[2 * j + 1] = PP ? alpha[2 * j + 1] : alpha_s[(it & 1) * 64 + 8 * j + 2 * t + 1];
        }
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
            for (int j = 0; j < ON / 4; ++j)
#pragma unroll
                for (int x = 0; x < 4; ++x) o[mb][4 * j + x] *= al[2 * j + (x & 1)];
        turn_take();
        {
            const int mi = lane / 8;
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) {
                const int colb = (PP ? 0 : 256 * wg) + 64 * mb + 16 * w;
                const u32 cbase = st + (colb >> 7) * FR_CHUNK;
                const int piece = (colb & 127) >> 4;
                u32 a[16];
#pragma unroll
                for (int kp = 0; kp < 2; ++kp) {
                    // matrices: tokens 32 kp + 8 mi + 0..7 (k-step 2 kp: mi 0, 1; 2 kp + 1: mi 2, 3)
                    const int tok = 32 * kp + 8 * mi + (lane % 8);
                    u32 r[4];
                    ldsm_x4_t_at(r, cbase + swz_piece(tok, piece));
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        // bytes (tok 2t, col 2g), (2t, 2g+1), (2t+1, 2g), (2t+1, 2g+1) ->
                        // (2t, 2g), (2t+1, 2g) | (2t, 2g+1), (2t+1, 2g+1)
                        const u32 x = __byte_perm(r[q], 0u, 0x3120);
                        // k-step 2 kp + q / 2; matrix q % 2 = 0: k 2t.. (a0 row g, a1 row g+8), 1: k 2t+8..
                        f8x4_to_f16x2x2(x, a[8 * kp + 4 * (q / 2) + 2 * (q % 2)], a[8 * kp + 4 * (q / 2) + 2 * (q % 2) + 1]);
                    }
                }
                if (mb == MB - 1) {
                    // the tile's last reads of the stage are done: hand it back to the producer
                    __syncwarp();
                    if (lane == 0) mbar_arrive(bar_empty + 8 * s);
                }
                wg_fence();
#pragma unroll
                for (int kk = 0; kk < 4; ++kk) {
                    if constexpr (PP)  // B = this warpgroup's 32 rows (heads) of P'
                        fr_wgmma_m64n32_rs<true>(o[mb], a + 4 * kk, wg_desc(pbuf + wg * 32 * 128 + kk * 32, 16, 1024),
                                                 1);
                    else
                        fr_wgmma_m64n64_rs_f16(o[mb], a + 4 * kk, wg_desc(pbuf + kk * 32, 16, 1024));
                }
                wg_commit();
                // m-block mb - 1's registers are free for mb + 1; the last drains P . V (ptxas
                // serialises every wgmma when P . V is still in flight as the next tile's S starts, C7514)
                if (mb < MB - 1) {
                    wg_wait<1>();
                } else {
                    turn_give(it == ntiles - 1);
                    wg_wait0();
                }
            }
        }
    }
    wg_wait0();
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) wg_fence_regs<ON>(o[mb]);

    // ---- the end: l over the 64 tokens' rows and the 4 warps, then the normalised rows
    col_sum_warp<8>(l_part);
    // every warp is past its last read of red (PP: red's rows of this warpgroup only)
    if (PP) named_sync(FR_NB_WG + wg, 128);
    else named_sync(FR_NB_MATH, 256);
    col_store<8>(red + (wg * 4 + w) * 32, l_part);
    named_sync(FR_NB_WG + wg, 128);
    float* l_s = reinterpret_cast<float*>(smem + FR_LM);
    float* m_s = l_s + 64;
    if (w == 0 && g == 0) {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int col = 8 * (k / 2) + 2 * t + (k & 1);
            float l = 0.f;
#pragma unroll
            for (int ww = 0; ww < 4; ++ww) l += red[(wg * 4 + ww) * 32 + col];
            l_s[32 * wg + col] = l;
            m_s[32 * wg + col] = m_run[k];
        }
    }
    if (PP) named_sync(FR_NB_WG + wg, 128);
    else named_sync(FR_NB_MATH, 256);
#pragma unroll
    for (int j = 0; j < ON / 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int head = (PP ? 32 * wg : 0) + 8 * j + 2 * t + e;
            const int h = h0 + head;
            if (h >= heads) continue;
            const float l = l_s[head];
            const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) {
                const int c = (PP ? 0 : 256 * wg) + 64 * mb + 16 * w + 2 * g;
                const float o0 = o[mb][4 * j + e] * inv, o1 = o[mb][4 * j + 2 + e] * inv;
                if (splits == 1) {
                    *reinterpret_cast<__nv_bfloat162*>(out + ((size_t)b * heads + h) * D_LAT + c) =
                        __floats2bfloat162_rn(o0, o1);
                } else {
                    *reinterpret_cast<float2*>(o_part + (((size_t)b * splits + split) * heads + h) * D_LAT + c) =
                        make_float2(o0, o1);
                }
            }
        }
    // (PP: each warpgroup its own 32 heads, whose l and m only it wrote)
    const int lh = PP ? 32 * wg + (tid % 128) : tid;
    if (splits > 1 && (PP ? tid % 128 < 32 : tid < 64) && h0 + lh < heads) {
        const float l = l_s[lh];
        lse[((size_t)b * splits + split) * heads + h0 + lh] =
            l > 0.f ? (m_s[lh] + log2f(l)) * 0.6931471805599453f : -INFINITY;
    }
}

#define FR_ARGS                                                                                               \
    const bf16 *__restrict__ q_abs, const bf16 *__restrict__ q_pe, const int *__restrict__ block_table,        \
        const int *__restrict__ seq_lens, bf16 *__restrict__ out, float *__restrict__ o_part,                 \
        float *__restrict__ lse, int heads, int block_size, int max_blocks, int splits, float scale,          \
        long long qpe_sb, long long qpe_sh, const __grid_constant__ TmaMap cache_map,                         \
        const __grid_constant__ TmaMap scale_map, const __grid_constant__ TmaMap cache_map64,                 \
        const __grid_constant__ TmaMap scale_map64
#define FR_PASS                                                                                               \
    q_abs, q_pe, block_table, seq_lens, out, o_part, lse, heads, block_size, max_blocks, splits, scale, qpe_sb, \
        qpe_sh, &cache_map, &scale_map, &cache_map64, &scale_map64

// grid (ceil(H / 64), B, splits), 384 threads, FR_BYTES + 1024 bytes of dynamic shared memory
// (both forms; arguments above fr_decode).
extern "C" __global__ void __launch_bounds__(384, 1) mla_decode_fp8_regs(FR_ARGS) {
    griddep_wait();
    fr_decode<false>(FR_PASS);
}

extern "C" __global__ void __launch_bounds__(384, 1) mla_decode_fp8_pp(FR_ARGS) {
    griddep_wait();
    fr_decode<true>(FR_PASS);
}
