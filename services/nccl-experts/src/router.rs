//! The router's end: an `ExpertExecutor<CudaBackend>` whose dispatch gathers rows on the device
//! and whose wait adds the shards' partials, with the NCCL exchange on a thread of its own
//! (a communicator is used from the thread that created it).

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use cudarc::driver::CudaSlice;
use dsv2_core::model::{ExpertExecutor, PendingExperts};
use dsv2_core::placement::{Placement, experts_on_several_shards, split_rows};
use dsv2_core::routing::{Routing, RoutingParams};
use dsv2_core::{CoreError, ModelConfig};
use dsv2_cuda_backend::{CudaAct, CudaBackend, CudaWeight};
use dsv2_kernels::ops::small_experts::SMALL_EXPERTS_MAX_ROWS;
use dsv2_kernels::ops::{general, moe};
use dsv2_kernels::{Gpu, KernelError, Tensor, View};
use dsv2_nccl::bootstrap::bootstrap_router;
use dsv2_nccl::{LayerSet, PlaneConfig, RouterPlane, ShardPart};
use half::bf16;
use tokio::runtime::Handle;

use crate::watchdog::ShardWatch;

/// One shard's rows of one layer on the router's GPU.
struct Part {
    rows: usize,
    /// Row index of each gathered row in the layer's input.
    idx: Tensor<i32>,
    x: Tensor<bf16>,
    ids: CudaSlice<u32>,
    weights: CudaSlice<f32>,
    partial: Tensor<bf16>,
}

type Reply = (Vec<Option<Part>>, Result<(), String>);

/// A layer whose rows go to the shards that hold their experts (the per-layer protocol).
struct Job {
    layer: u32,
    k: usize,
    parts: Vec<Option<Part>>,
    reply: mpsc::SyncSender<Reply>,
}

/// A decode-size layer in one slot to every shard, routing as the gate kernel left it on the
/// device; the reply is the summed partials (or why not).
struct SlotJob {
    layer: u32,
    /// [rows, hidden] bf16 copy of the layer's input.
    x: Tensor<bf16>,
    /// [rows, k] global expert ids / gate weights.
    ids: Tensor<i32>,
    weights: Tensor<f32>,
    /// The pass's last MoE layer: wait (bounded) until every exchange so far has completed,
    /// so that the host's next unbounded wait (the logits) cannot hang on a dead shard.
    last: bool,
    reply: mpsc::SyncSender<Result<CudaAct, String>>,
}

enum Work {
    Layer(Job),
    Slot(Box<SlotJob>),
}

/// Routed experts on NCCL shards (ranks 1..=N), the router being rank 0.
pub struct NcclExperts {
    backend: Arc<CudaBackend>,
    owner: Vec<usize>,
    shards: usize,
    hidden: usize,
    max_rows: usize,
    max_k: usize,
    timeout: Duration,
    /// Rows of the decode slot (0: slots off, every layer takes the per-layer protocol).
    slot_rows: usize,
    /// The last MoE layer (slot jobs of it wait for completion).
    last_moe_layer: usize,
    jobs: Mutex<Option<mpsc::Sender<Work>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    watch: ShardWatch,
}

/// `DSV2_NCCL_SLOTS=N`: decode slots of N rows (0 or unset: off). Capped at the small-batch
/// expert kernels' row limit: beyond it a shard could not answer a slot without the host.
fn slot_rows_from_env(max_rows: usize) -> Result<usize, CoreError> {
    let Ok(v) = std::env::var("DSV2_NCCL_SLOTS") else {
        return Ok(0);
    };
    let n: usize = v.trim().parse().map_err(|_| {
        CoreError::InvalidInput(format!(
            "DSV2_NCCL_SLOTS={v}: expected a row count (0 = off, at most {})",
            SMALL_EXPERTS_MAX_ROWS
        ))
    })?;
    if n > SMALL_EXPERTS_MAX_ROWS {
        return Err(CoreError::InvalidInput(format!(
            "DSV2_NCCL_SLOTS={n}: at most {SMALL_EXPERTS_MAX_ROWS} rows (the small-batch expert kernels' limit)"
        )));
    }
    Ok(n.min(max_rows))
}

/// An expert shard as the data plane sees it: where its control endpoint is and which experts
/// it has loaded (its `Info`), which may be more than the placement gives it.
#[derive(Clone, Debug)]
pub struct PlaneShard {
    pub endpoint: String,
    pub experts: Vec<usize>,
}

/// Decode slots go to every shard with all of a row's expert ids, and each shard adds the
/// experts it has loaded: an expert loaded on two shards would be counted twice. Slots stay
/// off then (the per-layer exchange splits rows by the placement's owner and is exact).
fn slots_allowed(slot_rows: usize, hosted: &[Vec<usize>]) -> usize {
    if slot_rows == 0 {
        return 0;
    }
    let replicas = experts_on_several_shards(hosted);
    if replicas.is_empty() {
        return slot_rows;
    }
    tracing::warn!(
        experts = ?replicas,
        "DSV2_NCCL_SLOTS ignored: these experts are loaded on more than one shard and slots would add them twice; start each shard with only its placement's experts (--experts or --shard-index/--num-shards) to use slots"
    );
    0
}

/// How often the shards' health is checked (a dead shard fails the layer within ~2 periods).
const WATCH_PERIOD: Duration = Duration::from_millis(500);
/// After a failure, the plane is brought up again at most this often (when every shard answers).
const REINIT_EVERY: Duration = Duration::from_secs(2);

fn experts_err(msg: impl std::fmt::Display) -> CoreError {
    CoreError::experts(format!("NCCL data plane: {msg}"))
}

impl NcclExperts {
    /// Creates the communicator: asks every shard (in `endpoints` order: rank i + 1) to join over
    /// gRPC and joins as rank 0. `max_rows` bounds the rows one shard gets in one layer (the
    /// scheduler's token budget per step); `timeout` bounds the init and every layer.
    /// `rt` must be a runtime other than the calling thread's own (it is blocked on).
    pub fn connect(
        backend: Arc<CudaBackend>,
        rt: Handle,
        cfg: &ModelConfig,
        placement: &Placement,
        shards: Vec<PlaneShard>,
        max_rows: usize,
        timeout: Duration,
    ) -> Result<Self, CoreError> {
        if shards.is_empty() {
            return Err(CoreError::InvalidInput(
                "the NCCL data plane needs at least one expert shard".into(),
            ));
        }
        let max_rows = max_rows.max(1);
        let moe_layers = cfg.moe_layers();
        let hosted: Vec<Vec<usize>> = shards.iter().map(|s| s.experts.clone()).collect();
        let slot_rows = slots_allowed(slot_rows_from_env(max_rows)?, &hosted);
        let plane_cfg = PlaneConfig {
            hidden: cfg.hidden_size,
            max_rows,
            max_k: cfg.num_experts_per_tok.max(1),
            timeout,
            blocking: std::env::var("DSV2_NCCL_BLOCKING").is_ok_and(|v| v == "1"),
            slot_rows,
            // Only slots need the layer list (the per-layer exchange names its layer in the
            // header), so only slots limit the model's depth.
            moe_layers: if slot_rows > 0 {
                LayerSet::from_layers(moe_layers.iter().copied())
                    .map_err(|e| CoreError::InvalidInput(e.to_string()))?
            } else {
                LayerSet::EMPTY
            },
        };
        let endpoints: Vec<String> = shards.into_iter().map(|s| s.endpoint).collect();
        let (init_tx, init_rx) = mpsc::channel::<Result<(), String>>();
        let (job_tx, job_rx) = mpsc::channel::<Work>();
        let b = backend.clone();
        let eps = endpoints.clone();
        let watch = ShardWatch::spawn(&rt, endpoints.clone(), WATCH_PERIOD);
        let w = watch.clone();
        let thread = std::thread::Builder::new()
            .name("nccl-router".into())
            .spawn(move || plane_loop(b, rt, eps, plane_cfg, w, init_tx, job_rx))
            .map_err(|e| experts_err(format!("cannot start the plane thread: {e}")))?;
        // The init and the split are bounded by `timeout` each; the blocking communicator's
        // first exchange is not (a shard dying right after the split leaves it waiting), so the
        // router's start is bounded here. The stuck thread is left behind: the start fails.
        let init_limit = 2 * timeout + Duration::from_secs(30);
        match init_rx.recv_timeout(init_limit) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                watch.stop();
                return Err(experts_err(e));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let why = watch
                    .reason()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default();
                watch.stop();
                return Err(experts_err(format!(
                    "not up within {init_limit:?}: a shard stopped answering during the first exchange{why}"
                )));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
                watch.stop();
                return Err(experts_err("the plane thread ended during init"));
            }
        }
        tracing::info!(
            shards = endpoints.len(),
            max_rows = plane_cfg.max_rows,
            blocking = plane_cfg.blocking,
            slot_rows = plane_cfg.slot_rows,
            "NCCL data plane up: router is rank 0"
        );
        Ok(NcclExperts {
            backend,
            owner: placement.owner_table(cfg.n_routed_experts),
            shards: endpoints.len(),
            hidden: cfg.hidden_size,
            max_rows: plane_cfg.max_rows,
            max_k: plane_cfg.max_k,
            timeout,
            slot_rows: plane_cfg.slot_rows,
            last_moe_layer: moe_layers.last().copied().unwrap_or(0),
            jobs: Mutex::new(Some(job_tx)),
            thread: Mutex::new(Some(thread)),
            watch,
        })
    }

    /// Gathers each shard's rows of `x` and uploads its expert ids and gate weights.
    fn gather(&self, x: &CudaAct, routing: &Routing) -> Result<Vec<Option<Part>>, CoreError> {
        let h = self.hidden;
        let split = split_rows(routing, &self.owner, self.shards);
        if let Some(s) = split.iter().find(|s| s.rows.len() > self.max_rows) {
            return Err(CoreError::InvalidInput(format!(
                "{} rows for one shard exceed the NCCL plane's {} (raise the router's --max-batch-tokens limit together with the plane)",
                s.rows.len(),
                self.max_rows
            )));
        }
        self.backend.with_gpu(|gpu| {
            let cast;
            let src: &Tensor<bf16> = match x {
                CudaAct::Bf16(t) => t,
                CudaAct::F32(t) => {
                    let mut c = Tensor::<bf16>::zeros(gpu, t.shape())?;
                    general::cast_f32_bf16(gpu, t.view(), c.view_mut())?;
                    cast = c;
                    &cast
                }
            };
            let mut parts = Vec::with_capacity(split.len());
            for s in &split {
                parts.push(gather_part(gpu, src.view(), s, h)?);
            }
            Ok(parts)
        })
    }
}

fn gather_part(
    gpu: &Gpu,
    x: View<'_, bf16>,
    s: &dsv2_core::placement::ShardRows,
    h: usize,
) -> Result<Option<Part>, KernelError> {
    let n = s.rows.len();
    if n == 0 {
        return Ok(None);
    }
    let idx_host: Vec<i32> = s.rows.iter().map(|&r| r as i32).collect();
    let idx = Tensor::from_host(gpu, &idx_host, &[n])?;
    // written entirely: by the gather, and by the shard's partials over NCCL
    let mut xs = Tensor::<bf16>::uninit(gpu, &[n, h])?;
    moe::moe_gather(
        gpu,
        moe::GatherParams {
            x,
            src_row: idx.view(),
            out: xs.view_mut(),
        },
    )?;
    Ok(Some(Part {
        rows: n,
        idx,
        x: xs,
        ids: gpu.stream.clone_htod(&s.ids)?,
        weights: gpu.stream.clone_htod(&s.weights)?,
        partial: Tensor::<bf16>::uninit(gpu, &[n, h])?,
    }))
}

impl ExpertExecutor<CudaBackend> for NcclExperts {
    fn dispatch(
        &self,
        layer: usize,
        x: &CudaAct,
        routing: &Routing,
    ) -> dsv2_core::Result<PendingExperts<CudaBackend>> {
        let (rows, k, h) = (routing.rows(), routing.top_k, self.hidden);
        if k == 0 || k > self.max_k {
            return Err(CoreError::InvalidInput(format!(
                "{k} experts per row (the plane takes 1..={})",
                self.max_k
            )));
        }
        let parts = self.gather(x, routing)?;
        let (reply_tx, reply_rx) = mpsc::sync_channel::<Reply>(1);
        let job = Job {
            layer: layer as u32,
            k,
            parts,
            reply: reply_tx,
        };
        self.submit(Work::Layer(job))?;
        let backend = self.backend.clone();
        // The plane enforces `timeout` per exchange; the margin covers the jobs queued ahead.
        let wait = self.timeout + Duration::from_secs(10);
        Ok(PendingExperts::Later(Box::new(move || {
            let (parts, r) = reply_rx
                .recv_timeout(wait)
                .map_err(|_| experts_err(format!("no answer within {wait:?}")))?;
            r.map_err(experts_err)?;
            backend.with_gpu(|gpu| {
                // Same arithmetic as the gRPC transport: f32 sum over shards in shard order,
                // then one rounding to bf16.
                let mut acc = Tensor::<f32>::zeros(gpu, &[rows, h])?;
                for p in parts.iter().flatten() {
                    general::rows_add_f32(gpu, acc.view_mut(), p.partial.view(), p.idx.view())?;
                }
                let mut out = Tensor::<bf16>::uninit(gpu, &[rows, h])?;
                general::cast_f32_bf16(gpu, acc.view(), out.view_mut())?;
                Ok(CudaAct::Bf16(out))
            })
        })))
    }

    /// Decode sizes with slots on: the gate kernel's ids and weights go to every shard as they
    /// are, in one slot, with no routing on the host.
    fn dispatch_gated(
        &self,
        layer: usize,
        gate: &CudaWeight,
        x: &CudaAct,
        p: &RoutingParams,
    ) -> dsv2_core::Result<Option<PendingExperts<CudaBackend>>> {
        let rows = match x {
            CudaAct::Bf16(t) => t.shape()[0],
            CudaAct::F32(t) => t.shape()[0],
        };
        if self.slot_rows == 0 || rows == 0 || rows > self.slot_rows || p.top_k != self.max_k {
            return Ok(None);
        }
        let Some(routed) = self.backend.route_on_device(gate, x, p)? else {
            return Ok(None);
        };
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        self.submit(Work::Slot(Box::new(SlotJob {
            layer: layer as u32,
            x: routed.x,
            ids: routed.ids,
            weights: routed.weights,
            last: layer == self.last_moe_layer,
            reply: reply_tx,
        })))?;
        let wait = self.timeout + Duration::from_secs(10);
        Ok(Some(PendingExperts::Later(Box::new(move || {
            reply_rx
                .recv_timeout(wait)
                .map_err(|_| experts_err(format!("no answer within {wait:?}")))?
                .map_err(experts_err)
        }))))
    }
}

impl NcclExperts {
    fn submit(&self, work: Work) -> Result<(), CoreError> {
        let sent = match self.jobs.lock() {
            Ok(g) => g.as_ref().is_some_and(|tx| tx.send(work).is_ok()),
            Err(_) => false,
        };
        if sent {
            Ok(())
        } else {
            Err(experts_err("the plane thread has stopped"))
        }
    }
}

impl Drop for NcclExperts {
    fn drop(&mut self) {
        // Closing the job channel ends the plane loop, which tells the shards to leave theirs.
        if let Ok(mut g) = self.jobs.lock() {
            g.take();
        }
        if let Ok(mut t) = self.thread.lock()
            && let Some(t) = t.take()
        {
            let _ = t.join();
        }
        self.watch.stop();
    }
}

/// Placeholder buffers for a shard without rows in a layer: the plane sends it only the header,
/// but its part still needs views.
struct Empty {
    x: CudaSlice<bf16>,
    ids: CudaSlice<u32>,
    weights: CudaSlice<f32>,
    partial: CudaSlice<bf16>,
}

/// One slot exchange and the sum of the shards' partials (f32 in shard order, then one
/// rounding to bf16: the arithmetic of the per-layer path and of the gRPC transport).
fn slot_layer(
    backend: &CudaBackend,
    plane: &mut RouterPlane,
    job: &SlotJob,
    partials: &[Tensor<bf16>],
    ident: &Tensor<i32>,
    explain: impl Fn(dsv2_nccl::NcclError) -> String,
) -> Result<CudaAct, String> {
    let (rows, h) = (job.x.shape()[0], job.x.shape()[1]);
    let k = job.ids.shape().get(1).copied().unwrap_or(0);
    let ptrs: Vec<u64> = partials.iter().map(|t| t.ptr()).collect();
    // SAFETY: x [rows, h] bf16, ids / weights [rows, k] and each partial [slot_rows, h] are
    // live tensors on the plane's device and stream; the job owns the inputs until after the
    // copies (tensors are freed in stream order), the partials live as long as the loop.
    unsafe {
        plane.exchange_slot(
            job.layer,
            rows,
            k,
            job.x.ptr(),
            job.ids.ptr(),
            job.weights.ptr(),
            &ptrs,
        )
    }
    .map_err(&explain)?;
    let out = backend
        .with_gpu(|gpu| {
            let mut acc = Tensor::<f32>::zeros(gpu, &[rows, h])?;
            for p in partials {
                let idx = ident.view().narrow(0, 0, rows)?;
                general::rows_add_f32(gpu, acc.view_mut(), p.view().narrow(0, 0, rows)?, idx)?;
            }
            let mut out = Tensor::<bf16>::uninit(gpu, &[rows, h])?;
            general::cast_f32_bf16(gpu, acc.view(), out.view_mut())?;
            Ok(CudaAct::Bf16(out))
        })
        .map_err(|e: CoreError| e.to_string())?;
    if job.last {
        plane.sync().map_err(&explain)?;
    }
    Ok(out)
}

fn plane_loop(
    backend: Arc<CudaBackend>,
    rt: Handle,
    endpoints: Vec<String>,
    cfg: PlaneConfig,
    watch: ShardWatch,
    init_tx: mpsc::Sender<Result<(), String>>,
    jobs: mpsc::Receiver<Work>,
) {
    let gpu = backend.gpu();
    if let Err(e) = gpu.ctx.bind_to_thread() {
        let _ = init_tx.send(Err(format!("binding the CUDA context: {e}")));
        return;
    }
    let stream = gpu.stream.clone();
    let empties: Result<Vec<Empty>, _> = (0..endpoints.len())
        .map(|_| -> Result<Empty, cudarc::driver::DriverError> {
            Ok(Empty {
                x: stream.alloc_zeros::<bf16>(1)?,
                ids: stream.alloc_zeros::<u32>(1)?,
                weights: stream.alloc_zeros::<f32>(1)?,
                partial: stream.alloc_zeros::<bf16>(1)?,
            })
        })
        .collect();
    let mut empties = match empties {
        Ok(e) => e,
        Err(e) => {
            let _ = init_tx.send(Err(format!("allocating: {e}")));
            return;
        }
    };
    let h = cfg.hidden;
    // Slot mode: where each shard's partials of a slot land, and row indices 0..slot_rows for
    // summing them (the same kernel, and order, as the per-layer path).
    let slot_bufs = if cfg.slot_rows > 0 {
        let r = backend.with_gpu(|gpu| {
            let partials = (0..endpoints.len())
                .map(|_| Tensor::<bf16>::zeros(gpu, &[cfg.slot_rows, h]))
                .collect::<Result<Vec<_>, _>>()?;
            let ident: Vec<i32> = (0..cfg.slot_rows as i32).collect();
            let ident = Tensor::from_host(gpu, &ident, &[cfg.slot_rows])?;
            Ok((partials, ident))
        });
        match r {
            Ok(b) => Some(b),
            Err(e) => {
                let _ = init_tx.send(Err(format!("allocating the slot buffers: {e}")));
                return;
            }
        }
    } else {
        None
    };
    let up = |plane: &mut Option<RouterPlane>| -> Result<(), String> {
        // the old communicator (aborted after its failure) goes before a new one is made
        plane.take();
        let mut p =
            bootstrap_router(&rt, &endpoints, stream.clone(), cfg).map_err(|e| e.to_string())?;
        p.set_abort(watch.down.clone());
        *plane = Some(p);
        Ok(())
    };
    let mut plane: Option<RouterPlane> = None;
    if let Err(e) = up(&mut plane) {
        let _ = init_tx.send(Err(e));
        return;
    }
    let _ = init_tx.send(Ok(()));
    let mut broken: Option<String> = None;
    let mut last_try = std::time::Instant::now();
    // Slot exchanges enqueued since the stream was last waited for. While any are, a quiet job
    // queue may mean the model thread is stuck in a host synchronisation behind an NCCL receive
    // from a dead shard: nothing else would abort the communicator then, so the idle plane
    // waits for the stream itself (bounded, and ended by the watchdog's flag).
    let mut unsynced = false;
    loop {
        let work = match jobs.recv_timeout(WATCH_PERIOD) {
            Ok(w) => w,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if unsynced
                    && broken.is_none()
                    && let Some(p) = plane.as_mut()
                {
                    unsynced = false;
                    if let Err(e) = p.sync() {
                        let e = match watch.reason() {
                            Some(why) => format!("{why} ({e})"),
                            None => e.to_string(),
                        };
                        tracing::error!(error = %e, "NCCL slot exchanges did not complete; the expert plane is down");
                        broken = Some(e);
                        last_try = std::time::Instant::now();
                    }
                }
                continue;
            }
        };
        // A failed plane comes back once every shard answers again (a restarted shard joins
        // the new communicator through its NcclInit).
        if broken.is_some()
            && !watch.down.load(Ordering::SeqCst)
            && last_try.elapsed() >= REINIT_EVERY
        {
            last_try = std::time::Instant::now();
            match up(&mut plane) {
                Ok(()) => {
                    tracing::info!("NCCL data plane re-established");
                    broken = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bringing the NCCL data plane back failed");
                    broken = Some(e);
                }
            }
        }
        let live = match (&broken, plane.as_mut()) {
            (Some(e), _) => Err(format!("down since a failure: {e}")),
            (None, None) => Err("no communicator".to_string()),
            (None, Some(plane)) => Ok(plane),
        };
        // the watchdog's reason names the shard; NCCL's only says it was stopped
        let explain = |e: dsv2_nccl::NcclError| match watch.reason() {
            Some(why) => format!("{why} ({e})"),
            None => e.to_string(),
        };
        match work {
            Work::Layer(mut job) => {
                // a per-layer exchange waits for the stream, slot exchanges before it included
                unsynced = false;
                let result = live.and_then(|plane| {
                    let mut views: Vec<ShardPart<'_>> = job
                        .parts
                        .iter_mut()
                        .zip(empties.iter_mut())
                        .map(|(p, e)| match p {
                            Some(p) => ShardPart {
                                rows: p.rows,
                                x: p.x.buf().slice(0..p.rows * h),
                                ids: p.ids.slice(0..p.ids.len()),
                                weights: p.weights.slice(0..p.weights.len()),
                                partial: p.partial.buf_mut().slice_mut(0..p.rows * h),
                            },
                            None => ShardPart {
                                rows: 0,
                                x: e.x.slice(0..0),
                                ids: e.ids.slice(0..0),
                                weights: e.weights.slice(0..0),
                                partial: e.partial.slice_mut(0..0),
                            },
                        })
                        .collect();
                    plane
                        .exchange(job.layer, job.k, &mut views)
                        .map_err(explain)
                });
                if let Err(e) = &result {
                    tracing::error!(error = %e, "NCCL exchange failed; the expert plane is down");
                    if broken.is_none() {
                        broken = Some(e.clone());
                        last_try = std::time::Instant::now();
                    }
                }
                let _ = job.reply.send((job.parts, result));
            }
            Work::Slot(job) => {
                let result = live.and_then(|plane| {
                    let Some((partials, ident)) = slot_bufs.as_ref() else {
                        return Err("slots are off on this plane".to_string());
                    };
                    slot_layer(&backend, plane, &job, partials, ident, explain)
                });
                // the last layer of a pass waits for the stream; the others leave it running
                unsynced = !job.last;
                if let Err(e) = &result {
                    tracing::error!(error = %e, "NCCL slot exchange failed; the expert plane is down");
                    if broken.is_none() {
                        broken = Some(e.clone());
                        last_try = std::time::Instant::now();
                    }
                }
                // the job's tensors are freed in stream order after the copies that read them
                let _ = job.reply.send(result);
            }
        }
    }
    if let (None, Some(plane)) = (broken, plane) {
        match plane.shutdown() {
            Ok(()) => tracing::info!("NCCL data plane shut down"),
            Err(e) => tracing::warn!(error = %e, "NCCL shutdown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stay_off_when_an_expert_is_loaded_on_two_shards() {
        let disjoint = [vec![0, 1], vec![2, 3]];
        assert_eq!(slots_allowed(4, &disjoint), 4);
        assert_eq!(slots_allowed(0, &disjoint), 0);
        // Shard 1 also loaded expert 1: a slot would add expert 1's output twice.
        assert_eq!(slots_allowed(4, &[vec![0, 1], vec![1, 2, 3]]), 0);
    }
}
