//! The per-MoE-layer exchange, lock-step on both sides. Router (rank 0), per layer, one NCCL
//! group: to every shard a 32-byte [`Header`] (rows, k, layer, sequence number), then, if it has
//! rows, the rows (bf16), expert ids (u32, padded with u32::MAX) and gate weights (f32), and a
//! receive of the shard's bf16 partial sums. Shard, per layer: receive the header, read it on the
//! host (the only host copy: 32 bytes), receive the data into buffers its [`ShardCompute`] owns,
//! enqueue the compute, send the partials. Everything stays on the device and on one stream per
//! side, so the compute needs no host synchronisation with the transfers.
//!
//! Each side lives on the thread that created it (NCCL communicators are used from one thread).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::comm::{Comm, Pinned, StopFlag, UniqueId};
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
        let comm = Comm::init(stream.clone(), id, 0, shards + 1, cfg.timeout)?;
        let comm = if env_flag("DSV2_NCCL_BLOCKING") {
            comm.into_blocking(cfg.timeout)?
        } else {
            comm
        };
        let hdr_dev = stream
            .alloc_zeros::<u32>(HW * shards)
            .map_err(cuda("alloc header"))?;
        let hdr_host = Pinned::new(&stream, HW * shards)?;
        let mut plane = RouterPlane {
            comm,
            cfg,
            shards,
            seq: 0,
            hdr_dev,
            hdr_host,
            abort: None,
            merged: env_flag("DSV2_NCCL_MERGED"),
            trace: env_flag("DSV2_NCCL_TRACE").then(PhaseTimes::default),
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
            };
            words[s * HW..(s + 1) * HW].copy_from_slice(&hd.encode());
        }
        let t0 = Instant::now();
        self.send_headers()?;
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
        if !self.merged {
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
        self.comm
            .wait("exchange", Some(self.cfg.timeout), self.abort.as_ref())
            .map_err(|e| name_shards(e, parts.len()))?;
        self.seq = self.seq.wrapping_add(1);
        if let Some(t) = self.trace.as_mut() {
            t.exchanges += 1;
            t.headers += t1 - t0;
            t.sends += t2 - t1;
            t.recvs += t3 - t2;
            t.wait += t3.elapsed();
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

/// The largest single transfer of an exchange: one shard's rows or partials (bf16).
fn max_payload(cfg: &PlaneConfig) -> usize {
    bytes_of::<bf16>(cfg.max_rows * cfg.hidden)
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
    fn compute(&mut self, h: &Header) -> std::result::Result<(), String>;
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
        let comm = Comm::init(stream.clone(), id, rank, world, cfg.timeout)?;
        // must match the router's choice: the split is collective (same environment for both)
        let comm = if env_flag("DSV2_NCCL_BLOCKING") {
            comm.into_blocking(cfg.timeout)?
        } else {
            comm
        };
        let hdr_dev = stream
            .alloc_zeros::<u32>(HW)
            .map_err(cuda("alloc header"))?;
        let hdr_host = Pinned::new(&stream, HW)?;
        let mut plane = ShardPlane {
            comm,
            cfg,
            hdr_dev,
            hdr_host,
            expect_seq: 0,
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
            let mut w = [0u32; HW];
            w.copy_from_slice(self.hdr_host.slice());
            let hd = match Header::decode(&w) {
                Ok(hd) => hd,
                Err(m) => return Err(self.protocol(m)),
            };
            if hd.seq != self.expect_seq {
                let m = format!(
                    "header seq {} but expected {} (lost lock-step)",
                    hd.seq, self.expect_seq
                );
                return Err(self.protocol(m));
            }
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
            if rows == 0 {
                continue;
            }
            let b = match compute.buffers(&hd) {
                Ok(b) => b,
                Err(m) => return Err(self.protocol(format!("compute buffers: {m}"))),
            };
            self.comm.group_start()?;
            // SAFETY: ShardCompute guarantees the buffers (unsafe trait); the stream orders the
            // compute after these receives and the send after the compute.
            let r = unsafe {
                self.comm
                    .recv_raw(b.x, bytes_of::<bf16>(rows * h), 0)
                    .and_then(|_| self.comm.recv_raw(b.ids, bytes_of::<u32>(rows * k), 0))
                    .and_then(|_| self.comm.recv_raw(b.weights, bytes_of::<f32>(rows * k), 0))
            };
            self.comm.group_end(self.cfg.timeout)?;
            r?;
            // The rows must be here before the compute, which may synchronise the stream from
            // the host: a router that died mid-layer would leave that synchronisation waiting
            // forever, while this wait ends at the deadline or when the owner stops the loop
            // (a new NcclInit does).
            self.comm.wait("rows", Some(self.cfg.timeout), Some(stop))?;
            if let Err(m) = compute.compute(&hd) {
                return Err(self.protocol(format!("compute failed: {m}")));
            }
            self.comm.group_start()?;
            // SAFETY: as above; the next header wait covers this send's completion.
            let r = unsafe { self.comm.send_raw(b.partial, bytes_of::<bf16>(rows * h), 0) };
            self.comm.group_end(self.cfg.timeout)?;
            r?;
        }
    }
}
