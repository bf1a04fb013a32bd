//! The prefix cache's host tier on a GPU (dsv2_core kv_cache/host.rs decides what moves; this
//! moves it): cache blocks are copied between the latent cache and page-locked host memory on a
//! stream of their own, so that a DMA engine does the transfer while the compute stream runs.
//!
//! A block's layers lie in separate tensors ([num_blocks, block_size, width] each), so the copies
//! of a batch of blocks go through a device staging buffer: one small kernel gathers every layer
//! of up to [`CHUNK_BLOCKS`] blocks into it (or scatters from it), laid out like the host slots
//! (slot-major, then layer), and each run of consecutive host slots is one DMA. A batch of N
//! blocks of L layers costs ⌈N / chunk⌉ kernel launches and a few large copies instead of N × L
//! small ones (for DeepSeek-V2: 60 copies of 18 KB per block).
//!
//! Ordering (all on the copy stream, in issue order, after the compute stream's work so far):
//! - An export must finish before the compute stream overwrites its blocks, so the compute stream
//!   waits for it: what overlaps with an export is the host's own work until the next step's
//!   first kernel, nothing on the GPU.
//! - An import is not waited for until [`CudaHostBlocks::await_imports`]; the engine issues it at
//!   admission and keeps the requests that read its blocks out of that step, so the copy runs
//!   beside the step's kernels (other requests' decode and prefill). When nothing else can run,
//!   the engine awaits at once and the step simply starts after the copy.
//! - Staging and host slots are reused only by later copies on the same stream.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PinnedHostSlice, PushKernelArg, sys,
};
use cudarc::nvrtc::Ptx;
use dsv2_core::backend::{BlockCopy, KvCacheDtype};
use dsv2_core::config::ModelConfig;
use dsv2_core::error::Result;
use dsv2_kernels::compile::{self, CompileConfig};

use crate::{CudaBackend, CudaCache, Kx, err};

/// Most blocks one gather or scatter launch takes: the block list travels in the kernel's
/// parameters (256 × 4 B + 64 layer addresses = 1.5 KB of the 4 KB parameter space).
const CHUNK_BLOCKS: usize = 256;
/// Most layers one launch takes (more are split over launches).
const LAUNCH_LAYERS: usize = 64;
/// Device staging buffer: about this many bytes, at least one block.
const STAGING_BYTES: usize = 64 << 20;
/// Pinned host memory is allocated in slabs of about this many bytes as the tier fills (a first
/// use costs the page pinning of one slab, tens of ms, not the whole tier's).
const SLAB_BYTES: usize = 256 << 20;
const THREADS: u32 = 256;

/// Layer tensors and blocks of one launch: the kernels' `BlockList`.
#[repr(C)]
#[derive(Clone, Copy)]
struct BlockList {
    layers: [u64; LAUNCH_LAYERS],
    blocks: [i32; CHUNK_BLOCKS],
}

// SAFETY: plain old data with the layout of the kernels' `BlockList` (repr(C), u64 and i32 only).
unsafe impl DeviceRepr for BlockList {}

/// Launch `blockIdx.x` = i · layers + l copies layer `layer0 + l` of block `blocks[i]` between
/// the cache and staging entry i (`total_layers` layers of `words` words each).
const SRC: &str = r#"
struct BlockList { unsigned long long layers[64]; int blocks[256]; };

template <typename W>
__device__ __forceinline__ void copy_blocks(const BlockList& a, int layers, int layer0,
                                            int total_layers, long long words, W* staging,
                                            bool to_staging) {
    int i = blockIdx.x / layers;
    int l = blockIdx.x % layers;
    W* dev = (W*)a.layers[l] + (long long)a.blocks[i] * words;
    W* st = staging + ((long long)i * total_layers + layer0 + l) * words;
    for (long long w = threadIdx.x; w < words; w += blockDim.x) {
        if (to_staging) st[w] = dev[w]; else dev[w] = st[w];
    }
}

extern "C" __global__ void host_tier_gather_u4(BlockList a, int layers, int layer0,
        int total_layers, long long words, uint4* staging) {
    copy_blocks<uint4>(a, layers, layer0, total_layers, words, staging, true);
}
extern "C" __global__ void host_tier_scatter_u4(BlockList a, int layers, int layer0,
        int total_layers, long long words, uint4* staging) {
    copy_blocks<uint4>(a, layers, layer0, total_layers, words, staging, false);
}
extern "C" __global__ void host_tier_gather_u2(BlockList a, int layers, int layer0,
        int total_layers, long long words, unsigned short* staging) {
    copy_blocks<unsigned short>(a, layers, layer0, total_layers, words, staging, true);
}
extern "C" __global__ void host_tier_scatter_u2(BlockList a, int layers, int layer0,
        int total_layers, long long words, unsigned short* staging) {
    copy_blocks<unsigned short>(a, layers, layer0, total_layers, words, staging, false);
}
"#;

/// Bytes of one block of every layer, in the cache's dtype (an FP8 block is copied as the bytes
/// it is: 656 a token at DeepSeek-V2's dims, so the tier holds 1.76 × the blocks of a bf16
/// cache's). Dims the FP8 layout cannot hold count as bf16: such a cache is never made.
pub(crate) fn block_bytes(cfg: &ModelConfig, block_size: usize, dtype: KvCacheDtype) -> usize {
    cfg.num_hidden_layers * layer_block_bytes(cfg, block_size, dtype)
}

fn layer_block_bytes(cfg: &ModelConfig, block_size: usize, dtype: KvCacheDtype) -> usize {
    crate::cache::layer_block_bytes(cfg, block_size, dtype)
        .unwrap_or(block_size * cfg.latent_cache_width() * size_of::<half::bf16>())
}

/// One pinned slab: its memory and the address of its first byte.
struct Slab {
    _mem: PinnedHostSlice<u8>,
    base: usize,
}

/// Page-locked slots of one block each (slot-major, then layer), a copy stream and its events.
pub struct CudaHostBlocks {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    slabs: Vec<Slab>,
    slots_per_slab: usize,
    max_slots: usize,
    layers: usize,
    layer_bytes: usize,
    block_size: usize,
    /// The cache dtype the tier was made for (its slots hold that format's bytes).
    dtype: KvCacheDtype,
    /// Device buffer of `staging_blocks` blocks, made on first use.
    staging: Option<CudaSlice<u8>>,
    staging_blocks: usize,
    gather: CudaFunction,
    scatter: CudaFunction,
    /// Copy words: 16 bytes when a layer's block is a multiple of 16, else 2.
    word_bytes: usize,
    /// Recorded on the compute stream so that the copy stream starts after the steps so far.
    compute_done: CudaEvent,
    /// After the last export (the compute stream waits for it at once).
    saved: CudaEvent,
    /// After the last import (the compute stream waits for it in `await_imports`).
    restored: CudaEvent,
}

impl CudaHostBlocks {
    pub(crate) fn new(
        backend: &CudaBackend,
        cfg: &ModelConfig,
        block_size: usize,
        max_slots: usize,
    ) -> Result<Self> {
        // Compiled and cached like every other kernel of the process (dsv2_kernels::compile),
        // with the defaults `open` gives the device.
        let compile = CompileConfig {
            arch: compile::DEFAULT_ARCH.to_string(),
            include_dir: compile::find_cuda_include(None).kx()?,
            cache_dir: Some(compile::default_cache_dir()),
            driver_version: backend.gpu.driver_version,
        };
        let (cubin, _) = compile::cubin_for(&compile, "host_tier.cu", SRC).kx()?;
        let _g = backend.lock()?;
        let ctx = backend.gpu.ctx.clone();
        let stream = ctx.new_stream().kx()?;
        let module = ctx.load_module(Ptx::from_binary(cubin)).kx()?;
        let dtype = backend.kv_cache_dtype();
        let layer_bytes = layer_block_bytes(cfg, block_size, dtype);
        let bytes = cfg.num_hidden_layers * layer_bytes;
        if bytes == 0 {
            return Err(err("a cache block of 0 bytes"));
        }
        let word_bytes = if layer_bytes.is_multiple_of(16) {
            16
        } else {
            2
        };
        let suffix = if word_bytes == 16 { "u4" } else { "u2" };
        Ok(CudaHostBlocks {
            gather: module
                .load_function(&format!("host_tier_gather_{suffix}"))
                .kx()?,
            scatter: module
                .load_function(&format!("host_tier_scatter_{suffix}"))
                .kx()?,
            compute_done: ctx.new_event(None).kx()?,
            saved: ctx.new_event(None).kx()?,
            restored: ctx.new_event(None).kx()?,
            ctx,
            stream,
            slabs: Vec::new(),
            slots_per_slab: (SLAB_BYTES / bytes).clamp(1, max_slots.max(1)),
            max_slots,
            layers: cfg.num_hidden_layers,
            layer_bytes,
            block_size,
            dtype,
            staging: None,
            staging_blocks: (STAGING_BYTES / bytes).clamp(1, CHUNK_BLOCKS),
            word_bytes,
        })
    }

    fn block_bytes(&self) -> usize {
        self.layers * self.layer_bytes
    }

    /// Checks the cache's shape and the copies' block and slot ids.
    fn check(&self, cache: &CudaCache, copies: &[BlockCopy]) -> Result<()> {
        if cache.layers.len() != self.layers || cache.block_size != self.block_size {
            return Err(err(format!(
                "host tier made for {} layers of blocks of {} tokens, the cache has {} of {}",
                self.layers,
                self.block_size,
                cache.layers.len(),
                cache.block_size
            )));
        }
        if cache.dtype != self.dtype {
            return Err(err(format!(
                "host tier made for a {} cache, this one is {}",
                self.dtype, cache.dtype
            )));
        }
        let n = cache.num_blocks();
        if let Some(c) = copies
            .iter()
            .find(|c| c.block as usize >= n || c.slot as usize >= self.max_slots)
        {
            return Err(err(format!(
                "copy of block {} / slot {} out of {n} blocks / {} slots",
                c.block, c.slot, self.max_slots
            )));
        }
        Ok(())
    }

    /// Host address of `slot`, allocating pinned slabs up to it.
    fn slot_addr(&mut self, slot: usize) -> Result<usize> {
        let slab = slot / self.slots_per_slab;
        while self.slabs.len() <= slab {
            let first = self.slabs.len() * self.slots_per_slab;
            let slots = self.slots_per_slab.min(self.max_slots - first);
            // SAFETY: the memory is only ever written by DMA before it is read (a slot is read
            // back only after an export wrote it), so its initial contents are never used.
            let mut mem = unsafe {
                self.ctx
                    .alloc_pinned_with_flags::<u8>(slots * self.block_bytes(), 0)
            }
            .kx()?;
            // Never recorded by cudarc (all copies go through raw addresses), so no wait here.
            let base = mem.as_mut_ptr().kx()? as usize;
            self.slabs.push(Slab { _mem: mem, base });
        }
        Ok(self.slabs[slab].base + (slot % self.slots_per_slab) * self.block_bytes())
    }

    fn staging_ptr(&mut self) -> Result<u64> {
        if self.staging.is_none() {
            // SAFETY: staging is written by a gather or a DMA before anything reads it.
            let buf = unsafe {
                self.stream
                    .alloc::<u8>(self.staging_blocks * self.block_bytes())
            }
            .kx()?;
            self.staging = Some(buf);
        }
        let buf = self
            .staging
            .as_ref()
            .ok_or_else(|| err("no staging buffer"))?;
        let (p, _sync) = buf.device_ptr(&self.stream);
        Ok(p)
    }

    /// Gathers (or scatters) every layer of `chunk`'s blocks to (from) staging entries 0...
    fn launch(
        &self,
        f: &CudaFunction,
        cache: &CudaCache,
        chunk: &[BlockCopy],
        staging: u64,
    ) -> Result<()> {
        let mut list = BlockList {
            layers: [0; LAUNCH_LAYERS],
            blocks: [0; CHUNK_BLOCKS],
        };
        for (dst, c) in list.blocks.iter_mut().zip(chunk) {
            *dst = i32::try_from(c.block).map_err(|_| err("block id over i32"))?;
        }
        let words = (self.layer_bytes / self.word_bytes) as i64;
        let total = self.layers as i32;
        for layer0 in (0..self.layers).step_by(LAUNCH_LAYERS) {
            let n = LAUNCH_LAYERS.min(self.layers - layer0);
            for (dst, t) in list
                .layers
                .iter_mut()
                .zip(&cache.layers[layer0..layer0 + n])
            {
                *dst = t.ptr();
            }
            let (nl, l0) = (n as i32, layer0 as i32);
            let mut b = self.stream.launch_builder(f);
            b.arg(&list)
                .arg(&nl)
                .arg(&l0)
                .arg(&total)
                .arg(&words)
                .arg(&staging);
            let cfg = LaunchConfig {
                grid_dim: ((chunk.len() * n) as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match host_tier_{gather,scatter}_*(BlockList, int, int, int,
            // long long, W*); block ids were checked against the cache, the layer addresses are
            // the cache's tensors (alive for the call; the cache outlives the copy stream's work,
            // see KvCache's field order), and staging holds `chunk.len()` ≤ staging_blocks
            // blocks of every layer.
            unsafe { b.launch(cfg) }.kx()?;
        }
        Ok(())
    }

    /// The DMAs between staging entries and the chunk's host slots, one per run of slots that
    /// are consecutive in one slab.
    fn dma(&mut self, chunk: &[BlockCopy], staging: u64, to_host: bool) -> Result<()> {
        let bb = self.block_bytes();
        let mut i = 0;
        while i < chunk.len() {
            let first = chunk[i].slot as usize;
            let mut j = i + 1;
            while j < chunk.len()
                && chunk[j].slot as usize == first + (j - i)
                && !(first + (j - i)).is_multiple_of(self.slots_per_slab)
            {
                j += 1;
            }
            let host = self.slot_addr(first)?;
            let dev = staging + (i * bb) as u64;
            let bytes = (j - i) * bb;
            let s = self.stream.cu_stream();
            // SAFETY: `host` is `bytes` bytes inside one pinned slab (the run stays in the slab),
            // `dev` is inside staging (entries i..j of at most staging_blocks), both alive until
            // the stream is done with them (slabs and staging live as long as self, whose drop
            // synchronises the stream).
            unsafe {
                if to_host {
                    sys::cuMemcpyDtoHAsync_v2(host as *mut c_void, dev, bytes, s)
                } else {
                    sys::cuMemcpyHtoDAsync_v2(dev, host as *const c_void, bytes, s)
                }
            }
            .result()
            .kx()?;
            i = j;
        }
        Ok(())
    }

    /// The copy stream starts after the compute stream's work so far.
    fn after_compute(&self, backend: &CudaBackend) -> Result<()> {
        self.compute_done.record(&backend.gpu.stream).kx()?;
        self.stream.wait(&self.compute_done).kx()
    }

    pub(crate) fn export(
        &mut self,
        backend: &CudaBackend,
        cache: &CudaCache,
        copies: &[BlockCopy],
    ) -> Result<()> {
        self.check(cache, copies)?;
        let _g = backend.lock()?;
        self.after_compute(backend)?;
        let staging = self.staging_ptr()?;
        let gather = self.gather.clone();
        for chunk in copies.chunks(self.staging_blocks) {
            self.launch(&gather, cache, chunk, staging)?;
            self.dma(chunk, staging, true)?;
        }
        self.saved.record(&self.stream).kx()?;
        // The next steps may write into these blocks: not before the copies have read them.
        backend.gpu.stream.wait(&self.saved).kx()
    }

    pub(crate) fn import(
        &mut self,
        backend: &CudaBackend,
        cache: &CudaCache,
        copies: &[BlockCopy],
    ) -> Result<()> {
        self.check(cache, copies)?;
        let _g = backend.lock()?;
        // The blocks' previous users (steps issued before) are done with them first.
        self.after_compute(backend)?;
        let staging = self.staging_ptr()?;
        let scatter = self.scatter.clone();
        for chunk in copies.chunks(self.staging_blocks) {
            self.dma(chunk, staging, false)?;
            self.launch(&scatter, cache, chunk, staging)?;
        }
        self.restored.record(&self.stream).kx()
    }

    /// The compute stream waits (on the GPU) for every import issued so far.
    pub(crate) fn await_imports(&self, backend: &CudaBackend) -> Result<()> {
        let _g = backend.lock()?;
        backend.gpu.stream.wait(&self.restored).kx()
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.ctx.bind_to_thread().kx()?;
        self.stream.synchronize().kx()
    }
}

impl Drop for CudaHostBlocks {
    fn drop(&mut self) {
        // The slabs and staging must outlive the copies that use them.
        if let Err(e) = self.synchronize() {
            tracing::warn!(error = %e, "host tier: waiting for its copies at drop failed");
        }
    }
}
