//! The latent KV cache on the GPU: one tensor per layer, in bf16 ([num_blocks, block_size,
//! kv_lora_rank + qk_rope_head_dim]) or in FP8 ([num_blocks, block_size, row bytes] raw bytes in
//! `dsv2_kernels::fp8`'s layout: e4m3 latent, bf16 k_pe, f32 scale per token), and the byte
//! arithmetic every user of the cache shares (allocation, the host tier, capacity logs).

use half::bf16;

use dsv2_core::backend::KvCacheDtype;
use dsv2_core::config::ModelConfig;
use dsv2_core::error::Result;
use dsv2_kernels::Tensor;
use dsv2_kernels::fp8::Fp8Layout;

use crate::err;

/// One layer's cache.
pub(crate) enum LayerCache {
    Bf16(Tensor<bf16>),
    Fp8(Tensor<u8>, Fp8Layout),
}

impl LayerCache {
    pub(crate) fn num_blocks(&self) -> usize {
        match self {
            LayerCache::Bf16(t) => t.shape()[0],
            LayerCache::Fp8(t, _) => t.shape()[0],
        }
    }

    /// Device address of the first byte.
    pub(crate) fn ptr(&self) -> u64 {
        match self {
            LayerCache::Bf16(t) => t.ptr(),
            LayerCache::Fp8(t, _) => t.ptr(),
        }
    }
}

/// The latent cache of every layer.
pub struct CudaCache {
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) block_size: usize,
    pub(crate) dtype: KvCacheDtype,
    /// Unique per cache made in this process: recorded decode graphs name the cache they write.
    pub(crate) id: u64,
}

impl CudaCache {
    pub(crate) fn num_blocks(&self) -> usize {
        self.layers.first().map_or(0, |l| l.num_blocks())
    }

    /// How the cache holds its values.
    pub fn dtype(&self) -> KvCacheDtype {
        self.dtype
    }
}

/// The FP8 layout of `cfg`'s latent, or why the FP8 kernels cannot hold it.
pub(crate) fn fp8_layout(cfg: &ModelConfig) -> Result<Fp8Layout> {
    Fp8Layout::new(cfg.kv_lora_rank, cfg.qk_rope_head_dim).map_err(err)
}

/// Bytes one cached token of one layer takes.
pub fn token_bytes(cfg: &ModelConfig, dtype: KvCacheDtype) -> Result<usize> {
    Ok(match dtype {
        KvCacheDtype::Bf16 => cfg.latent_cache_width() * size_of::<bf16>(),
        KvCacheDtype::Fp8 => fp8_layout(cfg)?.row_bytes(),
    })
}

/// Bytes of one block of one layer.
pub(crate) fn layer_block_bytes(
    cfg: &ModelConfig,
    block_size: usize,
    dtype: KvCacheDtype,
) -> Result<usize> {
    Ok(block_size * token_bytes(cfg, dtype)?)
}

/// A zeroed cache of `num_blocks` blocks per layer.
pub(crate) fn new_cache(
    gpu: &dsv2_kernels::Gpu,
    cfg: &ModelConfig,
    num_blocks: usize,
    block_size: usize,
    dtype: KvCacheDtype,
) -> Result<CudaCache> {
    use crate::Kx;
    let row = match dtype {
        KvCacheDtype::Bf16 => cfg.latent_cache_width(),
        KvCacheDtype::Fp8 => fp8_layout(cfg)?.row_bytes(),
    };
    num_blocks
        .checked_mul(block_size)
        .and_then(|v| v.checked_mul(row))
        .filter(|&v| v < i32::MAX as usize)
        .ok_or_else(|| err("KV cache of one layer exceeds 2^31 elements"))?;
    let layers = (0..cfg.num_hidden_layers)
        .map(|_| {
            Ok(match dtype {
                KvCacheDtype::Bf16 => LayerCache::Bf16(
                    Tensor::<bf16>::zeros(gpu, &[num_blocks, block_size, row]).kx()?,
                ),
                KvCacheDtype::Fp8 => LayerCache::Fp8(
                    Tensor::<u8>::zeros(gpu, &[num_blocks, block_size, row]).kx()?,
                    fp8_layout(cfg)?,
                ),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    static NEXT_CACHE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    Ok(CudaCache {
        layers,
        block_size,
        dtype,
        id: NEXT_CACHE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(r: usize, dr: usize) -> ModelConfig {
        let mut j = dsv2_core::tiny::config_json();
        j["kv_lora_rank"] = serde_json::json!(r);
        j["qk_rope_head_dim"] = serde_json::json!(dr);
        ModelConfig::from_json_str(&j.to_string()).unwrap()
    }

    #[test]
    fn fp8_tokens_take_656_bytes_at_deepseek_v2_dims() {
        let c = cfg(512, 64);
        assert_eq!(token_bytes(&c, KvCacheDtype::Bf16).ok(), Some(1152));
        assert_eq!(token_bytes(&c, KvCacheDtype::Fp8).ok(), Some(656));
        assert_eq!(
            layer_block_bytes(&c, 16, KvCacheDtype::Fp8).ok(),
            Some(16 * 656)
        );
        // the fixtures' latent: 32 + 8
        assert_eq!(token_bytes(&cfg(32, 8), KvCacheDtype::Fp8).ok(), Some(64));
        // dims the FP8 kernels cannot hold are refused with the reason
        let e = token_bytes(&cfg(40, 8), KvCacheDtype::Fp8)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("multiple of 16"), "{e}");
    }
}
