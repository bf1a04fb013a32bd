//! NVRTC compilation of the embedded `cu/*.cu` sources to CUBIN for one architecture, with an
//! on-disk cache keyed by sha256(source + headers + flags) + arch + driver + NVRTC version.

use std::ffi::{CStr, CString, c_char, c_int};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{KernelError, Result};
use cudarc::nvrtc::sys as nvrtc;

/// Shared headers, made available to every program under their file names.
pub const HEADERS: &[(&str, &str)] = &[
    ("common.cuh", include_str!("cu/common.cuh")),
    ("mma.cuh", include_str!("cu/mma.cuh")),
    ("wgmma.cuh", include_str!("cu/wgmma.cuh")),
    ("tma.cuh", include_str!("cu/tma.cuh")),
    ("mla_common.cuh", include_str!("cu/mla_common.cuh")),
    ("mla_tma.cuh", include_str!("cu/mla_tma.cuh")),
    ("mla_prefill.cuh", include_str!("cu/mla_prefill.cuh")),
];

/// The kernel sources: (file name, text). Each becomes one CUDA module.
pub const SOURCES: &[(&str, &str)] = &[
    ("elementwise.cu", include_str!("cu/elementwise.cu")),
    ("moe.cu", include_str!("cu/moe.cu")),
    ("mla.cu", include_str!("cu/mla.cu")),
    ("mla_seesaw.cu", include_str!("cu/mla_seesaw.cu")),
    ("mla_tma.cu", include_str!("cu/mla_tma.cu")),
    ("mla_roles.cu", include_str!("cu/mla_roles.cu")),
    ("mla_fp8.cu", include_str!("cu/mla_fp8.cu")),
    ("mla_fp8_regs.cu", include_str!("cu/mla_fp8_regs.cu")),
    ("mla_narrow.cu", include_str!("cu/mla_narrow.cu")),
    ("sample.cu", include_str!("cu/sample.cu")),
    ("general.cu", include_str!("cu/general.cu")),
    ("mla_prefill.cu", include_str!("cu/mla_prefill.cu")),
    ("mla_prefill_ws.cu", include_str!("cu/mla_prefill_ws.cu")),
    ("grouped.cu", include_str!("cu/grouped.cu")),
    ("gemv.cu", include_str!("cu/gemv.cu")),
    ("probe.cu", include_str!("cu/probe.cu")),
];

/// The architecture we build for: Hopper with its arch-specific features (wgmma, setmaxnreg).
pub const DEFAULT_ARCH: &str = "sm_90a";

/// Where to find the CUDA headers: `$CUDA_HOME/include`, `$CUDA_PATH/include`, then
/// `/usr/local/cuda/include`; the first that holds `cuda_bf16.h` wins.
pub fn find_cuda_include(cuda_home: Option<&Path>) -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(h) = cuda_home {
        candidates.push(h.join("include"));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            candidates.push(PathBuf::from(v).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    for c in &candidates {
        if c.join("cuda_bf16.h").is_file() {
            return Ok(c.clone());
        }
    }
    Err(KernelError::NoCudaInclude {
        searched: candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Default cache directory: `$XDG_CACHE_HOME/dsv2/cubin`, else `~/.cache/dsv2/cubin`, else a
/// folder under the system temp dir.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("dsv2").join("cubin");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".cache").join("dsv2").join("cubin");
    }
    std::env::temp_dir().join("dsv2-cubin")
}

/// Whether libnvrtc can be loaded (cudarc's dynamic loader panics on first use otherwise).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries dlopen on the candidate names; loads no symbols.
    unsafe { nvrtc::is_culib_present() }
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(KernelError::NoNvrtc(
            "libnvrtc.so could not be loaded (is the CUDA toolkit's lib64 on the loader path?)"
                .into(),
        ));
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: the library is present (checked above); both out-pointers are valid locals.
    let r = unsafe { nvrtc::nvrtcVersion(&mut major, &mut minor) };
    nvrtc_ok(r, "nvrtcVersion")?;
    Ok((major, minor))
}

fn nvrtc_ok(r: nvrtc::nvrtcResult, what: &'static str) -> Result<()> {
    if r == nvrtc::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(KernelError::Nvrtc {
            what,
            code: format!("{r:?}"),
        })
    }
}

/// How kernels get compiled: target arch, include dir, cache dir, and the driver version that
/// enters the cache key (0 when compiling without a driver).
#[derive(Debug, Clone)]
pub struct CompileConfig {
    pub arch: String,
    pub include_dir: PathBuf,
    pub cache_dir: Option<PathBuf>,
    pub driver_version: i32,
}

impl CompileConfig {
    /// The NVRTC options for this config.
    pub fn options(&self) -> Vec<String> {
        vec![
            format!("--gpu-architecture={}", self.arch),
            format!("--include-path={}", self.include_dir.display()),
            "--std=c++17".into(),
            "--device-as-default-execution-space".into(),
            "-lineinfo".into(),
        ]
    }
}

/// Where a module's CUBIN came from (reported by the check binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CubinSource {
    Cache,
    Compiled,
}

/// The cache key file name for one source under one config.
pub fn cache_file_name(cfg: &CompileConfig, file: &str, src: &str, nvrtc: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(src.as_bytes());
    for (name, text) in HEADERS {
        h.update(name.as_bytes());
        h.update(text.as_bytes());
    }
    for o in cfg.options() {
        // the include dir path itself does not change the code; its headers' version is covered
        // by the NVRTC version in the name
        if !o.starts_with("--include-path") {
            h.update(o.as_bytes());
        }
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let stem = file.trim_end_matches(".cu");
    format!(
        "{stem}-{}-drv{}-nvrtc{}.{}-{}.cubin",
        cfg.arch, cfg.driver_version, nvrtc.0, nvrtc.1, hex
    )
}

/// Compile one source to CUBIN, or read it from the cache.
pub fn cubin_for(cfg: &CompileConfig, file: &str, src: &str) -> Result<(Vec<u8>, CubinSource)> {
    let ver = nvrtc_version()?;
    let path = cfg
        .cache_dir
        .as_ref()
        .map(|d| d.join(cache_file_name(cfg, file, src, ver)));
    if let Some(p) = &path
        && let Ok(bytes) = std::fs::read(p)
        && !bytes.is_empty()
    {
        return Ok((bytes, CubinSource::Cache));
    }
    let cubin = compile_cubin(cfg, file, src)?;
    if let Some(p) = &path {
        write_atomic(p, &cubin)?;
    }
    Ok((cubin, CubinSource::Compiled))
}

/// Write via a unique temp file in the same directory, then rename: readers never see a partial
/// CUBIN, and concurrent writers of the same key both leave a complete file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| KernelError::Cache {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("cubin"),
        std::process::id(),
        nanos
    ));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

/// Owns an nvrtcProgram and destroys it on every exit path.
struct Program(nvrtc::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: self.0 came from a successful nvrtcCreateProgram and is destroyed exactly once.
        unsafe {
            let _ = nvrtc::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

/// Run NVRTC on one source and return the CUBIN (raw, without touching the cache).
pub fn compile_cubin(cfg: &CompileConfig, file: &str, src: &str) -> Result<Vec<u8>> {
    nvrtc_version()?; // loads the library or fails cleanly
    let cstr = |s: &str, what: &'static str| {
        CString::new(s).map_err(|_| KernelError::Nvrtc {
            what,
            code: "interior NUL byte".into(),
        })
    };
    let c_src = cstr(src, "source text")?;
    let c_name = cstr(file, "file name")?;
    let h_src: Vec<CString> = HEADERS
        .iter()
        .map(|(_, t)| cstr(t, "header text"))
        .collect::<Result<_>>()?;
    let h_name: Vec<CString> = HEADERS
        .iter()
        .map(|(n, _)| cstr(n, "header name"))
        .collect::<Result<_>>()?;
    let h_src_p: Vec<*const c_char> = h_src.iter().map(|c| c.as_ptr()).collect();
    let h_name_p: Vec<*const c_char> = h_name.iter().map(|c| c.as_ptr()).collect();
    let mut prog: nvrtc::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer refers to a NUL-terminated CString alive for this whole function; the
    // header arrays both have HEADERS.len() entries.
    let r = unsafe {
        nvrtc::nvrtcCreateProgram(
            &mut prog,
            c_src.as_ptr(),
            c_name.as_ptr(),
            HEADERS.len() as c_int,
            h_src_p.as_ptr(),
            h_name_p.as_ptr(),
        )
    };
    nvrtc_ok(r, "nvrtcCreateProgram")?;
    let prog = Program(prog);
    let opts = cfg.options();
    let c_opts: Vec<CString> = opts
        .iter()
        .map(|o| cstr(o, "option"))
        .collect::<Result<_>>()?;
    let c_opts_p: Vec<*const c_char> = c_opts.iter().map(|c| c.as_ptr()).collect();
    // SAFETY: prog is a live program; the option pointers stay valid during the call.
    let r =
        unsafe { nvrtc::nvrtcCompileProgram(prog.0, c_opts_p.len() as c_int, c_opts_p.as_ptr()) };
    if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
        return Err(KernelError::Compile {
            file: file.to_string(),
            options: opts.join(" "),
            log: program_log(&prog).unwrap_or_else(|e| format!("(no log: {e})")),
        });
    }
    let mut size = 0usize;
    // SAFETY: prog compiled successfully; size is a valid out-pointer.
    nvrtc_ok(
        unsafe { nvrtc::nvrtcGetCUBINSize(prog.0, &mut size) },
        "nvrtcGetCUBINSize",
    )?;
    if size == 0 {
        return Err(KernelError::Nvrtc {
            what: "nvrtcGetCUBIN",
            code: format!(
                "empty CUBIN for {} (is {} a real sm_ target?)",
                file, cfg.arch
            ),
        });
    }
    let mut buf = vec![0u8; size];
    // SAFETY: buf has exactly the size NVRTC reported.
    nvrtc_ok(
        unsafe { nvrtc::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr() as *mut c_char) },
        "nvrtcGetCUBIN",
    )?;
    Ok(buf)
}

fn program_log(prog: &Program) -> Result<String> {
    let mut size = 0usize;
    // SAFETY: prog is live; size is a valid out-pointer.
    nvrtc_ok(
        unsafe { nvrtc::nvrtcGetProgramLogSize(prog.0, &mut size) },
        "nvrtcGetProgramLogSize",
    )?;
    let mut buf = vec![0 as c_char; size.max(1)];
    // SAFETY: buf holds at least the reported size.
    nvrtc_ok(
        unsafe { nvrtc::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr()) },
        "nvrtcGetProgramLog",
    )?;
    // SAFETY: NVRTC NUL-terminates the log inside the reported size.
    let s = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Ok(s.to_string_lossy().into_owned())
}
