#!/usr/bin/env bash
# The project's test command (the README's second command; CI runs it through .ci/run).
# Rust tests of every crate (GPU tests skip without a GPU), then the deployment checks
# (skipped with a message when helm has not been installed by scripts/install-ci-tools.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# Cross-process tests start the real binaries: build them first.
cargo build --workspace --bins
cargo test --workspace
bash scripts/helm-check.sh
