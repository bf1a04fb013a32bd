#!/usr/bin/env bash
# Issue 9: DeepSeek-V2 at its real shape on one GPU host, in one call.
#
# Weights: `--random-weights` (drawn on each GPU from a seed; a 60-layer bf16 checkpoint is
# ~470 GB, more than these hosts' disks hold). Layout, with G = number of GPUs:
#   router (attention, gating, shared experts, dense layer 0, lm_head) alone on GPU 0 and G-1
#   expert shards on GPUs 1..G-1 over --transport nccl, contiguous placement (160 experts do
#   not split into 7 equal routing groups; contiguous gives 23/23/.../22). The router does the
#   attention of every layer for every token: sharing its GPU with a shard would put the two on
#   the critical path of each other; the shards' ~64 GB of experts each (8 GPUs) fit anyway. And
#   NCCL refuses two ranks of one communicator on the same GPU, so over NCCL a shard cannot share
#   the router's GPU at all (8 shards would need gRPC for the one on GPU 0).
# Steps: (1) a truncated copy (3 layers) through the services against the in-process GPU run
# (same seed, so the same weights): greedy ids must match, prompt logprobs close; (2) the full
# model (LAYERS, default 60 on >= 8 GPUs; on fewer GPUs as many as fit on one shard, and a
# second, shallow run to extrapolate per-layer cost to 60 layers, labelled as such): decode
# tokens/s at batch 1, 64, 256, prefill tokens/s at 2048-token prompts, GPU memory per rank.
# Then the same with the router's NCCL decode slots (SLOTS_ENV, default "DSV2_NCCL_SLOTS=4
# DSV2_NCCL_BLOCKING=1"; empty skips it): the step-1 check, and decode at batch 1 and 4 at both
# depths, extrapolated the same way.
# Build here, carry the stripped binaries (BIN, default .gpubin): dsv2 dsv2-router dsv2-expert.
# Log: $OUT/full-scale.log. Exit status 0 when every step ran and the check passed.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.gpubin}"
OUT_DIR="${OUT:-/tmp/dsv2-full-scale}"
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/full-scale.log") 2>&1
export NCCL_NVLS_ENABLE=0 DSV2_CACHE_DIR=/tmp/dsv2-cache DSV2_LOG=warn
PY="${PYTHON:-python3}"
SEED="${SEED:-1}"
G=$(nvidia-smi -L | wc -l)
if [ "$G" -lt 2 ]; then echo "needs at least 2 GPUs (router + a shard); found $G"; exit 2; fi
# Below 8 GPUs: as many layers as the shards hold. One MoE layer's 160 experts are 7.55 GB of
# bf16; 118 GB of experts per shard leaves room for the exchange buffers and the CUDA context on
# a 139 GB H200 (x2: 16 layers, measured at 110.1 GB on the shard; x4: 47), and the dense layer 0
# adds no experts.
if [ "$G" -ge 8 ]; then LAYERS="${LAYERS:-60}"; SHALLOW=""; else LAYERS="${LAYERS:-$((1 + 118 * (G - 1) * 100 / 755))}"; SHALLOW="${SHALLOW:-4}"; fi
SHARDS=$((G - 1))
SLOTS_ENV="${SLOTS_ENV-DSV2_NCCL_SLOTS=4 DSV2_NCCL_BLOCKING=1}"
ROUTER_ENV=""  # extra environment of the router (set per step below)
fail=0
echo "== $(date -u +%FT%TZ) $G GPUs: $(nvidia-smi -L | head -1); router GPU 0, $SHARDS shard(s); layers $LAYERS${SHALLOW:+ (+ $SHALLOW for the extrapolation)}"

PIDFILE=/tmp/dsv2-fs.pids
source scripts/lib/services.sh
trap stop_all EXIT

# cluster DIR: router on GPU 0 + SHARDS shards over NCCL; prints the router address.
cluster() {
  local dir=$1 urls=() i e
  for i in $(seq 0 $((SHARDS - 1))); do
    e=$(start "shard$i" "$BIN/dsv2-expert" --model-dir "$dir" --random-weights "$SEED" --device "cuda:$((i + 1))" \
      --shard-index "$i" --num-shards "$SHARDS" --transport nccl) || return 1
    urls+=(--shard "http://$e")
  done
  start router env $ROUTER_ENV "$BIN/dsv2-router" --model-dir "$dir" --random-weights "$SEED" --device cuda:0 "${urls[@]}" \
    --placement contiguous --transport nccl --max-batch-tokens 4096 --max-running 256 --max-queue 1024 \
    --kv-cache-blocks "${KV_BLOCKS:-8192}" --request-timeout-s 1200
}

PROMPT="138,158,33,333,438,211,210,1000,2000,3000,4000,5000,6000,7000,8000,9000"
mkdir -p /tmp/fs3
"$BIN/dsv2" init-random --preset deepseek-v2 --layers 3 --config-only --out /tmp/fs3 --seed "$SEED" 2>/dev/null
"$BIN/dsv2" generate --model-dir /tmp/fs3 --random-weights "$SEED" --device cuda:0 --input-ids "$PROMPT" --max-output-len 16 --ignore-eos --json --prompt-logprobs 1 >/tmp/fs-ref.json 2>/tmp/fs-ref.err
# check LABEL: the truncated copy through the services (router env ROUTER_ENV) vs in-process.
check() {
  local r verdict
  if ! r=$(cluster /tmp/fs3); then fail=1; stop_all; return; fi
  "$BIN/dsv2" generate --endpoint "http://$r" --input-ids "$PROMPT" --max-output-len 16 --ignore-eos --json --prompt-logprobs 1 >/tmp/fs-svc.json 2>/tmp/fs-svc.err
  stop_all
  verdict=$("$PY" - <<'PYEOF'
import json
try:
    s, r = (json.loads(open(p).read().strip().splitlines()[-1]) for p in ("/tmp/fs-svc.json", "/tmp/fs-ref.json"))
except Exception as e:
    print(f"NO-OUTPUT {e}"); raise SystemExit
d = max((abs(a["logprob"] - b["logprob"]) for a, b in zip(s["prompt_logprobs"][1:], r["prompt_logprobs"][1:])), default=float("nan"))
ok = s["output_ids"] == r["output_ids"] and d < 0.05
print(("OK" if ok else "MISMATCH") + f": greedy ids {'equal' if s['output_ids'] == r['output_ids'] else 'differ'}, max |d prompt logprob| {d:.2e}")
PYEOF
)
  echo "check ($1): $verdict"; case "$verdict" in OK*) ;; *) fail=1; tail -n 3 /tmp/fs-svc.err /tmp/fs-ref.err;; esac
}
echo "== 1. truncated copy (3 layers): services over NCCL vs in-process on cuda:0, same seed"
check "per-layer NCCL"
if [ -n "$SLOTS_ENV" ]; then ROUTER_ENV="$SLOTS_ENV" check "$SLOTS_ENV"; fi

# measure DIR LABEL [BATCHES] [noprefill]: decode at each batch (default 1 64 256) and prefill
# 2048 through the router; decode rates go to /tmp/fs-tps-LABEL-BATCH.
measure() {
  local dir=$1 label=$2 batches=${3:-1 64 256} prefill=${4:-prefill} r b
  t0=$(date +%s)
  r=$(cluster "$dir") || { fail=1; stop_all; return; }
  echo "$label: cluster up in $(( $(date +%s) - t0 )) s"
  nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv,noheader | sed "s/^/$label memory (GPU, used, total): /"
  for b in $batches; do
    # 2 x b DISTINCT 16-token prompts (dsv2 bench's seeded ids, bench/prompts.py): copies of one
    # prompt would route every row to the same experts and hide the MoE cost (issue 19)
    "$PY" -c "import json, sys; sys.path.insert(0, 'bench'); import prompts
json.dump([{'token_ids': {'ids': p}, 'max_new_tokens': 64, 'ignore_eos': True}
           for p in prompts.random_batch(0, 2 * $b, 16, 102400, [100000, 100001])], open('/tmp/lt-decode.json', 'w'))"
    "$BIN/dsv2" loadtest --endpoint "http://$r" -c "$b" -n "$((b * 2))" --timeout 1200s --data /tmp/lt-decode.json \
      --json-out "/tmp/lt-$b.json" >/dev/null 2>"/tmp/lt-$b.err" || { tail -3 "/tmp/lt-$b.err"; fail=1; }
    "$PY" -c "import json; j=json.load(open('/tmp/lt-$b.json')); d=j['dsv2']; print('$label decode batch $b: %.1f tok/s (%d ok, %d errors; distinct 16-token prompts, 64 new tokens)' % (d['tokensPerSec'], d['okCount'], d['errorCount'])); open('/tmp/fs-tps-$label-$b', 'w').write(str(d['tokensPerSec']))" 2>/dev/null || echo "$label decode batch $b: no report"
  done
  if [ "$prefill" != prefill ]; then stop_all; return; fi
  long=$("$PY" -c "import random; random.seed(0); print(','.join(str(random.randrange(1000, 100000)) for _ in range(2048)))")
  echo "{\"token_ids\":{\"ids\":[$long]},\"max_new_tokens\":1,\"ignore_eos\":true}" >/tmp/lt-prefill-req.json
  "$BIN/dsv2" loadtest --endpoint "http://$r" -c 4 -n 8 --timeout 1200s --data /tmp/lt-prefill-req.json \
    --json-out /tmp/lt-prefill.json >/dev/null 2>/tmp/lt-prefill.err || { tail -3 /tmp/lt-prefill.err; fail=1; }
  "$PY" -c "import json; j=json.load(open('/tmp/lt-prefill.json')); d=j['dsv2']; print('$label prefill: %.0f prompt tok/s (2048-token prompts, 4 concurrent; %d ok, %d errors)' % (d['okCount'] * 2048 / (j['total'] / 1e9), d['okCount'], d['errorCount']))" 2>/dev/null || echo "$label prefill: no report"
  stop_all
}

# extrapolate PREFIX BATCHES...: per batch b, step time t(L) = b / tok_s(L) is linear in L; t(60)
# from the two depths (an EXTRAPOLATION, not a measurement).
extrapolate() {
  "$PY" - "$SHALLOW" "$LAYERS" "$@" <<'PYEOF'
import sys
lo, hi, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for b in map(int, sys.argv[4:]):
    try:
        t = {L: b / float(open(f"/tmp/fs-tps-{prefix}{L}-{b}").read()) for L in (lo, hi)}
    except Exception as e:
        print(f"EXTRAPOLATION {prefix} batch {b}: missing a measurement ({e})"); continue
    per_layer = (t[hi] - t[lo]) / (hi - lo)
    t60 = t[lo] + (60 - lo) * per_layer
    print(f"EXTRAPOLATED (not measured) {prefix}60 layers, decode batch {b}: {b / t60:.1f} tok/s "
          f"(step {t60 * 1e3:.2f} ms = {t[lo] * 1e3:.2f} ms at {lo} layers + {per_layer * 1e3:.3f} ms per layer)")
PYEOF
}

echo "== 2. full shape: $LAYERS layers"
mkdir -p /tmp/fsN
"$BIN/dsv2" init-random --preset deepseek-v2 --layers "$LAYERS" --config-only --out /tmp/fsN --seed "$SEED" 2>/dev/null
measure /tmp/fsN "L=$LAYERS"
if [ -n "$SHALLOW" ]; then
  echo "== 3. shallow run (L=$SHALLOW) for the per-layer extrapolation to 60 layers (an EXTRAPOLATION, not a measurement)"
  mkdir -p /tmp/fsS
  "$BIN/dsv2" init-random --preset deepseek-v2 --layers "$SHALLOW" --config-only --out /tmp/fsS --seed "$SEED" 2>/dev/null
  measure /tmp/fsS "L=$SHALLOW"
  extrapolate "L=" 1 64 256
fi
if [ -n "$SLOTS_ENV" ]; then
  echo "== 4. decode with $SLOTS_ENV (batch 1 and 4)"
  ROUTER_ENV="$SLOTS_ENV" measure /tmp/fsN "S=$LAYERS" "1 4" noprefill
  if [ -n "$SHALLOW" ]; then
    ROUTER_ENV="$SLOTS_ENV" measure /tmp/fsS "S=$SHALLOW" "1 4" noprefill
    extrapolate "S=" 1 4
  fi
fi
echo "full-scale exit status: $fail"
exit $fail
