#!/usr/bin/env bash
# The router's TLS, mTLS and token auth against Python `grpcio` (stubs generated from proto/ by
# grpcio-tools at test time) and the standard library's HTTPS client: tests/grpc_python (pytest)
# starts dsv2-router from the built binaries ($DSV2_BIN_DIR, else target/debug). The packages
# come from scripts/install-ci-tools.sh (.tools/venv; GRPCIO_CHECK_VENV points at another venv).
# Exits non-zero on any failure; exits 0 with a SKIPPED line only when that venv does not exist.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GRPCIO_CHECK_VENV:-$ROOT/.tools/venv}"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "grpcio-check: SKIPPED: no venv at $VENV (run scripts/install-ci-tools.sh)"
    exit 0
fi
if ! "$VENV/bin/python" -c "import grpc, grpc_tools, pytest" 2>/dev/null; then
    echo "grpcio-check: FAIL: $VENV has no grpcio/grpcio-tools/pytest (run scripts/install-ci-tools.sh)" >&2
    exit 1
fi
echo "grpcio-check: pytest tests/grpc_python (grpcio $("$VENV/bin/python" -c 'import grpc; print(grpc.__version__)'))"
cd "$ROOT" && exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/grpc_python
