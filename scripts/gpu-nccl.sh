#!/usr/bin/env bash
# Issue 5 on an `nvidia-h200-x2` host, in one call: the NCCL data plane (smoke + timed round
# trip), the gRPC round trip on the same GPUs for comparison, then router (cuda:0) + one expert
# shard (cuda:1) over --transport nccl against the same pair over --transport grpc: greedy ids,
# generated-token logprobs and prompt logprobs must be identical, on every golden fixture and on
# a real-dims DeepSeek-V2 with random weights drawn on the GPUs (LAYERS layers, default 3).
# A third pair runs the decode slots (DSV2_NCCL_SLOTS=4, blocking communicator) and must equal
# gRPC too. Build here: cargo build --release --workspace; carry the stripped binaries (BIN,
# default .gpubin): dsv2 dsv2-router dsv2-expert nccl-smoke nccl-roundtrip moe-roundtrip, and
# nccl-two-ranks (the dsv2-nccl crate's GPU test binary, `cargo test --release -p dsv2-nccl
# --test two_ranks --no-run` prints its path).
# Log: $OUT/gpu-nccl.log. Exit status: 0 when every check passed.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.gpubin}"
OUT_DIR="${OUT:-/tmp/dsv2-gpu-nccl}"
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu-nccl.log") 2>&1
# NVLink multicast must stay off on these hosts.
export NCCL_NVLS_ENABLE=0 DSV2_CACHE_DIR=/tmp/dsv2-cache DSV2_LOG=warn
PY="${PYTHON:-python3}"
LAYERS="${LAYERS:-3}"
EXTRA=()  # extra args for every router and expert of `compare` (random weights in step 5)
fail=0
echo "== $(date -u +%FT%TZ) $(nvidia-smi -L | tr '\n' ' ')"

echo "== 1. nccl-smoke (shard as a second process, channels connected up front)"
timeout -k 5 60 "$BIN/nccl-smoke" || { echo "nccl-smoke FAILED ($?)"; fail=1; }
pkill -9 -f nccl-smoke 2>/dev/null
echo "== 1b. the old pattern (receive inside the send group), expected to hang: confirms the diagnosis"
SMOKE_RECV_IN_GROUP=1 timeout -k 2 10 "$BIN/nccl-smoke" >/tmp/smoke-old.log 2>&1
old_rc=$?
echo "receive-in-group variant: exit $old_rc ($([ $old_rc -eq 0 ] && echo completed || echo 'did not complete within 10 s'))"
pkill -9 -f nccl-smoke 2>/dev/null

echo "== 1c. protocol tests on the GPU pair (dsv2-nccl two_ranks: per-layer, slots, dead shard, init timeout)"
if [ -x "$BIN/nccl-two-ranks" ]; then
  timeout -k 5 120 "$BIN/nccl-two-ranks" --test-threads=1 2>&1 | grep -E "^test |test result|panicked|skipped" \
    || { echo "nccl-two-ranks FAILED"; fail=1; }
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "nccl-two-ranks FAILED (exit ${PIPESTATUS[0]})"; fail=1; }
else
  echo "nccl-two-ranks not carried in $BIN: SKIPPED"
fi

echo "== 2. NCCL round trip, router GPU 0 -> shard GPU 1 (echo: compute excluded; ffn: 80 experts, compute included)"
DSV2_NCCL_TRACE=1 timeout -k 5 180 "$BIN/nccl-roundtrip" --iters 200 --warmup 20 || { echo "nccl-roundtrip FAILED ($?)"; fail=1; }
pkill -9 -f nccl-roundtrip 2>/dev/null
# Variants (measured beside the default, not the default): a blocking-mode communicator split
# from the non-blocking one (each non-blocking group end costs ~55 µs of host time), and the
# decode slots (one fixed-size message answered by a shard that enqueued its reply ahead), with
# either communicator.
for v in "--blocking --bw-rows 0" "--slot-rows 4 --rows 1,4" "--slot-rows 4 --rows 1,4 --blocking"; do
  echo "== 2b. variant $v"
  DSV2_NCCL_TRACE=1 timeout -k 5 60 "$BIN/nccl-roundtrip" --iters 200 --warmup 20 $v || { echo "nccl-roundtrip ($v) FAILED ($?)"; fail=1; }
  pkill -9 -f nccl-roundtrip 2>/dev/null
done

echo "== 3. gRPC round trip for comparison: 2 shards on cuda:1, loopback (full / raw / zero)"
DSV2_BIN_DIR="$BIN" timeout -k 5 180 "$BIN/moe-roundtrip" --expert-device cuda:1 --iters 20 || { echo "moe-roundtrip FAILED ($?)"; fail=1; }

PIDFILE=/tmp/dsv2-nccl.pids
source scripts/lib/services.sh
trap stop_all EXIT

# compare MODEL_DIR IDS...: the same requests through gRPC, NCCL and NCCL with decode slots
# (prompt: per-layer protocol after an announcement slot; decode: 1-row slots), byte-equal JSON.
# NSHARDS shards per router (default 1), shard i on GPU 1 + i (NCCL puts every rank on a GPU of
# its own).
compare() {
  local dir=$1; shift
  local n=${NSHARDS:-1} i t a rg rn rs
  local -a ug=() un=() us=()
  for i in $(seq 0 $((n - 1))); do
    for t in g n s; do
      local tr=()
      [ $t = g ] || tr=(--transport nccl)
      a=$(start "e$t$i" "$BIN/dsv2-expert" --model-dir "$dir" "${EXTRA[@]}" --device "cuda:$((1 + i))" \
        --shard-index "$i" --num-shards "$n" "${tr[@]}") || { fail=1; stop_all; return; }
      case $t in g) ug+=(--shard "http://$a") ;; n) un+=(--shard "http://$a") ;; s) us+=(--shard "http://$a") ;; esac
    done
  done
  rg=$(start rg "$BIN/dsv2-router" --model-dir "$dir" "${EXTRA[@]}" --device cuda:0 "${ug[@]}") || { fail=1; stop_all; return; }
  rn=$(start rn "$BIN/dsv2-router" --model-dir "$dir" "${EXTRA[@]}" --device cuda:0 "${un[@]}" --transport nccl) || { tail -5 /tmp/en0.err; fail=1; stop_all; return; }
  rs=$(start rs env DSV2_NCCL_SLOTS=4 DSV2_NCCL_BLOCKING=1 "$BIN/dsv2-router" --model-dir "$dir" "${EXTRA[@]}" --device cuda:0 "${us[@]}" --transport nccl) || { tail -5 /tmp/es0.err; fail=1; stop_all; return; }
  for ids in "$@"; do
    for t in g n s; do
      local ep
      case $t in g) ep=$rg ;; n) ep=$rn ;; s) ep=$rs ;; esac
      "$BIN/dsv2" generate --endpoint "http://$ep" --input-ids "$ids" --max-output-len 16 --ignore-eos \
        --json --logprobs 5 --prompt-logprobs 5 >"/tmp/out-$t.json" 2>"/tmp/out-$t.err" || tail -3 "/tmp/out-$t.err"
    done
    verdict=$("$PY" - <<'PYEOF'
import json
try:
    g, n, s = (json.loads(open(f"/tmp/out-{t}.json").read().strip().splitlines()[-1]) for t in "gns")
except Exception as e:
    print(f"NO-OUTPUT {e}"); raise SystemExit
keys = ("output_ids", "logprobs", "prompt_logprobs")
bad = [f"nccl:{k}" for k in keys if g[k] != n[k]] + [f"slots:{k}" for k in keys if g[k] != s[k]]
tps = f"nccl {n['tokens_per_s']:.1f}, slots {s['tokens_per_s']:.1f}, grpc {g['tokens_per_s']:.1f} tok/s"
print(("EQUAL (ids, logprobs, prompt logprobs; nccl and slots vs grpc)" if not bad else "DIFF in " + ",".join(bad)) + f"; {len(g['output_ids'])} tokens; {tps}")
PYEOF
)
    echo "$(basename "$dir") ($n shard(s)) [${ids:0:30}...]: $verdict"
    case "$verdict" in EQUAL*) ;; *) fail=1;; esac
  done
  stop_all
}
ids_of() { "$PY" -c "import json; print(','.join(map(str, json.load(open('$1'))['cases'][$2]['input_ids'])))"; }

echo "== 4. --transport nccl vs grpc, router cuda:0 + 1 shard cuda:1, golden fixtures"
for fx in v2 v2-lite dense2; do
  dir=tests/fixtures/models/$fx
  compare "$dir" "$(ids_of "$dir/reference.json" 0)" "$(ids_of "$dir/reference.json" 1)" "$(ids_of "$dir/reference.json" 2)"
done

G=$(nvidia-smi -L | wc -l)
if [ "$G" -ge 3 ]; then
  echo "== 4b. the same with $((G - 1)) shards (one per GPU 1..$((G - 1))), golden fixtures"
  for fx in v2 v2-lite; do
    dir=tests/fixtures/models/$fx
    NSHARDS=$((G - 1)) compare "$dir" "$(ids_of "$dir/reference.json" 0)" "$(ids_of "$dir/reference.json" 1)"
  done
fi

echo "== 5. the same on a real-dims DeepSeek-V2 ($LAYERS layers, --random-weights 1: drawn on each GPU)"
mkdir -p /tmp/rdc
"$BIN/dsv2" init-random --preset deepseek-v2 --layers "$LAYERS" --config-only --out /tmp/rdc 2>/dev/null
EXTRA=(--random-weights 1)
compare /tmp/rdc "138,158,33,333,438,211,210" "100000,17464,3,4,5,6,7,8,9,10,11,12,13"
echo "== 6. a shard killed under a slot-mode router (DSV2_NCCL_SLOTS=4): the next request fails with UNAVAILABLE within 30 s, no hang"
dir=tests/fixtures/models/v2
EXTRA=()
if es=$(start es "$BIN/dsv2-expert" --model-dir "$dir" --device cuda:1 --shard-index 0 --num-shards 1 --transport nccl) \
  && rs=$(start rs env DSV2_NCCL_SLOTS=4 DSV2_NCCL_BLOCKING=1 "$BIN/dsv2-router" --model-dir "$dir" --device cuda:0 --shard "http://$es" --transport nccl); then
  "$BIN/dsv2" generate --endpoint "http://$rs" --input-ids "$(ids_of "$dir/reference.json" 0)" --max-output-len 8 --ignore-eos >/dev/null 2>&1 \
    && echo "before the kill: request OK" || { echo "before the kill: request FAILED"; fail=1; }
  pkill -9 -f "dsv2-expert --model-dir $dir" ; sleep 2
  t_kill=$(date +%s.%N)
  timeout -k 5 30 "$BIN/dsv2" generate --endpoint "http://$rs" --input-ids "$(ids_of "$dir/reference.json" 0)" --max-output-len 8 --ignore-eos >/tmp/dead.out 2>/tmp/dead.err
  rc=$?
  took=$("$PY" -c "import time; print(round(time.time() - $t_kill, 1))")
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && grep -qi "unavailable" /tmp/dead.err; then
    echo "after the kill: failed as expected in ${took} s: $(grep -i -m1 unavailable /tmp/dead.err | cut -c1-200)"
  else
    echo "after the kill: NOT as expected (exit $rc after ${took} s): $(tail -2 /tmp/dead.err)"; fail=1
  fi
else
  fail=1
fi
stop_all
echo "gpu-nccl exit status: $fail"
exit $fail
