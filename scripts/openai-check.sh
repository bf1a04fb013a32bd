#!/usr/bin/env bash
# The router's HTTP API against the official `openai` Python package: tests/openai (pytest)
# starts `dsv2 up` from the built binaries ($DSV2_BIN_DIR, else target/debug) and drives it with
# the SDK. The package comes from scripts/install-ci-tools.sh (.tools/venv; OPENAI_CHECK_VENV
# points at another venv). Exits non-zero on any failure; exits 0 with a SKIPPED line only when
# that venv does not exist at all.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPENAI_CHECK_VENV:-$ROOT/.tools/venv}"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "openai-check: SKIPPED: no venv at $VENV (run scripts/install-ci-tools.sh)"
    exit 0
fi
if ! "$VENV/bin/python" -c "import openai, pytest" 2>/dev/null; then
    echo "openai-check: FAIL: $VENV has no openai/pytest package (run scripts/install-ci-tools.sh)" >&2
    exit 1
fi
echo "openai-check: pytest tests/openai (openai $("$VENV/bin/python" -c 'import openai; print(openai.__version__)'))"
cd "$ROOT" && exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/openai
