//! Kernel launches with programmatic dependent launch (PDL, Hopper): each of our kernels may be
//! scheduled while the kernel before it on the stream is still finishing, and waits
//! (`griddep_wait()`, `griddepcontrol.wait`, see `common.cuh`) until that kernel's memory is
//! visible before it reads its inputs.
//!
//! Why: a decode step at batch 1 is ~11 small kernels per layer, and each boundary costs the
//! launch and ramp of the next grid after the previous one has fully drained. With PDL the
//! weight-streaming kernels (GEMV, the small-batch experts, the gate, the combine + W_UV) issue
//! their first weight loads before the wait, and their predecessors let them launch
//! (`griddep_launch_dependents()`) once their own main loop is done, so those loads overlap the
//! previous kernel's tail.
//!
//! Off by default (`DSV2_PDL=1` turns it on) until measured with the preloads (session 8
//! measured it without them: no gain, and an early trigger in every kernel cost V2-Lite's batch 1
//! 16 %, bench/RESULTS.md). The rules (`common.cuh`): nothing but weights, or what a kernel two
//! launches back wrote, is read before the wait, nothing is written before it, and the trigger
//! comes after the wait; the ordering part is checked over the sources by a unit test below.
//! Without the attribute the wait and the trigger are no-ops.

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

    /// The exported kernels of `src` as (name, body text between the braces).
    fn kernels(src: &str) -> Vec<(String, &str)> {
        let mut out = Vec::new();
        let mut rest = src;
        while let Some(i) = rest.find("extern \"C\" __global__") {
            rest = &rest[i + 1..];
            let name: String = rest[..rest.find('(').unwrap()]
                .split_whitespace()
                .last()
                .unwrap_or("?")
                .to_string();
            out.push((name, body_after_params(rest)));
        }
        out
    }

    /// The body of the function whose signature starts `rest`: from the '{' after the parameter
    /// list's ')' to its matching '}'.
    fn body_after_params(rest: &str) -> &str {
        let mut depth = 0usize;
        let mut close = 0;
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
        let open = close + rest[close..].find('{').unwrap();
        let mut depth = 0usize;
        for (j, ch) in rest[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return &rest[open + 1..open + j];
                    }
                }
                _ => {}
            }
        }
        panic!("unbalanced braces")
    }

    /// The PDL ordering rules (common.cuh): every kernel waits for its predecessor
    /// (`griddep_wait();` in its body, or in the device helper its body starts with), and a
    /// trigger (`griddep_launch_dependents();`) comes only after that wait.
    fn check_order(file: &str, name: &str, body: &str) {
        let wait = body.find("griddep_wait();");
        let trigger = body.find("griddep_launch_dependents();");
        match (wait, trigger) {
            (Some(w), Some(t)) => assert!(
                t > w,
                "{file}: {name} triggers its dependents before its wait"
            ),
            (Some(_), None) => {}
            (None, Some(_)) => panic!("{file}: {name} triggers its dependents and never waits"),
            (None, None) => panic!("{file}: {name} never calls griddep_wait()"),
        }
    }

    #[test]
    fn every_kernel_waits_for_its_predecessor_before_triggering_its_dependents() {
        let mut checked = 0;
        for (file, src) in SOURCES {
            for (name, body) in kernels(src) {
                let first = body.trim_start();
                if first.starts_with("griddep_wait();") || body.contains("griddep_wait();") {
                    check_order(file, &name, body);
                } else {
                    // a kernel that is one call of a device helper: the helper keeps the rules
                    let helper = first[..first.find(['<', '(']).unwrap_or(0)].trim();
                    assert!(!helper.is_empty(), "{file}: {name} has no griddep_wait()");
                    let def = src
                        .find(&format!(" {helper}("))
                        .filter(|&i| src[..i].contains("__device__"))
                        .unwrap_or_else(|| panic!("{file}: {name}: no definition of {helper}"));
                    check_order(
                        file,
                        &format!("{name} (in {helper})"),
                        body_after_params(&src[def..]),
                    );
                }
                checked += 1;
            }
        }
        assert!(checked > 50, "only {checked} kernels found");
    }

    /// The checker catches a kernel that triggers before it waits, or never waits.
    #[test]
    fn the_order_check_fails_on_bad_kernels() {
        let bad = [
            "extern \"C\" __global__ void k(int a) { griddep_launch_dependents(); griddep_wait(); }",
            "extern \"C\" __global__ void k(int a) { int b = a; }",
        ];
        for src in bad {
            let (name, body) = kernels(src).pop().unwrap();
            assert!(
                std::panic::catch_unwind(|| check_order("t", &name, body)).is_err(),
                "{src}"
            );
        }
        let good = "extern \"C\" __global__ void k(int a) { int w = a; griddep_wait(); griddep_launch_dependents(); }";
        let (name, body) = kernels(good).pop().unwrap();
        check_order("t", &name, body);
    }
}
