//! A minimal NCCL round trip with cudarc's own blocking `Comm` (no hand-written communicator):
//! router thread on GPU 0, shard thread on GPU 1; per iteration the router sends a header, then
//! rows (bf16) + ids + weights and receives partials; the shard echoes the rows as partials.
//! It isolates whether the NCCL p2p pattern itself works on the host, apart from dsv2-nccl's
//! non-blocking communicator (whose first exchange hangs, bench/RESULTS.md). Prints µs per round
//! trip (dispatch + combine, no expert compute) at 1, 64 and 256 rows of hidden 5120.
//!
//! Variants (environment, for diagnosing the hang on the H200 pair):
//! - `SMOKE_GROUP=cudarc`: cudarc's `Group` API, whose buffer events are recorded after
//!   `ncclGroupEnd`, instead of manual group_start/end with events recorded inside the group.
//! - `SMOKE_EVENTS=off`: cudarc's event tracking disabled on both contexts (no events at all).
//! - `SMOKE_PATTERN=allreduce|swap`: instead of the router/shard protocol, both ranks run one
//!   all-reduce, or one grouped {send, recv} swap (what GPU.md's probe measured), then exit.
//! - `SMOKE_PRECONNECT=0`: skip the symmetric swap at the largest size that connects every p2p
//!   channel both ways before the protocol starts (without it the protocol hangs: see
//!   dsv2-nccl's plane.rs `handshake`).
//! - `SMOKE_RECV_IN_GROUP=1`: the router receives the partials inside its send group, as the
//!   first versions did (and hung); by default the receive is a separate call after the group.
//! - `SMOKE_PROCS=threads`: both ranks as threads of one process (how the first attempts ran, and
//!   hung); the default runs the shard as a second process, as router and expert shards do.

use std::time::Instant;

use anyhow::{Result, anyhow};
use cudarc::driver::CudaContext;
use cudarc::nccl::result::{group_end, group_start};
use cudarc::nccl::safe::{Comm, Id};
use half::bf16;

/// (rows, x, ids, weights) receive buffers for one row count.
type ShardBufs = (
    usize,
    cudarc::driver::CudaSlice<bf16>,
    cudarc::driver::CudaSlice<u32>,
    cudarc::driver::CudaSlice<f32>,
);

const HIDDEN: usize = 5120;
const K: usize = 6;
const ITERS: usize = 200;

fn main() -> Result<()> {
    if std::env::var("NCCL_NVLS_ENABLE").as_deref() != Ok("0") {
        return Err(anyhow!(
            "set NCCL_NVLS_ENABLE=0 (NVLink multicast must stay off)"
        ));
    }
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "--shard-id" {
        // Child process: rank 1 with the id the parent created.
        return shard(id_from_hex(&args[2])?);
    }
    let id = Id::new().map_err(|e| anyhow!("ncclGetUniqueId: {e:?}"))?;
    if std::env::var("SMOKE_PROCS").as_deref() == Ok("threads") {
        let shard = std::thread::spawn(move || shard(id));
        let r = router(id);
        let s = shard.join().map_err(|_| anyhow!("shard thread panicked"))?;
        return r.and(s);
    }
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--shard-id")
        .arg(id_to_hex(&id))
        .spawn()?;
    let r = router(id);
    let status = child.wait()?;
    r?;
    if !status.success() {
        return Err(anyhow!("shard process failed: {status}"));
    }
    Ok(())
}

fn id_to_hex(id: &Id) -> String {
    id.internal()
        .iter()
        .map(|c| format!("{:02x}", *c as u8))
        .collect()
}

fn id_from_hex(s: &str) -> Result<Id> {
    if s.len() != 256 {
        return Err(anyhow!("NCCL id must be 256 hex digits, got {}", s.len()));
    }
    let mut raw = [0 as core::ffi::c_char; 128];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)? as core::ffi::c_char;
    }
    Ok(Id::uninit(raw))
}

/// `SMOKE_RECV_IN_GROUP=1`: the router's receive of the partials in the same group as its sends
/// (the pattern that hangs: NCCL runs a group's p2p work per peer in order, pairing the first send
/// with the receive, which cannot complete before the later sends have arrived).
fn recv_in_group() -> bool {
    std::env::var("SMOKE_RECV_IN_GROUP").as_deref() == Ok("1")
}

fn use_cudarc_group() -> bool {
    std::env::var("SMOKE_GROUP").as_deref() == Ok("cudarc")
}

fn context(ordinal: usize) -> Result<std::sync::Arc<CudaContext>> {
    let ctx = CudaContext::new(ordinal)?;
    if std::env::var("SMOKE_EVENTS").as_deref() == Ok("off") {
        // SAFETY: nothing has been allocated on this context yet, and all work below runs on one
        // stream, so no cross-stream ordering is lost.
        unsafe { ctx.disable_event_tracking() };
    }
    Ok(ctx)
}

fn router(id: Id) -> Result<()> {
    let ctx = context(0)?;
    let stream = ctx.default_stream();
    let comm =
        Comm::from_rank(stream.clone(), 0, 2, id).map_err(|e| anyhow!("init rank 0: {e:?}"))?;
    println!("router: rank 0 joined");
    if let Some(p) = symmetric_pattern() {
        return symmetric(&comm, &stream, 0, &p);
    }
    preconnect(&comm, &stream, 1)?;
    for rows in [1usize, 64, 256] {
        let mut hdr = stream.alloc_zeros::<u32>(8)?;
        let x = stream.clone_htod(&vec![bf16::from_f32(1.5); rows * HIDDEN])?;
        let ids = stream.alloc_zeros::<u32>(rows * K)?;
        let w = stream.alloc_zeros::<f32>(rows * K)?;
        let mut partial = stream.alloc_zeros::<bf16>(rows * HIDDEN)?;
        stream.memcpy_htod(&[rows as u32, 0, 0, 0, 0, 0, 0, 0], &mut hdr)?;
        let mut times = Vec::with_capacity(ITERS);
        for it in 0..ITERS + 10 {
            let t0 = Instant::now();
            comm.send(&hdr, 1)
                .map_err(|e| anyhow!("send header: {e:?}"))?;
            if use_cudarc_group() {
                let mut g = comm.group();
                g.send(x.as_view(), 1)
                    .map_err(|e| anyhow!("send x: {e:?}"))?;
                g.send(ids.as_view(), 1)
                    .map_err(|e| anyhow!("send ids: {e:?}"))?;
                g.send(w.as_view(), 1)
                    .map_err(|e| anyhow!("send w: {e:?}"))?;
                if recv_in_group() {
                    g.recv(partial.as_view_mut(), 1)
                        .map_err(|e| anyhow!("recv partial: {e:?}"))?;
                }
                drop(g);
            } else {
                group_start().map_err(|e| anyhow!("{e:?}"))?;
                comm.send(&x, 1).map_err(|e| anyhow!("send x: {e:?}"))?;
                comm.send(&ids, 1).map_err(|e| anyhow!("send ids: {e:?}"))?;
                comm.send(&w, 1).map_err(|e| anyhow!("send w: {e:?}"))?;
                if recv_in_group() {
                    comm.recv(&mut partial, 1)
                        .map_err(|e| anyhow!("recv partial: {e:?}"))?;
                }
                group_end().map_err(|e| anyhow!("{e:?}"))?;
            }
            if !recv_in_group() {
                comm.recv(&mut partial, 1)
                    .map_err(|e| anyhow!("recv partial: {e:?}"))?;
            }
            stream.synchronize()?;
            if it >= 10 {
                times.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        let back = stream.clone_dtoh(&partial)?;
        let ok = back.iter().all(|v| v.to_f32() == 1.5);
        times.sort_by(f64::total_cmp);
        let bytes = (rows * HIDDEN * 2 * 2 + rows * K * 8) as f64;
        println!(
            "rows {rows:4}: median {:8.1} µs  p10 {:8.1}  p90 {:8.1}  ({:.1} GB/s both ways)  echo {}",
            times[ITERS / 2],
            times[ITERS / 10],
            times[ITERS * 9 / 10],
            bytes / (times[ITERS / 2] * 1e-6) / 1e9,
            if ok { "verified" } else { "WRONG" }
        );
    }
    let stop = stream.alloc_zeros::<u32>(8)?;
    comm.send(&stop, 1)
        .map_err(|e| anyhow!("send stop: {e:?}"))?;
    stream.synchronize()?;
    Ok(())
}

fn shard(id: Id) -> Result<()> {
    let ctx = context(1)?;
    let stream = ctx.default_stream();
    let comm =
        Comm::from_rank(stream.clone(), 1, 2, id).map_err(|e| anyhow!("init rank 1: {e:?}"))?;
    println!("shard: rank 1 joined");
    if let Some(p) = symmetric_pattern() {
        return symmetric(&comm, &stream, 1, &p);
    }
    preconnect(&comm, &stream, 0)?;
    let max = 256;
    let mut hdr = stream.alloc_zeros::<u32>(8)?;
    let mut bufs: Vec<ShardBufs> = Vec::new();
    for rows in [1usize, 64, max] {
        bufs.push((
            rows,
            stream.alloc_zeros(rows * HIDDEN)?,
            stream.alloc_zeros(rows * K)?,
            stream.alloc_zeros(rows * K)?,
        ));
    }
    loop {
        comm.recv(&mut hdr, 0)
            .map_err(|e| anyhow!("recv header: {e:?}"))?;
        let h = stream.clone_dtoh(&hdr)?;
        let rows = h[0] as usize;
        if rows == 0 {
            return Ok(());
        }
        let b = bufs
            .iter_mut()
            .find(|b| b.0 == rows)
            .ok_or_else(|| anyhow!("unexpected {rows} rows"))?;
        if use_cudarc_group() {
            let mut g = comm.group();
            g.recv(b.1.as_view_mut(), 0)
                .map_err(|e| anyhow!("recv x: {e:?}"))?;
            g.recv(b.2.as_view_mut(), 0)
                .map_err(|e| anyhow!("recv ids: {e:?}"))?;
            g.recv(b.3.as_view_mut(), 0)
                .map_err(|e| anyhow!("recv w: {e:?}"))?;
            drop(g);
        } else {
            group_start().map_err(|e| anyhow!("{e:?}"))?;
            comm.recv(&mut b.1, 0)
                .map_err(|e| anyhow!("recv x: {e:?}"))?;
            comm.recv(&mut b.2, 0)
                .map_err(|e| anyhow!("recv ids: {e:?}"))?;
            comm.recv(&mut b.3, 0)
                .map_err(|e| anyhow!("recv w: {e:?}"))?;
            group_end().map_err(|e| anyhow!("{e:?}"))?;
        }
        // Echo: the rows go back as the partial sums (compute excluded).
        comm.send(&b.1, 0)
            .map_err(|e| anyhow!("send partial: {e:?}"))?;
    }
}

fn symmetric_pattern() -> Option<String> {
    std::env::var("SMOKE_PATTERN").ok()
}

/// The same call on both ranks: one all-reduce of 1 MiB, or one grouped send/recv swap.
fn symmetric(
    comm: &Comm,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    rank: usize,
    pattern: &str,
) -> Result<()> {
    let n = 1 << 19;
    let x = stream.clone_htod(&vec![(rank + 1) as f32; n])?;
    let mut y = stream.alloc_zeros::<f32>(n)?;
    let t0 = Instant::now();
    let expect = match pattern {
        "allreduce" => {
            comm.all_reduce(&x, &mut y, &cudarc::nccl::safe::ReduceOp::Sum)
                .map_err(|e| anyhow!("all_reduce: {e:?}"))?;
            3.0
        }
        "swap" => {
            let peer = 1 - rank as i32;
            let mut g = comm.group();
            g.send(x.as_view(), peer)
                .map_err(|e| anyhow!("send: {e:?}"))?;
            g.recv(y.as_view_mut(), peer)
                .map_err(|e| anyhow!("recv: {e:?}"))?;
            drop(g);
            (2 - rank) as f32
        }
        other => return Err(anyhow!("unknown SMOKE_PATTERN {other}")),
    };
    stream.synchronize()?;
    let got = stream.clone_dtoh(&y)?;
    let ok = got.iter().all(|v| *v == expect);
    println!(
        "rank {rank}: {pattern} done in {:.1} ms, {}",
        t0.elapsed().as_secs_f64() * 1e3,
        if ok { "verified" } else { "WRONG" }
    );
    if ok {
        Ok(())
    } else {
        Err(anyhow!("{pattern}: wrong result"))
    }
}

/// One symmetric {send, recv} swap with `peer` at the largest payload (256 rows of hidden bf16),
/// so every p2p channel the protocol uses is connected before it starts.
fn preconnect(
    comm: &Comm,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    peer: i32,
) -> Result<()> {
    if std::env::var("SMOKE_PRECONNECT").as_deref() == Ok("0") {
        return Ok(());
    }
    let a = stream.alloc_zeros::<bf16>(256 * HIDDEN)?;
    let mut b = stream.alloc_zeros::<bf16>(256 * HIDDEN)?;
    let t0 = Instant::now();
    let mut g = comm.group();
    g.send(a.as_view(), peer)
        .map_err(|e| anyhow!("preconnect send: {e:?}"))?;
    g.recv(b.as_view_mut(), peer)
        .map_err(|e| anyhow!("preconnect recv: {e:?}"))?;
    drop(g);
    stream.synchronize()?;
    println!(
        "preconnect with rank {peer}: {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
