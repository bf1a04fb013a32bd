#!/usr/bin/env bash
# Runs the prebuilt GPU checks on the GPU host (no Rust there: build here with
# `cargo build --release -p dsv2-kernels -p dsv2-cuda-backend` and carry
# target/release/dsv2-gpu-check and target/release/dsv2-cuda-check).
# Output is teed to $OUT/gpu-check.log when $OUT is set. Extra arguments go to dsv2-gpu-check.
# dsv2-cuda-check (the full model on the golden fixtures vs HF and CPU) runs after it when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-/tmp/dsv2-gpu-check}"
mkdir -p "$OUT_DIR"
BIN=target/release/dsv2-gpu-check
if [ ! -x "$BIN" ]; then
    echo "missing $BIN: build it first with cargo build --release -p dsv2-kernels" >&2
    exit 2
fi
{
    echo "== $(date -u +%FT%TZ) $(hostname) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || true
} | tee "$OUT_DIR/gpu-check.log"
rc=0
"$BIN" --cache-dir "${DSV2_CUBIN_CACHE:-/tmp/dsv2-cubin}" "$@" 2>&1 | tee -a "$OUT_DIR/gpu-check.log" || rc=$?
echo "dsv2-gpu-check exit status: $rc" | tee -a "$OUT_DIR/gpu-check.log"
CUDA_CHECK=target/release/dsv2-cuda-check
if [ -x "$CUDA_CHECK" ]; then
    rc2=0
    "$CUDA_CHECK" --cache-dir "${DSV2_CUBIN_CACHE:-/tmp/dsv2-cubin}" 2>&1 | tee -a "$OUT_DIR/gpu-check.log" || rc2=$?
    echo "dsv2-cuda-check exit status: $rc2" | tee -a "$OUT_DIR/gpu-check.log"
    [ "$rc" -eq 0 ] && rc=$rc2
else
    echo "missing $CUDA_CHECK: build it with cargo build --release -p dsv2-cuda-backend" | tee -a "$OUT_DIR/gpu-check.log"
    [ "$rc" -eq 0 ] && rc=2
fi
exit "$rc"
