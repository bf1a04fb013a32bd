//! cuBLAS GEMMs with explicit leading dimensions and batch strides (the kernels crate's wrapper
//! takes contiguous operands only; MLA needs per-head slices of q and of kv_b_proj).

use cudarc::cublas::{result as blas, sys as bsys};
use dsv2_kernels::ops::gemm::GemmOut;
use dsv2_kernels::{Gpu, KernelError};

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

fn i(v: usize, what: &str) -> Result<i32, KernelError> {
    i32::try_from(v).map_err(|_| KernelError::Shape {
        op: "gemm_strided",
        what: format!("{what} = {v} exceeds i32"),
    })
}

/// Runs `g` on the GPU's main stream through its cuBLAS handle.
///
/// The caller guarantees every pointer addresses enough live device memory for the given dims,
/// leading dims and strides (the backend derives them from tensors it allocated or shape-checked).
pub fn gemm<O: GemmOut>(gpu: &Gpu, g: Gemm) -> Result<(), KernelError> {
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
    let (m, n, k) = (i(g.m, "M")?, i(g.n, "N")?, i(g.k, "K")?);
    let (ldw, ldx, ldy) = (i(g.ldw, "ldw")?, i(g.ldx, "ldx")?, i(g.ldy, "ldy")?);
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
                i(g.batch, "batch")?,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
    }
    Ok(())
}
