#!/usr/bin/env bash
# Failover soak (issue 14): dsv2-router + 4 expert shards on the CPU tiny model with every expert
# on 2 shards (--replicas 2), C concurrent streaming greedy requests from `dsv2 loadtest` for
# DURATION seconds, and every EVERY seconds one shard (0, 1, 2, 3, 0, ... in turn) SIGKILLed and
# started again on its address. Prints the loadtest report, the router's shard metrics, and the
# router's RSS (VmRSS) when the load starts, after the first period, and at the end, with the
# growth from each. Not a CI test: it runs for minutes.
#
#   bench/soak_failover.sh                          # 256 streams, 120 s, a kill every 20 s
#   C=64 DURATION=30 EVERY=10 bench/soak_failover.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
C=${C:-256}
DURATION=${DURATION:-120}
EVERY=${EVERY:-20}
NEW=${NEW:-16}
MODEL_ARGS=${MODEL_ARGS:---model-dir tiny}
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
METRICS=$(free_port)
work=$(mktemp -d)
echo "work dir: $work" >&2
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

wait_ready() { # file pid
    for _ in $(seq 600); do
        grep -qs DSV2_READY "$1" && return 0
        kill -0 "$2" 2>/dev/null || { echo "process $2 died; its log:" >&2; cat "${1%.out}.err" >&2; exit 1; }
        sleep 0.1
    done
    echo "not ready: $1" >&2
    exit 1
}

shard_port=()
shard_pid=()
start_shard() { # index
    local i=$1
    # shellcheck disable=SC2086
    "$BIN/dsv2-expert" $MODEL_ARGS --shard-index "$i" --num-shards 4 --replicas 2 \
        --listen "127.0.0.1:${shard_port[$i]}" --log-level warn \
        >"$work/shard-$i.out" 2>>"$work/shard-$i.err" &
    shard_pid[$i]=$!
    pids+=("$!")
}
# One at a time: the first writes the embedded tiny model to the cache for the others.
for i in 0 1 2 3; do
    shard_port[$i]=$(free_port)
    start_shard "$i"
    wait_ready "$work/shard-$i.out" "${shard_pid[$i]}"
done

# --max-queue above C: a stream that just ended and the next one may overlap for a moment.
# shellcheck disable=SC2086
"$BIN/dsv2-router" $MODEL_ARGS --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$METRICS" \
    --replicas 2 --max-queue $((2 * C)) --log-level warn \
    $(for i in 0 1 2 3; do echo --shard "http://127.0.0.1:${shard_port[$i]}"; done) \
    >"$work/router.out" 2>"$work/router.err" &
router=$!
pids+=("$router")
wait_ready "$work/router.out" "$router"

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$router/status"; }
printf '{"text": "The router receives a request", "max_new_tokens": %d, "temperature": 0, "ignore_eos": true}\n' \
    "$NEW" >"$work/data.json"

echo "=== $C streams for ${DURATION}s, replicas 2, a shard killed and restarted every ${EVERY}s"
rss_start=$(rss_kb)
"$BIN/dsv2" loadtest --endpoint "http://127.0.0.1:$PORT" --call stream -c "$C" -n 0 \
    -z "${DURATION}s" --data "$work/data.json" --timeout 120s --json-out "$work/report.json" \
    >"$work/loadtest.txt" &
load=$!
pids+=("$load")
kills=0
rss_first=""
t0=$(date +%s)
next=$EVERY
while kill -0 "$load" 2>/dev/null; do
    now=$(($(date +%s) - t0))
    if [ "$now" -ge "$next" ] && [ "$now" -lt "$DURATION" ]; then
        [ -n "$rss_first" ] || rss_first=$(rss_kb)
        i=$((kills % 4))
        kill -KILL "${shard_pid[$i]}"
        wait "${shard_pid[$i]}" 2>/dev/null || true
        echo "t=${now}s: killed shard $i; restarting it"
        start_shard "$i"
        kills=$((kills + 1))
        next=$((next + EVERY))
    fi
    sleep 0.2
done
wait "$load"
rss_end=$(rss_kb)
cat "$work/loadtest.txt"
curl -s "http://127.0.0.1:$METRICS/metrics" | grep -E '^dsv2_router_(shard_|generated_tokens_total|requests_total)' || true
python3 - "$work/report.json" "$rss_start" "${rss_first:-$rss_end}" "$rss_end" "$kills" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
start, first, end, kills = map(int, sys.argv[2:])
codes = r.get("statusCodeDistribution", {})
ok = codes.get("OK", 0)
print(f"requests: {r['count']}  ok: {ok}  failed: {r['count'] - ok}  status: {codes}")
print(f"shard kills + restarts: {kills}")
print(f"router RSS: {start / 1024:.1f} MiB at the load's start, {first / 1024:.1f} MiB after the first "
      f"period, {end / 1024:.1f} MiB at the end: +{100 * (end - start) / start:.1f}% from the start, "
      f"+{100 * (end - first) / first:.1f}% from the first period")
EOF
