#!/usr/bin/env bash
# In-process decode and prefill of DISTINCT prompts against this card's roofline (issue 19):
# `dsv2 bench` on a random real-dims model (PRESET deepseek-v2 with LAYERS, default 4: layer 0
# dense, then MoE; or PRESET=deepseek-v2-lite LAYERS=27), weights drawn on the GPU from SEED
# (`init-random --config-only` + `--random-weights`: no checkpoint files to write or carry).
# One bench per context of CONTEXTS (default "512 4096") over BATCHES (default 1,8,64,256), each
# under LIMIT_S seconds, KV cache blocks of BLOCK_SIZE tokens (default 16, the router's); the
# tables go to stdout, every number to
# $OUT/bench-<preset>-<layers>L-ctx<C>.json and the prompt ids to $OUT/prompts-ctx<C>.txt (for
# bench/hf_cpu_decode.py --prompt-file, which needs a checkpoint with files: dsv2 init-random).
# Build here with scripts/build-gpubin.sh; on the device: BIN=.gpubin bash scripts/gpu-bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.gpubin}"
OUT_DIR="${OUT:-/tmp/dsv2-gpu-bench}"
PRESET="${PRESET:-deepseek-v2}"
LAYERS="${LAYERS:-4}"
BATCHES="${BATCHES:-1,8,64,256}"
CONTEXTS="${CONTEXTS:-512 4096}"
NEW_TOKENS="${NEW_TOKENS:-32}"
SEED="${SEED:-1}"
LIMIT_S="${LIMIT_S:-280}"
mkdir -p "$OUT_DIR"
export DSV2_CACHE_DIR=/tmp/dsv2-cache DSV2_LOG=warn
fail=0
echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $(nvidia-smi -L | head -1)"
dir="/tmp/gb-$PRESET-$LAYERS"
mkdir -p "$dir"
"$BIN/dsv2" init-random --preset "$PRESET" --layers "$LAYERS" --config-only --out "$dir" --seed "$SEED" >/dev/null 2>&1 \
  || { echo "init-random --config-only failed"; exit 1; }
for c in $CONTEXTS; do
  echo "== $PRESET, $LAYERS layers, context $c, batch $BATCHES, $NEW_TOKENS new tokens"
  err="$OUT_DIR/bench-ctx$c.err"
  timeout -k 5 "$LIMIT_S" "$BIN/dsv2" bench --device cuda:0 --model-dir "$dir" --random-weights "$SEED" \
    --batch "$BATCHES" --context "$c" --new-tokens "$NEW_TOKENS" --block-size "${BLOCK_SIZE:-16}" \
    --json "$OUT_DIR/bench-$PRESET-${LAYERS}L-ctx$c.json" --dump-prompts "$OUT_DIR/prompts-ctx$c.txt" 2>"$err"
  rc=$?
  if [ "$rc" -ne 0 ]; then echo "bench at context $c FAILED (exit $rc)"; tail -5 "$err"; fail=1; fi
done
echo "gpu-bench exit status: $fail"
exit $fail
