//! dsv2-cuda-backend: `dsv2_core::backend::Backend` on one CUDA GPU. Weights and activations are
//! bf16 on the device, every GEMM and reduction accumulates in f32 (cuBLAS COMPUTE_32F, kernels
//! in f32). Kernels and launchers come from `dsv2-kernels`; this crate only composes them.
//!
//! Builds without CUDA (cudarc loads libcuda / NVRTC / cuBLAS at run time); [`CudaBackend::new`]
//! is where a missing driver or device becomes a clear error.

mod blas;
mod cache;
mod ceilings;
mod graphs;
mod host_tier;
mod profile;

use std::sync::{Arc, Mutex, MutexGuard};

use half::bf16;

use dsv2_core::backend::{
    AttnBatch, AttnWeights, Backend, ExpertBank, GraphStep, KvCacheDtype, MlpWeights,
};
use dsv2_core::config::{ModelConfig, TopkMethod};
use dsv2_core::error::{CoreError, Result};
use dsv2_core::routing::{Routing, RoutingParams};
use dsv2_core::sampling::RowSampling;
use dsv2_core::weights::{DType as CkptDType, TensorRef};
use dsv2_kernels::ops::gemv;
use dsv2_kernels::ops::mla_prefill::PrefillKernel;
use dsv2_kernels::ops::{
    elementwise as ew, general as gen_ops, moe, sample, small_experts as small,
};
use dsv2_kernels::rope::RopeTable as DevRope;
use dsv2_kernels::{Gpu, GpuOptions, KernelError, Tensor};

use blas::{Gemm, gemm};

/// Chunks of at most this many new tokens use absorbed attention under `AttnMode::Auto` (the
/// same rule as the CPU reference, so both run the same algorithm on the same step).
const ABSORB_MAX_CHUNK: usize = 4;

/// Elements converted per host chunk when a checkpoint tensor is not bf16 (bounds host memory
/// during upload to 2 × 8 MiB whatever the tensor size).
const UPLOAD_CHUNK: usize = 1 << 22;

fn err(msg: impl Into<String>) -> CoreError {
    CoreError::Backend {
        backend: "cuda".into(),
        msg: msg.into(),
    }
}

fn kerr(e: KernelError) -> CoreError {
    err(e.to_string())
}

trait Kx<T> {
    fn kx(self) -> Result<T>;
}
impl<T> Kx<T> for std::result::Result<T, KernelError> {
    fn kx(self) -> Result<T> {
        self.map_err(kerr)
    }
}
impl<T> Kx<T> for std::result::Result<T, cudarc::driver::DriverError> {
    fn kx(self) -> Result<T> {
        self.map_err(|e| err(format!("CUDA driver: {e}")))
    }
}

/// A checkpoint tensor on the GPU, converted to bf16.
pub struct CudaWeight {
    pub t: Tensor<bf16>,
}

impl CudaWeight {
    fn shape(&self) -> &[usize] {
        self.t.shape()
    }
    /// (rows, cols) of a 2-D weight, or an error naming the op.
    fn dims2(&self, op: &str) -> Result<(usize, usize)> {
        match self.shape() {
            [r, c] => Ok((*r, *c)),
            s => Err(err(format!("{op}: weight has shape {s:?}, expected 2-D"))),
        }
    }
}

/// Activations [rows, cols]: bf16 everywhere except the output of `linear` (logits), which is f32
/// so that greedy decoding and logit comparisons do not see bf16's 8-bit mantissa.
pub enum CudaAct {
    Bf16(Tensor<bf16>),
    F32(Tensor<f32>),
}

impl CudaAct {
    fn dims(&self) -> (usize, usize) {
        let s = match self {
            CudaAct::Bf16(t) => t.shape(),
            CudaAct::F32(t) => t.shape(),
        };
        (s[0], s[1])
    }
}

/// A bf16 activation, borrowed or freshly cast.
enum Bf<'a> {
    Borrowed(&'a Tensor<bf16>),
    Owned(Tensor<bf16>),
}

impl std::ops::Deref for Bf<'_> {
    type Target = Tensor<bf16>;
    fn deref(&self) -> &Tensor<bf16> {
        match self {
            Bf::Borrowed(t) => t,
            Bf::Owned(t) => t,
        }
    }
}

pub use cache::{CudaCache, token_bytes};

/// Upload key of a step's token ids.
const TOKEN_IDS: &str = "token ids";

/// The device copy of the RoPE cos/sin table, grown on demand.
struct RopeCache {
    inv_freq: Vec<f32>,
    mscale: f32,
    table: DevRope,
    /// Bumped on every rebuild (a recorded graph reads one table).
    generation: u64,
}

/// The CUDA backend on one device. All work goes to the device's main stream; a mutex serialises
/// callers because cuBLAS handles and the launch sequence of one op must not interleave.
/// The gate's result on the device, or the logits when only the host can route them.
/// Rows and the gate's choice for them, on the device ([`CudaBackend::route_on_device`]).
pub struct DeviceRouted {
    /// [rows, hidden] bf16.
    pub x: Tensor<bf16>,
    /// [rows, top_k] global expert ids.
    pub ids: Tensor<i32>,
    /// [rows, top_k] gate weights.
    pub weights: Tensor<f32>,
}

enum DeviceRouting {
    Chosen {
        ids: Tensor<i32>,
        weights: Tensor<f32>,
    },
    HostOnly {
        logits: Tensor<f32>,
    },
}

/// Device copies of small host arrays by name, with the host values and shape they were made
/// from.
type UploadMap<T> = std::collections::HashMap<&'static str, (Vec<T>, Vec<usize>, Arc<Tensor<T>>)>;

/// A step's small uploads by name: reused while the values stay the same, and, while a decode
/// graph is recorded, the graph's fixed input buffers (`staged`).
struct Uploads<T: dsv2_kernels::DType> {
    cache: Mutex<UploadMap<T>>,
    staged: Mutex<Option<UploadMap<T>>>,
}

impl<T: dsv2_kernels::DType> Default for Uploads<T> {
    fn default() -> Self {
        Uploads {
            cache: Mutex::new(Default::default()),
            staged: Mutex::new(None),
        }
    }
}

/// Host copy of a bank's expert weight addresses and the device table made from it.
type ExpertTable = (Vec<i64>, Arc<Tensor<i64>>);

pub struct CudaBackend {
    gpu: Gpu,
    ordinal: usize,
    exec: Mutex<()>,
    rope: Mutex<Option<RopeCache>>,
    profile: Option<profile::Profile>,
    /// Device tables of expert weight addresses for the small-batch expert kernels, per bank
    /// (keyed by the bank's address; the host copy of the addresses detects a stale entry).
    expert_tables: Mutex<std::collections::HashMap<usize, ExpertTable>>,
    small_experts: bool,
    /// The shared experts in the small-batch expert kernels' launches at one row
    /// (`DSV2_FUSED_SHARED=0`: their own MLP, to compare).
    fused_shared: bool,
    /// The shared experts on the beside stream while the grouped kernels run the routed ones
    /// (`shared_beside_routed`), and at one row their gate/up beside the gate kernel
    /// (`experts::SharedBeside`). Opt-in (`DSV2_SHARED_BESIDE=1`) until it is measured on a
    /// GPU (bench/RESULTS.md); off, they run after the routed experts or inside their kernels.
    shared_beside: bool,
    /// The queries' rope part rotated in the latent append's launch (`DSV2_FUSED_ROPE=0`: in a
    /// rope launch of its own, to compare).
    pub(crate) fused_rope: bool,
    /// Decode's value up-projection in the split-KV combine's launch when the context is split
    /// (`DSV2_FUSED_UV=0`: the combine, then a GEMV of its own, to compare).
    pub(crate) fused_uv: bool,
    /// Decode's W_UK absorb computed by extra blocks of the latent append's launch at few rows
    /// over a bf16 cache (`DSV2_FUSED_ABSORB=0`: a GEMV launch of its own, to compare).
    pub(crate) fused_absorb: bool,
    /// q_proj (or q_a_proj) and kv_a as one GEMV launch at few rows (`DSV2_FUSED_Q_KV_A=0`: two
    /// launches, to compare).
    fused_q_kv_a: bool,
    /// The pre-attention residual add + RMSNorm inside the q_proj | kv_a GEMV's launch at one row
    /// (`DSV2_FUSED_NORM=0`: a launch of its own, to compare).
    fused_norm: bool,
    /// The post-attention residual add + RMSNorm inside the gate's launch at <= 4 rows with the
    /// layer's experts held here (`DSV2_FUSED_GATE_NORM=0`: a launch of its own, to compare).
    fused_gate_norm: bool,
    /// The ticket counter of the fused gate GEMV + top-k (`moe::moe_gate_gemv`, <= 4 rows; each
    /// launch leaves it zero); None when `DSV2_FUSED_GATE=0` (GEMV and top-k apart, to compare).
    gate_ticket: Option<Mutex<Tensor<i32>>>,
    grouped_experts: bool,
    grouped_prefill: bool,
    /// The grouped kernels' prefill tile (`DSV2_GROUPED_WS=0`: the non-specialised W128).
    grouped_prefill_tile: dsv2_kernels::ops::grouped::RowTile,
    /// The MLA prefill attention kernel (`DSV2_PREFILL_KERNEL`: `wgmma`, the default, or `mma`).
    prefill_kernel: PrefillKernel,
    /// Per-step metadata (positions, cache slots, block table, lengths) is the same for every
    /// layer of a step: the first layer uploads it, the others reuse it (4 copies per layer less).
    uploads_i32: Uploads<i32>,
    uploads_i64: Uploads<i64>,
    /// Recorded decode graphs (`DSV2_CUDA_GRAPHS`).
    graphs: Mutex<graphs::DecodeGraphs>,
    /// How caches made from now on hold their values (`--kv-cache-dtype`); each cache keeps
    /// the dtype it was made with.
    kv_dtype: Mutex<KvCacheDtype>,
}

impl CudaBackend {
    /// Opens device `opts.ordinal` and compiles or loads the kernels.
    pub fn new(opts: &GpuOptions) -> std::result::Result<Self, KernelError> {
        let gpu = Gpu::open(opts)?;
        let profile = profile::Profile::from_env();
        let graphs = graphs::DecodeGraphs::from_env(profile.is_some());
        let gate_ticket = match std::env::var("DSV2_FUSED_GATE").as_deref() {
            Ok("0") => None,
            _ => Some(Mutex::new(Tensor::<i32>::zeros(&gpu, &[1])?)),
        };
        Ok(Self {
            gpu,
            ordinal: opts.ordinal,
            exec: Mutex::new(()),
            rope: Mutex::new(None),
            profile,
            expert_tables: Mutex::new(Default::default()),
            // DSV2_SMALL_EXPERTS=0 keeps decode on the permuted path (to compare the two)
            small_experts: {
                // a bad DSV2_SMALL_DOWN, DSV2_GROUPED_DECODE or DSV2_FUSED_PERMUTE fails here,
                // not as a quiet fall-back at the first step
                dsv2_kernels::ops::small_experts::SmallDown::from_env()?;
                dsv2_kernels::ops::grouped::persistent_decode_from_env()?;
                dsv2_kernels::ops::moe::PermuteKernel::from_env()?;
                std::env::var("DSV2_SMALL_EXPERTS").map_or(true, |v| v != "0")
            },
            fused_shared: std::env::var("DSV2_FUSED_SHARED").map_or(true, |v| v != "0"),
            shared_beside: std::env::var("DSV2_SHARED_BESIDE").is_ok_and(|v| v == "1"),
            fused_rope: std::env::var("DSV2_FUSED_ROPE").map_or(true, |v| v != "0"),
            fused_uv: std::env::var("DSV2_FUSED_UV").map_or(true, |v| v != "0"),
            fused_absorb: std::env::var("DSV2_FUSED_ABSORB").map_or(true, |v| v != "0"),
            fused_q_kv_a: std::env::var("DSV2_FUSED_Q_KV_A").map_or(true, |v| v != "0"),
            fused_norm: std::env::var("DSV2_FUSED_NORM").map_or(true, |v| v != "0"),
            fused_gate_norm: std::env::var("DSV2_FUSED_GATE_NORM").map_or(true, |v| v != "0"),
            gate_ticket,
            // DSV2_GROUPED_EXPERTS=0 runs the per-expert cuBLAS loop instead of the grouped
            // kernels (to compare the two)
            grouped_experts: std::env::var("DSV2_GROUPED_EXPERTS").map_or(true, |v| v != "0"),
            // DSV2_GROUPED_PREFILL=0: prefill-sized expert batches on the per-expert cuBLAS loop
            // instead of the wgmma grouped kernel (to compare the two)
            grouped_prefill: std::env::var("DSV2_GROUPED_PREFILL").map_or(true, |v| v != "0"),
            // DSV2_GROUPED_WS: the prefill-sized expert batches' tile, to compare or to fall
            // back should one fail its checks: `0` the wgmma kernel without warp specialisation
            // (RowTile::W128), `1` the warp-specialised persistent one (Ws128), `pair` that one
            // in CTA pairs sharing each weight block's copies (Ws128Pair), `dyn` it with tiles
            // handed out by a counter (Ws128Dyn), `pairdyn` that in CTA pairs sharing weight or
            // activation copies (Ws128PairDyn); unset: PREFILL_TILE
            grouped_prefill_tile: {
                use dsv2_kernels::ops::grouped::{PREFILL_TILE, RowTile};
                match std::env::var("DSV2_GROUPED_WS").as_deref() {
                    Ok("0") => RowTile::W128,
                    Ok("1") => RowTile::Ws128,
                    Ok("pair") => RowTile::Ws128Pair,
                    Ok("dyn") => RowTile::Ws128Dyn,
                    Ok("pairdyn") => RowTile::Ws128PairDyn,
                    Ok(other) => {
                        return Err(KernelError::Unsupported {
                            op: "grouped experts",
                            what: format!(
                                "DSV2_GROUPED_WS={other}: expected 0, 1, pair, dyn or pairdyn"
                            ),
                        });
                    }
                    Err(_) => PREFILL_TILE,
                }
            },
            // DSV2_PREFILL_KERNEL=mma: prefill attention on the mma.sync kernels instead of the
            // wgmma one (to compare the two, or to fall back should the wgmma kernel fail its checks)
            prefill_kernel: match std::env::var(PrefillKernel::ENV) {
                Ok(v) => PrefillKernel::parse(&v)?,
                Err(_) => PrefillKernel::default(),
            },
            uploads_i32: Uploads::default(),
            uploads_i64: Uploads::default(),
            graphs: Mutex::new(graphs),
            kv_dtype: Mutex::new(KvCacheDtype::Bf16),
        })
    }

    /// Sets how the caches made from now on (`Backend::new_cache`) hold their values, and what
    /// `Backend::host_block_bytes` counts: bf16 (the default) or FP8 (`dsv2_kernels::fp8`).
    /// Caches made before keep theirs.
    pub fn set_kv_cache_dtype(&self, dtype: KvCacheDtype) {
        if let Ok(mut d) = self.kv_dtype.lock() {
            *d = dtype;
        }
    }

    /// The dtype of the caches made from now on.
    pub fn kv_cache_dtype(&self) -> KvCacheDtype {
        self.kv_dtype.lock().map(|d| *d).unwrap_or_default()
    }

    /// `host` on the device as a tensor of `shape`, reusing the copy made under `key` when the
    /// values are the same (the tensors are only read, so sharing them is safe; a replaced one is
    /// freed in stream order, after the kernels that read it).
    ///
    /// While a decode graph is being recorded, the key's staged buffer instead, which must have
    /// been made from exactly these values (anything else would replay with the wrong inputs).
    fn upload_cached<T: dsv2_kernels::DType + PartialEq>(
        &self,
        uploads: &Uploads<T>,
        key: &'static str,
        host: &[T],
        shape: &[usize],
    ) -> Result<Arc<Tensor<T>>> {
        if let Some(staged) = uploads
            .staged
            .lock()
            .map_err(|_| err("staged uploads poisoned"))?
            .as_ref()
        {
            return match staged.get(key) {
                Some((h, sh, t)) if h.as_slice() == host && sh.as_slice() == shape => Ok(t.clone()),
                Some((_, sh, _)) => Err(err(format!(
                    "graph recording: the step's {key} {shape:?} differs from what was staged \
                     ({sh:?})"
                ))),
                None => Err(err(format!(
                    "graph recording: the step uploads {key}, which is not staged"
                ))),
            };
        }
        let mut m = uploads
            .cache
            .lock()
            .map_err(|_| err("upload cache poisoned"))?;
        if let Some((h, sh, t)) = m.get(key)
            && h.as_slice() == host
            && sh.as_slice() == shape
        {
            return Ok(t.clone());
        }
        let t = Arc::new(Tensor::from_host(&self.gpu, host, shape).kx()?);
        m.insert(key, (host.to_vec(), shape.to_vec(), t.clone()));
        Ok(t)
    }

    pub(crate) fn upload_i32(
        &self,
        key: &'static str,
        host: &[i32],
        shape: &[usize],
    ) -> Result<Arc<Tensor<i32>>> {
        self.upload_cached(&self.uploads_i32, key, host, shape)
    }

    pub(crate) fn upload_i64(
        &self,
        key: &'static str,
        host: &[i64],
        shape: &[usize],
    ) -> Result<Arc<Tensor<i64>>> {
        self.upload_cached(&self.uploads_i64, key, host, shape)
    }

    /// Sets (or with None clears) the buffers `upload_i32/i64` hand out while a decode graph is
    /// recorded: each staged key's host values and its fixed device buffer.
    fn stage_uploads(
        &self,
        s: Option<(
            &graphs::Staged,
            &graphs::GraphInputs<i32>,
            &graphs::GraphInputs<i64>,
        )>,
    ) -> Result<()> {
        fn map<T: dsv2_kernels::DType>(
            host: &[(&'static str, Vec<T>, Vec<usize>)],
            dev: &graphs::GraphInputs<T>,
        ) -> Result<UploadMap<T>> {
            host.iter()
                .map(|(k, v, sh)| {
                    let t = dev
                        .get(k)
                        .ok_or_else(|| err(format!("no buffer for staged {k}")))?;
                    Ok((*k, (v.clone(), sh.clone(), t.clone())))
                })
                .collect()
        }
        let (i32s, i64s) = match s {
            Some((st, d32, d64)) => (Some(map(&st.i32s, d32)?), Some(map(&st.i64s, d64)?)),
            None => (None, None),
        };
        *self
            .uploads_i32
            .staged
            .lock()
            .map_err(|_| err("staged uploads poisoned"))? = i32s;
        *self
            .uploads_i64
            .staged
            .lock()
            .map_err(|_| err("staged uploads poisoned"))? = i64s;
        Ok(())
    }

    /// What the recorded decode graphs have done so far (`graphs`).
    pub fn decode_graph_stats(&self) -> GraphStats {
        self.graphs.lock().map(|g| g.stats()).unwrap_or_default()
    }

    /// Turns decode graphs on or off for later steps (on also retries after a failed
    /// recording); graphs recorded so far are dropped either way.
    pub fn set_decode_graphs(&self, on: bool) {
        if let Ok(mut g) = self.graphs.lock() {
            g.set_on(on);
        }
    }

    /// Makes the RoPE table cover positions < `need`; returns its generation.
    fn ensure_rope(&self, rope: &dsv2_core::rope::RopeTable, need: usize) -> Result<u64> {
        let _g = self.lock()?;
        let mut guard = self
            .rope
            .lock()
            .map_err(|_| err("rope table lock poisoned"))?;
        self.rope_table(&mut guard, rope, need)?;
        Ok(guard.as_ref().map_or(0, |c| c.generation))
    }

    fn small_experts_enabled(&self) -> bool {
        self.small_experts
    }

    fn grouped_experts_enabled(&self) -> bool {
        self.grouped_experts
    }

    fn grouped_prefill_enabled(&self) -> bool {
        self.grouped_prefill
    }

    fn grouped_prefill_tile(&self) -> dsv2_kernels::ops::grouped::RowTile {
        self.grouped_prefill_tile
    }

    fn prefill_kernel(&self) -> PrefillKernel {
        self.prefill_kernel
    }

    /// Gate logits (f32: routing compares softmax scores that can differ by 1e-4) and the gate
    /// kernel's choice on the device; `HostOnly` for shapes the kernel does not cover (> 256
    /// experts, ...), which route on the host from the logits.
    fn gate_on_device(
        &self,
        gate: &CudaWeight,
        x: &CudaAct,
        p: &RoutingParams,
    ) -> Result<DeviceRouting> {
        let xb = self.bf16_of(x)?;
        let (m, k) = x.dims();
        let (e, gk) = gate.dims2("route")?;
        if gk != k || e != p.n_experts {
            return Err(err(format!(
                "route: input [{m}, {k}], gate {:?}, {} experts",
                gate.shape(),
                p.n_experts
            )));
        }
        let mut logits = Tensor::<f32>::uninit(&self.gpu, &[m, e]).kx()?;
        // a few rows: logits and choice in one launch
        if let Some((ids, weights)) =
            self.gate_gemv(moe::GateInput::Rows(xb.view()), gate, p, m, &mut logits)?
        {
            return Ok(DeviceRouting::Chosen { ids, weights });
        }
        let gc = gate_config(p);
        // moe_gate writes all top_k ids and weights of every row (its launcher refuses
        // top_k > 32 or > experts before launching), so no memset: two fewer graph nodes
        let mut ids = Tensor::<i32>::uninit(&self.gpu, &[m, p.top_k]).kx()?;
        let mut weights = Tensor::<f32>::uninit(&self.gpu, &[m, p.top_k]).kx()?;
        gemm::<f32>(
            &self.gpu,
            Gemm::xwt(m, e, k, xb.ptr(), gate.t.ptr(), logits.ptr()),
        )
        .kx()?;
        let r = moe::moe_gate(
            &self.gpu,
            moe::GateParams {
                logits: logits.view(),
                ids: ids.view_mut(),
                weights: weights.view_mut(),
                cfg: gc,
            },
        );
        match r {
            Ok(()) => Ok(DeviceRouting::Chosen { ids, weights }),
            Err(KernelError::Unsupported { .. }) => Ok(DeviceRouting::HostOnly { logits }),
            Err(e) => Err(kerr(e)),
        }
    }

    /// The fused gate GEMV + top-k (`moe_gate_gemv`, one launch) of `x`'s rows into `logits`: the
    /// chosen ids and weights, or None where it does not apply (more than
    /// `GATE_GEMV_MAX_ROWS` rows, `DSV2_FUSED_GATE=0`, shapes the kernel refuses before launching).
    fn gate_gemv(
        &self,
        x: moe::GateInput<'_>,
        gate: &CudaWeight,
        p: &RoutingParams,
        rows: usize,
        logits: &mut Tensor<f32>,
    ) -> Result<Option<(Tensor<i32>, Tensor<f32>)>> {
        let Some(ticket) = &self.gate_ticket else {
            return Ok(None);
        };
        if rows > moe::GATE_GEMV_MAX_ROWS {
            return Ok(None);
        }
        // The kernel's top-k writes all k ids and weights of every row (k <= 32 = one lane each),
        // so no memset: two fewer graph nodes per MoE layer.
        let mut ids = Tensor::<i32>::uninit(&self.gpu, &[rows, p.top_k]).kx()?;
        let mut weights = Tensor::<f32>::uninit(&self.gpu, &[rows, p.top_k]).kx()?;
        let mut counter = ticket
            .lock()
            .map_err(|_| err("gate ticket lock poisoned"))?;
        let r = moe::moe_gate_gemv(
            &self.gpu,
            moe::GateGemvParams {
                x,
                w: gate.t.view(),
                logits: logits.view_mut(),
                counter: counter.view_mut(),
                ids: ids.view_mut(),
                weights: weights.view_mut(),
                cfg: gate_config(p),
            },
        );
        match r {
            Ok(()) => Ok(Some((ids, weights))),
            Err(KernelError::Unsupported { .. }) => Ok(None),
            Err(e) => Err(kerr(e)),
        }
    }

    /// The post-attention residual add + RMSNorm inside the gate's launch, then the experts as
    /// `route_local_experts` runs them: None where it does not apply (more than a few rows, f32
    /// activations, shapes the gate kernel does not take, `DSV2_FUSED_GATE_NORM=0`), and the
    /// residual is untouched then.
    #[allow(clippy::too_many_arguments)]
    fn fused_norm_route_local_experts(
        &self,
        residual: &mut CudaAct,
        out: &CudaAct,
        norm: &CudaWeight,
        eps: f32,
        gate: &CudaWeight,
        shared: Option<&MlpWeights<CudaWeight>>,
        p: &RoutingParams,
        bank: &ExpertBank<CudaWeight>,
    ) -> Result<Option<(CudaAct, Option<CudaAct>)>> {
        let (n, hidden) = out.dims();
        let (CudaAct::Bf16(res), CudaAct::Bf16(o)) = (&*residual, out) else {
            return Ok(None);
        };
        if !self.fused_gate_norm
            || n == 0
            || n > moe::GATE_GEMV_MAX_ROWS
            || res.shape() != o.shape()
            || p.n_experts != bank.experts.len()
            || gate.dims2("route")? != (p.n_experts, hidden)
            || norm.t.shape() != [hidden]
        {
            return Ok(None);
        }
        let Ok(Some(inter)) = experts::bank_intermediate(bank, hidden) else {
            return Ok(None);
        };
        let _t = self.timed("add_rms_norm_route_local_experts");
        let _g = self.lock()?;
        // the new residual in a buffer of its own: every block of the launch reads the old one
        let mut new_res = self.empty(&[n, hidden])?;
        let mut xn = self.empty(&[n, hidden])?;
        let mut logits = Tensor::<f32>::uninit(&self.gpu, &[n, p.n_experts]).kx()?;
        // At one row the shared experts' gate/up may run beside the gate kernel (they need
        // only the normed input, which they compute for themselves): the event marks the
        // inputs written, before the gate's launch.
        // (the small kernels' activations are allocated before the event: the beside stream
        // writes into them)
        let beside = match (shared, self.gpu.beside.as_deref()) {
            (Some(s), Some(side)) if n == 1 => match self.shared_beside_parts(bank, s, inter) {
                Some(parts) => {
                    let act = self.empty(&[p.top_k + parts, inter])?;
                    Some((side, act, self.gpu.stream.record_event(None).kx()?))
                }
                None => None,
            },
            _ => None,
        };
        let input = moe::GateInput::AddNorm {
            x: o.view(),
            residual: res.view(),
            weight: norm.t.view(),
            eps,
            res_out: new_res.view_mut(),
            out: xn.view_mut(),
        };
        // refused before the gate's launch: the two-launch path does it
        let Some((ids, weights)) = self.gate_gemv(input, gate, p, n, &mut logits)? else {
            return Ok(None);
        };
        // the old residual stays alive until the experts are enqueued: the beside stream reads
        // it, and the main stream frees it only after waiting for that stream
        let norm_row = gemv::AddNormRow {
            add: o.ptr(),
            residual: res.ptr(),
            weight: norm.t.ptr(),
            residual_out: 0,
            eps,
        };
        let old_residual = std::mem::replace(residual, CudaAct::Bf16(new_res));
        let done = match (beside, shared) {
            (Some((side, act, ready)), Some(s)) => {
                let bs = experts::SharedBeside {
                    side,
                    ready: &ready,
                    norm: Some(norm_row),
                    act,
                };
                let mut out = self.empty(xn.shape())?;
                if experts::small_with_shared(
                    self,
                    bank,
                    inter,
                    &xn,
                    &ids,
                    &weights,
                    s,
                    &mut out,
                    Some(bs),
                )? {
                    Some(CudaAct::Bf16(out))
                } else {
                    self.local_experts_routed(bank, inter, &xn, &ids, &weights, shared)?
                }
            }
            _ => self.local_experts_routed(bank, inter, &xn, &ids, &weights, shared)?,
        };
        drop(old_residual);
        Ok(Some((CudaAct::Bf16(xn), done)))
    }

    /// The routed experts of rows whose routing is on the device (ids, weights from the gate
    /// kernel), with the shared experts added: `route_local_experts` after its gate. None where the
    /// kernels do not cover the batch.
    fn local_experts_routed(
        &self,
        bank: &ExpertBank<CudaWeight>,
        inter: usize,
        xb: &Tensor<bf16>,
        ids: &Tensor<i32>,
        weights: &Tensor<f32>,
        shared: Option<&MlpWeights<CudaWeight>>,
    ) -> Result<Option<CudaAct>> {
        let mut out = self.empty(xb.shape())?;
        let fused = match shared {
            Some(s) if self.fused_shared => {
                experts::small_with_shared(self, bank, inter, xb, ids, weights, s, &mut out, None)?
            }
            _ => false,
        };
        if fused {
            return Ok(Some(CudaAct::Bf16(out)));
        }
        let (n, k) = (xb.shape()[0], ids.shape().get(1).copied().unwrap_or(0));
        // (decode-sized batches only: a prefill-sized one is GEMM-bound on both streams, and its
        // persistent grouped kernel sizes its grid for the whole GPU)
        let beside = match (shared, self.gpu.beside.as_deref()) {
            (Some(s), Some(side))
                if self.shared_beside
                    && experts::device_path(self, bank, n, k, None, None)
                        == experts::DevicePath::Grouped
                    && !experts::prefill_sized(n * k, None, None, bank) =>
            {
                Some((s, side))
            }
            _ => None,
        };
        let done = match beside {
            Some((s, side)) => {
                self.shared_beside_routed(side, s, bank, xb, ids, weights, &mut out)?
            }
            None => {
                let done = self.routed_from_gate(bank, xb, ids, weights, &mut out, None)?;
                if done && let Some(s) = shared {
                    self.mlp_on(&self.gpu, s, xb, MlpOut::Add(&mut out))?;
                }
                done
            }
        };
        Ok(done.then_some(CudaAct::Bf16(out)))
    }

    /// The shared parts (of the routed intermediate size `inter`) when one row's shared experts
    /// take the beside stream for their gate/up while the gate kernel and the small kernels'
    /// routed gate/up run (`experts::SharedBeside`): the shared experts ride in the small kernels
    /// (`DSV2_FUSED_SHARED`) and `DSV2_SHARED_BESIDE` is on; None otherwise. (Their shapes are
    /// checked by `experts::small_with_shared` before the beside stream reads them.)
    fn shared_beside_parts(
        &self,
        bank: &ExpertBank<CudaWeight>,
        shared: &MlpWeights<CudaWeight>,
        inter: usize,
    ) -> Option<usize> {
        let si = shared.gate.shape().first().copied().unwrap_or(0);
        (self.shared_beside
            && self.fused_shared
            && experts::device_path(self, bank, 1, 1, None, None) == experts::DevicePath::Small)
            .then(|| small::shared_parts(si, inter))
            .flatten()
    }

    /// The shared experts on the beside stream (`side`), written into `out`, while the main
    /// stream routes the same rows to the grouped expert kernels, whose combine waits for them
    /// and adds the routed sum into `out`. In a decode step the shared MLP (three launches) then
    /// overlaps the routing's small launches and the routed experts' weight streaming instead of
    /// following them. Whatever happens, the main stream waits for the beside stream before this
    /// returns: `out` and `xb` are freed in the main stream's order.
    #[allow(clippy::too_many_arguments)]
    fn shared_beside_routed(
        &self,
        side: &Gpu,
        shared: &MlpWeights<CudaWeight>,
        bank: &ExpertBank<CudaWeight>,
        xb: &Tensor<bf16>,
        ids: &Tensor<i32>,
        weights: &Tensor<f32>,
        out: &mut Tensor<bf16>,
    ) -> Result<bool> {
        let ready = self.gpu.stream.record_event(None).kx()?;
        side.stream.wait(&ready).kx()?;
        let shared_run = self.mlp_on(side, shared, xb, MlpOut::Write(out));
        let shared_done = side.stream.record_event(None).kx()?;
        let routed = match shared_run {
            Ok(_) => self.routed_from_gate(bank, xb, ids, weights, out, Some(&shared_done)),
            Err(e) => Err(e),
        };
        self.gpu.stream.wait(&shared_done).kx()?;
        routed
    }

    /// `experts::on_device` for the gate kernel's routing (ids in 0..n_experts = the table's
    /// rows; the counts are not known on the host).
    fn routed_from_gate(
        &self,
        bank: &ExpertBank<CudaWeight>,
        xb: &Tensor<bf16>,
        ids: &Tensor<i32>,
        weights: &Tensor<f32>,
        out: &mut Tensor<bf16>,
        beside: Option<&cudarc::driver::CudaEvent>,
    ) -> Result<bool> {
        experts::on_device(
            self,
            bank,
            xb.view(),
            ids.view(),
            weights.view(),
            out.view_mut(),
            None,
            None,
            beside,
        )
    }

    /// [E, 3] device addresses (gate, up, down) of `bank`'s experts, 0 for experts not held.
    fn expert_table(&self, bank: &ExpertBank<CudaWeight>) -> Result<Arc<Tensor<i64>>> {
        let addrs: Vec<i64> = bank
            .experts
            .iter()
            .flat_map(|m| match m {
                Some(m) => [
                    m.gate.t.ptr() as i64,
                    m.up.t.ptr() as i64,
                    m.down.t.ptr() as i64,
                ],
                None => [0; 3],
            })
            .collect();
        let key = bank as *const _ as usize;
        let mut tables = self
            .expert_tables
            .lock()
            .map_err(|_| err("expert table cache poisoned"))?;
        if let Some((host, dev)) = tables.get(&key)
            && *host == addrs
        {
            return Ok(dev.clone());
        }
        let dev = Arc::new(Tensor::from_host(&self.gpu, &addrs, &[bank.experts.len(), 3]).kx()?);
        tables.insert(key, (addrs, dev.clone()));
        Ok(dev)
    }

    /// Per-op timing under `DSV2_PROFILE=1` (see `profile`); None otherwise.
    fn timed(&self, op: &'static str) -> Option<profile::OpTimer<'_>> {
        self.profile
            .as_ref()
            .map(|p| profile::OpTimer::start(p, &self.gpu, op))
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Runs `f` under the execution lock with the context current, for code outside this crate
    /// that launches kernels on the backend's stream (dsv2-nccl-experts gathers rows for the
    /// NCCL plane and adds the shards' partials back this way).
    pub fn with_gpu<R>(
        &self,
        f: impl FnOnce(&Gpu) -> std::result::Result<R, KernelError>,
    ) -> Result<R> {
        let _g = self.lock()?;
        f(&self.gpu).kx()
    }

    /// The gate's choice for `x` left on the device, for a transport that ships it as it is (the
    /// NCCL decode slots): a bf16 copy of the rows the caller owns, expert ids [rows, top_k]
    /// (global, i32) and gate weights [rows, top_k]. None where the gate kernel does not cover
    /// the shapes (the caller routes on the host instead).
    pub fn route_on_device(
        &self,
        gate: &CudaWeight,
        x: &CudaAct,
        p: &RoutingParams,
    ) -> Result<Option<DeviceRouted>> {
        let _t = self.timed("route_on_device");
        let _g = self.lock()?;
        let DeviceRouting::Chosen { ids, weights } = self.gate_on_device(gate, x, p)? else {
            return Ok(None);
        };
        let rows = match x {
            CudaAct::Bf16(t) => {
                let mut y = self.empty(t.shape())?;
                gen_ops::copy_rows(&self.gpu, t.view(), y.view_mut()).kx()?;
                y
            }
            CudaAct::F32(t) => {
                let mut y = self.empty(t.shape())?;
                gen_ops::cast_f32_bf16(&self.gpu, t.view(), y.view_mut()).kx()?;
                y
            }
        };
        Ok(Some(DeviceRouted {
            x: rows,
            ids,
            weights,
        }))
    }

    /// Builds `bank`'s device table of expert addresses now (an upload from pageable memory),
    /// so that a later [`Self::experts_from_device_routing`] queued ahead of its inputs does not.
    pub fn prepare_expert_table(&self, bank: &ExpertBank<CudaWeight>) -> Result<()> {
        let _g = self.lock()?;
        self.expert_table(bank).map(|_| ())
    }

    /// Routed experts of `bank` for rows whose routing is already on this device, written into
    /// `out` [rows, hidden]: ids [rows, k] (i32 global expert ids; negative, e.g. u32::MAX bits,
    /// = another shard's slot), weights [rows, k] f32. An NCCL shard receives exactly this, so
    /// it skips bringing the routing to the host (a stream synchronisation per layer): the same
    /// on-device path as in-process experts (`experts::on_device`). `Ok(false)`: a
    /// prefill-sized batch or shapes the kernels do not cover; the caller then routes on the
    /// host and calls `experts`.
    ///
    /// `ahead`: enqueued ahead of its inputs, behind a receive that has not arrived yet (an
    /// NCCL shard's pre-posted decode slot). Then nothing here may wait on the stream, so
    /// `DSV2_PROFILE` does not time it (its timer synchronises the stream, which would park the
    /// shard's thread until the router's next request, out of reach of a stop).
    pub fn experts_from_device_routing(
        &self,
        bank: &ExpertBank<CudaWeight>,
        x: dsv2_kernels::View<'_, bf16>,
        ids: dsv2_kernels::View<'_, i32>,
        weights: dsv2_kernels::View<'_, f32>,
        out: dsv2_kernels::ViewMut<'_, bf16>,
        ahead: bool,
    ) -> Result<bool> {
        if x.shape().first().is_none_or(|&n| n == 0) {
            return Ok(false);
        }
        let _t = if ahead {
            None
        } else {
            self.timed("experts_from_device_routing")
        };
        let _g = self.lock()?;
        // ids beyond the table cannot come from a router that routes over this model's
        // experts, and the caller (the NCCL shard) checks the header's sizes; any such id is
        // skipped by the kernels all the same.
        experts::on_device(self, bank, x, ids, weights, out, None, None, None)
    }

    /// Takes the execution lock and makes the context current on this thread (callers may come
    /// from any thread; cuBLAS calls do not bind the context themselves).
    fn lock(&self) -> Result<MutexGuard<'_, ()>> {
        let g = self
            .exec
            .lock()
            .map_err(|_| err("a previous GPU call panicked"))?;
        self.gpu.ctx.bind_to_thread().kx()?;
        Ok(g)
    }

    /// The activation as bf16 (an f32 one is cast on the device).
    fn bf16_of<'a>(&self, a: &'a CudaAct) -> Result<Bf<'a>> {
        match a {
            CudaAct::Bf16(t) => Ok(Bf::Borrowed(t)),
            CudaAct::F32(t) => {
                let mut y = Tensor::<bf16>::zeros(&self.gpu, t.shape()).kx()?;
                gen_ops::cast_f32_bf16(&self.gpu, t.view(), y.view_mut()).kx()?;
                Ok(Bf::Owned(y))
            }
        }
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor<bf16>> {
        Tensor::<bf16>::zeros(&self.gpu, shape).kx()
    }

    /// An output buffer that the next kernel or GEMM writes entirely (no memset launch).
    fn empty(&self, shape: &[usize]) -> Result<Tensor<bf16>> {
        Tensor::<bf16>::uninit(&self.gpu, shape).kx()
    }

    /// y[M, N] = x[M, K] · wᵀ for a contiguous x (leading dim = rows) and a [N, K] weight.
    fn mm(&self, x: &Tensor<bf16>, w: &CudaWeight, op: &str) -> Result<Tensor<bf16>> {
        let (m, n) = (x.shape()[0], w.dims2(op)?.0);
        self.mm_as(x, w, &[m, n], op)
    }

    /// As [`Self::mm`], the result given `shape` (its element count must be M × N).
    fn mm_as(
        &self,
        x: &Tensor<bf16>,
        w: &CudaWeight,
        shape: &[usize],
        op: &str,
    ) -> Result<Tensor<bf16>> {
        let (m, k) = (x.shape()[0], x.len() / x.shape()[0].max(1));
        let (n, wk) = w.dims2(op)?;
        if wk != k || shape.iter().product::<usize>() != m * n {
            return Err(err(format!(
                "{op}: input has {k} features, weight is {:?}, output {shape:?}",
                w.shape()
            )));
        }
        let y = self.empty(shape)?;
        gemm::<bf16>(&self.gpu, Gemm::xwt(m, n, k, x.ptr(), w.t.ptr(), y.ptr())).kx()?;
        Ok(y)
    }

    /// Two projections of the same input, each result given its shape (as [`Self::mm_as`]): one
    /// GEMV launch at few rows where the plan takes the pair (`DSV2_FUSED_Q_KV_A=0`: never; q_proj
    /// and kv_a at decode: V2-Lite's narrow kv_a alone ran at 3.4x its copy roofline at one row,
    /// bench/RESULTS.md session 8), else two.
    fn mm_pair(
        &self,
        x: &Tensor<bf16>,
        (w1, shape1): (&CudaWeight, &[usize]),
        (w2, shape2): (&CudaWeight, &[usize]),
        op: &str,
    ) -> Result<(Tensor<bf16>, Tensor<bf16>)> {
        let (m, k) = (x.shape()[0], x.len() / x.shape()[0].max(1));
        let ((n1, k1), (n2, k2)) = (w1.dims2(op)?, w2.dims2(op)?);
        let fits = k1 == k
            && k2 == k
            && shape1.iter().product::<usize>() == m * n1
            && shape2.iter().product::<usize>() == m * n2;
        if self.fused_q_kv_a && fits {
            let (y1, y2) = (self.empty(shape1)?, self.empty(shape2)?);
            let g1 = Gemm::xwt(m, n1, k, x.ptr(), w1.t.ptr(), y1.ptr());
            let second = gemv::PairSecond {
                w: w2.t.ptr(),
                y: y2.ptr(),
                n: n2,
                ldy: n2,
            };
            // SAFETY: x, both weights and both outputs are live tensors of the shapes checked
            // above.
            if !unsafe { gemv::gemv_pair::<bf16>(&self.gpu, &g1, second, false) }.kx()? {
                // rows the pair's plan does not take: the same buffers, one GEMM each
                gemm::<bf16>(&self.gpu, g1).kx()?;
                let g2 = Gemm::xwt(m, n2, k, x.ptr(), w2.t.ptr(), y2.ptr());
                gemm::<bf16>(&self.gpu, g2).kx()?;
            }
            return Ok((y1, y2));
        }
        // apart (and `mm_as` says what does not fit)
        Ok((
            self.mm_as(x, w1, shape1, op)?,
            self.mm_as(x, w2, shape2, op)?,
        ))
    }

    /// [`Self::mm_pair`] of the rows that `p`'s add + RMSNorm gives (`p.residual += p.add`, then
    /// the norm). At one row where the GEMV plan takes the pair, the norm runs inside the pair's
    /// launch (one launch per layer less) and the new residual, written to a buffer of its own
    /// because the launch's other blocks still read the old one, replaces `p.residual`; else the
    /// add_rmsnorm launch, then `mm_pair`.
    fn mm_pair_after_add_norm(
        &self,
        p: attention::AddNorm<'_>,
        (w1, shape1): (&CudaWeight, &[usize]),
        (w2, shape2): (&CudaWeight, &[usize]),
        op: &str,
    ) -> Result<(Tensor<bf16>, Tensor<bf16>)> {
        let attention::AddNorm {
            residual,
            add,
            weight,
            eps,
        } = p;
        let (m, k) = (add.shape()[0], add.len() / add.shape()[0].max(1));
        let ((n1, k1), (n2, k2)) = (w1.dims2(op)?, w2.dims2(op)?);
        let fits = m == 1
            && residual.shape() == add.shape()
            && weight.shape() == [k]
            && k1 == k
            && k2 == k
            && shape1.iter().product::<usize>() == n1
            && shape2.iter().product::<usize>() == n2;
        if self.fused_norm && self.fused_q_kv_a && fits {
            let new_residual = self.empty(residual.shape())?;
            let (y1, y2) = (self.empty(shape1)?, self.empty(shape2)?);
            let g1 = Gemm::xwt(1, n1, k, add.ptr(), w1.t.ptr(), y1.ptr());
            let second = gemv::PairSecond {
                w: w2.t.ptr(),
                y: y2.ptr(),
                n: n2,
                ldy: n2,
            };
            let norm = gemv::AddNormRow {
                add: add.ptr(),
                residual: residual.ptr(),
                weight: weight.t.ptr(),
                residual_out: new_residual.ptr(),
                eps,
            };
            // SAFETY: add, residual, the norm weight, both weights and all outputs are live
            // tensors of the shapes checked above; new_residual was just allocated, apart from
            // every input.
            if unsafe { gemv::gemv_pair_after_add_norm(&self.gpu, &g1, second, norm, false) }
                .kx()?
            {
                // the old residual is freed in stream order, after the launch that reads it
                *residual = new_residual;
                return Ok((y1, y2));
            }
        }
        let mut x = self.empty(add.shape())?;
        ew::rmsnorm(
            &self.gpu,
            ew::RmsNormParams {
                x: add.view(),
                weight: weight.t.view(),
                residual: Some(residual.view_mut()),
                out: x.view_mut(),
                eps,
            },
        )
        .kx()?;
        self.mm_pair(&x, (w1, shape1), (w2, shape2), op)
    }

    /// RMSNorm of `x` (with `residual`: of `residual += x`, updated in place), one launch.
    fn norm_of(
        &self,
        x: &CudaAct,
        w: &CudaWeight,
        residual: Option<&mut Tensor<bf16>>,
        eps: f32,
    ) -> Result<CudaAct> {
        let xb = self.bf16_of(x)?;
        let mut out = self.empty(xb.shape())?;
        ew::rmsnorm(
            &self.gpu,
            ew::RmsNormParams {
                x: xb.view(),
                weight: w.t.view(),
                residual: residual.map(|r| r.view_mut()),
                out: out.view_mut(),
                eps,
            },
        )
        .kx()?;
        Ok(CudaAct::Bf16(out))
    }

    /// The FFN `down(silu(gate(x)) · up(x))` on `gpu` (the backend's, or its beside view: every
    /// buffer of the FFN's own is then allocated and freed on that stream); its result as `out`
    /// says. `MlpOut::Add` adds the bf16-rounded product, as `add_assign` would.
    fn mlp_on(
        &self,
        gpu: &Gpu,
        w: &MlpWeights<CudaWeight>,
        x: &Tensor<bf16>,
        out: MlpOut<'_>,
    ) -> Result<Option<Tensor<bf16>>> {
        let (m, h) = (x.shape()[0], x.shape()[1]);
        let (inter, gh) = w.gate.dims2("mlp gate")?;
        if gh != h || w.up.shape() != [inter, h] || w.down.shape() != [h, inter] {
            return Err(err(format!(
                "mlp: input [{m}, {h}], gate {:?}, up {:?}, down {:?}",
                w.gate.shape(),
                w.up.shape(),
                w.down.shape()
            )));
        }
        if let MlpOut::Add(a) | MlpOut::Write(a) = &out
            && a.shape() != [m, h]
        {
            return Err(err(format!(
                "mlp: output {:?}, input [{m}, {h}]",
                a.shape()
            )));
        }
        let empty = |shape: &[usize]| Tensor::<bf16>::uninit(gpu, shape).kx();
        let gu = empty(&[m, 2 * inter])?;
        // gate | up side by side in one [m, 2I] buffer, the layout silu_mul reads
        let mut g = Gemm::xwt(m, inter, h, x.ptr(), w.gate.t.ptr(), gu.ptr());
        g.ldy = 2 * inter;
        let up_y = gu.ptr() + (inter * std::mem::size_of::<bf16>()) as u64; // byte offset of `up`
        // Few rows: gate and up in one launch, and the result added into `acc` by the down
        // projection itself (5 launches become 3). The activation stays its own launch: folded
        // into the down projection, every column group recomputed it, and with the fold V2's
        // batch-1 step was 1.6 % slower on the GEMV path than on cuBLAS (bench/RESULTS.md,
        // session 8 runs 3-4; the fold is the likely cause, its removal is not yet measured).
        // SAFETY (every GEMV below): each pointer is a live tensor shape-checked above.
        let paired = unsafe {
            gemv::gemv_pair::<bf16>(
                gpu,
                &g,
                gemv::PairSecond {
                    w: w.up.t.ptr(),
                    y: up_y,
                    n: inter,
                    ldy: 2 * inter,
                },
                false,
            )
        }
        .kx()?;
        if !paired {
            gemm::<bf16>(gpu, g).kx()?;
            g.w = w.up.t.ptr();
            g.y = up_y;
            gemm::<bf16>(gpu, g).kx()?;
        }
        let mut act = empty(&[m, inter])?;
        ew::silu_mul(
            gpu,
            ew::SiluMulParams {
                input: gu.view(),
                out: act.view_mut(),
            },
        )
        .kx()?;
        let (target, accumulate) = match out {
            MlpOut::New => {
                let y = empty(&[m, h])?;
                let down = Gemm::xwt(m, h, inter, act.ptr(), w.down.t.ptr(), y.ptr());
                gemm::<bf16>(gpu, down).kx()?;
                return Ok(Some(y));
            }
            MlpOut::Add(t) => (t, true),
            MlpOut::Write(t) => (t, false),
        };
        let down = Gemm::xwt(m, h, inter, act.ptr(), w.down.t.ptr(), target.ptr());
        match gemv::plan(&down, gpu.sm_count, false) {
            // SAFETY: act, the down weight and the target are live tensors shape-checked above.
            Some(p) => unsafe { gemv::gemv::<bf16>(gpu, &down, p, accumulate) }.kx()?,
            None if accumulate => {
                let y = empty(&[m, h])?;
                gemm::<bf16>(
                    gpu,
                    Gemm::xwt(m, h, inter, act.ptr(), w.down.t.ptr(), y.ptr()),
                )
                .kx()?;
                gen_ops::add(gpu, target.view_mut(), y.view()).kx()?;
            }
            None => gemm::<bf16>(gpu, down).kx()?,
        }
        Ok(None)
    }

    /// The device RoPE table covering positions < `need` (rebuilt when the model's table changes
    /// or a longer one is needed). cos/sin are computed exactly as the CPU reference does (f32
    /// angle, f32 sin_cos, times mscale).
    fn rope_table<'a>(
        &self,
        guard: &'a mut Option<RopeCache>,
        rope: &dsv2_core::rope::RopeTable,
        need: usize,
    ) -> Result<&'a DevRope> {
        let fresh = match guard.as_ref() {
            Some(c) => {
                c.inv_freq != rope.inv_freq || c.mscale != rope.mscale || c.table.max_pos < need
            }
            None => true,
        };
        if fresh {
            let max_pos = need.next_power_of_two().max(4096);
            let half = rope.inv_freq.len();
            let mut cos = Vec::with_capacity(max_pos * half);
            let mut sin = Vec::with_capacity(max_pos * half);
            for p in 0..max_pos {
                for &f in &rope.inv_freq {
                    let (s, c) = (p as f32 * f).sin_cos();
                    cos.push(c * rope.mscale);
                    sin.push(s * rope.mscale);
                }
            }
            let table = DevRope::from_host(&self.gpu, &cos, &sin, max_pos, 2 * half).kx()?;
            let generation = guard.as_ref().map_or(0, |c| c.generation) + 1;
            *guard = Some(RopeCache {
                inv_freq: rope.inv_freq.clone(),
                mscale: rope.mscale,
                table,
                generation,
            });
        }
        guard
            .as_ref()
            .map(|c| &c.table)
            .ok_or_else(|| err("rope table missing"))
    }
}

/// Where [`CudaBackend::mlp_on`] puts the FFN's result.
enum MlpOut<'t> {
    /// a new [m, H] tensor, returned
    New,
    /// added into this [m, H] tensor
    Add(&'t mut Tensor<bf16>),
    /// written over this [m, H] tensor
    Write(&'t mut Tensor<bf16>),
}

/// The gate kernels' configuration of `p` (grouped top-k only where there are groups).
fn gate_config(p: &RoutingParams) -> moe::GateConfig {
    let grouped = p.method == TopkMethod::GroupLimitedGreedy && p.n_group > 1;
    moe::GateConfig {
        n_group: if grouped { p.n_group } else { 1 },
        topk_group: if grouped { p.topk_group } else { 1 },
        top_k: p.top_k,
        norm_topk_prob: p.top_k > 1 && p.norm_topk_prob,
        routed_scaling_factor: p.routed_scaling_factor,
    }
}

fn upload_err(t: &TensorRef, e: impl std::fmt::Display) -> CoreError {
    err(format!("uploading `{}`: {e}", t.name))
}

impl Backend for CudaBackend {
    type Weight = CudaWeight;
    type Act = CudaAct;
    type Cache = CudaCache;
    type HostBlocks = host_tier::CudaHostBlocks;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.ordinal, self.gpu.name)
    }

    // The prefix cache's host tier: host_tier.rs.
    fn host_block_bytes(&self, cfg: &ModelConfig, block_size: usize) -> usize {
        host_tier::block_bytes(cfg, block_size, self.kv_cache_dtype())
    }
    fn new_host_blocks(
        &self,
        cfg: &ModelConfig,
        block_size: usize,
        max_slots: usize,
    ) -> Result<Self::HostBlocks> {
        host_tier::CudaHostBlocks::new(self, cfg, block_size, max_slots)
    }
    fn export_blocks(
        &self,
        cache: &CudaCache,
        host: &mut Self::HostBlocks,
        copies: &[dsv2_core::backend::BlockCopy],
    ) -> Result<()> {
        host.export(self, cache, copies)
    }
    fn import_blocks(
        &self,
        host: &mut Self::HostBlocks,
        cache: &mut CudaCache,
        copies: &[dsv2_core::backend::BlockCopy],
    ) -> Result<()> {
        host.import(self, cache, copies)
    }
    fn imports_overlap_steps(&self) -> bool {
        true
    }
    fn await_imports(&self, host: &mut Self::HostBlocks, _cache: &mut CudaCache) -> Result<()> {
        host.await_imports(self)
    }
    fn sync_host_blocks(&self, host: &mut Self::HostBlocks) -> Result<()> {
        host.synchronize()
    }

    fn measure_ceilings(&self, _quick: bool) -> Result<dsv2_core::backend::Ceilings> {
        ceilings::measure(self)
    }

    /// Uploads straight from the memory map: bf16 tensors in one copy (no host buffer), f32/f16
    /// tensors converted in chunks of [`UPLOAD_CHUNK`] elements; random tensors are generated on
    /// the device.
    fn weight(&self, t: &TensorRef) -> Result<CudaWeight> {
        let _g = self.lock()?;
        let n = t.numel();
        let mut dst = self.zeros(&t.shape)?;
        if let Some(r) = t.random_init() {
            // A random weight (`--random-weights`) is drawn where it lives: no host bytes, no
            // upload. Same N(mean, std) as the host's values, not the same numbers.
            ew::fill_normal(&self.gpu, dst.view_mut(), r.seed, r.mean, r.std).kx()?;
            self.gpu
                .stream
                .synchronize()
                .map_err(|e| upload_err(t, e))?;
            return Ok(CudaWeight { t: dst });
        }
        let bytes = t.bytes();
        let stream = &self.gpu.stream;
        let mut staging: Vec<bf16> = Vec::new();
        let mut at = 0usize;
        while at < n {
            let len = UPLOAD_CHUNK.min(n - at);
            let mut view = dst.buf_mut().slice_mut(at..at + len);
            let es = t.dtype.size();
            let src = &bytes[at * es..(at + len) * es];
            match t.dtype {
                // an aligned bf16 tensor goes up without any host copy
                CkptDType::Bf16 if bytemuck::try_cast_slice::<u8, bf16>(src).is_ok() => {
                    let s: &[bf16] = bytemuck::cast_slice(src);
                    stream
                        .memcpy_htod(s, &mut view)
                        .map_err(|e| upload_err(t, e))?;
                }
                d => {
                    staging.clear();
                    staging.extend(src.chunks_exact(es).map(|c| match d {
                        CkptDType::F32 => {
                            bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        }
                        CkptDType::F16 => bf16::from_f32(
                            half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
                        ),
                        CkptDType::Bf16 => bf16::from_bits(u16::from_le_bytes([c[0], c[1]])),
                    }));
                    stream
                        .memcpy_htod(staging.as_slice(), &mut view)
                        .map_err(|e| upload_err(t, e))?;
                    // the staging buffer is refilled next: wait until the copy has read it
                    stream.synchronize().map_err(|e| upload_err(t, e))?;
                }
            }
            at += len;
        }
        stream.synchronize().map_err(|e| upload_err(t, e))?;
        Ok(CudaWeight { t: dst })
    }

    fn new_cache(
        &self,
        cfg: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<CudaCache> {
        let _g = self.lock()?;
        cache::new_cache(
            &self.gpu,
            cfg,
            num_blocks,
            block_size,
            self.kv_cache_dtype(),
        )
    }

    fn act_from_host(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CudaAct> {
        if data.len() != rows * cols {
            return Err(err(format!(
                "{} values do not make a [{rows}, {cols}] matrix",
                data.len()
            )));
        }
        let _g = self.lock()?;
        let b: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        Ok(CudaAct::Bf16(
            Tensor::from_host(&self.gpu, &b, &[rows, cols]).kx()?,
        ))
    }

    fn act_to_host(&self, a: &CudaAct) -> Result<Vec<f32>> {
        let _t = self.timed("act_to_host");
        let _g = self.lock()?;
        match a {
            CudaAct::Bf16(t) => Ok(t
                .to_host(&self.gpu)
                .kx()?
                .iter()
                .map(|v| v.to_f32())
                .collect()),
            CudaAct::F32(t) => t.to_host(&self.gpu).kx(),
        }
    }

    fn act_shape(&self, a: &CudaAct) -> (usize, usize) {
        a.dims()
    }

    fn select_rows(&self, a: &CudaAct, rows: &[usize]) -> Result<CudaAct> {
        let _t = self.timed("select_rows");
        let (n, cols) = a.dims();
        if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
            return Err(err(format!("row {bad} out of {n}")));
        }
        let _g = self.lock()?;
        let stream = &self.gpu.stream;
        // one device-to-device copy per row: select_rows picks the few logit rows of a step
        macro_rules! pick {
            ($t:expr, $ty:ty, $wrap:path) => {{
                let mut out = Tensor::<$ty>::zeros(&self.gpu, &[rows.len(), cols]).kx()?;
                for (i, &r) in rows.iter().enumerate() {
                    let src = $t.buf().slice(r * cols..(r + 1) * cols);
                    let mut dst = out.buf_mut().slice_mut(i * cols..(i + 1) * cols);
                    stream.memcpy_dtod(&src, &mut dst).kx()?;
                }
                Ok($wrap(out))
            }};
        }
        match a {
            CudaAct::Bf16(t) => pick!(t, bf16, CudaAct::Bf16),
            CudaAct::F32(t) => pick!(t, f32, CudaAct::F32),
        }
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32]) -> Result<CudaAct> {
        let _t = self.timed("embed");
        let (vocab, hidden) = table.dims2("embed")?;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(CoreError::InvalidInput(format!(
                "token id {bad} is outside the embedding table ({vocab} rows)"
            )));
        }
        let _g = self.lock()?;
        let idv: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let idt = self.upload_i32(TOKEN_IDS, &idv, &[ids.len()])?;
        let mut out = self.empty(&[ids.len(), hidden])?;
        ew::embedding(
            &self.gpu,
            ew::EmbeddingParams {
                table: table.t.view(),
                ids: idt.view(),
                out: out.view_mut(),
            },
        )
        .kx()?;
        Ok(CudaAct::Bf16(out))
    }

    fn rms_norm(&self, x: &CudaAct, w: &CudaWeight, eps: f32) -> Result<CudaAct> {
        let _t = self.timed("rms_norm");
        let _g = self.lock()?;
        self.norm_of(x, w, None, eps)
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaAct,
        x: &CudaAct,
        w: &CudaWeight,
        eps: f32,
    ) -> Result<CudaAct> {
        if residual.dims() != x.dims() {
            return Err(err(format!(
                "add_rms_norm: {:?} + {:?}",
                residual.dims(),
                x.dims()
            )));
        }
        let CudaAct::Bf16(res) = residual else {
            // an f32 residual is narrowed by add_assign first; not on the model's path
            self.add_assign(residual, x)?;
            return self.rms_norm(residual, w, eps);
        };
        let _t = self.timed("add_rms_norm");
        let _g = self.lock()?;
        self.norm_of(x, w, Some(res), eps)
    }

    fn add_assign(&self, acc: &mut CudaAct, x: &CudaAct) -> Result<()> {
        let _t = self.timed("add_assign");
        if acc.dims() != x.dims() {
            return Err(err(format!("add: {:?} + {:?}", acc.dims(), x.dims())));
        }
        let _g = self.lock()?;
        if let CudaAct::F32(_) = acc {
            // the residual stream is bf16; an f32 accumulator (a linear output) is narrowed first
            let CudaAct::F32(t) = &*acc else {
                return Err(err("add: accumulator changed type"));
            };
            let mut b = self.empty(t.shape())?;
            gen_ops::cast_f32_bf16(&self.gpu, t.view(), b.view_mut()).kx()?;
            *acc = CudaAct::Bf16(b);
        }
        let xb = self.bf16_of(x)?;
        let CudaAct::Bf16(a) = acc else {
            return Err(err("add: accumulator is not bf16"));
        };
        gen_ops::add(&self.gpu, a.view_mut(), xb.view()).kx()
    }

    /// `x · Wᵀ` with an f32 result: the model uses `linear` for the logits only, and bf16 logits
    /// (steps of 2^-8 relative) would turn close top-2 pairs into ties.
    fn linear(&self, x: &CudaAct, w: &CudaWeight) -> Result<CudaAct> {
        let _t = self.timed("linear");
        let _g = self.lock()?;
        let xb = self.bf16_of(x)?;
        let (m, k) = x.dims();
        let (n, wk) = w.dims2("linear")?;
        if wk != k {
            return Err(err(format!(
                "linear: input has {k} features, weight is {:?}",
                w.shape()
            )));
        }
        let y = Tensor::<f32>::uninit(&self.gpu, &[m, n]).kx()?;
        gemm::<f32>(&self.gpu, Gemm::xwt(m, n, k, xb.ptr(), w.t.ptr(), y.ptr())).kx()?;
        Ok(CudaAct::F32(y))
    }

    fn mlp(&self, w: &MlpWeights<CudaWeight>, x: &CudaAct) -> Result<CudaAct> {
        let _t = self.timed("mlp");
        let _g = self.lock()?;
        let xb = self.bf16_of(x)?;
        let y = self
            .mlp_on(&self.gpu, w, &xb, MlpOut::New)?
            .ok_or_else(|| err("mlp: no output"))?;
        Ok(CudaAct::Bf16(y))
    }

    fn attention(
        &self,
        cfg: &ModelConfig,
        w: &AttnWeights<CudaWeight>,
        x: &CudaAct,
        batch: &AttnBatch<'_>,
        cache: &mut CudaCache,
        layer: usize,
    ) -> Result<CudaAct> {
        let _t = self.timed("attention");
        let _g = self.lock()?;
        let x = attention::Input::Normed(x);
        attention::run(self, cfg, w, x, batch, cache, layer)
    }

    fn attention_after_add_norm(
        &self,
        cfg: &ModelConfig,
        w: &AttnWeights<CudaWeight>,
        residual: &mut CudaAct,
        ffn_out: &CudaAct,
        norm: &CudaWeight,
        eps: f32,
        batch: &AttnBatch<'_>,
        cache: &mut CudaCache,
        layer: usize,
    ) -> Result<CudaAct> {
        // one bf16 row: the norm may run inside the q | kv_a GEMV's launch
        // (`mm_pair_after_add_norm` decides by the GEMV plan); the normed row feeds only those two
        // projections
        let one_row = residual.dims() == ffn_out.dims() && residual.dims().0 == 1;
        if self.fused_norm
            && self.fused_q_kv_a
            && one_row
            && let (CudaAct::Bf16(res), CudaAct::Bf16(add)) = (&mut *residual, ffn_out)
        {
            let _t = self.timed("attention");
            let _g = self.lock()?;
            let x = attention::Input::AddNorm(attention::AddNorm {
                residual: res,
                add,
                weight: norm,
                eps,
            });
            return attention::run(self, cfg, w, x, batch, cache, layer);
        }
        let x = self.add_rms_norm(residual, ffn_out, norm, eps)?;
        self.attention(cfg, w, &x, batch, cache, layer)
    }

    fn route(&self, gate: &CudaWeight, x: &CudaAct, p: &RoutingParams) -> Result<Routing> {
        let _t = self.timed("route");
        let _g = self.lock()?;
        match self.gate_on_device(gate, x, p)? {
            DeviceRouting::Chosen { ids, weights } => Ok(Routing {
                top_k: p.top_k,
                ids: ids
                    .to_host(&self.gpu)
                    .kx()?
                    .into_iter()
                    .map(|v| v as u32)
                    .collect(),
                weights: weights.to_host(&self.gpu).kx()?,
            }),
            DeviceRouting::HostOnly { logits } => {
                let l = logits.to_host(&self.gpu).kx()?;
                Ok(dsv2_core::routing::route(&l, p))
            }
        }
    }

    /// Routing and this backend's experts without the host: the gate kernel's ids feed the
    /// on-device expert path (small-batch or grouped kernels) directly, at every batch size but
    /// prefill-sized ones. At one row the shared experts ride in the small-batch kernels'
    /// launches (`DSV2_FUSED_SHARED=0` runs them as their own MLP); otherwise their down
    /// projection adds into the routed output.
    fn route_local_experts(
        &self,
        gate: &CudaWeight,
        shared: Option<&MlpWeights<CudaWeight>>,
        x: &CudaAct,
        p: &RoutingParams,
        bank: &ExpertBank<CudaWeight>,
    ) -> Result<Option<CudaAct>> {
        let (n, hidden) = x.dims();
        if n == 0 || p.n_experts != bank.experts.len() {
            return Ok(None);
        }
        // an empty bank or mismatched shapes: the usual path reports them
        let Ok(Some(inter)) = experts::bank_intermediate(bank, hidden) else {
            return Ok(None);
        };
        let _t = self.timed("route_local_experts");
        let _g = self.lock()?;
        let DeviceRouting::Chosen { ids, weights } = self.gate_on_device(gate, x, p)? else {
            return Ok(None);
        };
        let xb = self.bf16_of(x)?;
        self.local_experts_routed(bank, inter, &xb, &ids, &weights, shared)
    }

    fn add_rms_norm_route_local_experts(
        &self,
        residual: &mut CudaAct,
        out: &CudaAct,
        norm: &CudaWeight,
        eps: f32,
        gate: &CudaWeight,
        shared: Option<&MlpWeights<CudaWeight>>,
        p: &RoutingParams,
        bank: &ExpertBank<CudaWeight>,
    ) -> Result<(CudaAct, Option<CudaAct>)> {
        if let Some(done) =
            self.fused_norm_route_local_experts(residual, out, norm, eps, gate, shared, p, bank)?
        {
            return Ok(done);
        }
        let x = self.add_rms_norm(residual, out, norm, eps)?;
        let done = self.route_local_experts(gate, shared, &x, p, bank)?;
        Ok((x, done))
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    fn decode_graph(
        &self,
        g: &GraphStep<'_>,
        cache: &mut CudaCache,
        layers: &mut dsv2_core::backend::DecodeLayers<'_, CudaCache, CudaAct>,
    ) -> Result<Option<CudaAct>> {
        self.run_decode_graph(g, cache, layers)
    }

    /// Temperature / top-k / top-p draws where the logits are (`sample_f32`): only the per-row
    /// settings go up and one id per row comes back.
    fn sample_rows(&self, x: &CudaAct, rows: &[RowSampling]) -> Result<Vec<u32>> {
        let _t = self.timed("sample_rows");
        let t = match x {
            CudaAct::F32(t) => t,
            // Only lm_head produces f32 activations; anything else takes the host path.
            CudaAct::Bf16(_) => {
                let (n, cols) = self.act_shape(x);
                if n != rows.len() {
                    return Err(err(format!("{} settings for {n} rows", rows.len())));
                }
                let host = self.act_to_host(x)?;
                return Ok(dsv2_core::sampling::sample_rows_host(&host, cols, rows));
            }
        };
        let n = t.shape()[0];
        if n != rows.len() {
            return Err(err(format!(
                "{} sampling settings for {n} rows",
                rows.len()
            )));
        }
        let temperature: Vec<f32> = rows.iter().map(|r| r.temperature).collect();
        let top_k: Vec<i32> = rows
            .iter()
            .map(|r| r.top_k.min(i32::MAX as usize) as i32)
            .collect();
        let top_p: Vec<f32> = rows.iter().map(|r| r.top_p).collect();
        let uniform: Vec<f32> = rows.iter().map(|r| r.uniform).collect();
        let _g = self.lock()?;
        let g = &self.gpu;
        let temperature = Tensor::from_host(g, &temperature, &[n]).kx()?;
        let top_k = Tensor::from_host(g, &top_k, &[n]).kx()?;
        let top_p = Tensor::from_host(g, &top_p, &[n]).kx()?;
        let uniform = Tensor::from_host(g, &uniform, &[n]).kx()?;
        let mut ids = Tensor::<i32>::zeros(g, &[n]).kx()?;
        sample::sample(
            g,
            sample::SampleParams {
                logits: t.view(),
                temperature: temperature.view(),
                top_k: top_k.view(),
                top_p: top_p.view(),
                uniform: uniform.view(),
                ids: ids.view_mut(),
            },
        )
        .kx()?;
        Ok(ids.to_host(g).kx()?.into_iter().map(|v| v as u32).collect())
    }

    fn argmax_rows(&self, x: &CudaAct) -> Result<Vec<u32>> {
        let _t = self.timed("argmax_rows");
        let t = match x {
            CudaAct::F32(t) => t,
            // Only lm_head produces f32 activations; anything else takes the host path.
            CudaAct::Bf16(_) => {
                let (rows, cols) = self.act_shape(x);
                let host = self.act_to_host(x)?;
                return Ok((0..rows)
                    .map(|r| dsv2_core::sampling::argmax(&host[r * cols..(r + 1) * cols]))
                    .collect());
            }
        };
        let _g = self.lock()?;
        let rows = t.shape()[0];
        let mut ids = Tensor::<i32>::zeros(&self.gpu, &[rows]).kx()?;
        sample::argmax(
            &self.gpu,
            sample::ArgmaxParams {
                logits: t.view(),
                ids: ids.view_mut(),
            },
        )
        .kx()?;
        Ok(ids
            .to_host(&self.gpu)
            .kx()?
            .into_iter()
            .map(|v| v as u32)
            .collect())
    }

    fn experts(
        &self,
        bank: &ExpertBank<CudaWeight>,
        x: &CudaAct,
        routing: &Routing,
    ) -> Result<CudaAct> {
        let _t = self.timed("experts");
        let _g = self.lock()?;
        experts::run(self, bank, x, routing)
    }
}

mod attention;
mod experts;

pub use graphs::GraphStats;

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if let Some(p) = &self.profile {
            eprintln!(
                "DSV2_PROFILE: backend ops on {} (stream synchronised around each op)\n{}",
                self.gpu.name,
                p.report()
            );
        }
    }
}

/// Convenience: an `Arc`'d backend on device `ordinal` with the default CUBIN cache.
pub fn open(ordinal: usize) -> std::result::Result<Arc<CudaBackend>, KernelError> {
    Ok(Arc::new(CudaBackend::new(&GpuOptions {
        ordinal,
        ..Default::default()
    })?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_gpu_is_a_clear_error_or_opens() {
        match CudaBackend::new(&GpuOptions::default()) {
            Ok(b) => assert!(b.name().starts_with("cuda:0")),
            Err(e) => {
                let s = e.to_string();
                assert!(
                    s.contains("no CUDA driver") || s.contains("--device cuda"),
                    "{s}"
                );
            }
        }
    }
}
