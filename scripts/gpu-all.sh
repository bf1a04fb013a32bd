#!/usr/bin/env bash
# Every GPU script of the repo in one device call on `nvidia-h200-x2` (device time is scarce: one
# machine start instead of four). Sections run in order of importance while the elapsed time
# stays under BUDGET_S (default 540 s; a call may last 600 s); a section that does not fit is
# reported SKIPPED, not silently dropped. Each section writes its own log under $OUT.
# BIN (default .gpubin) holds the stripped release binaries: dsv2 dsv2-router dsv2-expert
# dsv2-gpu-check dsv2-cuda-check nccl-smoke nccl-roundtrip moe-roundtrip (about 40 MB).
set -uo pipefail
cd "$(dirname "$0")/.."
export BIN="${BIN:-.gpubin}"
BUDGET_S="${BUDGET_S:-540}"
t0=$(date +%s)
rc=0
section() {
  local name=$1 used
  shift
  used=$(( $(date +%s) - t0 ))
  if [ "$used" -ge "$BUDGET_S" ]; then
    echo "== SKIPPED $name: $used s of the $BUDGET_S s budget already used"
    rc=1
    return
  fi
  echo "== $name (starting at $used s)"
  "$@" || { echo "== $name FAILED"; rc=1; }
}
echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $(nvidia-smi -L | tr '\n' ' ')"
section "NCCL data plane and --transport nccl vs grpc (scripts/gpu-nccl.sh)" bash scripts/gpu-nccl.sh
section "services on the GPU, kernel checks, P3/P4 (scripts/gpu-e2e.sh)" bash scripts/gpu-e2e.sh
section "full scale on this host, with the 60-layer extrapolation (scripts/full-scale.sh)" bash scripts/full-scale.sh
echo "gpu-all exit status: $rc after $(( $(date +%s) - t0 )) s"
exit $rc
