//! The CUDA backend's ceilings, measured on its own stream with CUDA events: a device-to-device
//! copy of 1 GiB (bytes read + written, the convention of dsv2-gpu-check) and a bf16 8192³ GEMM
//! through the backend's own cuBLAS call (f32 accumulation, as every GEMM of a step).

use cudarc::driver::sys::CUevent_flags;
use half::bf16;

use dsv2_core::backend::Ceilings;
use dsv2_core::error::Result;
use dsv2_kernels::ops::elementwise as ew;
use dsv2_kernels::{Gpu, Tensor};

use crate::blas::{Gemm, gemm};
use crate::{CudaBackend, Kx, err};

/// bf16 elements of the copy: 1 GiB.
const COPY_ELEMS: usize = 1 << 29;
const GEMM_DIM: usize = 8192;
const WARM: usize = 2;
const ITERS: usize = 10;

pub(crate) fn measure(b: &CudaBackend) -> Result<Ceilings> {
    let _g = b.lock()?;
    let gpu = &b.gpu;
    let copy_ms = {
        let src = Tensor::<bf16>::zeros(gpu, &[COPY_ELEMS]).kx()?;
        let mut dst = Tensor::<bf16>::zeros(gpu, &[COPY_ELEMS]).kx()?;
        time_ms(gpu, || {
            gpu.stream
                .memcpy_dtod(src.buf(), dst.buf_mut())
                .map_err(|e| err(format!("ceiling copy: {e}")))
        })?
    };
    let gemm_ms = {
        let s = GEMM_DIM;
        // Random operands: all-zero inputs draw less power and run at higher clocks than a real
        // GEMM does.
        let mut x = Tensor::<bf16>::zeros(gpu, &[s, s]).kx()?;
        let mut w = Tensor::<bf16>::zeros(gpu, &[s, s]).kx()?;
        ew::fill_uniform(gpu, x.view_mut(), 1, 1.0).kx()?;
        ew::fill_uniform(gpu, w.view_mut(), 2, 1.0).kx()?;
        let y = Tensor::<bf16>::uninit(gpu, &[s, s]).kx()?;
        time_ms(gpu, || {
            gemm::<bf16>(gpu, Gemm::xwt(s, s, s, x.ptr(), w.ptr(), y.ptr())).kx()
        })?
    };
    let copy_bytes = COPY_ELEMS * 2;
    Ok(Ceilings {
        copy_bytes_per_s: 2.0 * copy_bytes as f64 / (copy_ms * 1e-3),
        copy_method: format!(
            "cuMemcpyDtoD 1 GiB on {}, read + write, mean of {ITERS} (CUDA events)",
            gpu.name
        ),
        gemm_flops_per_s: 2.0 * (GEMM_DIM as f64).powi(3) / (gemm_ms * 1e-3),
        gemm_method: format!(
            "cuBLAS bf16 {GEMM_DIM}^3 X·Wᵀ, f32 accumulation, on {}, mean of {ITERS} (CUDA events)",
            gpu.name
        ),
        weight_elem_bytes: Some(2),
        // the latent's values: bf16, or e4m3 codes in the FP8 cache (whose rows also carry the
        // bf16 RoPE key and a scale: `token_bytes` counts whole rows)
        cache_elem_bytes: match b.kv_cache_dtype() {
            dsv2_core::backend::KvCacheDtype::Bf16 => 2,
            dsv2_core::backend::KvCacheDtype::Fp8 => 1,
        },
    })
}

/// Mean milliseconds of `f` over [`ITERS`] runs on the backend's stream, after [`WARM`] runs.
fn time_ms(gpu: &Gpu, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..WARM {
        f()?;
    }
    gpu.sync().kx()?;
    let event = || {
        gpu.stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .kx()
    };
    let start = event()?;
    for _ in 0..ITERS {
        f()?;
    }
    let end = event()?;
    end.synchronize().kx()?;
    Ok(start.elapsed_ms(&end).kx()? as f64 / ITERS as f64)
}
