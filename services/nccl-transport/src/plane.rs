//! The per-MoE-layer exchange, lock-step on both sides. Router (rank 0), per layer, one NCCL
//! group: to every shard a 32-byte [`Header`] (rows, k, layer, sequence number), then, if it has
//! rows, the rows (bf16), expert ids (u32, padded with u32::MAX) and gate weights (f32), and a
//! receive of the shard's bf16 partial sums. Shard, per layer: receive the header, read it on the
//! host (the only host copy: 32 bytes), receive the data into buffers its [`ShardCompute`] owns,
//! enqueue the compute, send the partials. Everything stays on the device and on one stream per
//! side, so the compute needs no host synchronisation with the transfers.
//!
//! Slot mode (`PlaneConfig::slot_rows > 0`, see [`SlotLayout`]): every exchange starts with one
//! fixed-size slot to every shard, in the MoE-layer order both sides know. Decode batches travel
//! inside it and the shard has answered ahead (receive, compute and reply enqueued before the
//! slot arrives); larger batches are announced by a slot without rows and then follow as above.
//!
//! Each side lives on the thread that created it (NCCL communicators are used from one thread).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::comm::{Comm, Event, Pinned, StopFlag, UniqueId, copy_dtod, fill_u32};
use crate::error::{NcclError, Result, cuda};
use crate::header::{Command, HEADER_BYTES, Header};

const HW: usize = HEADER_BYTES / 4;

/// Sizes both sides agree on, and the router's per-layer deadline.
#[derive(Debug, Clone, Copy)]
pub struct PlaneConfig {
    /// Values per hidden row.
    pub hidden: usize,
    /// Most rows one shard gets in one layer.
    pub max_rows: usize,
    /// Most expert slots per row.
    pub max_k: usize,
    /// How long one exchange (or the init) may take before the communicator is aborted.
    pub timeout: Duration,
    /// Split into a blocking-mode communicator after init (see [`Comm::into_blocking`]).
    pub blocking: bool,
    /// Rows of the decode slot, 0 = no slots (see [`SlotLayout`]).
    pub slot_rows: usize,
    /// The model's MoE layers: the order slots follow.
    pub moe_layers: LayerSet,
}

impl PlaneConfig {
    /// The slot's layout when slots are on.
    pub fn slot(&self) -> Option<SlotLayout> {
        (self.slot_rows > 0).then_some(SlotLayout {
            rows: self.slot_rows,
            hidden: self.hidden,
            k: self.max_k,
        })
    }

    /// Checks the slot settings (both ends call it with the agreed config).
    pub fn check_slots(&self) -> Result<()> {
        if self.slot_rows == 0 {
            return Ok(());
        }
        if self.slot_rows > self.max_rows {
            return Err(NcclError::InvalidArgument(format!(
                "slot_rows {} > max_rows {}",
                self.slot_rows, self.max_rows
            )));
        }
        if self.moe_layers.is_empty() {
            return Err(NcclError::InvalidArgument(
                "slots need the model's MoE layers (none given)".into(),
            ));
        }
        Ok(())
    }
}

/// A set of layer indices below [`LayerSet::MAX`], kept as a bitmask so the config stays `Copy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerSet([u64; 4]);

impl LayerSet {
    pub const MAX: usize = 256;
    pub const EMPTY: LayerSet = LayerSet([0; 4]);

    pub fn from_layers(layers: impl IntoIterator<Item = usize>) -> Result<Self> {
        let mut set = LayerSet::default();
        for l in layers {
            if l >= Self::MAX {
                return Err(NcclError::InvalidArgument(format!(
                    "layer {l}: slots take models of at most {} layers",
                    Self::MAX
                )));
            }
            set.0[l / 64] |= 1 << (l % 64);
        }
        Ok(set)
    }

    pub fn contains(&self, l: u32) -> bool {
        (l as usize) < Self::MAX && self.0[l as usize / 64] & (1 << (l % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..Self::MAX as u32).filter(|&l| self.contains(l))
    }

    /// The layer after `l` in cyclic order: the first layer after the last one, and after None.
    pub fn next_after(&self, l: Option<u32>) -> Option<u32> {
        let from = l.map_or(0, |l| l + 1);
        (from..Self::MAX as u32)
            .find(|&x| self.contains(x))
            .or_else(|| self.iter().next())
    }
}

/// The decode slot: one fixed-size message router -> shard per exchange in slot mode, the
/// [`Header`] then up to `rows` hidden rows (bf16), their expert ids ([rows, k] i32, -1 = none)
/// and gate weights ([rows, k] f32), each part 16-byte aligned; the reply is `rows` bf16 rows.
///
/// Why: the per-layer protocol makes the shard read the header on the host before it can post
/// the receive of the rows (NCCL needs the size), a host round trip per layer on the shard, and
/// three NCCL groups per layer on the router (~55 µs of host time each in non-blocking mode,
/// bench/RESULTS.md). With a fixed size the shard has the receive, the compute and the reply of
/// the next layer enqueued before the rows arrive, and the router sends and receives in one
/// group without waiting on the host. Every slot goes to every shard with global expert ids,
/// which each shard filters: a decode batch is small, so the copies cost less than the routing
/// round trip they replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLayout {
    pub rows: usize,
    pub hidden: usize,
    pub k: usize,
}

impl SlotLayout {
    fn align(b: usize) -> usize {
        b.div_ceil(16) * 16
    }
    pub fn x_offset(&self) -> usize {
        HEADER_BYTES
    }
    pub fn ids_offset(&self) -> usize {
        Self::align(self.x_offset() + bytes_of::<bf16>(self.rows * self.hidden))
    }
    pub fn weights_offset(&self) -> usize {
        Self::align(self.ids_offset() + bytes_of::<u32>(self.rows * self.k))
    }
    /// Bytes of one slot message.
    pub fn bytes(&self) -> usize {
        Self::align(self.weights_offset() + bytes_of::<f32>(self.rows * self.k))
    }
    /// Bytes of one reply (the partial sums of all `rows` rows).
    pub fn reply_bytes(&self) -> usize {
        bytes_of::<bf16>(self.rows * self.hidden)
    }
}

/// One shard's share of a layer on the router: device views on the router's GPU.
pub struct ShardPart<'a> {
    pub rows: usize,
    /// [rows, hidden] bf16.
    pub x: CudaView<'a, bf16>,
    /// [rows, k] global expert ids, u32::MAX for slots of other shards.
    pub ids: CudaView<'a, u32>,
    /// [rows, k] gate weights (0 for padded slots).
    pub weights: CudaView<'a, f32>,
    /// [rows, hidden] bf16: receives the shard's weighted partial sums.
    pub partial: CudaViewMut<'a, bf16>,
}

/// The router's end: rank 0 of a communicator with `shards` shards.
pub struct RouterPlane {
    comm: Comm,
    cfg: PlaneConfig,
    shards: usize,
    seq: u32,
    hdr_dev: CudaSlice<u32>,
    hdr_host: Pinned,
    /// Set by a watchdog that saw a shard die: ends a waiting exchange at once instead of at its
    /// deadline (a dead peer on NVLink raises no NCCL error; its receive simply never comes).
    abort: Option<StopFlag>,
    /// Header sent in the same group as the rows (`DSV2_NCCL_MERGED=1`): one group fewer per
    /// layer. Safe because the shard receives the header alone first and NCCL's sends of these
    /// sizes do not wait for the matching receive to be posted; off by default until measured.
    merged: bool,
    /// Per-phase host time of the exchanges (`DSV2_NCCL_TRACE=1`), see [`RouterPlane::trace`].
    trace: Option<PhaseTimes>,
    /// Slot mode's state (`cfg.slot_rows > 0`).
    slots: Option<RouterSlots>,
}

/// Host headers of slots in flight: the router does not wait per slot exchange, so each header
/// copy needs host memory of its own until the stream has passed it (a full ring waits).
const CTL_RING: usize = 512;

struct RouterSlots {
    layout: SlotLayout,
    layers: LayerSet,
    /// The layer whose slot the shards expect next.
    next: u32,
    /// The slot every shard gets in an in-slot exchange.
    slot: CudaSlice<u8>,
    /// Per shard: a slot whose expert ids are all -1 (announcements of separately sent rows,
    /// fillers, shutdown): the shard's speculative compute on it yields zeros.
    empty: Vec<CudaSlice<u8>>,
    /// Per shard: where the replies to `empty` slots land (not read).
    sink: Vec<CudaSlice<u8>>,
    ctl: Pinned,
    /// Ring entries used since the stream was last waited for.
    ctl_used: usize,
}

impl RouterSlots {
    fn new(
        stream: &Arc<CudaStream>,
        layout: SlotLayout,
        layers: LayerSet,
        shards: usize,
    ) -> Result<Self> {
        let alloc = |bytes: usize| stream.alloc_zeros::<u8>(bytes).map_err(cuda("alloc slot"));
        let mut empty = Vec::with_capacity(shards);
        let mut sink = Vec::with_capacity(shards);
        for _ in 0..shards {
            let e = alloc(layout.bytes())?;
            let base = {
                let (p, _g) = e.device_ptr(stream);
                p
            };
            // SAFETY: the ids part of the live slot just allocated.
            unsafe {
                fill_u32(
                    stream,
                    base + layout.ids_offset() as u64,
                    u32::MAX,
                    layout.rows * layout.k,
                )?
            };
            empty.push(e);
            sink.push(alloc(layout.reply_bytes())?);
        }
        let first = layers.next_after(None).ok_or_else(|| {
            NcclError::InvalidArgument("slots need the model's MoE layers (none given)".into())
        })?;
        Ok(RouterSlots {
            layout,
            layers,
            next: first,
            slot: alloc(layout.bytes())?,
            empty,
            sink,
            ctl: Pinned::new(stream, CTL_RING * HW)?,
            ctl_used: 0,
        })
    }
}

/// Accumulated host time of each exchange phase, to see where a round trip's time goes.
#[derive(Debug, Default, Clone)]
pub struct PhaseTimes {
    pub exchanges: u64,
    /// Header copy to the device and the header group (or nothing when merged).
    pub headers: Duration,
    /// Enqueueing the send group (ncclGroupEnd, polled in non-blocking mode).
    pub sends: Duration,
    /// Enqueueing the receive group.
    pub recvs: Duration,
    /// Waiting for the stream: transfers both ways and the shards' compute.
    pub wait: Duration,
}

impl PhaseTimes {
    /// What accumulated after `earlier` (a snapshot of the same counters).
    pub fn since(&self, earlier: &PhaseTimes) -> PhaseTimes {
        PhaseTimes {
            exchanges: self.exchanges - earlier.exchanges,
            headers: self.headers.saturating_sub(earlier.headers),
            sends: self.sends.saturating_sub(earlier.sends),
            recvs: self.recvs.saturating_sub(earlier.recvs),
            wait: self.wait.saturating_sub(earlier.wait),
        }
    }

    /// One line: mean µs per exchange of each phase.
    pub fn summary(&self) -> String {
        let n = self.exchanges.max(1) as f64;
        let us = |d: Duration| d.as_secs_f64() * 1e6 / n;
        format!(
            "{} exchanges, mean µs: headers {:.1}, send group {:.1}, receive group {:.1}, wait {:.1}",
            self.exchanges,
            us(self.headers),
            us(self.sends),
            us(self.recvs),
            us(self.wait)
        )
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

fn bytes_of<T>(n: usize) -> usize {
    n * std::mem::size_of::<T>()
}

impl RouterPlane {
    /// Joins as rank 0 of `shards + 1` ranks (the shards join with the same id, ranks 1..).
    pub fn new(
        stream: Arc<CudaStream>,
        id: UniqueId,
        shards: usize,
        cfg: PlaneConfig,
    ) -> Result<Self> {
        if shards == 0 {
            return Err(NcclError::InvalidArgument("no shards".into()));
        }
        cfg.check_slots()?;
        let comm = Comm::init(stream.clone(), id, 0, shards + 1, cfg.timeout)?;
        let comm = if cfg.blocking {
            comm.into_blocking(cfg.timeout)?
        } else {
            comm
        };
        let hdr_dev = stream
            .alloc_zeros::<u32>(HW * shards)
            .map_err(cuda("alloc header"))?;
        let hdr_host = Pinned::new(&stream, HW * shards)?;
        let slots = match cfg.slot() {
            Some(layout) => Some(RouterSlots::new(&stream, layout, cfg.moe_layers, shards)?),
            None => None,
        };
        let mut plane = RouterPlane {
            comm,
            cfg,
            shards,
            seq: 0,
            hdr_dev,
            hdr_host,
            abort: None,
            // slots carry their headers in the slot
            merged: env_flag("DSV2_NCCL_MERGED") && slots.is_none(),
            trace: env_flag("DSV2_NCCL_TRACE").then(PhaseTimes::default),
            slots,
        };
        let peers: Vec<usize> = (1..=shards).collect();
        handshake(&mut plane.comm, &peers, max_payload(&cfg), cfg.timeout)?;
        Ok(plane)
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Exchanges end (with `Aborted`, the communicator aborted) as soon as `flag` is set.
    pub fn set_abort(&mut self, flag: StopFlag) {
        self.abort = Some(flag);
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        self.comm.stream()
    }

    /// Per-phase times so far, when `DSV2_NCCL_TRACE=1`.
    pub fn trace(&self) -> Option<&PhaseTimes> {
        self.trace.as_ref()
    }

    /// One MoE layer: sends every shard its part and waits until all partials are back (or the
    /// deadline passed: then the communicator is aborted and this plane fails from now on).
    /// `parts[s]` goes to shard s (rank s + 1); a part with 0 rows sends only the header.
    pub fn exchange(&mut self, layer: u32, k: usize, parts: &mut [ShardPart<'_>]) -> Result<()> {
        let h = self.cfg.hidden;
        if parts.len() != self.shards {
            return Err(NcclError::InvalidArgument(format!(
                "{} parts for {} shards",
                parts.len(),
                self.shards
            )));
        }
        if k == 0 || k > self.cfg.max_k {
            return Err(NcclError::InvalidArgument(format!(
                "k = {k} (1..={})",
                self.cfg.max_k
            )));
        }
        for (s, p) in parts.iter().enumerate() {
            let bad = p.rows > self.cfg.max_rows
                || p.x.len() < p.rows * h
                || p.ids.len() < p.rows * k
                || p.weights.len() < p.rows * k
                || p.partial.len() < p.rows * h;
            if bad {
                return Err(NcclError::InvalidArgument(format!(
                    "shard {s}: {} rows (max {}) with x {} ids {} weights {} partial {} values (hidden {h}, k {k})",
                    p.rows,
                    self.cfg.max_rows,
                    p.x.len(),
                    p.ids.len(),
                    p.weights.len(),
                    p.partial.len()
                )));
            }
        }
        let t0 = Instant::now();
        let slot_mode = self.slots.is_some();
        if slot_mode {
            // the headers travel as slots whose ids are all -1; the rows follow as below
            self.align_slots(layer)?;
            let rows: Vec<usize> = parts.iter().map(|p| p.rows).collect();
            self.announce(layer, &rows, k, Command::Forward)?;
        } else {
            let seq = self.seq;
            let words = self.hdr_host.slice_mut();
            for (s, p) in parts.iter().enumerate() {
                let hd = Header {
                    command: Command::Forward,
                    seq,
                    layer,
                    rows: p.rows as u32,
                    k: k as u32,
                    hidden: h as u32,
                    in_slot: false,
                };
                words[s * HW..(s + 1) * HW].copy_from_slice(&hd.encode());
            }
            self.send_headers()?;
        }
        let stream = self.comm.stream().clone();
        let hdr = {
            let (p, _g) = self.hdr_dev.device_ptr(&stream);
            p
        };
        // The headers go in a group of their own: NCCL maps the p2p operations of one group to
        // channels by their order within the group, so each direction must be grouped the same
        // way on both sides (the shard receives the header alone, then the three data buffers,
        // then sends the partials alone). Putting header and data in one group hung the first
        // exchange on the H200 pair.
        let send_header = |comm: &Comm, s: usize| {
            // SAFETY: header slot s of the live header buffer; waited for before returning.
            unsafe { comm.send_raw(hdr + bytes_of::<u32>(s * HW) as u64, HEADER_BYTES, s + 1) }
        };
        if !self.merged && !slot_mode {
            self.comm.group_start()?;
            let mut res = Ok(());
            for s in 0..parts.len() {
                res = res.and_then(|_| send_header(&self.comm, s));
            }
            let ended = self.comm.group_end(self.cfg.timeout);
            res?;
            ended?;
        }
        let t1 = Instant::now();
        // Sends to every shard in one group, the receives of their partials in a second group.
        // NCCL pairs the p2p operations of one group by peer into work items that run in order
        // (send x with recv partial, then send ids, then send w): a receive that can only complete
        // after the later sends have arrived would hold the first work item forever. That, not
        // lazy connection setup, is what hung every asymmetric exchange on the H200 pair (the
        // symmetric swap and the all-reduce always completed). The stream runs the second group
        // after the first, and the shards post their receives as soon as the header arrives.
        let merged = self.merged;
        self.comm.group_start()?;
        let sends = || -> Result<()> {
            for (s, p) in parts.iter().enumerate() {
                let peer = s + 1;
                if merged {
                    send_header(&self.comm, s)?;
                }
                if p.rows == 0 {
                    continue;
                }
                // SAFETY: every buffer below is a live device view on this device whose length
                // was checked above; `exchange` waits for the stream before it returns, so they
                // outlive the transfers.
                unsafe {
                    let (x, _gx) = p.x.device_ptr(&stream);
                    let (ids, _gi) = p.ids.device_ptr(&stream);
                    let (w, _gw) = p.weights.device_ptr(&stream);
                    self.comm.send_raw(x, bytes_of::<bf16>(p.rows * h), peer)?;
                    self.comm.send_raw(ids, bytes_of::<u32>(p.rows * k), peer)?;
                    self.comm.send_raw(w, bytes_of::<f32>(p.rows * k), peer)?;
                }
            }
            Ok(())
        };
        let issued = sends();
        // The group must be closed even when issuing failed part-way.
        let ended = self.comm.group_end(self.cfg.timeout);
        issued?;
        ended?;
        let t2 = Instant::now();
        self.comm.group_start()?;
        let mut recvs = || -> Result<()> {
            for (s, p) in parts.iter_mut().enumerate() {
                if p.rows == 0 {
                    continue;
                }
                // SAFETY: as above; the partial buffer is written by the receive.
                unsafe {
                    let (out, _go) = p.partial.device_ptr_mut(&stream);
                    self.comm
                        .recv_raw(out, bytes_of::<bf16>(p.rows * h), s + 1)?;
                }
            }
            Ok(())
        };
        let issued = recvs();
        let ended = self.comm.group_end(self.cfg.timeout);
        issued?;
        ended?;
        let t3 = Instant::now();
        self.sync()?;
        if !slot_mode {
            self.seq = self.seq.wrapping_add(1);
        }
        if let Some(t) = self.trace.as_mut() {
            t.exchanges += 1;
            t.headers += t1 - t0;
            t.sends += t2 - t1;
            t.recvs += t3 - t2;
            t.wait += t3.elapsed();
        }
        Ok(())
    }

    /// Waits until the stream has passed every exchange enqueued so far (bounded by the plane's
    /// timeout; ends at once when the watchdog flag is set). Slot exchanges do not wait: call
    /// this before anything waits on the stream without a bound (e.g. bringing logits to the
    /// host), so that a dead shard is an error and not a hang.
    pub fn sync(&mut self) -> Result<()> {
        let shards = self.shards;
        self.comm
            .wait("exchange", Some(self.cfg.timeout), self.abort.as_ref())
            .map_err(|e| name_shards(e, shards))?;
        if let Some(sl) = self.slots.as_mut() {
            sl.ctl_used = 0;
        }
        Ok(())
    }

    /// The decode slot's layout, when slots are on.
    pub fn slot_layout(&self) -> Option<SlotLayout> {
        self.slots.as_ref().map(|s| s.layout)
    }

    /// One MoE layer of up to `slot_rows` rows in slot mode: packs header, rows, ids and
    /// weights into the slot, sends it to every shard and receives each shard's partial sums of
    /// all rows into `partials[s]` (the rows without experts there are zero), in one NCCL group.
    /// Returns once enqueued, without waiting: the caller's later work on the same stream sees
    /// the partials; call [`RouterPlane::sync`] before an unbounded host wait.
    ///
    /// # Safety
    /// `x` must hold `rows * hidden` bf16, `ids` and `weights` `rows * k` i32 / f32, and each
    /// `partials[s]` `slot_rows * hidden` bf16, all device memory of this plane's device that
    /// stays valid until the stream has passed this exchange.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn exchange_slot(
        &mut self,
        layer: u32,
        rows: usize,
        k: usize,
        x: u64,
        ids: u64,
        weights: u64,
        partials: &[u64],
    ) -> Result<()> {
        let (layout, layers) = match self.slots.as_ref() {
            Some(sl) => (sl.layout, sl.layers),
            None => return Err(NcclError::InvalidArgument("slots are off".into())),
        };
        if rows == 0 || rows > layout.rows || k != layout.k || partials.len() != self.shards {
            return Err(NcclError::InvalidArgument(format!(
                "slot exchange of {rows} rows x k {k} with {} partials (slot: 1..={} rows, k {}, {} shards)",
                partials.len(),
                layout.rows,
                layout.k,
                self.shards
            )));
        }
        if !layers.contains(layer) {
            return Err(NcclError::InvalidArgument(format!(
                "layer {layer} is not one of the plane's MoE layers"
            )));
        }
        let t0 = Instant::now();
        self.align_slots(layer)?;
        let stream = self.comm.stream().clone();
        let slot = match self.slots.as_ref() {
            Some(sl) => {
                let (p, _g) = sl.slot.device_ptr(&stream);
                p
            }
            None => return Err(NcclError::InvalidArgument("slots are off".into())),
        };
        let hd = Header {
            command: Command::Forward,
            seq: self.seq,
            layer,
            rows: rows as u32,
            k: k as u32,
            hidden: self.cfg.hidden as u32,
            in_slot: true,
        };
        self.put_ctl(&hd, slot)?;
        let h = self.cfg.hidden;
        // SAFETY: the slot is this plane's live buffer of layout.bytes(); the sources are the
        // caller's (see the contract); all on the plane's stream, before the send.
        unsafe {
            fill_u32(
                &stream,
                slot + layout.ids_offset() as u64,
                u32::MAX,
                layout.rows * layout.k,
            )?;
            copy_dtod(
                &stream,
                slot + layout.x_offset() as u64,
                x,
                bytes_of::<bf16>(rows * h),
            )?;
            copy_dtod(
                &stream,
                slot + layout.ids_offset() as u64,
                ids,
                bytes_of::<u32>(rows * k),
            )?;
            copy_dtod(
                &stream,
                slot + layout.weights_offset() as u64,
                weights,
                bytes_of::<f32>(rows * k),
            )?;
        }
        let t1 = Instant::now();
        let pairs: Vec<(u64, u64)> = partials.iter().map(|&out| (slot, out)).collect();
        // SAFETY: the slot as above; the partials per the caller's contract.
        unsafe { self.swap_slots(layer, &pairs) }?;
        if let Some(t) = self.trace.as_mut() {
            t.exchanges += 1;
            t.headers += t1 - t0;
            t.sends += t1.elapsed();
        }
        Ok(())
    }

    /// Copies `hd` into the next free host ring entry and from there to device address `dst`.
    fn put_ctl(&mut self, hd: &Header, dst: u64) -> Result<()> {
        if self
            .slots
            .as_ref()
            .is_some_and(|sl| sl.ctl_used >= CTL_RING)
        {
            self.sync()?;
        }
        let stream = self.comm.stream().clone();
        let Some(sl) = self.slots.as_mut() else {
            return Err(NcclError::InvalidArgument("slots are off".into()));
        };
        let at = sl.ctl_used * HW;
        sl.ctl.slice_mut()[at..at + HW].copy_from_slice(&hd.encode());
        sl.ctl.htod_from(&stream, at, dst, HW)?;
        sl.ctl_used += 1;
        Ok(())
    }

    /// Slot mode: sends fillers (no rows) until the shards expect `layer` next. Needed only
    /// after a forward pass stopped between MoE layers (an error on the router).
    fn align_slots(&mut self, layer: u32) -> Result<()> {
        let Some(sl) = self.slots.as_ref() else {
            return Ok(());
        };
        if !sl.layers.contains(layer) {
            return Err(NcclError::InvalidArgument(format!(
                "layer {layer} is not one of the plane's MoE layers"
            )));
        }
        let mut fillers = 0;
        while let Some(next) = self.slots.as_ref().map(|sl| sl.next)
            && next != layer
        {
            let rows = vec![0; self.shards];
            self.announce(next, &rows, 1, Command::Forward)?;
            fillers += 1;
        }
        if fillers > 0 {
            tracing::debug!(
                fillers,
                layer,
                "NCCL slots realigned after an unfinished pass"
            );
        }
        Ok(())
    }

    /// Slot mode: one slot without rows per shard (header only: `rows[s]` rows follow
    /// separately, or none), replies into the sinks; the shards expect the layer after `layer`
    /// next.
    fn announce(&mut self, layer: u32, rows: &[usize], k: usize, command: Command) -> Result<()> {
        let stream = self.comm.stream().clone();
        let targets: Vec<(u64, u64)> = match self.slots.as_ref() {
            Some(sl) => sl
                .empty
                .iter()
                .zip(&sl.sink)
                .map(|(e, k)| {
                    let (ep, _ge) = e.device_ptr(&stream);
                    let (kp, _gk) = k.device_ptr(&stream);
                    (ep, kp)
                })
                .collect(),
            None => return Err(NcclError::InvalidArgument("slots are off".into())),
        };
        for (s, &(slot, _)) in targets.iter().enumerate() {
            let hd = Header {
                command,
                seq: self.seq,
                layer,
                rows: rows.get(s).copied().unwrap_or(0) as u32,
                k: k as u32,
                hidden: self.cfg.hidden as u32,
                in_slot: false,
            };
            self.put_ctl(&hd, slot)?;
        }
        // SAFETY: this plane's live slot and sink buffers of the layout's sizes.
        unsafe { self.swap_slots(layer, &targets) }
    }

    /// Slot mode, one NCCL group: to shard s the slot at `pairs[s].0`, from it the reply into
    /// `pairs[s].1`; then the shards expect the layer after `layer`. One send and one receive
    /// per peer (unlike several sends to one peer in a group with a receive, see `exchange`).
    /// NCCL schedules a group's point-to-point operations in rounds that pair the send to rank
    /// r + d with the receive from rank r - d, so with one shard a peer's send and receive are
    /// one work item; with several, the receive from one shard runs beside the send to another.
    /// We expect every send to go out regardless (rounds run on separate p2p channels within
    /// a node), but only one shard has run on a GPU so far (x2): several shards with slots are
    /// step 4b of scripts/gpu-nccl.sh (at least 3 GPUs), not yet run.
    ///
    /// # Safety
    /// Each slot holds the layout's bytes and each reply buffer its reply bytes, device memory
    /// of this plane's device valid until the stream has passed this group.
    unsafe fn swap_slots(&mut self, layer: u32, pairs: &[(u64, u64)]) -> Result<()> {
        let Some((layout, layers)) = self.slots.as_ref().map(|sl| (sl.layout, sl.layers)) else {
            return Err(NcclError::InvalidArgument("slots are off".into()));
        };
        self.comm.group_start()?;
        let mut issued = Ok(());
        for (s, &(slot, reply)) in pairs.iter().enumerate() {
            // SAFETY: per this function's contract.
            issued = issued.and_then(|_| unsafe {
                self.comm
                    .send_raw(slot, layout.bytes(), s + 1)
                    .and_then(|_| self.comm.recv_raw(reply, layout.reply_bytes(), s + 1))
            });
        }
        let ended = self.comm.group_end(self.cfg.timeout);
        issued?;
        ended?;
        self.seq = self.seq.wrapping_add(1);
        if let Some(sl) = self.slots.as_mut() {
            sl.next = layers.next_after(Some(layer)).unwrap_or(layer);
        }
        Ok(())
    }

    fn send_headers(&mut self) -> Result<()> {
        let stream = self.comm.stream().clone();
        let (dst, _g) = self.hdr_dev.device_ptr_mut(&stream);
        self.hdr_host.htod(&stream, dst, HW * self.shards)
    }

    /// Tells every shard to leave its loop (best effort, bounded by the plane's timeout), then
    /// drops the communicator.
    pub fn shutdown(mut self) -> Result<()> {
        if let Some(next) = self.slots.as_ref().map(|sl| sl.next) {
            let rows = vec![0; self.shards];
            self.announce(next, &rows, 1, Command::Shutdown)?;
            return self.comm.wait("shutdown", Some(self.cfg.timeout), None);
        }
        let seq = self.seq;
        let words = self.hdr_host.slice_mut();
        for s in 0..self.shards {
            let hd = Header {
                command: Command::Shutdown,
                seq,
                layer: 0,
                rows: 0,
                k: 0,
                hidden: self.cfg.hidden as u32,
                in_slot: false,
            };
            words[s * HW..(s + 1) * HW].copy_from_slice(&hd.encode());
        }
        self.send_headers()?;
        let stream = self.comm.stream().clone();
        let hdr = {
            let (p, _g) = self.hdr_dev.device_ptr(&stream);
            p
        };
        self.comm.group_start()?;
        let mut res = Ok(());
        for s in 0..self.shards {
            // SAFETY: header slot s of the live header buffer; waited for below.
            res = res.and(unsafe {
                self.comm
                    .send_raw(hdr + bytes_of::<u32>(s * HW) as u64, HEADER_BYTES, s + 1)
            });
        }
        self.comm.group_end(self.cfg.timeout)?;
        res?;
        self.comm.wait("shutdown", Some(self.cfg.timeout), None)
    }
}

/// Connects every NCCL p2p channel the exchange can ever use, both ways, before the first layer.
///
/// Why: NCCL connects p2p channels lazily, in the host call that ends a group, and the number of
/// channels an operation uses grows with its size. The layer protocol is asymmetric (the shard
/// posts its data receives only after it has read the header that travels in the router's same
/// group), so a lazy connect in the middle of it waits for a peer that cannot get there: on the
/// H200 pair every exchange hung while symmetric {send, recv} swaps completed (bench/RESULTS.md,
/// "NCCL hang diagnosed"). A symmetric swap at the header size and at the largest payload
/// (`max_bytes`) connects them all up front; later operations only use connected channels.
fn handshake(comm: &mut Comm, peers: &[usize], max_bytes: usize, timeout: Duration) -> Result<()> {
    let stream = comm.stream().clone();
    for bytes in [HEADER_BYTES, max_bytes.max(HEADER_BYTES)] {
        let words = bytes.div_ceil(4);
        let buf = stream
            .alloc_zeros::<u32>(2 * words * peers.len())
            .map_err(cuda("alloc handshake"))?;
        let base = {
            let (p, _g) = buf.device_ptr(&stream);
            p
        };
        comm.group_start()?;
        let mut res = Ok(());
        for (i, &peer) in peers.iter().enumerate() {
            let send = base + bytes_of::<u32>(2 * words * i) as u64;
            let recv = send + bytes_of::<u32>(words) as u64;
            // SAFETY: two disjoint `bytes`-long halves of the live `buf`, waited for below
            // before it is dropped.
            res = res.and_then(|_| unsafe {
                comm.send_raw(send, bytes, peer)
                    .and_then(|_| comm.recv_raw(recv, bytes, peer))
            });
        }
        comm.group_end(timeout)?;
        res?;
        comm.wait("handshake", Some(timeout), None)?;
        drop(buf);
    }
    Ok(())
}

/// The largest single transfer of an exchange: one shard's rows or partials (bf16), or a slot.
fn max_payload(cfg: &PlaneConfig) -> usize {
    let rows = bytes_of::<bf16>(cfg.max_rows * cfg.hidden);
    cfg.slot().map_or(rows, |l| rows.max(l.bytes()))
}

fn name_shards(e: NcclError, n: usize) -> NcclError {
    match e {
        NcclError::Timeout {
            op,
            rank,
            timeout,
            what,
        } => NcclError::Timeout {
            op,
            rank,
            timeout,
            what: format!("{what} (one of shard ranks 1..={n}: check their logs and health)"),
        },
        other => other,
    }
}

/// Device buffers a [`ShardCompute`] lends the plane for one batch: addresses on the shard's
/// device with room for the announced rows (x, partial: rows x hidden bf16; ids: rows x k u32 or
/// i32; weights: rows x k f32).
#[derive(Debug, Clone, Copy)]
pub struct BatchBuffers {
    pub x: u64,
    pub ids: u64,
    pub weights: u64,
    pub partial: u64,
}

/// What a shard does with one batch.
///
/// # Safety
/// `buffers` must return device memory of the plane's device, with room for the header's rows,
/// that stays valid and is not used by anything else until the next `buffers` call.
pub unsafe trait ShardCompute {
    /// Where the plane receives the batch announced by `h` (and sends partials from).
    fn buffers(&mut self, h: &Header) -> std::result::Result<BatchBuffers, String>;
    /// Enqueues (on the plane's stream) or runs the computation of the partials from the
    /// received buffers. Work on other streams must be joined into the plane's stream.
    /// With `h.in_slot` the ids are global (every shard got the same rows): ids of experts this
    /// shard does not hold are skipped, not an error.
    fn compute(&mut self, h: &Header) -> std::result::Result<(), String>;

    /// Slot mode, before the slot has arrived: enqueue the partials of all `h.rows` (the slot's
    /// rows) from the buffers of `buffers(h)` without any host step, or return false when this
    /// compute cannot (the plane then waits for the slot and calls [`ShardCompute::compute`]
    /// with its real header). `h.layer` is the expected layer. Rows whose ids are all -1 must
    /// come out as zeros. The default cannot.
    fn compute_ahead(&mut self, _h: &Header) -> std::result::Result<bool, String> {
        Ok(false)
    }
}

/// How a shard's loop ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopEnd {
    /// The router sent Shutdown.
    Shutdown,
}

/// The shard's end: one rank 1.. of the router's communicator.
pub struct ShardPlane {
    comm: Comm,
    cfg: PlaneConfig,
    hdr_dev: CudaSlice<u32>,
    hdr_host: Pinned,
    expect_seq: u32,
    slots: Option<ShardSlots>,
}

/// Slot mode on the shard: the receive buffer of one slot and the event marking its header's
/// copy to the host.
struct ShardSlots {
    layout: SlotLayout,
    layers: LayerSet,
    buf: CudaSlice<u8>,
    arrived: Event,
}

impl ShardPlane {
    pub fn new(
        stream: Arc<CudaStream>,
        id: UniqueId,
        rank: usize,
        world: usize,
        cfg: PlaneConfig,
    ) -> Result<Self> {
        if rank == 0 {
            return Err(NcclError::InvalidArgument(
                "rank 0 is the router; shards are ranks 1..".into(),
            ));
        }
        cfg.check_slots()?;
        let comm = Comm::init(stream.clone(), id, rank, world, cfg.timeout)?;
        // the router's choice, from NcclInit: the split is collective
        let comm = if cfg.blocking {
            comm.into_blocking(cfg.timeout)?
        } else {
            comm
        };
        let hdr_dev = stream
            .alloc_zeros::<u32>(HW)
            .map_err(cuda("alloc header"))?;
        let hdr_host = Pinned::new(&stream, HW)?;
        let slots = match cfg.slot() {
            Some(layout) => Some(ShardSlots {
                layout,
                layers: cfg.moe_layers,
                buf: stream
                    .alloc_zeros::<u8>(layout.bytes())
                    .map_err(cuda("alloc slot"))?,
                arrived: Event::new(&stream)?,
            }),
            None => None,
        };
        let mut plane = ShardPlane {
            comm,
            cfg,
            hdr_dev,
            hdr_host,
            expect_seq: 0,
            slots,
        };
        handshake(&mut plane.comm, &[0], max_payload(&cfg), cfg.timeout)?;
        Ok(plane)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        self.comm.stream()
    }

    fn protocol(&mut self, message: String) -> NcclError {
        self.comm.abort(&message);
        NcclError::Protocol {
            rank: self.comm.rank(),
            message,
        }
    }

    /// Serves layers until the router sends Shutdown, `stop` is set, or an error (after which
    /// the communicator is aborted, so the router's exchange fails instead of hanging).
    pub fn run(&mut self, compute: &mut dyn ShardCompute, stop: &StopFlag) -> Result<LoopEnd> {
        if self.slots.is_some() {
            return self.run_slots(compute, stop);
        }
        let stream = self.comm.stream().clone();
        let h = self.cfg.hidden;
        loop {
            let hdr = {
                let (p, _g) = self.hdr_dev.device_ptr(&stream);
                p
            };
            self.comm.group_start()?;
            // SAFETY: the live 32-byte header buffer; waited for just below.
            let r = unsafe { self.comm.recv_raw(hdr, HEADER_BYTES, 0) };
            self.comm.group_end(self.cfg.timeout)?;
            r?;
            self.hdr_host.dtoh(&stream, hdr, HW)?;
            // Idle between forward passes is normal: no deadline, but async errors and `stop`
            // end the wait.
            self.comm.wait("header", None, Some(stop))?;
            let hd = self.read_header("header")?;
            if hd.command == Command::Shutdown {
                return Ok(LoopEnd::Shutdown);
            }
            let (rows, k) = (hd.rows as usize, hd.k as usize);
            if hd.hidden as usize != h || rows > self.cfg.max_rows || k > self.cfg.max_k {
                let m = format!(
                    "header announces {rows} rows x hidden {} with k {k}; this shard takes hidden {h}, <= {} rows, k <= {}",
                    hd.hidden, self.cfg.max_rows, self.cfg.max_k
                );
                return Err(self.protocol(m));
            }
            self.expect_seq = self.expect_seq.wrapping_add(1);
            if rows > 0 {
                self.separate_rows(compute, &hd, stop)?;
            }
        }
    }

    /// The header just copied to the host, checked for its magic and sequence number.
    fn read_header(&mut self, what: &str) -> Result<Header> {
        let mut w = [0u32; HW];
        w.copy_from_slice(self.hdr_host.slice());
        let hd = match Header::decode(&w) {
            Ok(hd) => hd,
            Err(m) => return Err(self.protocol(m)),
        };
        if hd.seq != self.expect_seq {
            let m = format!(
                "{what} seq {} but expected {} (lost lock-step)",
                hd.seq, self.expect_seq
            );
            return Err(self.protocol(m));
        }
        Ok(hd)
    }

    /// Slot mode: for the layer expected next, enqueue the slot's receive, its copy into the
    /// compute's buffers, the compute and the reply before the slot arrives; then wait on the
    /// host only for the slot's header (to check it, and to learn whether rows follow
    /// separately), while the device computes and answers.
    fn run_slots(&mut self, compute: &mut dyn ShardCompute, stop: &StopFlag) -> Result<LoopEnd> {
        let stream = self.comm.stream().clone();
        let h = self.cfg.hidden;
        let (layout, layers, slot) = match self.slots.as_ref() {
            Some(sl) => {
                let (p, _g) = sl.buf.device_ptr(&stream);
                (sl.layout, sl.layers, p)
            }
            None => return Err(NcclError::InvalidArgument("slots are off".into())),
        };
        let Some(mut layer) = layers.next_after(None) else {
            return Err(NcclError::InvalidArgument(
                "slots need the model's MoE layers (none given)".into(),
            ));
        };
        loop {
            let guess = Header {
                command: Command::Forward,
                seq: self.expect_seq,
                layer,
                rows: layout.rows as u32,
                k: layout.k as u32,
                hidden: h as u32,
                in_slot: true,
            };
            let b = match compute.buffers(&guess) {
                Ok(b) => b,
                Err(m) => return Err(self.protocol(format!("compute buffers: {m}"))),
            };
            self.comm.group_start()?;
            // SAFETY: the plane's live slot buffer of layout.bytes().
            let r = unsafe { self.comm.recv_raw(slot, layout.bytes(), 0) };
            self.comm.group_end(self.cfg.timeout)?;
            r?;
            // SAFETY: slot parts -> the compute's buffers (room for the slot's rows and k per
            // ShardCompute's contract), header -> the pinned header; all stream-ordered after
            // the receive.
            unsafe {
                copy_dtod(
                    &stream,
                    b.x,
                    slot + layout.x_offset() as u64,
                    bytes_of::<bf16>(layout.rows * h),
                )?;
                copy_dtod(
                    &stream,
                    b.ids,
                    slot + layout.ids_offset() as u64,
                    bytes_of::<u32>(layout.rows * layout.k),
                )?;
                copy_dtod(
                    &stream,
                    b.weights,
                    slot + layout.weights_offset() as u64,
                    bytes_of::<f32>(layout.rows * layout.k),
                )?;
            }
            self.hdr_host.dtoh(&stream, slot, HW)?;
            if let Some(sl) = self.slots.as_ref() {
                sl.arrived.record(&stream)?;
            }
            let ahead = match compute.compute_ahead(&guess) {
                Ok(a) => a,
                Err(m) => return Err(self.protocol(format!("compute failed: {m}"))),
            };
            if ahead {
                self.send_reply(b.partial, layout.reply_bytes())?;
            }
            // Idle between forward passes is normal: no deadline, but async errors and `stop`
            // end the wait.
            match self.slots.as_ref() {
                Some(sl) => self
                    .comm
                    .wait_event("slot", &sl.arrived, None, Some(stop))?,
                None => return Err(NcclError::InvalidArgument("slots are off".into())),
            }
            let hd = self.read_header("slot")?;
            if hd.command == Command::Shutdown {
                if !ahead {
                    self.send_reply(b.partial, layout.reply_bytes())?;
                }
                // the router waits for this reply before it drops the communicator
                self.comm
                    .wait("shutdown reply", Some(self.cfg.timeout), Some(stop))?;
                return Ok(LoopEnd::Shutdown);
            }
            let (rows, k) = (hd.rows as usize, hd.k as usize);
            let bad = hd.layer != layer
                || hd.hidden as usize != h
                || (hd.in_slot && (rows > layout.rows || k != layout.k))
                || rows > self.cfg.max_rows
                || k > self.cfg.max_k;
            if bad {
                let m = format!(
                    "slot announces layer {} ({} rows x hidden {}, k {}, in slot {}); this shard expected layer {layer} and takes hidden {h}, <= {} rows in a slot of {} x k {}, <= {} rows, k <= {}",
                    hd.layer,
                    rows,
                    hd.hidden,
                    k,
                    hd.in_slot,
                    layout.rows,
                    layout.rows,
                    layout.k,
                    self.cfg.max_rows,
                    self.cfg.max_k
                );
                return Err(self.protocol(m));
            }
            self.expect_seq = self.expect_seq.wrapping_add(1);
            layer = layers.next_after(Some(layer)).unwrap_or(layer);
            if hd.in_slot {
                if !ahead {
                    // the rows are in the compute's buffers already (copied above)
                    if let Err(m) = compute.compute(&hd) {
                        return Err(self.protocol(format!("compute failed: {m}")));
                    }
                    self.send_reply(b.partial, layout.reply_bytes())?;
                }
                continue;
            }
            // An announcement: the router ignores this slot's reply (zeros when computed
            // ahead), then sends `rows` rows of this shard's own experts separately.
            if !ahead {
                self.send_reply(b.partial, layout.reply_bytes())?;
            }
            if rows > 0 {
                self.separate_rows(compute, &hd, stop)?;
            }
        }
    }

    fn send_reply(&mut self, partial: u64, bytes: usize) -> Result<()> {
        self.comm.group_start()?;
        // SAFETY: the compute's partial buffer (ShardCompute's contract); stream-ordered after
        // the compute that writes it and before anything that writes it again.
        let r = unsafe { self.comm.send_raw(partial, bytes, 0) };
        self.comm.group_end(self.cfg.timeout)?;
        r
    }

    /// The rows a header announced: receive, compute, send back. The rows must be here before
    /// the compute, which may synchronise the stream from the host: a router that died mid-layer
    /// would leave that synchronisation waiting forever, while this wait ends at the deadline or
    /// when the owner stops the loop (a new NcclInit does).
    fn separate_rows(
        &mut self,
        compute: &mut dyn ShardCompute,
        hd: &Header,
        stop: &StopFlag,
    ) -> Result<()> {
        let (rows, k, h) = (hd.rows as usize, hd.k as usize, self.cfg.hidden);
        let b = match compute.buffers(hd) {
            Ok(b) => b,
            Err(m) => return Err(self.protocol(format!("compute buffers: {m}"))),
        };
        self.comm.group_start()?;
        // SAFETY: ShardCompute guarantees the buffers; stream-ordered as in `run`.
        let r = unsafe {
            self.comm
                .recv_raw(b.x, bytes_of::<bf16>(rows * h), 0)
                .and_then(|_| self.comm.recv_raw(b.ids, bytes_of::<u32>(rows * k), 0))
                .and_then(|_| self.comm.recv_raw(b.weights, bytes_of::<f32>(rows * k), 0))
        };
        self.comm.group_end(self.cfg.timeout)?;
        r?;
        self.comm.wait("rows", Some(self.cfg.timeout), Some(stop))?;
        if let Err(m) = compute.compute(hd) {
            return Err(self.protocol(format!("compute failed: {m}")));
        }
        self.send_reply(b.partial, bytes_of::<bf16>(rows * h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_set_cycles_in_order() {
        let set = LayerSet::from_layers([3, 1, 64, 255]).expect("valid");
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![1, 3, 64, 255]);
        assert_eq!(set.next_after(None), Some(1));
        assert_eq!(set.next_after(Some(1)), Some(3));
        assert_eq!(set.next_after(Some(3)), Some(64));
        assert_eq!(set.next_after(Some(64)), Some(255));
        assert_eq!(set.next_after(Some(255)), Some(1));
        // from a layer outside the set: the next one after it
        assert_eq!(set.next_after(Some(2)), Some(3));
        assert!(set.contains(64) && !set.contains(0) && !set.contains(300));
        assert_eq!(LayerSet::default().next_after(None), None);
        assert!(LayerSet::from_layers([256]).is_err());
    }

    #[test]
    fn slot_parts_are_aligned_and_disjoint() {
        // DeepSeek-V2 at 4 rows, and an odd small shape
        for l in [
            SlotLayout {
                rows: 4,
                hidden: 5120,
                k: 6,
            },
            SlotLayout {
                rows: 3,
                hidden: 8,
                k: 3,
            },
        ] {
            assert_eq!(l.x_offset(), HEADER_BYTES);
            assert!(l.ids_offset() >= l.x_offset() + l.rows * l.hidden * 2);
            assert!(l.weights_offset() >= l.ids_offset() + l.rows * l.k * 4);
            assert!(l.bytes() >= l.weights_offset() + l.rows * l.k * 4);
            for off in [l.x_offset(), l.ids_offset(), l.weights_offset(), l.bytes()] {
                assert_eq!(off % 16, 0, "{l:?}: {off}");
            }
            assert_eq!(l.reply_bytes(), l.rows * l.hidden * 2);
        }
    }
}
