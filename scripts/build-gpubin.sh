#!/usr/bin/env bash
# Builds (release) and strips everything the GPU scripts run into BIN (default .gpubin, ignored
# by git), for one `run` call with carry [".gpubin"] (the carry limit is 64 MiB; stripped, this is
# about 45 MB). Then on the GPU host: BIN=.gpubin bash scripts/gpu-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.gpubin}"
BINS=(dsv2 dsv2-router dsv2-expert dsv2-gpu-check dsv2-cuda-check nccl-smoke nccl-roundtrip moe-roundtrip)
cargo build --release --workspace --bins
# the dsv2-nccl crate's GPU tests (protocol, slots, dead shard) as one binary
two_ranks=$(cargo test --release -p dsv2-nccl --test two_ranks --no-run 2>&1 \
  | sed -n 's/.*Executable .*(\(.*two_ranks-[0-9a-f]*\)).*/\1/p' | tail -1)
[ -n "$two_ranks" ] || { echo "could not find the two_ranks test binary"; exit 1; }
mkdir -p "$BIN"
for b in "${BINS[@]}"; do strip --strip-all -o "$BIN/$b" "target/release/$b"; done
strip --strip-all -o "$BIN/nccl-two-ranks" "$two_ranks"
# which tree the binaries are (gpu-decode.sh prints it; "+dirty" when uncommitted changes went in)
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . || echo +dirty)" > "$BIN/COMMIT"
du -sh "$BIN"
