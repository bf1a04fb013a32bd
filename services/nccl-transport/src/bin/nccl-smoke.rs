//! A minimal NCCL round trip with cudarc's own blocking `Comm` (no hand-written communicator):
//! router thread on GPU 0, shard thread on GPU 1; per iteration the router sends a header, then
//! rows (bf16) + ids + weights and receives partials; the shard echoes the rows as partials.
//! It isolates whether the NCCL p2p pattern itself works on the host, apart from dsv2-nccl's
//! non-blocking communicator (whose first exchange hangs, bench/RESULTS.md). Prints µs per round
//! trip (dispatch + combine, no expert compute) at 1, 64 and 256 rows of hidden 5120.

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
    let id = Id::new().map_err(|e| anyhow!("ncclGetUniqueId: {e:?}"))?;
    let shard = std::thread::spawn(move || shard(id));
    let r = router(id);
    let s = shard.join().map_err(|_| anyhow!("shard thread panicked"))?;
    r.and(s)
}

fn router(id: Id) -> Result<()> {
    let ctx = CudaContext::new(0)?;
    let stream = ctx.default_stream();
    let comm =
        Comm::from_rank(stream.clone(), 0, 2, id).map_err(|e| anyhow!("init rank 0: {e:?}"))?;
    println!("router: rank 0 joined");
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
            group_start().map_err(|e| anyhow!("{e:?}"))?;
            comm.send(&x, 1).map_err(|e| anyhow!("send x: {e:?}"))?;
            comm.send(&ids, 1).map_err(|e| anyhow!("send ids: {e:?}"))?;
            comm.send(&w, 1).map_err(|e| anyhow!("send w: {e:?}"))?;
            comm.recv(&mut partial, 1)
                .map_err(|e| anyhow!("recv partial: {e:?}"))?;
            group_end().map_err(|e| anyhow!("{e:?}"))?;
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
    let ctx = CudaContext::new(1)?;
    let stream = ctx.default_stream();
    let comm =
        Comm::from_rank(stream.clone(), 1, 2, id).map_err(|e| anyhow!("init rank 1: {e:?}"))?;
    println!("shard: rank 1 joined");
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
        group_start().map_err(|e| anyhow!("{e:?}"))?;
        comm.recv(&mut b.1, 0)
            .map_err(|e| anyhow!("recv x: {e:?}"))?;
        comm.recv(&mut b.2, 0)
            .map_err(|e| anyhow!("recv ids: {e:?}"))?;
        comm.recv(&mut b.3, 0)
            .map_err(|e| anyhow!("recv w: {e:?}"))?;
        group_end().map_err(|e| anyhow!("{e:?}"))?;
        // Echo: the rows go back as the partial sums (compute excluded).
        comm.send(&b.1, 0)
            .map_err(|e| anyhow!("send partial: {e:?}"))?;
    }
}
