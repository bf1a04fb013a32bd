#!/usr/bin/env python3
"""Protocol emulation of the paired dynamic grouped kernel (RowTile::Ws128PairDyn,
grouped_tile_ws<GATE_UP, true, true> in kernels/src/cu/grouped.cu): a cluster of two CTAs, each a
TMA producer thread and two consumer warpgroups over a 4-stage ring, units taken from a global
counter by rank 0 and named to rank 1 through a ring of slots and remote barriers, weight halves
(row pairs) or activation boxes (feature pairs) multicast into both CTAs' stages.

Modelled: mbarriers (arrival counts, tx bytes, phases; ptx_model.MBar), TMA copies (local or
multicast; each lands later, in any order, completing bytes on the barrier at the same offset in
every destination CTA), the remote name store + release arrival, wgmma reads (from issue to the
wait that retires them), several clusters sharing the counter. Checked:
  * no deadlock; every stage's full phase completes with exactly the bytes announced;
  * a copy never lands in (nor is issued into) a stage some consumer of that CTA may still read,
    and every consumer read sees the rows / features / k step it means;
  * every (row, feature block) of every expert is computed exactly once over all clusters, and
    experts not held write zeros only;
  * both CTAs walk the same units in the same order (same stage count).
Not modelled: the numbers (the MMAs and epilogue are Ws128Dyn's, checked on the GPU).

Why it exists: the kernel has never run; a protocol mistake hangs or corrupts a device call.
Mirrors the .cu by hand (and ws_pdyn_unit mirrors kernels/src/ops/grouped.rs's test copy).
Run: python3 scripts/emu/grouped_pair_dyn_protocol.py [trials] [--mutants]
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ptx_model import MBar, SimError, run_mutants  # noqa: E402

STAGES = 4
MUT = set()


class TxBar(MBar):
    """An mbarrier whose tx-count may go below zero within a phase (PTX ISA: the tx-count's range
    is -(2^20 - 1) .. 2^20 - 1): the partner's multicast may land in this CTA's stage before this
    CTA's producer announced the phase's bytes. The phase still completes only when every
    arrival is in and the count is back at zero."""

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        if self.tx < -(1 << 20) + 1:
            raise SimError(f"mbarrier {self.name}: tx count out of range")
        self._maybe_complete()


def tile_offsets(counts):
    toff, off = [0], [0]
    for c in counts:
        toff.append(toff[-1] + (c + 127) // 128)
        off.append(off[-1] + c)
    return toff, off


def pdyn_units(mb, nb):
    rp, odd = mb // 2, mb % 2
    return (nb // 2) * (2 * rp + odd) + (nb % 2) * (rp + odd)


def pdyn_unit(uoff, toff, off, nb, nf, u, rank):
    """ws_pdyn_unit: (expert, row0, nrows, f0, feature pair?, mine?)."""
    e = max(i for i in range(len(uoff) - 1) if uoff[i] <= u)
    mb = toff[e + 1] - toff[e]
    rp = mb // 2
    g = max(2 * rp + mb % 2, 1)
    local = u - uoff[e]
    q, w = local // g, local % g
    nfq = min(2, nb - 2 * q)
    if w < nfq * rp:
        j = w // rp
        n, m, fpair, mine = 2 * q + j, 2 * (w - j * rp) + rank, False, True
    else:
        n, m, fpair, mine = 2 * q + rank, mb - 1, True, 2 * q + rank < nb
    row0 = off[e] + m * 128
    return e, row0, min(128, off[e + 1] - row0), n * nf, fpair, mine


class Sched:
    """The random interleaving of every actor of every cluster and the TMA engine."""

    def __init__(self, rs):
        self.rs, self.actors, self.tma_q = rs, {}, []

    def run(self):
        blocked = {k: None for k in self.actors}
        done = set()
        while len(done) < len(self.actors) or self.tma_q:
            runnable = [k for k in self.actors if k not in done and (blocked[k] is None or blocked[k]())]
            if self.tma_q:
                runnable.append("tma")
            if not runnable:
                raise SimError("DEADLOCK: " + ", ".join(str(k) for k in self.actors if k not in done))
            k = self.rs.choice(runnable)
            if k == "tma":
                cta, stage, part, tag, nbytes = self.tma_q.pop(self.rs.randrange(len(self.tma_q)))
                cta.land(stage, part, tag, nbytes)
                continue
            try:
                kind, cond = next(self.actors[k])
                blocked[k] = cond if kind == "block" else None
            except StopIteration:
                done.add(k)


def wait(bar, parity):
    while not bar.try_wait(parity):
        yield ("block", lambda: bar.try_wait(parity))


class Cta:
    def __init__(self, sched, prob, rank):
        self.sched, self.P, self.rank = sched, prob, rank
        self.full = [TxBar(1, f"full{s}") for s in range(STAGES)]
        # both CTAs' 8 consumer warps (mutant: this CTA's only, the partner's arrivals then
        # counting towards later phases)
        self.empty = [MBar(8 if "empty8" in MUT else 16, f"empty{s}") for s in range(STAGES)]
        self.namebar = [MBar(1, f"name{s}") for s in range(STAGES)]
        self.names = [None] * STAGES
        self.s_tile = [None] * STAGES
        self.data = {}      # (stage, part) -> tag
        self.inflight = {}  # (stage, part) -> copies in flight
        self.reads = {}     # (stage, part) -> readers
        self.stages_walked = 0
        self.units = []

    def land(self, stage, part, tag, nbytes):
        if self.reads.get((stage, part)):
            raise SimError(f"rank {self.rank}: copy lands in stage {stage} {part} while {self.reads[(stage, part)]} read it")
        self.inflight[(stage, part)] -= 1
        self.data[(stage, part)] = tag
        self.full[stage].complete_tx(nbytes)

    def copy(self, dsts, stage, part, tag, nbytes):
        for d in dsts:
            if d.reads.get((stage, part)):
                raise SimError(f"copy issued into rank {d.rank} stage {stage} {part} while it is read")
            d.inflight[(stage, part)] = d.inflight.get((stage, part), 0) + 1
            self.sched.tma_q.append((d, stage, part, tag, nbytes))

    # ---------------------------------------------------------- producer (grouped.cu PDYN branch)
    def producer(self):
        P, rank = self.P, self.rank
        it = ui = 0
        both = [self.cl[0], self.cl[1]]
        while True:
            s0, ns = it % STAGES, ui % STAGES
            if "no_empty_wait_first" not in MUT:
                yield from wait(self.empty[s0], ((it // STAGES) & 1) ^ 1)
            if rank == 0:
                t = P.counter[0]
                P.counter[0] += 1
                if t >= P.total:
                    t = -1
                peer = self.cl[1]
                peer.names[ns] = t
                peer.namebar[ns].arrive()
            else:
                yield from wait(self.namebar[ns], (ui // STAGES) & 1)
                t = self.names[ns]
            ui += 1
            self.units.append(t)
            x = pdyn_unit(P.uoff, P.toff, P.off, P.nb, P.nf, max(t, 0), rank)
            e, row0, nrows, f0, fpair, mine = x
            held = t >= 0 and P.held[e]
            if not held:
                yield from wait(self.empty[s0], ((it // STAGES) & 1) ^ 1)
                self.s_tile[s0] = t
                self.full[s0].arrive()
                it += 1
                if t < 0:
                    return
                yield ("step", None)
                continue
            two = nrows > 64
            a_bytes = 2 * 8192 if two else 8192
            nbytes = a_bytes + (32768 if mine else 0)
            for kt in range(P.KT):
                s = it % STAGES
                yield from wait(self.empty[s], ((it // STAGES) & 1) ^ 1)
                if kt == 0:
                    self.s_tile[s] = t
                self.full[s].arrive_expect_tx(nbytes if "bytes" not in MUT else nbytes - 8192)
                if not fpair:
                    self.copy([self], s, "A0", ("A", row0, kt), 8192)
                    if two:
                        self.copy([self], s, "A1", ("A", row0 + 64, kt), 8192)
                    self.copy(both, s, f"B{rank}", ("B", e, f0, rank, kt), 16384)
                else:
                    if rank == 0:
                        self.copy([self] if "fpair_local" in MUT else both, s, "A0", ("A", row0, kt), 8192)
                    elif two:
                        self.copy(both, s, "A1", ("A", row0 + 64, kt), 8192)
                    if mine:
                        self.copy([self], s, "B0", ("B", e, f0, 0, kt), 16384)
                        self.copy([self], s, "B1", ("B", e, f0, 1, kt), 16384)
                it += 1
                yield ("step", None)

    # ---------------------------------------------------------- consumers (ws_consume, DYN + PAIR)
    def consumer(self, c):
        P, rank = self.P, self.rank
        it = 0
        rid = 0
        peer = self.cl[1 - rank]

        def release(s):
            for _ in range(4):  # lane 0 of each warp, here and in the partner
                self.empty[s].arrive()
                if "empty8" not in MUT:
                    peer.empty[s].arrive()

        while True:
            s = it % STAGES
            yield from wait(self.full[s], (it // STAGES) & 1)
            t = self.s_tile[s]
            if t is None or t < 0:
                return
            e, row0, nrows, f0, fpair, mine = pdyn_unit(P.uoff, P.toff, P.off, P.nb, P.nf, t, rank)
            if not mine:
                nrows = 0
            r0 = 64 * c
            nr = min(64, nrows - r0)
            if not P.held[e]:
                for r in range(max(nr, 0)):
                    P.out_zero(row0 + r0 + r, f0)
                release(s)
                it += 1
                continue
            active = nr > 0
            for kt in range(P.KT):
                s = it % STAGES
                yield from wait(self.full[s], (it // STAGES) & 1)
                if active:
                    rid += 1
                    parts = [(f"A{c}", ("A", row0 + 64 * c, kt)), ("B0", ("B", e, f0, 0, kt)),
                             ("B1", ("B", e, f0, 1, kt))]
                    for part, want in parts:
                        key = (s, part)
                        if self.inflight.get(key):
                            raise SimError(f"rank {rank} c {c} reads stage {s} {part} with a copy in flight")
                        if self.data.get(key) != want:
                            raise SimError(f"rank {rank} c {c} unit {t} kt {kt}: stage {s} {part} holds "
                                           f"{self.data.get(key)}, wants {want}")
                        self.reads.setdefault(key, set()).add((c, rid))
                    yield ("step", None)  # the wgmma runs; wait<1> at the next step retires it
                    for part, _ in parts:
                        self.reads[(s, part)].discard((c, rid))
                release(s)
                it += 1
            if active:
                for r in range(nr):
                    P.out_tile(row0 + r0 + r, f0)


class Problem:
    def __init__(self, rng, n_exp, nf, n_feat, kt):
        self.counts = [rng.choice([0, 1, 7, 64, 65, 128, 129, 200, 257, 300, 351, 385]) for _ in range(n_exp)]
        self.held = [rng.random() > 0.15 for _ in range(n_exp)]
        self.toff, self.off = tile_offsets(self.counts)
        self.nf, self.nb, self.KT = nf, (n_feat + nf - 1) // nf, kt
        self.uoff = [0]
        for e in range(n_exp):
            self.uoff.append(self.uoff[-1] + pdyn_units(self.toff[e + 1] - self.toff[e], self.nb))
        self.total = self.uoff[-1]
        self.counter = [0]
        self.written = {}

    def out_tile(self, row, f0):
        k = (row, f0)
        if k in self.written:
            raise SimError(f"row {row} feature block {f0} written twice")
        self.written[k] = "tile"

    def out_zero(self, row, f0):
        k = (row, f0)
        if k in self.written:
            raise SimError(f"row {row} feature block {f0} written twice")
        self.written[k] = "zero"

    def check(self):
        for e in range(len(self.counts)):
            for r in range(self.off[e], self.off[e + 1]):
                for n in range(self.nb):
                    got = self.written.get((r, n * self.nf))
                    want = "tile" if self.held[e] else "zero"
                    if got != want:
                        raise SimError(f"expert {e} row {r} block {n}: {got}, expected {want}")


def trial(rng):
    prob = Problem(rng, rng.randint(1, 9), 128, rng.choice([72, 256, 384, 1408 // 8]), rng.randint(1, 3))
    sched = Sched(random.Random(rng.random()))
    clusters = rng.randint(1, 3)
    ctas = []
    for k in range(clusters):
        pair = [Cta(sched, prob, 0), Cta(sched, prob, 1)]
        for cta in pair:
            cta.cl = pair
            sched.actors[(k, cta.rank, "p")] = cta.producer()
            for c in range(2):
                sched.actors[(k, cta.rank, c)] = cta.consumer(c)
        ctas.append(pair)
    sched.run()
    prob.check()
    for a, b in ctas:
        if a.units != b.units:
            raise SimError(f"the pair walked different units: {a.units} / {b.units}")


MUTANTS = ["no_empty_wait_first", "bytes", "fpair_local", "empty8"]

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 1500
    if "--mutants" in sys.argv:

        def many():
            rng = random.Random(5)
            for _ in range(400):
                trial(rng)

        sys.exit(0 if run_mutants(MUTANTS, MUT, many) else 1)
    rng = random.Random(1)
    for _ in range(n):
        trial(rng)
    print(f"[ok] {n} random expert layouts x 1-3 clusters: no deadlock, race, stale read; every tile once")
