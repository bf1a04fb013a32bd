#!/usr/bin/env python3
"""Protocol emulation of mla_prefill_ws_bf16 (kernels/src/cu/mla_prefill_ws.cu): the TMA producer,
the Q / K / V rings and their mbarriers, the two consumer warpgroups' bursts and their turns at
the tensor cores, over random lists of (tile, head) items, with random interleavings.

Modelled: mbarriers (arrival counts, tx bytes, phase parity; ptx_model.MBar), named barriers
(thread counts; ptx_model.NamedBarriers), TMA copies (issued by the producer, landing later in any
order: a buffer's contents change when its copy lands), wgmma reads of shared memory (from issue
to the wait_group that retires them). Checked:
  * no deadlock (every actor finishes; ptx_model's scheduler);
  * a TMA copy is never issued into, nor lands in, a buffer some warpgroup's wgmma may still read,
    and a read never starts on a buffer with a copy in flight;
  * every read sees the data it means: Q of its item, K_j / V_j of its item's tile j;
  * each warpgroup passes n_kt + 1 bursts an item and takes as many turns as it gives back
    (but the second warpgroup's very last), every stage is handed back by both warpgroups, and at
    the end every barrier has completed exactly the phases the kernel expects.
Not modelled: the numbers (the kernel's math is mla_prefill_wgmma_bf16's, checked on the GPU).

Why it exists: GPU time is scarce and the kernel has never run; a protocol mistake (a stage handed
back early, a parity off by one, an unbalanced turn) would hang or corrupt a device call. It
mirrors the .cu by hand: change it with the kernel. Deliberately broken protocols (--mutants)
must each be caught.
Run: python3 scripts/emu/mla_prefill_ws_protocol.py [trials] [--mutants]
"""
import random
import sys
import os

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ptx_model import CtaActors, MBar, NamedBarriers, SimError, run_mutants  # noqa: E402
# the tile geometry of the wgmma prefill kernels (n_kt; per warpgroup n_wt, the 64-key last tile)
from mla_prefill_persist_protocol import geometry  # noqa: E402

CH = 128 * 128
MUT = set()


class Cta(CtaActors):
    def __init__(self, items, rs):
        self.items, self.rs = items, rs
        self.nb = NamedBarriers()
        self.tma_q = []
        self.qf, self.qe = MBar(1, "Q full"), MBar(8, "Q empty")
        self.kf = [MBar(1, f"K full {s}") for s in range(2)]
        self.ke = [MBar(8, f"K empty {s}") for s in range(2)]
        self.vf = [MBar(1, f"V full {s}") for s in range(2)]
        self.ve = [MBar(8, f"V empty {s}") for s in range(2)]
        self.data = {}      # buffer -> tag of what it holds
        self.inflight = {}  # buffer -> copies issued, not landed
        self.reads = {}     # buffer -> set of (consumer, read id) active
        self.turns = [[0, 0], [0, 0]]  # per consumer: takes, gives

    # ---------------------------------------------------------- TMA
    def tma(self, buf, tag, bar, nbytes):
        if self.reads.get(buf):
            raise SimError(f"TMA into {buf} (for {tag}) while {self.reads[buf]} may read it")
        self.inflight[buf] = self.inflight.get(buf, 0) + 1
        self.tma_q.append((buf, tag, bar, nbytes))

    def tma_engine_step(self):
        buf, tag, bar, nbytes = self.tma_q.pop(self.rs.randrange(len(self.tma_q)))
        if self.reads.get(buf):
            raise SimError(f"TMA lands in {buf} (for {tag}) while {self.reads[buf]} may read it")
        self.inflight[buf] -= 1
        self.data[buf] = tag
        bar.complete_tx(nbytes)

    # ---------------------------------------------------------- reads (wgmma issue .. retire)
    def read_start(self, c, rid, buf, want):
        if self.inflight.get(buf):
            raise SimError(f"consumer {c} reads {buf} (wants {want}) with a copy into it in flight")
        if self.data.get(buf) != want:
            raise SimError(f"consumer {c} reads {buf}: holds {self.data.get(buf)}, wants {want}")
        self.reads.setdefault(buf, set()).add((c, rid))

    def read_end(self, c, rid, buf):
        self.reads[buf].discard((c, rid))

    # ---------------------------------------------------------- producer
    def producer(self):
        st = dict(kf=0, vf=0)

        def issue_kv(item, j):
            kf, vf = st["kf"], st["vf"]
            ks, vs = kf & 1, vf & 1
            if kf >= 2:
                yield from self.mbar_wait(self.ke[ks], ((kf >> 1) - 1) & 1)
            self.kf[ks].arrive_expect_tx(3 * CH)
            for c in range(3):
                self.tma(f"K{ks}", (item, j), self.kf[ks], CH)
            if vf >= 2:
                yield from self.mbar_wait(self.ve[vs], ((vf >> 1) - 1) & 1)
            self.vf[vs].arrive_expect_tx(2 * CH)
            for c in range(2):
                self.tma(f"V{vs}", (item, j), self.vf[vs], CH)
            st["kf"], st["vf"] = kf + 1, vf + 1
            yield ("step", None)

        first_issued = False  # the item's tile 0 went out behind the item before
        for it, (item, (q_len, pos0, m0)) in enumerate(self.items):
            if it > 0:
                par = (it - 1) & 1
                yield from self.mbar_wait(self.qe, par ^ (1 if "q_parity" in MUT else 0))
            self.qf.arrive_expect_tx(3 * CH)
            for c in range(3):
                self.tma("Q", item, self.qf, CH)
            n_kt, _ = geometry(q_len, pos0, m0)
            for j in range(1 if first_issued else 0, n_kt):
                yield from issue_kv(item, j)
            first_issued = it + 1 < len(self.items)
            if first_issued:
                yield from issue_kv(self.items[it + 1][0], 0)

    # ---------------------------------------------------------- a consumer warpgroup (4 warps as one)
    def consumer(self, c):
        mine, other = 1 + c, 2 - c
        release = lambda bar: [bar.arrive() for _ in range(4)]  # lane 0 of each warp
        if c == 1 and self.items:
            self.nb.arrive(1, 256, 128)
        kf = vf = 0
        rid = 0
        for it, (item, (q_len, pos0, m0)) in enumerate(self.items):
            last_item = it == len(self.items) - 1
            n_kt, geo = geometry(q_len, pos0, m0)
            n_wt, last_half = geo[c]
            n_full = n_wt - (1 if last_half else 0)
            yield from self.mbar_wait(self.qf, it & 1)
            if n_wt == 0 or "qe_first" in MUT:  # (mutant: Q handed back before its Q.K)
                release(self.qe)
            kst = lambda j: (kf + j) & 1
            kpar = lambda j: ((kf + j) >> 1) & 1
            vst = lambda j: (vf + j) & 1
            vpar = lambda j: ((vf + j) >> 1) & 1

            def take():  # bar.sync of the warpgroup's 128 threads (256 with the other's arrival)
                self.turns[c][0] += 1
                gen = self.nb.arrive(mine, 256, 128)
                while self.nb.gen.get(mine, 0) == gen:
                    yield ("block", lambda: self.nb.gen.get(mine, 0) != gen)

            def give(final):
                if not (c == 1 and final) or "give_last" in MUT:
                    self.turns[c][1] += 1
                    self.nb.arrive(other, 256, 128)

            pending_pv = None  # (rid, buf) of the P.V in flight
            for j in range(n_wt):  # step(j): 128 keys, or 64 in the last-half tile
                yield from self.mbar_wait(self.kf[kst(j)], kpar(j))
                if j > 0:
                    yield from self.mbar_wait(self.vf[vst(j - 1)], vpar(j - 1))
                yield from take()
                rid += 1
                rq, rk = rid, rid + 1000000
                self.read_start(c, rq, "Q", item)
                self.read_start(c, rk, f"K{kst(j)}", (item, j))
                if j > 0:
                    rid += 1
                    self.read_start(c, rid, f"V{vst(j - 1)}", (item, j - 1))
                    pending_pv = (rid, f"V{vst(j - 1)}")
                give(False)
                if "k_early" in MUT:  # K_j handed back before S_j is waited for
                    release(self.ke[kst(j)])
                yield ("step", None)
                # wg_wait<1>: S_j done
                self.read_end(c, rq, "Q")
                self.read_end(c, rk, f"K{kst(j)}")
                if "k_early" not in MUT:
                    release(self.ke[kst(j)])
                if j == n_wt - 1 and "qe_first" not in MUT:
                    release(self.qe)
                yield ("step", None)  # softmax
                if "v_early" in MUT and pending_pv is not None:  # (mutant: before wg_wait<0>)
                    release(self.ve[vst(j - 1)])
                yield ("step", None)
                # wg_wait<0>: P_{j-1}.V_{j-1} done
                if pending_pv is not None:
                    self.read_end(c, *pending_pv)
                    pending_pv = None
                if j > 0 and "v_early" not in MUT:
                    release(self.ve[vst(j - 1)])
                yield ("step", None)
            for b in range(n_wt, n_kt + 1):
                final = last_item and b == n_kt
                if b < n_kt:
                    yield from self.mbar_wait(self.kf[kst(b)], kpar(b))
                if b >= 1:
                    yield from self.mbar_wait(self.vf[vst(b - 1)], vpar(b - 1))
                yield from take()
                if b == n_wt and n_wt > 0:
                    rid += 1
                    self.read_start(c, rid, f"V{vst(b - 1)}", (item, b - 1))
                    pending_pv = (rid, f"V{vst(b - 1)}")
                give(final)
                if b < n_kt:
                    release(self.ke[kst(b)])
                yield ("step", None)
                if pending_pv is not None:
                    self.read_end(c, *pending_pv)
                    pending_pv = None
                if b >= 1:
                    release(self.ve[vst(b - 1)])
            kf += n_kt
            vf += n_kt
            yield ("step", None)  # the stores

    def run(self):
        actors = {"p": self.producer(), "c0": self.consumer(0), "c1": self.consumer(1)}
        self.run_actors(actors)
        n_fills = sum(geometry(*x)[0] for _, x in self.items)
        for s in range(2):
            fills = len(range(s, n_fills, 2))
            for name, bar in ((f"K full {s}", self.kf[s]), (f"K empty {s}", self.ke[s]),
                              (f"V full {s}", self.vf[s]), (f"V empty {s}", self.ve[s])):
                if bar.phase != fills:
                    raise SimError(f"{name} ended at phase {bar.phase}, expected {fills}")
        if self.qf.phase != len(self.items) or self.qe.phase != len(self.items):
            raise SimError(f"Q barriers at phases {self.qf.phase} / {self.qe.phase}, expected {len(self.items)}")
        if self.nb.arrived.get(1, 0) or self.nb.arrived.get(2, 0):
            raise SimError(f"turn barriers left with arrivals {self.nb.arrived}")
        if self.turns[0][0] != self.turns[1][0]:
            raise SimError(f"turns taken {self.turns}")


def random_items(rng):
    """A CTA's walk: (tile, head) items of random sequences (chunks over cached prefixes too)."""
    items = []
    for i in range(rng.randint(1, 6)):
        q_len = rng.choice([1, 7, 63, 64, 65, 127, 128, 129, 200, 300, 512, rng.randint(1, 700)])
        pos0 = rng.choice([0, 0, 0, 5, 64, 127, 128, 3584, rng.randint(0, 600)])
        m0 = rng.randrange(0, q_len, 128) if q_len > 128 else 0
        items.append((i, (q_len, pos0, m0)))
    return items


def trials(n, seed=1):
    rng = random.Random(seed)
    for t in range(n):
        items = random_items(rng)
        Cta(items, random.Random(rng.random())).run()


MUTANTS = ["q_parity", "give_last", "v_early", "k_early", "qe_first"]

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 3000
    if "--mutants" in sys.argv:
        sys.exit(0 if run_mutants(MUTANTS, MUT, lambda: trials(400, seed=7)) else 1)
    trials(n)
    print(f"[ok] {n} random item lists, random interleavings: no deadlock, race or stale read")
