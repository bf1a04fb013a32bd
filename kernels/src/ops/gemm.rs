//! cuBLAS GEMM in the checkpoint's layout: Y[M, N] = X[M, K] · W[N, K]^T (W row-major [out, in]),
//! bf16 inputs, f32 accumulation, bf16 or f32 output.

use cudarc::cublas::{CudaBlas, result as blas, sys as bsys};
use half::bf16;

use crate::device::Gpu;
use crate::error::{KernelError, Result, shape_err};
use crate::tensor::{DType, View, ViewMut};

/// Output element types cuBLAS (and the GEMV kernels) can write for bf16 inputs.
pub trait GemmOut: DType {
    const CUDA: bsys::cudaDataType;
    /// Suffix of the GEMV kernel names writing this type.
    const KERNEL_SUFFIX: &'static str;
}
impl GemmOut for bf16 {
    const CUDA: bsys::cudaDataType = bsys::cudaDataType::CUDA_R_16BF;
    const KERNEL_SUFFIX: &'static str = "bf16";
}
impl GemmOut for f32 {
    const CUDA: bsys::cudaDataType = bsys::cudaDataType::CUDA_R_32F;
    const KERNEL_SUFFIX: &'static str = "f32";
}

/// Row-major `Y[M, N] = X[M, K] · op(W)` for `batch` independent problems, all bf16 inputs,
/// f32 accumulation. `w_nk`: W is stored [N, K] (a checkpoint `weight`, op = transpose); else
/// [K, N]. Leading dims are row strides in elements; `s*` are batch strides in elements;
/// pointers are device addresses.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub x: u64,
    pub ldx: usize,
    pub sx: usize,
    pub w: u64,
    pub ldw: usize,
    pub sw: usize,
    pub w_nk: bool,
    pub y: u64,
    pub ldy: usize,
    pub sy: usize,
    pub batch: usize,
}

impl Gemm {
    /// Contiguous `Y = X · Wᵀ` with W [N, K].
    pub fn xwt(m: usize, n: usize, k: usize, x: u64, w: u64, y: u64) -> Self {
        Gemm {
            m,
            n,
            k,
            x,
            ldx: k,
            sx: 0,
            w,
            ldw: k,
            sw: 0,
            w_nk: true,
            y,
            ldy: n,
            sy: 0,
            batch: 1,
        }
    }
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

fn i32_dim(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| KernelError::Shape {
        op: "gemm_strided",
        what: format!("{what} = {v} exceeds i32"),
    })
}

/// Runs `g` through cuBLAS on the GPU's main stream (strided-batched when `batch` > 1).
///
/// # Safety
/// Every pointer must address enough live device memory for the given dims, leading dims and
/// strides, and stay valid until the GEMM has run.
pub unsafe fn cublas_strided<O: GemmOut>(gpu: &Gpu, g: &Gemm) -> Result<()> {
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return Ok(());
    }
    let (alpha, beta) = (1f32, 0f32);
    // Column-major view: Yᵀ [N, M] = op(W)ᵀ · Xᵀ. W [N, K] row-major is K x N col-major (op T);
    // W [K, N] row-major is N x K col-major (op N). X row-major [M, K] is K x M col-major (op N).
    let opw = if g.w_nk {
        bsys::cublasOperation_t::CUBLAS_OP_T
    } else {
        bsys::cublasOperation_t::CUBLAS_OP_N
    };
    let (m, n, k) = (i32_dim(g.m, "M")?, i32_dim(g.n, "N")?, i32_dim(g.k, "K")?);
    let (ldw, ldx, ldy) = (
        i32_dim(g.ldw, "ldw")?,
        i32_dim(g.ldx, "ldx")?,
        i32_dim(g.ldy, "ldy")?,
    );
    let handle = *gpu.blas.handle();
    // SAFETY: the caller's contract (above); alpha/beta are f32 as COMPUTE_32F requires, and the
    // handle is bound to gpu.stream, which orders this GEMM after the producers of X and W.
    unsafe {
        if g.batch == 1 {
            blas::gemm_ex(
                handle,
                opw,
                bsys::cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                (&alpha) as *const f32 as *const _,
                g.w as *const _,
                bsys::cudaDataType::CUDA_R_16BF,
                ldw,
                g.x as *const _,
                bsys::cudaDataType::CUDA_R_16BF,
                ldx,
                (&beta) as *const f32 as *const _,
                g.y as *mut _,
                O::CUDA,
                ldy,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        } else {
            blas::gemm_strided_batched_ex(
                handle,
                opw,
                bsys::cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                (&alpha) as *const f32 as *const _,
                g.w as *const _,
                bsys::cudaDataType::CUDA_R_16BF,
                ldw,
                g.sw as i64,
                g.x as *const _,
                bsys::cudaDataType::CUDA_R_16BF,
                ldx,
                g.sx as i64,
                (&beta) as *const f32 as *const _,
                g.y as *mut _,
                O::CUDA,
                ldy,
                g.sy as i64,
                i32_dim(g.batch, "batch")?,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
    }
    Ok(())
}
