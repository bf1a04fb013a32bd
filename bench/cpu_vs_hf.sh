#!/usr/bin/env bash
# CPU decode tokens/s, ours vs Hugging Face transformers, same model, same prompt, same thread
# count, interleaved in one run so both see the same machine load. Needs a release build
# (cargo build --release) and a Python with torch + transformers (PYTHON, default /opt/hfvenv).
# Usage: bench/cpu_vs_hf.sh [MODEL_DIR ...]   (default: the v2 fixture and the tiny model)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-/opt/hfvenv/bin/python}"
THREADS="${THREADS:-2}"
NEW="${NEW_TOKENS:-32}"
ROUNDS="${ROUNDS:-3}"
PROMPT="138,158,33,333,438,211,210"
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  models=(tests/fixtures/models/v2 "$(./target/release/dsv2 generate --input-ids 0 --max-output-len 1 --json >/dev/null 2>&1; echo "${DSV2_CACHE_DIR:-$HOME/.cache/dsv2}/tiny-v1")")
fi
echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
for m in "${models[@]}"; do
  for r in $(seq "$ROUNDS"); do
    "$PY" bench/hf_cpu_decode.py "$m" --prompt-ids "$PROMPT" --new-tokens "$NEW" --threads "$THREADS" --runs 3 | sed "s|^|$m round $r |"
    ./target/release/dsv2 bench --model-dir "$m" --prompt-ids "$PROMPT" --new-tokens "$NEW" --threads "$THREADS" --runs 3 2>/dev/null | sed "s|^|$m round $r |"
  done
done
