#!/usr/bin/env bash
# Prefix cache benchmark (issue 15): N requests, each one shared PREFIX-token prefix plus its own
# QUESTION-token question (token ids, drawn from fixed seeds), all sent at once (-c N) to
# dsv2-router on the CPU tiny model: once with the prefix cache (the default), once with
# --no-prefix-cache. Prints `dsv2 loadtest`'s report (streamed calls: time to first token measured
# by the client, from sending the request to the first token) and the router's prefix-cache
# counters from /metrics.
#
#   bench/prefix_cache.sh            # 64 x (2048 + 32), 8 new tokens each
#   N=16 PREFIX=512 bench/prefix_cache.sh
#   MODEL_ARGS="--model-dir DIR --random-weights 1 --device cuda:0" bench/prefix_cache.sh   # a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
N=${N:-64}
PREFIX=${PREFIX:-2048}
QUESTION=${QUESTION:-32}
NEW=${NEW:-8}
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=${PORT:-$(free_port)}
METRICS=${METRICS:-$(free_port)}
ROUTER_ARGS=${ROUTER_ARGS:-}
work=$(mktemp -d)
echo "work dir: $work" >&2
# (never `kill 0`: with no router running that would signal this whole process group)
trap 'if [ -n "${router:-}" ]; then kill "$router" 2>/dev/null || true; fi; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT

python3 - "$work/data.json" "$N" "$PREFIX" "$QUESTION" "$NEW" <<'EOF'
import json, random, sys
path, n, prefix, question, new = sys.argv[1], *map(int, sys.argv[2:])
# ids 3..1000 of the tiny model's 1024 (0 and 1 are BOS and EOS)
shared = random.Random(15).choices(range(3, 1000), k=prefix)
reqs = []
for i in range(n):
    q = random.Random(1000 + i).choices(range(3, 1000), k=question)
    reqs.append({"tokenIds": {"ids": shared + q}, "maxNewTokens": new,
                 "temperature": 0, "ignoreEos": True})
json.dump(reqs, open(path, "w"))
EOF

for mode in cache no-cache; do
    flags=()
    [ "$mode" = no-cache ] && flags=(--no-prefix-cache)
    # shellcheck disable=SC2086
    # shellcheck disable=SC2086
    "$BIN/dsv2-router" ${MODEL_ARGS:---model-dir tiny} --listen "127.0.0.1:$PORT" \
        --metrics-listen "127.0.0.1:$METRICS" "${flags[@]}" $ROUTER_ARGS \
        --log-level warn >"$work/router-$mode.out" 2>"$work/router-$mode.err" &
    router=$!
    for _ in $(seq 600); do
        grep -qs DSV2_READY "$work/router-$mode.out" && break
        kill -0 "$router" || { cat "$work/router-$mode.err"; exit 1; }
        sleep 0.2
    done
    echo "=== $mode: $N requests x ($PREFIX shared + $QUESTION own) tokens, $NEW new each, all at once"
    "$BIN/dsv2" loadtest --endpoint "http://127.0.0.1:$PORT" --call stream \
        -c "$N" -n "$N" --data "$work/data.json" --timeout 600s
    curl -s "http://127.0.0.1:$METRICS/metrics" |
        grep -E '^dsv2_router_(prefix_cache|kv_cache_cached|kv_cache_evicted|engine_steps)' || true
    kill "$router"
    wait "$router" 2>/dev/null || true
    router=
done
