#!/usr/bin/env bash
# The project's test command (the README's second command; CI runs it through .ci/run).
# Rust tests of every crate (GPU tests skip without a GPU), the HTTP API against the openai
# Python package, TLS and auth against Python grpcio, then the deployment checks (the Python
# and deployment checks are skipped with a message when scripts/install-ci-tools.sh has not
# installed their tools).
set -euo pipefail
cd "$(dirname "$0")/.."
# Cross-process tests start the real binaries: build them first.
cargo build --workspace --bins
# deploy/Dockerfile's cargo commands resolve (packages, bins, features, --locked) and build.
python3 scripts/dockerfile-check.py
cargo test --workspace
bash scripts/openai-check.sh
bash scripts/grpcio-check.sh
bash scripts/helm-check.sh
