//! The crate's one error type: driver/NVRTC/cuBLAS failures, missing CUDA pieces, and launcher
//! argument checks (shape, dtype, contiguity).

use std::path::PathBuf;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// libcuda could not be loaded: the machine has no NVIDIA driver.
    #[error("no CUDA driver found: {0}")]
    NoDriver(String),
    /// The driver is there but the requested device is not.
    #[error("--device cuda requested but {0}")]
    NoDevice(String),
    /// NVRTC (the runtime compiler library) could not be loaded.
    #[error("no NVRTC library found: {0}")]
    NoNvrtc(String),
    /// cuBLAS could not be loaded.
    #[error("no cuBLAS library found: {0}")]
    NoCublas(String),
    /// The CUDA headers (cuda_bf16.h) were not found.
    #[error(
        "CUDA include directory not found (looked in: {searched}); set CUDA_HOME or install the CUDA toolkit headers"
    )]
    NoCudaInclude { searched: String },
    /// A CUDA driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// A cuBLAS call failed.
    #[error("cuBLAS error: {0:?}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
    /// An NVRTC call failed outside compilation proper.
    #[error("NVRTC error in {what}: {code}")]
    Nvrtc { what: &'static str, code: String },
    /// NVRTC rejected a source file.
    #[error("NVRTC failed to compile {file} ({options}):\n{log}")]
    Compile {
        file: String,
        options: String,
        log: String,
    },
    /// The on-disk CUBIN cache could not be read or written.
    #[error("CUBIN cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A kernel name was asked for that no compiled module exports.
    #[error("kernel {0} not found in any module")]
    NoKernel(String),
    /// A tensor handed to a launcher has the wrong shape.
    #[error("{op}: {what}")]
    Shape { op: &'static str, what: String },
    /// A launcher needs a contiguous tensor and got a strided view.
    #[error("{op}: tensor {tensor} must be contiguous (shape {shape:?}, strides {strides:?})")]
    NotContiguous {
        op: &'static str,
        tensor: &'static str,
        shape: Vec<usize>,
        strides: Vec<usize>,
    },
    /// A launcher got an argument value outside what the kernel supports.
    #[error("{op}: {what}")]
    Unsupported { op: &'static str, what: String },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, KernelError>;

/// Shorthand for shape errors in launchers.
pub(crate) fn shape_err(op: &'static str, what: impl Into<String>) -> KernelError {
    KernelError::Shape {
        op,
        what: what.into(),
    }
}
