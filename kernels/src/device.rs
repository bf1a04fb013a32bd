//! The GPU handle: driver context, one stream, cuBLAS handles, and the loaded kernel modules.
//! Opening it is where a missing driver or device becomes a clear error.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys as cu;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use crate::compile::{self, CompileConfig, CubinSource};
use crate::error::{KernelError, Result};

/// Options for opening a device.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// CUDA device ordinal.
    pub ordinal: usize,
    /// Override for the CUBIN cache directory (`None`: [`compile::default_cache_dir`]).
    pub cache_dir: Option<PathBuf>,
    /// Disable the on-disk cache (always compile).
    pub no_cache: bool,
    /// Override of the CUDA toolkit root (else CUDA_HOME / CUDA_PATH / /usr/local/cuda).
    pub cuda_home: Option<PathBuf>,
}

/// Whether a CUDA driver can be loaded on this machine.
pub fn driver_available() -> bool {
    // SAFETY: only tries dlopen of libcuda candidates; loads no symbols.
    unsafe { cu::is_culib_present() }
}

/// The driver's CUDA API version (e.g. 13000), or an error when there is no driver.
pub fn driver_version() -> Result<i32> {
    if !driver_available() {
        return Err(KernelError::NoDriver(
            "libcuda.so could not be loaded (no NVIDIA driver on this machine)".into(),
        ));
    }
    let mut v = 0i32;
    // SAFETY: the library is present; v is a valid out-pointer.
    let r = unsafe { cu::cuDriverGetVersion(&mut v) };
    if r != cu::CUresult::CUDA_SUCCESS {
        return Err(KernelError::NoDriver(format!(
            "cuDriverGetVersion failed: {r:?}"
        )));
    }
    Ok(v)
}

/// An opened GPU with every kernel module loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    /// The main handle's cuBLAS workspace (declared after `blas` so that it outlives it).
    _blas_workspace: CudaSlice<u8>,
    /// Extra streams and cuBLAS handles for running independent GEMMs side by side (expert FFN).
    pub side: Vec<(Arc<CudaStream>, CudaBlas)>,
    /// The same device and kernels on a stream of their own, with their own cuBLAS handle and
    /// workspace: work that runs beside the main stream's (a MoE layer's shared experts beside
    /// its routed ones), joined to it with events. Every op takes a `&Gpu`, so handing them this
    /// one runs them there unchanged. None on the beside view itself.
    pub beside: Option<Box<Gpu>>,
    functions: HashMap<String, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
    /// Where each module's CUBIN came from, in [`compile::SOURCES`] order.
    pub module_sources: Vec<(String, CubinSource)>,
    pub name: String,
    pub sm_count: usize,
    pub driver_version: i32,
}

/// The main cuBLAS handle's workspace: 32 MiB, what cuBLAS itself takes on Hopper.
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// How many side streams the expert FFN spreads its per-expert GEMMs over.
pub const SIDE_STREAMS: usize = 4;

impl Gpu {
    /// Open device `opts.ordinal`, compile (or load cached) kernels, and create cuBLAS handles.
    pub fn open(opts: &GpuOptions) -> Result<Self> {
        let driver_version = driver_version()?;
        let count = CudaContext::device_count()
            .map_err(|e| KernelError::NoDevice(format!("cuDeviceGetCount failed: {e}")))?;
        if opts.ordinal >= count.max(0) as usize {
            return Err(KernelError::NoDevice(format!(
                "device {} does not exist ({} CUDA device(s) visible)",
                opts.ordinal, count
            )));
        }
        let ctx = CudaContext::new(opts.ordinal)?;
        // SAFETY: called before any allocation or stream exists on this context. We order work
        // ourselves: everything runs on `stream`, and the side streams are joined explicitly with
        // events (see ops::expert), so cudarc's per-buffer event tracking is not needed and would
        // serialise the side streams on shared buffers.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        // SAFETY: only tries dlopen of the cuBLAS candidates; loads no symbols.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(KernelError::NoCublas(
                "libcublas.so / libcublasLt.so could not be loaded".into(),
            ));
        }
        let (blas, blas_workspace) = blas_with_workspace(&stream)?;
        let mut side = Vec::with_capacity(SIDE_STREAMS);
        for _ in 0..SIDE_STREAMS {
            let s = ctx.new_stream()?;
            let b = CudaBlas::new(s.clone())?;
            side.push((s, b));
        }
        let cfg = CompileConfig {
            arch: compile::DEFAULT_ARCH.to_string(),
            include_dir: compile::find_cuda_include(opts.cuda_home.as_deref())?,
            cache_dir: if opts.no_cache {
                None
            } else {
                Some(
                    opts.cache_dir
                        .clone()
                        .unwrap_or_else(compile::default_cache_dir),
                )
            },
            driver_version,
        };
        let mut functions = HashMap::new();
        let mut modules = Vec::new();
        let mut module_sources = Vec::new();
        for (file, src) in compile::SOURCES {
            let (cubin, how) = compile::cubin_for(&cfg, file, src)?;
            let module = ctx.load_module(Ptx::from_binary(cubin))?;
            for name in kernel_names(src) {
                let f = module.load_function(&name)?;
                functions.insert(name, f);
            }
            module_sources.push((file.to_string(), how));
            modules.push(module);
        }
        let name = ctx.name()?;
        let sm_count = ctx
            .attribute(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as usize;
        let beside_stream = ctx.new_stream()?;
        let (beside_blas, beside_workspace) = blas_with_workspace(&beside_stream)?;
        let beside = Gpu {
            ctx: ctx.clone(),
            stream: beside_stream,
            blas: beside_blas,
            _blas_workspace: beside_workspace,
            side: Vec::new(),
            functions: functions.clone(),
            _modules: modules.clone(),
            module_sources: module_sources.clone(),
            name: name.clone(),
            sm_count,
            driver_version,
            beside: None,
        };
        Ok(Self {
            ctx,
            stream,
            blas,
            _blas_workspace: blas_workspace,
            side,
            functions,
            _modules: modules,
            module_sources,
            name,
            sm_count,
            driver_version,
            beside: Some(Box::new(beside)),
        })
    }

    /// A kernel by name.
    pub fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| KernelError::NoKernel(name.to_string()))
    }

    /// Raise a kernel's dynamic shared-memory limit (needed above 48 KiB).
    pub fn set_max_dynamic_smem(&self, name: &str, bytes: usize) -> Result<()> {
        let f = self.function(name)?;
        // SAFETY: f is a live function of a loaded module; the attribute is a plain integer.
        unsafe {
            cudarc::driver::result::function::set_function_attribute(
                f.cu_function(),
                cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )?;
        }
        Ok(())
    }

    /// Zeroed device buffer of n elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros::<T>(n)?)
    }

    /// Wait for all work on the main stream.
    pub fn sync(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
}

/// A cuBLAS handle on `stream` with an explicit workspace: cuBLAS then never allocates during a
/// CUDA graph capture of the decode step (its own default pool is not capture-safe). The
/// workspace must outlive the handle.
fn blas_with_workspace(stream: &Arc<CudaStream>) -> Result<(CudaBlas, CudaSlice<u8>)> {
    let blas = CudaBlas::new(stream.clone())?;
    let workspace = stream.alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)?;
    {
        let (ptr, _sync) = workspace.device_ptr(stream);
        // SAFETY: the handle and the workspace live together in one Gpu (the workspace is
        // dropped after the handle: fields drop in declaration order, blas first); the size is
        // the buffer's.
        let status = unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                ptr as *mut std::ffi::c_void,
                BLAS_WORKSPACE_BYTES,
            )
        };
        if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(KernelError::NoCublas(format!(
                "cublasSetWorkspace failed: {status:?}"
            )));
        }
    }
    Ok((blas, workspace))
}

/// The `extern "C" __global__` kernel names defined in a source text.
pub fn kernel_names(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("extern \"C\" __global__") {
        rest = &rest[i + "extern \"C\" __global__".len()..];
        // the name is the identifier right before the first '(' that does not open
        // __launch_bounds__(...)
        let mut from = 0;
        while let Some(p) = rest[from..].find('(').map(|p| p + from) {
            let head = rest[..p].trim_end();
            let name: String = head
                .chars()
                .rev()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            if name == "__launch_bounds__" {
                from = rest[p..].find(')').map(|q| p + q + 1).unwrap_or(rest.len());
                continue;
            }
            if !name.is_empty() {
                out.push(name);
            }
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_cover_sources() {
        let all: Vec<String> = compile::SOURCES
            .iter()
            .flat_map(|(_, s)| kernel_names(s))
            .collect();
        for k in [
            "embedding_bf16",
            "rmsnorm_bf16",
            "mla_decode_bf16",
            "mla_decode_wgmma_bf16",
            "mla_prefill_wgmma_bf16",
            "sample_f32",
            "moe_gate_f32",
        ] {
            assert!(all.iter().any(|n| n == k), "{k} missing from {all:?}");
        }
        // the launch-bounds attribute between __global__ and the name must not confuse the parser
        assert!(!all.iter().any(|n| n == "__launch_bounds__"));
    }
}
