// mla_prefill.cuh: what the MLA prefill attention kernels share (mla_prefill.cu, mla_prefill_ws.cu):
// the head dims they are compiled for, a tile's sequence descriptor and its bounds check, and the
// bf16 pair packing of P's register fragments.
#pragma once
#include "common.cuh"

#define PF_DN 128              // qk_nope_head_dim
#define PF_DR 64               // qk_rope_head_dim
#define PF_DQK (PF_DN + PF_DR) // 192
#define PF_DV 128              // v_head_dim

// Tile `idx` of the list: sequence descriptor tiles[idx].x of `seqs` and first query m0.
// False for a descriptor that does not fit the operands (the CTA returns, uniformly, before any
// barrier): the launcher cannot see the device arrays, the kernel keeps them in bounds.
struct PfTile {
    int q_row0, q_len, pos0, m0;
    long long ctx_row0;
};
__device__ __forceinline__ bool pf_tile(const int4* __restrict__ seqs, int n_seqs, const int2* __restrict__ tiles,
                                        long long n_q, long long n_ctx, int idx, PfTile& t) {
    const int2 tile = tiles[idx];
    if (tile.x < 0 || tile.x >= n_seqs) return false;
    const int4 sd = seqs[tile.x];
    t.q_row0 = sd.x;
    t.q_len = sd.y;
    t.pos0 = sd.z;
    t.ctx_row0 = sd.w;
    t.m0 = tile.y;
    return !(t.m0 < 0 || t.m0 >= t.q_len || t.q_row0 < 0 || t.pos0 < 0 || t.ctx_row0 < 0 ||
             (long long)t.q_row0 + t.q_len > n_q || t.ctx_row0 + t.pos0 + t.q_len > n_ctx);
}

__device__ __forceinline__ u32 pf_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = the smaller column
    return *reinterpret_cast<u32*>(&v);
}
