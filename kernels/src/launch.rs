//! Kernel launches with programmatic dependent launch (PDL, Hopper): each of our kernels may be
//! scheduled while the kernel before it on the stream is still finishing, and waits at its first
//! instruction (`griddepcontrol.wait`, see `common.cuh`) until that kernel's memory is visible.
//!
//! Why: a decode step at batch 1 is ~20 small kernels per layer, and each boundary costs the
//! launch latency of the next grid after the previous one has fully drained; PDL lets the next
//! grid launch while the previous one's memory is still being flushed.
//!
//! Off by default (`DSV2_PDL=1` turns it on): measured, it has not paid yet (bench/RESULTS.md,
//! session 8). Safety rule it relies on: every kernel starts with `griddep_wait()` before it reads
//! or writes global memory (checked over the sources by a unit test below), so the overlap never
//! lets a kernel see its predecessor's memory half-written; without the attribute the wait is a
//! no-op.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::OnceLock;

use cudarc::driver::sys as cu;
use cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig};

use crate::device::Gpu;
use crate::error::Result;

fn pdl_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DSV2_PDL").is_ok_and(|v| v == "1"))
}

/// A kernel launch being built on the GPU's main stream: arguments by reference, in the
/// kernel's parameter order.
pub struct Launch<'a> {
    gpu: &'a Gpu,
    func: &'a CudaFunction,
    args: Vec<*mut c_void>,
    cluster_x: u32,
    _args: PhantomData<&'a ()>,
}

impl Gpu {
    /// Starts a launch of `func` on the main stream (see the module docs).
    pub fn launch<'a>(&'a self, func: &'a CudaFunction) -> Launch<'a> {
        Launch {
            gpu: self,
            func,
            args: Vec::new(),
            cluster_x: 1,
            _args: PhantomData,
        }
    }
}

impl<'a> Launch<'a> {
    /// The next kernel argument: a plain value (device pointers are passed as u64).
    pub fn arg<T: DeviceRepr>(&mut self, v: &'a T) -> &mut Self {
        self.args.push(v as *const T as *mut c_void);
        self
    }

    /// Launches the grid in thread block clusters of (x, 1, 1) CTAs (the kernel then may use
    /// distributed shared memory and multicast copies within a cluster). Default 1: no clusters.
    pub fn cluster_x(&mut self, x: u32) -> &mut Self {
        self.cluster_x = x;
        self
    }

    /// Launches the kernel.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameter list in number, order and type, and every
    /// pointer among them must address memory the kernel may access for `cfg`'s grid.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<()> {
        self.gpu.ctx.bind_to_thread()?;
        // SAFETY: a zeroed attribute value is a valid bit pattern for this plain C union.
        let mut attrs: [cu::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
        let mut n = 0;
        if pdl_enabled() {
            attrs[n].id =
                cu::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attrs[n].value.programmaticStreamSerializationAllowed = 1;
            n += 1;
        }
        if self.cluster_x > 1 {
            attrs[n].id = cu::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            attrs[n].value.clusterDim.x = self.cluster_x;
            attrs[n].value.clusterDim.y = 1;
            attrs[n].value.clusterDim.z = 1;
            n += 1;
        }
        let config = cu::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.gpu.stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: n as u32,
        };
        // SAFETY: config and attr live through the call; the argument pointers address values
        // borrowed for 'a (the caller's contract covers their types and what they point to).
        unsafe {
            cu::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                self.args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::compile::SOURCES;

    /// Every exported kernel's body must begin with `griddep_wait();` (the PDL safety rule).
    #[test]
    fn every_kernel_waits_for_its_predecessor_first() {
        for (file, src) in SOURCES {
            let mut rest = *src;
            while let Some(i) = rest.find("extern \"C\" __global__") {
                rest = &rest[i + 1..];
                // the body opens at the first '{' after the parameter list's ')'
                let sig_end = rest.find(')').unwrap();
                let mut depth = 0usize;
                let mut close = sig_end;
                for (j, ch) in rest.char_indices() {
                    match ch {
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 && rest[j + 1..].trim_start().starts_with('{') {
                                close = j;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                let body = rest[close + 1..].trim_start();
                let first = body[1..].trim_start();
                let name: String = rest[..rest.find('(').unwrap()]
                    .split_whitespace()
                    .last()
                    .unwrap_or("?")
                    .to_string();
                assert!(
                    first.starts_with("griddep_wait();"),
                    "{file}: kernel {name} does not start with griddep_wait(): {}",
                    &first[..first.len().min(60)]
                );
            }
        }
    }
}
