#!/usr/bin/env bash
# CPU decode tokens/s, ours vs Hugging Face transformers, same model, same prompt (dsv2 bench's
# seeded random ids, which bench/prompts.py draws identically for HF), same thread count,
# interleaved in one run so both see the same machine load. Batch 1. Needs a release build
# (cargo build --release) and a Python with torch + transformers (PYTHON, default /opt/hfvenv).
# Usage: bench/cpu_vs_hf.sh [MODEL_DIR ...]   (default: the v2 fixture and the tiny model)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-/opt/hfvenv/bin/python}"
THREADS="${THREADS:-2}"
NEW="${NEW_TOKENS:-32}"
ROUNDS="${ROUNDS:-3}"
PROMPT_LEN="${PROMPT_LEN:-7}"
SEED="${SEED:-0}"
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  models=(tests/fixtures/models/v2 "$(./target/release/dsv2 generate --input-ids 0 --max-output-len 1 --json >/dev/null 2>&1; echo "${DSV2_CACHE_DIR:-$HOME/.cache/dsv2}/tiny-v1")")
fi
echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
for m in "${models[@]}"; do
  for r in $(seq "$ROUNDS"); do
    "$PY" bench/hf_cpu_decode.py "$m" --seed "$SEED" --prompt-len "$PROMPT_LEN" --new-tokens "$NEW" --threads "$THREADS" --runs 3 | sed "s|^|$m round $r |"
    # dsv2's JSON reduced to the HF script's keys (the whole report: dsv2 bench --json FILE)
    ./target/release/dsv2 bench --model-dir "$m" --batch 1 --seed "$SEED" --context "$PROMPT_LEN" --new-tokens "$NEW" --threads "$THREADS" --runs 3 --json - 2>/dev/null \
      | "$PY" -c 'import json,sys; r=json.load(sys.stdin)["results"][0]; print(json.dumps({"impl": "dsv2", "tokens_per_s": r["decode"]["tokens_per_s"], "batch": r["batch"], "prompt_tokens": r["prompt_tokens"], "x_roofline": r["decode"]["measured_over_roofline"], "output_ids": r["output_ids_seq0"]}))' \
      | sed "s|^|$m round $r |"
  done
done
