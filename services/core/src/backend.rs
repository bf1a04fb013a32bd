//! The backend trait: the block-level operations the model is made of. The CPU backend is the
//! reference; the CUDA backend implements the same trait, and the same model code and tests run
//! on both. Blocks (not single ops) are the unit so that each backend can fuse inside a block.

use std::ops::Range;

use crate::config::ModelConfig;
use crate::error::{CoreError, Result};
use crate::rope::RopeTable;
use crate::routing::{Routing, RoutingParams};
use crate::weights::TensorRef;

/// Query projection: low-rank with a norm (DeepSeek-V2) or a plain matrix (V2-Lite).
pub enum QProj<W> {
    LowRank { a: W, norm: W, b: W },
    Plain(W),
}

/// One layer's MLA weights, as named in the checkpoint.
pub struct AttnWeights<W> {
    pub q: QProj<W>,
    /// `kv_a_proj_with_mqa`: hidden → kv_lora_rank + qk_rope_head_dim.
    pub kv_a: W,
    pub kv_a_norm: W,
    /// `kv_b_proj`: kv_lora_rank → heads × (qk_nope + v_head); its row blocks are W_UK and W_UV.
    pub kv_b: W,
    pub o: W,
}

/// A SiLU-gated MLP: `down(silu(gate(x)) * up(x))`.
pub struct MlpWeights<W> {
    pub gate: W,
    pub up: W,
    pub down: W,
}

/// The routed experts of one MoE layer that this process hosts, indexed by global expert id.
pub struct ExpertBank<W> {
    pub experts: Vec<Option<MlpWeights<W>>>,
}

/// Which attention algorithm to run over the latent cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnMode {
    /// Absorbed weights for decode-sized chunks, decompressed K/V for prefill-sized ones.
    #[default]
    Auto,
    /// Decompress K and V from the cached latent (the HF formulation).
    Naive,
    /// W_UK folded into the query and W_UV into the output (DeepSeek-V2 paper §2.1.3).
    Absorbed,
}

/// One sequence's share of a step: its new tokens are rows `rows` of the step's activations,
/// at positions `pos0..pos0 + rows.len()`; earlier positions are already in the cache.
#[derive(Debug, Clone)]
pub struct SeqChunk {
    pub rows: Range<usize>,
    pub pos0: usize,
    /// Cache block ids, in position order; must cover `pos0 + rows.len()` tokens.
    pub blocks: Vec<u32>,
}

/// Everything a layer's attention needs to know about the batch.
pub struct AttnBatch<'a> {
    pub seqs: &'a [SeqChunk],
    pub rope: &'a RopeTable,
    pub block_size: usize,
    pub mode: AttnMode,
}

/// A decode step offered to [`Backend::decode_graph`]: every sequence adds one token (row i is
/// sequence i) and every MoE layer's routed experts are held by this same backend.
pub struct GraphStep<'a> {
    pub step: &'a crate::model::StepInput,
    pub cfg: &'a ModelConfig,
    pub rope: &'a RopeTable,
    pub block_size: usize,
    pub mode: AttnMode,
}

/// The step function [`Backend::decode_graph`] is given: a (possibly padded) step and the
/// cache in, the step's hidden states out.
pub type DecodeLayers<'a, C, A> = dyn FnMut(&crate::model::StepInput, &mut C) -> Result<A> + 'a;

/// What a backend can move and compute at best, measured in this process: the two ceilings of a
/// roofline (`dsv2 bench` divides each step's bytes and FLOPs by them), and the formats in which
/// the backend holds what a step moves, so that bytes are counted as they really are.
#[derive(Debug, Clone, PartialEq)]
pub struct Ceilings {
    /// Copy bandwidth: bytes read + bytes written per second (a copy of N bytes counts 2N).
    pub copy_bytes_per_s: f64,
    /// How the copy was measured (size, device or threads).
    pub copy_method: String,
    /// Dense matrix-multiply rate, 2·M·N·K per second.
    pub gemm_flops_per_s: f64,
    /// How the GEMM was measured (shape, dtype, library or threads).
    pub gemm_method: String,
    /// Bytes one weight element takes where this backend holds it; None: as the checkpoint
    /// stores it.
    pub weight_elem_bytes: Option<usize>,
    /// Bytes one value of the latent KV cache takes.
    pub cache_elem_bytes: usize,
}

/// One block's copy between the latent cache and host memory (the prefix cache's host tier):
/// device cache block `block` and host slot `slot`, each holding every layer of the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub block: u32,
    pub slot: u32,
}

pub trait Backend: Send + Sync + 'static {
    /// A weight tensor resident where this backend computes.
    type Weight: Send + Sync;
    /// Activations: a [rows, cols] matrix.
    type Act: Send + Sync;
    /// The latent KV cache storage of all layers.
    type Cache: Send;
    /// Host memory holding copies of latent cache blocks, in slots of one block (every layer):
    /// the prefix cache's host tier (kv_cache/host.rs). Page-locked on a GPU, so that copies run
    /// asynchronously on a DMA engine.
    type HostBlocks: Send;

    fn name(&self) -> String;

    /// Makes a checkpoint tensor available to this backend (in its stored dtype).
    fn weight(&self, t: &TensorRef) -> Result<Self::Weight>;

    fn new_cache(
        &self,
        cfg: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self::Cache>;

    /// Bytes one cache block (every layer) takes in host memory: sizes the host tier.
    fn host_block_bytes(&self, cfg: &ModelConfig, block_size: usize) -> usize;

    /// Host memory for up to `max_slots` blocks of a cache made by `new_cache(cfg, _,
    /// block_size)`, allocated as slots are first written (a tier of many GB costs nothing until
    /// it fills).
    fn new_host_blocks(
        &self,
        cfg: &ModelConfig,
        block_size: usize,
        max_slots: usize,
    ) -> Result<Self::HostBlocks> {
        let _ = (cfg, block_size, max_slots);
        Err(no_host_tier(self.name()))
    }

    /// Copies each `copies[i].block` of `cache` into host slot `copies[i].slot`. May return
    /// before the copies are done, but they see every step issued before, and every step issued
    /// after (which may overwrite those blocks) waits for them. Slots are distinct.
    fn export_blocks(
        &self,
        cache: &Self::Cache,
        host: &mut Self::HostBlocks,
        copies: &[BlockCopy],
    ) -> Result<()> {
        let _ = (cache, host, copies);
        Err(no_host_tier(self.name()))
    }

    /// Copies each host slot `copies[i].slot` into `copies[i].block` of `cache`, after every
    /// export issued before (a slot may have been written by one). May return before the copies
    /// are done and, unlike an export, need not be ordered before later steps until
    /// [`Backend::await_imports`]: a GPU runs them beside the next step, which must not read those
    /// blocks. Blocks are distinct.
    fn import_blocks(
        &self,
        host: &mut Self::HostBlocks,
        cache: &mut Self::Cache,
        copies: &[BlockCopy],
    ) -> Result<()> {
        let _ = (cache, host, copies);
        Err(no_host_tier(self.name()))
    }

    /// Orders every import issued so far before any step issued after this call (a GPU makes
    /// its compute stream wait for the copies; the host does not block).
    fn await_imports(&self, host: &mut Self::HostBlocks, cache: &mut Self::Cache) -> Result<()> {
        let _ = (cache, host);
        Ok(())
    }

    /// Whether imports run beside the steps issued after them until awaited (a GPU's copy
    /// stream). When not (the CPU copies before `import_blocks` returns), the engine does not
    /// hold a request back a step for its copies.
    fn imports_overlap_steps(&self) -> bool {
        false
    }

    /// Blocks the calling thread until every copy issued on `host` is done (for measurements).
    fn sync_host_blocks(&self, host: &mut Self::HostBlocks) -> Result<()> {
        let _ = host;
        Ok(())
    }

    fn act_from_host(&self, rows: usize, cols: usize, data: &[f32]) -> Result<Self::Act>;
    fn act_to_host(&self, a: &Self::Act) -> Result<Vec<f32>>;
    fn act_shape(&self, a: &Self::Act) -> (usize, usize);
    /// Rows `rows` of `a`, in that order.
    fn select_rows(&self, a: &Self::Act, rows: &[usize]) -> Result<Self::Act>;

    fn embed(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Act>;
    fn rms_norm(&self, x: &Self::Act, w: &Self::Weight, eps: f32) -> Result<Self::Act>;
    fn add_assign(&self, acc: &mut Self::Act, x: &Self::Act) -> Result<()>;
    /// `residual += x`, then the RMSNorm of the updated residual: the pre-norm step between
    /// sublayers. Backends fuse it into one pass; the result must equal the two ops in turn.
    fn add_rms_norm(
        &self,
        residual: &mut Self::Act,
        x: &Self::Act,
        w: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Act> {
        self.add_assign(residual, x)?;
        self.rms_norm(residual, w, eps)
    }
    /// `x · Wᵀ`.
    fn linear(&self, x: &Self::Act, w: &Self::Weight) -> Result<Self::Act>;
    fn mlp(&self, w: &MlpWeights<Self::Weight>, x: &Self::Act) -> Result<Self::Act>;

    /// MLA for the batch: projects q and the latent, appends the new tokens' latent and rotated
    /// k_pe to the cache, attends causally over the cache, applies the output projection.
    fn attention(
        &self,
        cfg: &ModelConfig,
        w: &AttnWeights<Self::Weight>,
        x: &Self::Act,
        batch: &AttnBatch<'_>,
        cache: &mut Self::Cache,
        layer: usize,
    ) -> Result<Self::Act>;

    /// [`Backend::add_rms_norm`] of `ffn_out` into `residual` with `norm`, then
    /// [`Backend::attention`] of the normed rows, in one call so that a backend may compute the
    /// norm inside the first projections' launch (the CUDA backend does at one row: one launch
    /// less per layer). The normed rows feed only attention's first projections. A backend may
    /// replace `residual` with a new activation holding the sum rather than update it in place.
    #[allow(clippy::too_many_arguments)]
    fn attention_after_add_norm(
        &self,
        cfg: &ModelConfig,
        w: &AttnWeights<Self::Weight>,
        residual: &mut Self::Act,
        ffn_out: &Self::Act,
        norm: &Self::Weight,
        eps: f32,
        batch: &AttnBatch<'_>,
        cache: &mut Self::Cache,
        layer: usize,
    ) -> Result<Self::Act> {
        let x = self.add_rms_norm(residual, ffn_out, norm, eps)?;
        self.attention(cfg, w, &x, batch, cache, layer)
    }

    /// Gate logits (f32) → chosen experts and weights, brought to the host for dispatch.
    fn route(&self, gate: &Self::Weight, x: &Self::Act, p: &RoutingParams) -> Result<Routing>;

    /// Index of the largest entry of each row (lowest index on ties, as torch.argmax): greedy
    /// decoding without bringing the logits to the host where a backend can avoid it.
    fn argmax_rows(&self, x: &Self::Act) -> Result<Vec<u32>> {
        let (rows, cols) = self.act_shape(x);
        let host = self.act_to_host(x)?;
        Ok((0..rows)
            .map(|r| crate::sampling::argmax(&host[r * cols..(r + 1) * cols]))
            .collect())
    }

    /// Whether [`Backend::sample_rows`] draws on the device, so that the engine keeps sampled
    /// rows' logits where they were computed. The CPU reference samples on the host.
    fn samples_on_device(&self) -> bool {
        false
    }

    /// One token per row of logits `x` [rows, vocab] under each row's settings (temperature 0:
    /// greedy). This default brings the logits to the host and applies
    /// [`crate::sampling::sample_with_uniform`]; a device backend draws where the logits are
    /// (its own kept-set order, so the same uniform may pick another token of the same
    /// distribution).
    fn sample_rows(
        &self,
        x: &Self::Act,
        rows: &[crate::sampling::RowSampling],
    ) -> Result<Vec<u32>> {
        let (n, cols) = self.act_shape(x);
        if n != rows.len() {
            return Err(CoreError::InvalidInput(format!(
                "{} sampling settings for {n} rows of logits",
                rows.len()
            )));
        }
        let host = self.act_to_host(x)?;
        Ok(crate::sampling::sample_rows_host(&host, cols, rows))
    }

    /// Measures this backend's [`Ceilings`] now (seconds of work: large copies and GEMMs).
    /// `quick`: small sizes for tests, which do not reach the real ceilings.
    fn measure_ceilings(&self, _quick: bool) -> Result<Ceilings> {
        Err(CoreError::Backend {
            backend: self.name(),
            msg: "cannot measure its copy bandwidth and GEMM rate".into(),
        })
    }

    /// Weighted sum of the chosen experts' outputs for every row; rows whose experts are not in
    /// `bank` contribute nothing for those experts (another shard adds them).
    fn experts(
        &self,
        bank: &ExpertBank<Self::Weight>,
        x: &Self::Act,
        routing: &Routing,
    ) -> Result<Self::Act>;

    /// Runs a decode step through device work recorded once per shape and replayed (CUDA
    /// graphs), so that a step costs one launch instead of one per op. `layers` computes the
    /// step's hidden states (embedding through the last layer, over `cache`) for the step it is
    /// given, which
    /// may be `g.step` padded with copies of its first sequence up to a recorded batch size.
    /// Returns those hidden states (the first rows are `g.step`'s), or `Ok(None)` when this
    /// backend does not record graphs for this step: the caller then runs `layers` itself.
    fn decode_graph(
        &self,
        _g: &GraphStep<'_>,
        _cache: &mut Self::Cache,
        _layers: &mut DecodeLayers<'_, Self::Cache, Self::Act>,
    ) -> Result<Option<Self::Act>> {
        Ok(None)
    }

    /// A whole MoE feed-forward for experts this same backend holds: [`Backend::route`], the
    /// routed experts and the `shared` experts (when the layer has them) added in, in one call.
    /// A GPU can keep the chosen ids on the device instead of bringing them to the host, which
    /// saves a stream synchronisation per MoE layer (at batch 1 the host then runs ahead of the
    /// GPU instead of waiting for it every layer), and may compute the shared experts in the
    /// routed experts' launches. `Ok(None)` means "not done here": the caller routes and
    /// dispatches as usual and runs the shared experts itself. The default never does it.
    fn route_local_experts(
        &self,
        _gate: &Self::Weight,
        _shared: Option<&MlpWeights<Self::Weight>>,
        _x: &Self::Act,
        _p: &RoutingParams,
        _bank: &ExpertBank<Self::Weight>,
    ) -> Result<Option<Self::Act>> {
        Ok(None)
    }

    /// [`Backend::add_rms_norm`] of `out` into `residual` with `norm`, then
    /// [`Backend::route_local_experts`] on the normed rows, in one call so that a backend may do
    /// both in fewer launches (the CUDA backend computes the norm inside the gate's launch at a
    /// few rows: one launch less per MoE layer). Returns the normed rows (the caller needs them
    /// where the experts were not done here) and what `route_local_experts` returns.
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm_route_local_experts(
        &self,
        residual: &mut Self::Act,
        out: &Self::Act,
        norm: &Self::Weight,
        eps: f32,
        gate: &Self::Weight,
        shared: Option<&MlpWeights<Self::Weight>>,
        p: &RoutingParams,
        bank: &ExpertBank<Self::Weight>,
    ) -> Result<(Self::Act, Option<Self::Act>)> {
        let x = self.add_rms_norm(residual, out, norm, eps)?;
        let done = self.route_local_experts(gate, shared, &x, p, bank)?;
        Ok((x, done))
    }
}

/// Where a process computes: `cpu`, `cuda` (GPU 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device: expected cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// How the latent KV cache holds its values (`--kv-cache-dtype`). `Fp8`: the 512 latent values
/// of a token in e4m3 with one f32 scale per token, the RoPE key in bf16 (656 bytes a token and
/// layer at DeepSeek-V2's dims, against 1,152): about 1.76 × the tokens in the same memory, and
/// decode reads 0.57 × the bytes. The CUDA backend holds either; the CPU backend only `Bf16` (its
/// cache is f32 in host memory, where the saving would not matter and no FP8 arithmetic exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    #[default]
    Bf16,
    Fp8,
}

impl std::str::FromStr for KvCacheDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "bf16" => Ok(KvCacheDtype::Bf16),
            "fp8" | "fp8_e4m3" => Ok(KvCacheDtype::Fp8),
            _ => Err(format!(
                "`{s}` is not a KV cache dtype: expected bf16 or fp8 (e4m3 with a per-token scale)"
            )),
        }
    }
}

impl KvCacheDtype {
    /// Whether the CPU backend holds a cache of this dtype, or what to tell the user.
    pub fn check_cpu(self) -> std::result::Result<(), String> {
        match self {
            KvCacheDtype::Bf16 => Ok(()),
            KvCacheDtype::Fp8 => Err(
                "--kv-cache-dtype fp8 needs a GPU (--device cuda:N): the CPU backend keeps its KV cache in f32 and has no FP8 cache".into(),
            ),
        }
    }
}

impl std::fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvCacheDtype::Bf16 => "bf16",
            KvCacheDtype::Fp8 => "fp8",
        })
    }
}

/// What a backend without a host tier answers to the tier's hooks.
fn no_host_tier(backend: String) -> CoreError {
    CoreError::Backend {
        backend,
        msg: "has no host tier for the KV cache".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_dtypes_parse_and_bad_ones_say_what_is_accepted() {
        assert_eq!("bf16".parse(), Ok(KvCacheDtype::Bf16));
        assert_eq!("fp8".parse(), Ok(KvCacheDtype::Fp8));
        assert_eq!("fp8_e4m3".parse(), Ok(KvCacheDtype::Fp8));
        assert_eq!(KvCacheDtype::default(), KvCacheDtype::Bf16);
        for d in [KvCacheDtype::Bf16, KvCacheDtype::Fp8] {
            assert_eq!(d.to_string().parse(), Ok(d));
        }
        assert!(KvCacheDtype::Bf16.check_cpu().is_ok());
        let e = KvCacheDtype::Fp8.check_cpu().err().unwrap_or_default();
        assert!(e.contains("--device cuda"), "{e}");
        let e = "int8".parse::<KvCacheDtype>().err().unwrap_or_default();
        assert!(e.contains("`int8`") && e.contains("bf16 or fp8"), "{e}");
    }
}
