//! cuBLAS GEMM in the checkpoint's layout: Y[M, N] = X[M, K] · W[N, K]^T (W row-major [out, in]),
//! bf16 inputs, f32 accumulation, bf16 or f32 output.

use cudarc::cublas::{CudaBlas, result as blas, sys as bsys};
use half::bf16;

use crate::device::Gpu;
use crate::error::{Result, shape_err};
use crate::tensor::{DType, View, ViewMut};

/// Output element types cuBLAS can write for bf16 inputs.
pub trait GemmOut: DType {
    const CUDA: bsys::cudaDataType;
}
impl GemmOut for bf16 {
    const CUDA: bsys::cudaDataType = bsys::cudaDataType::CUDA_R_16BF;
}
impl GemmOut for f32 {
    const CUDA: bsys::cudaDataType = bsys::cudaDataType::CUDA_R_32F;
}

/// x [M, K], w [N, K] (bf16), y [M, N] (bf16 or f32): y = alpha * x·w^T + beta * y.
pub struct GemmParams<'a, O: GemmOut> {
    pub x: View<'a, bf16>,
    pub w: View<'a, bf16>,
    pub y: ViewMut<'a, O>,
    pub alpha: f32,
    pub beta: f32,
}

pub fn gemm<O: GemmOut>(gpu: &Gpu, p: GemmParams<'_, O>) -> Result<()> {
    const OP: &str = "gemm_bf16";
    p.x.expect(OP, "x", &[None, None])?;
    let (m, k) = (p.x.shape()[0], p.x.shape()[1]);
    p.w.expect(OP, "w", &[None, Some(k)])?;
    let n = p.w.shape()[0];
    p.y.expect(OP, "y", &[Some(m), Some(n)])?;
    // SAFETY: pointers shape-checked above and alive for the borrows; handle bound to gpu.stream.
    unsafe {
        gemm_raw::<O>(
            &gpu.blas,
            m,
            n,
            k,
            p.x.ptr(),
            p.w.ptr(),
            p.y.ptr(),
            p.alpha,
            p.beta,
        )
    }
}

/// Raw Y = X·W^T on one handle's stream.
///
/// # Safety
/// x, w, y must point to at least m*k, n*k and m*n live elements (bf16, bf16, O), contiguous
/// row-major, and stay valid until the GEMM has run on `handle`'s stream.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_raw<O: GemmOut>(
    handle: &CudaBlas,
    m: usize,
    n: usize,
    k: usize,
    x: u64,
    w: u64,
    y: u64,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    const OP: &str = "gemm_bf16";
    if m == 0 || n == 0 {
        return Ok(());
    }
    let to_i = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| shape_err(OP, format!("{what} = {v} exceeds i32")))
    };
    let (mi, ni, ki) = (to_i(m, "M")?, to_i(n, "N")?, to_i(k, "K")?);
    // Column-major view: Y^T [N, M] = W [N, K] (stored as K x N col-major, so op = T) · X^T
    // (X row-major [M, K] is K x M col-major, op = N).
    // SAFETY: forwarded from the caller's contract; alpha/beta are f32 as COMPUTE_32F requires.
    unsafe {
        blas::gemm_ex(
            *handle.handle(),
            bsys::cublasOperation_t::CUBLAS_OP_T,
            bsys::cublasOperation_t::CUBLAS_OP_N,
            ni,
            mi,
            ki,
            (&alpha) as *const f32 as *const _,
            w as *const _,
            bsys::cudaDataType::CUDA_R_16BF,
            ki,
            x as *const _,
            bsys::cudaDataType::CUDA_R_16BF,
            ki,
            (&beta) as *const f32 as *const _,
            y as *mut _,
            O::CUDA,
            ni,
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )?;
    }
    Ok(())
}
