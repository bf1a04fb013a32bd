#!/usr/bin/env bash
# Runs the prebuilt GPU checks on the GPU host (no Rust there: build here with
# `cargo build --release -p dsv2-kernels` and carry target/release/dsv2-gpu-check).
# Output is teed to $OUT/gpu-check.log when $OUT is set. Extra arguments go to dsv2-gpu-check.
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
exit "$rc"
