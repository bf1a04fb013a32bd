#!/usr/bin/env python3
"""Compile-checks the CUDA kernel sources with NVRTC on a machine without a GPU.

Why: the device machine's time is scarce; a syntax error or a register spill found here costs
nothing. Needs an NVRTC library and the CUDA headers, e.g. from PyPI:
  python3 -m venv /tmp/nvrtcenv && /tmp/nvrtcenv/bin/pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12
  /tmp/nvrtcenv/bin/python scripts/nvrtc-check.py [file.cu ...]
or, with the device's NVRTC 13 (whose ptxas may warn where 12's does not):
  python3 -m venv /tmp/nvrtc13 && /tmp/nvrtc13/bin/pip install "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*"
Prints ptxas' resource usage (registers, spills, shared memory) per kernel, and any wgmma
serialisation warning ("Potential Performance Loss").
"""
import ctypes
import glob
import os
import sys

try:  # CUDA 12 wheels: one package per library
    import nvidia.cuda_nvrtc as nvrtc_pkg
    import nvidia.cuda_runtime as rt_pkg

    nvrtc_dir = os.path.join(list(nvrtc_pkg.__path__)[0], "lib")
    inc = os.path.join(list(rt_pkg.__path__)[0], "include")
except ImportError:  # CUDA 13 wheels (the device's NVRTC): everything under nvidia/cu13
    import nvidia.cu13 as cu13_pkg

    nvrtc_dir = os.path.join(list(cu13_pkg.__path__)[0], "lib")
    inc = os.path.join(list(cu13_pkg.__path__)[0], "include")
lib = ctypes.CDLL(sorted(glob.glob(os.path.join(nvrtc_dir, "libnvrtc.so.*")))[0])

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels", "src", "cu")
headers = {n: open(os.path.join(root, n), "rb").read() for n in os.listdir(root) if n.endswith(".cuh")}
files = sys.argv[1:] or sorted(glob.glob(os.path.join(root, "*.cu")))
failed = 0
for path in files:
    src = open(path, "rb").read()
    prog = ctypes.c_void_p()
    names = (ctypes.c_char_p * len(headers))(*[k.encode() for k in headers])
    bodies = (ctypes.c_char_p * len(headers))(*headers.values())
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(),
                                  len(headers), bodies, names) == 0
    opts = [b"--gpu-architecture=sm_90a", b"--std=c++17", b"-default-device",
            b"--include-path=" + inc.encode(), b"--ptxas-options=-v", b"-lineinfo"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, buf)
    log = buf.value.decode(errors="replace")
    print(f"== {os.path.basename(path)}: {'ok' if rc == 0 else 'FAILED'}")
    for line in log.splitlines():
        # "Performance Loss": ptxas serialised a kernel's wgmma (C7512 / C7518), a silent slowdown
        if (rc != 0 or "registers" in line or "spill" in line or "Compiling entry" in line
                or "Performance Loss" in line):
            print("  " + line)
    # NVRTC_CUBIN_DIR=dir: keep the cubin, for nvdisasm (where ptxas spilled, what it serialised)
    if rc == 0 and os.environ.get("NVRTC_CUBIN_DIR"):
        size = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        out = os.path.join(os.environ["NVRTC_CUBIN_DIR"], os.path.basename(path) + ".cubin")
        open(out, "wb").write(cubin.raw)
    failed += rc != 0
sys.exit(1 if failed else 0)
