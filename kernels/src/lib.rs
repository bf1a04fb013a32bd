//! dsv2-kernels: CUDA kernels for DeepSeek-V2 (NVRTC-compiled to cached CUBINs for sm_90a) and
//! their typed launchers on cudarc, plus plain-Rust f32 references and the GPU check harness.
//! Builds and links without any CUDA installed (cudarc loads libcuda/NVRTC/cuBLAS at run time).

pub mod check;
pub mod compile;
pub mod device;
pub mod error;
pub mod fp8;
pub mod launch;
pub mod ops;
pub mod reference;
pub mod rope;
pub mod tensor;

pub use device::{Gpu, GpuOptions};
pub use error::{KernelError, Result};
pub use tensor::{DType, Tensor, View, ViewMut};
