//! Exchange and failure tests on real GPUs (router thread on GPU 0, one shard thread on GPU 1).
//! They skip, saying so, where fewer than two GPUs or no libnccl are present (CI); the GPU check
//! run executes them with `NCCL_NVLS_ENABLE=0 cargo test -p dsv2-nccl`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use dsv2_nccl::{
    BatchBuffers, Header, LayerSet, NcclError, PlaneConfig, RouterPlane, ShardCompute, ShardPart,
    ShardPlane, UniqueId,
};
use half::bf16;

fn two_gpus() -> bool {
    let n = dsv2_nccl::device_count();
    if n < 2 {
        eprintln!("skipped: needs 2 CUDA devices and libnccl ({n} devices usable here)");
        return false;
    }
    // NVLink multicast must stay off on the shared hosts (KINDS.md).
    // SAFETY: set before any NCCL call of this test process.
    unsafe { std::env::set_var("NCCL_NVLS_ENABLE", "0") };
    true
}

/// Echo shard: partials = 2 x rows (so a mix-up of the two buffers shows); with `ahead` (slot
/// mode), slots are answered before they arrive with a device copy: partials = rows.
struct Doubler {
    ahead: bool,
    stream: Arc<CudaStream>,
    x: CudaSlice<bf16>,
    ids: CudaSlice<u32>,
    w: CudaSlice<f32>,
    out: CudaSlice<bf16>,
}

fn addr<T>(s: &CudaSlice<T>, st: &Arc<CudaStream>) -> u64 {
    let (p, _g) = s.device_ptr(st);
    p
}

// SAFETY: the buffers are owned, live, on the plane's device and large enough (max_rows).
unsafe impl ShardCompute for Doubler {
    fn buffers(&mut self, _h: &Header) -> Result<BatchBuffers, String> {
        Ok(BatchBuffers {
            x: addr(&self.x, &self.stream),
            ids: addr(&self.ids, &self.stream),
            weights: addr(&self.w, &self.stream),
            partial: addr(&self.out, &self.stream),
        })
    }
    fn compute_ahead(&mut self, h: &Header) -> Result<bool, String> {
        if !self.ahead {
            return Ok(false);
        }
        let n = (h.rows * h.hidden) as usize;
        let src = self.x.slice(0..n);
        let mut dst = self.out.slice_mut(0..n);
        self.stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| e.to_string())?;
        Ok(true)
    }
    fn compute(&mut self, h: &Header) -> Result<(), String> {
        let n = (h.rows * h.hidden) as usize;
        let x = self
            .stream
            .clone_dtoh(&self.x.slice(0..n))
            .map_err(|e| e.to_string())?;
        let y: Vec<bf16> = x.iter().map(|v| *v + *v).collect();
        let mut dst = self.out.slice_mut(0..n);
        self.stream
            .memcpy_htod(&y, &mut dst)
            .map_err(|e| e.to_string())
    }
}

const CFG: PlaneConfig = PlaneConfig {
    hidden: 64,
    max_rows: 16,
    max_k: 4,
    timeout: Duration::from_secs(5),
    blocking: false,
    slot_rows: 0,
    moe_layers: LayerSet::EMPTY,
};

fn spawn_shard(
    id: UniqueId,
    die_after_init: bool,
) -> std::thread::JoinHandle<Result<(), NcclError>> {
    spawn_shard_with(id, die_after_init, CFG, false)
}

fn spawn_shard_with(
    id: UniqueId,
    die_after_init: bool,
    cfg: PlaneConfig,
    ahead: bool,
) -> std::thread::JoinHandle<Result<(), NcclError>> {
    std::thread::spawn(move || {
        let ctx = CudaContext::new(1).map_err(|e| NcclError::Unavailable(e.to_string()))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| NcclError::Unavailable(e.to_string()))?;
        let n = CFG.max_rows * CFG.hidden;
        let alloc = |n| {
            stream
                .alloc_zeros::<bf16>(n)
                .map_err(|e| NcclError::Unavailable(e.to_string()))
        };
        let mut d = Doubler {
            ahead,
            x: alloc(n)?,
            out: alloc(n)?,
            ids: stream
                .alloc_zeros::<u32>(CFG.max_rows * CFG.max_k)
                .map_err(|e| NcclError::Unavailable(e.to_string()))?,
            w: stream
                .alloc_zeros::<f32>(CFG.max_rows * CFG.max_k)
                .map_err(|e| NcclError::Unavailable(e.to_string()))?,
            stream: stream.clone(),
        };
        let mut plane = ShardPlane::new(stream, id, 1, 2, cfg)?;
        if die_after_init {
            return Ok(()); // drops the plane: its communicator is aborted, like a killed shard
        }
        plane
            .run(&mut d, &Arc::new(AtomicBool::new(false)))
            .map(|_| ())
    })
}

#[test]
fn exchange_round_trips_and_shuts_down() {
    if !two_gpus() {
        return;
    }
    let id = UniqueId::new().expect("unique id");
    let shard = spawn_shard(id, false);
    let ctx = CudaContext::new(0).expect("ctx");
    let stream = ctx.new_stream().expect("stream");
    let mut plane = RouterPlane::new(stream.clone(), id, 1, CFG).expect("router init");
    for (layer, rows) in [(1u32, 3usize), (2, 16), (3, 0), (4, 1)] {
        let k = 4;
        let xh: Vec<bf16> = (0..rows * CFG.hidden)
            .map(|i| bf16::from_f32((i % 97) as f32 - 48.0))
            .collect();
        let x = stream.clone_htod(&xh).expect("x");
        let ids = stream
            .clone_htod(&vec![u32::MAX; rows.max(1) * k])
            .expect("ids");
        let w = stream.alloc_zeros::<f32>(rows.max(1) * k).expect("w");
        let mut out = stream
            .alloc_zeros::<bf16>(rows.max(1) * CFG.hidden)
            .expect("out");
        let mut parts = [ShardPart {
            rows,
            x: x.slice(0..rows * CFG.hidden),
            ids: ids.slice(0..rows * k),
            weights: w.slice(0..rows * k),
            partial: out.slice_mut(0..rows * CFG.hidden),
        }];
        plane.exchange(layer, k, &mut parts).expect("exchange");
        let got = stream.clone_dtoh(&out).expect("dtoh");
        for i in 0..rows * CFG.hidden {
            assert_eq!(
                got[i].to_f32(),
                2.0 * xh[i].to_f32(),
                "layer {layer} value {i}"
            );
        }
    }
    // a part that does not fit is refused before anything is sent
    let x = stream.alloc_zeros::<bf16>(17 * CFG.hidden).expect("x");
    let ids = stream.alloc_zeros::<u32>(17 * 4).expect("ids");
    let w = stream.alloc_zeros::<f32>(17 * 4).expect("w");
    let mut out = stream.alloc_zeros::<bf16>(17 * CFG.hidden).expect("out");
    let mut parts = [ShardPart {
        rows: 17,
        x: x.slice(..),
        ids: ids.slice(..),
        weights: w.slice(..),
        partial: out.slice_mut(..),
    }];
    let e = plane.exchange(9, 4, &mut parts).unwrap_err();
    assert!(matches!(e, NcclError::InvalidArgument(_)), "{e}");
    plane.shutdown().expect("shutdown");
    shard.join().expect("shard thread").expect("shard loop");
}

#[test]
fn dead_shard_is_an_error_not_a_hang() {
    if !two_gpus() {
        return;
    }
    let id = UniqueId::new().expect("unique id");
    let shard = spawn_shard(id, true);
    let ctx = CudaContext::new(0).expect("ctx");
    let stream = ctx.new_stream().expect("stream");
    let mut plane = RouterPlane::new(stream.clone(), id, 1, CFG).expect("router init");
    shard.join().expect("shard thread").expect("shard init");
    let x = stream.alloc_zeros::<bf16>(4 * CFG.hidden).expect("x");
    let ids = stream.alloc_zeros::<u32>(4 * 4).expect("ids");
    let w = stream.alloc_zeros::<f32>(4 * 4).expect("w");
    let mut out = stream.alloc_zeros::<bf16>(4 * CFG.hidden).expect("out");
    let mut parts = [ShardPart {
        rows: 4,
        x: x.slice(..),
        ids: ids.slice(..),
        weights: w.slice(..),
        partial: out.slice_mut(..),
    }];
    let t = Instant::now();
    let e = plane.exchange(1, 4, &mut parts).unwrap_err();
    assert!(
        t.elapsed() < CFG.timeout + Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    eprintln!("dead shard surfaced as: {e}");
    assert!(
        matches!(e, NcclError::Timeout { .. } | NcclError::Nccl { .. }),
        "{e}"
    );
    // the plane stays failed
    let e2 = plane.exchange(2, 4, &mut parts).unwrap_err();
    assert!(matches!(e2, NcclError::Aborted { .. }), "{e2}");
}

#[test]
fn init_times_out_when_a_rank_never_joins() {
    if !two_gpus() {
        return;
    }
    let id = UniqueId::new().expect("unique id");
    let ctx = CudaContext::new(0).expect("ctx");
    let stream = ctx.new_stream().expect("stream");
    let cfg = PlaneConfig {
        timeout: Duration::from_secs(2),
        ..CFG
    };
    let t = Instant::now();
    let e = RouterPlane::new(stream, id, 1, cfg)
        .err()
        .expect("must fail");
    assert!(
        matches!(
            e,
            NcclError::InitTimeout {
                rank: 0,
                world: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    let _ = Ordering::SeqCst;
}

/// Slot mode: in-slot layers (answered ahead or after arrival), a layer skipped by the router
/// (fillers realign the shard), a batch too big for the slot (announced, rows sent separately),
/// blocking and non-blocking communicators, then shutdown.
#[test]
fn slots_round_trip_realign_and_shut_down() {
    if !two_gpus() {
        return;
    }
    for (ahead, blocking) in [(false, false), (true, false), (true, true)] {
        let cfg = PlaneConfig {
            slot_rows: 4,
            blocking,
            moe_layers: LayerSet::from_layers([1, 2, 3]).expect("layers"),
            ..CFG
        };
        let id = UniqueId::new().expect("unique id");
        let shard = spawn_shard_with(id, false, cfg, ahead);
        let ctx = CudaContext::new(0).expect("ctx");
        let stream = ctx.new_stream().expect("stream");
        let mut plane = RouterPlane::new(stream.clone(), id, 1, cfg).expect("router init");
        let k = CFG.max_k;
        let h = CFG.hidden;
        // (layer, rows): 1 2 3 in order, 1 again, then 3 (2 skipped), 1 with 9 rows (separate)
        for (step, (layer, rows)) in [
            (1u32, 1usize),
            (2, 4),
            (3, 2),
            (1, 3),
            (3, 1),
            (1, 9),
            (2, 4),
        ]
        .into_iter()
        .enumerate()
        {
            let xh: Vec<bf16> = (0..rows * h)
                .map(|i| bf16::from_f32(((i + step) % 89) as f32 - 40.0))
                .collect();
            let x = stream.clone_htod(&xh).expect("x");
            let ids = stream.clone_htod(&vec![7u32; rows * k]).expect("ids");
            let w = stream.clone_htod(&vec![0.5f32; rows * k]).expect("w");
            let mut out = stream
                .alloc_zeros::<bf16>(rows.max(cfg.slot_rows) * h)
                .expect("out");
            let in_slot = rows <= cfg.slot_rows;
            if in_slot {
                let (xp, ip, wp, op) = (
                    addr(&x, &stream),
                    addr(&ids, &stream),
                    addr(&w, &stream),
                    addr(&out, &stream),
                );
                // SAFETY: live buffers of the sizes exchange_slot asks for; synced below.
                unsafe { plane.exchange_slot(layer, rows, k, xp, ip, wp, &[op]) }
                    .expect("slot exchange");
                plane.sync().expect("sync");
            } else {
                let mut parts = [ShardPart {
                    rows,
                    x: x.slice(..),
                    ids: ids.slice(..),
                    weights: w.slice(..),
                    partial: out.slice_mut(0..rows * h),
                }];
                plane.exchange(layer, k, &mut parts).expect("exchange");
            }
            let got = stream.clone_dtoh(&out).expect("dtoh");
            let factor = if in_slot && ahead { 1.0 } else { 2.0 };
            for i in 0..rows * h {
                assert_eq!(
                    got[i].to_f32(),
                    factor * xh[i].to_f32(),
                    "ahead {ahead} blocking {blocking}: step {step} layer {layer} value {i}"
                );
            }
        }
        // a layer outside the MoE layers and a slot too small are refused before sending
        let dummy = stream.alloc_zeros::<u8>(1 << 16).expect("dummy");
        let p = addr(&dummy, &stream);
        // SAFETY: refused before anything is enqueued.
        let e = unsafe { plane.exchange_slot(0, 1, k, p, p, p, &[p]) }.unwrap_err();
        assert!(matches!(e, NcclError::InvalidArgument(_)), "{e}");
        // SAFETY: as above.
        let e = unsafe { plane.exchange_slot(1, 5, k, p, p, p, &[p]) }.unwrap_err();
        assert!(matches!(e, NcclError::InvalidArgument(_)), "{e}");
        plane.shutdown().expect("shutdown");
        shard
            .join()
            .expect("shard thread")
            .expect("shard loop ends with the router's shutdown");
    }
}
