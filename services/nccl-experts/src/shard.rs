//! The shard's end: a `ShardCompute` that runs this shard's routed experts on the rows the plane
//! received into its device buffers, and the `ExpertShard.NcclInit` handler that starts it.

use std::sync::{Arc, Mutex};

use dsv2_core::model::{ExpertExecutor, LocalExperts};
use dsv2_core::routing::{NO_EXPERT, Routing};
use dsv2_cuda_backend::{CudaAct, CudaBackend};
use dsv2_kernels::Tensor;
use dsv2_kernels::ops::general;
use dsv2_nccl::bootstrap::{ShardThread, shard_join};
use dsv2_nccl::{BatchBuffers, Header, PlaneConfig, ShardCompute};
use dsv2_proto::expert::v1::{NcclInitRequest, NcclInitResponse};
use half::bf16;

/// This shard's experts behind the NCCL plane.
pub struct ShardExperts {
    backend: Arc<CudaBackend>,
    experts: Arc<LocalExperts<CudaBackend>>,
    hosted: Vec<bool>,
    moe_layer: Vec<bool>,
    hidden: usize,
    max_k: usize,
    /// Receive buffers: [max_rows, hidden] rows, [max_rows * max_k] ids (u32 bits) and weights.
    x: Tensor<bf16>,
    ids: Tensor<i32>,
    weights: Tensor<f32>,
    /// [max_rows, hidden]: the weighted partial sums sent back.
    partial: Tensor<bf16>,
}

impl ShardExperts {
    /// Buffers for the exchange sizes the router announced (`cfg`).
    pub fn new(
        backend: Arc<CudaBackend>,
        experts: Arc<LocalExperts<CudaBackend>>,
        hosted: Vec<bool>,
        moe_layer: Vec<bool>,
        cfg: &PlaneConfig,
    ) -> Result<Self, String> {
        if cfg.slot_rows > 0 {
            let own: Vec<u32> = (0..moe_layer.len() as u32)
                .filter(|&l| moe_layer[l as usize])
                .collect();
            let theirs: Vec<u32> = cfg.moe_layers.iter().collect();
            if own != theirs {
                return Err(format!(
                    "the router's MoE layers {theirs:?} are not this shard's {own:?}: start both with the same model"
                ));
            }
        }
        let (rows, h, k) = (cfg.max_rows, cfg.hidden, cfg.max_k);
        let (x, ids, weights, partial) = backend
            .with_gpu(|gpu| {
                Ok((
                    Tensor::<bf16>::zeros(gpu, &[rows, h])?,
                    Tensor::<i32>::zeros(gpu, &[rows * k])?,
                    Tensor::<f32>::zeros(gpu, &[rows * k])?,
                    Tensor::<bf16>::zeros(gpu, &[rows, h])?,
                ))
            })
            .map_err(|e| format!("allocating the exchange buffers: {e}"))?;
        // Uploaded now rather than on a layer's first use, which may be a launch queued ahead
        // of its slot, where nothing may wait on the stream.
        for layer in (0..moe_layer.len()).filter(|&l| moe_layer[l]) {
            if let Some(bank) = experts.local_bank(layer) {
                backend
                    .prepare_expert_table(bank)
                    .map_err(|e| format!("layer {layer}'s expert table: {e}"))?;
            }
        }
        Ok(ShardExperts {
            backend,
            experts,
            hosted,
            moe_layer,
            hidden: h,
            max_k: k,
            x,
            ids,
            weights,
            partial,
        })
    }

    /// The backend's on-device expert path (small-batch or grouped kernels) reads the received
    /// ids and weights where they are, with no host step (an id of another shard, u32::MAX or
    /// one this shard does not hold, is skipped: a row without experts here comes out as
    /// zeros). False when it does not apply (prefill-sized batches, kernels off or unsupported
    /// shapes): nothing was enqueued and the host path runs.
    fn run_on_device(&mut self, hd: &Header, ahead: bool) -> Result<bool, String> {
        let (rows, k, layer) = (hd.rows as usize, hd.k as usize, hd.layer as usize);
        if rows == 0 {
            return Ok(false);
        }
        let Some(bank) = self.experts.local_bank(layer) else {
            return Ok(false);
        };
        let shape = |e: dsv2_kernels::KernelError| e.to_string();
        self.backend
            .experts_from_device_routing(
                bank,
                self.x.view().narrow(0, 0, rows).map_err(shape)?,
                self.ids
                    .view()
                    .narrow(0, 0, rows * k)
                    .and_then(|v| v.reshape(&[rows, k]))
                    .map_err(shape)?,
                self.weights
                    .view()
                    .narrow(0, 0, rows * k)
                    .and_then(|v| v.reshape(&[rows, k]))
                    .map_err(shape)?,
                self.partial.view_mut().narrow(0, 0, rows).map_err(shape)?,
                ahead,
            )
            .map_err(|e| e.to_string())
    }

    fn run(&mut self, hd: &Header) -> Result<(), String> {
        let (rows, k, layer) = (hd.rows as usize, hd.k as usize, hd.layer as usize);
        if !self.moe_layer.get(layer).copied().unwrap_or(false) {
            return Err(format!("layer {layer} is not a MoE layer"));
        }
        if self.run_on_device(hd, false)? {
            return Ok(());
        }
        // Expert ids and gate weights come to the host (the expert FFN sizes its GEMMs there);
        // the hidden rows stay on the device.
        let (ids, weights, act) = self
            .backend
            .with_gpu(|gpu| {
                // only this layer's rows * k entries, not the whole receive buffer
                let ids = gpu.stream.clone_dtoh(&self.ids.buf().slice(0..rows * k))?;
                let weights = gpu
                    .stream
                    .clone_dtoh(&self.weights.buf().slice(0..rows * k))?;
                let mut xs = Tensor::<bf16>::uninit(gpu, &[rows, self.hidden])?;
                general::copy_rows(gpu, self.x.view().narrow(0, 0, rows)?, xs.view_mut())?;
                Ok((ids, weights, CudaAct::Bf16(xs)))
            })
            .map_err(|e| e.to_string())?;
        let hosted = |e: u32| self.hosted.get(e as usize).copied().unwrap_or(false);
        let mut ids: Vec<u32> = ids.iter().map(|&v| v as u32).collect();
        if hd.in_slot {
            // a slot goes to every shard: the other shards' experts are theirs to run
            for e in ids.iter_mut() {
                if *e != NO_EXPERT && !hosted(*e) {
                    *e = NO_EXPERT;
                }
            }
        } else if let Some(e) = ids.iter().find(|&&e| e != NO_EXPERT && !hosted(e)) {
            return Err(format!("expert {e} is not hosted by this shard"));
        }
        let routing = Routing {
            top_k: k,
            ids,
            weights,
        };
        let y = self
            .experts
            .forward(layer, &act, &routing)
            .map_err(|e| e.to_string())?;
        let partial = &mut self.partial;
        self.backend
            .with_gpu(|gpu| {
                let dst = partial.view_mut().narrow(0, 0, rows)?;
                match &y {
                    CudaAct::Bf16(t) => general::copy_rows(gpu, t.view(), dst),
                    CudaAct::F32(t) => general::cast_f32_bf16(gpu, t.view(), dst),
                }
            })
            .map_err(|e| e.to_string())
    }
}

// SAFETY: the buffers are this struct's own device tensors on the backend's device (whose stream
// the plane uses), sized for the announced maximum rows and k (checked in `buffers`), and they
// live, untouched by anything else, as long as the struct.
unsafe impl ShardCompute for ShardExperts {
    fn buffers(&mut self, h: &Header) -> Result<BatchBuffers, String> {
        let (rows, k) = (h.rows as usize, h.k as usize);
        if rows > self.x.shape()[0] || k > self.max_k || h.hidden as usize != self.hidden {
            return Err(format!(
                "batch of {rows} rows x k {k} x hidden {} does not fit {} x {} x {}",
                h.hidden,
                self.x.shape()[0],
                self.max_k,
                self.hidden
            ));
        }
        Ok(BatchBuffers {
            x: self.x.ptr(),
            ids: self.ids.ptr(),
            weights: self.weights.ptr(),
            partial: self.partial.ptr(),
        })
    }

    fn compute(&mut self, h: &Header) -> Result<(), String> {
        self.run(h)
    }

    fn compute_ahead(&mut self, h: &Header) -> Result<bool, String> {
        if !self
            .moe_layer
            .get(h.layer as usize)
            .copied()
            .unwrap_or(false)
        {
            return Err(format!("layer {} is not a MoE layer", h.layer));
        }
        self.run_on_device(h, true)
    }
}

/// What `ExpertShard.NcclInit` calls on a GPU shard (blocking: run it off the async workers).
pub type NcclJoin = Arc<dyn Fn(&NcclInitRequest) -> NcclInitResponse + Send + Sync>;

/// The NcclInit handler of a GPU shard: joins the router's communicator and serves the exchange
/// on a thread of its own. A new NcclInit (a restarted router) stops the previous exchange first.
pub fn shard_join_handler(
    backend: Arc<CudaBackend>,
    experts: Arc<LocalExperts<CudaBackend>>,
    hosted: Vec<bool>,
    moe_layer: Vec<bool>,
    hidden: usize,
) -> NcclJoin {
    let current: Arc<Mutex<Option<ShardThread>>> = Arc::new(Mutex::new(None));
    Arc::new(move |req: &NcclInitRequest| {
        if let Ok(mut g) = current.lock()
            && let Some(old) = g.take()
        {
            tracing::info!("a new NcclInit: stopping the previous NCCL exchange");
            old.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            match old.thread.join() {
                Ok(end) => tracing::info!(end = ?end, "previous NCCL exchange ended"),
                Err(_) => tracing::warn!("previous NCCL exchange thread panicked"),
            }
        }
        let (b, e, hs, ml) = (
            backend.clone(),
            experts.clone(),
            hosted.clone(),
            moe_layer.clone(),
        );
        let (resp, thread) = shard_join(req, hidden, move |cfg: &PlaneConfig| {
            b.gpu()
                .ctx
                .bind_to_thread()
                .map_err(|e| format!("binding the CUDA context: {e}"))?;
            let stream = b.gpu().stream.clone();
            let compute = ShardExperts::new(b, e, hs, ml, cfg)?;
            Ok((stream, compute))
        });
        if resp.ok {
            tracing::info!(
                rank = req.rank,
                world = req.world_size,
                "joined the router's NCCL communicator"
            );
        } else {
            tracing::warn!(error = %resp.error, "NcclInit failed");
        }
        if let Ok(mut g) = current.lock() {
            *g = thread;
        }
        resp
    })
}
