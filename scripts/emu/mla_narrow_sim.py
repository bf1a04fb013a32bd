#!/usr/bin/env python3
"""CPU emulation of whole CTAs of mla_decode_narrow_bf16 and mla_decode_narrow_rs_bf16
(kernels/src/cu/mla_narrow.cu, d20d2b6; the rs form dfeae56).

Why it exists: GPU time is scarce, and this kernel is the repository's first wgmma with a
transposed (MN-major) shared-memory A operand. Checked before the kernel ran: 13 cases x 4 random
interleavings against float64, 14 injected bugs each caught. It mirrors the .cu by hand: change
it with the kernel (its constants are checked against the .cu's #defines).

Adapted from scripts/emu/mla_fp8_regs_sim.py; the pieces both share (TMA SWIZZLE_128B, mbarriers,
named barriers, stmatrix.trans, accumulator layout, random-interleaving scheduler) are in
scripts/emu/ptx_model.py. Extended with:

  * wgmma m64nNk16 bf16 with BOTH operands from shared-memory matrix descriptors, K-major or
    MN-major (imm-trans-a / imm-trans-b), 128-byte swizzle. The descriptor is decoded from its
    64 bits exactly as wgmma.cuh's wg_desc encodes it (start >> 4 in [13:0], LBO >> 4 in [29:16],
    SBO >> 4 in [45:32], base offset [51:49], mode [63:62]) and the operand element (mn, k) is
    read at the logical byte address of the canonical layouts of the PTX ISA (9.7.15.5.1.2.1.3,
    "Canonical Layouts") / CUTLASS make_gmma_desc (cute/atom/mma_traits_sm90_gmma.hpp), in bytes
    for 2-byte elements (T = 8):
        K-major,  128B: ((8,m),(T,2)):((8T,SBO),(1,T))   -> start + (mn/8)*SBO + (mn%8)*128 + 2k
                                                            (LBO unused: "assumed to be 1")
        MN-major, 128B: ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))
                        -> start + (mn/64)*LBO + 2*(mn%64) + (k/8)*SBO + (k%8)*128
    and the 128-byte swizzle (Swizzle<3,4,3>, base offset 0 = pattern anchored at 1024-byte
    boundaries) is applied to that absolute address: bits [6:4] ^= bits [9:7]. The start address
    is thus the unswizzled address of element (0, 0) (CUTLASS's DescriptorIterator advances a
    descriptor by adding to it, which is how the +32 B k-steps inside a swizzle row work).
    Calibrated by `calibrate()` against the operand addressing the sibling kernels run on
    hardware (MN-major B: wgmma_m64n256_ss_tn with desc(chunk + kk*2048, LBO 8192, SBO 1024)).
  * wgmma ops run when all 4 warps have issued them; every shared byte an op reads is marked busy
    from its first issue until all 4 warps passed a wait_group retiring it: any write to a busy
    byte (TMA, stmatrix, st.shared) is a race (SimError); the operands are also re-read at the
    last retire and compared.
  * direct checks of the intermediate layouts: S^T against K.Q^T, the operands of every wgmma
    against the cache / Q / P they must hold, P's placement, O^T after each tile against a float64
    recomputation from the same P and alpha, the output indices (every element once).

Both forms of the kernel (narrow_decode<PV_REGS>) are emulated, every case run for each:
  ss  mla_decode_narrow_bf16: P.V's A (V^T) as the transposed shared-memory operand above; the
      stage released after P.V's wait_group 0.
  rs  mla_decode_narrow_rs_bf16: per m-block 4 ldmatrix.x4.trans (ptx_model.ldmatrix_x4, checked
      against the PTX text and against mla_fp8_regs_sim.py's copy) into the mma.m16n8k16 / wgmma
      register A fragment (ptx_model.wgmma_a_frag_bits), 4 wgmma m64n16k16 with A from registers
      and B = P, wait_group 1 (0 after the last); the stage released right after the 8th m-block's
      loads, so the producer's TMA may refill it while P.V runs (counted as tma_over_pv): those
      ops read only registers and P, which the busy-byte guard and the operand checks enforce.
      The A registers are modelled as two buffers (mb & 1); reloading one an unretired op of the
      warp reads is an error.
  Both: a read of a stage by warp w (wgmma issue, ldmatrix) after w's arrival on its empty
  barrier is an error (happens-before), and so is that arrival while w has a wgmma reading the
  stage in flight.

Run:  python3 scripts/emu/mla_narrow_sim.py               # calibration + all cases, both forms (~30 s)
      python3 scripts/emu/mla_narrow_sim.py --rs 0 3 5    # some cases, one form (--ss / --rs)
      python3 scripts/emu/mla_narrow_sim.py --stress 5    # each case under 5 random interleavings
      python3 scripts/emu/mla_narrow_sim.py --mutants     # each injected bug must be caught (both forms)
"""
import math
import os
import random
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ptx_model import (F32, LOG2E, CtaActors, MBar, NamedBarriers, PagedProblem, SimError, Smem, WgmmaQueue,  # noqa: E402
                       bf16_round, bf16_to_f, combine, d_coords, hw_swz128, ldmatrix_x4, split_range,
                       stmatrix_x4_trans, swz_piece, tile_pieces, tma_copy_box, wgmma_a_frag_bits)

# ---------------------------------------------------------------- constants (as the .cu)
MLA_CHUNK = 8192
NR_HEADS = 16
NR_TILE = 9 * MLA_CHUNK
NR_STAGES = 2
NR_QCH = NR_HEADS * 128
NR_ST0 = 0
NR_Q = NR_ST0 + NR_STAGES * NR_TILE
NR_P = NR_Q + 9 * NR_QCH
NR_RED = NR_P + NR_QCH
NR_LM = NR_RED + 256
NR_BAR = NR_LM + 128
NR_BYTES = NR_BAR + (NR_STAGES * 9 + NR_STAGES) * 8
NR_THREADS = 160
NR_NB_MATH = 1
D_LAT, D_QK = 512, 576

MUT = set()  # injected bugs (--mutants)
FORM = "ss"  # the kernel emulated: "ss" mla_decode_narrow_bf16 (narrow_decode<false>), "rs" mla_decode_narrow_rs_bf16


def check_defines():
    """The constants above against the .cu's #defines (when the repository is there)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "kernels", "src", "cu", "mla_narrow.cu")
    if not os.path.exists(path):
        return "skipped (no repository)"
    env = dict(MLA_CHUNK=MLA_CHUNK)
    for line in open(path):
        m = re.match(r"#define (NR_\w+) (.*?)(\s*//.*)?$", line.strip())
        if m:
            env[m.group(1)] = eval(m.group(2), {}, env)
    for k in ("NR_HEADS", "NR_TILE", "NR_STAGES", "NR_QCH", "NR_ST0", "NR_Q", "NR_P", "NR_RED", "NR_LM", "NR_BAR",
              "NR_BYTES", "NR_THREADS", "NR_NB_MATH"):
        if env[k] != globals()[k]:
            raise SimError(f"constant {k}: .cu {env[k]} vs sim {globals()[k]}")
    for k in ("NR_Q", "NR_P"):
        assert env[k] % 1024 == 0, f"{k} not 1024-aligned"
    assert env["NR_BAR"] % 8 == 0
    return f"ok (NR_BYTES {env['NR_BYTES']}, host NARROW_SMEM_BYTES {env['NR_BYTES'] + 1024})"


# ---------------------------------------------------------------- swizzles (hw_swz128, swz_piece: ptx_model)
def nr_q_off(h, col):  # mla_narrow.cu
    k = col & 63
    x = (k >> 3) if "q_swz" in MUT else ((k >> 3) ^ (h & 7))
    return (col >> 6) * NR_QCH + h * 128 + (x << 4) + ((k & 7) << 1)


# ---------------------------------------------------------------- wgmma descriptors
def wg_desc(addr, lbo, sbo):  # wgmma.cuh, bit for bit
    return ((addr & 0x3FFFF) >> 4) | (((lbo >> 4) & 0x3FFF) << 16) | (((sbo >> 4) & 0x3FFF) << 32) | (1 << 62)


def desc_fields(d):
    return dict(start=(d & 0x3FFF) << 4, lbo=((d >> 16) & 0x3FFF) << 4, sbo=((d >> 32) & 0x3FFF) << 4,
                base=(d >> 49) & 7, mode=(d >> 62) & 3)


def operand_addrs(desc, MN, mn_major):
    """Physical byte addresses [MN, 16] of a bf16 k16 wgmma operand read through `desc` (128B
    swizzle). mn_major: imm-trans = 1."""
    f = desc_fields(desc)
    if f["mode"] != 1:
        raise SimError("descriptor: not the 128-byte swizzle mode")
    if f["base"] != 0:
        raise SimError("descriptor: base offset != 0")
    st = f["start"]
    mn = np.arange(MN)[:, None]
    k = np.arange(16)[None, :]
    if not mn_major:
        # k16 of bf16 = 32 bytes must stay inside one 128-byte swizzle row
        if (st % 128) + 32 > 128:
            raise SimError(f"K-major descriptor start {st}: k-step crosses the 128-byte row")
        logical = st + (mn // 8) * f["sbo"] + (mn % 8) * 128 + 2 * k
    else:
        if st % 1024:
            # outside what the hardware-validated sibling kernels exercise (start on a swizzle atom)
            raise SimError(f"MN-major descriptor start {st} not on a 1024-byte swizzle atom")
        logical = st + (mn // 64) * f["lbo"] + 2 * (mn % 64) + (k // 8) * f["sbo"] + (k % 8) * 128
    return hw_swz128(logical)


def operand_values(S, addrs):
    return bf16_to_f(S.u16_at(addrs)).astype(np.float64)


def calibrate():
    """The descriptor model against addressing that ran correctly on hardware in the sibling
    kernels, and the narrow kernel's own operands read from a known tile."""
    S = Smem(3 * NR_TILE)
    rng = np.random.default_rng(7)
    base = 1024
    tile = rng.integers(1, 0x7F00, (64, 576)).astype(np.uint16)  # [token][column] bf16 bits
    for r in range(64):
        for c in range(576):
            k = c & 63
            a = base + (c >> 6) * 8192 + r * 128 + ((((k >> 3) ^ (r & 7))) << 4) + ((k & 7) << 1)
            S.m[a:a + 2] = np.array([tile[r, c]], "<u2").view(np.uint8)
    V = bf16_to_f(tile).astype(np.float64)
    out = []
    # (1) sibling ground truth (mla.cu / mla_tma.cu / mla_fp8.cu): V as MN-major B of m64n256k16,
    #     desc(kt + 4wg*8192 + kk*16*128, LBO 8192, SBO 1024): B[n, k] = V[16kk + k][256wg + n]
    for wg in range(2):
        for kk in range(4):
            B = operand_values(S, operand_addrs(wg_desc(base + 4 * wg * 8192 + kk * 2048, 8192, 1024), 256, True))
            if not np.array_equal(B, V[16 * kk:16 * kk + 16, 256 * wg:256 * wg + 256].T):
                raise SimError("calibration: sibling MN-major B does not read V")
    out.append("sibling MN-major B (m64n256, LBO 8192, SBO 1024) reads V^T: ok")
    # the opposite reading of LBO/SBO must NOT reproduce the hardware-validated sibling
    Bx = operand_values(S, operand_addrs(wg_desc(base + 0 * 8192 + 0, 1024, 8192), 256, True))
    swapped_ok = np.array_equal(Bx, V[0:16, 0:256].T)
    out.append(f"same with LBO/SBO roles swapped in the model: {'ALSO matches (model not pinned!)' if swapped_ok else 'mismatch (so the roles are pinned)'}")
    # (2) sibling K-major operands (Q / K: desc(chunk + ks*32, 16, 1024)): B[n, k] = V[n][64c + 16ks + k]
    for c in range(9):
        for ks in range(4):
            B = operand_values(S, operand_addrs(wg_desc(base + c * 8192 + ks * 32, 16, 1024), 64, False))
            if not np.array_equal(B, V[:, 64 * c + 16 * ks:64 * c + 16 * ks + 16]):
                raise SimError("calibration: K-major operand")
    out.append("K-major operand (start + 32 ks, SBO 1024) reads the tile's k-slices: ok")
    # (3) the narrow kernel's P.V A: desc(kt + mb*8192 + kk*2048, 8192, 1024), trans-a:
    #     A[m, k] = V[16kk + k][64mb + m], and LBO is not used at M = 64 (one 128-byte atom wide)
    for mb in range(8):
        for kk in range(4):
            A = operand_values(S, operand_addrs(wg_desc(base + mb * 8192 + kk * 2048, 8192, 1024), 64, True))
            if not np.array_equal(A, V[16 * kk:16 * kk + 16, 64 * mb:64 * mb + 64].T):
                raise SimError("calibration: narrow P.V A operand")
            A2 = operand_values(S, operand_addrs(wg_desc(base + mb * 8192 + kk * 2048, 16, 1024), 64, True))
            assert np.array_equal(A, A2)
    out.append("narrow P.V A (MN-major, M=64): A = V^T slice; LBO irrelevant at M = 64: ok")
    # (4) ldmatrix.x4(.trans) against the PTX text, element by element: matrix j's rows at the
    #     addresses of lanes 8j.., element (r, c) tagged; .trans: thread i gets (2(i%4), i/4) and
    #     (2(i%4)+1, i/4); plain: (i/4, 2(i%4)) and (i/4, 2(i%4)+1). Then against the independent
    #     loop-by-lane copy in mla_fp8_regs_sim.py, and the A fragment against its a_matrix.
    T = Smem(4096)
    lanes = np.arange(32)
    row_at = rng.permutation(256)[:32] * 16  # 32 distinct 16-byte rows in any order
    for l in range(32):
        tags = np.array([(l // 8) << 8 | (l % 8) << 4 | c for c in range(8)], "<u2")  # matrix, row, col
        T.m[row_at[l]:row_at[l] + 16] = tags.view(np.uint8)
    for trans in (True, False):
        r = ldmatrix_x4(T, row_at, trans)
        for i in range(32):
            for j in range(4):
                for h in range(2):
                    row, col = (2 * (i % 4) + h, i // 4) if trans else (i // 4, 2 * (i % 4) + h)
                    if (int(r[i, j]) >> (16 * h)) & 0xFFFF != (j << 8 | row << 4 | col):
                        raise SimError(f"calibration: ldmatrix trans={trans} thread {i} reg {j} half {h}")
    try:
        import mla_fp8_regs_sim as fp8sim
        T.m[:] = rng.integers(0, 256, T.m.size).astype(np.uint8)
        for trans in (True, False):
            if not np.array_equal(ldmatrix_x4(T, row_at, trans), fp8sim.ldmatrix_x4(T, list(row_at), trans)):
                raise SimError("calibration: ldmatrix differs from mla_fp8_regs_sim's")
        regs = [rng.integers(0, 0x7F00, (32, 4)).astype(np.uint32) * 0x10001 for _ in range(4)]
        if not np.array_equal(bf16_to_f(wgmma_a_frag_bits(regs)), fp8sim.a_matrix(regs, "bf16")):
            raise SimError("calibration: A fragment differs from mla_fp8_regs_sim's a_matrix")
        same = "and agree with mla_fp8_regs_sim.py's copies"
    except ImportError:
        same = "(mla_fp8_regs_sim.py absent: not cross-checked)"
    out.append(f"ldmatrix.x4 / .trans per the PTX text, register A fragment: ok {same}")
    # (5) the rs kernel's P.V A: per warp w, 4 ldmatrix.x4.trans at swz_piece(16kk + 8(mi>>1) + l%8,
    #     2w + (mi&1)) of chunk mb, read as the A fragment: A = V^T slice, the same as (3)
    for mb in range(8):
        for kk in range(4):
            regs = []
            for w in range(4):
                mi = lanes // 8
                offs = [swz_piece(int(16 * kk + 8 * (m >> 1) + l % 8), 2 * w + (int(m) & 1)) for l, m in zip(lanes, mi)]
                regs.append(ldmatrix_x4(S, [base + mb * 8192 + o for o in offs], True))
            A = bf16_to_f(wgmma_a_frag_bits(regs)).astype(np.float64)
            if not np.array_equal(A, V[16 * kk:16 * kk + 16, 64 * mb:64 * mb + 64].T):
                raise SimError("calibration: rs P.V A fragments")
    out.append("rs P.V A (ldmatrix.x4.trans -> register fragment) = V^T slice, as (3): ok")
    return out


class WgmmaUnit(WgmmaQueue):
    clamp_wait_to_issued = True

    def issue(self, w, N, da, db, ta, tb, acc, scale_d, tag, a_regs=None, a_slot=None):
        """da None: A from registers (wgmma ... {a0, a1, a2, a3}, b-desc): warp w's [32, 4] u32
        `a_regs`, which sit in its register buffer `a_slot` until the op is retired."""
        k = self.next[w]
        self.next[w] += 1
        key = (N, da, db, ta, tb, acc, bool(scale_d))
        if k == len(self.ops):
            aa = operand_addrs(da, 64, ta) if da is not None else None
            ba = operand_addrs(db, N, tb)
            parts = [ba.ravel(), ba.ravel() + 1] + ([aa.ravel(), aa.ravel() + 1] if aa is not None else [])
            byts = np.unique(np.concatenate(parts))
            self.ctx.S.busy[byts] += 1
            self.ops.append(dict(key=key, aa=aa, ba=ba, bytes=byts, issued=set(), retired=set(), done=False, tag=tag,
                                 regs={}, slots={}))
        op = self.ops[k]
        if op["key"] != key:
            raise SimError(f"warps disagree on wgmma #{k}: {op['tag']} vs {tag}")
        self.ctx.check_stage_read(w, op["bytes"], f"wgmma {tag}")
        if da is None:
            op["regs"][w] = np.array(a_regs, np.uint32).copy()
            op["slots"][w] = a_slot
        op["issued"].add(w)
        if len(op["issued"]) == 4:
            self._run(k)

    def in_flight(self, w):  # ops warp w issued and has not retired
        return [op for op in self.ops[:self.next[w]] if w not in op["retired"]]

    def _run(self, k):
        op = self.ops[k]
        assert all(o["done"] for o in self.ops[:k])
        N, _, _, _, _, acc, scale_d = op["key"]
        if op["aa"] is None:
            A = bf16_to_f(wgmma_a_frag_bits([op["regs"][w] for w in range(4)])).astype(np.float64)
        else:
            A = operand_values(self.ctx.S, op["aa"])
        B = operand_values(self.ctx.S, op["ba"])
        op["A"], op["B"] = A, B
        self.ctx.check_operands(op["tag"], A, B)
        D = A @ B.T  # [64, N]
        nreg = N // 2
        lanes = np.arange(32)
        for w in range(4):
            cur = self.acc[w].get(acc)
            if cur is None or cur.shape[1] != nreg:
                cur = np.full((32, nreg), np.nan, F32)  # uninitialised registers
            new = np.zeros((32, nreg), F32)
            for i in range(nreg):
                rc = [d_coords(w, l, i) for l in lanes]
                vals = np.array([D[r, c] for r, c in rc])
                base = cur[:, i].astype(np.float64) if scale_d else 0.0
                new[:, i] = (base + vals).astype(F32)
            self.acc[w][acc] = new
        op["done"] = True

    def retire(self, w, need):
        for op in self.ops[:need]:
            if w in op["retired"]:
                continue
            op["retired"].add(w)
            if len(op["retired"]) == 4:
                A2 = operand_values(self.ctx.S, op["aa"]) if op["aa"] is not None else op["A"]
                B2 = operand_values(self.ctx.S, op["ba"])
                if not (np.array_equal(A2, op["A"], equal_nan=True) and np.array_equal(B2, op["B"], equal_nan=True)):
                    raise SimError(f"shared operand of wgmma {op['tag']} changed while in flight")
                self.ctx.S.busy[op["bytes"]] -= 1


# ---------------------------------------------------------------- the problem
class Problem(PagedProblem):
    def __init__(self, rng, heads, block_size, lens, scale, qmul=1.0, runs=False):
        self.heads, self.scale, self.lens = heads, F32(scale), lens
        batch = len(lens)
        mb = max(1, (max(lens) + block_size - 1) // block_size) + 1
        rows = self.page(rng, batch, block_size, mb)
        if runs:
            self.page_runs(batch)
        cache = rng.standard_normal((rows, D_QK)) * np.exp(rng.uniform(-1, 1, (rows, 1)))
        self.cache = bf16_round(cache.astype(F32))  # [rows, 576] bf16 bits
        self.cache_f = bf16_to_f(self.cache).astype(np.float64)
        self.q_abs = bf16_round((rng.standard_normal((batch, heads, D_LAT)) * 0.3 * qmul).astype(F32))
        self.q_pe = bf16_round((rng.standard_normal((batch, heads, 64)) * qmul).astype(F32))
        self.q_f = np.concatenate([bf16_to_f(self.q_abs), bf16_to_f(self.q_pe)], axis=2).astype(np.float64)

    def exact(self, b, lo, hi):
        """float64 softmax attention over tokens [lo, hi): out [H, 512], lse (natural log)."""
        rows = [self.token_row(b, t) for t in range(lo, hi)]
        K = self.cache_f[rows]
        s = float(self.scale) * (self.q_f[b] @ K.T)
        m = s.max(1, keepdims=True)
        p = np.exp(s - m)
        l = p.sum(1, keepdims=True)
        return (p / l) @ K[:, :D_LAT], (m + np.log(l)).reshape(-1)

    def kernel_order(self, b, lo, hi):
        """float64 in the kernel's order: 64-token tiles, online max, P rounded to bf16, l the
        sum of the rounded P."""
        H = self.heads
        m = np.full(H, -np.inf)
        l = np.zeros(H)
        O = np.zeros((H, D_LAT))
        sl2 = float(self.scale) * 1.4426950408889634
        for t0 in range(lo, hi, 64):
            rows = [self.token_row(b, t) for t in range(t0, min(hi, t0 + 64))]
            K = self.cache_f[rows]
            s = sl2 * (self.q_f[b] @ K.T)
            mx = np.maximum(m, s.max(1))
            a = np.exp2(m - mx)
            p = bf16_to_f(bf16_round(np.exp2(s - mx[:, None]).astype(F32))).astype(np.float64)
            l = l * a + p.sum(1)
            O = O * a[:, None] + p @ K[:, :D_LAT]
            m = mx
        return O / l[:, None], (m + np.log2(l)) * math.log(2.0)


# ---------------------------------------------------------------- one CTA
class Cta(CtaActors):
    def __init__(self, P, b, hx, split, splits, rs, gout):
        self.P, self.b, self.hx, self.split, self.splits, self.rs = P, b, hx, split, splits, rs
        self.gout = gout  # the launch's outputs: dict name -> dict key -> value
        self.S = Smem(NR_BYTES)
        self.nb = NamedBarriers()
        self.tma_q = []
        self.counts = dict(s_ops=0, pv_ops=0, st_checks=0, p_checks=0, ot_checks=0)
        if FORM == "rs":
            # ldmatrix.x4.trans calls; TMA boxes written into a stage while a P.V of the tile
            # that stage last held is still in flight (the early release at work)
            self.counts.update(ldsm=0, tma_over_pv=0)
        self.rel = [set() for _ in range(4)]  # stages warp w released and has not taken up again
        self.notes = set()

    def write_out(self, name, key, val):
        d = self.gout[name]
        if key in d:
            if name == "lse" and d[key] == val:
                self.notes.add("lse written again with the same value (another CTA's head)")
            else:
                raise SimError(f"{name}{key} written twice")
        d[key] = val

    # ---------------------------------------------------------- waits (mbar_wait, named_sync: CtaActors)
    def wg_wait(self, w, n):
        need = yield from self.unit.wait_group(w, n)
        self.unit.retire(w, need)

    # ---------------------------------------------------------- TMA
    def tma_engine_step(self):
        dst, c0, row, rows, bar = self.tma_q.pop(self.rs.randrange(len(self.tma_q)))
        if dst % 128:
            raise SimError("TMA shared destination not 128-byte aligned")
        if dst % 1024:
            self.notes.add("TMA boxes land off 1024-byte swizzle atoms (block_size < 8): swizzle modelled on the address")
        if FORM == "rs":
            st = (dst - NR_ST0) // NR_TILE
            if any(op["tag"][0] == "pv" and op["tag"][1] % NR_STAGES == st and len(op["retired"]) < 4
                   for op in self.unit.ops[-64:]):
                self.counts["tma_over_pv"] += 1
        bar.complete_tx(tma_copy_box(self.S, dst, self.P.cache, c0, row, 64, rows, D_QK, True, "TMA"))

    def tile_issue(self, kbuf, bars, t0, end):  # mla_tma.cuh tile_issue(.., 0, 9)
        P = self.P
        bs = P.block_size
        piece, pieces = tile_pieces(bs, t0, end)
        loaded = set()
        for c in range(9):
            bar = bars[c]
            if pieces == 0:
                bar.arrive()
                continue
            bar.arrive_expect_tx(pieces * piece * 128)
            # a whole tile in consecutive blocks: one 64-row box a chunk (tile_contiguous)
            if bs < 64 and end - t0 >= 64:
                first = t0 // bs
                b0 = int(P.block_table[self.b, first])
                if all(int(P.block_table[self.b, first + j]) == b0 + j for j in range(1, 64 // bs)):
                    self.tma_q.append((kbuf + c * MLA_CHUNK, c * 64, b0 * bs, 64, bar))
                    loaded.update(range(64))
                    self.counts["one_box"] = self.counts.get("one_box", 0) + (c == 0)
                    continue
            for j in range(pieces):
                t = t0 + j * piece
                row = int(P.block_table[self.b, t // bs]) * bs + (t % bs)
                self.tma_q.append((kbuf + c * MLA_CHUNK + j * piece * 128, c * 64, row, piece, bar))
                loaded.update(range(t - t0, t - t0 + piece))
        return loaded

    # ---------------------------------------------------------- operand checks (at each wgmma)
    def check_operands(self, tag, A, B):
        P, b = self.P, self.b
        kind, it = tag[0], tag[1]
        t0 = self.start + 64 * it
        loaded = self.loaded[it]
        if kind == "s":
            _, _, c, ks = tag
            cols = slice(64 * c + 16 * ks, 64 * c + 16 * ks + 16)
            for m in range(64):
                if m in loaded:
                    if not np.array_equal(A[m], P.cache_f[P.token_row(b, t0 + m), cols]):
                        raise SimError(f"S^T: A row {m} is not token {t0 + m}'s columns (tile {it} c {c} ks {ks})")
            for n in range(16):
                h = self.h0 + n
                want = P.q_f[b, h, cols] if h < P.heads else np.zeros(16)
                if not np.array_equal(B[n], want):
                    raise SimError(f"S^T: B row {n} is not Q of head {h} (c {c} ks {ks})")
            self.counts["s_ops"] += 1
        elif kind == "pv":
            _, _, mb, kk = tag
            for k in range(16):
                tok = 16 * kk + k
                if tok in loaded:
                    want = P.cache_f[P.token_row(b, t0 + tok), 64 * mb:64 * mb + 64]
                    if not np.array_equal(A[:, k], want):
                        raise SimError(f"P.V: A column {k} is not V^T of token {tok} (tile {it} mb {mb} kk {kk})")
                elif not np.isfinite(A[:, k]).all():
                    self.notes.add(f"P.V reads non-finite V rows of unloaded token {tok} (tile {it})")
            for n in range(16):
                for k in range(16):
                    want = self.pmat[it][n, 16 * kk + k]
                    if B[n, k] != want:
                        raise SimError(f"P.V: B[{n},{k}] is not P[head {n}][token {16 * kk + k}] ({B[n, k]} vs {want})")
            self.counts["pv_ops"] += 1

    # ---------------------------------------------------------- the stage's release (empty mbarrier)
    def check_stage_read(self, w, byts, who):
        """A read of a stage by warp w must precede w's arrival on the stage's empty barrier: after
        it the producer may refill the stage (ordered only by that arrival)."""
        for s in self.rel[w]:
            lo = NR_ST0 + s * NR_TILE
            if np.any((byts >= lo) & (byts < lo + NR_TILE)):
                raise SimError(f"warp {w}: {who} reads stage {s} after the warp released it to the producer")

    def release(self, w, s):  # __syncwarp(); if (lane == 0) mbar_arrive(bar_empty + 8 * s)
        if "empty_count1" in MUT and w != 0:
            return
        lo = NR_ST0 + s * NR_TILE
        for op in self.unit.in_flight(w):
            if np.any((op["bytes"] >= lo) & (op["bytes"] < lo + NR_TILE)):
                raise SimError(f"warp {w} releases stage {s} while its wgmma {op['tag']} reading it is in flight")
        self.rel[w].add(s)
        self.empty[s].arrive()

    def ldsm_stage(self, w, addrs):
        """ldmatrix.x4.trans of the stage: a synchronous read of 32 x 16 bytes into registers."""
        a = np.asarray(addrs)
        self.check_stage_read(w, (a[:, None] + np.arange(16)[None, :]).ravel(), "ldmatrix")
        self.counts["ldsm"] += 1
        return ldmatrix_x4(self.S, addrs, "rs_notrans" not in MUT)

    def pv_regs(self, w, it, s, kt, p_addr):
        """narrow_decode<true>'s P.V: per m-block 4 ldmatrix.x4.trans of V^T into registers, the
        stage released after the 8th m-block's loads, 4 wgmma m64n16k16 with A from registers and
        B = P, commit, wait_group 1 (0 after the last). The A registers are modelled as two
        buffers (slot mb & 1, what wait_group 1 allows): reloading a buffer that an op this warp
        has not retired reads is a SimError."""
        unit = self.unit
        mi = np.arange(32) // 8
        rows = np.arange(32) % 8
        rel_mb = 6 if "rs_release_early" in MUT else 7
        for mb in range(8):
            slot = mb & 1
            for op in unit.in_flight(w):
                if op["slots"].get(w) == slot:
                    raise SimError(f"warp {w}: ldmatrix (m-block {mb}) overwrites the A registers of in-flight "
                                   f"wgmma {op['tag']}")
            a = np.zeros((32, 16), np.uint32)
            for kk in range(4):
                if "rs_reg_order" in MUT:  # matrices 1 and 2 exchanged: a1 <-> a2
                    tok, piece = 16 * kk + 8 * (mi & 1) + rows, 2 * w + (mi >> 1)
                else:
                    tok, piece = 16 * kk + 8 * (mi >> 1) + rows, 2 * w + (mi & 1)
                if "rs_no_swz" in MUT:
                    offs = [int(tk) * 128 + int(pc) * 16 for tk, pc in zip(tok, piece)]
                else:
                    offs = [swz_piece(int(tk), int(pc)) for tk, pc in zip(tok, piece)]
                a[:, 4 * kk:4 * kk + 4] = self.ldsm_stage(w, [kt + mb * MLA_CHUNK + o for o in offs])
                yield ("step", None)
            if mb == rel_mb and "empty_early" not in MUT:
                self.release(w, s)
                yield ("step", None)
            # wg_fence(); 4 x nr_wgmma_m64n16_rs(o[mb], a + 4 kk, desc(P + 32 kk, 16, 1024))
            for kk in range(4):
                unit.issue(w, 16, None, wg_desc(p_addr + kk * 32, 16, 1024), False, False, f"o{mb}", True,
                           ("pv", it, mb, kk), a_regs=a[:, 4 * kk:4 * kk + 4], a_slot=slot)
                yield ("step", None)
            unit.commit(w)
            yield from self.wg_wait(w, (2 if "rs_wait2" in MUT else 1) if mb < 7 else 0)

    # ---------------------------------------------------------- the producer (warp 4, lane 0)
    def producer(self):
        for it in range(self.ntiles):
            s = it % NR_STAGES
            if it >= NR_STAGES:
                par = ((it // NR_STAGES) - 1) & 1
                if "parity" in MUT:
                    par ^= 1
                yield from self.mbar_wait(self.empty[s], par)
            self.loaded[it] = self.tile_issue(NR_ST0 + s * NR_TILE, self.full[s], self.start + 64 * it, self.end)
            yield ("step", None)

    # ---------------------------------------------------------- a math warp
    def consumer(self, w):
        S, unit, P = self.S, self.unit, self.P
        ntiles, start, end = self.ntiles, self.start, self.end
        sl2 = F32(P.scale * LOG2E)
        q_addr, p_addr = NR_Q, NR_P
        lanes = np.arange(32)
        g_of, t_of = lanes // 4, lanes % 4
        row0 = 16 * w + g_of
        acc = unit.acc[w]
        for mb in range(8):
            acc[f"o{mb}"] = np.zeros((32, 8), F32)
        m_run = np.full((32, 4), -np.inf, F32)
        l_part = np.zeros((32, 4), F32)
        yield ("step", None)
        for it in range(ntiles):
            s = it % NR_STAGES
            par = (it // NR_STAGES) & 1
            t0 = start + 64 * it
            kt = NR_ST0 + s * NR_TILE
            bars = self.full[s]
            self.rel[w].discard(s)  # the stage's next fill, waited for below
            # ---- S^T = K . Q^T
            for c in range(9):
                yield from self.mbar_wait(bars[c], par)
                for ks in range(4):
                    off = c * MLA_CHUNK + ks * 32
                    sbo = 128 if "sbo_s" in MUT else 1024
                    unit.issue(w, 16, wg_desc(kt + off, 16, sbo), wg_desc(q_addr + c * NR_QCH + ks * 32, 16, 1024),
                               False, False, "sacc", c > 0 or ks > 0, ("s", it, c, ks))
                    yield ("step", None)
            unit.commit(w)
            yield from self.wg_wait(w, 0)
            sacc = acc["sacc"].copy()
            # direct check: S^T[token, head] = K . Q^T
            for lane in range(32):
                for i in range(8):
                    r, col = d_coords(w, lane, i)
                    h = self.h0 + col
                    if r not in self.loaded[it]:
                        continue
                    kv = P.cache_f[P.token_row(self.b, t0 + r)]
                    q = P.q_f[self.b, h] if h < P.heads else np.zeros(D_QK)
                    want = float(kv @ q)
                    if abs(float(sacc[lane, i]) - want) > 1e-5 * (1 + np.abs(kv * q).sum()):
                        raise SimError(f"S^T[{r},{col}] tile {it}: {sacc[lane, i]} vs K.Q^T {want}")
            self.counts["st_checks"] += 1
            # ---- column maxima (rows = tokens)
            v0 = t0 + row0 < end
            v1 = t0 + (row0 if "mask" in MUT else row0 + 8) < end
            cmax = np.zeros((32, 4), F32)
            for j in range(2):
                for x in range(4):
                    lo = x < 2
                    valid = v0 if lo else v1
                    v = np.where(valid, (sacc[:, 4 * j + x] * sl2).astype(F32), F32(-np.inf)).astype(F32)
                    sacc[:, 4 * j + x] = v
                    k = 2 * j + (x & 1)
                    cmax[:, k] = v if lo else np.maximum(cmax[:, k], v)
            for k in range(4):
                for o in (4, 8, 16):
                    cmax[:, k] = np.maximum(cmax[:, k], cmax[lanes ^ o, k])
            for lane in range(32):
                if g_of[lane] == 0:
                    t = t_of[lane]
                    for k in range(4):
                        S.set_f32(NR_RED + 4 * (w * 16 + 8 * (k // 2) + 2 * t + (k & 1)), cmax[lane, k], "red st")
            yield ("step", None)
            if "no_sync_red" not in MUT:
                yield from self.named_sync(NR_NB_MATH, 128)
            alpha = np.zeros((32, 4), F32)
            for lane in range(32):
                t = t_of[lane]
                for k in range(4):
                    col = 8 * (k // 2) + 2 * t + (k & 1)
                    mx = m_run[lane, k]
                    for ww in range(4):
                        mx = max(mx, S.f32(NR_RED + 4 * (ww * 16 + col)))
                    if not np.isfinite(mx):
                        raise SimError(f"non-finite column max, tile {it} head {col}: {mx}")
                    alpha[lane, k] = F32(np.exp2(F32(m_run[lane, k] - mx)))
                    m_run[lane, k] = mx
                    l_part[lane, k] = F32(l_part[lane, k] * alpha[lane, k])
                    # every thread of a column must agree on alpha (O^T check below uses it)
                    prev = self.alpha_rec[it].setdefault(col, alpha[lane, k])
                    if prev != alpha[lane, k]:
                        raise SimError("threads disagree on alpha")
            # ---- P = bf16(exp2(x - m)), sums of the rounded values
            pp = np.zeros((32, 4), np.uint32)
            for j in range(2):
                for hf in range(2):
                    e0 = np.exp2((sacc[:, 4 * j + 2 * hf] - m_run[:, 2 * j]).astype(F32)).astype(F32)
                    e1 = np.exp2((sacc[:, 4 * j + 2 * hf + 1] - m_run[:, 2 * j + 1]).astype(F32)).astype(F32)
                    b0, b1 = bf16_round(e0), bf16_round(e1)
                    l_part[:, 2 * j] = (l_part[:, 2 * j] + bf16_to_f(b0)).astype(F32)
                    l_part[:, 2 * j + 1] = (l_part[:, 2 * j + 1] + bf16_to_f(b1)).astype(F32)
                    pp[:, 2 * j + hf] = b0.astype(np.uint32) | (b1.astype(np.uint32) << 16)
                    for lane in range(32):
                        tok = 16 * w + g_of[lane] + 8 * hf
                        head = 8 * j + 2 * t_of[lane]
                        self.pmat[it][head, tok] = float(bf16_to_f(b0[lane]))
                        self.pmat[it][head + 1, tok] = float(bf16_to_f(b1[lane]))
            if "empty_early" in MUT:
                self.release(w, s)
            addrs = []
            for lane in range(32):
                mi, c = lane // 8, lane % 8
                j, hf = mi // 2, mi & 1
                head = 8 * j + c
                piece = 2 * w + ((1 - hf) if "stsm_piece" in MUT else hf)
                addrs.append(p_addr + swz_piece(head, piece))
            stmatrix_x4_trans(S, addrs, pp, "stmatrix P")
            # P lands at [head][token] in the swizzled layout the B descriptor reads
            for lane in range(32):
                for j in range(2):
                    for hf in range(2):
                        for e in range(2):
                            head = 8 * j + 2 * t_of[lane] + e
                            tok = 16 * w + g_of[lane] + 8 * hf
                            a = p_addr + head * 128 + ((((tok >> 3) ^ (head & 7))) << 4) + ((tok & 7) << 1)
                            if S.u16(a) != (int(pp[lane, 2 * j + hf]) >> (16 * e)) & 0xFFFF:
                                raise SimError(f"P[{head}][{tok}] not at its swizzled place")
            self.counts["p_checks"] += 1
            yield ("step", None)
            if "no_sync_p" not in MUT:
                yield from self.named_sync(NR_NB_MATH, 128)
            # ---- O^T = O^T * alpha + V^T . P^T
            for mb in range(8):
                o = acc[f"o{mb}"]
                for j in range(2):
                    for x in range(4):
                        o[:, 4 * j + x] = (o[:, 4 * j + x] * alpha[:, 2 * j + (x & 1)]).astype(F32)
            if FORM == "rs":
                yield from self.pv_regs(w, it, s, kt, p_addr)
            else:
                for mb in range(8):
                    for kk in range(4):
                        a_addr = kt + mb * MLA_CHUNK + (kk * 32 if "pv_kk_off" in MUT else kk * 16 * 128)
                        lbo, sbo = (1024, MLA_CHUNK) if "pv_lbo_sbo_swap" in MUT else (MLA_CHUNK, 1024)
                        ta = "pv_trans0" not in MUT
                        unit.issue(w, 16, wg_desc(a_addr, lbo, sbo), wg_desc(p_addr + kk * 32, 16, 1024), ta, False,
                                   f"o{mb}", True, ("pv", it, mb, kk))
                        yield ("step", None)
                unit.commit(w)
                yield from self.wg_wait(w, 0)
            # direct check: O^T rows (latent) x columns (heads) against float64 from the same P, alpha
            ref = self.ot_ref(it)
            for mb in range(8):
                o = acc[f"o{mb}"]
                for lane in range(32):
                    for i in range(8):
                        r, col = d_coords(w, lane, i)
                        want = ref[64 * mb + r, col]
                        if abs(float(o[lane, i]) - want) > 2e-5 * (1 + self.ot_scale[it][col]):
                            raise SimError(f"O^T[latent {64 * mb + r}][head {col}] tile {it}: {o[lane, i]} vs {want}")
            self.counts["ot_checks"] += 1
            if FORM == "ss" and "empty_early" not in MUT:
                self.release(w, s)  # lane 0 after __syncwarp
            yield ("step", None)
        # ---- the end
        for k in range(4):
            for o in (4, 8, 16):
                l_part[:, k] = (l_part[:, k] + l_part[lanes ^ o, k]).astype(F32)
        yield from self.named_sync(NR_NB_MATH, 128)
        for lane in range(32):
            if g_of[lane] == 0:
                t = t_of[lane]
                for k in range(4):
                    S.set_f32(NR_RED + 4 * (w * 16 + 8 * (k // 2) + 2 * t + (k & 1)), l_part[lane, k], "red st")
        yield ("step", None)
        yield from self.named_sync(NR_NB_MATH, 128)
        heads, h0, b, splits, split = P.heads, self.h0, self.b, self.splits, self.split
        for lane in range(32):
            g, t = g_of[lane], t_of[lane]
            for k in range(4):
                col = 8 * (k // 2) + 2 * t + (k & 1)
                l_tot = F32(F32(F32(S.f32(NR_RED + 4 * col) + S.f32(NR_RED + 4 * (16 + col))) +
                                S.f32(NR_RED + 4 * (32 + col))) + S.f32(NR_RED + 4 * (48 + col)))
                inv = F32(1.0) / l_tot if l_tot > 0 else F32(0.0)
                h = h0 + col
                if h >= heads:
                    continue
                j, e = k // 2, k & 1
                for mb in range(8):
                    for hf in range(2):
                        if "out_idx" in MUT:
                            c = 64 * mb + 16 * w + 2 * g + hf
                        else:
                            c = 64 * mb + 16 * w + g + 8 * hf
                        v = F32(acc[f"o{mb}"][lane, 4 * j + 2 * hf + e] * inv)
                        if splits == 1:
                            self.write_out("out", (b, h, c), float(bf16_to_f(bf16_round(v))))
                        else:
                            self.write_out("o_part", (b, split, h, c), float(v))
                if splits > 1 and w == 0 and g == 0:
                    lse = float((m_run[lane, k] + F32(np.log2(l_tot))) * F32(0.6931471805599453)) if l_tot > 0 else -np.inf
                    self.write_out("lse", (b, split, h), lse)

    def ot_ref(self, it):
        """float64 O^T after tile `it` from the recorded P and alpha (computed once per tile)."""
        if it not in self._ot:
            P = self.P
            prev = self._ot[it - 1] if it > 0 else np.zeros((D_LAT, 16))
            if len(self.alpha_rec[it]) != 16 or np.isnan(self.pmat[it]).any():
                raise SimError(f"O^T check of tile {it}: P or alpha incomplete when a warp's P.V retired")
            a = np.array([float(self.alpha_rec[it][c]) for c in range(16)])
            t0 = self.start + 64 * it
            V = np.zeros((64, D_LAT))
            for tok in range(64):
                if tok in self.loaded[it]:
                    V[tok] = P.cache_f[P.token_row(self.b, t0 + tok), :D_LAT]
                elif np.any(self.pmat[it][:, tok] != 0):
                    raise SimError(f"nonzero P for an unloaded token {tok}")
            pv = V.T @ self.pmat[it].T  # [512, 16]
            self._ot[it] = prev * a[None, :] + pv
            self.ot_scale[it] = (np.abs(prev * a[None, :]) + np.abs(V).T @ np.abs(self.pmat[it].T)).max(0)
        return self._ot[it]

    # ---------------------------------------------------------- the kernel
    def run(self):
        P = self.P
        b, split, splits = self.b, self.split, self.splits
        self.h0 = h0 = self.hx * NR_HEADS
        ln = P.lens[b]
        start, end = split_range(ln, split, splits)
        self.start, self.end = start, end
        self.ntiles = 0
        if splits > 1 and start >= ln:  # empty_split: threads r < 64 (not 16) write lse
            for r in range(64):
                if h0 + r >= P.heads:
                    break
                if r >= NR_HEADS:
                    self.notes.add("empty_split writes lse of heads beyond the CTA's 16 (same -inf, benign)")
                self.write_out("lse", (b, split, h0 + r), -np.inf)
            return "empty"
        ntiles = (end - start + 63) // 64 if end > start else 0
        self.ntiles = ntiles
        self.full = [[MBar(1, f"full[{s}][{c}]") for c in range(9)] for s in range(NR_STAGES)]
        self.empty = [MBar(1 if "empty_count1" in MUT else 4, f"empty[{s}]") for s in range(NR_STAGES)]
        last = ntiles - 1
        self.zeroed = None
        if last >= 0 and last < NR_STAGES and end - (start + 64 * last) < 64 and "no_zero" not in MUT:
            a = NR_ST0 + last * NR_TILE
            self.S.write(a, np.zeros(NR_TILE, np.uint8), "zeroing")
            self.zeroed = last
        for i in range(NR_HEADS * (D_QK // 8)):
            r, col = i // (D_QK // 8), (i % (D_QK // 8)) * 8
            h = h0 + r
            v = P.q_f[b, h, col:col + 8] if h < P.heads else np.zeros(8)
            bits = bf16_round(v.astype(F32))
            a = NR_Q + nr_q_off(r, col)
            assert a % 16 == 0
            self.S.write(a, np.asarray(bits, "<u2").view(np.uint8), "Q st")
        # (fence.proxy.async + __syncthreads: everything above precedes every actor below)
        self.unit = WgmmaUnit(self)
        self.loaded = {}
        self.pmat = {it: np.full((16, 64), np.nan) for it in range(ntiles)}
        self.alpha_rec = {it: {} for it in range(ntiles)}
        self._ot, self.ot_scale = {}, {}
        actors = {("math", w): self.consumer(w) for w in range(4)}
        actors["producer"] = self.producer()
        steps = self.run_actors(actors)
        for op in self.unit.ops:
            if len(op["retired"]) != 4:
                raise SimError(f"wgmma {op['tag']} never waited for by every warp")
        # every mbarrier phase issued was consumed: full barriers at ceil(ntiles / 2) phases
        for s in range(NR_STAGES):
            n_s = len(range(s, ntiles, NR_STAGES))
            for c in range(9):
                if self.full[s][c].phase != n_s or self.full[s][c].tx:
                    raise SimError(f"full[{s}][{c}] ended at phase {self.full[s][c].phase}, expected {n_s}")
        return steps


# ---------------------------------------------------------------- a launch (combine: ptx_model)
def run_case(name, seed, heads, block_size, lens, splits, qmul=1.0, sched_seed=None):
    rng = np.random.default_rng(seed)
    P = Problem(rng, heads, block_size, lens, scale=1.0 / math.sqrt(192.0), qmul=qmul, runs="runs:" in name)
    rs = random.Random(seed if sched_seed is None else sched_seed)
    gout = dict(out={}, o_part={}, lse={})
    hx_n = (heads + NR_HEADS - 1) // NR_HEADS  # grid.x
    info = []
    notes = set()
    for b in range(len(lens)):
        for hx in range(hx_n):
            for split in range(splits):
                cta = Cta(P, b, hx, split, splits, rs, gout)
                r = cta.run()
                notes |= cta.notes
                info.append((b, hx, split, cta.start, cta.end, cta.ntiles, getattr(cta, "zeroed", None),
                             dict(cta.counts), r))
    # outputs: every element exactly once, then the numbers
    worst_k, worst_x = 0.0, 0.0
    for b in range(len(lens)):
        ln = lens[b]
        if splits == 1:
            got = np.array([[gout["out"].pop((b, h, c)) for c in range(D_LAT)] for h in range(heads)])
        else:
            parts, lses = [], []
            for sp in range(splits):
                lse = np.array([gout["lse"].pop((b, sp, h)) for h in range(heads)])
                lo, hi = split_range(ln, sp, splits)
                if lo < hi:
                    op = np.array([[gout["o_part"].pop((b, sp, h, c)) for c in range(D_LAT)] for h in range(heads)])
                    ko, kl = P.kernel_order(b, lo, hi)
                    e = np.abs(op - ko).max() / np.abs(ko).max()
                    el = np.abs(lse - kl).max()
                    if e > 1e-4 or el > 1e-4:
                        raise SimError(f"{name}: b {b} split {sp}: o_part err {e:.2e}, lse err {el:.2e} vs kernel-order f64")
                    xo, xl = P.exact(b, lo, hi)
                    if np.abs(lse - xl).max() > 4e-3:  # l sums bf16-rounded P (2^-9 each)
                        raise SimError(f"{name}: lse vs exact {np.abs(lse - xl).max():.2e}")
                    worst_k = max(worst_k, e)
                else:
                    if not np.all(lse == -np.inf):
                        raise SimError(f"{name}: empty split {sp} lse {lse}")
                    op = np.zeros((heads, D_LAT))
                parts.append(op)
                lses.append(lse)
            got = np.stack([combine([p[h] for p in parts], [l[h] for l in lses]) for h in range(heads)])
        if not np.all(np.isfinite(got)):
            raise SimError(f"{name}: b {b}: non-finite output")
        if ln == 0:
            if np.any(got != 0):
                raise SimError(f"{name}: b {b}: empty sequence must give zeros")
            continue
        xo, _ = P.exact(b, 0, ln)
        ex = np.abs(got - xo).max() / np.abs(xo).max()
        if splits == 1:
            ko, _ = P.kernel_order(b, 0, ln)
            ek = np.abs(got - ko).max() / np.abs(ko).max()
            if ek > 8e-3:  # bf16 output rounding
                raise SimError(f"{name}: b {b}: err vs kernel-order f64 {ek:.2e}")
            worst_k = max(worst_k, ek)
        if ex > 1e-2:
            raise SimError(f"{name}: b {b}: err vs exact f64 {ex:.2e}")
        worst_x = max(worst_x, ex)
    left = {k: len(v) for k, v in gout.items() if v}
    if left:
        stray = {k: sorted(v)[:4] for k, v in gout.items() if v}
        raise SimError(f"{name}: stray output writes {left}: {stray}")
    return worst_k, worst_x, info, notes


CASES = [
    # name, seed, heads, block_size, lens, splits, q multiplier
    ("len 1, bs 64, heads 16", 1, 16, 64, [1], 1, 1.0),
    ("bs 16, 150 tokens (3 tiles, partial 3rd in reused stage 0)", 2, 16, 16, [150], 1, 1.0),
    ("bs 32, 100 tokens (partial 2nd tile in never-used stage 1)", 3, 16, 32, [100], 1, 1.0),
    ("bs 128, heads 5, lens 200 / 64 / 0 (empty sequence)", 4, 5, 128, [200, 64, 0], 1, 1.0),
    ("bs 64, heads 100 (grid.x 7), 300 tokens, 3 splits", 5, 100, 64, [300], 3, 1.0),
    ("bs 16, 70 tokens, 3 splits (3rd empty)", 6, 16, 16, [70], 3, 1.0),
    ("bs 128, heads 100, lens 129 / 5, 2 splits (one empty)", 7, 100, 128, [129, 5], 2, 1.0),
    ("bs 32, 320 tokens (5 full tiles, parity wraps)", 8, 16, 32, [320], 1, 1.0),
    ("bs 16, heads 5, len 0, 2 splits (all empty)", 9, 5, 16, [0], 2, 1.0),
    ("bs 64, 260 tokens, peaky scores (q x 6)", 10, 16, 64, [260], 2, 6.0),
    ("bs 128, heads 20 (2nd CTA 4 live heads), len 1 and 65", 11, 20, 128, [1, 65], 1, 1.0),
    ("bs 8, 3 seqs 77 / 128 / 9, 2 splits", 12, 16, 8, [77, 128, 9], 2, 1.0),
    ("bs 4, 45 tokens (TMA boxes of 4 rows)", 13, 16, 4, [45], 1, 1.0),
    ("runs: bs 16, 2 seqs 330 / 70, 2 splits (one-box copies)", 14, 16, 16, [330, 70], 2, 1.0),
    ("runs: bs 8, 200 tokens", 15, 16, 8, [200], 1, 1.0),
]

MUTANTS = ["pv_trans0", "pv_lbo_sbo_swap", "pv_kk_off", "no_zero", "parity", "empty_early", "no_sync_p",
           "stsm_piece", "q_swz", "mask", "out_idx", "sbo_s", "no_sync_red", "empty_count1"]
# the shared-memory A operand's mutants mean nothing to the rs form; the rest apply to both
MUTANTS_SS_ONLY = {"pv_trans0", "pv_lbo_sbo_swap", "pv_kk_off"}
# rs form only: matrices 1 and 2 of ldmatrix.x4 exchanged (a1 <-> a2: tokens / columns roles
# swapped in the lane addresses); the 16-byte piece not swizzled; the stage released after the
# 7th m-block's loads (before the 8th's); ldmatrix without .trans; wait_group 2 in place of 1
# (an A register buffer reloaded while its wgmma may still read it)
MUTANTS_RS = ["rs_reg_order", "rs_no_swz", "rs_release_early", "rs_notrans", "rs_wait2"]


def forms_of(argv):
    if "--ss" in argv and "--rs" not in argv:
        return ["ss"]
    if "--rs" in argv and "--ss" not in argv:
        return ["rs"]
    return ["ss", "rs"]


def main(argv):
    global FORM
    forms = forms_of(argv)
    if "--mutants" in argv:
        ok = True
        runs = [(m, f) for f in forms for m in MUTANTS + MUTANTS_RS
                if (f == "ss" and not m.startswith("rs_")) or (f == "rs" and m not in MUTANTS_SS_ONLY)]
        for mname, FORM in runs:
            MUT.clear()
            MUT.add(mname)
            caught = None
            for rep in range(3):
                for i in (2, 1, 5, 7, 8):
                    name, seed, heads, bs, lens, splits, qm = CASES[i]
                    try:
                        run_case(name, seed, heads, bs, lens, splits, qm, sched_seed=seed + 77 * rep)
                    except (SimError, AssertionError) as e:
                        caught = f"case {i}: {str(e)[:110]}"
                        break
                if caught:
                    break
            print(f"[{'caught' if caught else 'MISSED'}] {FORM} {mname}: {caught}")
            ok &= caught is not None
        MUT.clear()
        FORM = "ss"
        return 0 if ok else 1
    print("constants vs .cu:", check_defines())
    for line in calibrate():
        print("calibration:", line)
    sel = [int(x) for x in argv if x.isdigit()]
    reps = int(argv[argv.index("--stress") + 1]) if "--stress" in argv else 1
    if reps > 1:
        sel = [x for x in sel if x != reps]
    ok = True
    for FORM, (i, (name, seed, heads, bs, lens, splits, qm)) in [(f, c) for f in forms for c in enumerate(CASES)]:
        if sel and i not in sel:
            continue
        name = f"[{FORM}] {name}"
        try:
            for rep in range(1, reps):  # other random interleavings of the same data
                run_case(name, seed, heads, bs, lens, splits, qm, sched_seed=1000 * rep + seed)
            ek, ex, info, notes = run_case(name, seed, heads, bs, lens, splits, qm)
            print(f"[ok]   {i} {name}: rel err vs kernel-order f64 {ek:.1e}, vs exact f64 {ex:.1e}")
            for (b, hx, sp, st, en, nt, z, cnt, r) in info:
                if hx > 1 and hx < (heads + 15) // 16 - 1:
                    continue
                print(f"         b {b} x {hx} split {sp}: tokens [{st},{en}) tiles {nt} zeroed {z} {cnt if nt else r}")
            for n in sorted(notes):
                print("         note:", n)
        except (SimError, AssertionError) as e:
            ok = False
            print(f"[FAIL] {i} {name}: {e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
