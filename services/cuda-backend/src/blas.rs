//! The backend's one entry for dense projections: few-row problems through the GEMV kernels
//! (one weight-streaming launch), the rest through cuBLAS with explicit leading dimensions and
//! batch strides (MLA needs per-head slices of q and of kv_b_proj).

use dsv2_kernels::ops::gemm::{GemmOut, cublas_strided};
use dsv2_kernels::ops::gemv;
use dsv2_kernels::{Gpu, KernelError};

pub use dsv2_kernels::ops::gemm::Gemm;

/// Runs `g` on the GPU's main stream (GEMV kernels for <= 8 rows where `gemv::plan` allows,
/// else cuBLAS; `DSV2_GEMV=0` forces cuBLAS).
///
/// The caller guarantees every pointer addresses enough live device memory for the given dims,
/// leading dims and strides (the backend derives them from tensors it allocated or shape-checked).
pub fn gemm<O: GemmOut>(gpu: &Gpu, g: Gemm) -> Result<(), KernelError> {
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return Ok(());
    }
    if let Some(p) = gemv::plan(&g, gpu.sm_count, false) {
        // SAFETY: the caller's contract (above) is the GEMV kernels' contract.
        return unsafe { gemv::gemv::<O>(gpu, &g, p, false) };
    }
    // SAFETY: the caller's contract (above) is cuBLAS's contract.
    unsafe { cublas_strided::<O>(gpu, &g) }
}
