"""The PTX / Hopper pieces the CPU emulators of the MLA decode kernels share.

Models, per PTX semantics: bf16 rounding, the 128-byte swizzle (SWIZZLE_128B) on an absolute
shared address, a TMA 2D box copy into shared memory (OOB rows zero-filled), shared memory with
optional write guards against bytes in-flight wgmma ops read, stmatrix.m8n8.x4.trans.b16,
ldmatrix.m8n8.x4(.trans).b16, the register A fragment and the f32 accumulator layout of wgmma
m64nN, wgmma commit_group / wait_group bookkeeping, mbarriers (arrival count, tx count, phase
parity), bar.sync named barriers; and the emulators' plumbing: a random-interleaving scheduler
of generator actors and the TMA engine (deadlock detection), the paged KV cache's block table,
the token range of a split and the combine of split outputs.

Imported by mla_fp8_regs_sim.py and mla_narrow_sim.py (run as scripts; they put this directory
on sys.path). Change it with both in mind: each mirrors its .cu by hand.
"""
import numpy as np

F32 = np.float32
LOG2E = F32(1.4426950408889634)


class SimError(Exception):
    pass


# ---------------------------------------------------------------- numeric formats
def bf16_round(x):  # f32 -> bf16 bits, round to nearest even
    x = np.asarray(x, F32)
    b = x.view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_to_f(bits):
    return (np.asarray(bits, np.uint32) << 16).astype(np.uint32).view(F32)


# ---------------------------------------------------------------- swizzles
def hw_swz128(addr):  # the 128-byte swizzle as the TMA unit / wgmma apply it to an absolute shared address
    return addr ^ (((addr >> 7) & 7) << 4)


def swz_piece(row, piece):  # mla_common.cuh: 16-byte piece of a 128-byte row, swizzled
    return row * 128 + ((piece ^ (row & 7)) << 4)


# ---------------------------------------------------------------- shared memory
class Smem:
    """Shared memory as bytes (0xFF: NaN as e4m3, f16, bf16 and f32). `busy` counts the in-flight
    wgmma readers of each byte (kept by a descriptor wgmma model); a write that names its writer
    (`who`) is checked against it, an anonymous write is not."""

    def __init__(self, n, fill=0xFF):
        self.m = np.full(n, fill, np.uint8)
        self.busy = np.zeros(n, np.int32)

    def guard(self, a, n, who):
        if self.busy[a:a + n].any():
            raise SimError(f"{who} writes shared bytes [{a}, {a + n}) while a wgmma that reads them is in flight")

    def write(self, a, data, who=None):
        if who is not None:
            self.guard(a, len(data), who)
        self.m[a:a + len(data)] = data

    def u32(self, a):
        assert a % 4 == 0
        return int(self.m[a:a + 4].view("<u4")[0])

    def set_u32(self, a, v, who=None):
        assert a % 4 == 0
        self.write(a, np.array([v], "<u4").view(np.uint8), who)

    def u16(self, a):
        return int(self.m[a:a + 2].view("<u2")[0])

    def set_u16(self, a, v, who=None):
        self.write(a, np.array([v], "<u2").view(np.uint8), who)

    def f32(self, a):
        return F32(self.m[a:a + 4].view("<f4")[0])

    def set_f32(self, a, v, who=None):
        self.write(a, np.array([v], "<f4").view(np.uint8), who)

    def v4(self, a):
        assert a % 16 == 0, "ld.shared.v4 misaligned"
        return [int(x) for x in self.m[a:a + 16].view("<u4")]

    def u16_at(self, addrs):  # vectorised 16-bit loads
        addrs = np.asarray(addrs)
        assert (addrs % 2 == 0).all()
        return self.m[addrs].astype(np.uint16) | (self.m[addrs + 1].astype(np.uint16) << 8)


def stmatrix_x4_trans(S, addrs, regs, who=None):
    """stmatrix.sync.aligned.m8n8.x4.trans.shared.b16: thread i's register j holds fragment
    element (row i/4; cols 2(i%4), +1) of matrix j; .trans stores the matrix column-major, so
    element (r, c) goes to the row addressed by lane 8j + c, position r. A misaligned row address
    is an AssertionError for anonymous writes, a SimError for guarded ones (`who`)."""
    for a in addrs:
        if who is None:
            assert a % 16 == 0
        elif a % 16:
            raise SimError("stmatrix row address misaligned")
    for i in range(32):
        g, t = i // 4, i % 4
        for j in range(4):
            v = int(regs[i][j])
            S.set_u16(addrs[8 * j + 2 * t] + 2 * g, v & 0xFFFF, who)
            S.set_u16(addrs[8 * j + 2 * t + 1] + 2 * g, v >> 16, who)


def ldmatrix_x4(S, addrs, trans):
    """ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16 -> [32, 4] u32: lanes 8j..8j+7 give the
    addresses of rows 0..7 of matrix j (16 bytes each) and register j of every thread receives
    matrix j. Non-trans: thread i gets (row i/4; cols 2(i%4), +1). Trans: (rows 2(i%4), +1;
    col i/4). Low half = the first element. (mla_fp8_regs_sim.py keeps its own loop-by-lane copy;
    mla_narrow_sim.calibrate() checks the two agree.)"""
    addrs = np.asarray(addrs, np.int64)
    if addrs.shape != (32,):
        raise SimError("ldmatrix.x4 takes 32 row addresses")
    if (addrs % 16).any():
        raise SimError("ldmatrix row address misaligned")
    rows = S.m[addrs[:, None] + np.arange(16)[None, :]].copy().view("<u2").astype(np.uint32)  # [32 rows, 8]
    i = np.arange(32)
    g, t = i // 4, i % 4
    regs = np.zeros((32, 4), np.uint32)
    for j in range(4):
        M = rows[8 * j:8 * j + 8]
        lo, hi = (M[g, 2 * t], M[g, 2 * t + 1]) if not trans else (M[2 * t, g], M[2 * t + 1, g])
        regs[:, j] = lo | (hi << 16)
    return regs


def wgmma_a_frag_bits(regs_by_warp):
    """The 16-bit A operand [64, 16] of a k16 wgmma with A from registers: warp w's [32, 4] u32
    hold rows 16w.. as the mma.m16n8k16 A fragment, g = lane/4, t = lane%4: a0 (row g; k 2t, 2t+1),
    a1 (row g+8; k 2t..), a2 (row g; k 2t+8..), a3 (row g+8; k 2t+8..), low half = smaller k."""
    A = np.zeros((64, 16), np.uint16)
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    for w in range(4):
        regs = np.asarray(regs_by_warp[w], np.uint32)
        for q in range(4):
            r = 16 * w + g + 8 * (q & 1)
            k = 2 * t + 8 * (q >> 1)
            A[r, k] = regs[:, q] & 0xFFFF
            A[r, k + 1] = regs[:, q] >> 16
    return A


# ---------------------------------------------------------------- TMA
def tma_copy_box(S, dst, tensor, c0, row, box_cols, box_rows, row_len, swizzle=True, who=None):
    """The shared-memory side of cp.async.bulk.tensor.2d: `box_rows` rows of `box_cols` elements
    of `tensor` from (row, c0), rows outside the tensor zero-filled, stored densely from `dst`
    in 16-byte chunks, each swizzled on its address (SWIZZLE_128B) when `swizzle`. Returns the
    bytes written (for complete_tx)."""
    nbytes = 0
    for r in range(box_rows):
        gr = row + r
        data = tensor[gr, c0:c0 + box_cols] if 0 <= gr < tensor.shape[0] else np.zeros(box_cols, tensor.dtype)
        if c0 + box_cols > row_len:
            raise SimError("TMA box past the row")
        raw = np.asarray(data, data.dtype.newbyteorder("<")).view(np.uint8)
        for ch in range(len(raw) // 16):
            a = dst + r * len(raw) + ch * 16
            S.write(hw_swz128(a) if swizzle else a, raw[ch * 16:ch * 16 + 16], who)
        nbytes += len(raw)
    return nbytes


def tile_pieces(block_size, t0, end, tile=64):
    """A tile of `tile` tokens from t0 loaded as boxes of min(block_size, tile) rows (one per cache
    block): (rows per box, boxes), no box when t0 >= end."""
    piece = min(block_size, tile)
    valid = min(tile, end - t0) if t0 < end else 0
    return piece, (valid + piece - 1) // piece


# ---------------------------------------------------------------- wgmma
def d_coords(w, lane, i):  # f32 accumulator i of thread (w, lane) of an m64nN result: (row, col)
    g, t = lane // 4, lane % 4
    j, x = i // 4, i % 4
    return 16 * w + g + (8 if x >= 2 else 0), 8 * j + 2 * t + (x & 1)


class WgmmaQueue:
    """A warpgroup's wgmma ops in issue order and per-warp bookkeeping: ops[k] is the k-th op
    (runs once all 4 warps issued it), next[w] the ops warp w issued, groups[w] its commit_group
    marks, acc[w] its accumulators (name -> [32, N/2] f32)."""
    clamp_wait_to_issued = False

    def __init__(self, ctx):
        self.ctx = ctx
        self.ops = []
        self.next = [0] * 4
        self.groups = [[] for _ in range(4)]
        self.acc = [dict() for _ in range(4)]

    def commit(self, w):
        self.groups[w].append(self.next[w])

    def wait_ready(self, w, n):  # wgmma.wait_group n of warp w: (may it pass, ops it retires)
        gs = self.groups[w]
        need = gs[-(n + 1)] if len(gs) > n else 0
        if self.clamp_wait_to_issued and need > self.next[w]:
            need = self.next[w]
        return all(o["done"] for o in self.ops[:need]), need

    def wait_group(self, w, n):  # scheduler generator: blocks until wait_ready; returns the ops retired
        ok, need = self.wait_ready(w, n)
        while not ok:
            yield ("block", lambda: self.wait_ready(w, n)[0])
            ok, need = self.wait_ready(w, n)
        return need


# ---------------------------------------------------------------- mbarrier and named barriers
class MBar:
    def __init__(self, count, name=None):
        self.count, self.pending, self.tx, self.phase, self.name = count, count, 0, 0, name

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def arrive(self):
        if self.pending <= 0:
            raise SimError("mbarrier over-arrived" if self.name is None else f"mbarrier {self.name} over-arrived")
        self.pending -= 1
        self._maybe_complete()

    def arrive_expect_tx(self, nbytes):
        self.tx += nbytes
        self.arrive()

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        if self.tx < 0:
            raise SimError("mbarrier tx count underflow (more bytes than expected)" if self.name is None
                           else f"mbarrier {self.name}: tx count underflow")
        self._maybe_complete()

    def try_wait(self, parity):  # mbarrier.try_wait.parity: the phase of this parity has completed
        return (self.phase & 1) != parity


class NamedBarriers:
    def __init__(self):
        self.arrived, self.gen, self.n = {}, {}, {}

    def arrive(self, bid, n, threads=32):
        if self.n.get(bid, n) != n:
            raise SimError(f"bar {bid} used with counts {self.n[bid]} and {n}")
        self.n[bid] = n
        self.arrived[bid] = self.arrived.get(bid, 0) + threads
        gen = self.gen.get(bid, 0)
        if self.arrived[bid] > n:
            raise SimError(f"bar {bid}: too many arrivals")
        if self.arrived[bid] == n:
            self.arrived[bid] = 0
            self.gen[bid] = gen + 1
        return gen


# ---------------------------------------------------------------- the scheduler
class CtaActors:
    """Waits and the random-interleaving scheduler of a CTA. Actors are generators that yield
    ("step", None) or ("block", cond). Uses the CTA's nb (NamedBarriers), rs (random.Random),
    tma_q (pending TMA copies) and tma_engine_step()."""

    def mbar_wait(self, bar, parity):
        while not bar.try_wait(parity):
            yield ("block", lambda: bar.try_wait(parity))

    def named_sync(self, bid, n):
        gen = self.nb.arrive(bid, n)
        while self.nb.gen.get(bid, 0) == gen:
            yield ("block", lambda: self.nb.gen.get(bid, 0) != gen)

    def run_actors(self, actors):
        """Runs the actors and the TMA engine in a random order until all are done; returns the steps."""
        blocked = {k: None for k in actors}
        done = set()
        steps = 0
        while len(done) < len(actors) or self.tma_q:
            runnable = [k for k in actors if k not in done and (blocked[k] is None or blocked[k]())]
            if self.tma_q:
                runnable.append("tma")
            if not runnable:
                raise SimError("DEADLOCK: " + ", ".join(str(k) for k in actors if k not in done))
            k = self.rs.choice(runnable)
            steps += 1
            if k == "tma":
                self.tma_engine_step()
                continue
            try:
                kind, cond = next(actors[k])
                blocked[k] = cond if kind == "block" else None
            except StopIteration:
                done.add(k)
        return steps


# ---------------------------------------------------------------- paged cache, splits
class PagedProblem:
    """The paged KV cache's bookkeeping: block_table[b][i] is the physical block of sequence b's
    i-th block of block_size tokens."""

    def page(self, rng, batch, block_size, max_blocks):
        """A random block table over batch * max_blocks + 3 physical blocks; returns the cache rows."""
        self.block_size, self.max_blocks = block_size, max_blocks
        nblk = batch * max_blocks + 3
        perm = rng.permutation(nblk)
        self.block_table = perm[:batch * max_blocks].reshape(batch, max_blocks).astype(np.int32)
        return nblk * block_size

    def page_runs(self, batch):
        """The block table in runs instead (kernels/src/check.rs BlockLayout::Runs): each sequence's
        blocks in order, as the allocator hands a prompt's out, except that every third 64-token
        tile has its first two blocks swapped, so that a TMA kernel takes both its one-box copies
        of a whole tile in consecutive blocks and its per-block pieces."""
        mb, bs = self.max_blocks, self.block_size
        per_tile = max(64 // bs, 1)
        bt = np.arange(batch * mb, dtype=np.int32).reshape(batch, mb)
        for b in range(batch):
            for t in range(1, (mb + per_tile - 1) // per_tile, 3):
                i = t * per_tile
                if per_tile > 1 and i + 1 < mb:
                    bt[b, i], bt[b, i + 1] = bt[b, i + 1], bt[b, i]
        self.block_table = bt

    def token_row(self, b, t):
        return int(self.block_table[b, t // self.block_size]) * self.block_size + t % self.block_size


def split_range(ln, split, splits, tile=64):
    """Tokens [start, end) of split `split` of a sequence of ln tokens (whole tiles per split)."""
    per = (ln + splits - 1) // splits
    per = max(tile, (per + tile - 1) // tile * tile)
    start = split * per
    return start, min(ln, start + per)


def combine(parts, lses):
    """The split outputs weighted by exp(lse - max lse) (an empty split, lse -inf, weighs 0)."""
    lse = np.array(lses)
    m = lse.max()
    if not np.isfinite(m):
        return np.zeros_like(parts[0])
    wts = np.where(np.isfinite(lse), np.exp(lse - m), 0.0)
    return sum(wts[s] * parts[s] for s in range(len(parts)) if wts[s] > 0) / wts.sum()


def run_mutants(mutants, mut, trial):
    """Each deliberately broken variant (added to the set `mut` in turn) must make `trial()` raise
    a SimError; prints what caught it. Returns whether every one was caught."""
    ok = True
    for m in mutants:
        mut.clear()
        mut.add(m)
        try:
            trial()
            print(f"[MISSED] {m}")
            ok = False
        except SimError as e:
            print(f"[caught] {m}: {str(e)[:120]}")
    mut.clear()
    return ok
